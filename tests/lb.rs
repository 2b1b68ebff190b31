//! LbChannel end to end: hickory DNS in-process, tonic echo backends with
//! tonic-health on 127.0.0.x sharing one port, like pods behind a headless
//! Service.

use healthlb_testkit as support;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use healthlb::LbChannel;
use healthlb::subchannel::SubchannelState;
use support::dns::TestDns;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoRequest, StreamRequest};
use support::echo::{Backend, Options, backends, free_port, loopback};
use support::proxy::Proxy;
use support::{all_serving, connect_serving, ipv4s, states, wait_for, within};

const HOST: &str = "echo.test.local";

fn ips(backends: &[Backend]) -> Vec<Ipv4Addr> {
    ipv4s(backends.iter().map(|b| b.addr))
}

/// A DNS server with `HOST` pointing at `backends`, TTL 1 s.
async fn dns_for(backends: &[Backend]) -> TestDns {
    let dns = TestDns::start().await;
    dns.zone().set_a(HOST, &ips(backends), 1);
    dns
}

/// `n` SERVING backends from 127.0.0.`first` on one port, DNS pointing at
/// them, and a channel that sees them all SERVING.
async fn serving_cluster(first: u8, n: u8) -> (Vec<Backend>, TestDns, u16, LbChannel) {
    let port = free_port();
    let backends = backends(first, n, port).await;
    let dns = dns_for(&backends).await;
    let channel = connect_serving(LbChannel::builder(dns.target(HOST, port)), usize::from(n)).await;
    (backends, dns, port, channel)
}

async fn unary(client: &mut EchoClient<LbChannel>) -> Result<String, tonic::Status> {
    let reply = client
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await?;
    Ok(reply.into_inner().backend)
}

#[tokio::test]
async fn round_robin_is_even_over_serving_backends() {
    support::init_tracing();
    let (_backends, _dns, _port, channel) = serving_cluster(30, 4).await;

    let mut client = EchoClient::new(channel.clone());
    let mut seen: HashMap<String, u64> = HashMap::new();
    for _ in 0..400 {
        *seen.entry(unary(&mut client).await.unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), 4, "every backend got calls: {seen:?}");
    let (min, max) = (seen.values().min().unwrap(), seen.values().max().unwrap());
    assert!(
        max - min <= 1,
        "even to within one call per round: {seen:?}"
    );
    let started: u64 = channel.endpoints().iter().map(|e| e.calls_started).sum();
    assert_eq!(started, 400, "the endpoint counters saw every call");
}

#[tokio::test]
async fn a_not_serving_backend_gets_no_new_calls() {
    let (backends, _dns, _port, channel) = serving_cluster(34, 3).await;

    backends[0].set_serving(false).await;
    let out = wait_for(Duration::from_secs(2), || {
        channel.endpoints().iter().any(|e| {
            e.addr == backends[0].addr && matches!(e.state, SubchannelState::NotServing(_))
        })
    })
    .await;
    assert!(out.is_some(), "NOT_SERVING seen: {:?}", states(&channel));
    let before = backends[0].calls();
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..200 {
        let backend = unary(&mut client).await.unwrap();
        assert_ne!(backend, "b34");
    }
    assert_eq!(
        backends[0].calls(),
        before,
        "no call reached the NOT_SERVING backend"
    );

    backends[0].set_serving(true).await;
    all_serving(&channel, 3).await;
    // Round robin over three: it gets one of the next three calls.
    for _ in 0..3 {
        unary(&mut client).await.unwrap();
    }
    assert_eq!(
        backends[0].calls(),
        before + 1,
        "SERVING again, it gets its share"
    );
}

