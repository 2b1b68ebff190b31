//! Counters of one endpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

/// Counters of one endpoint, kept as atomics so the request path pays one
/// add per call; [`EndpointStatus`](crate::EndpointStatus) reads them.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) metrics: crate::metrics::EndpointMetrics,
    pub(crate) calls_started: AtomicU64,
    pub(crate) calls_in_flight: AtomicUsize,
    pub(crate) calls_failed: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) recycles: AtomicU64,
    /// What calls show: status and latency.
    pub(crate) outcomes: super::outcome::Outcomes,
    /// Whether the picker's last snapshot holds it: set by the balancer
    /// after each publish.
    pub(crate) in_rotation: AtomicBool,
    /// Until when the balancer keeps it out of rotation, and why.
    pub(crate) ejection: std::sync::Mutex<Option<(std::time::Instant, &'static str)>>,
}
