//! Endpoint sources side by side in one run: a `kubernetes:` source
//! watching EndpointSlices (testkit's in-process API server) and a `dns:`
//! target with a 5 s TTL (CoreDNS's default), over the same real backends,
//! each under load from 4 callers:
//!
//! - scale-up: from the change (a slice update, a DNS record update) to
//!   the first call answered by the new pod;
//! - scale-down: calls that reach a pod after its endpoint turned
//!   terminating (Kubernetes) or left the record (DNS);
//! - rolling restart: failed calls while 3 pods are replaced one by one,
//!   each new pod listed before the old one turns terminating and stops.
//!
//! `cargo bench --bench sources`; `HEALTHLB_BENCH_REPS` sets the scale-up
//! repetitions (default 5). Under `cargo test`, one short round.

use healthlb_bench::peers;
use healthlb_testkit as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use healthlb::resolve::kubernetes::EndpointSlices;
use healthlb::{LbChannel, ServicePort};
use support::dns::TestDns;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};
use support::kube_api::{KubeApi, Pod, slice};

const HOST: &str = "echo.sources.local";
const CALLERS: usize = 4;

/// Callers that record which backend answered and how many calls failed.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    /// When a call was first answered by `watched`, as nanoseconds since
    /// `start`; 0 until then.
    first_answer: Arc<AtomicU64>,
    watched: Arc<std::sync::Mutex<String>>,
    start: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(channel: &LbChannel) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let first_answer = Arc::new(AtomicU64::new(0));
        let watched = Arc::new(std::sync::Mutex::new(String::new()));
        let start = Instant::now();
        let tasks = (0..CALLERS)
            .map(|_| {
                let channel = channel.clone();
                let (stop, failed) = (stop.clone(), failed.clone());
                let (first, watched) = (first_answer.clone(), watched.clone());
                tokio::spawn(async move {
                    let mut client = EchoClient::new(channel);
                    // Bounded in count as well as time (the caller stops it).
                    for _ in 0..10_000_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let reply = client.unary(EchoRequest {
                            message: "s".into(),
                        });
                        match reply.await {
                            Ok(r) => {
                                if r.into_inner().backend == *watched.lock().unwrap() {
                                    let at = start.elapsed().as_nanos() as u64;
                                    let _ = first.compare_exchange(
                                        0,
                                        at.max(1),
                                        Ordering::SeqCst,
                                        Ordering::SeqCst,
                                    );
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            failed,
            first_answer,
            watched,
            start,
            tasks,
        }
    }

    /// Starts watching for `backend`'s first answer.
    fn watch(&self, backend: &str) {
        self.first_answer.store(0, Ordering::SeqCst);
        *self.watched.lock().unwrap() = backend.to_owned();
    }

    /// Waits, up to `limit`, for the watched backend's first answer after
    /// `since`; how long it took.
    async fn first_answer_after(&self, since: Instant, limit: Duration) -> Option<Duration> {
        let done = support::wait_for(limit, || self.first_answer.load(Ordering::SeqCst) > 0).await;
        done?;
        let at = self.start + Duration::from_nanos(self.first_answer.load(Ordering::SeqCst));
        Some(at.saturating_duration_since(since))
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.failed.load(Ordering::Relaxed)
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("none within the limit".to_owned(), |d| {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    })
}

fn median(samples: &mut [Duration]) -> Option<Duration> {
    samples.sort();
    samples.get(samples.len() / 2).copied()
}

async fn kube_channel(api: &KubeApi) -> LbChannel {
    let config = kube::Config::new(api.url().parse().expect("a URL"));
    let client = kube::Client::try_from(config).expect("a client");
    let source = EndpointSlices::new(client, "default", "echo", ServicePort::Name("grpc".into()));
    LbChannel::from_source("echo.default:grpc", source)
        .connect()
        .await
        .expect("connects")
}

fn ready(pods: &[&Backend]) -> Vec<Pod<'static>> {
    pods.iter().map(|b| Pod::Ready(b.addr)).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let full = support::benchmarking();
    let reps = peers::env_or("HEALTHLB_BENCH_REPS", if full { 5.0 } else { 1.0 }).clamp(1.0, 50.0)
        as usize;
    let port = free_port();
    let base = support::echo::backends(2, 3, port).await;
    let base_refs: Vec<&Backend> = base.iter().collect();

    let api = KubeApi::start().await;
    api.apply(slice("echo", "echo-a", &ready(&base_refs)));
    let dns = TestDns::start().await;
    // CoreDNS's kubernetes plugin answers AAAA for an IPv4 Service with
    // NODATA whose SOA minimum is its ttl: 5 s too.
    dns.zone().set_negative_ttl(5);
    dns.zone()
        .set_a(HOST, &support::ipv4s(base.iter().map(|b| b.addr)), 5);
    let kube = kube_channel(&api).await;
    let by_dns = LbChannel::builder(dns.target(HOST, port))
        .connect()
        .await
        .expect("connects");
    support::all_serving(&kube, 3).await;
    support::all_serving(&by_dns, 3).await;

    // Scale-up: a fourth pod, listed then unlisted, `reps` times each way.
    println!("| scale-up, change to first call on the new pod | Kubernetes | DNS (TTL 5 s) |");
    println!("| --- | --- | --- |");
    let (mut k_times, mut d_times) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let new = Backend::start(&format!("new{rep}"), loopback(10 + rep as u8, port)).await;
        for (name, channel) in [("kubernetes", &kube), ("dns", &by_dns)] {
            let load = Load::start(channel);
            // DNS sees a change at its next refresh: start at a random
            // point of the 5 s TTL, as a real scale-up does.
            let phase = match name {
                "dns" => rand::random_range(0..5000),
                _ => 0,
            };
            tokio::time::sleep(Duration::from_millis(200 + phase)).await;
            load.watch(&new.name);
            let since = Instant::now();
            let mut all = base_refs.clone();
            all.push(&new);
            if name == "kubernetes" {
                api.apply(slice("echo", "echo-a", &ready(&all)));
            } else {
                dns.zone()
                    .set_a(HOST, &support::ipv4s(all.iter().map(|b| b.addr)), 5);
            }
            let took = load
                .first_answer_after(since, Duration::from_secs(15))
                .await;
            load.finish().await;
            if let Some(took) = took {
                if name == "kubernetes" {
                    k_times.push(took);
                } else {
                    d_times.push(took);
                }
            }
        }
        println!(
            "| rep {rep} | {} | {} |",
            ms(k_times.last().copied()),
            ms(d_times.last().copied())
        );
        // Back to the base set on both, and wait until both see it.
        api.apply(slice("echo", "echo-a", &ready(&base_refs)));
        dns.zone()
            .set_a(HOST, &support::ipv4s(base.iter().map(|b| b.addr)), 5);
        for channel in [&kube, &by_dns] {
            let back =
                support::wait_for(Duration::from_secs(15), || channel.endpoints().len() == 3).await;
            assert!(back.is_some(), "{:?}", support::states(channel));
        }
    }
    println!(
        "| median | {} | {} |",
        ms(median(&mut k_times)),
        ms(median(&mut d_times))
    );

    // Scale-down: calls that reach a pod after it turned terminating.
    let leaving = Backend::start("leaving", loopback(40, port)).await;
    let mut with_leaving = base_refs.clone();
    with_leaving.push(&leaving);
    api.apply(slice("echo", "echo-a", &ready(&with_leaving)));
    support::all_serving(&kube, 4).await;
    let load = Load::start(&kube);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pods = ready(&base_refs);
    pods.push(Pod::Terminating(leaving.addr));
    let before = leaving.calls();
    let since = Instant::now();
    api.apply(slice("echo", "echo-a", &pods));
    let out = support::wait_for(Duration::from_secs(5), || {
        !support::is_serving(&kube, leaving.addr)
    })
    .await
    .map(|_| since.elapsed());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after_terminating = leaving.calls() - before;
    let failed = load.finish().await;
    println!();
    println!(
        "scale-down (Kubernetes): {after_terminating} calls reached the pod after its endpoint turned terminating, all within the {} the change took to leave rotation; {failed} failed",
        ms(out)
    );

    // Rolling restart: each pod replaced by a new one, listed first.
    let mut current: Vec<Backend> = Vec::new();
    for (i, n) in (50..53u8).enumerate() {
        current.push(Backend::start(&format!("r{i}"), loopback(n, port)).await);
    }
    let refs: Vec<&Backend> = current.iter().collect();
    api.apply(slice("echo", "echo-a", &ready(&refs)));
    support::all_serving(&kube, 3).await;
    let load = Load::start(&kube);
    let started = Instant::now();
    for i in 0..3 {
        let fresh = Backend::start(&format!("r{}", i + 3), loopback(60 + i as u8, port)).await;
        let mut pods: Vec<Pod<'_>> = current.iter().map(|b| Pod::Ready(b.addr)).collect();
        pods.push(Pod::Ready(fresh.addr));
        api.apply(slice("echo", "echo-a", &pods));
        let up = support::wait_for(Duration::from_secs(10), || {
            support::is_serving(&kube, fresh.addr)
        })
        .await;
        assert!(up.is_some(), "{:?}", support::states(&kube));
        // The old pod turns terminating, then stops after a grace period.
        let old = current.remove(0);
        let mut pods: Vec<Pod<'_>> = current.iter().map(|b| Pod::Ready(b.addr)).collect();
        pods.push(Pod::Ready(fresh.addr));
        pods.push(Pod::Terminating(old.addr));
        api.apply(slice("echo", "echo-a", &pods));
        tokio::time::sleep(Duration::from_millis(500)).await;
        old.stop().await;
        current.push(fresh);
        let pods: Vec<Pod<'_>> = current.iter().map(|b| Pod::Ready(b.addr)).collect();
        api.apply(slice("echo", "echo-a", &pods));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed = load.finish().await;
    println!(
        "rolling restart (Kubernetes, 3 pods, {:.1} s): {failed} failed calls",
        started.elapsed().as_secs_f64()
    );
    if !full {
        assert!(!k_times.is_empty(), "the Kubernetes source saw the new pod");
    }
}
