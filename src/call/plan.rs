//! What a call is before it is sent: its `methodConfig` entry, its
//! deadline, and whether it waits for an endpoint.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tonic::body::Body;

use super::config::AppliedConfig;
use super::pick::Calls;
use super::response::Deadline;
use crate::deadline::{deadline_in, grpc_timeout};
use crate::service_config::ServiceConfig;
use tokio::time::Instant;

/// How one call is sent: whether it waits for an endpoint, until when,
/// and by which retry or hedging policy.
pub(crate) struct Plan {
    pub(crate) fail_fast: bool,
    /// The method's `waitForReady`: it waits even while the channel is in
    /// TRANSIENT_FAILURE (resolution failed with nothing to offer).
    pub(crate) wait_for_ready: bool,
    /// The call's deadline: no attempt waits past it.
    pub(crate) deadline: Option<Instant>,
    /// Ring hash: the call's key, from its request header.
    pub(crate) hash: Option<u64>,
    /// The service config in force when the call was made, and the index
    /// of the method's `methodConfig` entry, when that entry has a retry
    /// or hedging policy. Shared: a call copies no policy.
    pub(crate) policy: Option<(Arc<AppliedConfig>, usize)>,
    /// The channel's `retryThrottling` bucket, if it has one: every call
    /// that ends OK refills it, whatever its method (gRFC A6).
    pub(crate) throttle: Option<Arc<super::throttle::Throttle>>,
}

// === impl Calls ===

impl Calls {
    /// How `request` is sent, and its deadline: the shortest of its own
    /// `grpc-timeout`, the channel's `timeout` and the method's.
    pub(crate) fn plan(&self, request: &Request<Body>) -> (Plan, Option<Deadline>) {
        let applied = self.service_config.load();
        let method = applied
            .as_ref()
            .and_then(|a| Some((a, method_index(&a.config, request.uri().path())?)));
        let entry = method.map(|(a, i)| &a.config.method_config[i]);
        let timeout = match (self.timeout, entry.and_then(|m| m.timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = call_deadline(request, timeout).map(|limit| Deadline {
            limit,
            at: deadline_in(limit),
        });
        let plan = Plan {
            deadline: deadline.map(|d| d.at),
            hash: self.picker.request_hash(request.headers()),
            fail_fast: entry
                .and_then(|m| m.wait_for_ready)
                .map_or(self.fail_fast, |wait| !wait),
            wait_for_ready: entry.and_then(|m| m.wait_for_ready) == Some(true),
            throttle: applied.as_ref().and_then(|a| a.throttle.clone()),
            policy: method
                .filter(|(a, i)| {
                    let m = &a.config.method_config[*i];
                    m.retry_policy.is_some() || m.hedging_policy.is_some()
                })
                .map(|(a, i)| (Arc::clone(a), i)),
        };
        (plan, deadline)
    }
}

/// Where the `methodConfig` entry for a request path `/service/method` is.
fn method_index(config: &ServiceConfig, path: &str) -> Option<usize> {
    if config.method_config.is_empty() {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    config.method_index(service, method)
}

/// The call's deadline: the shorter of its own `grpc-timeout` and
/// `timeout`. Each attempt tells the server the time left until it
/// (`replay/`).
fn call_deadline(request: &Request<Body>, timeout: Option<Duration>) -> Option<Duration> {
    match (grpc_timeout(request.headers()), timeout) {
        (Some(own), Some(channel)) => Some(own.min(channel)),
        (own, channel) => own.or(channel),
    }
}
