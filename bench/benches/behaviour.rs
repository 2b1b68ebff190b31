//! Reaction times and spread, on loopback with real backends and a real DNS
//! server, under load from 16 callers through one `LbChannel`:
//!
//! - NOT_SERVING: from `set_serving_status(NOT_SERVING)` to the last call
//!   that reaches that backend;
//! - DNS: from a record change (TTL 1 s) to the first call that reaches a
//!   new backend;
//! - kill: from a backend's abrupt death to its leaving SERVING, and the
//!   calls that failed meanwhile;
//! - spread: the share of 100k calls each of 4 backends got through
//!   healthlb, next to DNS-shuffle-only spreading (100 clients with one
//!   connection each to a random address, as kube-proxy leaves it).
//!
//! Each reaction is repeated `HEALTHLB_BENCH_REPS` times (default 50) and
//! reported as p50 and p99. `cargo bench --bench behaviour`

use healthlb_testkit as support;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use healthlb::{BackoffConfig, LbChannel};
use support::dns::TestDns;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};

const HOST: &str = "echo.bench.local";

struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(channel: &LbChannel, callers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..callers)
            .map(|_| {
                let (channel, stop, failed) = (channel.clone(), stop.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut client = EchoClient::new(channel);
                    // Bounded in count as well as time (the caller stops it).
                    for _ in 0..50_000_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if client
                            .unary(EchoRequest {
                                message: "r".into(),
                            })
                            .await
                            .is_err()
                        {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            failed,
            tasks,
        }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn ips(backends: &[&Backend]) -> Vec<Ipv4Addr> {
    support::ipv4s(backends.iter().map(|b| b.addr))
}

async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    support::wait_for(limit, &mut check).await.is_some()
}

/// (p50, p99, max) of `samples`.
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let full = support::benchmarking();
    let reps = std::env::var("HEALTHLB_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 50usize } else { 1 })
        .clamp(1, 1000);
    let port = free_port();
    let mut base = Vec::new();
    for n in 2..=5u8 {
        base.push(Backend::start(&format!("b{n}"), loopback(n, port)).await);
    }
    let spare = Backend::start("spare", loopback(6, port)).await;
    let dns = TestDns::start().await;
    dns.zone()
        .set_a(HOST, &ips(&base.iter().collect::<Vec<_>>()), 1);
    let fast = BackoffConfig::default()
        .initial(Duration::from_millis(50))
        .max(Duration::from_millis(500));
    let channel = LbChannel::builder(dns.target(HOST, port))
        .subchannels(|s| s.backoff(fast))
        .connect()
        .await
        .expect("the bench's channel connects");
    assert!(
        wait_until(Duration::from_secs(10), || channel
            .endpoints()
            .iter()
            .all(|e| e.state.is_serving()))
        .await,
        "all SERVING"
    );
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| reaction | reps | p50 | p99 | max | failed calls |"
    );
    let _ = writeln!(report, "| --- | ---: | ---: | ---: | ---: | ---: |");
    let load = Load::start(&channel, 16);

    // 1. NOT_SERVING to the last call that reaches the backend.
    let target = &base[0];
    let mut samples = Vec::new();
    let failed_before = load.failed.load(Ordering::Relaxed);
    for _ in 0..reps {
        let t0 = Instant::now();
        target.set_serving(false).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let last = target.counters.last_unary.lock().unwrap().unwrap_or(t0);
        samples.push(last.saturating_duration_since(t0));
        target.set_serving(true).await;
        wait_until(Duration::from_secs(5), || {
            support::is_serving(&channel, target.addr)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (p50, p99, max) = percentiles(&mut samples);
    let failed = load.failed.load(Ordering::Relaxed) - failed_before;
    let _ = writeln!(
        report,
        "| NOT_SERVING → last call to it | {reps} | {} | {} | {} | {failed} |",
        ms(p50),
        ms(p99),
        ms(max)
    );

    // 2. A DNS change to the first call on a new backend (TTL 1 s).
    let mut samples = Vec::new();
    let failed_before = load.failed.load(Ordering::Relaxed);
    let with_spare: Vec<&Backend> = base.iter().chain(std::iter::once(&spare)).collect();
    for _ in 0..reps {
        *spare.counters.first_unary.lock().unwrap() = None;
        let t0 = Instant::now();
        dns.zone().set_a(HOST, &ips(&with_spare), 1);
        wait_until(Duration::from_secs(5), || {
            spare.counters.first_unary.lock().unwrap().is_some()
        })
        .await;
        let first = spare
            .counters
            .first_unary
            .lock()
            .unwrap()
            .unwrap_or(t0 + Duration::from_secs(5));
        samples.push(first.saturating_duration_since(t0));
        dns.zone()
            .set_a(HOST, &ips(&base.iter().collect::<Vec<_>>()), 1);
        wait_until(Duration::from_secs(5), || {
            channel.endpoints().len() == base.len()
        })
        .await;
    }
    let (p50, p99, max) = percentiles(&mut samples);
    let failed = load.failed.load(Ordering::Relaxed) - failed_before;
    let _ = writeln!(
        report,
        "| DNS change (TTL 1 s) → first call to the new backend | {reps} | {} | {} | {} | {failed} |",
        ms(p50),
        ms(p99),
        ms(max)
    );

    // 3. A backend killed mid-load: its removal, and the calls that failed.
    let mut samples = Vec::new();
    let failed_before = load.failed.load(Ordering::Relaxed);
    let victim_addr = base[3].addr;
    let mut victim = base.pop().expect("four backends");
    for _ in 0..reps {
        let t0 = Instant::now();
        victim.kill().await;
        wait_until(Duration::from_secs(5), || {
            !support::is_serving(&channel, victim_addr)
        })
        .await;
        samples.push(t0.elapsed());
        victim = Backend::start("b5", victim_addr).await;
        wait_until(Duration::from_secs(5), || {
            support::is_serving(&channel, victim_addr)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (p50, p99, max) = percentiles(&mut samples);
    let failed = load.failed.load(Ordering::Relaxed) - failed_before;
    let _ = writeln!(
        report,
        "| backend killed → out of rotation | {reps} | {} | {} | {} | {failed} |",
        ms(p50),
        ms(p99),
        ms(max)
    );
    base.push(victim);
    load.finish().await;

    // 4. Spread over 4 backends: healthlb against DNS shuffle only.
    let _ = writeln!(report, "\n| spreading of 100k calls | b2 | b3 | b4 | b5 |");
    let _ = writeln!(report, "| --- | ---: | ---: | ---: | ---: |");
    // Unary calls each backend took since `before`.
    let since = |before: &[u64]| {
        base.iter()
            .zip(before)
            .map(|(b, before)| b.counters.unary.load(Ordering::SeqCst) - before)
            .collect::<Vec<u64>>()
    };
    let zero = vec![0; base.len()];
    let before = since(&zero);
    let per_caller = if full { 100_000 / 16 } else { 2_000 / 16 };
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = EchoClient::new(channel.clone());
            tokio::spawn(async move {
                for _ in 0..per_caller {
                    let _ = client
                        .unary(EchoRequest {
                            message: "s".into(),
                        })
                        .await;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let healthlb = since(&before);
    let before = since(&zero);
    let addrs: Vec<SocketAddr> = base.iter().map(|b| b.addr).collect();
    let shuffled_calls = if full { 1000 } else { 20 };
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let addr = addrs[rand::random_range(0..addrs.len())];
            tokio::spawn(async move {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("valid")
                    .connect()
                    .await
                    .expect("connects");
                let mut client = EchoClient::new(channel);
                for _ in 0..shuffled_calls {
                    let _ = client
                        .unary(EchoRequest {
                            message: "s".into(),
                        })
                        .await;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let shuffle = since(&before);
    for (name, shares) in [
        ("healthlb (one client)", &healthlb),
        ("DNS shuffle only (100 clients)", &shuffle),
    ] {
        let total: u64 = shares.iter().sum::<u64>().max(1);
        let cells: Vec<String> = shares
            .iter()
            .map(|n| format!("{:.1} %", *n as f64 * 100.0 / total as f64))
            .collect();
        let _ = writeln!(report, "| {name} | {} |", cells.join(" | "));
    }

    println!("\n{report}");
    if !support::benchmarking() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("behaviour.md"), &report);
}
