//! Counters of one endpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tonic::{Code, Status};

/// Counters of one endpoint, kept as atomics so the request path pays one
/// add per call; [`EndpointStatus`](crate::EndpointStatus) reads them.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) metrics: crate::metrics::EndpointMetrics,
    /// gRPC's standard telemetry, when the channel has it.
    pub(crate) telemetry: crate::telemetry::Telemetry,
    pub(crate) calls_started: AtomicU64,
    pub(crate) calls_in_flight: AtomicUsize,
    /// How calls ended: see [`Ended`].
    pub(crate) calls_ok: AtomicU64,
    pub(crate) calls_failed: AtomicU64,
    pub(crate) calls_transport_failed: AtomicU64,
    pub(crate) calls_cancelled: AtomicU64,
    /// The last call that did not end OK, and how.
    pub(crate) last_call_error: Mutex<Option<Status>>,
    pub(crate) connects: AtomicU64,
    pub(crate) recycles: AtomicU64,
    /// What calls show: their status, for outlier ejection.
    pub(crate) outcomes: crate::outlier::Outcomes,
    /// Their time to response headers, for peak EWMA.
    pub(crate) latency: crate::load::Ewma,
    /// Whether calls measure it: only the policy that reads it pays for
    /// the clock.
    pub(crate) measure_latency: bool,
    /// Whether the picker's last snapshot holds it: set by the balancer
    /// after each publish.
    pub(crate) in_rotation: AtomicBool,
    /// What its ORCA load reports say, for weighted round robin.
    pub(crate) server_load: crate::load::ServerLoad,
    /// Where those reports come from, if they are read at all.
    pub(crate) load_reports: crate::load::LoadReports,
    /// Ring hash with bounded load: the channel's calls in flight, which
    /// this endpoint's calls count in and out of too.
    pub(crate) channel_in_flight: Option<std::sync::Arc<AtomicUsize>>,
}

/// How a call on the endpoint ended.
#[derive(Debug)]
pub(crate) enum Ended<'a> {
    /// With a gRPC status from the server, in its trailers or in a
    /// trailers-only response, which carry the message too.
    Status(Code, Option<&'a http::HeaderMap>),
    /// The connection failed under it: no status came.
    Transport(&'a Status),
    /// The client gave up on it before its status: a hedge that lost, a
    /// deadline, a caller that dropped it.
    Cancelled,
}

impl Stats {
    /// Counts a call's end, and tells the outcomes (outlier ejection, the
    /// load-aware policies) what it showed.
    pub(crate) fn ended(&self, end: Ended<'_>) {
        if let (crate::load::LoadReports::PerCall { penalty }, Ended::Status(_, Some(trailers))) =
            (self.load_reports, &end)
            && let Some(report) = crate::load::Report::from_trailers(trailers)
        {
            self.server_load.on_report(&report, penalty);
        }
        let failure = match end {
            Ended::Status(Code::Ok, _) => {
                self.calls_ok.fetch_add(1, Ordering::Relaxed);
                self.outcomes.record(Code::Ok);
                return;
            }
            Ended::Status(code, headers) => {
                self.calls_failed.fetch_add(1, Ordering::Relaxed);
                self.outcomes.record(code);
                headers
                    .and_then(Status::from_header_map)
                    .unwrap_or_else(|| {
                        Status::new(code, "the response ended without a gRPC status")
                    })
            }
            Ended::Transport(status) => {
                self.calls_transport_failed.fetch_add(1, Ordering::Relaxed);
                self.outcomes.record(status.code());
                status.clone()
            }
            Ended::Cancelled => {
                self.calls_cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        *self
            .last_call_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(failure);
    }
}
