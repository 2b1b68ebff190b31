//! Long-lived streams against servers that cap their concurrent streams:
//! liveness must not mistake a full connection for a dead one, and calls past
//! the cap go to more connections to the same endpoint.

use healthlb_testkit as support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::join_all;
use healthlb::LbChannel;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoRequest, StreamRequest};
use support::echo::{Backend, Options, free_port, loopback};
use support::proxy::Proxy;
use support::{connect_serving, wait_for, within};

/// A backend on 127.0.0.`n` that allows `limit` concurrent streams.
async fn limited(n: u8, limit: u32) -> Backend {
    let options = Options {
        max_concurrent_streams: Some(limit),
        ..Options::default()
    };
    Backend::start_with(&format!("b{n}"), loopback(n, free_port()), options).await
}

/// One server stream of `count` messages `interval_ms` apart; the sequence
/// numbers it delivered.
async fn stream(
    channel: &LbChannel,
    count: u32,
    interval_ms: u32,
) -> Result<Vec<u64>, tonic::Status> {
    let mut client = EchoClient::new(channel.clone());
    let request = StreamRequest {
        message: "s".into(),
        count,
        interval_ms,
    };
    let mut replies = client.server_stream(request).await?.into_inner();
    let mut seqs = Vec::new();
    while let Some(reply) = replies.message().await? {
        seqs.push(reply.seq);
    }
    Ok(seqs)
}

#[tokio::test]
async fn streams_on_a_full_connection_outlive_the_liveness_bound() {
    support::init_tracing();
    // The setup: 4 stream slots, 3 long streams plus the Watch.
    let backend = limited(60, 4).await;
    let interval = Duration::from_millis(300);
    let timeout = Duration::from_millis(300);
    let builder = LbChannel::builder(format!("ipv4:{}", backend.addr)).subchannels(|s| {
        s.liveness_interval(Some(interval))
            .liveness_timeout(timeout)
    });
    let channel = connect_serving(builder, 1).await;

    // Each stream is silent for 700 ms at a time, longer than interval +
    // timeout, and lasts 1.4 s in all.
    let calls = (0..3).map(|_| stream(&channel, 3, 700));
    let results = within(Duration::from_secs(20), "the streams", join_all(calls)).await;
    for result in results {
        assert_eq!(result.expect("the stream ends OK"), vec![0, 1, 2]);
    }
    assert_eq!(
        channel.endpoints()[0].connects,
        1,
        "the first connection was never cut"
    );
}

#[tokio::test]
async fn calls_past_the_stream_limit_open_more_connections_which_close_when_idle() {
    support::init_tracing();
    let backend = limited(61, 2).await;
    let builder = LbChannel::builder(format!("ipv4:{}", backend.addr)).subchannels(|s| {
        s.max_connections_per_endpoint(12)
            .extra_connection_idle_timeout(Duration::from_millis(500))
    });
    let channel = connect_serving(builder, 1).await;
    assert_eq!(channel.endpoints()[0].connections, 1);
    assert_eq!(channel.endpoints()[0].max_concurrent_streams, Some(2));

    // 10 calls of 1 s each. Queued on one connection with 2 slots (one of
    // them the Watch's), they would take 10 s; on more connections, 1 s.
    let started = Instant::now();
    let calls = (0..10).map(|_| stream(&channel, 2, 1000));
    let results = within(Duration::from_secs(30), "the calls", join_all(calls)).await;
    let took = started.elapsed();
    for result in results {
        assert_eq!(result.expect("the call ends OK"), vec![0, 1]);
    }
    assert_eq!(
        backend.counters.max_open_streams.load(Ordering::SeqCst),
        10,
        "all 10 ran at once"
    );
    assert!(
        took < Duration::from_millis(2500),
        "about one call's time, not ten: {took:?}"
    );
    let status = &channel.endpoints()[0];
    assert!(
        status.connections >= 10,
        "one connection per call here: {}",
        status.connections
    );
    assert_eq!(status.connects, 1, "extra connections are not reconnects");

    // Idle extras close; the first connection stays.
    let closed = wait_for(Duration::from_secs(5), || {
        channel.endpoints()[0].connections == 1
    })
    .await;
    assert!(
        closed.is_some(),
        "{} connections",
        channel.endpoints()[0].connections
    );
    assert!(channel.endpoints()[0].state.is_serving());
    let reply = within(Duration::from_secs(5), "a call", stream(&channel, 1, 0)).await;
    assert_eq!(reply.expect("still serving"), vec![0]);
}

