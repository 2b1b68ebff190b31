//! healthlb's metrics in Prometheus form, on the demo's embedded cluster.
//!
//! ```sh
//! cargo run --example metrics
//! cargo run --example metrics -- --listen 127.0.0.1:9000 --calls 100 --hold 60
//! ```
//!
//! (Examples and tests build healthlb with its `metrics` feature on.) It
//! installs metrics-exporter-prometheus on 127.0.0.1:9000, starts a DNS
//! server and 4 echo backends in-process, makes `--calls` unary calls, and
//! opens a server-streaming call that it keeps open. Then it scrapes its own
//! `/metrics` and prints the healthlb lines: per-endpoint request and
//! stream-message counters, the open stream's messages included. It
//! serves `/metrics` for `--hold` more seconds (default 0), then exits.

use healthlb_testkit as support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use healthlb::LbChannel;
use support::dns::TestDns;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoRequest, StreamRequest};
use support::echo::{Backend, free_port, loopback};

struct Args {
    listen: SocketAddr,
    calls: usize,
    hold: Duration,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
        calls: 100,
        hold: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => args.listen = value.parse().map_err(|_| "--listen takes ADDR:PORT")?,
            "--calls" => {
                args.calls = value
                    .parse::<usize>()
                    .map_err(|_| "--calls takes a number")?
                    .min(1_000_000)
            }
            "--hold" => {
                args.hold = Duration::from_secs(
                    value
                        .parse::<u64>()
                        .map_err(|_| "--hold takes seconds")?
                        .min(3600),
                )
            }
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --listen, --calls, --hold"
                ));
            }
        }
    }
    Ok(args)
}

/// GET /metrics over plain HTTP/1.1.
fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(args.listen)
        .install()
    {
        eprintln!("cannot serve metrics on {}: {e}", args.listen);
        std::process::exit(1);
    }

    let port = free_port();
    let mut backends = Vec::new();
    for n in 2..=5 {
        backends.push(Backend::start(&format!("pod-{n}"), loopback(n, port)).await);
    }
    let dns = TestDns::start().await;
    let ips: Vec<Ipv4Addr> = (2..=5).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect();
    dns.zone().set_a("echo.demo.local", &ips, 1);
    let channel = LbChannel::builder(dns.target("echo.demo.local", port))
        .connect()
        .await
        .expect("the embedded cluster serves");
    let mut client = EchoClient::new(channel.clone());
    let mut failed = 0;
    for _ in 0..args.calls {
        if client
            .unary(EchoRequest {
                message: "m".into(),
            })
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    // A server stream that stays open: 5 messages read, 995 to come.
    let request = StreamRequest {
        message: "s".into(),
        count: 1000,
        interval_ms: 1000,
    };
    let mut stream = client
        .server_stream(request)
        .await
        .expect("stream opens")
        .into_inner();
    for _ in 0..5 {
        let _ = stream.message().await;
    }
    // Let the exporter see the last counts.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = match scrape(args.listen) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("scraping {} failed: {e}", args.listen);
            std::process::exit(1);
        }
    };
    println!(
        "{} unary calls ({failed} failed) and one open server stream; /metrics says:\n",
        args.calls
    );
    for line in text.lines().filter(|l| l.starts_with("healthlb_")) {
        println!("{line}");
    }
    println!(
        "\nREADY: serving http://{}/metrics for {:?}",
        args.listen, args.hold
    );
    tokio::time::sleep(args.hold).await;
    drop(stream);
}
