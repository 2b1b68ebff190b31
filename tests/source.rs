//! A user's own endpoint source (`LbChannel::from_source`) against real
//! tonic backends with tonic-health on 127.0.0.x: its sets are balanced
//! over, its errors keep the last set and reach the caller, a source that
//! fails at once is paced, and the source ends with the channel.

use healthlb_testkit as support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures::channel::mpsc;
use healthlb::LbChannel;
use healthlb::resolve::Endpoint;
use healthlb::resolve::{EndpointSource, SourceError, from_stream};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, backends, free_port};
use support::{all_serving, wait_for, within};

type Sets = mpsc::UnboundedSender<Result<Vec<Endpoint>, SourceError>>;

fn set(backends: &[&Backend]) -> Result<Vec<Endpoint>, SourceError> {
    Ok(backends.iter().map(|b| Endpoint::new(b.addr)).collect())
}

/// A channel over a stream of sets the test pushes.
fn channel_over_stream(
    builder: impl FnOnce(healthlb::Builder) -> healthlb::Builder,
) -> (Sets, LbChannel) {
    let (tx, rx) = mpsc::unbounded();
    let channel = builder(LbChannel::from_source("registry:echo", from_stream(rx)))
        .ready_timeout(Duration::from_millis(500))
        .build()
        .expect("the channel builds");
    (tx, channel)
}

/// The backends that answered `n` calls.
async fn answered_by(channel: &LbChannel, n: usize) -> HashSet<String> {
    let mut client = EchoClient::new(channel.clone());
    let mut seen = HashSet::new();
    for i in 0..n {
        let reply = client
            .unary(EchoRequest {
                message: "x".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("call {i} failed: {e}"));
        seen.insert(reply.into_inner().backend);
    }
    seen
}

fn names(backends: &[&Backend]) -> HashSet<String> {
    backends.iter().map(|b| b.name.to_string()).collect()
}

#[tokio::test]
async fn a_users_source_is_balanced_over_as_it_changes() {
    support::init_tracing();
    let port = free_port();
    let b = backends(150, 3, port).await;
    let (tx, channel) = channel_over_stream(|b| b);

    tx.unbounded_send(set(&[&b[0], &b[1]])).unwrap();
    all_serving(&channel, 2).await;
    assert_eq!(answered_by(&channel, 20).await, names(&[&b[0], &b[1]]));
    assert_eq!(b[2].calls(), 0, "a backend outside the set got calls");

    tx.unbounded_send(set(&[&b[0], &b[1], &b[2]])).unwrap();
    all_serving(&channel, 3).await;
    assert_eq!(
        answered_by(&channel, 30).await,
        names(&[&b[0], &b[1], &b[2]])
    );

    // Health applies as for DNS: a NOT_SERVING pod in the set gets no call.
    b[1].set_serving(false).await;
    let left = wait_for(Duration::from_secs(5), || {
        !support::is_serving(&channel, b[1].addr)
    })
    .await;
    assert!(left.is_some(), "{:?}", support::states(&channel));
    assert_eq!(answered_by(&channel, 20).await, names(&[&b[0], &b[2]]));

    tx.unbounded_send(set(&[&b[2]])).unwrap();
    all_serving(&channel, 1).await;
    assert_eq!(answered_by(&channel, 10).await, names(&[&b[2]]));
}

#[tokio::test]
async fn a_failing_source_keeps_the_last_set_and_says_why() {
    let port = free_port();
    let b = backends(154, 1, port).await;

    // Failing from the start: the caller hears the source's own words.
    let (tx, channel) = channel_over_stream(|b| b);
    tx.unbounded_send(Err("the registry answered 503".into()))
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let call = client.unary(EchoRequest {
        message: "x".into(),
    });
    let err = within(Duration::from_secs(5), "a call with no endpoints", call)
        .await
        .expect_err("no endpoint yet");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        err.message().contains("registry:echo")
            && err.message().contains("the registry answered 503"),
        "the error names the source and its failure: {err}"
    );

    // A good set, then failures: the set stays and calls go on.
    tx.unbounded_send(set(&[&b[0]])).unwrap();
    all_serving(&channel, 1).await;
    tx.unbounded_send(Err("the registry answered 503".into()))
        .unwrap();
    drop(tx); // the source ends too: the set stays for the channel's life
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(answered_by(&channel, 10).await, names(&[&b[0]]));
    assert_eq!(channel.endpoints().len(), 1);
}

