//! One endpoint's metric handles, registered once, so the request path
//! only adds to atomics.

use std::net::SocketAddr;
use std::sync::Arc;

#[cfg(feature = "metrics")]
use super::code_name;

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