#[tokio::test]
async fn a_backend_added_to_dns_gets_calls_within_ttl_plus_two_seconds() {
    let (mut all, dns, port, channel) = serving_cluster(37, 2).await;

    all.push(Backend::start("b39", loopback(39, port)).await);
    dns.zone().set_a(HOST, &ips(&all), 1);
    let added = Instant::now();
    let mut client = EchoClient::new(channel.clone());
    let mut reached = None;
    for _ in 0..1000 {
        if unary(&mut client).await.unwrap() == "b39" {
            reached = Some(added.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = reached.expect("the new backend got a call");
    assert!(
        took <= Duration::from_secs(3),
        "new backend reached after {took:?}, over TTL + 2 s"
    );
}

#[tokio::test]
async fn with_nothing_serving_calls_wait_then_fail_with_a_summary() {
    let port = free_port();
    let options = Options {
        serving: false,
        ..Options::default()
    };
    let a = Backend::start_with("a", loopback(40, port), options.clone()).await;
    let b = Backend::start_with("b", loopback(41, port), options).await;
    // 127.0.0.42 has no server: connect refused.
    let dns = TestDns::start().await;
    let ips = [
        Ipv4Addr::new(127, 0, 0, 40),
        Ipv4Addr::new(127, 0, 0, 41),
        Ipv4Addr::new(127, 0, 0, 42),
    ];
    dns.zone().set_a(HOST, &ips, 1);
    let target = dns.target(HOST, port);
    let channel = LbChannel::builder(target.clone())
        .ready_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let settled = wait_for(Duration::from_secs(5), || {
        let eps = channel.endpoints();
        eps.len() == 3
            && eps.iter().all(|e| {
                matches!(
                    e.state,
                    SubchannelState::NotServing(_) | SubchannelState::TransientFailure(_)
                )
            })
    })
    .await;
    assert!(settled.is_some(), "{:?}", states(&channel));

    let mut client = EchoClient::new(channel.clone());
    let started = Instant::now();
    let status = unary(&mut client).await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "it waited the ready timeout"
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.message(),
        format!(
            "{target}: no endpoint is SERVING after waiting 400ms; 3 endpoints: 2 NOT_SERVING, 1 connect refused"
        )
    );

    let fast = LbChannel::builder(target.clone())
        .fail_fast(true)
        .build()
        .unwrap();
    let mut client = EchoClient::new(fast.clone());
    let status = within(
        Duration::from_secs(2),
        "a fail_fast call",
        unary(&mut client),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("fail_fast"),
        "{}",
        status.message()
    );

    // A call's own deadline ends its wait, though the ready timeout is longer:
    // tonic's client polls `ready()` before the call, which alone knows it.
    let patient = LbChannel::builder(target.clone())
        .ready_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut client = EchoClient::new(patient);
    let mut request = tonic::Request::new(EchoRequest {
        message: "deadline".into(),
    });
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = within(
        Duration::from_secs(10),
        "a call with a 300 ms deadline",
        client.unary(request),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A waiting call is served as soon as an endpoint comes up.
    let channel = LbChannel::builder(target.clone())
        .ready_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let waiting = tokio::spawn(async move { unary(&mut client).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.set_serving(true).await;
    let served = within(Duration::from_secs(5), "the waiting call", waiting)
        .await
        .unwrap();
    assert_eq!(served.unwrap(), "a");

    let err = LbChannel::builder(target)
        .connect_deadline(Duration::from_millis(300))
        .subchannels(|s| s.health_service("no.such.Service"))
        .connect()
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("no endpoint became SERVING within 300ms"),
        "{message}"
    );
    assert!(
        message.contains("127.0.0.40"),
        "every endpoint is named: {message}"
    );
    drop(b);
}

#[tokio::test]
async fn a_stream_on_a_removed_backend_completes() {
    let (backends, dns, _port, channel) = serving_cluster(43, 2).await;

    let mut client = EchoClient::new(channel.clone());
    let request = StreamRequest {
        message: "s".into(),
        count: 20,
        interval_ms: 50,
    };
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let (_removed, keep): (Vec<Backend>, Vec<Backend>) =
        backends.into_iter().partition(|b| *b.name == first.backend);
    dns.zone().set_a(HOST, &ips(&keep), 1);
    let gone = wait_for(Duration::from_secs(3), || channel.endpoints().len() == 1).await;
    assert!(gone.is_some(), "the backend left: {:?}", states(&channel));

    let mut count = 1;
    while let Some(reply) = within(Duration::from_secs(5), "the stream", stream.next()).await {
        let reply = reply.expect("the stream on the removed backend goes on");
        assert_eq!(reply.backend, first.backend);
        count += 1;
    }
    assert_eq!(count, 20, "every message arrived");
    // New calls go to the remaining backend only.
    for _ in 0..10 {
        assert_eq!(unary(&mut client).await.unwrap(), *keep[0].name);
    }
}

#[tokio::test]
async fn unary_server_streaming_and_bidi_work() {
    let (_backends, _dns, _port, channel) = serving_cluster(45, 2).await;
    let mut client = EchoClient::new(channel);

    let reply = client
        .unary(EchoRequest {
            message: "one".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "one");

    let request = StreamRequest {
        message: "many".into(),
        count: 5,
        interval_ms: 1,
    };
    let replies: Vec<_> = client
        .server_stream(request)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let seqs: Vec<u64> = replies.into_iter().map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    let outbound = futures::stream::iter((0..3).map(|i| EchoRequest {
        message: format!("m{i}"),
    }));
    let replies: Vec<_> = client
        .bidi(outbound)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let messages: Vec<String> = replies.into_iter().map(|r| r.unwrap().message).collect();
    assert_eq!(messages, vec!["m0", "m1", "m2"]);
}

#[tokio::test]
async fn discover_drives_towers_p2c_balancer() {
    let (backends, _dns, _port, channel) = serving_cluster(47, 3).await;

    let balance = tower::balance::p2c::Balance::new(channel.discover());
    let mut client = EchoClient::new(balance);
    let mut seen: HashMap<String, u64> = HashMap::new();
    for _ in 0..150 {
        let reply = client
            .unary(EchoRequest {
                message: "p2c".into(),
            })
            .await
            .unwrap();
        *seen.entry(reply.into_inner().backend).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "p2c used every SERVING endpoint: {seen:?}");

    // A NOT_SERVING endpoint is removed from tower's balancer too.
    backends[0].set_serving(false).await;
    let out = wait_for(Duration::from_secs(2), || {
        !channel
            .endpoints()
            .iter()
            .any(|e| e.addr == backends[0].addr && e.state.is_serving())
    })
    .await;
    assert!(out.is_some());
    let before = backends[0].calls();
    for _ in 0..60 {
        client
            .unary(EchoRequest {
                message: "p2c".into(),
            })
            .await
            .unwrap();
    }
    assert_eq!(
        backends[0].calls(),
        before,
        "no call reached the removed endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_clone_ends_every_task_and_connection() {
    let port = free_port();
    let backends = backends(50, 2, port).await;
    let proxies = [
        Proxy::start(loopback(52, 0), backends[0].addr).await,
        Proxy::start(loopback(53, 0), backends[1].addr).await,
    ];
    let target = format!("ipv4:{},{}", proxies[0].addr, proxies[1].addr);

    // The client lives in its own runtime, so its tasks can be counted.
    let (alive_before, alive_during, alive_after) = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let before = runtime.metrics().num_alive_tasks();
        let during = runtime.block_on(async {
            let channel = LbChannel::builder(target).connect().await.unwrap();
            let mut client = EchoClient::new(channel.clone());
            for _ in 0..20 {
                unary(&mut client).await.unwrap();
            }
            let clone = channel.clone();
            drop(channel);
            // One clone still holds everything up.
            unary(&mut EchoClient::new(clone.clone())).await.unwrap();
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        });
        let metrics = runtime.metrics();
        let start = Instant::now();
        while metrics.num_alive_tasks() > before && start.elapsed() < Duration::from_secs(10) {
            runtime.block_on(tokio::time::sleep(Duration::from_millis(20)));
        }
        (before, during, metrics.num_alive_tasks())
    })
    .await
    .unwrap();
    assert!(
        alive_during > alive_before,
        "the channel ran tasks: {alive_during}"
    );
    assert_eq!(
        alive_after, alive_before,
        "every task ended after the last clone was dropped"
    );

    let closed = wait_for(Duration::from_secs(5), || {
        proxies
            .iter()
            .all(|p| p.state.open.load(Ordering::SeqCst) == 0)
    })
    .await;
    assert!(
        closed.is_some(),
        "the backends saw their connections closed"
    );
    assert!(
        proxies
            .iter()
            .all(|p| p.state.accepted.load(Ordering::SeqCst) >= 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_clone_ends_every_connection_even_with_a_discover_in_use() {
    let port = free_port();
    let backends = backends(54, 2, port).await;
    let proxies = [
        Proxy::start(loopback(56, 0), backends[0].addr).await,
        Proxy::start(loopback(57, 0), backends[1].addr).await,
    ];
    let target = format!("ipv4:{},{}", proxies[0].addr, proxies[1].addr);
    let channel = LbChannel::builder(target).connect().await.unwrap();
    all_serving(&channel, 2).await;
    // tower's p2c holds the Discover, and the subchannels it yielded, for as
    // long as the balancer lives: here, past the channel.
    let balance = tower::balance::p2c::Balance::new(channel.discover());
    let mut client = EchoClient::new(balance);
    for _ in 0..20 {
        client
            .unary(EchoRequest {
                message: "p2c".into(),
            })
            .await
            .unwrap();
    }
    drop(channel);
    let closed = wait_for(Duration::from_secs(5), || {
        proxies
            .iter()
            .all(|p| p.state.open.load(Ordering::SeqCst) == 0)
    })
    .await;
    assert!(
        closed.is_some(),
        "the backends saw their connections closed: {:?} still open",
        proxies
            .iter()
            .map(|p| p.state.open.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    );
    // And they stay closed: nothing reconnects or health-checks.
    let accepted: Vec<usize> = proxies
        .iter()
        .map(|p| p.state.accepted.load(Ordering::SeqCst))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later: Vec<usize> = proxies
        .iter()
        .map(|p| p.state.accepted.load(Ordering::SeqCst))
        .collect();
    assert_eq!(accepted, later, "no new connection after the drop");
    // The balancer still answers, at once and clearly.
    let status = within(
        Duration::from_secs(5),
        "a call through p2c after the channel is gone",
        client.unary(EchoRequest {
            message: "late".into(),
        }),
    )
    .await
    .expect_err("nothing serves any more");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("was shut down"), "{status:?}");
}

#[tokio::test]
async fn a_subchannel_replaced_at_the_same_address_is_reinserted_into_p2c() {
    let (backends, dns, _port, channel) = serving_cluster(58, 2).await;
    let balance = tower::balance::p2c::Balance::new(channel.discover());
    let mut client = EchoClient::new(balance);
    for _ in 0..20 {
        client
            .unary(EchoRequest {
                message: "p2c".into(),
            })
            .await
            .unwrap();
    }
    // The first backend leaves DNS and comes back at the same address, as a
    // pod restarted on the same IP. p2c is not polled meanwhile, so its
    // Discover sees only the end: the same address, a new subchannel.
    let gone = &backends[0];
    dns.zone().set_a(HOST, &ips(&backends[1..]), 1);
    let removed = wait_for(Duration::from_secs(5), || {
        !channel.endpoints().iter().any(|e| e.addr == gone.addr)
    })
    .await;
    assert!(removed.is_some(), "{:?}", states(&channel));
    dns.zone().set_a(HOST, &ips(&backends), 1);
    all_serving(&channel, 2).await;

    let before = gone.calls();
    for _ in 0..40 {
        client
            .unary(EchoRequest {
                message: "p2c".into(),
            })
            .await
            .expect("p2c calls succeed after the replacement");
    }
    assert!(
        gone.calls() > before,
        "the replacement subchannel got p2c's calls"
    );
}

#[tokio::test]
async fn bad_targets_and_settings_are_refused_at_build() {
    let err = LbChannel::builder("dns:///no-port.test")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), healthlb::ErrorKind::InvalidTarget);
    assert!(err.to_string().contains("dns:///no-port.test"), "{err}");

    let err = LbChannel::builder("ipv4:127.0.0.1:1")
        .ready_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), healthlb::ErrorKind::InvalidConfig);

    let err = LbChannel::builder("ipv4:127.0.0.1:1")
        .http2_keep_alive_interval(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("at least 10s"), "{err}");
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    let err = LbChannel::builder("ipv4:127.0.0.1:1").build().unwrap_err();
    assert_eq!(err.kind(), healthlb::ErrorKind::NoRuntime);
}

/// Liveness probes a channel's backends received over `window`, idle.
async fn probes_over(backends: &[Backend], channel: LbChannel, window: Duration) -> u64 {
    let count = || {
        backends
            .iter()
            .map(|b| b.counters.health_checks.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let before = count();
    tokio::time::sleep(window).await;
    let probes = count() - before;
    assert!(
        channel.endpoints().iter().all(|e| e.state.is_serving()),
        "probing keeps them SERVING: {:?}",
        states(&channel)
    );
    probes
}

#[tokio::test]
async fn idle_probing_keeps_to_the_channel_wide_rate() {
    let port = free_port();
    let all = backends(70, 8, port).await;
    let dns = dns_for(&all).await;
    let builder = || {
        LbChannel::builder(dns.target(HOST, port))
            .subchannels(|s| s.liveness_interval(Some(Duration::from_millis(100))))
    };
    let window = Duration::from_secs(3);

    // 8 endpoints at 10 probes a second: each waits 0.8 s, not 0.1 s.
    let capped = connect_serving(
        builder().subchannels(|s| s.liveness_probes_per_second(10.0)),
        8,
    )
    .await;
    let probes = probes_over(&all, capped, window).await;
    assert!((12..=50).contains(&probes), "about 30 in 3 s, got {probes}");

    // A rate above 80 a second leaves the 0.1 s interval as it is.
    let free = connect_serving(
        builder().subchannels(|s| s.liveness_probes_per_second(1000.0)),
        8,
    )
    .await;
    let probes = probes_over(&all, free, window).await;
    assert!(probes >= 120, "about 240 in 3 s, got {probes}");

    for backend in all {
        backend.stop().await;
    }
}

/// A tower caller may build a call outside the runtime and await it inside;
/// its deadline timer starts when it is first polled, and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_a_deadline_built_outside_the_runtime_runs_inside_it() {
    use tower::Service;
    let (backends, _dns, _port, channel) = serving_cluster(192, 1).await;
    let mut outside = channel.clone();
    let built = std::thread::spawn(move || {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(outside.poll_ready(&mut cx).is_ready());
        let mut request = http::Request::new(tonic::body::Body::empty());
        *request.uri_mut() = http::Uri::from_static("/grpc.health.v1.Health/Check");
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("1S"));
        request.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        outside.call(request)
    })
    .join()
    .expect("building the call outside the runtime does not panic");
    let response = within(Duration::from_secs(5), "the call", built).await;
    assert!(response.is_ok(), "{:?}", response.err());
    drop(channel);
    for backend in backends {
        backend.stop().await;
    }
}

#[tokio::test]
async fn connect_returns_once_the_whole_first_set_has_answered() {
    let port = free_port();
    let backends = backends(50, 3, port).await;
    // A fourth pod answers its first health check 300 ms late, through a
    // proxy that holds its bytes back meanwhile.
    let late = Backend::start("late", loopback(54, port)).await;
    let proxy = Proxy::start(loopback(55, port), late.addr).await;
    proxy.go_silent(true);
    let dns = TestDns::start().await;
    let mut addrs = ips(&backends);
    addrs.push(Ipv4Addr::new(127, 0, 0, 55));
    // And one address with no server: connect refused.
    addrs.push(Ipv4Addr::new(127, 0, 0, 53));
    dns.zone().set_a(HOST, &addrs, 1);
    let unsilence = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.go_silent(false);
        proxy
    });
    let channel = within(
        Duration::from_secs(10),
        "connect",
        LbChannel::builder(dns.target(HOST, port)).connect(),
    )
    .await
    .expect("it connects");
    // At once: the four answered SERVING and are in rotation, the late one
    // included, and the fifth failed to connect.
    let eps = channel.endpoints();
    assert_eq!(
        eps.iter()
            .filter(|e| e.state.is_serving() && e.in_rotation)
            .count(),
        4,
        "{eps:?}"
    );
    assert!(
        eps.iter()
            .any(|e| matches!(e.state, SubchannelState::TransientFailure(_))),
        "{eps:?}"
    );
    // So the first calls already spread over every SERVING pod.
    let mut client = EchoClient::new(channel.clone());
    let mut seen: HashMap<String, u64> = HashMap::new();
    for _ in 0..40 {
        *seen.entry(unary(&mut client).await.unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.values().all(|&n| n == 10), "{seen:?}");
    drop(unsilence.await);
}
