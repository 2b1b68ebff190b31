//! Many cores, as far as two allow: the client on a multi-threaded runtime
//! pinned to CPU 0, the 4 tonic echo servers (with tonic-health, on
//! 127.0.0.2–5) in a child process pinned to CPU 1, so neither takes the
//! other's core. 16, 64 and 256 callers; every contender side by side,
//! interleaved over several rounds, with paired ratios to healthlb as in
//! `e2e`.
//!
//! tonic's `balance_list` sends every call through one `Buffer` worker
//! task; healthlb has no such task. On one client core that costs little,
//! since every task shares the core anyway. BENCHMARKS.md derives what a
//! 16-core client would see from the per-call serial cost of each design,
//! measured with perf on this benchmark (`HEALTHLB_BENCH_PROFILE`).
//!
//! `cargo bench --bench cores` (`HEALTHLB_BENCH_SECS`, default 2, the
//! length of one measurement; `HEALTHLB_BENCH_ROUNDS`, default 5;
//! `HEALTHLB_CLIENT_THREADS`, default 2, the client runtime's workers;
//! `HEALTHLB_BENCH_CONCURRENCY`, default `16,64,256`;
//! `HEALTHLB_BENCH_PROFILE=<contender>` runs that one alone for 10 s at the
//! first concurrency).
//! Needs `taskset` (util-linux) to pin; without it, runs unpinned and says
//! so.

use healthlb_bench::peers;
use healthlb_bench::servers;
use healthlb_testkit as support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use peers::{Sample, env_or, measure};
use support::echo::{Backend, free_port, loopback};

/// Pins the process `pid` (every thread it has now; later ones inherit
/// the creating thread's) to `cpu`. Whether it worked.
fn pin(pid: u32, cpu: usize) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The child: 4 echo servers on `port`; READY; until stdin closes.
fn serve(port: u16) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut backends = Vec::new();
        for n in 2..=5u8 {
            backends.push(Backend::start(&format!("b{n}"), loopback(n, port)).await);
        }
        println!("READY");
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        drop(backends);
    });
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(port) = std::env::var("HEALTHLB_CORES_SERVE") {
        serve(port.parse().expect("port"));
        return;
    }
    let full = support::benchmarking();
    let pinned_client = pin(std::process::id(), 0);
    let port = free_port();
    let (mut child, ready) = servers::spawn_self("HEALTHLB_CORES_SERVE", &port.to_string());
    let pinned_servers = pin(child.id(), 1);
    assert_eq!(ready, "READY", "the server process started");
    let addrs: Vec<SocketAddr> = (2..=5u8).map(|n| loopback(n, port)).collect();

    let threads = env_or("HEALTHLB_CLIENT_THREADS", 2.0).clamp(1.0, 64.0) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(peers::CLIENT_THREAD)
        .enable_all()
        .build()
        .expect("runtime");
    let contenders = runtime.block_on(peers::standard(&addrs, false));
    let levels = peers::concurrencies(&[16, 64, 256]);

    if let Ok(only) = std::env::var("HEALTHLB_BENCH_PROFILE") {
        if let Some(contender) = contenders.iter().find(|c| c.name() == only) {
            let sample = runtime.block_on(measure(contender, levels[0], Duration::from_secs(10)));
            println!("{only}: {sample:?}");
        }
        drop(child.stdin.take());
        let _ = child.wait();
        return;
    }

    let length = Duration::from_secs_f64(
        env_or("HEALTHLB_BENCH_SECS", if full { 2.0 } else { 0.2 }).clamp(0.2, 60.0),
    );
    let rounds =
        env_or("HEALTHLB_BENCH_ROUNDS", if full { 5.0 } else { 1.0 }).clamp(1.0, 20.0) as usize;
    let results = runtime.block_on(peers::rounds(&contenders, &levels, rounds, length));
    let base = peers::healthlb_index(&contenders);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "client pinned to CPU 0: {pinned_client}; servers pinned to CPU 1: {pinned_servers}; \
         client runtime: {threads} worker threads; {rounds} rounds of {length:?}\n"
    );
    let _ = writeln!(
        table,
        "| callers | contender | calls/s | p50 | p99 | client CPU per call | failed | calls/s vs healthlb | client CPU vs healthlb |"
    );
    let _ = writeln!(
        table,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (ci, &concurrency) in levels.iter().enumerate() {
        let ours = &results[ci * contenders.len() + base];
        for (k, contender) in contenders.iter().enumerate() {
            let mine = &results[ci * contenders.len() + k];
            let paired = peers::Paired { mine, ours };
            let (of, vs) = (|f| paired.of(f), |f| paired.vs(f));
            let calls = |s: &Sample| s.calls_per_sec;
            let cpu = |s: &Sample| s.client_cpu.as_secs_f64();
            let _ = writeln!(
                table,
                "| {concurrency} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs | {} | {:.2}× | {:.2}× |",
                contender.name(),
                of(calls),
                of(|s| s.p50.as_secs_f64()) * 1e6,
                of(|s| s.p99.as_secs_f64()) * 1e6,
                of(cpu) * 1e6,
                mine.iter().map(|s| s.failed).sum::<u64>(),
                vs(calls),
                vs(cpu),
            );
        }
    }
    println!("\n{table}");
    drop(contenders);
    drop(runtime);
    drop(child.stdin.take());
    let _ = child.wait();
    if full {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("cores.md"), &table);
    }
}
