//! [`EndpointStatus`]: what the client thinks of one endpoint.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::Error;
use crate::outlier::Ejections;
use crate::subchannel::{HealthStatus, Subchannel, SubchannelState};

/// One endpoint as [`LbChannel::endpoints`](crate::LbChannel::endpoints)
/// reports it. The counters are atomics kept per endpoint, so reading them
/// costs the calls nothing.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// The DNS name it was found under, where known (SRV targets).
    pub hostname: Option<String>,
    /// The zone it runs in, where its source says (`kubernetes:///`
    /// targets, or a source's [`Endpoint::with_zone`](crate::resolve::Endpoint::with_zone)).
    /// With [`Builder::zone`](crate::Builder::zone) set, `in_rotation` says
    /// whether zone-aware routing sends this client's calls to it.
    pub zone: Option<String>,
    /// Its state. Only [`SubchannelState::Serving`] gets calls.
    pub state: SubchannelState,
    /// Whether new calls may go to it now: the picker's last snapshot holds
    /// it. SERVING, connected and not ejected (or every endpoint is
    /// ejected, and calls go to them anyway). It follows `state` by as long
    /// as the balancer takes to publish, typically microseconds.
    pub in_rotation: bool,
    /// How long the state has held.
    pub state_for: Duration,
    /// The last answer of the endpoint's health service, if any.
    pub last_health: Option<HealthStatus>,
    /// The age of the endpoint's first connection, when there is one.
    pub connection_age: Option<Duration>,
    /// Connections open for calls: the first, plus extra ones opened because
    /// the server's stream limit was reached.
    pub connections: usize,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS on the first connection;
    /// `None` when it set no limit, or there is no connection.
    pub max_concurrent_streams: Option<u32>,
    /// Connections established, counting the first.
    pub connects: u64,
    /// Connections replaced because of `max_connection_age`.
    pub recycles: u64,
    /// Calls sent to it, retries and hedges each counted. Once they have
    /// ended, `calls_started` = `calls_ok` + `calls_failed` +
    /// `calls_transport_failed` + `calls_cancelled`.
    pub calls_started: u64,
    /// Calls whose response has not ended.
    pub calls_in_flight: usize,
    /// Calls that ended with status OK.
    pub calls_ok: u64,
    /// Calls that ended with another gRPC status from the server (in its
    /// trailers, or a trailers-only response): the server answered, and
    /// said no.
    pub calls_failed: u64,
    /// Calls the connection failed under, with no status from the server
    /// (UNAVAILABLE, or the code of an HTTP/2 reset).
    pub calls_transport_failed: u64,
    /// Calls the client gave up on before their status: hedges that lost,
    /// deadlines, callers that dropped them.
    pub calls_cancelled: u64,
    /// The last call that did not end OK (cancelled ones aside): its
    /// status from the server, or the transport failure.
    pub last_call_error: Option<tonic::Status>,
    /// How much longer outlier ejection keeps it out of rotation; `None`
    /// when it is not ejected.
    pub ejected_for: Option<Duration>,
    /// Why it was ejected: `consecutive_failures`, `success_rate` or
    /// `failure_percentage`.
    pub ejection_reason: Option<&'static str>,
    /// Failures in a row, by the outlier detector's codes, up to the last
    /// success.
    pub consecutive_failures: u32,
    /// The peak-EWMA of its time to response headers, decayed to now,
    /// with the `peak_ewma` policy (the one that reads it; other policies
    /// don't measure it); `None` before its first answer, and with other
    /// policies.
    pub latency_ewma: Option<Duration>,
    /// With `weighted_round_robin`: the weight its ORCA load reports give
    /// it and where that stands (not yet usable, usable, stale), as of the
    /// last weight update while it was in rotation; `None` with other
    /// policies and before the first update.
    pub server_weight: Option<crate::ServerWeight>,
    /// The last connection failure: connecting, TLS, the health stream.
    pub last_error: Option<Error>,
    /// The HTTP/2 keepalive interval of its next connection: the configured
    /// one, doubled after each GOAWAY `too_many_pings`. `None` when off.
    pub http2_keep_alive_interval: Option<Duration>,
}

