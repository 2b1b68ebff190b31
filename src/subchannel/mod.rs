//! Subchannels: one health-checked, kept-alive, age-recycled endpoint, with
//! as many connections as its server's stream limit calls for.
//!
//! An address in DNS is not a healthy backend: Kubernetes keeps a pod in DNS
//! for seconds after it stops being ready, and `publishNotReadyAddresses`
//! keeps it there for good. Only the backend can say whether it is SERVING.
//! A [`Subchannel`] asks it the gRPC way, with a long-lived
//! `grpc.health.v1.Health/Watch` stream on the very connection that carries
//! the calls.
//!
//! Each subchannel runs one background task (`task.rs`) that owns its
//! connections:
//!
//! - **Connect** (`connect.rs`, `active.rs`): TCP, TLS when configured, the
//!   HTTP/2 handshake, and the first health answer, all within
//!   `connect_timeout`. A failed attempt is retried with gRPC's backoff
//!   (1 s × 1.6 ± 20 %, at most 120 s) and asks the resolver to re-resolve.
//! - **Health** (`health.rs`): the Watch stream, per gRFC A17.
//! - **Liveness** (`liveness.rs`): a probe after `liveness_interval` of
//!   silence closes a connection whose peer stopped answering. See
//!   [`SubchannelConfig`] for why a probe and not HTTP/2 pings.
//! - **Stream limits** (`pool.rs`): when every connection is at the server's
//!   SETTINGS_MAX_CONCURRENT_STREAMS, another one opens, up to
//!   `max_connections_per_endpoint`; extra ones close when idle.
//! - **Max connection age** (`max_age.rs`): make-before-break recycling,
//!   with a grace period for calls on the old connection (`drain.rs`).
//! - **GOAWAY** (`frames.rs` sees it arrive): calls the server accepted
//!   finish; calls it never saw go to a fresh connection (`replay.rs`).
//!   GOAWAY `too_many_pings` doubles the keepalive interval for the
//!   endpoint's next connections (gRFC A8).
//!
//! The state is published through a [`tokio::sync::watch`] channel
//! ([`Subchannel::subscribe`]): Connecting, Serving, NotServing(reason),
//! TransientFailure(error). Every transition is logged with the endpoint.
//!
//! A [`Subchannel`] is also a [`tower::Service`] on its own connections,
//! with [`tower::load::Load`] reporting the calls in flight. That is what
//! [`LbChannel::discover`](crate::LbChannel::discover) hands to tower's
//! balancers.

mod active;
mod call;
mod config;
mod connect;
mod drain;
mod frames;
mod health;
mod liveness;
mod max_age;
mod pool;
mod replay;
pub(crate) mod service;
mod task;
#[cfg(feature = "tls")]
mod tls;
mod transport_errors;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use tokio::sync::{Notify, oneshot, watch};
use tracing::{debug, error, info, warn};

pub(crate) use self::call::Sent;
pub use self::config::SubchannelConfig;
pub(crate) use self::connect::Conn;
use self::connect::{Dialer, Origin, Slots};
use self::health::HealthEvent;
pub(crate) use self::pool::{NoSlot, Pool};
pub(crate) use self::replay::Replay;
pub use self::service::ResponseFuture;
#[cfg(feature = "tls")]
pub use self::tls::TlsConfig;
use crate::{Endpoint, Error};

/// Runs the HTTP/2 frame sniffer over `bytes`, split into chunks whose
/// size the first byte picks, and checks the split changes nothing. For the
/// fuzzer only; not part of the API.
#[doc(hidden)]
pub fn fuzz_frames(bytes: &[u8]) -> usize {
    frames::fuzz(bytes)
}

