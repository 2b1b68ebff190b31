//! Sending one call on one connection: the request path's only work here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::USER_AGENT;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tonic::Status;
use tonic::body::Body;

use super::connect::{Conn, Origin};
use super::replay::{Counting, Replay, refused_unprocessed};
use crate::metrics::GrpcFrames;

/// What became of a call handed to a connection.
#[derive(Debug)]
pub(crate) enum Sent {
    /// The server answered; the body is tracked until it ends.
    Response(Response<Body>),
    /// The request never left the client, because the connection had closed,
    /// or the server refused it unprocessed (GOAWAY, REFUSED_STREAM). It is
    /// safe to send it elsewhere.
    Unsent(Request<Body>),
    /// The call failed in transport, after it may have reached the server.
    Failed(Status),
}

// === impl Conn ===

impl Conn {
    /// Sends a caller's request. It counts as in flight, on the connection and
    /// the endpoint, until its response body ends.
    pub(crate) async fn send(self: &Arc<Self>, req: Request<Body>) -> Sent {
        let Some(guard) = CallGuard::new(self.clone()) else {
            // Draining since it was picked.
            return Sent::Unsent(req);
        };
        let stats = &self.stats;
        // Metrics: the method, and counting of the request's messages.
        let method: Option<Arc<str>> = stats.metrics.enabled().then(|| req.uri().path().into());
        let counting = method.clone().map(|method| Counting {
            stats: stats.clone(),
            method,
            frames: GrpcFrames::default(),
        });
        let (mut req, replay) = Replay::wrap(req, counting);
        prepare(&mut req, &self.origin);
        let mut send = self.send.clone();
        match send.try_send_request(req).await {
            Ok(response) => {
                stats.calls_started.fetch_add(1, Ordering::Relaxed);
                let mut counting = method.map(|method| ResponseCounting {
                    method,
                    frames: GrpcFrames::default(),
                    done: false,
                });
                if let Some(counting) = &mut counting {
                    // A trailers-only response carries its status in the headers.
                    if let Some(code) = grpc_status(response.headers()) {
                        stats.metrics.request_done(code, &counting.method);
                        counting.done = true;
                    }
                }
                Sent::Response(response.map(|body| {
                    Body::new(TrackedBody {
                        body,
                        counting,
                        guard,
                    })
                }))
            }
            Err(mut e) => {
                if e.take_message().is_some() {
                    // Never sent: the recorded body is untouched.
                    if let Some(again) = replay.rebuild() {
                        return Sent::Unsent(again);
                    }
                }
                let err = e.into_error();
                if refused_unprocessed(&err) {
                    if let Some(again) = replay.rebuild() {
                        tracing::debug!(endpoint = %self.addr, error = %err, "the server refused the call unprocessed; sending it again");
                        return Sent::Unsent(again);
                    }
                }
                stats.calls_started.fetch_add(1, Ordering::Relaxed);
                stats.calls_failed.fetch_add(1, Ordering::Relaxed);
                let status = transport_status(self.addr, err);
                if let Some(method) = &method {
                    stats.metrics.request_done(status.code(), method);
                }
                Sent::Failed(status)
            }
        }
    }

    /// Sends the balancer's own request (health, liveness): not counted and
    /// not waited for when draining.
    pub(crate) async fn send_internal(&self, mut req: Request<Body>) -> Sent {
        prepare(&mut req, &self.origin);
        let mut send = self.send.clone();
        match send.try_send_request(req).await {
            Ok(response) => Sent::Response(response.map(Body::new)),
            Err(mut e) => match e.take_message() {
                Some(req) => Sent::Unsent(req),
                None => Sent::Failed(transport_status(self.addr, e.into_error())),
            },
        }
    }
}

/// Addresses the request to the origin: tonic's generated clients send a
/// path only.
fn prepare(req: &mut Request<Body>, origin: &Origin) {
    let uri = req.uri();
    if uri.scheme().is_none() || uri.authority().is_none() {
        let mut parts = uri.clone().into_parts();
        parts.scheme = Some(origin.scheme.clone());
        parts.authority = Some(origin.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req.headers_mut()
        .entry(USER_AGENT)
        .or_insert_with(|| origin.user_agent.clone());
}

/// The gRPC status of a transport failure, per gRPC's HTTP/2 error mapping,
/// naming the endpoint.
pub(crate) fn transport_status(addr: std::net::SocketAddr, err: hyper::Error) -> Status {
    use tonic::Code;
    let code = if err.is_timeout() {
        // An unanswered keepalive PING.
        Code::Unavailable
    } else {
        match h2_error(&err).and_then(h2::Error::reason) {
            Some(h2::Reason::CANCEL) => Code::Cancelled,
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            Some(h2::Reason::PROTOCOL_ERROR) | Some(h2::Reason::INTERNAL_ERROR)
                if h2_error(&err).is_some_and(|e| e.is_reset()) =>
            {
                Code::Internal
            }
            _ => Code::Unavailable,
        }
    };
    Status::new(code, format!("call to {addr} failed: {err}"))
}

/// The h2 error behind a hyper error, if any.
pub(crate) fn h2_error(err: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = e.source();
    }
    None
}

/// Counts a call in flight until dropped.
struct CallGuard {
    conn: Arc<Conn>,
}

impl CallGuard {
    /// `None` when the connection is draining.
    fn new(conn: Arc<Conn>) -> Option<Self> {
        if !conn.call_started() {
            return None;
        }
        conn.stats.calls_in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Self { conn })
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.conn
            .stats
            .calls_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.conn.call_ended();
    }
}

/// A response body that keeps its call counted until it ends or is dropped,
/// and, with metrics on, counts its messages and records its status.
struct TrackedBody {
    body: Incoming,
    counting: Option<ResponseCounting>,
    guard: CallGuard,
}

struct ResponseCounting {
    method: Arc<str>,
    frames: GrpcFrames,
    /// The status was recorded.
    done: bool,
}

/// The `grpc-status` of a header or trailer map.
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(value))
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(counting) = &self.counting {
            if !counting.done {
                // Dropped before its status: the caller gave up on it.
                let metrics = &self.guard.conn.stats.metrics;
                metrics.request_done(tonic::Code::Cancelled, &counting.method);
            }
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Some(counting), Poll::Ready(result)) = (this.counting.as_mut(), &polled) {
            let metrics = &this.guard.conn.stats.metrics;
            match result {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let n = counting.frames.feed(data);
                        if n > 0 {
                            metrics.messages_received(n, &counting.method);
                        }
                    } else if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                        if !counting.done {
                            metrics.request_done(code, &counting.method);
                            counting.done = true;
                        }
                    }
                }
                Some(Err(_)) if !counting.done => {
                    metrics.request_done(tonic::Code::Unavailable, &counting.method);
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
