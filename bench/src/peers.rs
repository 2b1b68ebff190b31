//! The contenders the benchmarks measure side by side, and how one
//! measurement runs: healthlb (with each policy), a direct tonic `Channel`,
//! tonic's `balance_list`, ginepro 0.9 (tonic 0.13, via a renamed
//! dependency) and warm_channels 0.3 (tower p2c over health-checked
//! connections).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use healthlb::LbChannel;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use healthlb_testkit::echo::pb::echo_client::EchoClient;
use healthlb_testkit::echo::pb::{EchoReply, EchoRequest};

/// warm_channels' gRPC channel over plain TCP, with `TCP_NODELAY`.
pub type WarmChannel = warm_channels::grpc::GRPCChannel<SocketAddr, NoDelayConnector>;

/// warm_channels' `TCPConnector` with `TCP_NODELAY` set, as tonic and
/// healthlb set it by default. Without it, every small call waits out
/// Nagle's algorithm and the peer's delayed ACK: about 44 ms on loopback.
#[derive(Clone, Copy, Default)]
pub struct NoDelayConnector;

impl warm_channels::Connector<SocketAddr> for NoDelayConnector {
    type IO = tokio::net::TcpStream;
    type Error = std::io::Error;

    // The trait wants a 'static future, which an `async fn` borrowing
    // `self` isn't.
    #[allow(clippy::manual_async_fn)]
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + Sync + 'static {
        async move {
            let connect = tokio::net::TcpStream::connect(addr);
            let stream = tokio::time::timeout(Duration::from_secs(30), connect)
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::TimedOut, e))??;
            stream.set_nodelay(true)?;
            Ok(stream)
        }
    }
}

