//! What an attempt's span and sizes record of its messages: A72's message
//! events, and the OpenCensus binary trace context (`grpc-trace-bin`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::GrpcFrames;

/// A72's message events: "Outbound message" or "Inbound message" with the
/// message's `sequence-number` (from 0, per direction) and `message-size`,
/// or their "compressed" forms, as gRPC C-core names them.
fn message_event(span: &tracing::Span, outbound: bool, sequence: u64, compressed: bool, size: u32) {
    // As i64: tracing-opentelemetry records an event's u64 as a string.
    let (sequence, size) = (i64::try_from(sequence).unwrap_or(i64::MAX), i64::from(size));
    match (outbound, compressed) {
        (true, false) => {
            tracing::debug!(parent: span, { "sequence-number" = sequence, "message-size" = size }, "Outbound message")
        }
        (true, true) => {
            tracing::debug!(parent: span, { "sequence-number" = sequence, "message-size-compressed" = size }, "Outbound message compressed")
        }
        (false, false) => {
            tracing::debug!(parent: span, { "sequence-number" = sequence, "message-size" = size }, "Inbound message")
        }
        (false, true) => {
            tracing::debug!(parent: span, { "sequence-number" = sequence, "message-size-compressed" = size }, "Inbound compressed message")
        }
    }
}

/// One direction's messages: their bytes, and an event for each when the
/// attempt's span is recorded.
#[derive(Default)]
pub(super) struct Messages {
    pub(super) frames: GrpcFrames,
    count: u64,
}

impl Messages {
    pub(super) fn feed(&mut self, data: &[u8], span: &tracing::Span, outbound: bool) {
        if span.is_disabled() {
            self.frames.feed(data);
            return;
        }
        let count = &mut self.count;
        self.frames.feed_each(data, |compressed, size| {
            message_event(span, outbound, *count, compressed, size);
            *count += 1;
        });
    }
}

/// An attempt's request messages as its body hands them to the
/// connection: counted for A66's sent size, each an event on the
/// attempt's span.
pub(crate) struct Outbound {
    pub(super) span: tracing::Span,
    pub(super) messages: Messages,
    pub(super) total: Arc<AtomicU64>,
}

impl Outbound {
    /// Request bytes left for the server.
    pub(crate) fn sent(&mut self, data: &[u8]) {
        self.messages.feed(data, &self.span, true);
        self.total
            .store(self.messages.frames.payload(), Ordering::Relaxed);
    }
}

/// OpenCensus's binary trace context, as `grpc-trace-bin` carries it:
/// version 0, then field 0 (the trace id), field 1 (the span id) and
/// field 2 (the trace options), each after its id byte.
pub(crate) fn grpc_trace_bin(trace_id: [u8; 16], span_id: [u8; 8], options: u8) -> [u8; 29] {
    let mut out = [0u8; 29];
    out[2..18].copy_from_slice(&trace_id);
    out[18] = 1;
    out[19..27].copy_from_slice(&span_id);
    out[27] = 2;
    out[28] = options;
    out
}
