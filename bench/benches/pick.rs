//! Pick cost: `poll_ready` + `call` through healthlb's picker, for each
//! policy (round robin, least request, peak EWMA, weighted round robin
//! with weights 1 to 4, ring hash with a new key each call), over 1, 10, 100, 1000
//! and 10,000 SERVING endpoints, against no-op services, next to tower's
//! `p2c::Balance` (the balancer under tonic's `balance_list`) over the same
//! services. healthlb's cost must be flat in the number of endpoints. The
//! no-op endpoints report no calls in flight and no latency, so the
//! policies' cost here is their sampling, not the atomic loads of a real
//! endpoint's counters.
//!
//! `cargo bench --bench pick`

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use healthlb::Policy;
use healthlb::internals::Picked;
use tower::Service;
use tower::discover::ServiceList;

/// A service that does nothing.
#[derive(Clone, Copy)]
struct Noop;

impl Service<u32> for Noop {
    type Response = u32;
    type Error = Infallible;
    type Future = Ready<Result<u32, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> Self::Future {
        ready(Ok(request))
    }
}

impl tower::load::Load for Noop {
    type Metric = u32;
    fn load(&self) -> u32 {
        0
    }
}

/// One routed call: poll_ready, then call, as a tonic client does.
fn route<S: Service<u32>>(service: &mut S, cx: &mut Context<'_>) -> Option<S::Future> {
    match service.poll_ready(cx) {
        Poll::Ready(Ok(())) => Some(service.call(black_box(7))),
        _ => None,
    }
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let mut cx = Context::from_waker(Waker::noop());
    let policies = [
        ("healthlb", Policy::RoundRobin),
        ("healthlb_least_request", Policy::least_request(2)),
        ("healthlb_peak_ewma", Policy::peak_ewma()),
        (
            "healthlb_weighted_round_robin",
            Policy::weighted_round_robin(),
        ),
        (
            "healthlb_ring_hash",
            Policy::ring_hash("x-user").expect("a header"),
        ),
    ];
    for n in [1usize, 10, 100, 1000, 10_000] {
        for (name, policy) in &policies {
            let mut healthlb = Picked::new(vec![Noop; n], policy).expect("at least one endpoint");
            group.bench_with_input(BenchmarkId::new(*name, n), &n, |b, _| {
                b.iter(|| black_box(route(&mut healthlb, &mut cx)))
            });
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let mut p2c = tower::balance::p2c::Balance::new(ServiceList::new(vec![Noop; n]));
        // Let p2c discover and ready every service first.
        let _ = p2c.poll_ready(&mut cx);
        group.bench_with_input(BenchmarkId::new("tower_p2c", n), &n, |b, _| {
            b.iter(|| black_box(route(&mut p2c, &mut cx)))
        });
    }
    group.finish();
}

/// Building gRFC A42's ring (4096 entries at most, the default cap) over
/// N endpoints, as the balancer does when the endpoint set changes.
fn ring_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_build");
    let config = healthlb::RingHash::new("x-user").expect("a header");
    for n in [4usize, 100, 1000, 10_000] {
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| black_box(healthlb::internals::ring_build(n, &config)))
        });
    }
    group.finish();
}

/// The `metrics` feature's work per unary call (frame counting of request
/// and response, three counter increments), into a Prometheus recorder.
fn metrics_per_call(c: &mut Criterion) {
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    let per_call = healthlb::internals::PerCall::new("dns:///echo.bench.local:50051");
    // An echo request and reply as they go over the wire: prefix + message.
    let request = [0u8, 0, 0, 0, 7, 10, 5, b'b', b'e', b'n', b'c', b'h'];
    let response = [
        0u8, 0, 0, 0, 11, 10, 5, b'b', b'e', b'n', b'c', b'h', 18, 2, b'b', b'2',
    ];
    c.bench_function("metrics_per_unary_call", |b| {
        b.iter(|| per_call.call(black_box(&request), black_box(&response)))
    });
}

criterion_group!(benches, pick, ring_build, metrics_per_call);
criterion_main!(benches);
