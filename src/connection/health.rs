//! Health: a `grpc.health.v1.Health/Watch` stream per endpoint (gRFC A17).
//!
//! The Watch stream runs on the very connection that carries the calls, so
//! its answer describes that connection. Its rules:
//!
//! - Until the first answer the endpoint is CONNECTING. Only SERVING is
//!   serving; NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN and values this client
//!   doesn't know are not.
//! - UNIMPLEMENTED: the server has no health service. The endpoint counts as
//!   serving, one error-level line is logged, and the stream isn't retried.
//! - Any other end: not serving at once, and the stream is retried with
//!   backoff. The backoff resets when the ended stream had delivered a
//!   message, so a stream that worked and then broke is retried at once.
//!
//! The Watch is a stream like any call, and counts against the server's
//! stream limit; the pool keeps a slot for it on the endpoint's first
//! connection, so it never waits behind calls.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::conn::Conn;
use super::watched::{Method, Watch, Watched};
use crate::backoff::BackoffConfig;

/// What the health stream said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthEvent {
    /// An answer.
    Status(HealthStatus),
    /// The server has no health service.
    Unimplemented,
    /// The stream ended or failed; a retry is scheduled.
    Ended(String),
}

/// The Watch's method. A `HealthCheckResponse` is 2 bytes: a server
/// sending more than 4 KiB is broken, and its stream ends with an error.
static WATCH: Method = Method {
    path: "/grpc.health.v1.Health/Watch",
    max_message: 4 * 1024,
    buffer: 64,
};

/// One connection's Watch stream, retried as gRFC A17 says.
pub(crate) struct HealthWatch(Watched<HealthCheckRequest, HealthCheckResponse>);

// === impl HealthWatch ===

impl HealthWatch {
    pub(crate) fn start(conn: Arc<Conn>, service: String, backoff: BackoffConfig) -> Self {
        let request = HealthCheckRequest { service };
        Self(Watched::start(conn, &WATCH, request, backoff))
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<HealthEvent> {
        Poll::Ready(match ready!(self.0.poll_next(cx)) {
            Watch::Message(answer) => HealthEvent::Status(HealthStatus::from_wire(answer.status)),
            Watch::Unimplemented => HealthEvent::Unimplemented,
            // tonic-health ends the stream with NOT_FOUND where A17 sends
            // SERVICE_UNKNOWN; the service may be registered later, so retry.
            Watch::Ended(status) if status.code() == Code::NotFound => {
                HealthEvent::Status(HealthStatus::ServiceUnknown)
            }
            Watch::Ended(status) if status.code() == Code::Ok => {
                HealthEvent::Ended("the server ended the health stream".into())
            }
            Watch::Ended(status) => {
                HealthEvent::Ended(format!("{:?}: {}", status.code(), status.message()))
            }
        })
    }
}

/// What a `grpc.health.v1` health service answered: its `ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthStatus {
    /// `UNKNOWN` (0).
    Unknown,
    /// `SERVING` (1): the only answer that lets calls come.
    Serving,
    /// `NOT_SERVING` (2).
    NotServing,
    /// `SERVICE_UNKNOWN` (3): the server does not know the service name
    /// asked about. tonic-health ends the stream with NOT_FOUND instead,
    /// which healthlb reads as this.
    ServiceUnknown,
    /// A value this client does not know.
    Unrecognized(i32),
}

// === impl HealthStatus ===

impl HealthStatus {
    /// The status a `ServingStatus` value on the wire stands for.
    pub(crate) fn from_wire(value: i32) -> Self {
        match value {
            0 => HealthStatus::Unknown,
            1 => HealthStatus::Serving,
            2 => HealthStatus::NotServing,
            3 => HealthStatus::ServiceUnknown,
            other => HealthStatus::Unrecognized(other),
        }
    }

    /// Its name, as `grpc.health.v1` spells it.
    pub fn label(&self) -> &'static str {
        match self {
            HealthStatus::Unknown => "UNKNOWN",
            HealthStatus::Serving => "SERVING",
            HealthStatus::NotServing => "NOT_SERVING",
            HealthStatus::ServiceUnknown => "SERVICE_UNKNOWN",
            HealthStatus::Unrecognized(_) => "unrecognized health status",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthStatus::Unrecognized(value) => write!(f, "unrecognized health status {value}"),
            other => f.write_str(other.label()),
        }
    }
}
