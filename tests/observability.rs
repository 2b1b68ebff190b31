//! Observability: the status API, the Prometheus metrics of
//! `examples/metrics.rs` scraped and checked against the calls made, and
//! headers (W3C `traceparent`) passing through untouched.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use healthlb::{LbChannel, SubchannelState};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};

fn scrape(addr: SocketAddr) -> String {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The sum of a metric's samples whose labels contain every `filter`.
fn sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The metrics example, built by `cargo test` next to this test binary.
fn example_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    debug_dir
        .join("examples")
        .join(format!("metrics{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn the_metrics_example_counts_calls_and_live_stream_messages() {
    let binary = example_binary();
    assert!(
        binary.exists(),
        "cargo test builds the example: {}",
        binary.display()
    );
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let calls = 37;
    let mut child = Command::new(&binary)
        .args([
            "--listen",
            &listen.to_string(),
            "--calls",
            &calls.to_string(),
            "--hold",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let start = Instant::now();
    let mut printed = String::new();
    let mut ready = false;
    while start.elapsed() < Duration::from_secs(30) {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        printed.push_str(&line);
        if line.starts_with("READY") {
            ready = true;
            break;
        }
    }
    assert!(ready, "the example got ready: {printed}");
    let text = scrape(listen);
    let _ = child.kill();
    let _ = child.wait();

    // Every unary call is counted once, OK; the open stream is not done yet.
    assert_eq!(
        sum(&text, "healthlb_requests_total", &["code=\"OK\""]),
        f64::from(calls),
        "{text}"
    );
    assert_eq!(sum(&text, "healthlb_requests_total", &[]), f64::from(calls));
    // Sent: one message per unary call, and the stream's request.
    assert_eq!(
        sum(&text, "healthlb_stream_messages_sent_total", &[]),
        f64::from(calls + 1)
    );
    // Received: one per unary call, and at least the 5 stream messages read.
    let received = sum(&text, "healthlb_stream_messages_received_total", &[]);
    assert!(
        received >= f64::from(calls + 5),
        "live stream messages counted: {received}"
    );
    // Per endpoint, with 4 endpoints SERVING.
    let endpoints = text
        .lines()
        .filter(|l| l.starts_with("healthlb_requests_total{"))
        .count();
    assert_eq!(endpoints, 4, "one series per endpoint: {text}");
    assert_eq!(
        sum(&text, "healthlb_endpoints", &["state=\"serving\""]),
        4.0
    );
    assert_eq!(
        sum(
            &text,
            "healthlb_health_transitions_total",
            &["to=\"serving\""]
        ),
        4.0
    );
    assert!(sum(&text, "healthlb_resolutions_total", &["result=\"ok\""]) >= 1.0);
    // One connection per endpoint: none reached its server's stream limit.
    assert_eq!(sum(&text, "healthlb_connections", &[]), 4.0, "{text}");
    // The example printed the same sample.
    assert!(
        printed.contains("healthlb_stream_messages_received_total{"),
        "{printed}"
    );
}

#[tokio::test]
async fn headers_pass_through_untouched_for_trace_propagation() {
    let port = free_port();
    let backend = Backend::start("t", loopback(200, port)).await;
    let channel = LbChannel::builder(format!("ipv4:{}", backend.addr))
        .user_agent("my-service/1.2")
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = tonic::Request::new(EchoRequest {
        message: "t".into(),
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
        .metadata_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-custom", "kept".parse().unwrap());
    client.unary(request).await.unwrap();

    let headers = backend.counters.last_headers.lock().unwrap().clone();
    assert_eq!(
        headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    assert_eq!(
        headers.get("tracestate").map(String::as_str),
        Some("vendor=opaque")
    );
    assert_eq!(headers.get("x-custom").map(String::as_str), Some("kept"));
    let agent = headers.get("user-agent").cloned().unwrap_or_default();
    assert!(agent.starts_with("my-service/1.2 healthlb/"), "{agent}");
}

#[tokio::test]
async fn endpoint_status_reports_what_the_client_thinks() {
    let port = free_port();
    let backend = Backend::start("s", loopback(201, port)).await;
    let channel = LbChannel::builder(format!("ipv4:{},{}", backend.addr, loopback(202, port)))
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..7 {
        client
            .unary(EchoRequest {
                message: "s".into(),
            })
            .await
            .unwrap();
    }
    let refused_seen = support::wait_for(Duration::from_secs(5), || {
        channel
            .endpoints()
            .iter()
            .any(|e| e.addr == loopback(202, port) && e.last_error.is_some())
    })
    .await;
    assert!(refused_seen.is_some());

    let endpoints = channel.endpoints();
    let up = endpoints.iter().find(|e| e.addr == backend.addr).unwrap();
    assert!(matches!(up.state, SubchannelState::Serving));
    assert_eq!(
        up.last_health,
        Some(1),
        "the last health answer was SERVING"
    );
    assert_eq!(up.calls_started, 7);
    assert_eq!(up.calls_in_flight, 0);
    assert_eq!(up.calls_failed, 0);
    assert_eq!(up.connects, 1);
    assert!(up.connection_age.is_some() && up.state_for > Duration::ZERO);

    let down = endpoints
        .iter()
        .find(|e| e.addr == loopback(202, port))
        .unwrap();
    assert!(
        matches!(down.state, SubchannelState::TransientFailure(_)),
        "{}",
        down.state
    );
    assert_eq!(down.calls_started, 0);
    let error = down.last_error.as_ref().unwrap();
    assert_eq!(error.label(), "connect refused");
    assert!(error.to_string().contains("127.0.0.202"), "{error}");
}
