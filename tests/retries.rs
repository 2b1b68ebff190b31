//! Retries, hedging, deadlines and wait-for-ready from the service config
//! (gRFC A6), against real tonic servers on loopback.

use healthlb_testkit as support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use healthlb::LbChannel;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoRequest, StreamRequest};
use support::echo::{Backend, free_port, loopback};
use support::{wait_for, within};
use tonic::Code;

async fn backends(first: u8, n: u8) -> Vec<Backend> {
    support::echo::backends(first, n, free_port()).await
}

/// A channel over `backends` with `config`, outlier ejection off so that
/// only the retry policy acts, every endpoint SERVING.
async fn channel(backends: &[Backend], config: &str) -> LbChannel {
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let builder = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .outlier_detection(None)
        .default_service_config(config)
        .expect("a valid service config");
    support::connect_serving(builder, backends.len()).await
}

fn retry_config(max_attempts: u32, codes: &str, extra: &str) -> String {
    format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "echo.Echo"}}],
            "retryPolicy": {{"maxAttempts": {max_attempts}, "initialBackoff": "0.01s",
              "maxBackoff": "0.05s", "backoffMultiplier": 2,
              "retryableStatusCodes": [{codes}]}}}}]{extra}}}"#
    )
}

async fn unary(client: &mut EchoClient<LbChannel>) -> Result<String, tonic::Status> {
    let call = client.unary(EchoRequest {
        message: "r".into(),
    });
    within(Duration::from_secs(10), "a unary call", call)
        .await
        .map(|r| r.into_inner().backend)
}

/// A server stream of `count` replies, 1 ms apart, once its headers arrive.
async fn open_stream(
    channel: LbChannel,
    count: u32,
) -> Result<tonic::Streaming<support::echo::pb::EchoReply>, tonic::Status> {
    let request = StreamRequest {
        message: "s".into(),
        count,
        interval_ms: 1,
    };
    let mut client = EchoClient::new(channel);
    within(
        Duration::from_secs(5),
        "the stream",
        client.server_stream(request),
    )
    .await
    .map(tonic::Response::into_inner)
}

fn unary_calls(backends: &[Backend]) -> u64 {
    backends
        .iter()
        .map(|b| b.counters.unary.load(Ordering::SeqCst))
        .sum()
}

