//! Sending one call on one connection: the request path's only work here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use tonic::Status;
use tonic::body::Body;

use super::replay::{AttemptId, BodyFailure, Counting, Replay, SentFrames};
use crate::connection::{Conn, grpc_status, prepare};
use crate::connection::{refused_unprocessed, reset_by_client, transport_status};
use crate::metrics::GrpcFrames;
use crate::subchannel::Ended;
use crate::subchannel::Slot;
use crate::telemetry::{Attempt, AttemptTelemetry, Outbound, TraceHeaders};

/// What became of a call handed to a connection.
#[derive(Debug)]
pub(crate) enum Sent {
    /// The server answered this attempt; the body is tracked until it
    /// ends. The caller commits to it, or retires it to try again.
    Response(Response<Body>, AttemptId),
    /// The request never left the client, because the connection had closed,
    /// or the server refused it unprocessed (GOAWAY, REFUSED_STREAM). It is
    /// safe to send it elsewhere.
    Unsent,
    /// The call failed in transport, after it may have reached the server,
    /// on this attempt if it was sent.
    Failed(Status, Option<AttemptId>),
}

// === impl Slot ===

impl Slot {
    /// Sends another attempt of a caller's request on this slot's
    /// connection, after `attempt.previous` counted attempts. An attempt
    /// that ends without a response is retired here. With `linger` (a
    /// hedge), an attempt dropped before its answer keeps its stream until
    /// [`LINGER`] after it was sent, and only then is cancelled.
    pub(crate) async fn send(self, replay: &Replay, attempt: Attempt, linger: bool) -> Sent {
        let previous = attempt.previous;
        let conn = self.conn.clone();
        #[cfg(test)]
        tests::before_send(&conn).await;
        // The connection's task has ended since the slot was taken: the
        // request never left, so the call goes elsewhere.
        let Some(send) = conn.sender() else {
            return Sent::Unsent;
        };
        let endpoint = self.endpoint.clone();
        let stats = &endpoint;
        let mut telemetry = stats
            .telemetry
            .attempt(replay.path(), conn.addr, attempt, replay);
        let trace = telemetry
            .as_ref()
            .map(|t| (t.trace_headers(), t.outbound()));
        // Metrics: the method, and counting of the request's messages.
        let method: Option<Arc<str>> = stats.metrics.enabled().then(|| replay.path().into());
        let counting = method.clone().map(|method| Counting {
            stats: stats.clone(),
            method,
            frames: GrpcFrames::default(),
        });
        let sent_at = std::time::Instant::now();
        let linger_until = linger.then(|| tokio::time::Instant::from_std(sent_at + LINGER));
        let dispatched = dispatch(&conn, send, replay, counting, previous, linger_until, trace);
        let Some((attempt, response)) = dispatched else {
            return Sent::Failed(
                Status::unavailable(format!(
                    "the call to {} cannot be sent again: its request was not kept whole",
                    conn.addr
                )),
                None,
            );
        };
        let mut started = Started {
            stats,
            method: method.as_deref(),
            waiting: true,
        };
        let (sent, slot) = if let Some(until) = linger_until {
            Lingering {
                response: Some(Box::pin(response)),
                slot: Some(self),
                until,
            }
            .await
        } else {
            (response.await, self)
        };
        started.waiting = false;
        match sent {
            Ok(response) => {
                drop(started);
                stats.latency.observe(sent_at);
                let mut counting = method.map(|method| ResponseCounting {
                    method,
                    frames: GrpcFrames::default(),
                    done: false,
                });
                // A trailers-only response carries its status in the headers.
                let status = grpc_status(response.headers());
                if let Some(code) = status {
                    if let Some(mut t) = telemetry.take() {
                        t.end(code);
                    }
                    stats.ended(Ended::Status(code, Some(response.headers())));
                    if let Some(counting) = &mut counting {
                        stats.metrics.request_done(code, &counting.method);
                        counting.done = true;
                    }
                }
                let response = response.map(|body| {
                    Body::new(TrackedBody {
                        body,
                        counting,
                        judged: status.is_some(),
                        slot,
                        telemetry,
                        request: replay.body_failure(),
                    })
                });
                Sent::Response(response, attempt)
            }
            Err(mut e) => {
                replay.retire(attempt);
                // Never sent: the recorded body is untouched.
                let never_sent = e.take_message().is_some();
                let err = e.into_error();
                if never_sent || (refused_unprocessed(&err) && replay.can_retry()) {
                    if !never_sent {
                        tracing::debug!(endpoint = %conn.addr, error = %err, "the server refused the call unprocessed; sending it again");
                    }
                    // It never reached the server: not counted.
                    std::mem::forget(started);
                    if let Some(mut t) = telemetry.take() {
                        t.end(tonic::Code::Unavailable);
                    }
                    return Sent::Unsent;
                }
                if reset_by_client(&err) {
                    // The client cut it off: counted as cancelled, as a call
                    // dropped unanswered is, and the caller hears why.
                    started.waiting = true;
                    drop(started);
                    let status = client_reset(conn.addr, &err, &replay.body_failure());
                    if let Some(mut t) = telemetry.take() {
                        t.end(status.code());
                    }
                    return Sent::Failed(status, Some(attempt));
                }
                drop(started);
                let status = transport_status(conn.addr, &err);
                if let Some(mut t) = telemetry.take() {
                    t.end(status.code());
                }
                stats.ended(Ended::Transport(&status));
                if let Some(method) = &method {
                    stats.metrics.request_done(status.code(), method);
                }
                Sent::Failed(status, Some(attempt))
            }
        }
    }
}

