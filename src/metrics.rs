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

use std::net::SocketAddr;
use std::sync::Arc;

/// What one metric is.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Described {
    pub(crate) name: &'static str,
    /// counter, gauge or histogram.
    pub(crate) kind: &'static str,
    /// seconds, or empty for a plain count.
    pub(crate) unit: &'static str,
    pub(crate) labels: &'static str,
    pub(crate) meaning: &'static str,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const fn described(
    name: &'static str,
    kind: &'static str,
    unit: &'static str,
    labels: &'static str,
    meaning: &'static str,
) -> Described {
    Described {
        name,
        kind,
        unit,
        labels,
        meaning,
    }
}

/// Every metric healthlb records.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const METRICS: &[Described] = &[
    described(
        "healthlb_endpoints",
        "gauge",
        "",
        "target, state (serving, not_serving, connecting, transient_failure)",
        "Endpoints in each state.",
    ),
    described(
        "healthlb_requests_total",
        "counter",
        "",
        "target, endpoint, code (the gRPC status name), method (opt-in)",
        "Calls that ended, each attempt counted, by gRPC status; CANCELLED for attempts the client gave up on.",
    ),
    described(
        "healthlb_stream_messages_sent_total",
        "counter",
        "",
        "target, endpoint, method (opt-in)",
        "Request messages sent, counted as they pass.",
    ),
    described(
        "healthlb_stream_messages_received_total",
        "counter",
        "",
        "target, endpoint, method (opt-in)",
        "Response messages received, counted as they pass.",
    ),
    described(
        "healthlb_health_transitions_total",
        "counter",
        "",
        "target, endpoint, to (the new state)",
        "Endpoint state changes.",
    ),
    described(
        "healthlb_resolutions_total",
        "counter",
        "",
        "target, result (ok, empty, error)",
        "Name resolutions.",
    ),
    described(
        "healthlb_connection_recycles_total",
        "counter",
        "",
        "target, endpoint, reason (max_age, goaway, too_many_pings, lost)",
        "Connections replaced, and why.",
    ),
    described(
        "healthlb_connections",
        "gauge",
        "",
        "target, endpoint",
        "Connections open for calls, extra ones past a server's stream limit included.",
    ),
    described(
        "healthlb_pick_wait_seconds",
        "histogram",
        "seconds",
        "target",
        "How long calls waited for a SERVING endpoint, for the calls that had to.",
    ),
    described(
        "healthlb_policy",
        "gauge",
        "",
        "target, policy, outlier_detection (on, off)",
        "1 for the policy in use.",
    ),
    described(
        "healthlb_ejections_total",
        "counter",
        "",
        "target, endpoint, reason (consecutive_failures, success_rate, failure_percentage)",
        "Outlier ejections.",
    ),
    described(
        "healthlb_ejected_endpoints",
        "gauge",
        "",
        "target",
        "Endpoints ejected now.",
    ),
    described(
        "healthlb_panic_mode",
        "gauge",
        "",
        "target",
        "1 while every SERVING endpoint is ejected and calls go to them anyway.",
    ),
    described(
        "healthlb_call_attempts",
        "histogram",
        "",
        "target, kind (retry, hedge)",
        "Attempts per call under a retry or hedging policy; transparent ones are not counted.",
    ),
    described(
        "healthlb_retries_total",
        "counter",
        "",
        "target, kind (retry, hedge), code (the status that caused it)",
        "Retries and hedges sent.",
    ),
    described(
        "healthlb_retries_throttled_total",
        "counter",
        "",
        "target",
        "Retries and hedges the token bucket held back.",
    ),
    described(
        "healthlb_retry_pushbacks_total",
        "counter",
        "",
        "target, action (delay, stop)",
        "Servers' grpc-retry-pushback-ms obeyed.",
    ),
];