/// Where a subchannel stands.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum SubchannelState {
    /// Connecting, or connected and waiting for the first health answer.
    Connecting,
    /// The health service says SERVING (or health checking is off, or the
    /// server has no health service). Only this state gets calls.
    Serving,
    /// Connected, but not serving, for the reason given.
    NotServing(NotServing),
    /// The connection failed or was lost; it is retried with backoff.
    TransientFailure(Error),
    /// The subchannel was stopped: its endpoint left the resolver's set, or
    /// its channel was dropped. It takes no calls and never comes back.
    Shutdown,
}

/// Why a connected endpoint is not serving.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotServing {
    /// The health service answered NOT_SERVING.
    NotServing,
    /// The health service answered UNKNOWN.
    Unknown,
    /// The health service does not know the service name asked about.
    ServiceUnknown,
    /// The health service answered a value this client doesn't know.
    Unrecognized(i32),
    /// The health stream ended or failed; it is retried with backoff.
    HealthStreamEnded(String),
}

// === impl SubchannelState ===

impl SubchannelState {
    /// Whether calls may go to this endpoint.
    pub fn is_serving(&self) -> bool {
        matches!(self, SubchannelState::Serving)
    }

    /// A few words for summaries: `SERVING`, `NOT_SERVING`, `CONNECTING`,
    /// `connect refused`, ...
    pub fn label(&self) -> &str {
        match self {
            SubchannelState::Connecting => "CONNECTING",
            SubchannelState::Serving => "SERVING",
            SubchannelState::NotServing(reason) => reason.label(),
            SubchannelState::TransientFailure(error) => error.label(),
            SubchannelState::Shutdown => "SHUTDOWN",
        }
    }

    /// The state's name in metrics: serving, not_serving, connecting or
    /// transient_failure.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            SubchannelState::Connecting => "connecting",
            SubchannelState::Serving => "serving",
            SubchannelState::NotServing(_) => "not_serving",
            SubchannelState::TransientFailure(_) => "transient_failure",
            SubchannelState::Shutdown => "shutdown",
        }
    }

    /// The same state, ignoring the details of errors.
    fn same_as(&self, other: &SubchannelState) -> bool {
        match (self, other) {
            (SubchannelState::Connecting, SubchannelState::Connecting)
            | (SubchannelState::Serving, SubchannelState::Serving)
            | (SubchannelState::Shutdown, SubchannelState::Shutdown) => true,
            (SubchannelState::NotServing(a), SubchannelState::NotServing(b)) => a == b,
            (SubchannelState::TransientFailure(a), SubchannelState::TransientFailure(b)) => {
                a.to_string() == b.to_string()
            }
            _ => false,
        }
    }
}

impl fmt::Display for SubchannelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubchannelState::NotServing(NotServing::HealthStreamEnded(why)) => {
                write!(f, "NOT_SERVING (health stream ended: {why})")
            }
            SubchannelState::TransientFailure(error) => write!(f, "TRANSIENT_FAILURE ({error})"),
            other => f.write_str(other.label()),
        }
    }
}

impl NotServing {
    fn label(&self) -> &str {
        match self {
            NotServing::NotServing => "NOT_SERVING",
            NotServing::Unknown => "UNKNOWN",
            NotServing::ServiceUnknown => "SERVICE_UNKNOWN",
            NotServing::Unrecognized(_) => "unrecognized health status",
            NotServing::HealthStreamEnded(_) => "health stream ended",
        }
    }
}

/// What a subchannel publishes: its state, since when, and the connection
/// that serves when it is serving.
#[derive(Clone, Debug)]
pub struct SubchannelStatus {
    state: SubchannelState,
    since: Instant,
    last_health: Option<i32>,
    pub(crate) conn: Option<Arc<Conn>>,
}

impl SubchannelStatus {
    /// The state.
    pub fn state(&self) -> &SubchannelState {
        &self.state
    }

    /// When the state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The last `ServingStatus` value the health service sent, if any.
    pub fn last_health(&self) -> Option<i32> {
        self.last_health
    }

    /// When the serving connection was established, if there is one.
    pub fn connected_at(&self) -> Option<Instant> {
        self.conn.as_ref().map(|c| c.established)
    }
}

