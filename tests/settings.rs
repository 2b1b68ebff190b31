//! The settings a tonic user knows from `Endpoint`, with tonic's meaning:
//! `timeout`, `concurrency_limit` and `rate_limit` (both per endpoint),
//! `user_agent`, and `http://` targets. Real tonic servers on loopback.

use healthlb_testkit as support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::join_all;
use healthlb::{LbChannel, SlowStart};
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoRequest, StreamRequest};
use support::echo::{Backend, free_port, loopback};
use support::proxy::Proxy;
use support::{connect_serving, within};

async fn unary(channel: &LbChannel) -> Result<String, tonic::Status> {
    let reply = EchoClient::new(channel.clone())
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await?;
    Ok(reply.into_inner().backend)
}

#[tokio::test]
async fn timeout_is_the_deadline_of_calls_that_carry_none_and_reaches_the_server() {
    let backend = Backend::start("t", loopback(190, free_port())).await;
    let proxy = Proxy::start(loopback(190, 0), backend.addr).await;
    let channel = connect_serving(
        LbChannel::builder(format!("ipv4:{}", proxy.addr)).timeout(Duration::from_millis(300)),
        1,
    )
    .await;
    unary(&channel).await.expect("a call");
    let sent = backend.counters.timeouts_seen()[0].expect("the server learns it");
    // The time left when the call went out: a little under 300 ms.
    assert!(
        sent <= Duration::from_millis(300) && sent > Duration::from_millis(250),
        "{sent:?}"
    );

    // A call of its own with a longer deadline: the shorter one applies.
    proxy.go_silent(true);
    let started = Instant::now();
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(10));
    let status = within(
        Duration::from_secs(5),
        "a call to a silent backend",
        EchoClient::new(channel.clone()).unary(request),
    )
    .await
    .expect_err("no answer comes");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(status.message().contains("300ms"), "{status:?}");
}

