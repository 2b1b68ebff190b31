//! Echo backends: real tonic servers with tonic-health, each in its own
//! runtime on its own thread, so a kill drops every connection at once, like
//! a crashed pod.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use healthlb::orca::{CallMetricsRecorder, OpenRcaService, OrcaLayer, ServerMetricsRecorder};
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub mod pb {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("echo");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, StreamRequest};

/// The service name the echo service registers under.
pub const ECHO_SERVICE: &str = "echo.Echo";

/// What a backend saw.
#[derive(Debug, Default)]
pub struct Counters {
    /// `grpc.health.v1.Health/Check` calls: liveness probes.
    pub health_checks: AtomicU64,
    pub unary: AtomicU64,
    pub streams: AtomicU64,
    pub bidi: AtomicU64,
    /// Headers of the last unary call.
    pub last_headers: Mutex<HashMap<String, String>>,
    /// When the first and the last unary call arrived.
    pub first_unary: Mutex<Option<Instant>>,
    pub last_unary: Mutex<Option<Instant>>,
    /// Server and bidi streams open right now, and the most at once.
    pub open_streams: AtomicU64,
    pub max_open_streams: AtomicU64,
    /// Unary calls fail with this gRPC code when not 0 (a gray failure:
    /// the health service still says SERVING).
    pub fail_with: AtomicI32,
    /// Unary calls take this long first, in µs (a slow pod).
    pub delay_us: AtomicU64,
    /// The next this many unary and server-streaming calls fail with
    /// UNAVAILABLE, trailers-only, before any reply.
    pub fail_next: AtomicU64,
    /// Every this-many-th unary call fails with UNAVAILABLE (2: a flaky
    /// pod failing half its calls); 0 is never.
    pub fail_every: AtomicU64,
    /// A `grpc-retry-pushback-ms` on the failures above and `fail_with`'s.
    pub pushback_ms: Mutex<Option<String>>,
    /// Server streams fail with UNAVAILABLE after this many replies, once
    /// their headers went out (a committed call failing later); 0 is never.
    pub stream_fail_after: AtomicU64,
    /// Unary calls the client cancelled before they finished.
    pub cancelled: AtomicU64,
    /// Unary calls that came with `grpc-previous-rpc-attempts`: retries.
    pub retried: AtomicU64,
    /// The `grpc-timeout` of every unary and bidi call, in arrival order.
    pub timeouts: Mutex<Vec<String>>,
    /// The W3C `traceparent` of every unary and bidi call ("-" without
    /// one), in arrival order.
    pub traceparents: Mutex<Vec<String>>,
    /// The decoded `grpc-trace-bin` of every unary and bidi call (empty
    /// without one), in arrival order.
    pub trace_bins: Mutex<Vec<Vec<u8>>>,
    /// How bidi calls answer.
    pub bidi_mode: Mutex<BidiMode>,
    /// Bidi calls whose whole request stream, up to its end, was read.
    pub bidi_read_whole: AtomicU64,
    /// With ORCA on: each unary call reports this cost per call, in
    /// thousandths, as its utilization: qps × cost (0: the call reports
    /// nothing of its own).
    pub cost_milli: AtomicU64,
    /// Unary calls are served one at a time, each taking this long, in
    /// ms (0: at once, side by side): a pod with a fixed capacity.
    pub service_ms: AtomicU64,
    /// The one lane `service_ms` calls queue for.
    pub lane: tokio::sync::Mutex<()>,
    /// Unary calls being served right now, and the most at once.
    pub unary_in_flight: AtomicU64,
    pub max_unary_in_flight: AtomicU64,
}

/// How a bidi call answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BidiMode {
    /// One reply per request message, as it comes.
    #[default]
    Echo,
    /// Reads the whole request stream, then fails with UNAVAILABLE.
    FailAtEnd,
    /// Reads the whole request stream, waits this many ms, then sends one
    /// reply whose `seq` is the number of messages read.
    CountAtEnd(u64),
    /// Reads nothing; after this many ms sends its headers and one reply.
    AnswerAfter(u64),
}

/// Counts a unary call as cancelled if it is dropped unfinished, and in
/// flight while it lives.
struct Unfinished<'a>(&'a Counters, bool);

