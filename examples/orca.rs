//! Both ends of ORCA load reports (gRFC A51) and `weighted_round_robin`
//! (A58), on loopback: three tonic servers report their load with
//! healthlb's `OrcaLayer` and `OpenRcaService`, one of them twice as costly
//! per call, and a client weighs its round robin by what they say.
//!
//! ```sh
//! cargo run --example orca --features orca
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use healthlb::orca::{OpenRcaService, OrcaLayer, ServerMetricsRecorder};
use healthlb::{LbChannel, Policy, WeightedRoundRobin};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A tonic server that reports its load: the layer sends each call's report
/// in its trailers, and `OpenRcaService` streams them out of band. Its
/// utilization is qps × `cost` (what its work per call takes).
async fn server(addr: SocketAddr, cost: f64) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = ServerMetricsRecorder::new();
    let (_, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(OrcaLayer::new(metrics.clone()))
            .add_service(OpenRcaService::new(metrics.clone()))
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    // The application's own idea of its load: here, qps (measured by the
    // layer) × cost. `metrics.sample_process(..)` would report CPU instead.
    tokio::spawn(async move {
        loop {
            metrics.set_application_utilization(metrics.measured_qps() * cost);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addrs: Vec<SocketAddr> = (2..=4)
        .map(|i| SocketAddr::from(([127, 0, 0, i], port)))
        .collect();
    for (addr, cost) in addrs.iter().zip([0.002, 0.001, 0.001]) {
        server(*addr, cost).await?;
    }
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let wrr = WeightedRoundRobin::default()
        .blackout_period(Duration::from_millis(500))
        .weight_update_period(Duration::from_millis(100));
    let channel = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .policy(Policy::WeightedRoundRobin(wrr))
        .connect()
        .await?;
    let client = HealthClient::new(channel.clone());
    let spread = |n: usize| {
        let mut client = client.clone();
        let channel = channel.clone();
        async move {
            let before: BTreeMap<SocketAddr, u64> = channel
                .endpoints()
                .iter()
                .map(|e| (e.addr, e.calls_started))
                .collect();
            for _ in 0..n {
                client.check(HealthCheckRequest::default()).await?;
            }
            let after = channel.endpoints();
            let by: BTreeMap<String, u64> = after
                .iter()
                .map(|e| (e.addr.ip().to_string(), e.calls_started - before[&e.addr]))
                .collect();
            Ok::<_, tonic::Status>(by)
        }
    };
    println!(
        "300 calls before any weight counts:\n  {:?}",
        spread(300).await?
    );
    // Servers measure their qps over 1 s, and a weight counts after the
    // 0.5 s blackout: 2 s of calls.
    let warm = std::time::Instant::now();
    while warm.elapsed() < Duration::from_secs(2) {
        spread(10).await?;
    }
    println!(
        "300 calls once 127.0.0.2's reports say it costs twice as much:\n  {:?}",
        spread(300).await?
    );
    println!("\nWhat the channel thinks of each server:");
    for endpoint in channel.endpoints() {
        println!("  {endpoint}");
    }
    Ok(())
}
