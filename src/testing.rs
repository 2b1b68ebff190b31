//! Helpers for the crate's own unit tests: real tonic servers with
//! tonic-health on loopback.

use std::net::SocketAddr;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// A tonic server with only tonic-health, SERVING, on `127.0.0.1` and a
/// free port; it runs until the returned task is aborted.
pub(crate) async fn health_server() -> (SocketAddr, HealthReporter, tokio::task::JoinHandle<()>) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, reporter, server)
}
