//! What one channel's calls share, and the wait for an endpoint: a pick
//! from the published snapshot, or a wait until one is published, bounded.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::time::Instant;
use tonic::Status;

use super::config::AppliedConfig;
use super::replay::RetryBuffer;
use crate::picker::Picker;
use crate::subchannel::{Pool, Subchannel};

/// How a call waits for an endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wait {
    /// Not past then.
    pub(crate) until: Instant,
    /// Not at all: no endpoint SERVING fails the call at once.
    pub(crate) fail_fast: bool,
    /// Even while the channel is in TRANSIENT_FAILURE.
    pub(crate) wait_for_ready: bool,
    /// Ring hash: the call's key.
    pub(crate) hash: Option<u64>,
}

/// The request path's part of a channel, shared by its clones.
pub(crate) struct Calls {
    pub(crate) target: Arc<str>,
    pub(crate) picker: Arc<Picker>,
    /// Every endpoint, for the message of a channel whose balancer died.
    pub(crate) endpoints: Arc<ArcSwap<Vec<Subchannel>>>,
    /// How long a call may wait for an endpoint.
    pub(crate) ready_timeout: Duration,
    /// Whether a call fails at once when no endpoint is SERVING.
    pub(crate) fail_fast: bool,
    /// The deadline of a call that carries none.
    pub(crate) timeout: Option<Duration>,
    /// The service config in force, from the builder or DNS.
    pub(crate) service_config: Arc<ArcSwapOption<AppliedConfig>>,
    pub(crate) retry_buffer: Arc<RetryBuffer>,
    /// gRPC's standard telemetry.
    pub(crate) telemetry: crate::telemetry::Telemetry,
}

// === impl Calls ===

impl Calls {
    /// A serving endpoint, not one of `tried` if another can take the
    /// call, waiting as `wait` says; and whether the pick had to wait.
    ///
    /// As gRPC's channel: a call waits while the channel is connecting,
    /// but in TRANSIENT_FAILURE (resolution failed with nothing to offer)
    /// it fails at once with the reason, unless its method is
    /// wait-for-ready.
    pub(crate) async fn wait_pick(
        &self,
        wait: Wait,
        tried: &[Arc<Pool>],
    ) -> Result<(Arc<Pool>, bool), Status> {
        let Wait {
            until,
            fail_fast,
            wait_for_ready,
            hash,
        } = wait;
        let mut published = self.picker.subscribe();
        let started = Instant::now();
        let limit = crate::deadline::rounded(until.saturating_duration_since(started));
        let mut waited = false;
        loop {
            if let Some((conn, walked)) = self.picker.pick_avoiding(tried, hash) {
                if waited {
                    crate::metrics::pick_wait(&self.target, started.elapsed());
                }
                if let Some(walked) = walked {
                    crate::metrics::ring_hash_walked(&self.target, walked.label());
                    self.telemetry.ring_hash_walked(walked.label());
                }
                return Ok((conn, waited));
            }
            if let Some(why) = self.picker.stopped() {
                return Err(self.stopped(why));
            }
            if !wait_for_ready && let Some(why) = self.picker.failing() {
                return Err(Status::unavailable(why.to_string()));
            }
            waited = true;
            if fail_fast {
                return Err(Status::unavailable(format!(
                    "{}: no endpoint is SERVING (fail_fast); {}",
                    self.target,
                    self.picker.summary()
                )));
            }
            match tokio::time::timeout_at(until, published.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(Status::unavailable(format!(
                        "{}: the channel has shut down",
                        self.target
                    )));
                }
                Err(_) => {
                    crate::metrics::pick_wait(&self.target, started.elapsed());
                    return Err(Status::unavailable(format!(
                        "{}: no endpoint is SERVING after waiting {limit:?}; {}",
                        self.target,
                        self.picker.summary()
                    )));
                }
            }
        }
    }

    /// The error of every call once the balancer stopped for good: it
    /// says why, and that the endpoints are shut down, as `endpoints()`
    /// then shows them.
    fn stopped(&self, why: &str) -> Status {
        let endpoints = match self.endpoints.load().len() {
            1 => "its 1 endpoint is".to_owned(),
            n => format!("its {n} endpoints are"),
        };
        Status::internal(format!(
            "{}: the channel's balancer stopped ({why}); {endpoints} SHUTDOWN, and no call can be sent: build a new channel",
            self.target,
        ))
    }
}
