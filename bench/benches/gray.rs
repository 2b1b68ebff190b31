//! Gray failures, side by side in one run: 4 tonic backends on loopback
//! (127.0.0.2–5), all SERVING by the health protocol, and
//!
//! 1. **a failing pod**: one backend answers every call UNAVAILABLE. Each
//!    contender runs 16 callers for `HEALTHLB_GRAY_SECS` (default 10) and
//!    reports the share of calls that failed.
//! 2. **a slow pod**: one backend answers 50 ms late. Each contender runs
//!    16 callers and then 1 caller, for `HEALTHLB_BENCH_SECS` (default 5)
//!    each, with and without the slow pod; it reports calls/s against
//!    all-fast, p99, and (at 1 caller) mean latency against all-fast.
//!
//! 3. **a flaky pod**: one backend fails every second call with
//!    UNAVAILABLE, which consecutive-failure ejection never sees. 16 callers
//!    for `HEALTHLB_GRAY_SECS`; it reports the failed share and the
//!    attempts per call the servers saw, with healthlb without a retry
//!    policy, with one, and with hedging.
//! 4. **a slow pod, hedged**: one backend 50 ms late, 16 callers;
//!    healthlb's round robin without a hedging policy and with one (1 ms
//!    and 0.5 ms delays), p99 against all-fast: medians of 3 rounds, each
//!    running every row in turn.
//!
//! Contenders: healthlb with each policy and its defaults (outlier ejection
//! on), tonic's `balance_list`, ginepro 0.9 and warm_channels 0.3. Every
//! healthlb measurement starts from a fresh channel, so no ejection or
//! latency estimate carries over. Criterion measures one call through each
//! contender with the slow pod, at 16 callers.
//!
//! `cargo bench --bench gray`; the table also goes to
//! `target/healthlb-bench/gray.txt`.

use healthlb_bench::peers;
use healthlb_testkit as support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::Criterion;
use healthlb::{LbChannel, Policy};
use peers::{Contender, Sample, StaticLookup, env_or, healthlb_all_serving, measure};
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};
use tonic::transport::{Channel, Endpoint};

const SLOW: Duration = Duration::from_millis(50);

/// Rounds of the hedged slow-pod scenario (one in a smoke run).
const HEDGE_ROUNDS: usize = 3;

/// A6 retries for the flaky pod: up to 3 attempts, 1 ms backoff.
const RETRY: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
  "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.001s", "maxBackoff": "0.001s",
    "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;

/// A6 hedging: up to 3 attempts, 1 ms apart (about the fast pods' p99).
const HEDGE: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
  "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.001s",
    "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;

/// The same, 0.5 ms apart (half the fast pods' p99).
const HEDGE_SOON: &str = r#"{"methodConfig": [{"name": [{"service": "echo.Echo"}],
  "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.0005s",
    "nonFatalStatusCodes": ["UNAVAILABLE"]}}]}"#;

/// Which contender to build.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Healthlb(&'static str),
    BalanceList,
    Ginepro,
    WarmChannels,
}

const KINDS: [Kind; 6] = [
    Kind::Healthlb("healthlb round_robin"),
    Kind::Healthlb("healthlb least_request"),
    Kind::Healthlb("healthlb peak_ewma"),
    Kind::BalanceList,
    Kind::Ginepro,
    Kind::WarmChannels,
];

/// A contender of `kind`, warmed up with `warm` calls.
async fn build(kind: Kind, addrs: &[SocketAddr], warm: usize) -> Contender {
    let endpoint = |a: &SocketAddr| Endpoint::from_shared(format!("http://{a}")).expect("valid");
    let mut contender = match kind {
        Kind::Healthlb(name) => {
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            let policy = match name {
                "healthlb least_request" => Policy::least_request(2),
                "healthlb peak_ewma" => Policy::peak_ewma(),
                _ => Policy::RoundRobin,
            };
            let config = match name {
                "healthlb retry" => RETRY,
                "healthlb hedging" => HEDGE,
                "healthlb hedging 0.5 ms" => HEDGE_SOON,
                _ => "{}",
            };
            let channel = LbChannel::builder(format!("ipv4:{}", list.join(",")))
                .policy(policy)
                .default_service_config(config)
                .expect("a valid service config")
                .connect()
                .await
                .expect("healthlb connects");
            healthlb_all_serving(&channel, addrs.len()).await;
            Contender::HealthlbPolicy(name, EchoClient::new(channel))
        }
        Kind::BalanceList => Contender::BalanceList(EchoClient::new(Channel::balance_list(
            addrs.iter().map(endpoint),
        ))),
        Kind::Ginepro => {
            let channel =
                ginepro::LoadBalancedChannel::builder(("echo.bench.local", addrs[0].port()))
                    .lookup_service(StaticLookup(addrs.to_vec()))
                    .channel()
                    .await
                    .expect("ginepro channel");
            Contender::Ginepro(tonic013::client::Grpc::new(channel))
        }
        Kind::WarmChannels => {
            let uri: http::Uri = format!("http://{}", addrs[0]).parse().expect("uri");
            Contender::WarmChannels(EchoClient::with_origin(peers::warm_channel(addrs), uri))
        }
    };
    // Warm up: connections open, discovery done. Bounded in count and time.
    let started = std::time::Instant::now();
    for _ in 0..warm {
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
        let _ = contender.call().await;
    }
    contender
}