impl<'a> Unfinished<'a> {
    fn new(counters: &'a Counters) -> Self {
        let now = counters.unary_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counters
            .max_unary_in_flight
            .fetch_max(now, Ordering::SeqCst);
        Self(counters, false)
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.0.unary_in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Counts a stream open until dropped, with the high-water mark.
struct OpenStream(Arc<Counters>);

impl OpenStream {
    fn new(counters: &Arc<Counters>) -> Self {
        let now = counters.open_streams.fetch_add(1, Ordering::SeqCst) + 1;
        counters.max_open_streams.fetch_max(now, Ordering::SeqCst);
        Self(counters.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Counters {
    /// Records the call's `grpc-timeout`, or "-" without one.
    fn saw_timeout(&self, metadata: &tonic::metadata::MetadataMap) {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        self.timeouts.lock().unwrap().push(timeout.to_owned());
        let parent = metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        self.traceparents.lock().unwrap().push(parent.to_owned());
        let bin = metadata
            .get_bin("grpc-trace-bin")
            .and_then(|v| v.to_bytes().ok())
            .map(|b| b.to_vec())
            .unwrap_or_default();
        self.trace_bins.lock().unwrap().push(bin);
    }

    /// The `grpc-timeout`s seen so far, as durations (`None` for a call
    /// without one).
    pub fn timeouts_seen(&self) -> Vec<Option<Duration>> {
        self.timeouts
            .lock()
            .unwrap()
            .iter()
            .map(|t| parse_grpc_timeout(t))
            .collect()
    }

    /// Calls of every kind.
    pub fn total(&self) -> u64 {
        self.unary.load(Ordering::SeqCst)
            + self.streams.load(Ordering::SeqCst)
            + self.bidi.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct EchoImpl {
    name: Arc<str>,
    counters: Arc<Counters>,
    orca: Option<ServerMetricsRecorder>,
}

impl EchoImpl {
    /// UNAVAILABLE, with the pushback asked for.
    fn injected(&self) -> Status {
        Status::with_metadata(
            tonic::Code::Unavailable,
            format!("{} fails on purpose", self.name),
            self.pushback(),
        )
    }

    /// The `grpc-retry-pushback-ms` asked for, if any.
    fn pushback(&self) -> tonic::metadata::MetadataMap {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(ms) = self.counters.pushback_ms.lock().unwrap().as_deref() {
            metadata.insert("grpc-retry-pushback-ms", ms.parse().unwrap());
        }
        metadata
    }

    /// A failure while `fail_next` lasts.
    fn next_failure(&self) -> Option<Status> {
        self.counters
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()
            .map(|_| self.injected())
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoImpl {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let seq = self.counters.unary.fetch_add(1, Ordering::SeqCst) + 1;
        let mut unfinished = Unfinished::new(&self.counters);
        let now = Instant::now();
        self.counters.first_unary.lock().unwrap().get_or_insert(now);
        *self.counters.last_unary.lock().unwrap() = Some(now);
        let headers: HashMap<String, String> = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        if headers.contains_key("grpc-previous-rpc-attempts") {
            self.counters.retried.fetch_add(1, Ordering::SeqCst);
        }
        self.counters.saw_timeout(request.metadata());
        *self.counters.last_headers.lock().unwrap() = headers;
        let delay = self.counters.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        let service = self.counters.service_ms.load(Ordering::Relaxed);
        if service > 0 {
            let _lane = self.counters.lane.lock().await;
            tokio::time::sleep(Duration::from_millis(service)).await;
        }
        unfinished.1 = true;
        let cost = self.counters.cost_milli.load(Ordering::Relaxed);
        if let (Some(server), Some(call), true) =
            (&self.orca, CallMetricsRecorder::of(&request), cost > 0)
        {
            // What a pod that spends `cost` per call reports: its qps, and
            // qps × cost as its utilization; the weight is 1 / cost.
            let qps = server.measured_qps().max(1.0);
            call.set_qps(qps);
            call.set_application_utilization(qps * cost as f64 / 1000.0);
        }
        let every = self.counters.fail_every.load(Ordering::Relaxed);
        if every > 0 && seq.is_multiple_of(every) {
            return Err(self.injected());
        }
        if let Some(status) = self.next_failure() {
            return Err(status);
        }
        let code = self.counters.fail_with.load(Ordering::Relaxed);
        if code != 0 {
            return Err(Status::with_metadata(
                tonic::Code::from_i32(code),
                format!("{} fails on purpose", self.name),
                self.pushback(),
            ));
        }
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            backend: self.name.to_string(),
            seq: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.counters.streams.fetch_add(1, Ordering::SeqCst);
        if let Some(status) = self.next_failure() {
            return Err(status);
        }
        let fail_after = self.counters.stream_fail_after.load(Ordering::SeqCst);
        let StreamRequest {
            message,
            count,
            interval_ms,
        } = request.into_inner();
        let name = self.name.clone();
        let open = OpenStream::new(&self.counters);
        let stream = futures::stream::unfold(0u64, move |seq| {
            let (message, name) = (message.clone(), name.clone());
            let _open = &open;
            async move {
                if seq >= u64::from(count) {
                    return None;
                }
                if fail_after > 0 && seq >= fail_after {
                    let failed = Status::unavailable(format!("{name} fails mid-stream"));
                    return Some((Err(failed), u64::MAX));
                }
                // 0: back to back, as fast as flow control lets them go.
                if seq > 0 && interval_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(interval_ms))).await;
                }
                let reply = EchoReply {
                    message,
                    backend: name.to_string(),
                    seq,
                };
                Some((Ok(reply), seq + 1))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.counters.bidi.fetch_add(1, Ordering::SeqCst);
        self.counters.saw_timeout(request.metadata());
        let name = self.name.clone();
        let open = OpenStream::new(&self.counters);
        let mode = *self.counters.bidi_mode.lock().unwrap();
        let reply = |seq: u64| EchoReply {
            message: String::new(),
            backend: name.to_string(),
            seq,
        };
        match mode {
            BidiMode::Echo => {}
            BidiMode::FailAtEnd | BidiMode::CountAtEnd(_) => {
                let mut inbound = request.into_inner();
                let mut read = 0;
                while let Some(message) = inbound.next().await {
                    message?;
                    read += 1;
                }
                self.counters.bidi_read_whole.fetch_add(1, Ordering::SeqCst);
                let BidiMode::CountAtEnd(wait) = mode else {
                    return Err(Status::unavailable(format!(
                        "{} fails after the whole stream",
                        self.name
                    )));
                };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let one = futures::stream::iter([Ok(reply(read))]);
                return Ok(Response::new(Box::pin(one)));
            }
            BidiMode::AnswerAfter(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                // Holds the request stream, unread, until the client ends
                // the call.
                let held = request.into_inner();
                let rest = futures::stream::unfold(held, |held| async move {
                    std::future::pending::<()>().await;
                    drop(held);
                    None::<(Result<EchoReply, Status>, Streaming<EchoRequest>)>
                });
                let one = futures::stream::iter([Ok(reply(0))]).chain(rest);
                return Ok(Response::new(Box::pin(one)));
            }
        }
        let stream = request.into_inner().enumerate().map(move |(seq, item)| {
            let _open = &open;
            item.map(|req| EchoReply {
                message: req.message,
                backend: name.to_string(),
                seq: seq as u64,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Backends `b{first}`..`b{first+n-1}` on 127.0.0.`first`.. with one `port`,
/// like pods behind a headless Service.
pub async fn backends(first: u8, n: u8, port: u16) -> Vec<Backend> {
    let mut all = Vec::new();
    for i in first..first + n {
        all.push(Backend::start(&format!("b{i}"), loopback(i, port)).await);
    }
    all
}

/// How a backend is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Register tonic-health (default true).
    pub health: bool,
    /// Start SERVING (default true).
    pub serving: bool,
    /// tonic's `max_connection_age`: GOAWAY after this long.
    pub max_connection_age: Option<Duration>,
    /// Serve TLS with this identity.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS; hyper's default (200) when `None`.
    pub max_concurrent_streams: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE: how much a client may send on a
    /// stream before the server reads; hyper's default when `None`.
    pub stream_window: Option<u32>,
    /// ORCA load reports: per call through healthlb's `OrcaLayer`, and out
    /// of band through its `OpenRcaService` when `oob_interval` is set
    /// (its minimum interval). Off by default.
    pub orca: Option<OrcaOptions>,
}

/// How a backend reports its load.
#[derive(Debug, Clone, Default)]
pub struct OrcaOptions {
    /// Serve `OpenRcaService`, sending at least this often; without it a
    /// client asking for out-of-band reports gets UNIMPLEMENTED.
    pub oob_interval: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            health: true,
            serving: true,
            max_connection_age: None,
            tls: None,
            max_concurrent_streams: None,
            stream_window: None,
            orca: None,
        }
    }
}

pub struct Backend {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    /// The server's ORCA metrics, with `Options::orca`.
    pub orca: Option<ServerMetricsRecorder>,
    reporter: Option<HealthReporter>,
    shutdown: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

impl Backend {
    /// A SERVING backend named `name` on `addr` (port 0 picks one).
    pub async fn start(name: &str, addr: SocketAddr) -> Self {
        Self::start_with(name, addr, Options::default()).await
    }

    pub async fn start_with(name: &str, addr: SocketAddr, options: Options) -> Self {
        let name: Arc<str> = name.into();
        let counters = Arc::new(Counters::default());
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let status = if options.serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(ECHO_SERVICE, status).await;

        let (bound_tx, bound_rx) = oneshot::channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let (kill, kill_rx) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        let orca = options.orca.as_ref().map(|_| ServerMetricsRecorder::new());
        let echo = EchoImpl {
            name: name.clone(),
            counters: counters.clone(),
            orca: orca.clone(),
        };
        let server_orca = orca.clone();
        let checks = counters.clone();
        let thread_name = format!("backend-{name}");
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("backend runtime");
                runtime.block_on(async move {
                    let listener = match bind(addr) {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = bound_tx.send(Ok(listener.local_addr().expect("local addr")));
                    let counting =
                        tower::util::MapRequestLayer::new(move |request: http::Request<_>| {
                            if request.uri().path() == "/grpc.health.v1.Health/Check" {
                                checks.health_checks.fetch_add(1, Ordering::Relaxed);
                            }
                            request
                        });
                    // Without ORCA the layer is an identity.
                    let reports =
                        tower::util::option_layer(server_orca.clone().map(OrcaLayer::new));
                    let mut builder = Server::builder()
                        .layer(tower::ServiceBuilder::new().layer(counting).layer(reports));
                    if let Some(age) = options.max_connection_age {
                        builder = builder.max_connection_age(age);
                    }
                    if let Some(n) = options.max_concurrent_streams {
                        builder = builder.max_concurrent_streams(n);
                    }
                    if let Some(window) = options.stream_window {
                        builder = builder.initial_stream_window_size(window);
                    }
                    if let Some(tls) = options.tls {
                        builder = builder.tls_config(tls).expect("server TLS config");
                    }
                    let mut router = builder.add_service(EchoServer::new(echo));
                    if let (Some(recorder), Some(interval)) = (
                        server_orca,
                        options.orca.as_ref().and_then(|o| o.oob_interval),
                    ) {
                        router = router.add_service(
                            OpenRcaService::new(recorder).min_report_interval(interval),
                        );
                    }
                    if options.health {
                        router = router.add_service(health_service);
                    }
                    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                    let serve = router.serve_with_incoming_shutdown(incoming, async {
                        let _ = shutdown_rx.await;
                    });
                    tokio::select! {
                        _ = serve => {}
                        _ = kill_rx => {}
                    }
                });
                // Drops every connection task: their sockets close at once.
                runtime.shutdown_background();
                let _ = done_tx.send(());
            })
            .expect("backend thread");
        let addr = bound_rx
            .await
            .expect("backend thread reports")
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self {
            name,
            addr,
            counters,
            orca,
            reporter: Some(reporter),
            shutdown: Some(shutdown),
            kill: Some(kill),
            done: Some(done),
        }
    }

    /// Sets the whole server and `echo.Echo` SERVING or NOT_SERVING.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.set_status("", status).await;
        self.set_status(ECHO_SERVICE, status).await;
    }

    pub async fn set_status(&self, service: &str, status: ServingStatus) {
        if let Some(reporter) = &self.reporter {
            reporter.set_service_status(service, status).await;
        }
    }

    pub fn calls(&self) -> u64 {
        self.counters.total()
    }

    /// Graceful: GOAWAY, then calls finish. Killed if it takes over 10 s.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let done = self.done.take().expect("not stopped twice");
        if tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .is_err()
        {
            if let Some(kill) = self.kill.take() {
                let _ = kill.send(());
            }
            panic!("backend {} did not stop gracefully within 10 s", self.name);
        }
    }

    /// Abrupt: every connection drops, with no GOAWAY.
    pub async fn kill(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A `grpc-timeout` value as a duration.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `127.0.0.N:port`
pub fn loopback(n: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], port))
}

/// A free port on 127.0.0.1, for tests that put backends on 127.0.0.N with
/// one port like pods behind a headless Service.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
