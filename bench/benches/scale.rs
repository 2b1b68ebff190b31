//! Scale: for 100, 1000 and 10,000 endpoints, the time from `build()` to
//! all SERVING, the client's resident memory per endpoint, and the CPU time
//! the idle balancer spends per minute (health streams and liveness probes).
//!
//! The servers (one tonic server with tonic-health per listening address,
//! up to 2,500 per process) run in child processes (`servers/mod.rs`), so
//! the figures are the client's alone.
//!
//! `cargo bench --bench scale` (`HEALTHLB_SCALE_IDLE_SECS`, default 30 s or
//! two liveness intervals, whichever is longer, is the idle measurement's
//! length; `HEALTHLB_SCALE_SIZES`, say `10000`,
//! replaces the sizes.)

use healthlb_bench::servers;
use healthlb_testkit as support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use healthlb::LbChannel;
use support::echo::free_port;

const SIZES: [usize; 3] = [100, 1000, 10_000];
/// Under `cargo test --all-targets`: one small size, briefly.
const SMOKE_SIZES: [usize; 1] = [20];

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time (user + system) of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15; here 11 and 12 after ')'.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if servers::serve_if_child() {
        return;
    }
    let full = support::benchmarking();
    let idle_secs: Option<u64> = std::env::var("HEALTHLB_SCALE_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok());
    // At least two liveness intervals, which stretch past 3,000 endpoints
    // (endpoints ÷ 200 probes a second), so every endpoint is probed.
    let idle_for = |n: usize| {
        let default = if full { 30.max(2 * n as u64 / 200) } else { 1 };
        Duration::from_secs(idle_secs.unwrap_or(default).clamp(1, 600))
    };
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| endpoints | build → all SERVING | client RSS per endpoint | idle CPU per minute |"
    );
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: |");
    // `HEALTHLB_SCALE_SIZES`: a comma-separated list instead of the sizes above.
    let chosen = support::env_list("HEALTHLB_SCALE_SIZES", 1..=20_000);
    let sizes: &[usize] = match (chosen.is_empty(), full) {
        (false, _) => &chosen,
        (true, true) => &SIZES,
        (true, false) => &SMOKE_SIZES,
    };
    for &n in sizes {
        let servers = servers::Servers::start(n, free_port());

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (took, per_endpoint, cpu_per_min, serving) = runtime.block_on(async {
            let target = servers.target(n);
            let rss_before = rss();
            let start = Instant::now();
            let channel = LbChannel::builder(target)
                .resolution(|r| r.max_endpoints(n))
                .build()
                .expect("builds");
            let limit = Duration::from_secs(60);
            let mut serving = 0;
            while start.elapsed() < limit {
                serving = channel
                    .endpoints()
                    .iter()
                    .filter(|e| e.state.is_serving())
                    .count();
                if serving == n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let took = start.elapsed();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let per_endpoint = rss().saturating_sub(rss_before) / n as u64;
            let cpu_before = cpu_time();
            tokio::time::sleep(idle_for(n)).await;
            let cpu = cpu_time().saturating_sub(cpu_before);
            drop(channel);
            (
                took,
                per_endpoint,
                cpu.mul_f64(60.0 / idle_for(n).as_secs_f64()),
                serving,
            )
        });
        let _ = writeln!(
            report,
            "| {n} | {:.2} s{} | {:.1} KiB | {:.2} s |",
            took.as_secs_f64(),
            if serving == n {
                String::new()
            } else {
                format!(" ({serving} SERVING)")
            },
            per_endpoint as f64 / 1024.0,
            cpu_per_min.as_secs_f64()
        );
        drop(runtime);
        drop(servers);
    }
    println!("\n{report}");
    if !support::benchmarking() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("scale.md"), &report);
}
