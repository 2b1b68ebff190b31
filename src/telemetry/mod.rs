//! gRPC's standard telemetry (feature `opentelemetry`): the metrics of
//! gRFC A66 (per call and per attempt) and A94 (per subchannel) on the
//! user's `MeterProvider`, healthlb's own LB metrics in the same style, and
//! A72's spans: a call span, a child span per attempt (hedges and
//! transparent retries included) through `tracing`, with their message
//! events, and the trace context sent on every attempt (W3C `traceparent`,
//! `grpc-trace-bin`, or both).
//!
//! Spans follow the tracing subscriber alone, with or without a meter
//! provider; metrics need the provider. Without the feature, [`Telemetry`]
//! holds nothing and every hook is an empty inline function; with it but
//! with neither a provider nor a subscriber, a call pays one check.

#[cfg(feature = "opentelemetry")]
mod events;
#[cfg(feature = "opentelemetry")]
mod otel;
#[cfg(feature = "opentelemetry")]
mod policies;

#[cfg(feature = "opentelemetry")]
use std::sync::Arc;

/// The channel's telemetry, shared by its calls and subchannels.
#[derive(Clone, Default)]
pub(crate) struct Telemetry {
    /// With the feature on, always present: spans follow the tracing
    /// subscriber alone; instruments only with a meter provider.
    #[cfg(feature = "opentelemetry")]
    inner: Option<Arc<otel::Shared>>,
    /// gRFC A78's instruments, with a meter provider.
    #[cfg(feature = "opentelemetry")]
    policies: Option<Arc<policies::Instruments>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("on", &self.is_on())
            .finish()
    }
}

#[cfg(feature = "opentelemetry")]
pub(crate) use self::events::Outbound;
#[cfg(feature = "opentelemetry")]
pub(crate) use self::otel::{AttemptTelemetry, CallTelemetry};

/// Which headers carry each attempt's trace context to the server (gRFC
/// A72's propagators). Set with
/// [`Builder::trace_context`](crate::Builder::trace_context).
#[cfg(feature = "opentelemetry")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceContext {
    /// W3C `traceparent`, OpenTelemetry's standard. The default.
    #[default]
    W3c,
    /// `grpc-trace-bin`: OpenCensus's binary format, which servers with
    /// gRPC's OpenCensus plugin read (trace id, span id, trace options).
    GrpcTraceBin,
    /// Both headers, for a fleet moving from one to the other.
    Both,
}

/// What an attempt's span says of it besides its endpoint (gRFC A72).
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
pub(crate) struct Attempt {
    /// Counted attempts before it.
    pub(crate) previous: u32,
    /// The attempt before it in the same call never left the client.
    pub(crate) transparent: bool,
    /// It waited for the picker: "Delayed LB pick complete".
    pub(crate) delayed: bool,
}

/// The trace-context headers one attempt carries.
#[derive(Debug, Default)]
pub(crate) struct TraceHeaders {
    pub(crate) traceparent: Option<http::HeaderValue>,
    pub(crate) grpc_trace_bin: Option<http::HeaderValue>,
}

impl TraceHeaders {
    pub(crate) fn insert_into(self, headers: &mut http::HeaderMap) {
        if let Some(value) = self.traceparent {
            headers.insert("traceparent", value);
        }
        if let Some(value) = self.grpc_trace_bin {
            headers.insert("grpc-trace-bin", value);
        }
    }
}

/// What a call records; nothing without the feature.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) enum CallTelemetry {}

/// What an attempt records; nothing without the feature.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) enum AttemptTelemetry {}

/// An attempt's request messages as they leave; nothing without the
/// feature.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) enum Outbound {}

#[cfg(not(feature = "opentelemetry"))]
impl Outbound {
    pub(crate) fn sent(&mut self, _: &[u8]) {
        match *self {}
    }
}

#[cfg(not(feature = "opentelemetry"))]
impl CallTelemetry {
    pub(crate) fn attach(&self, _: &crate::call::Replay) {
        match *self {}
    }
}

#[cfg(not(feature = "opentelemetry"))]
impl AttemptTelemetry {
    pub(crate) fn trace_headers(&self) -> TraceHeaders {
        match *self {}
    }

    pub(crate) fn outbound(&self) -> Outbound {
        match *self {}
    }

    pub(crate) fn received(&mut self, _: &[u8]) {
        match *self {}
    }

    pub(crate) fn end(&mut self, _: tonic::Code) {
        match *self {}
    }
}

