//! Sending one attempt on one connection, from the caller's own task: the
//! stream is opened and a whole request queued in this turn
//! (`connection::Opening`), the rest of the request fed while the response
//! headers are awaited, and the outcome told apart: answered, never sent
//! (so it can go elsewhere), cut off by the client, or failed in transport.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;

use super::linger::{LINGER, Lingering};
use super::replay::{AttemptId, Counting, Replay, ReplayBody, SentFrames};
use super::tracked::{ResponseCounting, TrackedBody};
use crate::connection::{Answered, Incoming, Link, NotOpened, Opening, Stopped};
use crate::connection::{Conn, finish_request, grpc_status, prepare};
use crate::connection::{refused_unprocessed, reset_by_client};
use crate::metrics::GrpcFrames;
use crate::subchannel::Ended;
use crate::subchannel::Slot;
use crate::telemetry::{Attempt, Outbound, TraceHeaders};

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
    /// The call failed, after it may have reached the server, on this
    /// attempt if it was sent.
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
        let Some(mut send) = conn.sender() else {
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
        // The clock only where it is read: latency for peak EWMA, a hedge's
        // linger.
        let sent_at = (stats.measure_latency || linger).then(std::time::Instant::now);
        let linger_until = sent_at
            .filter(|_| linger)
            .map(|at| tokio::time::Instant::from_std(at + LINGER));
        let Some((attempt, request)) =
            request(&conn, replay, counting, previous, linger_until, trace)
        else {
            return Sent::Failed(
                Status::unavailable(format!(
                    "the call to {} cannot be sent again: its request was not kept whole",
                    conn.addr
                )),
                None,
            );
        };
        let opened = Opening {
            send: &mut send,
            request: Some(request),
        }
        .await;
        // Nothing a waiting call holds may keep the connection's sending
        // side alive (`Conn::send`).
        drop(send);
        let exchange = match opened {
            Ok(exchange) => exchange,
            Err(why) => {
                replay.retire(attempt);
                let code = match &why {
                    NotOpened::Body(status) => status.code(),
                    NotOpened::Refused(_) => tonic::Code::Unavailable,
                };
                if let Some(mut t) = telemetry.take() {
                    t.end(code);
                }
                return not_opened(&conn, why, attempt);
            }
        };
        let mut started = Started {
            stats,
            method: method.as_deref(),
            waiting: true,
        };
        let (answered, slot) = match linger_until {
            Some(until) => {
                Lingering {
                    response: Some(Box::pin(exchange)),
                    slot: Some(self),
                    until,
                }
                .await
            }
            None => (exchange.await, self),
        };
        let Answered {
            response,
            rest,
            stopped,
        } = answered;
        match response {
            Ok(response) => {
                started.waiting = false;
                drop(started);
                if let Some(at) = sent_at.filter(|_| stats.measure_latency) {
                    stats.latency.observe(at);
                }
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
                // A request still open (a bidi stream) goes on in a task of
                // its own: the caller polls only the response from now on.
                let link = rest.map(|rest| {
                    let link = Arc::new(Link::default());
                    tokio::spawn(finish_request(rest, link.clone()));
                    link
                });
                let request = link.is_none().then(|| replay.body_failure());
                let response = response.map(|recv| {
                    Body::new(TrackedBody {
                        body: Incoming::new(recv, link, Some(conn.released.clone())),
                        counting,
                        judged: status.is_some(),
                        slot,
                        telemetry,
                        request,
                    })
                });
                Sent::Response(response, attempt)
            }
            Err(err) => {
                replay.retire(attempt);
                let failed = failure(&conn, replay, &err, stopped);
                let status = match failed {
                    Failure::Unprocessed => {
                        tracing::debug!(endpoint = %conn.addr, error = %err, "the server refused the call unprocessed; sending it again");
                        // It never reached the server: not counted.
                        std::mem::forget(started);
                        if let Some(mut t) = telemetry.take() {
                            t.end(tonic::Code::Unavailable);
                        }
                        return Sent::Unsent;
                    }
                    // The client cut it off: counted as cancelled, as a call
                    // dropped unanswered is, and the caller hears why.
                    Failure::ByClient(status) => {
                        drop(started);
                        status
                    }
                    Failure::Transport(status) => {
                        started.waiting = false;
                        drop(started);
                        stats.ended(Ended::Transport(&status));
                        if let Some(method) = &method {
                            stats.metrics.request_done(status.code(), method);
                        }
                        status
                    }
                };
                if let Some(mut t) = telemetry.take() {
                    t.end(status.code());
                }
                Sent::Failed(status, Some(attempt))
            }
        }
    }
}

