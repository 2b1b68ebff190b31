//! [`Subchannel`]: the handle on one endpoint's subchannel, and how one is
//! started.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use tokio::sync::{oneshot, watch};
use tracing::error;

use super::active::Ctx;
use super::config::SubchannelConfig;
use super::pool::Pool;
use super::shared::{Hooks, Shared};
use super::state::{SubchannelState, SubchannelStatus};
use super::stats::Stats;
use super::task;
use crate::Error;
use crate::call::RetryBuffer;
use crate::connection::{Dialer, Origin, Slots};
use crate::load::{DEFAULT_DECAY, Ewma};
use crate::outlier::Outcomes;
use crate::resolve::Endpoint;

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
    pub(crate) status: watch::Receiver<SubchannelStatus>,
    /// Keeps the task running; `None` on handles that don't own it.
    _task: Option<Arc<oneshot::Sender<()>>>,
    pub(crate) ready_timeout: Duration,
}

impl fmt::Debug for Subchannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subchannel")
            .field("endpoint", &self.shared.endpoint)
            .field("state", &self.status.borrow().state)
            .finish()
    }
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
        let addr = endpoint.addr();
        let origin = Arc::new(origin(&config, hooks.authority, addr)?);
        let stats = Arc::new(Stats {
            metrics: crate::metrics::EndpointMetrics::new(
                hooks.target,
                addr,
                config.metrics_method_label,
            ),
            outcomes: Outcomes::new(hooks.judge),
            latency: Ewma::new(hooks.latency_decay.unwrap_or(DEFAULT_DECAY)),
            measure_latency: hooks.latency_decay.is_some(),
            load_reports: hooks.load_reports,
            channel_in_flight: hooks.channel_in_flight.clone(),
            telemetry: hooks.telemetry.clone(),
            ..Stats::default()
        });
        let slots = Arc::new(Slots::default());
        let dialer = Dialer {
            addr,
            origin,
            tcp_keepalive: config.tcp_keepalive,
            tcp_nodelay: config.tcp_nodelay,
            #[cfg(feature = "tls")]
            tls: config.tls.clone(),
            slots: slots.clone(),
        };
        let pool = Arc::new(Pool::new(addr, &config, slots, stats.clone()));
        let shared = Arc::new(Shared::new(
            endpoint,
            stats,
            pool,
            config.http2_keep_alive_interval,
            hooks.changed,
            hooks.resolve_now,
            config.retry_buffer.clone(),
        ));
        let status = shared.status.subscribe();
        let (stop, stopped) = oneshot::channel();
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            config,
            dialer,
            probe_rate: hooks.probe_rate,
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
    /// for it to serve, or for a free stream slot, before failing with
    /// UNAVAILABLE. Default: 5 s.
    pub fn ready_timeout(mut self, d: Duration) -> Self {
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
        self.shared.last_error()
    }

    // The rest of the crate reads a subchannel through these.

    /// Its pool of connections, which calls take slots on.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.shared.pool
    }

    /// What its calls showed, for outlier ejection.
    pub(crate) fn outcomes(&self) -> &Outcomes {
        &self.shared.stats.outcomes
    }

    /// Its counters, for status.
    pub(crate) fn counters(&self) -> &Stats {
        &self.shared.stats
    }

    /// Records whether the picker's snapshot holds it.
    pub(crate) fn set_in_rotation(&self, in_rotation: bool) {
        self.shared
            .stats
            .in_rotation
            .store(in_rotation, Ordering::Release);
    }

    /// How long a call through it as a service waits for it to serve.
    pub(crate) fn waits_for(&self) -> Duration {
        self.ready_timeout
    }

    /// The bound on the request bytes kept for another attempt.
    pub(crate) fn retry_buffer(&self) -> &Arc<RetryBuffer> {
        &self.shared.retry_buffer
    }
}

/// Who the subchannel's calls are addressed to: the configured authority,
/// else the balancer's (the target's host), else the endpoint's address.
fn origin(
    config: &SubchannelConfig,
    hooks_authority: Option<Authority>,
    addr: std::net::SocketAddr,
) -> Result<Origin, Error> {
    let authority = match (&config.authority, hooks_authority) {
        (Some(a), _) => Authority::try_from(a.as_str()).ok(),
        (None, Some(a)) => Some(a),
        (None, None) => None,
    };
    let authority = match authority {
        Some(a) => a,
        None => Authority::try_from(addr.to_string().as_str())
            .map_err(|e| Error::invalid_config(format!("no authority for {addr}: {e}")))?,
    };
    // As tonic: the user's prefix, then this crate's name and version.
    let own = concat!("healthlb/", env!("CARGO_PKG_VERSION"));
    let agent = match &config.user_agent {
        Some(prefix) => [prefix.as_bytes(), b" ", own.as_bytes()].concat(),
        None => own.as_bytes().to_vec(),
    };
    Ok(Origin {
        scheme: if config.is_tls() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        },
        authority,
        user_agent: http::HeaderValue::from_bytes(&agent)
            .map_err(|_| Error::invalid_config("user_agent is not a valid header value"))?,
    })
}

/// Runs the subchannel's task. Should it panic (a bug), the endpoint leaves
/// rotation with the panic's message, rather than stay SERVING with nobody
/// minding its connections.
async fn supervised(ctx: Arc<Ctx>, stopped: oneshot::Receiver<()>) {
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