/// Counters of one endpoint, kept as atomics so the request path pays one
/// relaxed add per call.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) metrics: crate::metrics::EndpointMetrics,
    pub(crate) calls_started: AtomicU64,
    pub(crate) calls_in_flight: AtomicUsize,
    pub(crate) calls_failed: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) recycles: AtomicU64,
}

/// State shared by the subchannel's task, its handles and the request path.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) endpoint: Endpoint,
    pub(crate) status: watch::Sender<SubchannelStatus>,
    pub(crate) stats: Arc<Stats>,
    /// The connections that may take calls.
    pub(crate) pool: Arc<Pool>,
    /// The HTTP/2 keepalive interval of the next connection, in ms; 0 is off.
    keep_alive_ms: AtomicU64,
    unimplemented_logged: AtomicBool,
    last_error: Mutex<Option<Error>>,
    /// Told of every published change, for the balancer.
    changed: Option<Arc<Notify>>,
    /// Asks the resolver to re-resolve.
    resolve_now: Option<Arc<Notify>>,
}

// === impl Shared ===

impl Shared {
    /// Publishes `state` with `conn`, logging the transition, unless nothing
    /// changed.
    pub(crate) fn publish(
        &self,
        state: SubchannelState,
        conn: Option<Arc<Conn>>,
        health: Option<i32>,
    ) {
        let addr = self.endpoint.addr();
        if let SubchannelState::TransientFailure(error) = &state
            && let Ok(mut last) = self.last_error.lock()
        {
            *last = Some(error.clone());
        }
        self.pool.set_serving(state.is_serving());
        let changed = self.status.send_if_modified(|current| {
            let same_conn = match (&current.conn, &conn) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let same_state = current.state.same_as(&state);
            if health.is_some() {
                current.last_health = health;
            }
            if same_state && same_conn {
                return false;
            }
            if !same_state {
                self.stats.metrics.transition(state.metric_label());
                let from = current.state.label().to_owned();
                match &state {
                    SubchannelState::Serving | SubchannelState::NotServing(_) => {
                        info!(endpoint = %addr, from = %from, to = %state, "subchannel state changed")
                    }
                    SubchannelState::TransientFailure(_) => {
                        warn!(endpoint = %addr, from = %from, to = %state, "subchannel state changed")
                    }
                    SubchannelState::Connecting | SubchannelState::Shutdown => {
                        debug!(endpoint = %addr, from = %from, to = %state, "subchannel state changed")
                    }
                }
                current.state = state;
                current.since = Instant::now();
            }
            current.conn = conn;
            true
        });
        if changed {
            self.notify_changed();
        }
    }

    /// The state a health event means. UNIMPLEMENTED is logged once per
    /// endpoint.
    pub(crate) fn health_state(&self, event: &HealthEvent) -> SubchannelState {
        match event {
            HealthEvent::Status(1) => SubchannelState::Serving,
            HealthEvent::Status(0) => SubchannelState::NotServing(NotServing::Unknown),
            HealthEvent::Status(2) => SubchannelState::NotServing(NotServing::NotServing),
            HealthEvent::Status(3) => SubchannelState::NotServing(NotServing::ServiceUnknown),
            HealthEvent::Status(other) => {
                SubchannelState::NotServing(NotServing::Unrecognized(*other))
            }
            HealthEvent::Unimplemented => {
                if !self.unimplemented_logged.swap(true, Ordering::Relaxed) {
                    error!(
                        endpoint = %self.endpoint.addr(),
                        "the server has no grpc.health.v1.Health service; treating it as serving. \
                         Register tonic-health on the server, or turn health checking off"
                    );
                }
                SubchannelState::Serving
            }
            HealthEvent::Ended(why) => {
                SubchannelState::NotServing(NotServing::HealthStreamEnded(why.clone()))
            }
        }
    }

    /// Tells the balancer to look again.
    pub(crate) fn notify_changed(&self) {
        if let Some(notify) = &self.changed {
            notify.notify_one();
        }
    }