#[tokio::test]
async fn concurrency_limit_holds_per_endpoint() {
    let port = free_port();
    let backends = [
        Backend::start("c1", loopback(191, port)).await,
        Backend::start("c2", loopback(192, port)).await,
    ];
    let target = format!("ipv4:{},{}", backends[0].addr, backends[1].addr);
    let channel = connect_serving(LbChannel::builder(target).concurrency_limit(2), 2).await;
    // 8 streams of 300 ms over 2 endpoints, 2 at a time on each.
    let calls = (0..8).map(|_| {
        let mut client = EchoClient::new(channel.clone());
        async move {
            let request = StreamRequest {
                message: "s".into(),
                count: 2,
                interval_ms: 300,
            };
            let mut replies = client.server_stream(request).await?.into_inner();
            while replies.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
    });
    let started = Instant::now();
    let results = within(Duration::from_secs(20), "the streams", join_all(calls)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for backend in &backends {
        assert_eq!(
            backend.counters.max_open_streams.load(Ordering::SeqCst),
            2,
            "{} held at 2",
            backend.name
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "two rounds of calls"
    );
}

#[tokio::test]
async fn rate_limit_spreads_calls_over_windows() {
    let backend = Backend::start("r", loopback(193, free_port())).await;
    let channel = connect_serving(
        LbChannel::builder(format!("ipv4:{}", backend.addr))
            .rate_limit(5, Duration::from_millis(400))
            .ready_timeout(Duration::from_secs(10)),
        1,
    )
    .await;
    // 15 calls at 5 per window need three windows: at least two window
    // turns, so at least one whole window of 400 ms.
    let started = Instant::now();
    let results = within(
        Duration::from_secs(20),
        "rate-limited calls",
        join_all((0..15).map(|_| unary(&channel))),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.counters.unary.load(Ordering::SeqCst), 15);
}

#[tokio::test]
async fn the_user_agent_and_an_http_target_work_as_with_tonic() {
    let backend = Backend::start("u", loopback(194, free_port())).await;
    let channel = LbChannel::builder(format!("http://{}", backend.addr))
        .user_agent("my-service/1.2")
        .expect("a valid user agent")
        .connect()
        .await
        .expect("serving");
    assert_eq!(unary(&channel).await.unwrap(), "u");
    let agent = backend
        .counters
        .last_headers
        .lock()
        .unwrap()
        .get("user-agent")
        .cloned()
        .unwrap_or_default();
    assert!(agent.starts_with("my-service/1.2 healthlb/"), "{agent}");

    let err = LbChannel::builder("http://x:1")
        .user_agent("bad\nagent")
        .unwrap_err();
    assert_eq!(err.kind(), healthlb::ErrorKind::InvalidConfig);
}

#[tokio::test]
async fn a_slow_start_window_of_any_length_leaves_the_channel_working() {
    let port = free_port();
    let backends = support::echo::backends(194, 2, port).await;
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    // Duration::MAX overflowed an instant in the balancer, which panicked:
    // every call then waited out the ready timeout.
    let channel = connect_serving(
        LbChannel::builder(format!("ipv4:{}", list.join(",")))
            .slow_start(SlowStart::new(Duration::MAX))
            .ready_timeout(Duration::from_secs(2)),
        2,
    )
    .await;
    for _ in 0..20 {
        let call = unary(&channel);
        within(Duration::from_secs(5), "a call", call)
            .await
            .expect("the channel works");
    }
    assert!(
        channel.endpoints().iter().all(|e| e.in_rotation),
        "{:?}",
        channel.endpoints()
    );
}

/// The builder's error for `builder`, which must fail.
fn refused(builder: healthlb::Builder) -> String {
    let err = builder.build().expect_err("refused");
    assert_eq!(err.kind(), healthlb::ErrorKind::InvalidConfig, "{err}");
    err.to_string()
}

#[tokio::test]
async fn the_builder_and_the_service_config_judge_settings_alike() {
    use healthlb::{OutlierDetection, Policy, ServiceConfig};
    let builder = || LbChannel::builder("ipv4:127.0.0.1:1");

    // least_request's choice count: 2 to 10 from the builder; a service
    // config's choiceCount above 10 is taken as 10 (gRFC A48), and says so.
    let err = refused(builder().policy(Policy::least_request(1000)));
    assert!(err.contains("2 to 10") && err.contains("1000"), "{err}");
    let config = ServiceConfig::parse(
        r#"{"loadBalancingConfig": [{"least_request_experimental": {"choiceCount": 1000}}]}"#,
    )
    .unwrap();
    assert_eq!(config.policy, Some(Policy::least_request(10)));
    assert!(
        config.warnings.iter().any(|w| w.contains("taken as 10")),
        "{:?}",
        config.warnings
    );

    // A longest ejection shorter than the base one, from either.
    let short = OutlierDetection::default()
        .base_ejection_time(Duration::from_secs(30))
        .max_ejection_time(Duration::from_secs(10));
    let err = refused(builder().outlier_detection(short));
    assert!(
        err.contains("maxEjectionTime (10s) is shorter than baseEjectionTime (30s)"),
        "{err}"
    );
    let json = r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
        "baseEjectionTime": "30s", "maxEjectionTime": "10s",
        "childPolicy": [{"round_robin": {}}]}}]}"#;
    let err = refused(builder().default_service_config(json).unwrap());
    assert!(
        err.contains("maxEjectionTime (10s) is shorter than baseEjectionTime (30s)"),
        "{err}"
    );
    // Without a maxEjectionTime, A50's is 300 s or the base, if longer.
    let json = r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
        "baseEjectionTime": "600s", "childPolicy": [{"round_robin": {}}]}}]}"#;
    let config = ServiceConfig::parse(json).unwrap();
    let od = config.outlier_detection.expect("outlier detection");
    assert_eq!(od.max_ejection_time, Duration::from_secs(600));

    // A retry buffer that keeps nothing.
    let err = refused(builder().subchannels(|s| s.retry_buffer_size(0, 0)));
    assert!(err.contains("retry_buffer_size"), "{err}");
    let err = refused(builder().subchannels(|s| s.retry_buffer_size(1024, 512)));
    assert!(err.contains("1024 per call of 512"), "{err}");

    // maxAttempts: the error says what applies.
    let attempts = |n: u32| {
        format!(
            r#"{{"methodConfig": [{{"name": [{{}}], "retryPolicy": {{"maxAttempts": {n},
            "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}}}]}}"#
        )
    };
    let err = ServiceConfig::parse(&attempts(1)).unwrap_err().to_string();
    assert!(
        err.contains("at least 2") && err.contains("above 5 is taken as 5"),
        "{err}"
    );
    let config = ServiceConfig::parse(&attempts(1000)).unwrap();
    let retry = config.method_config[0].retry_policy.as_ref().unwrap();
    assert_eq!(retry.max_attempts, 5);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("1000 is taken as 5"))
    );
}