impl Telemetry {
    /// A channel's telemetry for `target`: spans for a tracing subscriber,
    /// whose attempts send their trace context in `headers`, and the
    /// instruments from `provider`, when given.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn new(
        provider: Option<&dyn opentelemetry::metrics::MeterProvider>,
        target: &str,
        headers: TraceContext,
    ) -> Self {
        Self {
            inner: Some(Arc::new(otel::Shared {
                target: target.into(),
                trace_context: headers,
                instruments: provider.map(|p| otel::Instruments::new(p, target)),
            })),
            policies: provider.map(|p| Arc::new(policies::Instruments::new(p, target))),
        }
    }

    /// The instruments, with a meter provider.
    #[cfg(feature = "opentelemetry")]
    fn instruments(&self) -> Option<&otel::Instruments> {
        self.inner.as_ref()?.instruments.as_ref()
    }

    pub(crate) fn is_on(&self) -> bool {
        #[cfg(feature = "opentelemetry")]
        {
            self.inner.is_some()
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            false
        }
    }

    /// A call to `method` begins; it must end by `deadline`, if it has one.
    #[inline]
    pub(crate) fn call(
        &self,
        method: &str,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<CallTelemetry> {
        #[cfg(feature = "opentelemetry")]
        {
            let shared = self.inner.as_ref()?;
            CallTelemetry::start(shared.clone(), method, deadline)
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            let _ = (method, deadline);
            None
        }
    }

    /// An attempt of `replay`'s call to `method` leaves for `endpoint`.
    #[inline]
    pub(crate) fn attempt(
        &self,
        method: &str,
        endpoint: std::net::SocketAddr,
        attempt: Attempt,
        replay: &crate::call::Replay,
    ) -> Option<AttemptTelemetry> {
        #[cfg(feature = "opentelemetry")]
        {
            let shared = self.inner.as_ref()?;
            let (parent, deadline) = (replay.span(), replay.deadline());
            AttemptTelemetry::start(shared.clone(), method, endpoint, attempt, parent, deadline)
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            let _ = (method, endpoint, attempt, replay);
            None
        }
    }

    /// A94: a connection attempt to an endpoint in `locality` ended.
    pub(crate) fn connection_attempt(&self, locality: Option<&str>, ok: bool) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.connection_attempt(locality, ok);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (locality, ok);
    }

    /// A94: a connection closed for `reason` (A94's disconnect error).
    pub(crate) fn disconnection(&self, locality: Option<&str>, reason: &str) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.disconnection(locality, reason);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (locality, reason);
    }

    /// A94: `delta` more (or fewer) connections are open.
    pub(crate) fn open_connections(&self, locality: Option<&str>, tls: bool, delta: i64) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.open_connections(locality, tls, delta);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (locality, tls, delta);
    }

    /// healthlb's own: endpoints ejected now, and whether panic mode runs.
    pub(crate) fn ejected(&self, ejected: usize, panic: bool) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.ejected(ejected, panic);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (ejected, panic);
    }

    /// healthlb's own: an endpoint was ejected, by `algorithm`.
    pub(crate) fn ejection(&self, algorithm: &str) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.ejection(algorithm);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = algorithm;
    }

    /// healthlb's own: a retry or hedge the token bucket refused.
    pub(crate) fn retry_throttled(&self) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.retry_throttled();
        }
    }

    /// healthlb's own: whether resolution is failing now.
    pub(crate) fn resolution_failing(&self, failing: bool) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = self.instruments() {
            i.resolution_failing(failing);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = failing;
    }

    /// Ring hash: a call went past its key's first endpoint, for `reason`.
    pub(crate) fn ring_hash_walked(&self, reason: &'static str) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = &self.policies {
            i.walked(reason);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = reason;
    }

    /// gRFC A78: weighted round robin's update had fewer than two usable
    /// weights, and fell back to round robin.
    pub(crate) fn wrr_fell_back(&self) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = &self.policies {
            i.fell_back();
        }
    }

    /// gRFC A78: an endpoint's weight at an update, and where it stands.
    pub(crate) fn wrr_endpoint(
        &self,
        locality: Option<&str>,
        state: crate::load::WeightState,
        weight: f64,
    ) {
        #[cfg(feature = "opentelemetry")]
        if let Some(i) = &self.policies {
            i.endpoint(locality, state, weight);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = (locality, state, weight);
    }

    /// healthlb's own: the share of calls that stays in the client's zone.
    pub(crate) fn zone_local_share(&self, share: Option<f64>) {
        #[cfg(feature = "opentelemetry")]
        if let (Some(i), Some(share)) = (self.instruments(), share) {
            i.zone_local_share(share);
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = share;
    }
}
