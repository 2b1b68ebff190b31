//! End to end, side by side in one run: unary echo calls over loopback to 4
//! tonic backends (127.0.0.2–5, each in its own runtime thread), through
//!
//! 1. a direct tonic `Channel` to one backend (the reference: no balancing),
//! 2. tonic's `Channel::balance_list` over the 4,
//! 3. ginepro over the 4 (tonic 0.13, via a renamed dependency),
//! 4. healthlb's `LbChannel` over the 4,
//! 5. the same with a Prometheus recorder installed (the `metrics` feature's
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
//! default 5, the rounds). `HEALTHLB_BENCH_PROFILE=healthlb` runs one
//! contender alone for 10 s, for perf.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::Criterion;
use healthlb::LbChannel;
use prost::Message;
use support::echo::pb::echo_client::EchoClient;
use support::echo::pb::{EchoReply, EchoRequest};
use support::echo::{Backend, free_port, loopback};
use tonic::transport::{Channel, Endpoint};

const CONCURRENCY: [usize; 4] = [1, 16, 64, 256];

#[derive(Clone)]
enum Contender {
    Direct(EchoClient<Channel>),
    BalanceList(EchoClient<Channel>),
    Ginepro(tonic013::client::Grpc<ginepro::LoadBalancedChannel>),
    Healthlb(EchoClient<LbChannel>),
    /// healthlb with a Prometheus recorder installed: the `metrics`
    /// feature's cost.
    HealthlbMetrics(EchoClient<LbChannel>),
}

impl Contender {
    fn name(&self) -> &'static str {
        match self {
            Contender::Direct(_) => "direct Channel",
            Contender::BalanceList(_) => "tonic balance_list",
            Contender::Ginepro(_) => "ginepro",
            Contender::Healthlb(_) => "healthlb",
            Contender::HealthlbMetrics(_) => "healthlb + metrics",
        }
    }

    async fn call(&mut self) -> Result<(), String> {
        let request = EchoRequest {
            message: "bench".into(),
        };
        match self {
            Contender::Direct(client) | Contender::BalanceList(client) => client
                .unary(request)
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
            Contender::Healthlb(client) | Contender::HealthlbMetrics(client) => client
                .unary(request)
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
            Contender::Ginepro(grpc) => ginepro_unary(grpc, request).await,
        }
    }
}

/// A unary call through ginepro's tonic-0.13 channel, made the way tonic
/// 0.13's generated code makes it (`client::Grpc::unary`), with a prost
/// codec: tonic 0.13 expects prost 0.13, and the echo messages are prost
/// 0.14, so the codec is spelled out here.
async fn ginepro_unary(
    grpc: &mut tonic013::client::Grpc<ginepro::LoadBalancedChannel>,
    request: EchoRequest,
) -> Result<(), String> {
    grpc.ready().await.map_err(|e| e.to_string())?;
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Unary");
    grpc.unary(
        tonic013::Request::new(request),
        path,
        Prost013::<EchoRequest, EchoReply>::default(),
    )
    .await
    .map(drop)
    .map_err(|s| s.to_string())
}

/// tonic 0.13's codec trait over prost 0.14 messages: what tonic 0.13's own
/// `ProstCodec` does.
struct Prost013<E, D>(std::marker::PhantomData<(E, D)>);

impl<E, D> Default for Prost013<E, D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<E, D> tonic013::codec::Codec for Prost013<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = Prost013<E, D>;
    type Decoder = Prost013<E, D>;

    fn encoder(&mut self) -> Self::Encoder {
        Self::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Self::default()
    }
}

impl<E: Message, D> tonic013::codec::Encoder for Prost013<E, D> {
    type Item = E;
    type Error = tonic013::Status;

    fn encode(
        &mut self,
        item: E,
        dst: &mut tonic013::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic013::Status> {
        item.encode(dst)
            .map_err(|e| tonic013::Status::internal(e.to_string()))
    }
}

impl<E, D: Message + Default> tonic013::codec::Decoder for Prost013<E, D> {
    type Item = D;
    type Error = tonic013::Status;

