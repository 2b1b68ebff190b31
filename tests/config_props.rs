//! Every duration and number setting of the builder, driven with arbitrary
//! values (0, 1 ns, `Duration::MAX`, huge counts, NaN): `build()` returns a
//! channel or a typed error that names the setting, and a call then ends
//! within a bounded time. Nothing panics, in the caller or in any of the
//! channel's background tasks.

use healthlb_testkit as support;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use healthlb::{BackoffConfig, Builder, ErrorKind, LbChannel};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};

/// Panics anywhere in the process, background tasks included.
static PANICS: AtomicUsize = AtomicUsize::new(0);
/// Cases that built a channel, and so made a call.
static BUILT: AtomicUsize = AtomicUsize::new(0);

/// One backend for every case, on its own runtime.
fn backend() -> &'static std::net::SocketAddr {
    static BACKEND: OnceLock<(tokio::runtime::Runtime, Backend)> = OnceLock::new();
    let (_, backend) = BACKEND.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let backend = runtime.block_on(Backend::start("props", loopback(120, free_port())));
        (runtime, backend)
    });
    &backend.addr
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(Duration::from_millis(300)),
        Just(Duration::from_secs(10)),
        Just(Duration::from_secs(u64::MAX / 2)),
        Just(Duration::MAX),
        any::<u64>().prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_secs),
    ]
}

fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(2),
        Just(usize::MAX),
        any::<usize>(),
    ]
}

fn factor() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(0.5),
        Just(1.0),
        Just(1.6),
        Just(1e308),
        Just(f64::INFINITY),
        Just(f64::NAN),
        Just(-1.0),
        any::<f64>(),
    ]
}

/// Most settings keep their default in a case, so the ones set are tried
/// one to a few at a time, and most cases build.
const SET: f64 = 0.08;

fn backoff() -> impl Strategy<Value = Option<BackoffConfig>> {
    proptest::option::weighted(
        SET,
        (duration(), factor(), factor(), duration()).prop_map(
            |(initial, multiplier, jitter, max)| {
                BackoffConfig::default()
                    .initial(initial)
                    .multiplier(multiplier)
                    .jitter(jitter)
                    .max(max)
            },
        ),
    )
}

/// One arbitrary value, or the default, for every duration and number
/// setter.
#[derive(Debug, Clone)]
struct Settings {
    durations: Vec<Option<Duration>>,
    counts: Vec<Option<usize>>,
    backoffs: Vec<Option<BackoffConfig>>,
}

const DURATION_SETTERS: usize = 17;
const COUNT_SETTERS: usize = 6;

fn settings() -> impl Strategy<Value = Settings> {
    (
        proptest::collection::vec(
            proptest::option::weighted(SET, duration()),
            DURATION_SETTERS,
        ),
        proptest::collection::vec(proptest::option::weighted(SET, count()), COUNT_SETTERS),
        proptest::collection::vec(backoff(), 2),
    )
        .prop_map(|(durations, counts, backoffs)| Settings {
            durations,
            counts,
            backoffs,
        })
}

fn apply(mut b: Builder, s: &Settings) -> Builder {
    let d = |i: usize| s.durations[i];
    macro_rules! set {
        ($i:expr, $b:ident => $e:expr) => {
            if let Some($b) = d($i) {
                b = $e;
            }
        };
    }
    set!(0, v => b.ready_timeout(v));
    set!(1, v => b.connect_deadline(v));
    set!(2, v => b.resolution(|r| r.min_refresh(v)));
    set!(3, v => b.resolution(|r| r.max_refresh(v)));
    set!(4, v => b.resolution(|r| r.dns_timeout(v)));
    set!(5, v => b.connect_timeout(v));
    set!(6, v => b.http2_keep_alive_interval(v));
    set!(7, v => b.keep_alive_timeout(v));
    set!(8, v => b.tcp_keepalive(Some(v)));
    set!(9, v => b.subchannels(|s| s.liveness_interval(Some(v))));
    set!(10, v => b.subchannels(|s| s.liveness_timeout(v)));
    set!(11, v => b.subchannels(|s| s.max_connection_age(v)));
    set!(12, v => b.subchannels(|s| s.max_connection_age_grace(v)));
    set!(13, v => b.subchannels(|s| s.extra_connection_idle_timeout(v)));
    set!(14, v => b.connect_deadline(v));
    set!(15, v => b.timeout(v));
    set!(16, v => b.rate_limit(s.counts[4].unwrap_or(10) as u64, v));
    if let Some(n) = s.counts[0] {
        b = b.resolution(|r| r.max_endpoints(n));
    }
    if let Some(n) = s.counts[1] {
        b = b.subchannels(|s| s.max_connections_per_endpoint(n));
    }
    if let Some(n) = s.counts[2] {
        b = b.concurrency_limit(n);
    }
    if let Some(n) = s.counts[3] {
        b = b.initial_stream_window_size(u32::try_from(n).unwrap_or(u32::MAX));
    }
    if let Some(n) = s.counts[5] {
        b = b
            .initial_connection_window_size(u32::try_from(n).unwrap_or(u32::MAX))
            .http2_adaptive_window(n % 2 == 0)
            .tcp_nodelay(n % 3 == 0);
    }
    if let Some(backoff) = s.backoffs[0] {
        b = b.subchannels(|s| s.backoff(backoff));
    }
    if let Some(backoff) = s.backoffs[1] {
        b = b.resolution(|r| r.backoff(backoff));
    }
    b
}