    pub(crate) fn resolve_now(&self) {
        if let Some(notify) = &self.resolve_now {
            notify.notify_one();
        }
    }

    pub(crate) fn keep_alive(&self) -> Option<Duration> {
        match self.keep_alive_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub(crate) fn set_keep_alive(&self, d: Option<Duration>) {
        let ms = d.map_or(0, |d| {
            u64::try_from(d.as_millis().max(1)).unwrap_or(u64::MAX)
        });
        self.keep_alive_ms.store(ms, Ordering::Relaxed);
    }
}

/// Runs the subchannel's task. Should it panic (a bug), the endpoint leaves
/// rotation with the panic's message, rather than stay SERVING with nobody
/// minding its connections.
async fn supervised(ctx: Arc<active::Ctx>, stopped: oneshot::Receiver<()>) {
    use futures::FutureExt;

    let shared = ctx.shared.clone();
    let run = std::panic::AssertUnwindSafe(task::run(ctx, stopped));
    if let Err(panic) = run.catch_unwind().await {
        let addr = shared.endpoint.addr();
        let why = crate::error::panic_message(panic.as_ref());
        error!(endpoint = %addr, panic = %why, "the subchannel's task panicked; the endpoint takes no more calls");
        shared.pool.publish(Vec::new());
        let error = Error::connect(
            "internal error",
            format!("healthlb's task for {addr} panicked, a bug: {why}"),
            None,
        );
        shared.publish(SubchannelState::TransientFailure(error), None, None);
    }
}

/// A handle to one endpoint's subchannel. Cloning is cheap.
///
/// A subchannel made with [`Subchannel::spawn`] runs until its last handle
/// is dropped. One an [`LbChannel`](crate::LbChannel) made lives as long as
/// the channel keeps it: the handles [`Discover`](crate::Discover) hands out
/// do not keep it alive. Once the channel drops it (its endpoint left DNS,
/// or the channel itself was dropped), its connections close once their
/// calls are done, its state is [`SubchannelState::Shutdown`], and calls
/// through such a handle fail at once with UNAVAILABLE.
#[derive(Clone)]
pub struct Subchannel {
    pub(crate) shared: Arc<Shared>,
    status: watch::Receiver<SubchannelStatus>,
    /// Keeps the task running; `None` on handles that don't own it.
    _task: Option<Arc<oneshot::Sender<()>>>,
    ready_timeout: Duration,
}

impl fmt::Debug for Subchannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subchannel")
            .field("endpoint", &self.shared.endpoint)
            .field("state", &self.status.borrow().state)
            .finish()
    }
}

/// Hooks a subchannel reports to.
#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) changed: Option<Arc<Notify>>,
    pub(crate) resolve_now: Option<Arc<Notify>>,
    pub(crate) authority: Option<Authority>,
    /// The target, for metrics labels.
    pub(crate) target: Option<Arc<str>>,
}

// === impl Subchannel ===

impl Subchannel {
    /// Starts a subchannel to `endpoint`. Needs a Tokio runtime; returns at
    /// once and connects in the background.
    pub fn spawn(endpoint: Endpoint, config: SubchannelConfig) -> Result<Self, Error> {
        config.validate()?;
        Self::spawn_with(endpoint, Arc::new(config), Hooks::default())
    }

