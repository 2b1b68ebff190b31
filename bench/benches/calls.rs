//! Per-call costs that noise can't move, side by side: the client's
//! user-space instructions per call, counted by callgrind, its syscalls
//! per call, counted by strace, and its heap allocations per call, counted
//! by valgrind's dhat, for each contender at each concurrency.
//!
//! Each figure comes from the contender alone in a child process (this
//! binary again), making unary echo calls to 4 backends in another child
//! process. The child runs twice, with `SHORT` and `LONG` calls after the
//! same setup and warm-up; the difference over `LONG - SHORT` calls is the
//! cost of a call, with the setup, the warm-up and the exit taken out.
//! Instructions are counted over every thread of the client process: its
//! runtime, and any task or thread a contender keeps (warm_channels' and
//! ginepro's discovery, healthlb's health and liveness).
//!
//! This bench links kube, whose manifest turns on tracing's `log`
//! feature: with no tracing subscriber set, every span of h2's (and the
//! others') then goes through the `log` path, some 8–12k instructions per
//! call for every contender alike. An application with any global tracing
//! subscriber skips that path; `HEALTHLB_CALLS_SUBSCRIBER=1` measures that
//! case, each child setting a global subscriber that records nothing.
//!
//! `cargo bench --bench calls` (needs `valgrind` and `strace` on the PATH;
//! without them it says so and measures nothing). `HEALTHLB_BENCH_CONCURRENCY`
//! sets the concurrencies (default `1,16`); `HEALTHLB_CALLS_CONTENDERS` a
//! comma-separated subset of the contenders' names. Under `cargo test` it
//! makes one short run of each contender, unmeasured, as a check.

use healthlb_bench::peers;
use healthlb_bench::servers;
use healthlb_testkit as support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;

/// Calls after the warm-up in the two runs whose difference is measured.
const SHORT: usize = 1000;
const LONG: usize = 3000;

fn main() {
    if servers::serve_if_child() {
        return;
    }
    if let Ok(spec) = std::env::var("HEALTHLB_CALLS") {
        run_calls(&spec);
        return;
    }
    let full = support::benchmarking();
    let port = support::echo::free_port();
    let backends = servers::Servers::echo(4, port);
    let concurrencies = peers::concurrencies(&[1, 16]);
    let chosen = std::env::var("HEALTHLB_CALLS_CONTENDERS").unwrap_or_default();
    let contenders: Vec<&str> = peers::STANDARD
        .into_iter()
        .chain([peers::ANCHOR, peers::ANCHOR_RR, peers::OTEL])
        .filter(|c| chosen.is_empty() || chosen.split(',').any(|x| x.trim() == *c))
        .collect();
    if !full {
        // A check: each contender's child makes its calls and exits cleanly.
        for contender in &contenders {
            let spec = format!("{contender}:1:10:{}", backends.port);
            let status = Command::new(std::env::current_exe().expect("this binary"))
                .env("HEALTHLB_CALLS", &spec)
                .status()
                .expect("the calls child");
            assert!(status.success(), "{contender}: {status}");
        }
        return;
    }
    for tool in ["valgrind", "strace"] {
        if Command::new(tool).arg("--version").output().is_err() {
            println!("calls: {tool} is not on the PATH; nothing measured");
            return;
        }
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| concurrency | contender | instructions per call | vs healthlb | syscalls per call | vs healthlb | mallocs per call |"
    );
    let _ = writeln!(table, "| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for &c in &concurrencies {
        let rows: Vec<(&str, f64, f64, f64)> = contenders
            .iter()
            .map(|name| {
                let spec = |n: usize| format!("{name}:{c}:{n}:{}", backends.port);
                let instr = per_call(|n| instructions(&spec(n)));
                let sys = per_call(|n| syscalls(&spec(n)));
                let mallocs = per_call(|n| mallocs(&spec(n)));
                eprintln!(
                    "calls: {name} at c={c}: {instr:.0} instructions, {sys:.2} syscalls, {mallocs:.1} mallocs per call"
                );
                (*name, instr, sys, mallocs)
            })
            .collect();
        let ours = rows.iter().find(|r| r.0 == "healthlb").copied();
        for (name, instr, sys, mallocs) in &rows {
            let vs = |mine: f64, theirs: Option<f64>| {
                theirs.map_or(String::new(), |t| format!("{:.2}×", mine / t))
            };
            let _ = writeln!(
                table,
                "| {c} | {name} | {instr:.0} | {} | {sys:.2} | {} | {mallocs:.1} |",
                vs(*instr, ours.map(|o| o.1)),
                vs(*sys, ours.map(|o| o.2)),
            );
        }
    }
    // What weighted round robin pays per call to read the call's ORCA
    // report from its trailers.
    let _ = writeln!(table);
    for (name, full) in [(ORCA_SCALARS, false), (ORCA_REPORT, true)] {
        let report = per_call(|n| instructions(&format!("{name}:1:{n}:0")));
        let size = report_trailers(full)
            .get("endpoint-load-metrics-bin")
            .map_or(0, |v| v.len());
        let _ = writeln!(
            table,
            "Reading one per-call ORCA load report ({name}: `endpoint-load-metrics-bin`, {size} bytes of base64) from a call's trailers: {report:.0} instructions."
        );
    }
    println!("\n{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("calls.md"), &table);
}

/// `(count(LONG) - count(SHORT)) / (LONG - SHORT)`.
fn per_call(count: impl Fn(usize) -> u64) -> f64 {
    let (short, long) = (count(SHORT), count(LONG));
    long.saturating_sub(short) as f64 / (LONG - SHORT) as f64
}

/// This binary's child for `spec` under valgrind's `tool`: its stderr,
/// where the tool writes its totals.
fn under_valgrind(tool: &str, spec: &str) -> String {
    let out = std::env::temp_dir().join(format!("healthlb-{tool}-{}", std::process::id()));
    let output = Command::new("valgrind")
        .arg(format!("--tool={tool}"))
        .arg(format!("--{tool}-out-file={}", out.display()))
        .arg(std::env::current_exe().expect("this binary"))
        .env("HEALTHLB_CALLS", spec)
        .output()
        .expect("valgrind runs");
    let _ = std::fs::remove_file(&out);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{spec} under {tool}: {stderr}");
    stderr
}

/// User-space instructions the child executed, by callgrind.
fn instructions(spec: &str) -> u64 {
    let stderr = under_valgrind("callgrind", spec);
    // "==123== Collected : 4567890"
    stderr
        .lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, n)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no instruction count from callgrind: {stderr}"))
}