/// What an attempt that got no response came to.
enum Failure {
    /// The server refused it unprocessed, and the call can go again.
    Unprocessed,
    /// The client reset it: its request body failed, or a hedge lost.
    ByClient(Status),
    Transport(Status),
}

/// Tells apart why an attempt got no response: `err`, and whether its
/// request had `stopped`.
fn failure(conn: &Conn, replay: &Replay, err: &h2::Error, stopped: Option<Stopped>) -> Failure {
    match stopped {
        Some(Stopped::Body(status)) => return Failure::ByClient(status),
        Some(Stopped::Reset(reason)) => {
            tracing::debug!(endpoint = %conn.addr, ?reason, "the server reset the request before it ended");
        }
        Some(Stopped::Failed(e)) => {
            tracing::debug!(endpoint = %conn.addr, error = %e, "the request failed before it ended");
        }
        None => {}
    }
    if refused_unprocessed(err) && replay.can_retry() {
        return Failure::Unprocessed;
    }
    if reset_by_client(err) {
        let status = replay.body_failure().get().unwrap_or_else(|| {
            Status::cancelled(format!(
                "the client cut off the call to {}: {}",
                conn.addr,
                crate::connection::chain(err)
            ))
        });
        return Failure::ByClient(status);
    }
    Failure::Transport(conn.status_of(err))
}

/// An attempt whose stream did not open: nothing of it left the client.
fn not_opened(conn: &Conn, why: NotOpened, attempt: AttemptId) -> Sent {
    match why {
        // The caller's own body failed (a message over its size limit):
        // the caller hears it, and the endpoint is not charged.
        NotOpened::Body(status) => Sent::Failed(status, Some(attempt)),
        // Closed or going away since the slot was taken: another
        // connection takes it.
        NotOpened::Refused(e) if e.is_io() || e.is_go_away() || !conn.is_ready() => Sent::Unsent,
        // h2 refused the request itself: no connection would take it.
        NotOpened::Refused(e) => Sent::Failed(
            Status::internal(format!(
                "the request to {} could not be sent: {e}",
                conn.addr
            )),
            Some(attempt),
        ),
    }
}

/// The next attempt of `replay` for `conn`, as a head and a body.
/// A plain function, so the request isn't kept in the caller's future.
fn request(
    conn: &Conn,
    replay: &Replay,
    counting: Option<Counting>,
    previous: u32,
    linger_until: Option<tokio::time::Instant>,
    trace: Option<(TraceHeaders, Outbound)>,
) -> Option<(AttemptId, (Request<()>, ReplayBody))> {
    let (headers, outbound) = trace.unzip();
    let outbound =
        outbound.map(|mut sent| Box::new(move |data: &[u8]| sent.sent(data)) as SentFrames);
    let (attempt, mut req) = replay.attempt(counting, previous, linger_until, outbound)?;
    prepare(&mut req, &conn.origin);
    if let Some(headers) = headers {
        headers.insert_into(req.headers_mut());
    }
    let (head, body) = req.into_parts();
    Some((attempt, (Request::from_parts(head, ()), body)))
}

/// Counts an attempt as started however its wait for response headers
/// ends, unless it went unsent: answered, failed, or dropped (a hedge that
/// lost, a caller that gave up), since its request may have reached the
/// server. A drop while waiting is recorded as CANCELLED.
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

#[cfg(test)]
#[path = "send_tests.rs"]
mod tests;