#[derive(Clone)]
pub enum Contender {
    Direct(EchoClient<Channel>),
    BalanceList(EchoClient<Channel>),
    Ginepro(tonic013::client::Grpc<ginepro::LoadBalancedChannel>),
    Healthlb(EchoClient<LbChannel>),
    /// healthlb with a Prometheus recorder installed: the `metrics`
    /// feature's cost.
    HealthlbMetrics(EchoClient<LbChannel>),
    /// healthlb recording gRPC's standard metrics on an OpenTelemetry SDK
    /// meter provider, its A72 spans going to no subscriber.
    HealthlbOtel(EchoClient<LbChannel>),
    /// healthlb with a policy other than the default, by name.
    HealthlbPolicy(&'static str, EchoClient<LbChannel>),
    WarmChannels(EchoClient<WarmChannel>),
    /// tonic's codec over h2 driven directly: the anchor of the per-call
    /// benches ([`crate::anchor`]).
    TonicOverH2(&'static str, EchoClient<crate::anchor::H2Channel>),
}

impl Contender {
    pub fn name(&self) -> &'static str {
        match self {
            Contender::Direct(_) => "direct Channel",
            Contender::BalanceList(_) => "tonic balance_list",
            Contender::Ginepro(_) => "ginepro",
            Contender::Healthlb(_) => "healthlb",
            Contender::HealthlbMetrics(_) => "healthlb + metrics",
            Contender::HealthlbOtel(_) => OTEL,
            Contender::HealthlbPolicy(name, _) => name,
            Contender::WarmChannels(_) => "warm_channels",
            Contender::TonicOverH2(name, _) => name,
        }
    }

    pub async fn call(&mut self) -> Result<(), String> {
        let request = EchoRequest {
            message: "bench".into(),
        };
        match self {
            Contender::Direct(client) | Contender::BalanceList(client) => client
                .unary(request)
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
            Contender::Healthlb(client)
            | Contender::HealthlbMetrics(client)
            | Contender::HealthlbOtel(client)
            | Contender::HealthlbPolicy(_, client) => client
                .unary(request)
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
            Contender::Ginepro(grpc) => ginepro_unary(grpc, request).await,
            Contender::WarmChannels(client) => client
                .unary(request)
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
            Contender::TonicOverH2(_, client) => client
                .unary(request)
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
        }
    }
}

/// A unary call through ginepro's tonic-0.13 channel, made the way tonic
/// 0.13's generated code makes it (`client::Grpc::unary`), with a prost
/// codec: tonic 0.13 expects prost 0.13, and the echo messages are prost
/// 0.14, so the codec is spelled out here.
pub async fn ginepro_unary(
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

pub struct StaticLookup(pub Vec<SocketAddr>);

#[async_trait::async_trait]
impl ginepro::LookupService for StaticLookup {
    async fn resolve_service_endpoints(
        &self,
        _: &ginepro::ServiceDefinition,
    ) -> Result<HashSet<SocketAddr>, anyhow::Error> {
        Ok(self.0.iter().copied().collect())
    }
}

pub async fn healthlb_all_serving(channel: &LbChannel, n: usize) {
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
pub struct Sample {
    pub calls_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
    pub failed: u64,
    /// CPU time the client runtime's threads spent per call: the balancer's
    /// own cost, apart from the servers sharing the machine.
    pub client_cpu: Duration,
}

/// The name of the client runtime's threads, to tell their CPU time apart.
pub const CLIENT_THREAD: &str = "bench-client";

/// CPU time so far of this process's threads named [`CLIENT_THREAD`], from
/// `/proc` (nanoseconds on CPU, per thread). Zero where there is no `/proc`.
pub fn client_cpu_time() -> Duration {
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

pub async fn measure(contender: &Contender, concurrency: usize, length: Duration) -> Sample {
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
        mean: Duration::from_micros(
            all.iter().map(|&us| u64::from(us)).sum::<u64>() / (all.len().max(1) as u64),
        ),
        failed,
        client_cpu: cpu / u32::try_from(all.len().max(1)).unwrap_or(u32::MAX),
    }
}

/// The concurrencies to measure: `HEALTHLB_BENCH_CONCURRENCY` as a
/// comma-separated list, or `default`.
pub fn concurrencies(default: &[usize]) -> Vec<usize> {
    let chosen = healthlb_testkit::env_list("HEALTHLB_BENCH_CONCURRENCY", 1..=4096);
    if chosen.is_empty() {
        default.to_vec()
    } else {
        chosen
    }
}

/// Every contender at every concurrency, `rounds` times over, each
/// measurement `length` long, interleaved so that a machine that slows down
/// slows every contender alike. The samples of concurrency `ci` and
/// contender `k` are at `ci * contenders.len() + k`.
pub async fn rounds(
    contenders: &[Contender],
    levels: &[usize],
    rounds: usize,
    length: Duration,
) -> Vec<Vec<Sample>> {
    let mut results = vec![Vec::new(); contenders.len() * levels.len()];
    for (ci, &concurrency) in levels.iter().enumerate() {
        for _ in 0..rounds {
            for (k, contender) in contenders.iter().enumerate() {
                let sample = measure(contender, concurrency, length).await;
                results[ci * contenders.len() + k].push(sample);
            }
        }
    }
    results
}

/// Where healthlb (round robin, no recorder) is among `contenders`.
pub fn healthlb_index(contenders: &[Contender]) -> usize {
    contenders
        .iter()
        .position(|c| matches!(c, Contender::Healthlb(_)))
        .unwrap_or(0)
}

/// The median, `NaN` for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One contender's samples over the rounds, next to healthlb's of the
/// same rounds.
pub struct Paired<'a> {
    pub mine: &'a [Sample],
    pub ours: &'a [Sample],
}

impl Paired<'_> {
    /// The median of `f` over the rounds.
    pub fn of(&self, f: fn(&Sample) -> f64) -> f64 {
        median(self.mine.iter().map(f).collect())
    }

    /// The paired ratio: each round's `f` over healthlb's in the same
    /// round, then the median over the rounds, so a machine that slows
    /// down between rounds moves both sides alike.
    pub fn vs(&self, f: fn(&Sample) -> f64) -> f64 {
        median(
            self.mine
                .iter()
                .zip(self.ours)
                .map(|(a, b)| f(a) / f(b).max(1e-12))
                .collect(),
        )
    }
}

pub fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// healthlb with gRPC's standard telemetry on: not a peer, the cost of the
/// feature `opentelemetry`, measured beside plain healthlb.
pub const OTEL: &str = "healthlb + opentelemetry";

/// tonic's codec over h2 driven directly, to the first address: not a
/// peer, the least a tonic call over HTTP/2 costs ([`crate::anchor`]).
pub const ANCHOR: &str = "tonic over h2";

/// The anchor over one connection per address, round robin: the least a
/// balancer's call costs.
pub const ANCHOR_RR: &str = "tonic over h2 (4 conns)";

/// The standard contenders, by name, in the order [`standard`] builds them.
pub const STANDARD: [&str; 5] = [
    "direct Channel",
    "tonic balance_list",
    "ginepro",
    "warm_channels",
    "healthlb",
];

/// The contender named `name` (one of [`STANDARD`]) over `addrs`; `None`
/// for another name. A direct `Channel` goes to the first address.
pub async fn build(name: &str, addrs: &[SocketAddr]) -> Option<Contender> {
    let endpoint = |a: &SocketAddr| Endpoint::from_shared(format!("http://{a}")).expect("valid");
    Some(match name {
        "direct Channel" => Contender::Direct(EchoClient::new(
            endpoint(&addrs[0]).connect().await.expect("direct connect"),
        )),
        "tonic balance_list" => Contender::BalanceList(EchoClient::new(Channel::balance_list(
            addrs.iter().map(endpoint),
        ))),
        "ginepro" => {
            let ginepro =
                ginepro::LoadBalancedChannel::builder(("echo.bench.local", addrs[0].port()))
                    .lookup_service(StaticLookup(addrs.to_vec()))
                    .channel()
                    .await
                    .expect("ginepro channel");
            Contender::Ginepro(tonic013::client::Grpc::new(ginepro))
        }
        "warm_channels" => Contender::WarmChannels(EchoClient::with_origin(
            warm_channel(addrs),
            format!("http://{}", addrs[0]).parse().expect("uri"),
        )),
        "healthlb" => Contender::Healthlb(EchoClient::new(healthlb_over(addrs).await)),
        ANCHOR => Contender::TonicOverH2(
            ANCHOR,
            EchoClient::with_origin(
                crate::anchor::H2Channel::connect(addrs[0])
                    .await
                    .expect("h2 connects"),
                format!("http://{}", addrs[0]).parse().expect("uri"),
            ),
        ),
        ANCHOR_RR => Contender::TonicOverH2(
            ANCHOR_RR,
            EchoClient::with_origin(
                crate::anchor::H2Channel::connect_all(addrs)
                    .await
                    .expect("h2 connects"),
                format!("http://{}", addrs[0]).parse().expect("uri"),
            ),
        ),
        OTEL => {
            // The SDK's reader, exporting to memory every 60 s (its default).
            let exporter = opentelemetry_sdk::metrics::InMemoryMetricExporter::default();
            let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build();
            let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                .with_reader(reader)
                .build();
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            let channel = LbChannel::builder(format!("ipv4:{}", list.join(",")))
                .meter_provider(provider)
                .connect()
                .await
                .expect("healthlb connects");
            healthlb_all_serving(&channel, addrs.len()).await;
            Contender::HealthlbOtel(EchoClient::new(channel))
        }
        _ => return None,
    })
}

/// A healthlb channel over `addrs`, every endpoint SERVING.
async fn healthlb_over(addrs: &[SocketAddr]) -> LbChannel {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let channel = LbChannel::builder(format!("ipv4:{}", list.join(",")))
        .connect()
        .await
        .expect("healthlb connects");
    healthlb_all_serving(&channel, addrs.len()).await;
    channel
}

/// Makes calls until 200 succeed (bounded in count and time), so that
/// connections are open and the peers' discovery and health checks ran.
pub async fn warm_up(contender: &mut Contender) {
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..10_000 {
        if ok >= 200 || started.elapsed() > Duration::from_secs(10) {
            break;
        }
        if contender.call().await.is_ok() {
            ok += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The contenders side by side over `addrs`, warmed up: a direct tonic
/// `Channel` to the first, tonic's `balance_list`, ginepro, warm_channels
/// and healthlb, then, with `metrics`, healthlb recording into a Prometheus
/// recorder (installed here, for the rest of the process).
pub async fn standard(addrs: &[SocketAddr], metrics: bool) -> Vec<Contender> {
    let mut all = Vec::new();
    for name in STANDARD {
        all.push(build(name, addrs).await.expect("a standard contender"));
    }
    if metrics {
        // Channels built from here on record into Prometheus; the one above
        // registered its per-endpoint counters with no recorder.
        let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
        all.push(Contender::HealthlbMetrics(EchoClient::new(
            healthlb_over(addrs).await,
        )));
        all.push(
            build(OTEL, addrs)
                .await
                .expect("healthlb with OpenTelemetry"),
        );
    }
    for contender in &mut all {
        warm_up(contender).await;
    }
    all
}

/// A warm_channels channel over `addrs`, health-checking the whole server
/// (service ""), with one connection per address.
pub fn warm_channel(addrs: &[SocketAddr]) -> WarmChannel {
    let uri: http::Uri = format!("http://{}", addrs[0]).parse().expect("uri");
    let mut config = warm_channels::grpc::GRPCChannelConfig::default();
    config.health_checking.service = Some(String::new().into());
    config.pool.n_subchannels_want = addrs.len();
    config.pool.n_subchannels_max = addrs.len();
    config.pool.n_subchannels_healthy_min = 1;
    let resolved = futures::stream::once(futures::future::ready(Ok::<_, std::io::Error>(
        addrs.to_vec(),
    )))
    .chain(futures::stream::pending());
    let (channel, worker) =
        warm_channels::grpc_channel(uri, config, "bench", NoDelayConnector, resolved, |_| {});
    tokio::spawn(worker);
    channel
}

/// The client's multi-threaded runtime, its threads named [`CLIENT_THREAD`]
/// so their CPU time can be told apart from the servers'.
pub fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .expect("runtime")
}
