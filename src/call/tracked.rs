//! A call's response body as the endpoint sees it: the call stays counted
//! in flight until it ends or is dropped, its status goes to the
//! endpoint's outcomes once, and, when asked, its messages are counted and
//! its telemetry ended.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{Code, Status};

use super::replay::BodyFailure;
use crate::connection::{Incoming, grpc_status, reset_by_client};
use crate::metrics::GrpcFrames;
use crate::subchannel::{Ended, Slot};
use crate::telemetry::AttemptTelemetry;

/// A response body that keeps its call counted until it ends or is dropped,
/// and, with metrics on, counts its messages and records its status.
pub(super) struct TrackedBody {
    pub(super) body: Incoming,
    pub(super) counting: Option<ResponseCounting>,
    /// The call's status went to the endpoint's outcomes.
    pub(super) judged: bool,
    pub(super) slot: Slot,
    /// The attempt's telemetry.
    pub(super) telemetry: Option<AttemptTelemetry>,
    /// How the request body failed, if it did.
    pub(super) request: Option<BodyFailure>,
}

/// The response's messages, counted for the metrics facade.
pub(super) struct ResponseCounting {
    pub(super) method: Arc<str>,
    pub(super) frames: GrpcFrames,
    /// The status was recorded.
    pub(super) done: bool,
}

/// What one polled frame meant for the call.
enum Seen<'a> {
    Data(&'a Bytes),
    /// The call's end: its status, from trailers when it has them.
    End(Code, Option<&'a HeaderMap>),
    /// It failed in transport; `by_client` when the client reset it.
    Failed(&'a Status, bool),
    Other,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if !self.judged {
            // Dropped before its status: the caller gave up on it.
            self.slot.endpoint.ended(Ended::Cancelled);
        }
        if let Some(counting) = &self.counting
            && !counting.done
        {
            let metrics = &self.slot.endpoint.metrics;
            metrics.request_done(Code::Cancelled, &counting.method);
        }
    }
}

impl TrackedBody {
    /// The status of a stream the client reset itself: the request body's
    /// own error when it failed, else CANCELLED.
    fn client_reset(&self, err: &h2::Error) -> Status {
        let failed = self
            .body
            .request_failure()
            .or_else(|| self.request.as_ref()?.get());
        failed.unwrap_or_else(|| {
            Status::cancelled(format!(
                "the client cut off the call to {}: {}",
                self.slot.conn.addr,
                crate::connection::chain(err)
            ))
        })
    }

    /// Records what `seen` meant, on each of the call's books.
    fn record(&mut self, seen: &Seen<'_>) {
        if !self.judged {
            let stats = &self.slot.endpoint;
            match seen {
                Seen::End(code, trailers) => {
                    stats.ended(Ended::Status(*code, *trailers));
                    self.judged = true;
                }
                // The client cut its own stream off: nothing of the endpoint.
                Seen::Failed(_, true) => {
                    stats.ended(Ended::Cancelled);
                    self.judged = true;
                }
                Seen::Failed(status, false) => {
                    stats.ended(Ended::Transport(status));
                    self.judged = true;
                }
                Seen::Data(_) | Seen::Other => {}
            }
        }
        if let Some(t) = self.telemetry.as_mut() {
            match seen {
                Seen::Data(data) => t.received(data),
                Seen::End(code, _) => {
                    t.end(*code);
                    self.telemetry = None;
                }
                Seen::Failed(status, _) => {
                    t.end(status.code());
                    self.telemetry = None;
                }
                Seen::Other => {}
            }
        }
        if let Some(counting) = self.counting.as_mut() {
            let metrics = &self.slot.endpoint.metrics;
            match seen {
                Seen::Data(data) => {
                    let n = counting.frames.feed(data);
                    if n > 0 {
                        metrics.messages_received(n, &counting.method);
                    }
                }
                Seen::End(code, _) if !counting.done => {
                    metrics.request_done(*code, &counting.method);
                    counting.done = true;
                }
                Seen::Failed(status, _) if !counting.done => {
                    metrics.request_done(status.code(), &counting.method);
                    counting.done = true;
                }
                _ => {}
            }
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = Status;

    /// Frames as they come; a transport failure becomes the gRPC status it
    /// means, naming the endpoint.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let polled = match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(polled) => polled,
        };
        let result = match polled {
            Some(Ok(frame)) => Some(Ok(frame)),
            Some(Err(e)) => {
                let by_client = reset_by_client(&e);
                let status = match by_client {
                    true => this.client_reset(&e),
                    false => this.slot.conn.status_of(&e),
                };
                this.record(&Seen::Failed(&status, by_client));
                return Poll::Ready(Some(Err(status)));
            }
            None => None,
        };
        let seen = match &result {
            Some(Ok(frame)) => match (frame.data_ref(), frame.trailers_ref()) {
                (Some(data), _) => Seen::Data(data),
                // Trailers without a status break the protocol.
                (None, Some(trailers)) => Seen::End(
                    grpc_status(trailers).unwrap_or(Code::Internal),
                    Some(trailers),
                ),
                (None, None) => Seen::Other,
            },
            // The stream ended without trailers: no status at all.
            _ => Seen::End(Code::Internal, None),
        };
        this.record(&seen);
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
