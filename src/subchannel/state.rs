//! Where a subchannel stands, and what its health service said.

use std::fmt;

use crate::connection::HealthStatus;
use std::sync::Arc;
use std::time::Instant;

use crate::Error;
use crate::connection::Conn;

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
    NotServing(NotServingReason),
    /// The connection failed or was lost; it is retried with backoff.
    TransientFailure(Error),
    /// The subchannel was stopped: its endpoint left the resolver's set, or
    /// its channel was dropped. It takes no calls and never comes back.
    Shutdown,
}

/// Why a connected endpoint is not serving.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotServingReason {
    /// The health service answered something other than SERVING.
    Health(HealthStatus),
    /// The health stream ended or failed; it is retried with backoff.
    HealthStreamEnded(String),
}

// === impl NotServingReason ===

impl NotServingReason {
    fn label(&self) -> &str {
        match self {
            NotServingReason::Health(status) => status.label(),
            NotServingReason::HealthStreamEnded(_) => "health stream ended",
        }
    }
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

    /// The state's name in metrics: serving, not_serving, connecting,
    /// transient_failure or shutdown.
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
    pub(crate) fn same_as(&self, other: &SubchannelState) -> bool {
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
            SubchannelState::NotServing(NotServingReason::HealthStreamEnded(why)) => {
                write!(f, "NOT_SERVING (health stream ended: {why})")
            }
            SubchannelState::NotServing(NotServingReason::Health(
                status @ HealthStatus::Unrecognized(_),
            )) => write!(f, "NOT_SERVING ({status})"),
            SubchannelState::TransientFailure(error) => write!(f, "TRANSIENT_FAILURE ({error})"),
            other => f.write_str(other.label()),
        }
    }
}

/// What a subchannel publishes: its state, since when, and the connection
/// that serves when it is serving.
#[derive(Clone, Debug)]
pub struct SubchannelStatus {
    pub(crate) state: SubchannelState,
    pub(crate) since: Instant,
    pub(crate) last_health: Option<HealthStatus>,
    pub(crate) conn: Option<Arc<Conn>>,
}

// === impl SubchannelStatus ===

impl SubchannelStatus {
    pub(crate) fn new() -> Self {
        Self {
            state: SubchannelState::Connecting,
            since: Instant::now(),
            last_health: None,
            conn: None,
        }
    }

    /// The state.
    pub fn state(&self) -> &SubchannelState {
        &self.state
    }

    /// When the state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The last answer of the health service, if any.
    pub fn last_health(&self) -> Option<HealthStatus> {
        self.last_health
    }

    /// When the endpoint's first connection was established, if there is one.
    pub fn connected_at(&self) -> Option<Instant> {
        self.conn.as_ref().map(|c| c.established)
    }
}
