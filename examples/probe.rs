//! Like grpc_health_probe, but for every endpoint of a target: resolves it,
//! health-checks each endpoint on its own connection, and prints what it
//! found. Exits 1 when no endpoint is SERVING, 2 on bad input.
//!
//! ```sh
//! cargo run --example probe -- dns:///echo.default.svc.cluster.local:50051
//! cargo run --example probe -- srv:_grpc._tcp.echo.default.svc.cluster.local --service echo.Echo --wait 10
//! ```

use std::time::{Duration, Instant};

use healthlb::LbChannel;
use healthlb::subchannel::SubchannelState;

fn usage() -> ! {
    eprintln!("usage: probe TARGET [--service NAME] [--wait SECS]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut target = None;
    let mut service = String::new();
    let mut wait = Duration::from_secs(5);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--service" => service = args.next().unwrap_or_else(|| usage()),
            "--wait" => {
                let secs: f64 = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage());
                wait = Duration::from_secs_f64(secs.clamp(0.1, 600.0));
            }
            _ if target.is_none() && !arg.starts_with("--") => target = Some(arg),
            _ => usage(),
        }
    }
    let Some(target) = target else { usage() };

    let channel = match LbChannel::builder(target.clone())
        .subchannels(|s| s.health_service(service))
        .build()
    {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    // Wait until every endpoint has an answer, or the time is up.
    let start = Instant::now();
    loop {
        let endpoints = channel.endpoints();
        let settled = !endpoints.is_empty()
            && endpoints
                .iter()
                .all(|e| !matches!(e.state, SubchannelState::Connecting));
        if settled || start.elapsed() >= wait {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let endpoints = channel.endpoints();
    println!("{target}: {} endpoint(s)", endpoints.len());
    for endpoint in &endpoints {
        let host = endpoint.hostname.as_deref().unwrap_or("-");
        println!("  {:<40} {:<30} {}", endpoint.addr, host, endpoint.state);
    }
    if !endpoints.iter().any(|e| e.state.is_serving()) {
        eprintln!("no endpoint is SERVING");
        std::process::exit(1);
    }
}