#[tokio::test]
async fn round_robin_stays_per_endpoint_whatever_its_connections() {
    let port = free_port();
    let tight = Backend::start_with(
        "tight",
        loopback(62, port),
        Options {
            max_concurrent_streams: Some(2),
            ..Options::default()
        },
    )
    .await;
    let roomy = Backend::start("roomy", loopback(63, port)).await;
    let target = format!("ipv4:{},{}", tight.addr, roomy.addr);
    let channel = connect_serving(LbChannel::builder(target), 2).await;

    // 8 long streams: round robin gives each endpoint 4; the tight one needs
    // extra connections to carry its share, the roomy one does not.
    let calls = (0..8).map(|_| stream(&channel, 2, 800));
    let results = within(Duration::from_secs(30), "the streams", join_all(calls)).await;
    for result in results {
        assert_eq!(result.expect("the stream ends OK"), vec![0, 1]);
    }
    assert_eq!(tight.counters.streams.load(Ordering::SeqCst), 4);
    assert_eq!(roomy.counters.streams.load(Ordering::SeqCst), 4);
    let connections = |addr| {
        channel
            .endpoints()
            .into_iter()
            .find(|e| e.addr == addr)
            .map(|e| e.connections)
            .unwrap_or(0)
    };
    assert!(connections(tight.addr) >= 4, "{}", connections(tight.addr));
    assert_eq!(connections(roomy.addr), 1);
    // tonic's server sets no limit unless told to (hyper's own default is
    // 200, but tonic passes its `None` through).
    let roomy_limit = channel
        .endpoints()
        .into_iter()
        .find(|e| e.addr == roomy.addr)
        .and_then(|e| e.max_concurrent_streams);
    assert_eq!(roomy_limit, None);

    // Unary calls split evenly too, extra connections or not.
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..100 {
        client
            .unary(EchoRequest {
                message: "x".into(),
            })
            .await
            .expect("a unary call");
    }
    let tight_unary = tight.counters.unary.load(Ordering::SeqCst);
    let roomy_unary = roomy.counters.unary.load(Ordering::SeqCst);
    assert_eq!((tight_unary, roomy_unary), (50, 50));
}

#[tokio::test]
async fn a_probe_without_a_stream_slot_is_not_evidence_of_death() {
    // Two slots: the Watch's and one call's. No slot is left for the probe,
    // and one connection only, so the call cannot go elsewhere.
    let backend = limited(64, 2).await;
    let interval = Duration::from_millis(200);
    let timeout = Duration::from_millis(200);
    let builder = LbChannel::builder(format!("ipv4:{}", backend.addr)).subchannels(|s| {
        s.max_connections_per_endpoint(1)
            .liveness_interval(Some(interval))
            .liveness_timeout(timeout)
    });
    let channel = connect_serving(builder, 1).await;
    // Silent for 1 s at a time: over twice interval + timeout.
    let seqs = within(
        Duration::from_secs(10),
        "the stream",
        stream(&channel, 3, 1000),
    )
    .await;
    assert_eq!(seqs.expect("the stream ends OK"), vec![0, 1, 2]);
    let status = &channel.endpoints()[0];
    assert_eq!(status.connects, 1, "the connection was never cut");
    assert_eq!(status.connections, 1);
}

