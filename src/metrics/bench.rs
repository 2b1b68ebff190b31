//! The metrics work one unary call does on the request path, for the
//! benchmarks. Not part of the API.

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