/// The calls a sample made over `length`, failed ones included, and the
/// failed share in percent.
fn calls_and_failed_share(s: &Sample, length: Duration) -> (u64, f64) {
    let calls = (s.calls_per_sec * length.as_secs_f64()).round() as u64 + s.failed;
    (calls, 100.0 * s.failed as f64 / calls.max(1) as f64)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let runtime = peers::client_runtime();
    // Without `--bench` (as `cargo test --all-targets` runs it), a short
    // smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1.0 } else { 0.03 };
    let warm = if full { 100 } else { 4 };
    let gray = Duration::from_secs_f64(env_or("HEALTHLB_GRAY_SECS", 10.0) * scale);
    let length = Duration::from_secs_f64(env_or("HEALTHLB_BENCH_SECS", 5.0) * scale);
    let port = free_port();
    let backends = runtime.block_on(async {
        let mut backends = Vec::new();
        for n in 2..=5u8 {
            backends.push(Backend::start(&format!("b{n}"), loopback(n, port)).await);
        }
        backends
    });
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let bad = &backends[0].counters;
    let mut out = String::new();

    // 1. A failing pod.
    let _ = writeln!(
        out,
        "## One pod failing every call with UNAVAILABLE, 16 callers, {gray:?}\n"
    );
    let _ = writeln!(out, "| contender | calls | failed | failed share |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
    for kind in KINDS {
        let sample = runtime.block_on(async {
            let contender = build(kind, &addrs, warm).await;
            bad.fail_with
                .store(tonic::Code::Unavailable as i32, Ordering::SeqCst);
            let sample = measure(&contender, 16, gray).await;
            bad.fail_with.store(0, Ordering::SeqCst);
            (contender.name().to_owned(), sample)
        });
        let (name, s) = sample;
        let (calls, share) = calls_and_failed_share(&s, gray);
        let _ = writeln!(out, "| {name} | {calls} | {} | {share:.3} % |", s.failed);
    }

    // 2. A slow pod.
    let _ = writeln!(
        out,
        "\n## One pod {} slower, against all four fast, {length:?} per figure\n",
        ms(SLOW)
    );
    let _ = writeln!(
        out,
        "| contender | c=16 calls/s vs all-fast | c=16 p99 (all-fast) | c=1 mean vs all-fast | c=1 mean (all-fast) |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    let mut slow_contenders = Vec::new();
    for kind in KINDS {
        let row = runtime.block_on(async {
            let mut figures: Vec<Sample> = Vec::new();
            for (slow, concurrency) in [(false, 16), (true, 16), (false, 1), (true, 1)] {
                bad.delay_us.store(
                    if slow { SLOW.as_micros() as u64 } else { 0 },
                    Ordering::SeqCst,
                );
                let contender = build(kind, &addrs, warm).await;
                figures.push(measure(&contender, concurrency, length).await);
                if slow && concurrency == 16 {
                    slow_contenders.push(contender);
                }
            }
            bad.delay_us.store(0, Ordering::SeqCst);
            figures
        });
        let [fast16, slow16, fast1, slow1] = [row[0], row[1], row[2], row[3]];
        let name = slow_contenders.last().expect("built").name();
        let _ = writeln!(
            out,
            "| {name} | {:.2}× ({:.0} vs {:.0}) | {} ({}) | {:.2}× | {} ({}) |",
            slow16.calls_per_sec / fast16.calls_per_sec.max(1.0),
            slow16.calls_per_sec,
            fast16.calls_per_sec,
            ms(slow16.p99),
            ms(fast16.p99),
            slow1.mean.as_secs_f64() / fast1.mean.as_secs_f64().max(1e-9),
            ms(slow1.mean),
            ms(fast1.mean),
        );
    }
    // 3. A flaky pod.
    let _ = writeln!(
        out,
        "\n## One pod failing every second call with UNAVAILABLE, 16 callers, {gray:?}\n"
    );
    let _ = writeln!(
        out,
        "| contender | calls | failed | failed share | attempts per call |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    let flaky_kinds = [
        Kind::Healthlb("healthlb round_robin"),
        Kind::Healthlb("healthlb retry"),
        Kind::Healthlb("healthlb hedging"),
        Kind::BalanceList,
        Kind::Ginepro,
        Kind::WarmChannels,
    ];
    let served = || -> u64 {
        backends
            .iter()
            .map(|b| b.counters.unary.load(Ordering::SeqCst))
            .sum()
    };
    for kind in flaky_kinds {
        let (name, s, attempts) = runtime.block_on(async {
            let contender = build(kind, &addrs, warm).await;
            bad.fail_every.store(2, Ordering::SeqCst);
            let before = served();
            let sample = measure(&contender, 16, gray).await;
            let attempts = served() - before;
            bad.fail_every.store(0, Ordering::SeqCst);
            (contender.name().to_owned(), sample, attempts)
        });
        let (calls, share) = calls_and_failed_share(&s, gray);
        let _ = writeln!(
            out,
            "| {name} | {calls} | {} | {share:.3} % | {:.3} |",
            s.failed,
            attempts as f64 / calls.max(1) as f64
        );
    }

    // 4. A slow pod, hedged.
    let _ = writeln!(
        out,
        "\n## One pod {} slower, hedged, 16 callers, {length:?} per figure\n",
        ms(SLOW)
    );
    let _ = writeln!(
        out,
        "Medians of {HEDGE_ROUNDS} rounds, each running every row in turn, so that all-fast and the slow pod share the machine's moods.\n"
    );
    let _ = writeln!(
        out,
        "| contender | p99 | p99 vs all-fast | calls/s vs all-fast | failed | slow pod's calls cancelled |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
    let rows = [
        (
            "healthlb round_robin, all fast",
            "healthlb round_robin",
            false,
        ),
        (
            "healthlb round_robin, one pod slow",
            "healthlb round_robin",
            true,
        ),
        (
            "healthlb hedging 1 ms, one pod slow",
            "healthlb hedging",
            true,
        ),
        (
            "healthlb hedging 0.5 ms, one pod slow",
            "healthlb hedging 0.5 ms",
            true,
        ),
    ];
    // Per row: p99s, calls/s, failed, and the slow pod's calls and cancels.
    let mut seen = vec![(Vec::new(), Vec::new(), 0u64, 0u64, 0u64); rows.len()];
    let hedge_rounds = if full { HEDGE_ROUNDS } else { 1 };
    for _ in 0..hedge_rounds {
        for (row, (_, kind, slow)) in rows.iter().enumerate() {
            let delay = if *slow { SLOW.as_micros() as u64 } else { 0 };
            bad.delay_us.store(delay, Ordering::SeqCst);
            let (sample, calls, cancelled) = runtime.block_on(async {
                let contender = build(Kind::Healthlb(kind), &addrs, warm).await;
                // The warm-up's losers are cancelled within 20 ms.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (calls, cancelled) = (&bad.unary, &bad.cancelled);
                let before = (
                    calls.load(Ordering::SeqCst),
                    cancelled.load(Ordering::SeqCst),
                );
                let sample = measure(&contender, 16, length).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                (
                    sample,
                    calls.load(Ordering::SeqCst) - before.0,
                    cancelled.load(Ordering::SeqCst) - before.1,
                )
            });
            let entry = &mut seen[row];
            entry.0.push(sample.p99);
            entry.1.push(sample.calls_per_sec);
            entry.2 += sample.failed;
            entry.3 += calls;
            entry.4 += cancelled;
        }
    }
    bad.delay_us.store(0, Ordering::SeqCst);
    let medians: Vec<(Duration, f64)> = seen
        .iter_mut()
        .map(|(p99s, rates, ..)| {
            p99s.sort_unstable();
            rates.sort_unstable_by(f64::total_cmp);
            (p99s[p99s.len() / 2], rates[rates.len() / 2])
        })
        .collect();
    let (fast_p99, fast_rate) = medians[0];
    for (row, (name, _, slow)) in rows.iter().enumerate() {
        let (p99, rate) = medians[row];
        let (_, _, failed, calls, cancelled) = seen[row];
        let cancels = if *slow {
            format!("{cancelled} of {calls}")
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {:.2}× | {:.2}× | {failed} | {cancels} |",
            ms(p99),
            p99.as_secs_f64() / fast_p99.as_secs_f64().max(1e-9),
            rate / fast_rate.max(1.0),
        );
    }

    eprintln!("{out}");
    let dir = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/healthlb-bench"
    ));
    let _ = std::fs::create_dir_all(dir);
    if full {
        let _ = std::fs::write(dir.join("gray.txt"), &out);
    }

    // Criterion: one call through each contender with the slow pod.
    if full {
        bad.delay_us
            .store(SLOW.as_micros() as u64, Ordering::SeqCst);
        let mut criterion = Criterion::default()
            .configure_from_args()
            .sample_size(10)
            .measurement_time(Duration::from_secs(3));
        let mut group = criterion.benchmark_group("slow_pod_call");
        for contender in &slow_contenders {
            group.bench_function(contender.name(), |b| {
                b.to_async(&runtime).iter(|| {
                    let mut contender = contender.clone();
                    async move { contender.call().await }
                })
            });
        }
        group.finish();
        bad.delay_us.store(0, Ordering::SeqCst);
    }
    drop(backends);
}