#[tokio::test]
async fn a_second_call_waits_for_a_slot_when_no_more_connections_may_open() {
    let backend = limited(65, 3).await;
    let builder = LbChannel::builder(format!("ipv4:{}", backend.addr))
        .subchannels(|s| s.max_connections_per_endpoint(1))
        .ready_timeout(Duration::from_secs(5));
    let channel = connect_serving(builder, 1).await;
    // One slot for calls (3, less the Watch's and the probe's): the calls
    // run one after the other, as on grpc-go, and both end OK.
    let started = Instant::now();
    let (a, b) = within(
        Duration::from_secs(10),
        "two calls",
        futures::future::join(stream(&channel, 2, 500), stream(&channel, 2, 500)),
    )
    .await;
    assert_eq!(a.expect("first"), vec![0, 1]);
    assert_eq!(b.expect("second"), vec![0, 1]);
    assert_eq!(backend.counters.max_open_streams.load(Ordering::SeqCst), 1);
    assert!(started.elapsed() >= Duration::from_millis(1000));

    // A call that cannot get a slot within the ready timeout fails
    // UNAVAILABLE, saying why.
    let quick = LbChannel::builder(format!("ipv4:{}", backend.addr))
        .subchannels(|s| s.max_connections_per_endpoint(1))
        .ready_timeout(Duration::from_millis(300));
    let quick = connect_serving(quick, 1).await;
    let holder = tokio::spawn({
        let channel = quick.clone();
        async move { stream(&channel, 2, 2000).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = stream(&quick, 1, 0).await.expect_err("no slot");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("every stream slot on")
            && status
                .message()
                .contains("limited by the server to 3 concurrent streams"),
        "{}",
        status.message()
    );
    assert_eq!(
        holder.await.unwrap().expect("the holder ends OK"),
        vec![0, 1]
    );
}

#[tokio::test]
async fn a_connection_lost_under_a_stream_fails_it_unavailable_naming_the_endpoint() {
    // A backend that dies mid-stream.
    let backend = Backend::start("dies", loopback(66, free_port())).await;
    let addr = backend.addr;
    let channel = connect_serving(LbChannel::builder(format!("ipv4:{addr}")), 1).await;
    let call = tokio::spawn({
        let channel = channel.clone();
        async move { stream(&channel, 10, 200).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend.kill().await;
    let status = within(Duration::from_secs(5), "the stream", call)
        .await
        .unwrap()
        .expect_err("the stream breaks");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&addr.to_string()), "{status:?}");

    // A peer that goes silent mid-stream: the liveness probe closes the
    // connection, and the stream says so.
    let backend = Backend::start("silent", loopback(67, free_port())).await;
    let proxy = Proxy::start(loopback(67, 0), backend.addr).await;
    let builder = LbChannel::builder(format!("ipv4:{}", proxy.addr)).subchannels(|s| {
        s.liveness_interval(Some(Duration::from_millis(300)))
            .liveness_timeout(Duration::from_millis(300))
    });
    let channel = connect_serving(builder, 1).await;
    let call = tokio::spawn({
        let channel = channel.clone();
        async move { stream(&channel, 20, 100).await }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    proxy.go_silent(true);
    let status = within(Duration::from_secs(5), "the stream", call)
        .await
        .unwrap()
        .expect_err("the stream breaks");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&proxy.addr.to_string())
            && status.message().contains("went silent"),
        "{status:?}"
    );
    // The endpoint's status counts it as a transport failure, and says why.
    let endpoint = &channel.endpoints()[0];
    assert_eq!(endpoint.calls_transport_failed, 1, "{endpoint}");
    let last = endpoint.last_call_error.as_ref().expect("the failure");
    assert_eq!(last.message(), status.message());
}

/// A `grpc.health.v1.Health` whose `Check` answers with an endless body.
#[derive(Clone)]
struct EndlessCheck;

impl tonic::server::NamedService for EndlessCheck {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl tower::Service<http::Request<tonic::body::Body>> for EndlessCheck {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let chunks = futures::stream::repeat_with(|| {
            Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from(vec![
                0u8;
                16 * 1024
            ])))
        });
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(chunks));
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        std::future::ready(Ok(response))
    }
}

