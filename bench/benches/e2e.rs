//! End to end, side by side in one run: unary echo calls over loopback to 4
//! tonic backends (127.0.0.2–5, each in its own runtime thread), through
//!
//! 1. a direct tonic `Channel` to one backend (the reference: no balancing),
//! 2. tonic's `Channel::balance_list` over the 4,
//! 3. ginepro over the 4 (tonic 0.13, via a renamed dependency),
//! 4. warm_channels over the 4 (tower p2c over health-checked connections),
//! 5. healthlb's `LbChannel` over the 4,
//! 6. the same with a Prometheus recorder installed (the `metrics` feature's
//!    cost).
//!
//! Criterion measures the time per call at concurrency 64. Then a table pass
//! measures calls/s and p50/p99 latency at concurrency 1, 16, 64 and 256,
//! interleaving the contenders over several rounds. Each figure is the
//! median over rounds; each ratio to healthlb is taken within a round, then
//! the median over rounds. It also reports the CPU time the client's own
//! threads spent per call, which the servers sharing the machine don't blur.
//! It writes the table and an SVG plot to `target/healthlb-bench/`.
//!
//! `cargo bench --bench e2e` (`HEALTHLB_BENCH_SECS`, default 2, sets the
//! length of one measurement in the table pass; `HEALTHLB_BENCH_ROUNDS`,
//! default 5, the rounds; `HEALTHLB_BENCH_CONCURRENCY`, default `1,16,64,256`,
//! the concurrencies). `HEALTHLB_BENCH_PROFILE=healthlb` runs one contender
//! alone for 10 s at concurrency 64 (or the first of
//! `HEALTHLB_BENCH_CONCURRENCY`), for perf.

use healthlb_bench::peers;
use healthlb_testkit as support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::Criterion;
use peers::{Contender, Sample, env_or, measure};
use support::echo::{Backend, free_port, loopback};

fn main() {
    let runtime = peers::client_runtime();
    let port = free_port();
    let (backends, contenders) = runtime.block_on(async {
        let mut backends = Vec::new();
        for n in 2..=5u8 {
            backends.push(Backend::start(&format!("b{n}"), loopback(n, port)).await);
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let contenders = peers::standard(&addrs, true).await;
        (backends, contenders)
    });

    // Without `--bench` (as `cargo test --all-targets` runs it), one short
    // round at two concurrencies: a check that every contender works.
    let full = support::benchmarking();
    let default_levels: &[usize] = if full { &[1, 16, 64, 256] } else { &[1, 16] };
    let concurrency_levels = peers::concurrencies(default_levels);
    // For profiling: one contender at one concurrency for 10 s, nothing else.
    if let Ok(only) = std::env::var("HEALTHLB_BENCH_PROFILE") {
        let concurrency =
            std::env::var("HEALTHLB_BENCH_CONCURRENCY").map_or(64, |_| concurrency_levels[0]);
        if let Some(contender) = contenders.iter().find(|c| c.name() == only) {
            let sample = runtime.block_on(measure(contender, concurrency, Duration::from_secs(10)));
            println!("{only}: {sample:?}");
        }
        return;
    }

    // Criterion: time per call at concurrency 64, each contender.
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("e2e_unary_c64");
        group.throughput(criterion::Throughput::Elements(1));
        for contender in &contenders {
            group.bench_function(contender.name(), |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let contender = contender.clone();
                    async move {
                        let per_task = iters.div_ceil(64);
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..64)
                            .map(|_| {
                                let mut c = contender.clone();
                                tokio::spawn(async move {
                                    for _ in 0..per_task {
                                        let _ = c.call().await;
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            let _ = task.await;
                        }
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per_task * 64) as f64)
                    }
                })
            });
        }
        group.finish();
    }

    // The table pass.
    let (secs, rounds) = if full { (2.0, 5.0) } else { (0.2, 1.0) };
    let length = Duration::from_secs_f64(env_or("HEALTHLB_BENCH_SECS", secs).clamp(0.2, 60.0));
    let rounds = env_or("HEALTHLB_BENCH_ROUNDS", rounds).clamp(1.0, 20.0) as usize;
    let results = runtime.block_on(peers::rounds(
        &contenders,
        &concurrency_levels,
        rounds,
        length,
    ));
    if !full {
        for (i, samples) in results.iter().enumerate() {
            let name = contenders[i % contenders.len()].name();
            for s in samples {
                assert!(s.calls_per_sec > 0.0, "{name} made no call: {s:?}");
                assert_eq!(s.failed, 0, "{name} failed calls: {s:?}");
            }
        }
    }
    let base = peers::healthlb_index(&contenders);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| concurrency | contender | calls/s | p50 | p99 | client CPU per call | failed | calls/s vs healthlb | p50 vs healthlb | client CPU vs healthlb |"
    );
    let _ = writeln!(
        table,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut series: Vec<Vec<(usize, f64)>> = vec![Vec::new(); contenders.len()];
    for (ci, &concurrency) in concurrency_levels.iter().enumerate() {
        let samples = |k: usize| &results[ci * contenders.len() + k];
        let ours = samples(base);
        for (k, contender) in contenders.iter().enumerate() {
            let mine = samples(k);
            let paired = peers::Paired { mine, ours };
            let (of, vs) = (|f| paired.of(f), |f| paired.vs(f));
            let calls = |s: &Sample| s.calls_per_sec;
            let p50 = |s: &Sample| s.p50.as_secs_f64();
            let p99 = |s: &Sample| s.p99.as_secs_f64();
            let cpu = |s: &Sample| s.client_cpu.as_secs_f64();
            series[k].push((concurrency, of(calls)));
            let _ = writeln!(
                table,
                "| {concurrency} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs | {} | {:.2}× | {:.2}× | {:.2}× |",
                contender.name(),
                of(calls),
                of(p50) * 1e6,
                of(p99) * 1e6,
                of(cpu) * 1e6,
                mine.iter().map(|s| s.failed).sum::<u64>(),
                vs(calls),
                vs(p50),
                vs(cpu),
            );
        }
    }
    println!("\n{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("e2e.md"), &table);
    let names: Vec<&str> = contenders.iter().map(Contender::name).collect();
    match plot(
        &dir.join("throughput.svg"),
        &names,
        &concurrency_levels,
        &series,
    ) {
        Ok(()) => println!("wrote {}", dir.join("throughput.svg").display()),
        Err(e) => println!("plot failed: {e}"),
    }
    drop(contenders);
    runtime.block_on(async {
        for backend in backends {
            backend.stop().await;
        }
    });
    criterion.final_summary();
}

fn plot(
    path: &std::path::Path,
    names: &[&str],
    levels: &[usize],
    series: &[Vec<(usize, f64)>],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = series.iter().flatten().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Unary calls/s against concurrency (4 loopback backends)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..(levels.len().max(2) - 1) as f64, 0f64..max.max(1.0))?;
    chart
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&|x| {
            levels
                .get(x.round() as usize)
                .map(|c| c.to_string())
                .unwrap_or_default()
        })
        .x_desc("concurrent callers")
        .y_desc("calls/s")
        .draw()?;
    let colors = [BLUE, RED, GREEN, CYAN, BLACK, MAGENTA];
    for (k, points) in series.iter().enumerate() {
        let color = colors[k % colors.len()];
        let line = points.iter().enumerate().map(|(i, p)| (i as f64, p.1));
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(names[k])
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
