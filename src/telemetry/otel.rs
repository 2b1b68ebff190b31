//! The instruments, and what a call and an attempt record on them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::HeaderValue;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider, UpDownCounter};
use opentelemetry::trace::TraceContextExt;
use tonic::Code;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::events::{Messages, Outbound, grpc_trace_bin};
use super::{TraceContext, TraceHeaders};

/// A66's latency bounds, in seconds.
pub(crate) const LATENCY_BOUNDS: [f64; 41] = [
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
    0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];

/// A66's size bounds, in bytes.
pub(crate) const SIZE_BOUNDS: [f64; 14] = [
    0.0,
    1024.0,
    2048.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

/// The instrumentation scope.
pub(super) const SCOPE: &str = "healthlb";

/// A `u64` counter of healthlb's scope on `meter`.
pub(super) fn counter(
    meter: &opentelemetry::metrics::Meter,
    name: &'static str,
    unit: &'static str,
    what: &'static str,
) -> Counter<u64> {
    meter
        .u64_counter(name)
        .with_unit(unit)
        .with_description(what)
        .build()
}

/// The most distinct methods labelled; past it, `other`, as A66 labels
/// methods it doesn't know, to bound cardinality.
const MAX_METHODS: usize = 1000;

/// What one channel's telemetry shares: the target and the trace-context
/// headers for spans, which follow the tracing subscriber alone, and the
/// instruments when a meter provider was given.
pub(crate) struct Shared {
    /// The canonical target, for spans.
    pub(crate) target: Arc<str>,
    /// Which headers carry an attempt's trace context.
    pub(crate) trace_context: TraceContext,
    pub(crate) instruments: Option<Instruments>,
}

impl Shared {
    /// Whether a call or attempt records anything: metrics, or spans for a
    /// subscriber.
    fn records(&self) -> bool {
        self.instruments.is_some() || tracing::dispatcher::has_been_set()
    }
}

pub(crate) struct Instruments {
    target: KeyValue,
    /// Each method's label, made once: a label's value is shared, not
    /// copied, on every record.
    methods: std::sync::RwLock<std::collections::HashMap<Box<str>, KeyValue>>,
    attempt_started: Counter<u64>,
    attempt_duration: Histogram<f64>,
    attempt_sent: Histogram<u64>,
    attempt_rcvd: Histogram<u64>,
    call_duration: Histogram<f64>,
    connection_succeeded: Counter<u64>,
    connection_failed: Counter<u64>,
    disconnections: Counter<u64>,
    open_connections: UpDownCounter<i64>,
    ejections: Counter<u64>,
    ejected: Gauge<u64>,
    panic: Gauge<u64>,
    throttled: Counter<u64>,
    zone_local: Gauge<f64>,
    resolution_failing: Gauge<u64>,
}

impl Instruments {
    pub(crate) fn new(provider: &dyn MeterProvider, target: &str) -> Self {
        let meter = provider.meter(SCOPE);
        let seconds = |name: &'static str, what: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(what)
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build()
        };
        let bytes = |name: &'static str, what: &'static str| {
            meter
                .u64_histogram(name)
                .with_unit("By")
                .with_description(what)
                .with_boundaries(SIZE_BOUNDS.to_vec())
                .build()
        };
        let counter = |name, unit, what| counter(&meter, name, unit, what);
        Self {
            target: KeyValue::new("grpc.target", opentelemetry::StringValue::from(Arc::<str>::from(target))),
            methods: Default::default(),
            attempt_started: counter(
                "grpc.client.attempt.started",
                "{attempt}",
                "The number of client call attempts started.",
            ),
            attempt_duration: seconds(
                "grpc.client.attempt.duration",
                "End-to-end time taken to complete a client call attempt.",
            ),
            attempt_sent: bytes(
                "grpc.client.attempt.sent_total_compressed_message_size",
                "Compressed message bytes sent per client call attempt.",
            ),
            attempt_rcvd: bytes(
                "grpc.client.attempt.rcvd_total_compressed_message_size",
                "Compressed message bytes received per call attempt.",
            ),
            call_duration: seconds(
                "grpc.client.call.duration",
                "Time taken by gRPC to complete an RPC from application's perspective.",
            ),
            connection_succeeded: counter(
                "grpc.subchannel.connection_attempts_succeeded",
                "{attempt}",
                "Number of successful connection attempts.",
            ),
            connection_failed: counter(
                "grpc.subchannel.connection_attempts_failed",
                "{attempt}",
                "Number of failed connection attempts.",
            ),
            disconnections: counter(
                "grpc.subchannel.disconnections",
                "{disconnection}",
                "Number of times the selected subchannel becomes disconnected.",
            ),
            open_connections: meter
                .i64_up_down_counter("grpc.subchannel.open_connections")
                .with_unit("{connection}")
                .with_description("Number of open connections.")
                .build(),
            ejections: counter(
                "grpc.lb.outlier_detection.ejections",
                "{ejection}",
                "healthlb: endpoints ejected as outliers, by algorithm.",
            ),
            ejected: meter
                .u64_gauge("grpc.lb.outlier_detection.ejected_endpoints")
                .with_unit("{endpoint}")
                .with_description("healthlb: endpoints ejected now.")
                .build(),
            panic: meter
                .u64_gauge("grpc.lb.panic_mode")
                .with_unit("1")
                .with_description("healthlb: 1 while every SERVING endpoint is ejected and calls go to them anyway.")
                .build(),
            throttled: counter(
                "grpc.lb.retries_throttled",
                "{attempt}",
                "healthlb: retries and hedges the retry token bucket refused.",
            ),
            resolution_failing: meter
                .u64_gauge("grpc.lb.resolution.failing")
                .with_unit("1")
                .with_description("healthlb: 1 while resolution fails; the last good set is kept.")
                .build(),
            zone_local: meter
                .f64_gauge("grpc.lb.zone.local_share")
                .with_unit("1")
                .with_description("healthlb: the share of calls that lands in the client's zone, with zone-aware routing on or off.")
                .build(),
        }
    }

    /// The `grpc.method` label of `path`.
    fn method(&self, path: &str) -> KeyValue {
        let read = self.methods.read().unwrap_or_else(|e| e.into_inner());
        if let Some(label) = read.get(path) {
            return label.clone();
        }
        let full = read.len() >= MAX_METHODS;
        drop(read);
        if full {
            return KeyValue::new("grpc.method", "other");
        }
        let name: Arc<str> = path.trim_start_matches('/').into();
        let label = KeyValue::new("grpc.method", opentelemetry::StringValue::from(name));
        let mut write = self.methods.write().unwrap_or_else(|e| e.into_inner());
        write.entry(path.into()).or_insert(label).clone()
    }

    fn labels(&self, method: &KeyValue, code: Code) -> [KeyValue; 3] {
        // In key order: the SDK finds a known set on its first look.
        [
            method.clone(),
            KeyValue::new("grpc.status", code_name(code)),
            self.target.clone(),
        ]
    }

    fn subchannel(&self, locality: Option<&str>) -> [KeyValue; 3] {
        [
            KeyValue::new("grpc.lb.backend_service", ""),
            KeyValue::new("grpc.lb.locality", locality.unwrap_or_default().to_owned()),
            self.target.clone(),
        ]
    }

    pub(crate) fn connection_attempt(&self, locality: Option<&str>, ok: bool) {
        let labels = self.subchannel(locality);
        match ok {
            true => self.connection_succeeded.add(1, &labels),
            false => self.connection_failed.add(1, &labels),
        }
    }

    pub(crate) fn disconnection(&self, locality: Option<&str>, reason: &str) {
        let [a, b, c] = self.subchannel(locality);
        let reason = KeyValue::new("grpc.disconnect_error", reason.to_owned());
        self.disconnections.add(1, &[reason, a, b, c]);
    }

    pub(crate) fn open_connections(&self, locality: Option<&str>, tls: bool, delta: i64) {
        let [a, b, c] = self.subchannel(locality);
        let level = match tls {
            true => "privacy_and_integrity",
            false => "none",
        };
        let level = KeyValue::new("grpc.security_level", level);
        self.open_connections.add(delta, &[a, b, level, c]);
    }

    pub(crate) fn ejected(&self, ejected: usize, panic: bool) {
        let labels = [self.target.clone()];
        self.ejected.record(ejected as u64, &labels);
        self.panic.record(u64::from(panic), &labels);
    }

    pub(crate) fn ejection(&self, algorithm: &str) {
        let algorithm = KeyValue::new("grpc.lb.outlier_detection.algorithm", algorithm.to_owned());
        self.ejections.add(1, &[self.target.clone(), algorithm]);
    }

    pub(crate) fn retry_throttled(&self) {
        self.throttled.add(1, std::slice::from_ref(&self.target));
    }

    pub(crate) fn resolution_failing(&self, failing: bool) {
        self.resolution_failing
            .record(u64::from(failing), std::slice::from_ref(&self.target));
    }

    pub(crate) fn zone_local_share(&self, share: f64) {
        self.zone_local
            .record(share, std::slice::from_ref(&self.target));
    }
}

