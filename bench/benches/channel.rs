//! The real pick path: `LbChannel`'s own `poll_ready` + `call`, as a tonic
//! client makes them, then the unsent call dropped, for each policy (round
//! robin, least request, peak EWMA, each with outlier ejection on, the
//! default) over 1, 100, 1000 and 10,000 SERVING endpoints. Unlike the
//! `pick` bench, this is the whole channel: the picker's snapshot, the
//! endpoint's readiness, the service config's lookup, the call's deadline
//! and its request recording, and the call's future.
//!
//! The endpoints are real: tonic servers with tonic-health in child
//! processes (`servers/mod.rs`), each reached over its own loopback
//! connection. A call built and dropped unsent costs them nothing, so these
//! are no-op connections for the call, and the figure is the client's.
//!
//! `cargo bench --bench channel` (`HEALTHLB_BENCH_SIZES`, say `1,10000`,
//! replaces the endpoint counts.)

use healthlb_bench::servers;
use healthlb_testkit as support;

use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion};
use healthlb::{LbChannel, Policy};
use tonic::body::Body;
use tower::Service;

const SIZES: [usize; 4] = [1, 100, 1000, 10_000];
/// Under `cargo test --all-targets`: small sizes only.
const SMOKE_SIZES: [usize; 2] = [1, 10];

fn request() -> http::Request<Body> {
    let mut request = http::Request::new(Body::empty());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static("/echo.Echo/Unary");
    request.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    request
        .headers_mut()
        .insert("te", http::HeaderValue::from_static("trailers"));
    request
}

/// Waits up to 60 s until all `n` endpoints of `channel` are SERVING.
async fn all_serving(channel: &LbChannel, n: usize) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let serving = channel
            .endpoints()
            .iter()
            .filter(|e| e.state.is_serving())
            .count();
        if serving == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not all {n} endpoints became SERVING within 60 s");
}

fn main() {
    if servers::serve_if_child() {
        return;
    }
    // `HEALTHLB_BENCH_SIZES`: a comma-separated list instead of the sizes.
    let chosen = support::env_list("HEALTHLB_BENCH_SIZES", 1..=20_000);
    let sizes: &[usize] = match (chosen.is_empty(), support::benchmarking()) {
        (false, _) => &chosen,
        (true, true) => &SIZES,
        (true, false) => &SMOKE_SIZES,
    };
    let most = sizes.iter().copied().max().unwrap_or(1);
    let servers = servers::Servers::start(most, support::echo::free_port());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let policies = [
        ("round_robin", Policy::RoundRobin),
        ("least_request", Policy::least_request(2)),
        ("peak_ewma", Policy::peak_ewma()),
    ];
    let mut group = criterion.benchmark_group("lb_channel_poll_ready_call");
    let mut cx = Context::from_waker(Waker::noop());
    for (name, policy) in policies {
        for &n in sizes {
            let mut channel = runtime.block_on(async {
                let channel = LbChannel::builder(servers.target(n))
                    .resolution(|r| r.max_endpoints(n))
                    .policy(policy.clone())
                    .build()
                    .expect("builds");
                all_serving(&channel, n).await;
                channel
            });
            let _entered = runtime.enter();
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_batched(
                    request,
                    |request| {
                        let ready = channel.poll_ready(&mut cx);
                        assert!(matches!(ready, Poll::Ready(Ok(()))));
                        drop(black_box(channel.call(request)));
                    },
                    BatchSize::SmallInput,
                )
            });
            drop(_entered);
            drop(channel);
        }
    }
    group.finish();
    drop(runtime);
    drop(servers);
    criterion.final_summary();
}