#[test]
fn typos_and_deprecated_fields_are_named_not_silently_dropped() {
    use healthlb::ServiceConfig;
    let config = ServiceConfig::parse(
        r#"{"loadBalancingPolicy": "round_robin",
            "methodConfigs": [],
            "methodConfig": [{"name": [{"service": "echo.Echo"}],
              "retrypolicy": {"maxAttempts": 3}}]}"#,
    )
    .unwrap();
    let warnings = config.warnings.join("\n");
    assert!(
        warnings.contains("methodConfigs is not a field"),
        "{warnings}"
    );
    assert!(
        warnings.contains("methodConfig[0].retrypolicy is not a field"),
        "{warnings}"
    );
    assert!(
        warnings.contains("loadBalancingPolicy is deprecated"),
        "{warnings}"
    );
    assert_eq!(config.warnings.len(), 3, "{warnings}");
    assert!(config.method_config[0].retry_policy.is_none());

    // A config without a typo has nothing to say.
    let clean = ServiceConfig::parse(
        r#"{"loadBalancingConfig": [{"random_subsetting_experimental": {"subsetSize": 3,
             "childPolicy": [{"round_robin": {}}]}}]}"#,
    )
    .unwrap();
    assert!(clean.warnings.is_empty(), "{:?}", clean.warnings);
    assert_eq!(clean.subset_size, Some(3), "grpc-go's name for A68");
}

#[test]
fn an_ipv6_address_under_ipv4_names_the_scheme_to_use() {
    let err = "ipv4:[::1]:50071".parse::<healthlb::Target>().unwrap_err();
    let message = err.to_string();
    assert!(message.contains("ipv6:[::1]:50051"), "{message}");
}

#[tokio::test]
async fn a_zero_duration_is_refused_at_build_whatever_the_setting() {
    // One rule: a duration must be above zero; a setting that can be off
    // takes `None` instead.
    let zero = Duration::ZERO;
    let target = "ipv4:127.0.0.1:1";
    let cases: Vec<(healthlb::Builder, &str)> = vec![
        (
            LbChannel::builder(target).ready_timeout(zero),
            "ready_timeout",
        ),
        (LbChannel::builder(target).timeout(zero), "timeout"),
        (
            LbChannel::builder(target).connect_deadline(zero),
            "connect_deadline",
        ),
        (
            LbChannel::builder(target).connect_timeout(zero),
            "connect_timeout",
        ),
        (
            LbChannel::builder(target).keep_alive_timeout(zero),
            "keep_alive_timeout",
        ),
        (
            LbChannel::builder(target).tcp_keepalive(Some(zero)),
            "tcp_keepalive",
        ),
        (
            LbChannel::builder(target).subchannels(|s| s.max_connection_age_grace(zero)),
            "max_connection_age_grace",
        ),
        (
            LbChannel::builder(target).subchannels(|s| s.max_connection_age(zero)),
            "max_connection_age",
        ),
        (
            LbChannel::builder(target).subchannels(|s| s.liveness_timeout(zero)),
            "liveness_timeout",
        ),
        (
            LbChannel::builder(target).subchannels(|s| s.extra_connection_idle_timeout(zero)),
            "extra_connection_idle_timeout",
        ),
        (
            LbChannel::builder(target).resolution(|r| r.min_refresh(zero)),
            "min_refresh",
        ),
        (
            LbChannel::builder(target).resolution(|r| r.dns_timeout(zero)),
            "dns_timeout",
        ),
    ];
    for (builder, name) in cases {
        let message = refused(builder);
        assert!(
            message.contains(&format!("{name} must be above zero")),
            "{name}: {message}"
        );
    }
}