/// Registers every metric's description with the installed recorder, so
/// an exporter shows them. Called by each `build()`: a recorder installed
/// later than a channel's build gets them at the next.
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    for m in METRICS {
        let unit = match m.unit {
            "seconds" => metrics::Unit::Seconds,
            _ => metrics::Unit::Count,
        };
        let help = format!("{} Labels: {}.", m.meaning, m.labels);
        match m.kind {
            "counter" => metrics::describe_counter!(m.name, unit, help),
            "gauge" => metrics::describe_gauge!(m.name, unit, help),
            _ => metrics::describe_histogram!(m.name, unit, help),
        }
    }
}

/// The handles of one endpoint, registered once so the request path only
/// adds to atomics.
pub(crate) struct EndpointMetrics {
    #[cfg(feature = "metrics")]
    inner: Option<Handles>,
}

#[cfg(feature = "metrics")]
struct Handles {
    target: Arc<str>,
    endpoint: Arc<str>,
    method_label: bool,
    sent: metrics::Counter,
    received: metrics::Counter,
    connections: metrics::Gauge,
    codes: [std::sync::OnceLock<metrics::Counter>; 17],
}

impl std::fmt::Debug for EndpointMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointMetrics")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Default for EndpointMetrics {
    /// Off: a subchannel outside an `LbChannel` has no target to label.
    fn default() -> Self {
        Self {
            #[cfg(feature = "metrics")]
            inner: None,
        }
    }
}

impl EndpointMetrics {
    pub(crate) fn new(target: Option<Arc<str>>, endpoint: SocketAddr, method_label: bool) -> Self {
        #[cfg(feature = "metrics")]
        {
            let Some(target) = target else {
                return Self::default();
            };
            let endpoint: Arc<str> = endpoint.to_string().into();
            let labels = [
                ("target", target.to_string()),
                ("endpoint", endpoint.to_string()),
            ];
            Self {
                inner: Some(Handles {
                    sent: metrics::counter!("healthlb_stream_messages_sent_total", &labels),
                    received: metrics::counter!("healthlb_stream_messages_received_total", &labels),
                    connections: metrics::gauge!("healthlb_connections", &labels),
                    codes: Default::default(),
                    target,
                    endpoint,
                    method_label,
                }),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (target, endpoint, method_label);
            Self::default()
        }
    }

    /// Whether anything is recorded: the request path skips frame counting
    /// otherwise.
    pub(crate) fn enabled(&self) -> bool {
        #[cfg(feature = "metrics")]
        {
            self.inner.is_some()
        }
        #[cfg(not(feature = "metrics"))]
        {
            false
        }
    }

    pub(crate) fn messages_sent(&self, n: u64, method: &str) {
        self.messages(true, n, method);
    }

    pub(crate) fn messages_received(&self, n: u64, method: &str) {
        self.messages(false, n, method);
    }

    /// Adds `n` messages sent (or received) to the endpoint's counter, or to
    /// the method's with the method label on.
    fn messages(&self, sent: bool, n: u64, method: &str) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.inner {
            let (handle, name) = match sent {
                true => (&h.sent, "healthlb_stream_messages_sent_total"),
                false => (&h.received, "healthlb_stream_messages_received_total"),
            };
            match h.method_label {
                false => handle.increment(n),
                true => metrics::counter!(
                    name,
                    "target" => h.target.to_string(), "endpoint" => h.endpoint.to_string(), "method" => method.to_owned()
                )
                .increment(n),
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (sent, n, method);
    }

    /// A finished call and its gRPC status.
    pub(crate) fn request_done(&self, code: tonic::Code, method: &str) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.inner {
            let name = code_name(code);
            if h.method_label {
                metrics::counter!(
                    "healthlb_requests_total",
                    "target" => h.target.to_string(), "endpoint" => h.endpoint.to_string(),
                    "code" => name, "method" => method.to_owned()
                )
                .increment(1);
                return;
            }
            let slot = (code as usize).min(16);
            h.codes[slot]
                .get_or_init(|| {
                    metrics::counter!(
                        "healthlb_requests_total",
                        "target" => h.target.to_string(), "endpoint" => h.endpoint.to_string(), "code" => name
                    )
                })
                .increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (code, method);
    }

    pub(crate) fn transition(&self, to: &'static str) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.inner {
            metrics::counter!(
                "healthlb_health_transitions_total",
                "target" => h.target.to_string(), "endpoint" => h.endpoint.to_string(), "to" => to
            )
            .increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = to;
    }

    /// How many connections the endpoint has open for calls.
    pub(crate) fn connections(&self, n: usize) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.inner {
            h.connections.set(n as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    pub(crate) fn recycle(&self, reason: &'static str) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.inner {
            metrics::counter!(
                "healthlb_connection_recycles_total",
                "target" => h.target.to_string(), "endpoint" => h.endpoint.to_string(), "reason" => reason
            )
            .increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = reason;
    }
}

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

/// Counts gRPC messages in a body from their 5-byte length prefixes, across
/// chunk boundaries. A message counts as soon as its prefix has passed.
#[derive(Debug, Default)]
pub(crate) struct GrpcFrames {
    /// Prefix bytes seen of the next message (0–4).
    prefix: u8,
    len: [u8; 4],
    /// Bytes left of the current message.
    remaining: u64,
}

impl GrpcFrames {
    /// Feeds one chunk; returns how many messages began in it.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            if self.prefix > 0 {
                self.len[usize::from(self.prefix) - 1] = byte;
            }
            self.prefix += 1;
            if self.prefix == 5 {
                messages += 1;
                self.prefix = 0;
                self.remaining = u64::from(u32::from_be_bytes(self.len));
            }
        }
        messages
    }
}

/// The metrics work one unary call does on the request path, for the
/// benchmarks. Not part of the API.
#[cfg(feature = "internals")]
pub(crate) mod bench {
    use super::{EndpointMetrics, GrpcFrames};