#[tokio::test]
async fn the_probe_reads_a_bounded_answer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EndlessCheck)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    // Without health checking, one probe proves the peer speaks gRPC. Its
    // answer never ends; read whole, the probe would time out.
    let builder = LbChannel::builder(format!("ipv4:{addr}"))
        .subchannels(|s| s.health_check(false))
        .connect_timeout(Duration::from_secs(2))
        .connect_deadline(Duration::from_secs(5));
    let channel = within(Duration::from_secs(10), "connect", builder.connect())
        .await
        .expect("SERVING after one bounded probe");
    assert!(channel.endpoints()[0].state.is_serving());
}

#[tokio::test]
async fn cancelling_many_calls_never_closes_the_connection() {
    support::init_tracing();
    // Cancelled while the server is still sending: its frames keep coming
    // after the client's RST_STREAM. Hedging cancels every loser this way.
    let backend = Backend::start("b68", loopback(68, free_port())).await;
    let channel = connect_serving(LbChannel::builder(format!("ipv4:{}", backend.addr)), 1).await;
    let cancel_one = || {
        let mut client = EchoClient::new(channel.clone());
        async move {
            let request = StreamRequest {
                message: "x".repeat(1024),
                count: 1_000_000,
                interval_ms: 0,
            };
            let mut replies = client.server_stream(request).await?.into_inner();
            replies.message().await?;
            // Dropped here, mid-stream.
            Ok::<_, tonic::Status>(())
        }
    };
    let started = Instant::now();
    let mut cancelled = 0;
    // h2 closes a connection after 1,024 frames for streams it forgot;
    // 3,000 cancels, 16 at a time, are well past that. Bounded in time too.
    while cancelled < 3000 && started.elapsed() < Duration::from_secs(60) {
        let batch = join_all((0..16).map(|_| cancel_one())).await;
        for result in batch {
            result.expect("each stream opens and answers before it is cancelled");
            cancelled += 1;
        }
    }
    assert!(cancelled >= 3000, "only {cancelled} streams in 60 s");
    let mut client = EchoClient::new(channel.clone());
    within(
        Duration::from_secs(10),
        "a unary call after the cancels",
        client.unary(EchoRequest {
            message: "after".into(),
        }),
    )
    .await
    .expect("the endpoint still answers");
    let status = &channel.endpoints()[0];
    assert_eq!(
        status.connects, 1,
        "cancelled calls closed the connection: {:?}",
        status.last_error
    );
}

#[tokio::test]
async fn a_server_sending_frames_on_forgotten_streams_gets_its_connection_closed() {
    use support::hostile::Hostile;
    let server = Hostile::start(loopback(69, free_port())).await;
    let channel = connect_serving(LbChannel::builder(format!("ipv4:{}", server.addr)), 1).await;
    // 3,000 calls, each answered UNIMPLEMENTED: 3,000 closed stream ids,
    // more than h2 remembers (1,024), so frames on them are "forgotten".
    for _ in 0..30 {
        let batch = join_all((0..100).map(|_| {
            let mut client = EchoClient::new(channel.clone());
            async move {
                client
                    .unary(EchoRequest {
                        message: "x".into(),
                    })
                    .await
            }
        }));
        for result in within(Duration::from_secs(10), "100 calls", batch).await {
            assert_eq!(result.unwrap_err().code(), tonic::Code::Unimplemented);
        }
    }
    // Past the second h2 remembers the streams it reset.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Each frame makes the client queue a RST_STREAM; without a cap it
    // answers them all, for as long as the server goes on.
    for _ in 0..50 {
        server.flood(1_000).await;
        if server.seen.goaway.lock().unwrap().is_some() {
            break;
        }
    }
    let goaway = server.seen.goaway.lock().unwrap().clone();
    let flooded = server.seen.flooded_at_goaway.load(Ordering::SeqCst);
    assert_eq!(
        goaway,
        Some((0xb, "too_many_internal_resets".to_owned())),
        "ENHANCE_YOUR_CALM after {} frames",
        server.seen.flooded.load(Ordering::SeqCst)
    );
    assert!(flooded <= 20_000, "closed only after {flooded} frames");
    let closed = wait_for(Duration::from_secs(5), || {
        server.seen.closed.load(Ordering::SeqCst)
    })
    .await;
    assert!(closed.is_some(), "the client closed the connection");
}