    /// Starts a subchannel with a validated configuration.
    pub(crate) fn spawn_with(
        endpoint: Endpoint,
        config: Arc<SubchannelConfig>,
        hooks: Hooks,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::no_runtime("Subchannel::spawn"))?;
        let authority = match (&config.authority, hooks.authority) {
            (Some(a), _) => Authority::try_from(a.as_str()).ok(),
            (None, Some(a)) => Some(a),
            (None, None) => None,
        };
        let authority = match authority {
            Some(a) => a,
            None => Authority::try_from(endpoint.addr().to_string().as_str()).map_err(|e| {
                Error::invalid_config(format!("no authority for {}: {e}", endpoint.addr()))
            })?,
        };
        let agent = match &config.user_agent {
            Some(prefix) => format!("{prefix} healthlb/{}", env!("CARGO_PKG_VERSION")),
            None => format!("healthlb/{}", env!("CARGO_PKG_VERSION")),
        };
        let origin = Arc::new(Origin {
            scheme: if config.is_tls() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            authority,
            user_agent: http::HeaderValue::try_from(agent)
                .map_err(|_| Error::invalid_config("user_agent is not a valid header value"))?,
        });
        let (status_tx, status) = watch::channel(SubchannelStatus {
            state: SubchannelState::Connecting,
            since: Instant::now(),
            last_health: None,
            conn: None,
        });
        let endpoint_addr = endpoint.addr();
        let stats = Arc::new(Stats {
            metrics: crate::metrics::EndpointMetrics::new(
                hooks.target,
                endpoint_addr,
                config.metrics_method_label,
            ),
            ..Stats::default()
        });
        let slots = Arc::new(Slots::default());
        let dialer = Dialer {
            addr: endpoint_addr,
            origin,
            tcp_keepalive: config.tcp_keepalive,
            #[cfg(feature = "tls")]
            tls: config.tls.clone(),
            stats: stats.clone(),
            slots: slots.clone(),
        };
        let shared = Arc::new(Shared {
            endpoint,
            status: status_tx,
            stats,
            pool: Arc::new(Pool::new(
                endpoint_addr,
                config.max_connections_per_endpoint,
                slots,
            )),
            keep_alive_ms: AtomicU64::new(0),
            unimplemented_logged: AtomicBool::new(false),
            last_error: Mutex::new(None),
            changed: hooks.changed,
            resolve_now: hooks.resolve_now,
        });
        shared.set_keep_alive(config.http2_keep_alive_interval);
        let (stop, stopped) = oneshot::channel();
        let ctx = Arc::new(active::Ctx {
            shared: shared.clone(),
            config,
            dialer,
        });
        runtime.spawn(supervised(ctx, stopped));
        Ok(Self {
            shared,
            status,
            _task: Some(Arc::new(stop)),
            ready_timeout: Duration::from_secs(5),
        })
    }

    /// Another handle on the same subchannel that does not keep it running.
    pub(crate) fn handle(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            status: self.status.clone(),
            _task: None,
            ready_timeout: self.ready_timeout,
        }
    }

    /// Whether both handles are on the same subchannel.
    pub(crate) fn same(&self, other: &Subchannel) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// How long a call through this subchannel's [`tower::Service`] waits
    /// for it to serve before failing with UNAVAILABLE. Default: 5 s.
    pub fn with_ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// The current state.
    pub fn state(&self) -> SubchannelState {
        self.status.borrow().state.clone()
    }

    /// The current status: state, since when, last health answer.
    pub fn status(&self) -> SubchannelStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every state change.
    pub fn subscribe(&self) -> watch::Receiver<SubchannelStatus> {
        self.status.clone()
    }

    /// The HTTP/2 keepalive interval the next connection will use. It starts
    /// at the configured value and doubles after each GOAWAY
    /// `too_many_pings`.
    pub fn http2_keep_alive_interval(&self) -> Option<Duration> {
        self.shared.keep_alive()
    }

    /// The connections open for calls: the first, and any extra ones opened
    /// because the server's stream limit was reached.
    pub fn connections(&self) -> usize {
        self.shared.pool.len()
    }

    /// Calls that have not finished, on any of this endpoint's connections.
    pub fn calls_in_flight(&self) -> usize {
        self.shared.stats.calls_in_flight.load(Ordering::Relaxed)
    }

    /// The last connection failure, if any.
    pub fn last_error(&self) -> Option<Error> {
        self.shared.last_error.lock().ok().and_then(|e| e.clone())
    }
}