    /// One endpoint's handles, and its request and response frame counters.
    #[allow(missing_debug_implementations)]
    pub struct PerCall {
        metrics: EndpointMetrics,
    }

    impl PerCall {
        /// Handles labelled as an `LbChannel` to `target` labels them.
        pub fn new(target: &str) -> Self {
            let endpoint = std::net::SocketAddr::from(([127, 0, 0, 2], 50051));
            Self {
                metrics: EndpointMetrics::new(Some(target.into()), endpoint, false),
            }
        }

        /// Counts `request`'s and `response`'s messages and records an OK
        /// status, as a unary call through healthlb does.
        pub fn call(&self, request: &[u8], response: &[u8]) {
            if !self.metrics.enabled() {
                return;
            }
            let sent = GrpcFrames::default().feed(request);
            self.metrics.messages_sent(sent, "/echo.Echo/Unary");
            let received = GrpcFrames::default().feed(response);
            self.metrics.messages_received(received, "/echo.Echo/Unary");
            self.metrics
                .request_done(tonic::Code::Ok, "/echo.Echo/Unary");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{GrpcFrames, METRICS};

    #[test]
    fn the_readme_table_lists_every_metric_as_the_code_describes_it() {
        let readme = include_str!("../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|l| l.starts_with("| `healthlb_"))
            .collect();
        assert_eq!(rows.len(), METRICS.len(), "one row per metric: {rows:#?}");
        for m in METRICS {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| `{}` |", m.name)))
                .unwrap_or_else(|| panic!("{} has no row in the README", m.name));
            let unit = if m.unit.is_empty() { "" } else { m.unit };
            let expected = format!(
                "| `{}` | {} | {} | {} | {} |",
                m.name, m.kind, unit, m.labels, m.meaning
            );
            assert_eq!(*row, expected.replace("|  |", "| |"), "{}", m.name);
        }
    }

    fn message(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn counts_messages_across_chunk_boundaries() {
        let mut stream = Vec::new();
        for body in [&b"hello"[..], b"", b"a longer message body", b"x"] {
            stream.extend(message(body));
        }
        // Whole, and cut into every chunk size.
        for chunk in 1..=stream.len() {
            let mut frames = GrpcFrames::default();
            let n: u64 = stream.chunks(chunk).map(|c| frames.feed(c)).sum();
            assert_eq!(n, 4, "chunk size {chunk}");
        }
    }
}
