//! Metrics through the [`metrics`](https://docs.rs/metrics) facade, with the
//! feature `metrics` (off by default). Without it every function here is
//! empty and compiles away. The application installs a recorder (for
//! example metrics-exporter-prometheus); healthlb never exports.
//!
//! [`METRICS`] lists every metric with its kind, unit, labels and meaning:
//! the README's reference table is checked against it, and `build()`
//! registers each description with the recorder, so an exporter shows them
//! (Prometheus's `# HELP` lines).
//!
//! Messages are counted from the 5-byte gRPC length prefixes in request and
//! response bodies as they pass, so a long-lived stream's messages show up
//! live. A `method` label on the request and message counters is opt-in
//! (`metrics_method_label`), to keep cardinality bounded.

#[cfg(feature = "internals")]
pub(crate) mod bench;
mod endpoint;
mod frames;
mod list;

pub(crate) use self::endpoint::EndpointMetrics;
pub(crate) use self::frames::GrpcFrames;
pub(crate) use self::list::describe;

/// `healthlb_endpoints{target,state}`: how many endpoints are in each state.
pub(crate) fn endpoints(target: &str, counts: [(&'static str, usize); 4]) {
    #[cfg(feature = "metrics")]
    for (state, n) in counts {
        metrics::gauge!("healthlb_endpoints", "target" => target.to_owned(), "state" => state)
            .set(n as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (target, counts);
}

/// `healthlb_resolutions_total{target,result}`.
/// An endpoint ejected as an outlier, and why.
pub(crate) fn ejection(target: &str, endpoint: std::net::SocketAddr, reason: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_ejections_total", "target" => target.to_owned(), "endpoint" => endpoint.to_string(), "reason" => reason)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (target, endpoint, reason);
}

/// Endpoints ejected now, and whether panic mode sends calls to them.
pub(crate) fn ejected(target: &str, ejected: usize, panic: bool) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("healthlb_ejected_endpoints", "target" => target.to_owned())
            .set(ejected as f64);
        metrics::gauge!("healthlb_panic_mode", "target" => target.to_owned()).set(if panic {
            1.0
        } else {
            0.0
        });
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (target, ejected, panic);
}

/// The share of calls zone-aware routing keeps in the client's zone;
/// `None` when it is off.
pub(crate) fn zone_local_share(target: &str, share: Option<f64>) {
    #[cfg(feature = "metrics")]
    if let Some(share) = share {
        metrics::gauge!("healthlb_zone_local_share", "target" => target.to_owned()).set(share);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (target, share);
}

/// Weighted round robin's update fell back to round robin (gRFC A78's
/// `rr_fallback`).
pub(crate) fn wrr_fell_back(target: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_wrr_rr_fallback_total", "target" => target.to_owned()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = target;
}

/// Weighted round robin's update: how many endpoints had a weight not yet
/// usable, and how many a stale one.
pub(crate) fn wrr_weights(target: &str, not_yet_usable: usize, stale: usize) {
    #[cfg(feature = "metrics")]
    {
        let target = target.to_owned();
        metrics::counter!("healthlb_wrr_endpoint_weight_not_yet_usable_total", "target" => target.clone())
            .increment(not_yet_usable as u64);
        metrics::counter!("healthlb_wrr_endpoint_weight_stale_total", "target" => target)
            .increment(stale as u64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (target, not_yet_usable, stale);
}

/// Ring hash: a call went past its key's first endpoint, and why
/// (`not_in_rotation`, `overloaded`).
pub(crate) fn ring_hash_walked(target: &str, reason: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_ring_hash_walked_total", "target" => target.to_owned(), "reason" => reason)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (target, reason);
}

/// Whether resolution is failing now.
pub(crate) fn resolution_failing(target: &str, failing: bool) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("healthlb_resolution_failing", "target" => target.to_owned())
        .set(f64::from(u8::from(failing)));
    #[cfg(not(feature = "metrics"))]
    let _ = (target, failing);
}

/// A call under a retry or hedging policy ended after `attempts`.
pub(crate) fn call_attempts(target: &str, kind: &'static str, attempts: u32) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("healthlb_call_attempts", "target" => target.to_owned(), "kind" => kind)
        .record(f64::from(attempts));
    #[cfg(not(feature = "metrics"))]
    let _ = (target, kind, attempts);
}

/// Another attempt, after one that ended with `code`.
pub(crate) fn retry(target: &str, kind: &'static str, code: tonic::Code) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_retries_total", "target" => target.to_owned(), "kind" => kind, "code" => code_name(code))
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (target, kind, code);
}

/// A retry or hedge the token bucket held back.
pub(crate) fn retry_throttled(target: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_retries_throttled_total", "target" => target.to_owned())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = target;
}

/// A server's `grpc-retry-pushback-ms`, obeyed: `delay` or `stop`.
pub(crate) fn pushback(target: &str, action: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_retry_pushbacks_total", "target" => target.to_owned(), "action" => action)
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (target, action);
}

/// The policy in use: a gauge of 1 labelled with its name.
pub(crate) fn policy(target: &str, policy: &'static str, outlier_detection: bool) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("healthlb_policy", "target" => target.to_owned(), "policy" => policy, "outlier_detection" => if outlier_detection { "on" } else { "off" })
        .set(1.0);
    #[cfg(not(feature = "metrics"))]
    let _ = (target, policy, outlier_detection);
}

pub(crate) fn resolution(target: &str, result: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("healthlb_resolutions_total", "target" => target.to_owned(), "result" => result).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (target, result);
}

/// `healthlb_pick_wait_seconds{target}`.
pub(crate) fn pick_wait(target: &str, waited: std::time::Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("healthlb_pick_wait_seconds", "target" => target.to_owned())
        .record(waited.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (target, waited);
}

#[cfg(feature = "metrics")]
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