/// A72's span name part: `service.method`.
fn span_method(path: &str) -> String {
    path.trim_start_matches('/').replace('/', ".")
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The status of a call or attempt dropped before it had one: the client's
/// deadline ended it if that has passed, else the caller gave up.
fn dropped(deadline: Option<tokio::time::Instant>) -> Code {
    match deadline {
        Some(at) if at <= tokio::time::Instant::now() => Code::DeadlineExceeded,
        _ => Code::Cancelled,
    }
}

/// Records a call's or attempt's end on its span: `grpc.status`, and the
/// span status A72 asks for, Ok or Error with the code.
fn record_status(span: &tracing::Span, code: Code) {
    if span.is_disabled() {
        return;
    }
    span.record("grpc.status", code_name(code));
    match code {
        Code::Ok => span.record("otel.status_code", "OK"),
        other => span.record("otel.status_description", code_name(other)),
    };
}

/// A call, from `LbChannel::call` to its status.
pub(crate) struct CallTelemetry {
    shared: Arc<Shared>,
    /// Its `grpc.method` label, with instruments.
    method: Option<KeyValue>,
    started: Instant,
    span: tracing::Span,
    /// The call's deadline: a call dropped past it ended there.
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

impl CallTelemetry {
    /// `None` when there is nothing to record: no instruments, and no
    /// subscriber for spans.
    pub(crate) fn start(
        shared: Arc<Shared>,
        path: &str,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<Self> {
        if !shared.records() {
            return None;
        }
        // No span without a subscriber: with tracing's `log` feature on
        // (kube turns it on), even a disabled span formats log records.
        let span = if !tracing::dispatcher::has_been_set() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "grpc.call",
                otel.name = %format_args!("Sent.{}", span_method(path)),
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.method = path,
                grpc.target = %shared.target,
                grpc.status = Empty,
                otel.status_code = Empty,
                otel.status_description = Empty,
            )
        };
        Some(Self {
            method: shared.instruments.as_ref().map(|i| i.method(path)),
            shared,
            started: Instant::now(),
            span,
            deadline,
            done: false,
        })
    }

    /// Makes the call's span the parent of the spans of `replay`'s
    /// attempts.
    pub(crate) fn attach(&self, replay: &crate::call::Replay) {
        if !self.span.is_disabled() {
            replay.set_span(self.span.clone());
        }
    }

    /// The call ended with `code`.
    pub(crate) fn end(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let (Some(i), Some(method)) = (&self.shared.instruments, &self.method) {
            let labels = i.labels(method, code);
            i.call_duration
                .record(self.started.elapsed().as_secs_f64(), &labels);
        }
        record_status(&self.span, code);
    }
}

impl Drop for CallTelemetry {
    fn drop(&mut self) {
        // Dropped before its status: its deadline ended it, or the caller
        // gave up on it.
        self.end(dropped(self.deadline));
    }
}

/// One attempt, from leaving for an endpoint to its status.
pub(crate) struct AttemptTelemetry {
    shared: Arc<Shared>,
    /// Its `grpc.method` label, with instruments.
    method: Option<KeyValue>,
    started: Instant,
    span: tracing::Span,
    /// The call's deadline: an attempt dropped past it ended there.
    deadline: Option<tokio::time::Instant>,
    received: Messages,
    /// Request message bytes the attempt's body handed to the connection.
    sent: Arc<AtomicU64>,
    done: bool,
}

impl AttemptTelemetry {
    /// `None` when there is nothing to record: no instruments, and no
    /// subscriber for spans.
    pub(crate) fn start(
        shared: Arc<Shared>,
        path: &str,
        endpoint: SocketAddr,
        attempt: crate::telemetry::Attempt,
        parent: Option<&tracing::Span>,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<Self> {
        if parent.is_none() && !shared.records() {
            return None;
        }
        let crate::telemetry::Attempt {
            previous,
            transparent,
            delayed,
        } = attempt;
        let method = shared.instruments.as_ref().map(|i| {
            let method = i.method(path);
            i.attempt_started
                .add(1, &[method.clone(), i.target.clone()]);
            method
        });
        let span = if parent.is_none() && !tracing::dispatcher::has_been_set() {
            tracing::Span::none()
        } else {
            macro_rules! attempt_span {
                ($($parent:tt)*) => {
                    tracing::info_span!(
                        $($parent)*
                        "grpc.attempt",
                        otel.name = %format_args!("Attempt.{}", span_method(path)),
                        otel.kind = "client",
                        "previous-rpc-attempts" = previous,
                        "transparent-retry" = transparent,
                        net.peer.name = %endpoint,
                        grpc.status = Empty,
                        otel.status_code = Empty,
                        otel.status_description = Empty,
                    )
                };
            }
            match parent {
                Some(parent) => attempt_span!(parent: parent,),
                // No call span (a call through `discover()` made without
                // one): the caller's current span is the parent, so the
                // attempt stays in the caller's trace.
                None => attempt_span!(),
            }
        };
        if delayed && !span.is_disabled() {
            tracing::debug!(parent: &span, "Delayed LB pick complete");
        }
        Some(Self {
            shared,
            method,
            started: Instant::now(),
            span,
            deadline,
            received: Messages::default(),
            sent: Arc::default(),
            done: false,
        })
    }

    /// This attempt's trace context, in the headers the channel sends,
    /// when an OpenTelemetry layer records its span.
    pub(crate) fn trace_headers(&self) -> TraceHeaders {
        if self.span.is_disabled() {
            return TraceHeaders::default();
        }
        let context = self.span.context();
        let span = context.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return TraceHeaders::default();
        }
        let (w3c, bin) = match self.shared.trace_context {
            TraceContext::W3c => (true, false),
            TraceContext::GrpcTraceBin => (false, true),
            TraceContext::Both => (true, true),
        };
        let traceparent = w3c.then(|| {
            let value = format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            );
            HeaderValue::from_str(&value).ok()
        });
        let grpc_trace_bin = bin.then(|| {
            let bytes = grpc_trace_bin(
                sc.trace_id().to_bytes(),
                sc.span_id().to_bytes(),
                sc.trace_flags().to_u8(),
            );
            let value = tonic::metadata::BinaryMetadataValue::from_bytes(&bytes);
            HeaderValue::from_bytes(value.as_encoded_bytes()).ok()
        });
        TraceHeaders {
            traceparent: traceparent.flatten(),
            grpc_trace_bin: grpc_trace_bin.flatten(),
        }
    }

    /// What sees the request messages this attempt sends.
    pub(crate) fn outbound(&self) -> Outbound {
        Outbound {
            span: self.span.clone(),
            messages: Messages::default(),
            total: self.sent.clone(),
        }
    }

    /// Response bytes arrived.
    pub(crate) fn received(&mut self, data: &[u8]) {
        self.received.feed(data, &self.span, false);
    }

    /// The attempt ended with `code`.
    pub(crate) fn end(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let (Some(i), Some(method)) = (&self.shared.instruments, &self.method) {
            let labels = i.labels(method, code);
            i.attempt_duration
                .record(self.started.elapsed().as_secs_f64(), &labels);
            i.attempt_sent
                .record(self.sent.load(Ordering::Relaxed), &labels);
            i.attempt_rcvd
                .record(self.received.frames.payload(), &labels);
        }
        record_status(&self.span, code);
    }
}

impl Drop for AttemptTelemetry {
    fn drop(&mut self) {
        // Dropped before its status: the call's deadline ended it, or the
        // caller gave up, or it lost a race.
        self.end(dropped(self.deadline));
    }
}
