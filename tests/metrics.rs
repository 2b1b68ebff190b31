//! The Prometheus metrics, recorded in-process and checked against the calls
//! made: requests by status, live stream messages, endpoint states, health
//! transitions, resolutions, connections, the policy and outlier ejections.
//!
//! A test binary of its own, since a metrics recorder is global to the
//! process. It needs nothing built beside it, so it passes under
//! `cargo test`, `cargo test --all-targets`, `cargo test --test metrics` and
//! nextest alike.

use healthlb_testkit as support;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use healthlb::LbChannel;
use metrics_exporter_prometheus::PrometheusBuilder;
use support::dns::TestDns;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoRequest, StreamRequest};
use support::echo::{Backend, free_port, loopback};
use support::within;

/// The sum of a metric's samples whose labels contain every `filter`.
fn sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test]
async fn calls_streams_and_ejections_are_counted() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder in this binary");

    let port = free_port();
    let mut backends = Vec::new();
    for n in 180..184 {
        backends.push(Backend::start(&format!("pod-{n}"), loopback(n, port)).await);
    }
    let dns = TestDns::start().await;
    let ips: Vec<Ipv4Addr> = (180..184).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect();
    dns.zone().set_a("echo.metrics.local", &ips, 1);
    let channel = support::connect_serving(
        LbChannel::builder(dns.target("echo.metrics.local", port)),
        4,
    )
    .await;
    let mut client = EchoClient::new(channel.clone());
    let calls = 37;
    for _ in 0..calls {
        client
            .unary(EchoRequest {
                message: "m".into(),
            })
            .await
            .expect("a unary call");
    }
    // A stream left open after 5 messages: its messages count as they pass.
    let request = StreamRequest {
        message: "s".into(),
        count: 1000,
        interval_ms: 20,
    };
    let mut stream = client
        .server_stream(request)
        .await
        .expect("the stream opens")
        .into_inner();
    for _ in 0..5 {
        within(Duration::from_secs(5), "a stream message", stream.message())
            .await
            .expect("a message")
            .expect("not the end");
    }
    let text = handle.render();

    // Every series has its description, as build() registered them.
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("healthlb_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| n.trim_end_matches("_sum").trim_end_matches("_count"))
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no description: {text}"
        );
    }

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
    let series = text
        .lines()
        .filter(|l| l.starts_with("healthlb_requests_total{"))
        .count();
    assert_eq!(series, 4, "one series per endpoint: {text}");
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
    assert_eq!(
        sum(
            &text,
            "healthlb_policy",
            &["policy=\"round_robin\"", "outlier_detection=\"on\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(sum(&text, "healthlb_ejected_endpoints", &[]), 0.0);
    drop(stream);

    // A pod that says SERVING but fails: five failures in a row eject it.
    let bad = &backends[0];
    bad.counters
        .fail_with
        .store(tonic::Code::Unavailable as i32, Ordering::SeqCst);
    let mut failed = 0;
    for _ in 0..40 {
        let call = client.unary(EchoRequest {
            message: "f".into(),
        });
        if within(Duration::from_secs(5), "a unary call", call)
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert_eq!(failed, 5, "only the calls that ejected it fail");
    let text = handle.render();
    let endpoint = format!("endpoint=\"{}\"", bad.addr);
    assert_eq!(
        sum(
            &text,
            "healthlb_ejections_total",
            &[&endpoint, "reason=\"consecutive_failures\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(sum(&text, "healthlb_ejections_total", &[]), 1.0);
    assert_eq!(sum(&text, "healthlb_ejected_endpoints", &[]), 1.0);
    assert_eq!(sum(&text, "healthlb_panic_mode", &[]), 0.0);
    assert_eq!(
        sum(
            &text,
            "healthlb_requests_total",
            &[&endpoint, "code=\"UNAVAILABLE\""]
        ),
        5.0,
        "{text}"
    );

    // weighted_round_robin: A78's counters, through the facade. pod-184
    // reports a cost per call until it stops; pod-185 never does.
    let mut orca = Vec::new();
    for n in [184, 185] {
        let options = support::echo::Options {
            orca: Some(support::echo::OrcaOptions::default()),
            ..Default::default()
        };
        orca.push(Backend::start_with(&format!("pod-{n}"), loopback(n, port), options).await);
    }
    orca[0].counters.cost_milli.store(1000, Ordering::SeqCst);
    let wrr = healthlb::WeightedRoundRobin::default()
        .blackout_period(Duration::ZERO)
        .weight_update_period(Duration::from_millis(100))
        .weight_expiration_period(Duration::from_millis(400));
    let target = format!("ipv4:{},{}", orca[0].addr, orca[1].addr);
    let weighted = support::connect_serving(
        LbChannel::builder(target.clone()).policy(healthlb::Policy::WeightedRoundRobin(wrr)),
        2,
    )
    .await;
    let first = |state: healthlb::WeightState| {
        weighted.endpoints()[0]
            .server_weight
            .is_some_and(|w| w.state == state)
    };
    let mut client = EchoClient::new(weighted.clone());
    for _ in 0..200 {
        if first(healthlb::WeightState::Usable) {
            break;
        }
        client
            .unary(EchoRequest {
                message: "w".into(),
            })
            .await
            .expect("ok");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        first(healthlb::WeightState::Usable),
        "{}",
        weighted.endpoints()[0]
    );
    orca[0].counters.cost_milli.store(0, Ordering::SeqCst);
    let stale = support::wait_for(Duration::from_secs(5), || {
        first(healthlb::WeightState::Stale)
    })
    .await;
    assert!(stale.is_some(), "{}", weighted.endpoints()[0]);
    let text = handle.render();
    let target = format!("target=\"{target}\"");
    for name in [
        "healthlb_wrr_rr_fallback_total",
        "healthlb_wrr_endpoint_weight_not_yet_usable_total",
        "healthlb_wrr_endpoint_weight_stale_total",
    ] {
        assert!(sum(&text, name, &[&target]) >= 1.0, "{name}: {text}");
    }
}