/// Fails at once, every time, counting the asks.
struct AlwaysFails {
    asked: Arc<AtomicU32>,
    dropped: Arc<AtomicBool>,
}

impl EndpointSource for AlwaysFails {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Some(Err("down".into()))
    }
}

impl Drop for AlwaysFails {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_source_that_fails_at_once_is_paced_and_ends_with_the_channel() {
    let asked = Arc::new(AtomicU32::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let source = AlwaysFails {
        asked: asked.clone(),
        dropped: dropped.clone(),
    };
    let channel = LbChannel::from_source("failing", source).build().unwrap();
    let clone = channel.clone();

    // Asks at 0, then after 1 s ± 20 %, then 1.6 s ± 20 % later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = asked.load(Ordering::SeqCst);
    assert!((1..=3).contains(&n), "asked {n} times in 1.5 s");

    drop(channel);
    assert!(!dropped.load(Ordering::SeqCst), "a clone still lives");
    drop(clone);
    let ended = wait_for(Duration::from_secs(5), || dropped.load(Ordering::SeqCst)).await;
    assert!(
        ended.is_some(),
        "the source outlived the last channel clone"
    );
}

#[tokio::test]
async fn a_source_starts_once_even_from_a_cloned_builder() {
    let (_tx, rx) = mpsc::unbounded::<Result<Vec<Endpoint>, SourceError>>();
    let builder = LbChannel::from_source("registry:echo", from_stream(rx));
    let again = builder.clone();
    let _channel = builder.build().expect("the first build starts the source");
    let err = again.build().expect_err("the source is taken");
    let text = err.to_string();
    assert!(
        text.contains("registry:echo") && text.contains("already started"),
        "{text}"
    );
}

/// Gives its first set, panics on its next ask (a bug in a registry
/// client), then gives a second set and has nothing more to say.
struct PanicsOnce {
    asked: u32,
    sets: Vec<Vec<Endpoint>>,
}

impl EndpointSource for PanicsOnce {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        self.asked += 1;
        match self.asked {
            2 => panic!("the registry client hit a bug"),
            1 | 3 => Some(Ok(self.sets.remove(0))),
            _ => std::future::pending().await,
        }
    }
}

#[tokio::test]
async fn a_source_that_panics_is_treated_as_one_that_fails() {
    let port = free_port();
    let b = backends(157, 2, port).await;
    let source = PanicsOnce {
        asked: 0,
        sets: vec![
            vec![Endpoint::new(b[0].addr)],
            vec![Endpoint::new(b[0].addr), Endpoint::new(b[1].addr)],
        ],
    };
    let channel = LbChannel::from_source("registry:panics", source)
        .ready_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    all_serving(&channel, 1).await;
    // The panic came right after the first set: the set stays, calls go on.
    assert_eq!(answered_by(&channel, 10).await, names(&[&b[0]]));
    // Asked again after the backoff (1 s ± 20 %), the source recovers.
    let both = wait_for(Duration::from_secs(5), || channel.endpoints().len() == 2).await;
    assert!(both.is_some(), "{:?}", support::states(&channel));
    all_serving(&channel, 2).await;
    assert_eq!(answered_by(&channel, 20).await, names(&[&b[0], &b[1]]));
}

#[tokio::test]
async fn a_source_that_ends_before_its_first_set_says_it_ended() {
    let (tx, channel) = channel_over_stream(|b| b);
    drop(tx);
    let mut client = EchoClient::new(channel.clone());
    let mut last = String::new();
    // The end reaches the channel at once; a call then says so.
    for _ in 0..50 {
        let call = client.unary(EchoRequest {
            message: "x".into(),
        });
        let err = within(Duration::from_secs(5), "a call", call)
            .await
            .expect_err("no endpoint");
        last = err.message().to_owned();
        if !last.contains("has not finished") {
            break;
        }
    }
    assert!(
        last.contains("registry:echo")
            && last.contains("the endpoint source ended before giving any endpoints"),
        "{last}"
    );
}

#[tokio::test]
async fn the_channel_says_how_resolution_is_going_and_fails_calls_at_once_in_transient_failure() {
    use healthlb::resolve::ResolveStatus;
    let port = free_port();
    let b = backends(160, 1, port).await;
    let (tx, rx) = mpsc::unbounded();
    // Unary may wait for ready; the other methods may not.
    let config = r#"{"methodConfig": [{"name": [{"service": "echo.Echo", "method": "Unary"}],
        "waitForReady": true}]}"#;
    let channel = LbChannel::from_source("registry:echo", from_stream(rx))
        .ready_timeout(Duration::from_secs(5))
        .default_service_config(config)
        .unwrap()
        .build()
        .unwrap();
    assert!(matches!(
        channel.resolution().status,
        ResolveStatus::Pending
    ));
    tx.unbounded_send(Err("the registry answered 503".into()))
        .unwrap();
    let failing = wait_for(Duration::from_secs(5), || {
        matches!(channel.resolution().status, ResolveStatus::Failing { .. })
    })
    .await;
    assert!(failing.is_some(), "{}", channel.resolution());
    let resolution = channel.resolution();
    assert_eq!(resolution.endpoints, 0);
    assert!(resolution.is_failing_empty());
    let (error, _) = resolution.last_error.as_ref().expect("the failure");
    assert!(
        error.to_string().contains("the registry answered 503"),
        "{error}"
    );
    let line = channel.to_string();
    assert!(
        line.starts_with("registry:echo: ")
            && line.contains("failing for")
            && line.matches("the registry answered 503").count() == 1,
        "{line}"
    );

    // TRANSIENT_FAILURE: a call that isn't wait-for-ready fails at once
    // with the resolver's error, not after the 5 s ready timeout.
    let mut client = EchoClient::new(channel.clone());
    let started = std::time::Instant::now();
    let request = support::echo::pb::StreamRequest {
        message: "s".into(),
        count: 1,
        interval_ms: 0,
    };
    let status = within(
        Duration::from_secs(4),
        "a fail-fast call",
        client.server_stream(request),
    )
    .await
    .expect_err("nothing to call");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("registry:echo")
            && status.message().contains("the registry answered 503"),
        "{status:?}"
    );
    // A wait-for-ready call waits, up to its deadline.
    let mut request = tonic::Request::new(EchoRequest {
        message: "x".into(),
    });
    request.set_timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let status = within(
        Duration::from_secs(4),
        "a wait-for-ready call",
        client.unary(request),
    )
    .await
    .expect_err("still nothing");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(650), "it waited");

    // Recovered: resolved, one endpoint, the last failure kept.
    channel.resolve_now();
    tx.unbounded_send(set(&[&b[0]])).unwrap();
    all_serving(&channel, 1).await;
    let resolution = channel.resolution();
    assert!(
        matches!(resolution.status, ResolveStatus::Resolved { .. }),
        "{resolution}"
    );
    assert_eq!(resolution.endpoints, 1);
    assert!(resolution.last_change.is_some() && resolution.last_error.is_some());
    let line = resolution.to_string();
    assert!(
        line.contains("resolved") && line.contains("last failure"),
        "{line}"
    );
    assert_eq!(answered_by(&channel, 3).await, names(&[&b[0]]));
}
