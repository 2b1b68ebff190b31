//! What a subchannel's task, its handles and the request path share: the
//! published state, the counters, the pool of connections, and the hooks
//! into the balancer and the resolver.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use super::pool::Pool;
use super::state::{NotServingReason, SubchannelState, SubchannelStatus};
use super::stats::Stats;
use crate::Error;
use crate::call::RetryBuffer;
use crate::connection::Conn;
use crate::connection::HealthEvent;
use crate::connection::HealthStatus;
use crate::resolve::Endpoint;

/// Hooks a subchannel reports to, when a balancer runs it.
#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) changed: Option<Arc<Notify>>,
    pub(crate) resolve_now: Option<Arc<Notify>>,
    pub(crate) authority: Option<Authority>,
    /// The target, for metrics labels.
    pub(crate) target: Option<Arc<str>>,
    /// How calls' outcomes are judged.
    pub(crate) judge: crate::outlier::Judge,
    /// How fast the latency estimate forgets.
    pub(crate) latency_decay: Option<std::time::Duration>,
    /// Where ORCA load reports come from, for weighted round robin.
    pub(crate) load_reports: crate::load::LoadReports,
    /// Ring hash with bounded load: the channel's calls in flight.
    pub(crate) channel_in_flight: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// The channel's cap on liveness probes.
    pub(crate) probe_rate: Option<Arc<crate::connection::ProbeRate>>,
    /// gRPC's standard telemetry.
    pub(crate) telemetry: crate::telemetry::Telemetry,
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
    /// Where request bodies are kept for another attempt.
    pub(crate) retry_buffer: Arc<RetryBuffer>,
}

// === impl Shared ===

impl Shared {
    pub(crate) fn new(
        endpoint: Endpoint,
        stats: Arc<Stats>,
        pool: Arc<Pool>,
        keep_alive: Option<Duration>,
        changed: Option<Arc<Notify>>,
        resolve_now: Option<Arc<Notify>>,
        retry_buffer: Arc<RetryBuffer>,
    ) -> Self {
        let shared = Self {
            endpoint,
            status: watch::Sender::new(SubchannelStatus::new()),
            stats,
            pool,
            keep_alive_ms: AtomicU64::new(0),
            unimplemented_logged: AtomicBool::new(false),
            last_error: Mutex::new(None),
            changed,
            resolve_now,
            retry_buffer,
        };
        shared.set_keep_alive(keep_alive);
        shared
    }

    /// Publishes `state` with `conn`, logging the transition, unless nothing
    /// changed.
    pub(crate) fn publish(
        &self,
        state: SubchannelState,
        conn: Option<Arc<Conn>>,
        health: Option<HealthStatus>,
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
            HealthEvent::Status(HealthStatus::Serving) => SubchannelState::Serving,
            HealthEvent::Status(other) => {
                SubchannelState::NotServing(NotServingReason::Health(*other))
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
                SubchannelState::NotServing(NotServingReason::HealthStreamEnded(why.clone()))
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

    /// The last connection failure, if any.
    pub(crate) fn last_error(&self) -> Option<Error> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}
