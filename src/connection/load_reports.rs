//! ORCA's out-of-band load reports (gRFC A51):
//! `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics` on an endpoint's
//! first connection, asking for a report every `period`, reopened as the
//! health Watch is. A server without the service answers UNIMPLEMENTED:
//! that is taken as "this server doesn't report", logged once at debug,
//! and the stream is not retried.

use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use super::conn::Conn;
use super::watched::{Method, Watch, Watched};
use crate::backoff::BackoffConfig;
use crate::load::orca_proto::{OrcaLoadReport, OrcaLoadReportRequest};

/// A report is a few dozen bytes, more with named metrics.
static STREAM_CORE_METRICS: Method = Method {
    path: "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics",
    max_message: 64 * 1024,
    buffer: 256,
};

/// What the stream gave.
pub(crate) enum LoadEvent {
    Report(OrcaLoadReport),
    /// The server doesn't report; the stream is off for good.
    Unimplemented,
    /// It ended, and is reopened; why.
    Ended(String),
}

/// One connection's out-of-band report stream.
pub(crate) struct LoadReportStream(Watched<OrcaLoadReportRequest, OrcaLoadReport>);

impl LoadReportStream {
    pub(crate) fn start(conn: Arc<Conn>, period: Duration, backoff: BackoffConfig) -> Self {
        let request = OrcaLoadReportRequest {
            report_interval: Some(prost_types::Duration {
                seconds: i64::try_from(period.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(period.subsec_nanos()).unwrap_or(0),
            }),
            request_cost_names: Vec::new(),
        };
        Self(Watched::start(conn, &STREAM_CORE_METRICS, request, backoff))
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<LoadEvent> {
        Poll::Ready(match ready!(self.0.poll_next(cx)) {
            Watch::Message(report) => LoadEvent::Report(report),
            Watch::Unimplemented => LoadEvent::Unimplemented,
            Watch::Ended(status) => {
                LoadEvent::Ended(format!("{:?}: {}", status.code(), status.message()))
            }
        })
    }
}