    fn decode(
        &mut self,
        src: &mut tonic013::codec::DecodeBuf<'_>,
    ) -> Result<Option<D>, tonic013::Status> {
        D::decode(src)
            .map(Some)
            .map_err(|e| tonic013::Status::internal(e.to_string()))
    }
}

struct StaticLookup(Vec<SocketAddr>);

#[async_trait::async_trait]
impl ginepro::LookupService for StaticLookup {
    async fn resolve_service_endpoints(
        &self,
        _: &ginepro::ServiceDefinition,
    ) -> Result<HashSet<SocketAddr>, anyhow::Error> {
        Ok(self.0.iter().copied().collect())
    }
}

async fn contenders(addrs: &[SocketAddr]) -> Vec<Contender> {
    let endpoint = |a: &SocketAddr| Endpoint::from_shared(format!("http://{a}")).expect("valid");
    let direct = endpoint(&addrs[0]).connect().await.expect("direct connect");
    let balanced = Channel::balance_list(addrs.iter().map(endpoint));
    let ginepro = ginepro::LoadBalancedChannel::builder(("echo.bench.local", addrs[0].port()))
        .lookup_service(StaticLookup(addrs.to_vec()))
        .channel()
        .await
        .expect("ginepro channel");
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let healthlb = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .connect()
        .await
        .expect("healthlb connects");
    healthlb_all_serving(&healthlb, addrs.len()).await;
    // Channels built from here on record into Prometheus; the one above
    // registered its per-endpoint counters with no recorder.
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    let measured = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .connect()
        .await
        .expect("healthlb connects");
    healthlb_all_serving(&measured, addrs.len()).await;
    let mut all = vec![
        Contender::Direct(EchoClient::new(direct)),
        Contender::BalanceList(EchoClient::new(balanced)),
        Contender::Ginepro(tonic013::client::Grpc::new(ginepro)),
        Contender::Healthlb(EchoClient::new(healthlb)),
        Contender::HealthlbMetrics(EchoClient::new(measured)),
    ];
    // Warm every contender up, and let ginepro's and tonic's discovery run.
    for contender in &mut all {
        for _ in 0..200 {
            let _ = contender.call().await;
        }
    }
    all
}

async fn healthlb_all_serving(channel: &LbChannel, n: usize) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if channel
            .endpoints()
            .iter()
            .filter(|e| e.state.is_serving())
            .count()
            == n
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One measurement: `concurrency` callers for `length`.
#[derive(Clone, Copy, Debug)]
struct Sample {
    calls_per_sec: f64,
    p50: Duration,
    p99: Duration,
    failed: u64,
    /// CPU time the client runtime's threads spent per call: the balancer's
    /// own cost, apart from the servers sharing the machine.
    client_cpu: Duration,
}

/// The name of the client runtime's threads, to tell their CPU time apart.
const CLIENT_THREAD: &str = "bench-client";

/// CPU time so far of this process's threads named [`CLIENT_THREAD`], from
/// `/proc` (nanoseconds on CPU, per thread). Zero where there is no `/proc`.
fn client_cpu_time() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut total = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let is_client = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|comm| comm.trim_end().starts_with(CLIENT_THREAD));
        if !is_client {
            continue;
        }
        total += std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(total)
}

async fn measure(contender: &Contender, concurrency: usize, length: Duration) -> Sample {
    let cpu_before = client_cpu_time();
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut contender = contender.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut failed = 0u64;
            // Bounded in count as well as time.
            for _ in 0..10_000_000 {
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match contender.call().await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u32),
                    Err(_) => failed += 1,
                }
            }
            (latencies, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (latencies, f) = task.await.expect("caller");
        all.extend(latencies);
        failed += f;
    }
    let elapsed = start.elapsed();
    let cpu = client_cpu_time().saturating_sub(cpu_before);
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        Duration::from_micros(u64::from(all.get(i).copied().unwrap_or(0)))
    };
    Sample {
        calls_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        failed,
        client_cpu: cpu / u32::try_from(all.len().max(1)).unwrap_or(u32::MAX),
    }
}

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .expect("runtime");
    let port = free_port();
    let (backends, contenders) = runtime.block_on(async {
        let mut backends = Vec::new();
        for n in 2..=5u8 {
            backends.push(Backend::start(&format!("b{n}"), loopback(n, port)).await);
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let contenders = contenders(&addrs).await;
        (backends, contenders)
    });

    // For profiling: one contender at concurrency 64 for 10 s, nothing else.
    if let Ok(only) = std::env::var("HEALTHLB_BENCH_PROFILE") {
        if let Some(contender) = contenders.iter().find(|c| c.name() == only) {
            let sample = runtime.block_on(measure(contender, 64, Duration::from_secs(10)));
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
    let length = Duration::from_secs_f64(env_or("HEALTHLB_BENCH_SECS", 2.0).clamp(0.2, 60.0));
    let rounds = env_or("HEALTHLB_BENCH_ROUNDS", 5.0).clamp(1.0, 20.0) as usize;
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); contenders.len() * CONCURRENCY.len()];
    runtime.block_on(async {
        for (ci, &concurrency) in CONCURRENCY.iter().enumerate() {
            for _ in 0..rounds {
                for (k, contender) in contenders.iter().enumerate() {
                    let sample = measure(contender, concurrency, length).await;
                    results[ci * contenders.len() + k].push(sample);
                }
            }
        }
    });
    // Ratios are paired: each round's figure over healthlb's in the same
    // round, then the median over rounds, so a machine that slows down or
    // speeds up between rounds moves both sides of a ratio alike.
    fn median(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    }
    let base = contenders
        .iter()
        .position(|c| matches!(c, Contender::Healthlb(_)))
        .unwrap_or(0);
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
    for (ci, &concurrency) in CONCURRENCY.iter().enumerate() {
        let samples = |k: usize| &results[ci * contenders.len() + k];
        let ours = samples(base);
        for (k, contender) in contenders.iter().enumerate() {
            let mine = samples(k);
            let of = |f: fn(&Sample) -> f64| median(mine.iter().map(f).collect());
            let vs = |f: fn(&Sample) -> f64| {
                median(
                    mine.iter()
                        .zip(ours)
                        .map(|(a, b)| f(a) / f(b).max(1e-12))
                        .collect(),
                )
            };
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
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/healthlb-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("e2e.md"), &table);
    let names: Vec<&str> = contenders.iter().map(Contender::name).collect();
    match plot(&dir.join("throughput.svg"), &names, &series) {
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
        .build_cartesian_2d(0f64..(CONCURRENCY.len() - 1) as f64, 0f64..max.max(1.0))?;
    chart
        .configure_mesh()
        .x_labels(CONCURRENCY.len())
        .x_label_formatter(&|x| {
            CONCURRENCY
                .get(x.round() as usize)
                .map(|c| c.to_string())
                .unwrap_or_default()
        })
        .x_desc("concurrent callers")
        .y_desc("calls/s")
        .draw()?;
    let colors = [BLUE, RED, GREEN, BLACK, MAGENTA];
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
