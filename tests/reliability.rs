//! Reliability under failure: each scenario runs 32 concurrent callers
//! through one `LbChannel` against 4 echo backends with tonic-health, with
//! DNS from hickory-server in-process, on real time, bounded. Each counts
//! calls sent, succeeded and failed, and which backend served each one, and
//! prints a `RELIABILITY` line with its figures (see RELIABILITY.md).

use healthlb_testkit as support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use healthlb::subchannel::HealthStatus;
use healthlb::{BackoffConfig, LbChannel};
use support::dns::{TestDns, Zone};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, Options, free_port, loopback};
use support::proxy::Proxy;
use support::{connect_serving, ipv4s, is_serving, wait_for};
use tonic_health::ServingStatus;

const HOST: &str = "echo.test.local";
const CALLERS: usize = 32;

fn fast_backoff() -> BackoffConfig {
    BackoffConfig::default()
        .initial(Duration::from_millis(100))
        .max(Duration::from_secs(1))
}

fn publish(zone: &Zone, addrs: &[SocketAddr]) {
    zone.set_a(HOST, &ipv4s(addrs.iter().copied()), 1);
}

/// Calls from `CALLERS` tasks, counted, each recorded.
struct Load {
    stats: Arc<LoadStats>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Call>>>,
    started: Instant,
    /// For the report of a caller that doesn't end.
    channel: LbChannel,
}

#[derive(Default)]
struct LoadStats {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    by_backend: Mutex<HashMap<String, u64>>,
    /// When each caller's call in progress started.
    current: Mutex<HashMap<usize, Instant>>,
}

/// One call as its caller saw it: when it started and ended, and the
/// backend that answered or the error.
#[derive(Debug)]
struct Call {
    started: Instant,
    ended: Instant,
    outcome: Result<String, String>,
}

#[derive(Debug)]
struct Report {
    sent: u64,
    ok: u64,
    failed: u64,
    by_backend: HashMap<String, u64>,
    calls: Vec<Call>,
    /// The first errors, for messages.
    errors: Vec<String>,
    elapsed: Duration,
}