/// The status of an attempt the client reset itself: the request body's
/// own error when it failed (a message over the caller's size limit), else
/// CANCELLED (a hedge the call no longer needs).
fn client_reset(addr: std::net::SocketAddr, err: &hyper::Error, body: &BodyFailure) -> Status {
    body.get().unwrap_or_else(|| {
        Status::cancelled(format!(
            "the client cut off the call to {addr}: {}",
            crate::connection::chain(err)
        ))
    })
}

/// What hyper answers a request with.
type Answer = Result<Response<Incoming>, TrySendError<Request<Body>>>;

/// Hands the next attempt of `replay` to `conn`; its response to come.
/// A plain function, so the request isn't kept in the caller's future.
fn dispatch(
    conn: &Conn,
    mut send: hyper::client::conn::http2::SendRequest<Body>,
    replay: &Replay,
    counting: Option<Counting>,
    previous: u32,
    linger_until: Option<tokio::time::Instant>,
    trace: Option<(TraceHeaders, Outbound)>,
) -> Option<(AttemptId, impl Future<Output = Answer> + Send + 'static)> {
    let (headers, outbound) = trace.unzip();
    let outbound =
        outbound.map(|mut sent| Box::new(move |data: &[u8]| sent.sent(data)) as SentFrames);
    let (attempt, mut req) = replay.attempt(counting, previous, linger_until, outbound)?;
    prepare(&mut req, &conn.origin);
    if let Some(headers) = headers {
        headers.insert_into(req.headers_mut());
    }
    // The clone goes before the wait: nothing a waiting call holds may
    // keep the dispatch channel alive (`Conn::send` says why).
    let answer = send.try_send_request(req);
    drop(send);
    Some((attempt, answer))
}

/// How long after it was sent a hedge that lost keeps its stream: 20 ms.
///
/// A stream cancelled before the server has taken it from its accept queue
/// looks like the rapid-reset attack (CVE-2023-44487): hyper's and so
/// tonic's servers close the connection, GOAWAY ENHANCE_YOUR_CALM, once 20
/// such streams are pending. A busy server reads a hedge and its cancel in
/// one go when they are close together; 20 ms apart, it has taken the
/// stream first. A loser that answers meanwhile costs no cancel at all.
pub(crate) const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// An attempt's wait for its response that, dropped before [`LINGER`] has
/// passed since it was sent, hands the stream and its slot to a task that
/// cancels it only then.
struct Lingering<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    response: Option<Pin<Box<F>>>,
    slot: Option<Slot>,
    until: tokio::time::Instant,
}

impl<F> Future for Lingering<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    type Output = (F::Output, Slot);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(response) = self.response.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(response.as_mut().poll(cx));
        self.response = None;
        match self.slot.take() {
            Some(slot) => Poll::Ready((output, slot)),
            None => Poll::Pending,
        }
    }
}

