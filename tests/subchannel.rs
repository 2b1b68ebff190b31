//! Subchannels against real tonic servers with tonic-health, on loopback and
//! real time.

use healthlb_testkit as support;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use healthlb::resolve::Endpoint;
use healthlb::subchannel::Subchannel;
use healthlb::subchannel::{HealthStatus, NotServingReason, SubchannelConfig, SubchannelState};
use healthlb::{BackoffConfig, ErrorKind};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, Options, loopback};
use support::proxy::Proxy;
use support::within;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

fn fast_backoff() -> BackoffConfig {
    BackoffConfig::default()
        .initial(Duration::from_millis(100))
        .max(Duration::from_secs(1))
}

fn spawn(addr: std::net::SocketAddr, config: SubchannelConfig) -> Subchannel {
    Subchannel::spawn(Endpoint::new(addr), config).expect("subchannel spawns")
}

/// Waits until the state satisfies `pred`; how long it took.
async fn until(
    sub: &Subchannel,
    limit: Duration,
    pred: impl Fn(&SubchannelState) -> bool,
) -> Option<Duration> {
    let mut rx = sub.subscribe();
    let start = Instant::now();
    tokio::time::timeout(limit, async {
        loop {
            if pred(rx.borrow_and_update().state()) {
                return start.elapsed();
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await
    .ok()
}

async fn serving(sub: &Subchannel) {
    let took = until(sub, Duration::from_secs(5), SubchannelState::is_serving).await;
    assert!(took.is_some(), "not SERVING: {}", sub.state());
}

/// Runs `callers` loops of unary calls for `duration`; (ok, failed).
async fn load(sub: &Subchannel, callers: usize, duration: Duration) -> (u64, u64, Vec<String>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..callers {
        let mut client = EchoClient::new(sub.clone());
        let (ok, failed, errors) = (ok.clone(), failed.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded in count and time.
            for n in 0..200_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                let request = EchoRequest {
                    message: format!("{i}-{n}"),
                };
                match client.unary(request).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        errors.lock().unwrap().push(status.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for task in tasks {
        within(duration + Duration::from_secs(10), "a load task", task)
            .await
            .unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        errors,
    )
}

#[tokio::test]
async fn health_transitions_are_seen_in_order() {
    support::init_tracing();
    let backend = Backend::start("a", loopback(2, 0)).await;
    let sub = spawn(backend.addr, SubchannelConfig::default());
    serving(&sub).await;
    assert_eq!(sub.status().last_health(), Some(HealthStatus::Serving));

    // Every change is seen, in order. How fast is a benchmark's business
    // (BENCHMARKS.md section 3), not a test's.
    for _ in 0..5 {
        backend.set_serving(false).await;
        until(&sub, Duration::from_secs(5), |s| {
            matches!(
                s,
                SubchannelState::NotServing(NotServingReason::Health(HealthStatus::NotServing))
            )
        })
        .await
        .expect("NOT_SERVING is seen");
        assert_eq!(sub.status().last_health(), Some(HealthStatus::NotServing));
        backend.set_serving(true).await;
        until(&sub, Duration::from_secs(5), SubchannelState::is_serving)
            .await
            .expect("SERVING is seen");
        assert_eq!(sub.status().last_health(), Some(HealthStatus::Serving));
    }
    assert_eq!(sub.state().label(), "SERVING");
}

#[tokio::test]
async fn a_named_health_service_is_watched() {
    let backend = Backend::start("a", loopback(2, 0)).await;
    let sub = spawn(
        backend.addr,
        SubchannelConfig::default().health_service("echo.Echo"),
    );
    serving(&sub).await;
    backend
        .set_status("echo.Echo", ServingStatus::NotServing)
        .await;
    assert!(
        until(&sub, Duration::from_secs(1), |s| !s.is_serving())
            .await
            .is_some()
    );

    let unknown = spawn(
        backend.addr,
        SubchannelConfig::default().health_service("no.such.Service"),
    );
    let seen = until(&unknown, Duration::from_secs(3), |s| {
        matches!(
            s,
            SubchannelState::NotServing(NotServingReason::Health(HealthStatus::ServiceUnknown))
        )
    })
    .await;
    assert!(
        seen.is_some(),
        "an unknown service is SERVICE_UNKNOWN: {}",
        unknown.state()
    );
}

/// A log sink for tests on a current-thread runtime.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

#[tokio::test]
async fn a_server_without_health_counts_as_serving_and_logs_once() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let options = Options {
        health: false,
        ..Options::default()
    };
    let mut backend = Backend::start_with("plain", loopback(3, 0), options.clone()).await;
    let addr = backend.addr;
    let sub = spawn(addr, SubchannelConfig::default().backoff(fast_backoff()));
    serving(&sub).await;

    // Reconnect twice: still one line.
    for _ in 0..2 {
        backend.kill().await;
        let down = until(&sub, Duration::from_secs(3), |s| !s.is_serving()).await;
        assert!(down.is_some(), "a killed backend leaves SERVING");
        backend = Backend::start_with("plain", addr, options.clone()).await;
        serving(&sub).await;
    }
    assert_eq!(
        logs.count("no grpc.health.v1.Health service"),
        1,
        "logged once"
    );
    assert_eq!(logs.count(" ERROR "), 1, "at error level");
}

#[tokio::test]
async fn health_checking_off_counts_a_connected_endpoint_as_serving() {
    let options = Options {
        health: false,
        ..Options::default()
    };
    let backend = Backend::start_with("plain", loopback(3, 0), options).await;
    let sub = spawn(
        backend.addr,
        SubchannelConfig::default().health_check(false),
    );
    serving(&sub).await;
    let mut client = EchoClient::new(sub.clone());
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().backend, "plain");
}

#[derive(Clone)]
enum Behaviour {
    /// End every Watch at once, without a message.
    EndAtOnce,
    /// Send SERVING, then end.
    ServingThenEnd,
    /// Send this raw status value and stay open.
    Status(i32),
}

#[derive(Clone)]
struct OddHealth {
    behaviour: Behaviour,
    watches: Arc<Mutex<Vec<Instant>>>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for OddHealth {
    async fn check(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse { status: 1 }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        self.watches.lock().unwrap().push(Instant::now());
        let stream: WatchStream = match self.behaviour {
            Behaviour::EndAtOnce => Box::pin(futures::stream::empty()),
            Behaviour::ServingThenEnd => {
                Box::pin(futures::stream::iter([Ok(HealthCheckResponse {
                    status: 1,
                })]))
            }
            Behaviour::Status(status) => Box::pin(
                futures::stream::iter([Ok(HealthCheckResponse { status })])
                    .chain(futures::stream::pending()),
            ),
        };
        Ok(Response::new(stream))
    }
}

use futures::StreamExt;

async fn odd_health_server(
    behaviour: Behaviour,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let watches = Arc::new(Mutex::new(Vec::new()));
    let service = OddHealth {
        behaviour,
        watches: watches.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, watches)
}

#[tokio::test]
async fn a_health_stream_that_ends_is_retried_with_growing_delays() {
    let (addr, watches) = odd_health_server(Behaviour::EndAtOnce).await;
    // No jitter: the delays are 100, 200, 400 ms exactly, so each gap has a
    // lower bound a busy machine can only exceed.
    let backoff = BackoffConfig::default()
        .initial(Duration::from_millis(100))
        .multiplier(2.0)
        .jitter(0.0)
        .max(Duration::from_secs(5));
    let sub = spawn(addr, SubchannelConfig::default().backoff(backoff));
    let ended = until(&sub, Duration::from_secs(3), |s| {
        matches!(
            s,
            SubchannelState::NotServing(NotServingReason::HealthStreamEnded(_))
        )
    })
    .await;
    assert!(ended.is_some(), "{}", sub.state());
    let retried = support::wait_for(Duration::from_secs(10), || {
        watches.lock().unwrap().len() >= 4
    })
    .await;
    assert!(
        retried.is_some(),
        "retried: {} watches",
        watches.lock().unwrap().len()
    );
    let times = watches.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().take(3).enumerate() {
        let delay = Duration::from_millis(100 << i);
        // 5 ms for the timer's rounding.
        assert!(
            *gap + Duration::from_millis(5) >= delay,
            "retry {i} waited {gap:?}, less than its backoff of {delay:?}: {gaps:?}"
        );
    }
}

#[tokio::test]
async fn a_health_stream_that_delivered_is_retried_at_once() {
    let (addr, watches) = odd_health_server(Behaviour::ServingThenEnd).await;
    // A backoff of a minute: with it, the second watch would come a minute
    // after the first.
    let backoff = BackoffConfig::default().initial(Duration::from_secs(60));
    let sub = spawn(addr, SubchannelConfig::default().backoff(backoff));
    // Each stream delivered SERVING, so each retry goes at once.
    let retried = support::wait_for(Duration::from_secs(10), || {
        watches.lock().unwrap().len() >= 5
    })
    .await;
    let n = watches.lock().unwrap().len();
    assert!(retried.is_some(), "only {n} watches in 10 s");
    drop(sub);
}

#[tokio::test]
async fn an_unknown_health_value_is_not_serving() {
    let (addr, _) = odd_health_server(Behaviour::Status(7)).await;
    let sub = spawn(addr, SubchannelConfig::default());
    let seen = until(&sub, Duration::from_secs(3), |s| {
        matches!(
            s,
            SubchannelState::NotServing(NotServingReason::Health(HealthStatus::Unrecognized(7)))
        )
    })
    .await;
    assert!(seen.is_some(), "{}", sub.state());
    assert_eq!(
        sub.status().last_health(),
        Some(HealthStatus::Unrecognized(7))
    );
}

#[tokio::test]
async fn a_restarted_server_on_the_same_address_is_reconnected() {
    let backend = Backend::start("a", loopback(5, 0)).await;
    let addr = backend.addr;
    let sub = spawn(addr, SubchannelConfig::default().backoff(fast_backoff()));
    serving(&sub).await;

    backend.kill().await;
    let down = until(&sub, Duration::from_secs(3), |s| !s.is_serving()).await;
    assert!(down.is_some(), "a killed backend leaves SERVING");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        matches!(sub.state(), SubchannelState::TransientFailure(_)),
        "{}",
        sub.state()
    );
    assert_eq!(sub.state().label(), "connect refused");

    let _backend = Backend::start("a-again", addr).await;
    let back = until(&sub, Duration::from_secs(3), SubchannelState::is_serving).await;
    assert!(back.is_some(), "reconnected: {}", sub.state());
    let mut client = EchoClient::new(sub.clone());
    let reply = client
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().backend, "a-again");
}

#[tokio::test]
async fn max_age_recycles_under_load_without_failing_a_call() {
    support::init_tracing();
    let backend = Backend::start("a", loopback(6, 0)).await;
    let config = SubchannelConfig::default()
        .max_connection_age(Duration::from_millis(400))
        .max_connection_age_grace(Duration::from_secs(5));
    let sub = spawn(backend.addr, config);
    serving(&sub).await;
    let first = sub.status().connected_at().expect("a serving connection");
    let (ok, failed, errors) = load(&sub, 16, Duration::from_secs(3)).await;
    assert_eq!(
        failed,
        0,
        "no call fails because of a recycle: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 1000, "load ran: {ok} calls");
    let status = sub.status();
    assert!(status.state().is_serving());
    let connected = status.connected_at().expect("a serving connection");
    assert!(connected > first, "the connection was replaced under load");
}

#[tokio::test]
async fn server_goaway_under_load_fails_no_call() {
    support::init_tracing();
    let options = Options {
        max_connection_age: Some(Duration::from_millis(300)),
        ..Options::default()
    };
    let backend = Backend::start_with("a", loopback(7, 0), options).await;
    let sub = spawn(
        backend.addr,
        SubchannelConfig::default().backoff(fast_backoff()),
    );
    serving(&sub).await;
    let (ok, failed, errors) = load(&sub, 16, Duration::from_secs(3)).await;
    assert_eq!(
        failed,
        0,
        "server GOAWAYs fail no call: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 1000, "load ran: {ok} calls");
}

#[tokio::test]
async fn too_many_pings_doubles_the_keepalive_interval() {
    support::init_tracing();
    let backend = Backend::start("a", loopback(8, 0)).await;
    let proxy = Proxy::start(loopback(8, 0), backend.addr).await;
    let config = SubchannelConfig::default()
        .http2_keep_alive_interval(Duration::from_secs(10))
        .backoff(fast_backoff());
    let sub = spawn(proxy.addr, config);
    serving(&sub).await;
    assert_eq!(
        sub.http2_keep_alive_interval(),
        Some(Duration::from_secs(10))
    );

    proxy.send_too_many_pings();
    // The proxy injects at the next server frame: a call makes one.
    let mut client = EchoClient::new(sub.clone());
    let _ = client
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await;
    let doubled = support::wait_for(Duration::from_secs(3), || {
        sub.http2_keep_alive_interval() == Some(Duration::from_secs(20))
    })
    .await;
    assert!(
        doubled.is_some(),
        "interval: {:?}",
        sub.http2_keep_alive_interval()
    );
    serving(&sub).await;
    let reply = client
        .unary(EchoRequest {
            message: "y".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().backend, "a");
    assert!(
        proxy.state.accepted.load(Ordering::SeqCst) >= 2,
        "it reconnected"
    );
}

#[tokio::test]
async fn a_silent_peer_leaves_rotation_within_the_liveness_bound() {
    let backend = Backend::start("a", loopback(9, 0)).await;
    let proxy = Proxy::start(loopback(9, 0), backend.addr).await;
    let interval = Duration::from_secs(1);
    let timeout = Duration::from_secs(1);
    let config = SubchannelConfig::default()
        .liveness_interval(Some(interval))
        .liveness_timeout(timeout)
        .connect_timeout(Duration::from_millis(500))
        .backoff(fast_backoff());
    let sub = spawn(proxy.addr, config);
    serving(&sub).await;
    proxy.go_silent(true);
    let took = until(&sub, Duration::from_secs(10), |s| !s.is_serving()).await;
    let took = took.expect("a silent peer leaves SERVING");
    // The documented bound, interval + timeout, and 0.7 s for a busy
    // machine: less than the interval, so a probe that came a round late
    // would still fail this.
    assert!(
        took <= interval + timeout + Duration::from_millis(700),
        "took {took:?}"
    );
    assert_eq!(sub.state().label(), "no liveness answer");

    proxy.go_silent(false);
    let back = until(&sub, Duration::from_secs(5), SubchannelState::is_serving).await;
    assert!(
        back.is_some(),
        "back after the silence ends: {}",
        sub.state()
    );
}

#[tokio::test]
async fn a_peer_that_never_speaks_http2_times_out_then_backs_off() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let times = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            times.lock().unwrap().push(Instant::now());
            held.push(socket);
        }
    });
    // No jitter, so each attempt's start has an exact earliest time.
    let config = SubchannelConfig::default()
        .connect_timeout(Duration::from_millis(300))
        .backoff(
            BackoffConfig::default()
                .initial(Duration::from_millis(300))
                .jitter(0.0),
        );
    let sub = spawn(addr, config);
    let failed = until(&sub, Duration::from_secs(2), |s| {
        matches!(s, SubchannelState::TransientFailure(_))
    })
    .await;
    assert!(failed.is_some(), "{}", sub.state());
    assert_eq!(sub.state().label(), "connect timed out");
    let error = sub.last_error().unwrap();
    assert_eq!(error.kind(), ErrorKind::Connect);
    assert!(
        error
            .to_string()
            .contains("did not answer within the connect timeout"),
        "{error}"
    );
    let three = support::wait_for(Duration::from_secs(10), || {
        accepted.lock().unwrap().len() >= 3
    })
    .await;
    assert!(three.is_some(), "it keeps trying");
    let times = accepted.lock().unwrap().clone();
    // An attempt gets max(connect timeout, backoff): 0.3 s, then 0.48 s;
    // each is followed by its backoff, 0.3 s, then 0.48 s. So the attempts
    // start at least 0.6 s and 0.96 s apart: it backs off, never hammers.
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, least) in gaps.iter().zip([600, 960]) {
        assert!(
            *gap + Duration::from_millis(10) >= Duration::from_millis(least),
            "attempts too close: {gaps:?}"
        );
    }
    silent.abort();
}

#[tokio::test]
async fn a_refused_connect_is_a_transient_failure() {
    let port = support::echo::free_port();
    let sub = spawn(loopback(1, port), SubchannelConfig::default());
    let failed = until(&sub, Duration::from_secs(2), |s| {
        matches!(s, SubchannelState::TransientFailure(_))
    })
    .await;
    assert!(failed.is_some());
    assert_eq!(sub.state().label(), "connect refused");
    assert!(
        sub.state().to_string().starts_with(&format!(
            "TRANSIENT_FAILURE (connecting to 127.0.0.1:{port} failed"
        )),
        "{}",
        sub.state()
    );
}

#[tokio::test]
async fn calls_through_a_subchannel_wait_then_fail_unavailable() {
    let port = support::echo::free_port();
    let sub = spawn(loopback(1, port), SubchannelConfig::default())
        .ready_timeout(Duration::from_millis(300));
    let mut client = EchoClient::new(sub.clone());
    let started = Instant::now();
    let status = client
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        status.message().contains("is not serving"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn bad_configuration_is_refused() {
    let endpoint = Endpoint::new(loopback(1, 1));
    let cases = [
        (
            SubchannelConfig::default().http2_keep_alive_interval(Duration::from_secs(1)),
            "http2_keep_alive_interval must be at least 10s (gRFC A8), got 1s",
        ),
        (
            SubchannelConfig::default().connect_timeout(Duration::ZERO),
            "connect_timeout must be above zero",
        ),
        (
            SubchannelConfig::default().liveness_interval(Some(Duration::ZERO)),
            "liveness_interval must be above zero",
        ),
        (
            SubchannelConfig::default().authority("bad authority"),
            "authority \"bad authority\" is not valid: invalid uri character",
        ),
    ];
    for (config, what) in cases {
        let err = Subchannel::spawn(endpoint.clone(), config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert_eq!(err.to_string(), format!("invalid configuration: {what}"));
    }
}
