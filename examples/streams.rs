//! Runs concurrent server-streaming calls through an `LbChannel` and reports
//! how each ended, how long they all took, and the connections used: a
//! check of long streams against a server that caps its concurrent streams.
//!
//! ```sh
//! # Three 40 s streams, silent 20 s at a time, against a server allowing 4 streams:
//! cargo run --example streams -- ipv4:127.0.0.1:50051 --calls 3 --count 3 --interval-ms 20000
//! # Ten 1 s calls against a server allowing 2, with and without extra connections:
//! cargo run --example streams -- ipv4:127.0.0.1:50051 --calls 10 --count 2 --interval-ms 1000 --max-connections 12
//! cargo run --example streams -- ipv4:127.0.0.1:50051 --calls 10 --count 2 --interval-ms 1000 --max-connections 1
//! ```
//!
//! `interop/ccore_echo_server.py` serves the echo service from C-core (grpcio)
//! with a chosen stream limit. Exits 1 if any call failed, 2 on bad input.

use healthlb_testkit as support;

use std::time::{Duration, Instant};

use healthlb::LbChannel;
use support::echo::pb::StreamRequest;
use support::echo::pb::echo_client::EchoClient;

struct Args {
    target: String,
    calls: usize,
    count: u32,
    interval_ms: u32,
    max_connections: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: streams TARGET [--calls N] [--count N] [--interval-ms MS] [--max-connections N]"
    );
    std::process::exit(2);
}

fn args() -> Args {
    let mut args = Args {
        target: String::new(),
        calls: 3,
        count: 3,
        interval_ms: 20_000,
        max_connections: 8,
    };
    let mut it = std::env::args().skip(1);
    let number = |it: &mut dyn Iterator<Item = String>| -> u64 {
        it.next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage())
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--calls" => args.calls = number(&mut it).clamp(1, 10_000) as usize,
            "--count" => args.count = number(&mut it).clamp(1, 10_000) as u32,
            "--interval-ms" => args.interval_ms = number(&mut it).min(600_000) as u32,
            "--max-connections" => args.max_connections = number(&mut it).clamp(1, 1024) as usize,
            _ if args.target.is_empty() && !arg.starts_with("--") => args.target = arg,
            _ => usage(),
        }
    }
    if args.target.is_empty() {
        usage();
    }
    args
}

#[tokio::main]
async fn main() {
    let args = args();
    let channel = match LbChannel::builder(args.target.clone())
        .subchannels(|s| s.max_connections_per_endpoint(args.max_connections))
        .ready_timeout(Duration::from_secs(600))
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let calls = (0..args.calls).map(|i| {
        let mut client = EchoClient::new(channel.clone());
        let request = StreamRequest {
            message: format!("stream {i}"),
            count: args.count,
            interval_ms: args.interval_ms,
        };
        async move {
            let mut replies = client.server_stream(request).await?.into_inner();
            let mut received = 0;
            while replies.message().await?.is_some() {
                received += 1;
            }
            Ok::<u32, tonic::Status>(received)
        }
    });
    let results = futures::future::join_all(calls).await;
    let took = started.elapsed();
    let mut failed = 0;
    for (i, result) in results.iter().enumerate() {
        match result {
            Ok(n) => println!("stream {i}: OK, {n} of {} messages", args.count),
            Err(status) => {
                failed += 1;
                println!("stream {i}: {:?}: {}", status.code(), status.message());
            }
        }
    }
    println!(
        "{} of {} calls OK in {:.2} s (max_connections_per_endpoint {})",
        results.len() - failed,
        results.len(),
        took.as_secs_f64(),
        args.max_connections
    );
    for e in channel.endpoints() {
        println!(
            "{}: {}, {} connection(s), server stream limit {}, {} connect(s)",
            e.addr,
            e.state,
            e.connections,
            e.max_concurrent_streams
                .map_or("none".to_owned(), |m| m.to_string()),
            e.connects
        );
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