/// Heap blocks the child allocated, every thread, by valgrind's dhat.
fn mallocs(spec: &str) -> u64 {
    let stderr = under_valgrind("dhat", spec);
    // "==123== Total:     4,567 bytes in 89 blocks"
    stderr
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("Total:")?;
            let (_, blocks) = rest.split_once(" in ")?;
            blocks.split_whitespace().next().map(|n| n.replace(',', ""))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no block count from dhat: {stderr}"))
}

/// Syscalls the child made, every thread, by strace.
fn syscalls(spec: &str) -> u64 {
    let out = std::env::temp_dir().join(format!("healthlb-strace-{}", std::process::id()));
    let status = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&out)
        .arg(std::env::current_exe().expect("this binary"))
        .env("HEALTHLB_CALLS", spec)
        .status()
        .expect("strace runs");
    assert!(status.success(), "{spec} under strace");
    let summary = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    // The last line: "100.00  0.123456  1  123456  789  total".
    summary
        .lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no syscall count from strace: {summary}"))
}

/// The children that read per-call ORCA reports instead of making calls:
/// one with two named maps, and one of the scalars alone.
const ORCA_REPORT: &str = "orca report with maps";
const ORCA_SCALARS: &str = "orca report of scalars";

/// Trailers with a per-call report: the scalars weighted round robin
/// reads, and with `full` a named metric and a request cost it skips.
fn report_trailers(full: bool) -> http::HeaderMap {
    use prost::Message;
    let mut report = healthlb::orca::OrcaLoadReport {
        cpu_utilization: 0.42,
        mem_utilization: 0.3,
        rps_fractional: 812.5,
        eps: 1.5,
        application_utilization: 0.37,
        ..Default::default()
    };
    if full {
        report.named_metrics = [("queue_depth".to_owned(), 4.0)].into();
        report.request_cost = [("db_reads".to_owned(), 3.0)].into();
    }
    let value = tonic::metadata::MetadataValue::from_bytes(&report.encode_to_vec());
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert_bin("endpoint-load-metrics-bin", value);
    let mut trailers = metadata.into_headers();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// Reads the report in `report_trailers` `n` times, as each call's end does.
fn read_reports(n: usize, full: bool) {
    let trailers = report_trailers(full);
    let reader = healthlb::internals::LoadReportReader::default();
    for _ in 0..n {
        reader.read(std::hint::black_box(&trailers));
    }
    assert!(reader.weight() > 0.0, "the report reads");
}

/// The measured child: `NAME:CONCURRENCY:CALLS:PORT`. Builds the contender,
/// warms it up, makes `CALLS` calls from `CONCURRENCY` callers, exits.
fn run_calls(spec: &str) {
    let mut parts = spec.rsplitn(4, ':');
    let port: u16 = parts.next().and_then(|p| p.parse().ok()).expect("PORT");
    let calls: usize = parts.next().and_then(|p| p.parse().ok()).expect("CALLS");
    let concurrency: usize = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("CONCURRENCY");
    let name = parts.next().expect("NAME").to_owned();
    if name == ORCA_REPORT || name == ORCA_SCALARS {
        read_reports(calls, name == ORCA_REPORT);
        return;
    }
    let addrs: Vec<SocketAddr> = (0..4).map(|i| servers::addr(i, port)).collect();
    if std::env::var("HEALTHLB_CALLS_SUBSCRIBER").is_ok_and(|v| v == "1") {
        let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::new());
    }
    let runtime = peers::client_runtime();
    runtime.block_on(async move {
        let mut contender = peers::build(&name, &addrs)
            .await
            .unwrap_or_else(|| panic!("no contender {name:?}"));
        peers::warm_up(&mut contender).await;
        let per_task = calls.div_ceil(concurrency);
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let mut contender = contender.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        contender.call().await.expect("a call");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a caller");
        }
    });
}