impl<F> Drop for Lingering<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    fn drop(&mut self) {
        let (Some(response), Some(slot)) = (self.response.take(), self.slot.take()) else {
            return;
        };
        let until = self.until;
        if until <= tokio::time::Instant::now() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // An answer in time is dropped whole; otherwise the
                // stream is cancelled now.
                let _ = tokio::time::timeout_at(until, response).await;
                drop(slot);
            });
        }
    }
}

/// Counts an attempt as started however its wait for response headers
/// ends, unless it went unsent: answered, failed, or dropped (a hedge that
/// lost, a caller that gave up), since its request may have reached the
/// server. A drop is recorded as CANCELLED.
struct Started<'a> {
    stats: &'a crate::subchannel::Stats,
    method: Option<&'a str>,
    waiting: bool,
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        self.stats.calls_started.fetch_add(1, Ordering::Relaxed);
        if self.waiting {
            self.stats.ended(Ended::Cancelled);
            if let Some(method) = self.method {
                self.stats
                    .metrics
                    .request_done(tonic::Code::Cancelled, method);
            }
        }
    }
}

/// A response body that keeps its call counted until it ends or is dropped,
/// and, with metrics on, counts its messages and records its status.
struct TrackedBody {
    body: Incoming,
    counting: Option<ResponseCounting>,
    /// The call's status went to the endpoint's outcomes.
    judged: bool,
    slot: Slot,
    /// The attempt's telemetry.
    telemetry: Option<AttemptTelemetry>,
    /// How the request body failed, if it did.
    request: BodyFailure,
}

struct ResponseCounting {
    method: Arc<str>,
    frames: GrpcFrames,
    /// The status was recorded.
    done: bool,
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
            // Dropped before its status: the caller gave up on it.
            let metrics = &self.slot.endpoint.metrics;
            metrics.request_done(tonic::Code::Cancelled, &counting.method);
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
        let addr = this.slot.conn.addr;
        let mut by_client = false;
        let polled = Pin::new(&mut this.body).poll_frame(cx).map(|frame| {
            frame.map(|f| {
                f.map_err(|e| match reset_by_client(&e) {
                    true => {
                        by_client = true;
                        client_reset(addr, &e, &this.request)
                    }
                    false => transport_status(addr, &e),
                })
            })
        });
        if !this.judged
            && let Poll::Ready(result) = &polled
        {
            let stats = &this.slot.endpoint;
            match result {
                // The client cut its own stream off: nothing of the endpoint.
                Some(Err(_)) if by_client => {
                    stats.ended(Ended::Cancelled);
                    this.judged = true;
                }
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        // Trailers without a status break the protocol.
                        let code = grpc_status(trailers).unwrap_or(tonic::Code::Internal);
                        stats.ended(Ended::Status(code, Some(trailers)));
                        this.judged = true;
                    }
                }
                Some(Err(status)) => {
                    stats.ended(Ended::Transport(status));
                    this.judged = true;
                }
                // The stream ended without trailers: no status at all.
                None => {
                    stats.ended(Ended::Status(tonic::Code::Internal, None));
                    this.judged = true;
                }
            }
        }
        if let (Some(t), Poll::Ready(result)) = (this.telemetry.as_mut(), &polled) {
            let code = match result {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        t.received(data);
                    }
                    frame
                        .trailers_ref()
                        .map(|tr| grpc_status(tr).unwrap_or(tonic::Code::Internal))
                }
                Some(Err(status)) => Some(status.code()),
                None => Some(tonic::Code::Internal),
            };
            if let Some(code) = code {
                t.end(code);
                this.telemetry = None;
            }
        }
        if let (Some(counting), Poll::Ready(result)) = (this.counting.as_mut(), &polled) {
            let metrics = &this.slot.endpoint.metrics;
            match result {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let n = counting.frames.feed(data);
                        if n > 0 {
                            metrics.messages_received(n, &counting.method);
                        }
                    } else if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                        && !counting.done
                    {
                        metrics.request_done(code, &counting.method);
                        counting.done = true;
                    }
                }
                Some(Err(status)) if !counting.done => {
                    metrics.request_done(status.code(), &counting.method);
                    counting.done = true;
                }
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[path = "send_tests.rs"]
mod tests;