/// One case: build, and if it built, one call with a 500 ms deadline that
/// must end within 5 s.
fn case(s: &Settings) -> Result<(), TestCaseError> {
    let addr = *backend();
    let panics = PANICS.load(Ordering::SeqCst);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let outcome = runtime.block_on(async {
        let built = apply(LbChannel::builder(format!("ipv4:{addr}")), s).build();
        let channel = match built {
            Ok(channel) => channel,
            Err(error) => {
                prop_assert_eq!(error.kind(), ErrorKind::InvalidConfig, "{}", error);
                prop_assert!(
                    error.to_string().starts_with("invalid configuration: "),
                    "{}",
                    error
                );
                return Ok(());
            }
        };
        BUILT.fetch_add(1, Ordering::SeqCst);
        let mut client = EchoClient::new(channel.clone());
        let mut request = tonic::Request::new(EchoRequest {
            message: "p".into(),
        });
        request.set_timeout(Duration::from_millis(500));
        let ended = tokio::time::timeout(Duration::from_secs(5), client.unary(request)).await;
        prop_assert!(
            ended.is_ok(),
            "the call did not end within 5 s with {:?}; endpoints: {:?}",
            s,
            channel
                .endpoints()
                .iter()
                .map(|e| format!("{} {} for {:?}", e.addr, e.state, e.state_for))
                .collect::<Vec<_>>()
        );
        // The background tasks keep running meanwhile, whatever the settings.
        tokio::time::sleep(Duration::from_millis(50)).await;
        prop_assert!(channel.endpoints().len() <= 1);
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    outcome?;
    prop_assert!(started.elapsed() < Duration::from_secs(10));
    prop_assert_eq!(PANICS.load(Ordering::SeqCst), panics, "a panic happened");
    Ok(())
}

#[test]
fn any_setting_builds_or_is_refused_and_calls_end() {
    let config = ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(failure) = runner.run(&settings(), |s| case(&s)) {
        panic!("{failure}");
    }
    // The strategy sets a few settings per case, so most cases build and
    // make their call rather than stop at a refused setting.
    let built = BUILT.load(Ordering::SeqCst);
    eprintln!("{built} of 96 cases built a channel and made a call");
    assert!(built >= 40, "only {built} of 96 cases built a channel");
}

/// Each duration setting at `Duration::MAX`, one at a time: a long setting
/// means "very long", so the channel must work as usual.
#[test]
fn each_duration_at_its_maximum_leaves_a_working_channel() {
    let addr = *backend();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for i in 0..DURATION_SETTERS {
        let mut durations = vec![None; DURATION_SETTERS];
        durations[i] = Some(Duration::MAX);
        let settings = Settings {
            durations,
            counts: vec![None; COUNT_SETTERS],
            backoffs: vec![None, None],
        };
        let panics = PANICS.load(Ordering::SeqCst);
        runtime.block_on(async {
            let built = apply(LbChannel::builder(format!("ipv4:{addr}")), &settings).build();
            let channel = match built {
                Ok(channel) => channel,
                // min_refresh above max_refresh's default: refused by name.
                Err(error) => {
                    assert!(
                        error.to_string().contains("min_refresh"),
                        "setter {i}: {error}"
                    );
                    return;
                }
            };
            let mut client = EchoClient::new(channel);
            let mut request = tonic::Request::new(EchoRequest {
                message: "m".into(),
            });
            request.set_timeout(Duration::from_secs(5));
            let reply = tokio::time::timeout(Duration::from_secs(10), client.unary(request))
                .await
                .unwrap_or_else(|_| panic!("setter {i}: the call hung"));
            assert_eq!(
                reply
                    .unwrap_or_else(|s| panic!("setter {i}: {s}"))
                    .into_inner()
                    .backend,
                "props"
            );
        });
        assert_eq!(PANICS.load(Ordering::SeqCst), panics, "setter {i} panicked");
    }
}
