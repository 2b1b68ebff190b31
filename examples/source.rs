//! A user's own endpoint source: a file of `host:port` lines, re-read every
//! 500 ms, balanced over like any target.
//!
//! ```sh
//! cargo run --example source
//! ```
//!
//! It starts three echo backends with tonic-health on 127.0.0.2–4, lists
//! two of them in a file, and sends calls; then adds the third to the file,
//! and later leaves only it. After each step it prints which backend
//! answered how many calls.

use healthlb_testkit as support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use healthlb::LbChannel;
use healthlb::resolve::Endpoint;
use healthlb::resolve::{EndpointSource, SourceError};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, backends, free_port};

/// The whole source: read the file, say what it lists.
struct EndpointsFile {
    path: PathBuf,
    first: bool,
}

impl EndpointSource for EndpointsFile {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        if !std::mem::take(&mut self.first) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => text,
            Err(e) => return Some(Err(e.into())),
        };
        let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let endpoints = lines.map(|l| l.parse().map(Endpoint::new));
        Some(
            endpoints
                .collect::<Result<_, _>>()
                .map_err(SourceError::from),
        )
    }
}

fn write(path: &PathBuf, backends: &[&Backend]) -> std::io::Result<()> {
    let lines: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    std::fs::write(path, lines.join("\n"))
}

/// Sends `n` calls and prints who answered them.
async fn calls(step: &str, client: &mut EchoClient<LbChannel>, n: usize) {
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..n {
        let reply = client.unary(EchoRequest {
            message: "hi".into(),
        });
        let backend = match reply.await {
            Ok(reply) => reply.into_inner().backend,
            Err(status) => format!("failed: {}", status.code()),
        };
        *seen.entry(backend).or_default() += 1;
    }
    println!("{step:<32} {seen:?}");
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = free_port();
    let b = backends(2, 3, port).await;
    let path = std::env::temp_dir().join(format!("healthlb-example-{port}.txt"));
    write(&path, &[&b[0], &b[1]])?;

    let source = EndpointsFile {
        path: path.clone(),
        first: true,
    };
    let channel = LbChannel::from_source("echo.internal", source)
        .connect()
        .await?;
    let mut client = EchoClient::new(channel.clone());
    calls("the file lists two", &mut client, 30).await;

    write(&path, &[&b[0], &b[1], &b[2]])?;
    let three = |c: &LbChannel| c.endpoints().iter().filter(|e| e.in_rotation).count() == 3;
    support::wait_for(Duration::from_secs(5), || three(&channel)).await;
    calls("a third one added", &mut client, 30).await;

    write(&path, &[&b[2]])?;
    let one = |c: &LbChannel| c.endpoints().len() == 1;
    support::wait_for(Duration::from_secs(5), || one(&channel)).await;
    calls("only the third left", &mut client, 30).await;

    std::fs::remove_file(&path)?;
    Ok(())
}