impl EndpointStatus {
    /// `sub` as it is now, with its ejection as `ejections` last recorded.
    pub(crate) fn of(sub: &Subchannel, ejections: &Ejections) -> Self {
        let status = sub.status();
        let stats = sub.counters();
        let now = Instant::now();
        let ejection = ejections
            .get(&sub.endpoint().addr())
            .and_then(|e| Some((e.left(now)?, e.reason)));
        let ejected_for = ejection.map(|(left, _)| left);
        Self {
            addr: sub.endpoint().addr(),
            hostname: sub.endpoint().hostname().map(str::to_owned),
            zone: sub.endpoint().zone().map(str::to_owned),
            state: status.state().clone(),
            in_rotation: stats.in_rotation.load(Ordering::Acquire),
            state_for: now.saturating_duration_since(status.since()),
            last_health: status.last_health(),
            connection_age: status
                .connected_at()
                .map(|at| now.saturating_duration_since(at)),
            connections: sub.connections(),
            max_concurrent_streams: sub.pool().max_concurrent_streams(),
            connects: stats.connects.load(Ordering::Relaxed),
            recycles: stats.recycles.load(Ordering::Relaxed),
            calls_started: stats.calls_started.load(Ordering::Relaxed),
            calls_in_flight: stats.calls_in_flight.load(Ordering::SeqCst),
            calls_ok: stats.calls_ok.load(Ordering::Relaxed),
            calls_failed: stats.calls_failed.load(Ordering::Relaxed),
            calls_transport_failed: stats.calls_transport_failed.load(Ordering::Relaxed),
            calls_cancelled: stats.calls_cancelled.load(Ordering::Relaxed),
            last_call_error: stats
                .last_call_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            ejected_for,
            ejection_reason: ejection.map(|(_, reason)| reason),
            consecutive_failures: stats.outcomes.consecutive_failures(),
            latency_ewma: stats.latency.latency(),
            server_weight: match stats.load_reports {
                crate::load::LoadReports::Off => None,
                _ => stats.server_load.last_scheduled(),
            },
            last_error: sub.last_error(),
            http2_keep_alive_interval: sub.http2_keep_alive_interval(),
        }
    }
}

impl fmt::Display for EndpointStatus {
    /// One line, as a person reads it:
    ///
    /// ```text
    /// 10.0.0.7:50051 SERVING, ejected for 29.4s (consecutive_failures), out of rotation; calls: 81 started, 2 ok, 79 failed, 0 transport failed, 0 cancelled, 0 in flight; last call error: Unavailable "pod 7 fails"
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if let Some(zone) = &self.zone {
            write!(f, " (zone {zone})")?;
        }
        write!(f, " {}", self.state)?;
        if let Some(left) = self.ejected_for {
            write!(f, ", ejected for {left:.1?}")?;
            if let Some(reason) = self.ejection_reason {
                write!(f, " ({reason})")?;
            }
        }
        if !self.in_rotation {
            f.write_str(", out of rotation")?;
        }
        if let Some(w) = self.server_weight {
            write!(f, ", weight {:.1} ({})", w.weight, w.state.label())?;
        }
        write!(
            f,
            "; calls: {} started, {} ok, {} failed, {} transport failed, {} cancelled, {} in flight",
            self.calls_started,
            self.calls_ok,
            self.calls_failed,
            self.calls_transport_failed,
            self.calls_cancelled,
            self.calls_in_flight
        )?;
        if let Some(status) = &self.last_call_error {
            write!(
                f,
                "; last call error: {:?} {:?}",
                status.code(),
                status.message()
            )?;
        }
        if let Some(error) = &self.last_error {
            write!(f, "; last connection error: {error}")?;
        }
        Ok(())
    }
}
