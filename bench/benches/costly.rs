//! A costly pod: 4 tonic backends on loopback (127.0.0.2–5), each serving
//! its calls one at a time, three taking 1 ms a call and one 2 ms (twice as
//! costly: half the capacity). Each reports its load per call through
//! healthlb's `OrcaLayer`: qps, and qps × its cost per call as its
//! utilization. 16 callers for `HEALTHLB_BENCH_SECS` (default 5) through
//! healthlb with round robin, least request and weighted round robin (per
//! call reports, a 1 s blackout, weights worked out every 100 ms), after
//! a 2 s warm-up; calls/s and p99, medians of 3 rounds, each running every
//! policy in turn.
//!
//! `cargo bench -p healthlb-bench --bench costly`; the table also goes to
//! `target/healthlb-bench/costly.txt`.

use healthlb_bench::peers;
use healthlb_testkit as support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use healthlb::{LbChannel, Policy, WeightedRoundRobin};
use peers::{Contender, env_or, healthlb_all_serving, measure};
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, Options, OrcaOptions, free_port, loopback};

const POLICIES: [&str; 3] = ["round_robin", "least_request", "weighted_round_robin"];

async fn contender(policy: &'static str, addrs: &[SocketAddr], warm: Duration) -> Contender {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let chosen = match policy {
        "least_request" => Policy::least_request(2),
        "weighted_round_robin" => Policy::WeightedRoundRobin(
            WeightedRoundRobin::default()
                .blackout_period(Duration::from_secs(1))
                .weight_update_period(Duration::from_millis(100)),
        ),
        _ => Policy::RoundRobin,
    };
    let channel = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .policy(chosen)
        .connect()
        .await
        .expect("healthlb connects");
    healthlb_all_serving(&channel, addrs.len()).await;
    let contender = Contender::HealthlbPolicy(policy, EchoClient::new(channel));
    // Warm-up under load: reports in, past the blackout.
    measure(&contender, 16, warm).await;
    contender
}

fn main() {
    let runtime = peers::client_runtime();
    let full = support::benchmarking();
    let scale = if full { 1.0 } else { 0.04 };
    let length = Duration::from_secs_f64(env_or("HEALTHLB_BENCH_SECS", 5.0) * scale);
    let warm = Duration::from_secs_f64(2.0 * scale);
    let rounds = if full { 3 } else { 1 };
    let port = free_port();
    let backends = runtime.block_on(async {
        let mut backends = Vec::new();
        for n in 2..=5u8 {
            let options = Options {
                orca: Some(OrcaOptions::default()),
                ..Options::default()
            };
            let b = Backend::start_with(&format!("b{n}"), loopback(n, port), options).await;
            let cost = if n == 2 { 2 } else { 1 };
            b.counters.service_ms.store(cost, Ordering::SeqCst);
            b.counters.cost_milli.store(cost * 1000, Ordering::SeqCst);
            backends.push(b);
        }
        backends
    });
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let served = |b: &Backend| b.counters.unary.load(Ordering::SeqCst);

    // Per policy: calls/s, p99, and the costly pod's share, each round.
    let mut seen: Vec<(Vec<f64>, Vec<Duration>, Vec<f64>)> =
        vec![Default::default(); POLICIES.len()];
    for _ in 0..rounds {
        for (i, policy) in POLICIES.into_iter().enumerate() {
            let (sample, share) = runtime.block_on(async {
                let contender = contender(policy, &addrs, warm).await;
                let before: Vec<u64> = backends.iter().map(served).collect();
                let sample = measure(&contender, 16, length).await;
                let after: Vec<u64> = backends.iter().map(served).collect();
                let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
                (sample, (after[0] - before[0]) as f64 / total.max(1) as f64)
            });
            seen[i].0.push(sample.calls_per_sec);
            seen[i].1.push(sample.p99);
            seen[i].2.push(share);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_unstable_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## One of four pods twice as costly (2 ms a call against 1 ms, one at a time), 16 callers, {length:?} per figure, medians of {rounds} rounds\n"
    );
    let _ = writeln!(
        out,
        "| policy | calls/s | vs round_robin | p99 | costly pod's share of calls |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    let mut rr_rate = 0.0;
    for (i, policy) in POLICIES.iter().enumerate() {
        let (rates, p99s, shares) = &mut seen[i];
        let rate = median(rates);
        p99s.sort_unstable();
        let p99 = p99s[p99s.len() / 2];
        let share = median(shares);
        if i == 0 {
            rr_rate = rate;
        }
        let _ = writeln!(
            out,
            "| {policy} | {rate:.0} | {:.2}× | {:.2} ms | {:.1} % |",
            rate / rr_rate.max(1.0),
            p99.as_secs_f64() * 1e3,
            share * 100.0
        );
    }
    eprintln!("{out}");
    if full {
        let dir = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/healthlb-bench"
        ));
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(dir.join("costly.txt"), &out);
    }
    drop(backends);
}