impl Load {
    /// Starts the callers; each call carries `deadline` when given.
    fn start(channel: &LbChannel, deadline: Option<Duration>) -> Self {
        let stats = Arc::new(LoadStats::default());
        let tasks = (0..CALLERS)
            .map(|caller| {
                let (channel, stats) = (channel.clone(), stats.clone());
                tokio::spawn(async move {
                    let mut client = EchoClient::new(channel);
                    let mut calls = Vec::new();
                    // Bounded in count as well as time.
                    for _ in 0..5_000_000u64 {
                        if stats.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let mut request = tonic::Request::new(EchoRequest {
                            message: "r".into(),
                        });
                        if let Some(d) = deadline {
                            request.set_timeout(d);
                        }
                        let started = Instant::now();
                        stats.current.lock().unwrap().insert(caller, started);
                        let outcome = match client.unary(request).await {
                            Ok(reply) => {
                                stats.ok.fetch_add(1, Ordering::Relaxed);
                                let backend = reply.into_inner().backend;
                                *stats
                                    .by_backend
                                    .lock()
                                    .unwrap()
                                    .entry(backend.clone())
                                    .or_default() += 1;
                                Ok(backend)
                            }
                            Err(status) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                Err(format!("{:?}: {}", status.code(), status.message()))
                            }
                        };
                        stats.current.lock().unwrap().remove(&caller);
                        calls.push(Call {
                            started,
                            ended: Instant::now(),
                            outcome,
                        });
                    }
                    calls
                })
            })
            .collect();
        Self {
            stats,
            tasks,
            started: Instant::now(),
            channel: channel.clone(),
        }
    }

    fn served_by(&self, backend: &str) -> u64 {
        self.stats
            .by_backend
            .lock()
            .unwrap()
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

    async fn finish(self) -> Report {
        self.stats.stop.store(true, Ordering::Relaxed);
        let mut calls = Vec::new();
        let stopped = Instant::now();
        for task in self.tasks {
            let Ok(done) = tokio::time::timeout(Duration::from_secs(10), task).await else {
                let stuck: Vec<String> = self
                    .stats
                    .current
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(caller, at)| format!("caller {caller}: a call {:?} old", at.elapsed()))
                    .collect();
                let endpoints: Vec<String> = self
                    .channel
                    .endpoints()
                    .iter()
                    .map(|e| e.to_string())
                    .collect();
                panic!(
                    "callers still busy {:?} after the stop: {stuck:?}; endpoints {endpoints:#?}",
                    stopped.elapsed()
                );
            };
            calls.extend(done.expect("a caller ends"));
        }
        let s = &self.stats;
        let errors = calls
            .iter()
            .filter_map(|c| c.outcome.as_ref().err().cloned())
            .take(20)
            .collect();
        Report {
            sent: calls.len() as u64,
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            by_backend: s.by_backend.lock().unwrap().clone(),
            calls,
            errors,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Report {
    fn print(&self, scenario: &str, extra: &str) {
        let mut backends: Vec<_> = self.by_backend.iter().collect();
        backends.sort();
        eprintln!(
            "RELIABILITY {scenario}: sent={} ok={} failed={} in {:.1}s; by backend {:?}; {extra}; first errors {:?}",
            self.sent,
            self.ok,
            self.failed,
            self.elapsed.as_secs_f64(),
            backends,
            &self.errors[..self.errors.len().min(3)]
        );
    }

    /// The calls that failed, with their errors.
    fn failures(&self) -> impl Iterator<Item = (&Call, &str)> {
        self.calls
            .iter()
            .filter_map(|c| c.outcome.as_ref().err().map(|e| (c, e.as_str())))
    }

    /// Calls `backend` answered that started at or after `at`.
    fn served_from(&self, backend: &str, at: Instant) -> usize {
        self.calls
            .iter()
            .filter(|c| c.started >= at && c.outcome.as_deref() == Ok(backend))
            .count()
    }
}

/// 4 backends on 127.0.0.`first`.. with one port, DNS, and a channel.
async fn cluster(first: u8, options: Options) -> (Vec<Backend>, TestDns, u16) {
    let port = free_port();
    let mut backends = Vec::new();
    for i in 0..4 {
        let n = first + i;
        backends
            .push(Backend::start_with(&format!("b{n}"), loopback(n, port), options.clone()).await);
    }
    let dns = TestDns::start().await;
    publish(
        &dns.zone(),
        &backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
    );
    (backends, dns, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_fails_no_call() {
    let (mut backends, dns, port) = cluster(60, Options::default()).await;
    let channel = connect_serving(
        LbChannel::builder(dns.target(HOST, port)).subchannels(|s| s.backoff(fast_backoff())),
        4,
    )
    .await;
    let load = Load::start(&channel, None);
    tokio::time::sleep(Duration::from_millis(300)).await;

    for i in 0..4u8 {
        let old = backends.remove(0);
        old.set_serving(false).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = 70 + i;
        backends.push(Backend::start(&format!("b{n}"), loopback(n, port)).await);
        publish(
            &dns.zone(),
            &backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
        );
        old.stop().await;
        let joined = wait_for(Duration::from_secs(3), || {
            is_serving(&channel, loopback(n, port))
        })
        .await;
        assert!(joined.is_some(), "b{n} joined");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;
    report.print("rolling deploy", "4 of 4 backends replaced");
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(
        report.by_backend.keys().any(|b| b == "b73"),
        "the last new backend served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_at_most_the_calls_in_flight() {
    let (mut backends, dns, port) = cluster(80, Options::default()).await;
    let channel = connect_serving(
        LbChannel::builder(dns.target(HOST, port)).subchannels(|s| s.backoff(fast_backoff())),
        4,
    )
    .await;
    let load = Load::start(&channel, None);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim = backends.remove(0);
    let addr = victim.addr;
    let killed = Instant::now();
    victim.kill().await;
    let out = wait_for(Duration::from_secs(3), || !is_serving(&channel, addr)).await;
    // Seen out of rotation no earlier than it left.
    let left = Instant::now();
    assert!(out.is_some(), "the crashed backend left rotation");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    let in_flight = report
        .calls
        .iter()
        .filter(|c| c.started < killed && c.ended >= killed)
        .count();
    let between = report
        .calls
        .iter()
        .filter(|c| c.started >= killed && c.started < left)
        .count();
    report.print(
        "crash",
        &format!(
            "calls in flight at the kill {in_flight}, started before it left rotation {between}, out {:?} after the kill",
            left - killed
        ),
    );
    // The promise: a crash fails only calls that were sent to the crashed
    // pod before it left rotation; none after.
    for (call, error) in report.failures() {
        assert!(
            error.contains(&addr.to_string()),
            "only calls to the crashed pod fail: {error}"
        );
        assert!(
            call.started < left,
            "a call started {:?} after the pod left rotation failed: {error}",
            call.started - left
        );
        assert!(call.ended >= killed, "it failed from the crash: {error}");
    }
    assert!(
        report.failed as usize <= in_flight + between,
        "{} failed; {in_flight} were in flight and {between} started before it left",
        report.failed
    );
}

/// Scenario 3 with the given liveness settings, or the defaults: (time out of
/// rotation, report).
async fn silent_peer(first: u8, liveness: Option<(Duration, Duration)>) -> (Duration, Report) {
    let port = free_port();
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(Backend::start(&format!("b{}", first + i), loopback(first + i, port)).await);
    }
    // The first backend is reached through a proxy that can black-hole it.
    let proxy = Proxy::start(loopback(first + 10, port), backends[0].addr).await;
    let mut addrs: Vec<SocketAddr> = backends[1..].iter().map(|b| b.addr).collect();
    addrs.push(proxy.addr);
    let dns = TestDns::start().await;
    publish(&dns.zone(), &addrs);
    let mut builder = LbChannel::builder(dns.target(HOST, port))
        .subchannels(|s| s.backoff(fast_backoff()))
        .connect_timeout(Duration::from_secs(2));
    // The defaults, 15 s and 15 s, are the documented bound.
    let (interval, timeout) =
        liveness.unwrap_or((Duration::from_secs(15), Duration::from_secs(15)));
    if let Some((interval, timeout)) = liveness {
        builder = builder.subchannels(|s| {
            s.liveness_interval(Some(interval))
                .liveness_timeout(timeout)
        });
    }
    let channel = connect_serving(builder, 4).await;
    // Callers carry a deadline, as production callers do.
    let load = Load::start(&channel, Some(Duration::from_millis(500)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.go_silent(true);
    let silenced = Instant::now();
    let bound = interval + timeout + Duration::from_secs(2);
    let out = wait_for(bound, || !is_serving(&channel, proxy.addr)).await;
    let took = silenced.elapsed();
    assert!(out.is_some(), "out of rotation within {bound:?}");
    let ok_before = load.stats.ok.load(Ordering::Relaxed);
    let going = wait_for(Duration::from_secs(5), || {
        load.stats.ok.load(Ordering::Relaxed) > ok_before + 100
    })
    .await;
    assert!(going.is_some(), "calls go on via the others");
    drop(proxy);
    (took, load.finish().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_leaves_rotation_within_the_bound_shortened() {
    let (interval, timeout) = (Duration::from_millis(500), Duration::from_millis(500));
    let (took, report) = silent_peer(90, Some((interval, timeout))).await;
    report.print(
        "silent peer (liveness 0.5 s + 0.5 s)",
        &format!("out of rotation after {took:?}"),
    );
    assert!(
        took <= interval + timeout + Duration::from_secs(1),
        "within interval + timeout, and a second for a busy machine: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_leaves_rotation_within_the_default_bound() {
    let (took, report) = silent_peer(110, None).await;
    report.print(
        "silent peer (defaults 15 s + 15 s)",
        &format!("out of rotation after {took:?}"),
    );
    assert!(
        took <= Duration::from_secs(32),
        "within the documented 30 s: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_client_max_age_under_load_fail_only_calls_a_closing_server_drops() {
    let options = Options {
        max_connection_age: Some(Duration::from_secs(1)),
        ..Options::default()
    };
    let (backends, dns, port) = cluster(130, options).await;
    let channel = connect_serving(
        LbChannel::builder(dns.target(HOST, port)).subchannels(|s| {
            s.max_connection_age(Duration::from_millis(1500))
                .backoff(fast_backoff())
        }),
        4,
    )
    .await;
    let connects_before: u64 = channel
        .endpoints()
        .iter()
        .map(|e| e.connects + e.recycles)
        .sum();
    let load = Load::start(&channel, None);
    let recycled = wait_for(Duration::from_secs(20), || {
        let now: u64 = channel
            .endpoints()
            .iter()
            .map(|e| e.connects + e.recycles)
            .sum();
        now >= connects_before + 20
    })
    .await;
    let report = load.finish().await;
    let recycles: u64 = channel
        .endpoints()
        .iter()
        .map(|e| e.connects + e.recycles)
        .sum::<u64>()
        - connects_before;
    // Known gap (RELIABILITY.md): now and then tonic's server closes a
    // connection it sent GOAWAY on while calls it accepted are still open;
    // the client sees them end in a broken pipe and cannot know whether the
    // server ran them, so it doesn't retry. Every other failure is a bug.
    let broken_pipe = report
        .failures()
        .filter(|(_, e)| e.contains("connection error"))
        .count();
    report.print(
        "server GOAWAY + client max age",
        &format!("{recycles} new connections; failures from a server close under open calls: {broken_pipe}"),
    );
    assert!(recycled.is_some(), "20 recycles happened: {recycles}");
    for (_, error) in report.failures() {
        assert!(
            error.contains("connection error"),
            "only server closes under open calls fail: {error}"
        );
    }
    assert!(
        report.failed <= CALLERS as u64,
        "at most one connection's calls: {:?}",
        report.errors
    );
    drop(backends);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_keeps_the_set_and_the_restart_is_picked_up() {
    let (backends, dns, port) = cluster(140, Options::default()).await;
    let spare = Backend::start("b150", loopback(150, port)).await;
    let dns_addr = dns.addr();
    let channel = connect_serving(LbChannel::builder(dns.target(HOST, port)), 4).await;
    let load = Load::start(&channel, None);

    let zone = dns.stop().await;
    let outage = Instant::now();
    let mut kept = true;
    while outage.elapsed() < Duration::from_secs(10) {
        kept &= channel
            .endpoints()
            .iter()
            .filter(|e| e.state.is_serving())
            .count()
            == 4;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back, with a changed set: the spare replaces the first backend.
    let mut addrs: Vec<SocketAddr> = backends[1..].iter().map(|b| b.addr).collect();
    addrs.push(spare.addr);
    publish(&zone, &addrs);
    let dns = TestDns::serve(dns_addr, zone).await;
    let restarted = Instant::now();
    let picked = wait_for(Duration::from_secs(5), || load.served_by("b150") > 0).await;
    let took = restarted.elapsed();
    let report = load.finish().await;
    report.print(
        "DNS outage 10 s",
        &format!("set kept during the outage: {kept}; change served {took:?} after the restart"),
    );
    assert!(kept, "the last good set was kept");
    assert!(
        picked.is_some() && took <= Duration::from_secs(3),
        "picked up within TTL + 2 s: {took:?}"
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    drop(dns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_settles_without_leaks() {
    let (backends, dns, port) = cluster(160, Options::default()).await;
    let channel = connect_serving(LbChannel::builder(dns.target(HOST, port)), 4).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // Baselines without load: the load's own tasks come and go.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tasks_before = metrics.num_alive_tasks();
    let load = Load::start(&channel, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss();

    let flapper = &backends[0];
    let start = Instant::now();
    let mut serving = true;
    let mut flips = 0;
    while start.elapsed() < Duration::from_secs(5) {
        serving = !serving;
        flapper.set_serving(serving).await;
        flips += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // End on UNKNOWN, an answer the flips never gave: once the client shows
    // it, every flip before it has arrived too (a Watch stream is ordered),
    // so no SERVING is still on its way. From then on it must get no call.
    flapper.set_status("", ServingStatus::Unknown).await;
    let settled = wait_for(Duration::from_secs(5), || {
        channel.endpoints().iter().any(|e| {
            e.addr == flapper.addr && e.last_health == Some(HealthStatus::Unknown) && !e.in_rotation
        })
    })
    .await;
    assert!(
        settled.is_some(),
        "it ends out of rotation: {:?}",
        support::states(&channel)
    );
    // Seen out of rotation no earlier than it left.
    let settled_at = Instant::now();
    // Calls that took their slot before the change finish; after that,
    // none may start.
    let idle = wait_for(Duration::from_secs(5), || {
        channel
            .endpoints()
            .iter()
            .any(|e| e.addr == flapper.addr && e.calls_in_flight == 0)
    })
    .await;
    assert!(idle.is_some(), "its calls in flight finished");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss();
    let report = load.finish().await;
    let leaked_calls = report.served_from(&flapper.name, settled_at);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks_after = metrics.num_alive_tasks();
    report.print(
        "flapping every 5 ms for 5 s",
        &format!(
            "{flips} flips; calls after it settled NOT_SERVING {leaked_calls}; tasks {tasks_before} → {tasks_after}; RSS {} → {} KiB",
            rss_before / 1024,
            rss_after / 1024
        ),
    );
    assert_eq!(
        leaked_calls, 0,
        "no call that started once it was out of rotation reached it"
    );
    assert!(
        tasks_after <= tasks_before,
        "tasks back to baseline: {tasks_before} → {tasks_after}"
    );
    assert!(
        rss_after < rss_before + 64 * 1024 * 1024,
        "memory flat: {rss_before} → {rss_after}"
    );
    assert!(
        channel
            .endpoints()
            .iter()
            .filter(|e| e.state.is_serving())
            .count()
            == 3,
        "the final state is right"
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_pings_doubles_the_interval_and_it_keeps_serving() {
    let port = free_port();
    let backend = Backend::start("b170", loopback(170, port)).await;
    let others = [
        Backend::start("b171", loopback(171, port)).await,
        Backend::start("b172", loopback(172, port)).await,
    ];
    let proxy = Proxy::start(loopback(173, port), backend.addr).await;
    let dns = TestDns::start().await;
    publish(&dns.zone(), &[proxy.addr, others[0].addr, others[1].addr]);
    let channel = connect_serving(
        LbChannel::builder(dns.target(HOST, port))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .subchannels(|s| s.backoff(fast_backoff())),
        3,
    )
    .await;
    let interval = |c: &LbChannel| {
        c.endpoints()
            .into_iter()
            .find(|e| e.addr == proxy.addr)
            .and_then(|e| e.http2_keep_alive_interval)
    };
    assert_eq!(interval(&channel), Some(Duration::from_secs(10)));
    let load = Load::start(&channel, None);
    proxy.send_too_many_pings();
    let doubled = wait_for(Duration::from_secs(3), || {
        interval(&channel) == Some(Duration::from_secs(20))
    })
    .await;
    assert!(doubled.is_some(), "doubled: {:?}", interval(&channel));
    let back = wait_for(Duration::from_secs(3), || is_serving(&channel, proxy.addr)).await;
    let before = load.served_by("b170");
    let served_again = wait_for(Duration::from_secs(3), || {
        load.served_by("b170") > before + 10
    })
    .await;
    let report = load.finish().await;
    report.print("too_many_pings", "interval 10 s → 20 s");
    assert!(
        back.is_some() && served_again.is_some(),
        "it keeps serving after reconnecting"
    );
    // The test proxy claims no stream was processed (last stream 0) and
    // closes at once: calls not yet answered are sent again, but one whose
    // response had begun fails. A connection that fails under a call is
    // UNAVAILABLE, as grpc-go reports it, naming the endpoint and why.
    assert!(
        report.failed <= CALLERS as u64,
        "at most the calls in flight: {:?}",
        report.errors
    );
    for (_, error) in report.failures() {
        assert!(
            error.starts_with("Unavailable")
                && error.contains(&proxy.addr.to_string())
                && error.contains("too_many_pings"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn dns_answers_too_large_for_dns_or_over_the_cap_neither_hang_nor_break() {
    // 10,000 A records take about 160 KB, more than a DNS message can hold
    // (64 KiB, over TCP too): the lookup fails, and a call says so at once.
    let dns = TestDns::start().await;
    dns.zone().set_a(HOST, &support::dns::many_ips(10_000), 1);
    let target = dns.target(HOST, 50051);
    let channel = LbChannel::builder(target.clone())
        .fail_fast(true)
        .build()
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(15) && !last.contains("resolution is failing") {
        let status = support::within(
            Duration::from_secs(1),
            "a fail-fast call",
            client.unary(EchoRequest::default()),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        last = status.message().to_owned();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("RELIABILITY 10k records: {last}");
    assert!(
        last.contains("resolution is failing") && last.contains(&target),
        "the call names the target and the failing lookup: {last}"
    );
    assert!(channel.endpoints().is_empty());

    // 2,000 records fit over TCP (about 31 bytes each here; 3,000 don't):
    // the cap keeps 1,024 of them, the same ones for the same seed.
    let many = support::dns::many_ips(2_000);
    dns.zone().set_a("many.test.local", &many, 1);
    let capped = |seed| {
        LbChannel::builder(dns.target("many.test.local", 50051))
            .resolution(|r| r.subset_seed(seed))
            .connect_timeout(Duration::from_millis(200))
            .build()
            .unwrap()
    };
    let (a, b) = (capped(7), capped(7));
    let kept = wait_for(Duration::from_secs(10), || {
        a.endpoints().len() == 1024 && b.endpoints().len() == 1024
    })
    .await;
    assert!(
        kept.is_some(),
        "{} and {} endpoints",
        a.endpoints().len(),
        b.endpoints().len()
    );
    let addrs = |c: &LbChannel| c.endpoints().iter().map(|e| e.addr).collect::<Vec<_>>();
    assert_eq!(addrs(&a), addrs(&b), "the same seed keeps the same subset");
    eprintln!("RELIABILITY 2,000 records: 1,024 kept, the same for the same seed");
}

#[tokio::test]
async fn garbage_overlong_and_looping_names_give_clear_errors() {
    let long_label = "a".repeat(64);
    let long_name = format!("{}.test", ["abcdefghij"; 30].join("."));
    for (target, what) in [
        (format!("dns:///{long_label}.test:50051"), "label"),
        (format!("dns:///{long_name}:50051"), "at most 253"),
        ("dns:///bad_char$.test:50051".to_owned(), "bad_char$"),
        ("dns:///:50051".to_owned(), "host"),
    ] {
        let err = LbChannel::builder(target.clone()).build().unwrap_err();
        assert!(err.to_string().contains(&target), "{err}");
        assert!(err.to_string().contains(what), "{target}: {err}");
    }
    // A CNAME loop: not a hang, an empty channel that says why.
    let dns = TestDns::start().await;
    dns.zone()
        .set_cname("loop-a.test.local", "loop-b.test.local", 1);
    dns.zone()
        .set_cname("loop-b.test.local", "loop-a.test.local", 1);
    let channel = LbChannel::builder(dns.target("loop-a.test.local", 50051))
        .ready_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let mut client = EchoClient::new(channel);
    let status = support::within(
        Duration::from_secs(5),
        "a call",
        client.unary(EchoRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("CNAME"), "{}", status.message());
}

/// Ten minutes of load with a backend flapping every second and DNS
/// changing every 5 s; RSS and task count sampled every 10 s stay flat.
/// `cargo test --test reliability -- --ignored soak`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for 10 minutes"]
async fn soak() {
    let minutes = std::env::var("HEALTHLB_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10u64);
    let (backends, dns, port) = cluster(180, Options::default()).await;
    let extra = Backend::start("b190", loopback(190, port)).await;
    let channel = connect_serving(LbChannel::builder(dns.target(HOST, port)), 4).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let load = Load::start(&channel, None);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut tick = 0u64;
    while start.elapsed() < Duration::from_secs(60 * minutes) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        backends[0].set_serving(tick.is_multiple_of(2)).await;
        if tick.is_multiple_of(5) {
            let mut addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
            if tick.is_multiple_of(10) {
                addrs.push(extra.addr);
            }
            publish(&dns.zone(), &addrs);
        }
        if tick.is_multiple_of(10) {
            samples.push((metrics.num_alive_tasks(), rss()));
        }
    }
    let report = load.finish().await;
    report.print("soak", &format!("(tasks, RSS) every 10 s: {samples:?}"));
    let (first_tasks, first_rss) = samples[1];
    let (last_tasks, last_rss) = samples[samples.len() - 1];
    assert!(last_tasks <= first_tasks + 4, "tasks flat: {samples:?}");
    assert!(
        last_rss < first_rss + 32 * 1024 * 1024,
        "RSS flat: {samples:?}"
    );
}
