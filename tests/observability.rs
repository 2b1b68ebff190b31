//! Observability: the status API, and headers (W3C `traceparent`) passing
//! through untouched. The metrics have a test binary of their own,
//! `tests/metrics.rs`.

use healthlb_testkit as support;

use std::time::Duration;

use healthlb::LbChannel;
use healthlb::subchannel::HealthStatus;
use healthlb::subchannel::SubchannelState;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};

#[tokio::test]
async fn headers_pass_through_untouched_for_trace_propagation() {
    let port = free_port();
    let backend = Backend::start("t", loopback(200, port)).await;
    let channel = LbChannel::builder(format!("ipv4:{}", backend.addr))
        .user_agent("my-service/1.2")
        .expect("a valid user agent")
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
        Some(HealthStatus::Serving),
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