#[tokio::test]
async fn a_pod_failing_its_first_calls_is_retried_on_another() {
    let backends = backends(70, 2).await;
    let channel = channel(&backends, &retry_config(3, r#""UNAVAILABLE""#, "")).await;
    backends[0].counters.fail_next.store(3, Ordering::SeqCst);
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..20 {
        unary(&mut client).await.expect("every call succeeds");
    }
    // Three failed attempts, each retried once, on the other pod.
    assert_eq!(unary_calls(&backends), 23, "attempts: 20 calls + 3 retries");
    assert_eq!(backends[0].counters.retried.load(Ordering::SeqCst), 0);
    assert_eq!(backends[1].counters.retried.load(Ordering::SeqCst), 3);
    // The endpoint counters see each attempt.
    let started: u64 = channel.endpoints().iter().map(|e| e.calls_started).sum();
    assert_eq!(started, 23, "{:?}", channel.endpoints());
}

#[tokio::test]
async fn codes_not_listed_are_not_retried() {
    let backends = backends(72, 2).await;
    let channel = channel(&backends, &retry_config(5, r#""UNAVAILABLE""#, "")).await;
    backends[0]
        .counters
        .fail_with
        .store(Code::NotFound as i32, Ordering::SeqCst);
    let mut client = EchoClient::new(channel);
    let mut not_found = 0;
    for _ in 0..20 {
        match unary(&mut client).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => not_found += 1,
            Err(status) => panic!("{status:?}"),
        }
    }
    assert_eq!(not_found, backends[0].counters.unary.load(Ordering::SeqCst));
    assert!(not_found > 0);
    assert_eq!(unary_calls(&backends), 20, "one attempt per call");
}

#[tokio::test]
async fn a_committed_call_is_not_sent_again_when_it_fails_later() {
    let backends = backends(74, 2).await;
    let channel = channel(&backends, &retry_config(5, r#""UNAVAILABLE""#, "")).await;
    for b in &backends {
        b.counters.stream_fail_after.store(2, Ordering::SeqCst);
    }
    let mut stream = open_stream(channel, 5)
        .await
        .expect("its headers arrive: committed");
    let mut replies = 0;
    let end = loop {
        match within(Duration::from_secs(5), "a message", stream.message()).await {
            Ok(Some(_)) => replies += 1,
            other => break other,
        }
    };
    assert_eq!(replies, 2);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    let streams: u64 = backends
        .iter()
        .map(|b| b.counters.streams.load(Ordering::SeqCst))
        .sum();
    assert_eq!(streams, 1, "never sent again");
}

#[tokio::test]
async fn a_streaming_call_is_retried_before_it_commits() {
    let backends = backends(76, 1).await;
    let channel = channel(&backends, &retry_config(3, r#""UNAVAILABLE""#, "")).await;
    backends[0].counters.fail_next.store(2, Ordering::SeqCst);
    let mut stream = open_stream(channel, 3)
        .await
        .expect("the third attempt answers");
    let mut seqs = Vec::new();
    while let Some(reply) = within(Duration::from_secs(5), "a message", stream.message())
        .await
        .expect("no error")
    {
        seqs.push(reply.seq);
    }
    assert_eq!(seqs, [0, 1, 2]);
    assert_eq!(backends[0].counters.streams.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn pushback_delays_a_retry_or_stops_it() {
    let backends = backends(78, 1).await;
    let channel = channel(&backends, &retry_config(3, r#""UNAVAILABLE""#, "")).await;
    let counters = &backends[0].counters;
    let mut client = EchoClient::new(channel);

    *counters.pushback_ms.lock().unwrap() = Some("300".into());
    counters.fail_next.store(1, Ordering::SeqCst);
    let started = Instant::now();
    unary(&mut client).await.expect("the retry succeeds");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the server's 300 ms were obeyed, not the 10 ms backoff: {:?}",
        started.elapsed()
    );
    assert_eq!(counters.unary.load(Ordering::SeqCst), 2);

    *counters.pushback_ms.lock().unwrap() = Some("-1".into());
    counters.fail_next.store(1, Ordering::SeqCst);
    let status = unary(&mut client)
        .await
        .expect_err("a negative pushback stops retries");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(counters.unary.load(Ordering::SeqCst), 3, "no retry");
}

#[tokio::test]
async fn throttling_bounds_attempts_in_a_full_outage() {
    let backends = backends(80, 2).await;
    let throttling = r#", "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}"#;
    let channel = channel(&backends, &retry_config(5, r#""UNAVAILABLE""#, throttling)).await;
    for b in &backends {
        b.counters
            .fail_with
            .store(Code::Unavailable as i32, Ordering::SeqCst);
    }
    let mut client = EchoClient::new(channel);
    for _ in 0..100 {
        let status = unary(&mut client).await.expect_err("a full outage");
        assert_eq!(status.code(), Code::Unavailable);
    }
    // 10 tokens: the first call may retry until 5 are left (5 attempts),
    // then every call gets one attempt. Without the bucket: 500.
    let attempts = unary_calls(&backends);
    assert_eq!(attempts, 104, "attempts stay bounded by the bucket");
}

#[tokio::test]
async fn every_method_that_ends_ok_refills_the_token_bucket() {
    // gRFC A6: "every successful RPC (regardless of service or method
    // invoked)" refunds tokenRatio. Only Unary has a retry policy here.
    let backends = backends(79, 1).await;
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo", "method": "Unary"}],
        "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.01s",
          "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}],
        "retryThrottling": {"maxTokens": 4, "tokenRatio": 1}}"#;
    let channel = channel(&backends, config).await;
    let counters = &backends[0].counters;
    let mut client = EchoClient::new(channel.clone());
    // Two failed attempts: 4 → 2 tokens, at half, so no more retries.
    counters.fail_next.store(2, Ordering::SeqCst);
    let status = unary(&mut client).await.expect_err("both attempts fail");
    assert_eq!(status.code(), Code::Unavailable);
    // Two streams of a method without a policy end OK: 2 → 4 tokens.
    for _ in 0..2 {
        let mut replies = open_stream(channel.clone(), 1).await.expect("a stream");
        while let Some(reply) = within(Duration::from_secs(5), "a reply", replies.message())
            .await
            .expect("no error")
        {
            assert_eq!(reply.backend, "b79");
        }
    }
    // So a failed attempt may be retried again.
    counters.fail_next.store(1, Ordering::SeqCst);
    let answered = unary(&mut client).await;
    assert_eq!(
        answered.as_deref().map_err(|s| s.code()),
        Ok("b79"),
        "the retry was not throttled"
    );
    assert_eq!(counters.unary.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_stop_pushback_costs_a_token_whatever_the_code() {
    // gRFC A6 (and grpc-go): a "don't retry" pushback counts as a failure
    // for throttling, even on a code the policy would not retry.
    let backends = backends(78, 1).await;
    let throttling = r#", "retryThrottling": {"maxTokens": 4, "tokenRatio": 0.1}"#;
    let channel = channel(&backends, &retry_config(3, r#""UNAVAILABLE""#, throttling)).await;
    let counters = &backends[0].counters;
    let mut client = EchoClient::new(channel);
    *counters.pushback_ms.lock().unwrap() = Some("-1".into());
    counters
        .fail_with
        .store(Code::Aborted as i32, Ordering::SeqCst);
    // Two of them: 4 → 2 tokens, at half.
    for _ in 0..2 {
        let status = unary(&mut client).await.expect_err("aborted");
        assert_eq!(status.code(), Code::Aborted);
    }
    *counters.pushback_ms.lock().unwrap() = None;
    counters.fail_with.store(0, Ordering::SeqCst);
    // So a retryable failure is no longer retried.
    counters.fail_next.store(1, Ordering::SeqCst);
    let status = unary(&mut client).await.expect_err("throttled");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(counters.unary.load(Ordering::SeqCst), 3, "no retry");
}

#[tokio::test]
async fn a_hedged_call_beats_a_slow_pod_and_cancels_the_loser() {
    let backends = backends(82, 3).await;
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo", "method": "Unary"}],
        "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s",
          "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;
    let channel = channel(&backends, config).await;
    let slow = &backends[0].counters;
    slow.delay_us.store(3_000_000, Ordering::SeqCst);
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..12 {
        let started = Instant::now();
        let backend = unary(&mut client).await.expect("the hedge answers");
        assert_ne!(backend, "b82");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "a hedge answered, not the 3 s pod: {:?}",
            started.elapsed()
        );
    }
    let hedged = slow.unary.load(Ordering::SeqCst);
    assert!(hedged >= 1, "the slow pod got calls, and they were hedged");
    // Each losing attempt is cancelled on its server.
    let cancelled = wait_for(Duration::from_secs(5), || {
        slow.cancelled.load(Ordering::SeqCst) == hedged
    })
    .await;
    assert!(
        cancelled.is_some(),
        "{} of {hedged} cancelled",
        slow.cancelled.load(Ordering::SeqCst)
    );
    // The endpoint's counters see every attempt, the cancelled ones too.
    let status = channel
        .endpoints()
        .into_iter()
        .find(|e| e.addr == backends[0].addr)
        .expect("the slow pod's status");
    assert_eq!(status.calls_started, hedged, "every attempt counted");
    assert_eq!(status.calls_cancelled, hedged, "as cancelled: {status}");
    assert_eq!(status.calls_in_flight, 0);
}

#[tokio::test]
async fn a_call_past_its_buffer_commits_instead_of_retrying() {
    let backends = backends(85, 2).await;
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let builder = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .outlier_detection(None)
        .subchannels(|s| s.retry_buffer_size(1024, 1 << 20))
        .default_service_config(&retry_config(3, r#""UNAVAILABLE""#, ""))
        .unwrap();
    let channel = support::connect_serving(builder, 2).await;
    let mut client = EchoClient::new(channel);
    for b in &backends {
        b.counters.fail_next.store(1, Ordering::SeqCst);
    }
    // 4 KiB: over the 1 KiB per call, so its first failure is final.
    let big = client.unary(EchoRequest {
        message: "x".repeat(4096),
    });
    let status = within(Duration::from_secs(5), "a big call", big)
        .await
        .expect_err("not retried");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(unary_calls(&backends), 1);
    // A small one fits, and is retried on the other pod.
    unary(&mut client).await.expect("retried");
    assert_eq!(unary_calls(&backends), 3);
}

#[tokio::test]
async fn the_method_timeout_and_wait_for_ready_apply() {
    let backends = backends(87, 1).await;
    let config = r#"{"methodConfig": [
        {"name": [{"service": "echo.Echo", "method": "Unary"}], "timeout": "0.2s"},
        {"name": [{"service": "echo.Echo", "method": "ServerStream"}], "waitForReady": false}]}"#;
    let list = backends[0].addr.to_string();
    let builder = LbChannel::builder(format!("ipv4:{list}"))
        .ready_timeout(Duration::from_secs(5))
        .default_service_config(config)
        .unwrap();
    let channel = support::connect_serving(builder, 1).await;
    let mut client = EchoClient::new(channel.clone());

    backends[0]
        .counters
        .delay_us
        .store(2_000_000, Ordering::SeqCst);
    let started = Instant::now();
    let status = unary(&mut client).await.expect_err("past its 0.2 s");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_millis(1500));
    let sent = backends[0].counters.last_headers.lock().unwrap()["grpc-timeout"].clone();
    assert!(
        sent.ends_with('m') || sent.ends_with('u'),
        "the server is told: {sent}"
    );

    // waitForReady false: with nothing SERVING, fail at once rather than
    // wait the 5 s ready timeout.
    backends[0].set_serving(false).await;
    let none = wait_for(Duration::from_secs(5), || {
        !channel.endpoints()[0].state.is_serving()
    })
    .await;
    assert!(none.is_some());
    let started = Instant::now();
    let request = StreamRequest {
        message: "s".into(),
        count: 1,
        interval_ms: 1,
    };
    let status = within(
        Duration::from_secs(10),
        "a stream",
        client.server_stream(request),
    )
    .await
    .expect_err("nothing SERVING");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("fail_fast"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn the_service_config_from_a_dns_txt_record() {
    use std::net::Ipv4Addr;
    use support::dns::TestDns;

    support::init_tracing();
    let backends = backends(89, 2).await;
    let dns = TestDns::start().await;
    let zone = dns.zone();
    let ips: Vec<Ipv4Addr> = (89..91).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect();
    zone.set_a("echo.txt.local", &ips, 1);
    let retry = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.01s",
          "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;
    // A choice for Go clients, one for no one, then one for every client;
    // the text split into strings of at most 255 bytes, as DNS requires.
    let choices = format!(
        r#"grpc_config=[{{"clientLanguage": ["go"], "serviceConfig": {{}}}},
        {{"percentage": 0, "serviceConfig": {{}}}},
        {{"clientLanguage": ["Rust", "java"], "serviceConfig": {retry}}}]"#
    );
    let parts: Vec<&str> = choices
        .as_bytes()
        .chunks(200)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    assert!(parts.len() > 1);
    zone.set_txt(
        "_grpc_config.echo.txt.local",
        &[&["v=spf1 -all"], &parts],
        1,
    );

    let builder = LbChannel::builder(dns.target("echo.txt.local", backends[0].addr.port()))
        .outlier_detection(None)
        .resolution(|r| r.service_config_from_dns(true));
    let channel = support::connect_serving(builder, 2).await;
    let has_retries = || {
        channel
            .service_config()
            .and_then(|c| c.method("echo.Echo", "Unary").cloned())
            .is_some_and(|m| m.retry_policy.is_some())
    };
    assert!(
        wait_for(Duration::from_secs(5), has_retries)
            .await
            .is_some(),
        "the rust choice applies: {:?}",
        channel.service_config()
    );
    let mut client = EchoClient::new(channel.clone());
    backends[0].counters.fail_next.store(1, Ordering::SeqCst);
    backends[1].counters.fail_next.store(1, Ordering::SeqCst);
    unary(&mut client)
        .await
        .expect("the third attempt succeeds");
    assert_eq!(unary_calls(&backends), 3);

    // A bad record keeps the last good config.
    zone.set_txt(
        "_grpc_config.echo.txt.local",
        &[&["grpc_config=[{not json"]],
        1,
    );
    let before = zone.queries(
        "_grpc_config.echo.txt.local",
        support::hickory_server::proto::rr::RecordType::TXT,
    );
    let asked = wait_for(Duration::from_secs(10), || {
        zone.queries(
            "_grpc_config.echo.txt.local",
            support::hickory_server::proto::rr::RecordType::TXT,
        ) >= before + 2
    })
    .await;
    assert!(asked.is_some(), "the record is looked up at each refresh");
    assert!(has_retries(), "kept: {:?}", channel.service_config());

    // Its removal leaves no config from DNS, and no default: none at all.
    zone.set_txt("_grpc_config.echo.txt.local", &[], 1);
    let gone = wait_for(Duration::from_secs(10), || {
        channel.service_config().is_none()
    })
    .await;
    assert!(gone.is_some());
}

/// A raw HTTP/2 server that, like a busy one, takes new streams from its
/// accept queue only every 5 ms, and never answers a call (a liveness probe
/// gets UNIMPLEMENTED). It records the connection error h2 ends with: a
/// GOAWAY ENHANCE_YOUR_CALM when more than 20 streams were cancelled
/// before it took them (hyper's and tonic's rapid-reset guard).
async fn lagging_server(addr: std::net::SocketAddr) -> Arc<Mutex<Vec<String>>> {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let errors = Arc::new(Mutex::new(Vec::new()));
    let recorded = errors.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let errors = recorded.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut held = Vec::new();
                for _ in 0..12_000 {
                    let lag = tokio::time::sleep(Duration::from_millis(5));
                    tokio::select! {
                        closed = std::future::poll_fn(|cx| conn.poll_closed(cx)) => {
                            if let Err(e) = closed {
                                errors.lock().unwrap().push(e.to_string());
                            }
                            return;
                        }
                        () = lag => {}
                    }
                    while let Some(accepted) = futures::FutureExt::now_or_never(conn.accept()) {
                        match accepted {
                            Some(Ok((request, mut respond))) => {
                                if request.uri().path().starts_with("/grpc.health") {
                                    let response = http::Response::builder()
                                        .header("content-type", "application/grpc")
                                        .header("grpc-status", "12")
                                        .body(())
                                        .expect("a response");
                                    let _ = respond.send_response(response, true);
                                } else {
                                    held.push(respond);
                                }
                            }
                            Some(Err(e)) => {
                                errors.lock().unwrap().push(e.to_string());
                                return;
                            }
                            None => return,
                        }
                    }
                }
            });
        }
    });
    errors
}

#[tokio::test]
async fn hedges_that_lose_are_not_cancelled_before_a_busy_server_takes_them() {
    let fast = Backend::start("b88", loopback(88, free_port())).await;
    let lagging_addr = loopback(89, free_port());
    let errors = lagging_server(lagging_addr).await;
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0s"}}]}"#;
    let builder = LbChannel::builder(format!("ipv4:{},{lagging_addr}", fast.addr))
        .subchannels(|s| s.health_check(false))
        .outlier_detection(None)
        .default_service_config(config)
        .expect("a valid service config");
    let channel = support::connect_serving(builder, 2).await;
    // Every call goes to both at once; the tonic server wins, and the
    // lagging one holds 40 losers at a time.
    for _ in 0..5 {
        let calls = (0..40).map(|_| {
            let mut client = EchoClient::new(channel.clone());
            async move { unary(&mut client).await }
        });
        for result in futures::future::join_all(calls).await {
            assert_eq!(result.expect("the fast pod answers"), "b88");
        }
    }
    // The losers' cancels have gone out.
    tokio::time::sleep(LINGER_AND_SOME).await;
    assert_eq!(
        *errors.lock().unwrap(),
        Vec::<String>::new(),
        "the busy server saw streams cancelled before it took them"
    );
    let lagging = channel
        .endpoints()
        .into_iter()
        .find(|e| e.addr == lagging_addr)
        .expect("the lagging endpoint");
    assert_eq!(lagging.connects, 1, "{:?}", lagging.last_error);
    assert!(lagging.calls_started >= 200, "every call sent it a hedge");
}

/// Longer than a hedge keeps a lost stream (20 ms).
const LINGER_AND_SOME: Duration = Duration::from_millis(200);

/// A request stream fed by the test: its sender, and the stream.
fn request_stream() -> (
    tokio::sync::mpsc::Sender<EchoRequest>,
    tokio_stream::wrappers::ReceiverStream<EchoRequest>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
}

const HEDGE_BIDI: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo", "method": "Bidi"}],
    "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.02s",
      "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;

#[tokio::test]
async fn every_hedge_of_a_streaming_call_reads_the_whole_request() {
    use support::echo::BidiMode;
    // One pod fails after reading the whole request, the other counts it
    // and answers a second later, so that the first has failed by then:
    // the call can only answer if both attempts see every message.
    let backends = backends(92, 2).await;
    *backends[0].counters.bidi_mode.lock().unwrap() = BidiMode::FailAtEnd;
    *backends[1].counters.bidi_mode.lock().unwrap() = BidiMode::CountAtEnd(1000);
    let channel = channel(&backends, HEDGE_BIDI).await;
    for round in 0..3 {
        let (tx, requests) = request_stream();
        let mut client = EchoClient::new(channel.clone());
        let call = tokio::spawn(async move { client.bidi(requests).await });
        // Both attempts are out, and wait on the caller's next message.
        tokio::time::sleep(Duration::from_millis(60)).await;
        for i in 0..5 {
            let message = format!("m{i}");
            tx.send(EchoRequest { message }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(tx);
        let mut replies = within(Duration::from_secs(5), "the hedged call", call)
            .await
            .unwrap()
            .expect("the counting pod answers")
            .into_inner();
        let reply = within(Duration::from_secs(5), "its reply", replies.message())
            .await
            .expect("a reply")
            .expect("one message");
        assert_eq!(
            (reply.backend.as_str(), reply.seq),
            ("b93", 5),
            "round {round}"
        );
        for b in &backends {
            assert_eq!(
                b.counters.bidi_read_whole.load(Ordering::SeqCst),
                round + 1,
                "{} read the whole request in round {round}",
                b.name
            );
        }
    }
}

#[tokio::test]
async fn once_the_request_outgrows_its_buffer_only_that_attempt_may_answer() {
    use support::echo::{BidiMode, Options};
    let port = free_port();
    // A pod that takes the whole request and counts it.
    let counting = Backend::start("b94", loopback(94, port)).await;
    *counting.counters.bidi_mode.lock().unwrap() = BidiMode::CountAtEnd(0);
    // A pod that lets a client send nothing (a stream window of 0) and
    // answers after 150 ms: its attempt never reads past the first message.
    let options = Options {
        health: false,
        stream_window: Some(0),
        ..Options::default()
    };
    let stuck = Backend::start_with("b95", loopback(95, port), options).await;
    *stuck.counters.bidi_mode.lock().unwrap() = BidiMode::AnswerAfter(150);
    let builder = LbChannel::builder(format!("ipv4:{},{}", counting.addr, stuck.addr))
        .outlier_detection(None)
        .subchannels(|s| s.retry_buffer_size(1000, 1 << 20))
        .default_service_config(HEDGE_BIDI)
        .unwrap();
    let channel = support::connect_serving(builder, 2).await;
    let big = || EchoRequest {
        message: "x".repeat(600),
    };
    let (tx, requests) = request_stream();
    tx.send(big()).await.unwrap();
    let mut client = EchoClient::new(channel.clone());
    let call = tokio::spawn(async move { client.bidi(requests).await });
    // Both attempts are out; the second message outgrows the 1,000-byte
    // buffer, so the call commits to the attempt on the counting pod.
    tokio::time::sleep(Duration::from_millis(60)).await;
    tx.send(big()).await.unwrap();
    // The stuck pod answers meanwhile, but its request was cut off.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(big()).await.unwrap();
    drop(tx);
    let mut replies = within(Duration::from_secs(5), "the call", call)
        .await
        .unwrap()
        .expect("an answer")
        .into_inner();
    let reply = within(Duration::from_secs(5), "its reply", replies.message())
        .await
        .expect("a reply")
        .expect("one message");
    assert_eq!(
        (reply.backend.as_str(), reply.seq),
        ("b94", 3),
        "the committed attempt, which sent the whole request, answers"
    );
    // The client cut the loser's request off: that says nothing of its pod.
    let cut = wait_for(Duration::from_secs(5), || {
        channel
            .endpoints()
            .iter()
            .any(|e| e.addr == stuck.addr && e.calls_cancelled == 1)
    })
    .await;
    assert!(cut.is_some(), "{:?}", channel.endpoints());
    for e in channel.endpoints() {
        assert_eq!(e.calls_transport_failed + e.calls_failed, 0, "{e}");
        assert!(e.last_call_error.is_none(), "{e}");
    }
}

#[tokio::test]
async fn a_hedge_cut_off_by_the_buffer_is_not_charged_to_its_pod() {
    use support::echo::BidiMode;
    // Both pods read every message and answer 300 ms after its end. The
    // second message outgrows the buffer: the call commits to the attempt
    // that read it, and the client resets the other's stream, whose end
    // comes well before the winner's answer.
    let backends = backends(88, 2).await;
    for b in &backends {
        *b.counters.bidi_mode.lock().unwrap() = BidiMode::CountAtEnd(300);
    }
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let builder = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .subchannels(|s| s.retry_buffer_size(1000, 1 << 20))
        .default_service_config(HEDGE_BIDI)
        .unwrap();
    let channel = support::connect_serving(builder, 2).await;
    let big = || EchoRequest {
        message: "x".repeat(600),
    };
    for round in 0..3 {
        let (tx, requests) = request_stream();
        tx.send(big()).await.unwrap();
        let mut client = EchoClient::new(channel.clone());
        let call = tokio::spawn(async move { client.bidi(requests).await });
        // Both attempts are out and have read the first message.
        let both = wait_for(Duration::from_secs(5), || {
            backends
                .iter()
                .map(|b| b.counters.bidi.load(Ordering::SeqCst))
                .sum::<u64>()
                == 2 * (round + 1)
        })
        .await;
        assert!(both.is_some(), "both attempts reached their pods");
        tx.send(big()).await.unwrap();
        tx.send(big()).await.unwrap();
        drop(tx);
        let mut replies = within(Duration::from_secs(5), "the call", call)
            .await
            .unwrap()
            .expect("an answer")
            .into_inner();
        let reply = within(Duration::from_secs(5), "its reply", replies.message())
            .await
            .expect("a reply")
            .expect("one message");
        assert_eq!(
            reply.seq, 3,
            "round {round}: the committed attempt sent all"
        );
        let end = within(Duration::from_secs(5), "its end", replies.message()).await;
        assert!(matches!(end, Ok(None)), "round {round}: {end:?}");
    }
    // Each round cut one attempt off; no pod is charged for it.
    let cut = wait_for(Duration::from_secs(5), || {
        channel
            .endpoints()
            .iter()
            .map(|e| e.calls_cancelled)
            .sum::<u64>()
            == 3
    })
    .await;
    assert!(cut.is_some(), "{:?}", channel.endpoints());
    for e in channel.endpoints() {
        assert_eq!(e.calls_transport_failed + e.calls_failed, 0, "{e}");
        assert!(
            e.last_call_error.is_none() && e.ejected_for.is_none(),
            "{e}"
        );
    }
    let ok: u64 = channel.endpoints().iter().map(|e| e.calls_ok).sum();
    assert_eq!(ok, 3, "the winners ended OK");
}

#[tokio::test]
async fn the_server_is_told_the_deadline_the_client_enforces() {
    let backends = backends(96, 1).await;
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo", "method": "Unary"}],
        "timeout": "1s"}]}"#;
    let channel = channel(&backends, config).await;
    let mut client = EchoClient::new(channel);
    let mut request = tonic::Request::new(EchoRequest {
        message: "t".into(),
    });
    request.set_timeout(Duration::from_secs(30));
    within(Duration::from_secs(5), "a call", client.unary(request))
        .await
        .expect("answered");
    let seen = backends[0].counters.timeouts_seen();
    let sent = seen[0].expect("a grpc-timeout");
    assert!(
        sent <= Duration::from_secs(1),
        "the method's 1 s, not the caller's 30 s: {sent:?}"
    );
}

#[tokio::test]
async fn each_retry_and_hedge_carries_the_time_left() {
    let backends = backends(97, 2).await;
    let config = r#"{"methodConfig": [
        {"name": [{"service": "echo.Echo", "method": "Unary"}],
         "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.01s",
           "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}},
        {"name": [{"service": "echo.Echo", "method": "Bidi"}],
         "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.3s"}}]}"#;
    let channel = channel(&backends, config).await;
    // Retry: the first attempt takes 300 ms, then fails.
    for b in &backends {
        b.counters.delay_us.store(300_000, Ordering::SeqCst);
        b.counters.fail_next.store(1, Ordering::SeqCst);
    }
    let mut client = EchoClient::new(channel.clone());
    let mut request = tonic::Request::new(EchoRequest {
        message: "t".into(),
    });
    request.set_timeout(Duration::from_secs(2));
    let status = within(
        Duration::from_secs(5),
        "a retried call",
        client.unary(request),
    )
    .await
    .expect_err("both attempts fail");
    assert_eq!(status.code(), Code::Unavailable);
    let mut seen: Vec<Duration> = backends
        .iter()
        .flat_map(|b| b.counters.timeouts_seen())
        .map(|t| t.expect("a grpc-timeout"))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 2);
    assert!(seen[1] <= Duration::from_secs(2), "{seen:?}");
    assert!(
        seen[0] <= Duration::from_millis(1700),
        "the retry left 300 ms in: {seen:?}"
    );
    // Hedge: the second attempt goes out 300 ms in.
    for b in &backends {
        b.counters.timeouts.lock().unwrap().clear();
        *b.counters.bidi_mode.lock().unwrap() = support::echo::BidiMode::AnswerAfter(1000);
    }
    let (tx, requests) = request_stream();
    let mut request = tonic::Request::new(requests);
    request.set_timeout(Duration::from_secs(2));
    let call = client.bidi(request);
    let _ = within(Duration::from_secs(5), "a hedged call", call).await;
    drop(tx);
    let mut seen: Vec<Duration> = backends
        .iter()
        .flat_map(|b| b.counters.timeouts_seen())
        .map(|t| t.expect("a grpc-timeout"))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[0] <= Duration::from_millis(1700),
        "the hedge left 300 ms in: {seen:?}"
    );
}

#[tokio::test]
async fn a_streaming_call_ends_at_its_deadline_whatever_the_server_does() {
    let backends = backends(99, 1).await;
    let channel = channel(&backends, "{}").await;
    let mut client = EchoClient::new(channel);
    let mut request = tonic::Request::new(StreamRequest {
        message: "s".into(),
        count: 50,
        interval_ms: 100,
    });
    request.set_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let mut stream = within(
        Duration::from_secs(5),
        "the stream",
        client.server_stream(request),
    )
    .await
    .expect("its headers arrive")
    .into_inner();
    let mut replies = 0;
    let end = loop {
        match within(Duration::from_secs(10), "a message", stream.message()).await {
            Ok(Some(_)) => replies += 1,
            other => break other,
        }
    };
    let took = started.elapsed();
    let status = end.expect_err("the deadline ends it");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(replies < 50, "cut short: {replies}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "at the 500 ms deadline: {took:?}"
    );
}

#[tokio::test]
async fn a_retry_waits_for_an_endpoint_as_long_as_the_first_attempt_could() {
    let backends = backends(100, 1).await;
    let list = backends[0].addr.to_string();
    let builder = LbChannel::builder(format!("ipv4:{list}"))
        .outlier_detection(None)
        .ready_timeout(Duration::from_secs(1))
        .default_service_config(&retry_config(2, r#""UNAVAILABLE""#, ""))
        .unwrap();
    let channel = support::connect_serving(builder, 1).await;
    // The first attempt takes 1.2 s, past the 1 s ready timeout, and fails.
    // Meanwhile the pod leaves rotation, and comes back 0.4 s after the
    // retry began waiting: well within its own 1 s.
    let counters = &backends[0].counters;
    counters.delay_us.store(1_200_000, Ordering::SeqCst);
    counters.fail_next.store(1, Ordering::SeqCst);
    let started = Instant::now();
    let mut client = EchoClient::new(channel.clone());
    let call = tokio::spawn(async move { unary(&mut client).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    backends[0].set_serving(false).await;
    let out = wait_for(Duration::from_secs(2), || {
        !channel.endpoints()[0].in_rotation
    })
    .await;
    assert!(out.is_some());
    counters.delay_us.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1600).saturating_sub(started.elapsed())).await;
    backends[0].set_serving(true).await;
    let backend = within(Duration::from_secs(5), "the retried call", call)
        .await
        .unwrap()
        .expect("the retry waits for the pod to come back");
    assert_eq!(backend, "b100");
    assert_eq!(counters.unary.load(Ordering::SeqCst), 2);
}
