//! One established HTTP/2 connection: the handle calls and the subchannel
//! share, its stream slots, and the balancer's own requests on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use http::HeaderValue;
use http::header::USER_AGENT;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use tokio::sync::Notify;
use tonic::Status;
use tonic::body::Body;

use super::frames::GoAway;
use super::io::Signals;
use super::stream::{Incoming, NotOpened, Opening};
use super::transport_errors::transport_status;

/// Who calls are addressed to.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    pub(crate) user_agent: HeaderValue,
}

/// What a connection reserves of the server's stream limit for the
/// balancer's own streams, and how it is used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    /// The long-lived streams it carries for the balancer: the health
    /// Watch, ORCA's out-of-band reports.
    pub(crate) watches: usize,
    /// It runs a liveness probe.
    pub(crate) probe: bool,
    /// It is an extra connection, closed when idle.
    pub(crate) extra: bool,
}

/// How one endpoint's calls wait for a free stream slot: its connections
/// wake the waiters whenever a call ends.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    /// Calls waiting for a slot right now.
    pub(crate) waiters: AtomicUsize,
    pub(crate) freed: Notify,
}

impl Slots {
    /// A slot was freed or added: wakes the waiters, if any. The request
    /// path pays one load when nobody waits.
    pub(crate) fn released(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// One established HTTP/2 connection, shared by the subchannel task and the
/// request path.
pub(crate) struct Conn {
    pub(crate) addr: SocketAddr,
    /// Opens streams on the connection; `None` once its task has ended.
    /// It must not outlive the task: nothing a waiting call holds may keep
    /// a connection's sending side alive (hyper's dispatch channel once
    /// stranded a request that way, and the call waited for itself). A
    /// call that finds it gone goes elsewhere.
    pub(super) send: ArcSwapOption<SendRequest<Bytes>>,
    pub(crate) origin: Arc<Origin>,
    pub(crate) established: Instant,
    pub(crate) role: Role,
    pub(super) signals: Arc<Signals>,
    pub(super) slots: Arc<Slots>,
    /// Calls whose response has not ended: stream slots in use by callers.
    pub(super) in_flight: AtomicUsize,
    pub(super) draining: AtomicBool,
    pub(super) idle: Notify,
    /// When the last call ended, in ns since `established`.
    pub(super) idle_since: AtomicU64,
    /// Finished streams, released by the connection's task.
    pub(crate) released: Arc<super::stream::Released>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("max_streams", &self.max_streams())
            .finish()
    }
}

// === impl Conn ===

impl Conn {
    /// Whether the connection may take a new call: open, and no GOAWAY seen.
    pub(crate) fn is_ready(&self) -> bool {
        self.send.load().is_some()
            && !self.signals.going_away.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
    }

    /// A handle that opens streams on the connection, while its task runs.
    pub(crate) fn sender(&self) -> Option<SendRequest<Bytes>> {
        self.send.load().as_deref().cloned()
    }

    /// The connection's task has ended: drops its sender, and with it any
    /// request left in the dispatch channel (see `send`).
    pub(super) fn task_ended(&self) {
        self.send.store(None);
    }

    /// Closes the connection at once, failing whatever is still on it with
    /// `why`.
    pub(crate) fn kill(&self, why: impl std::fmt::Display) {
        self.signals.kill(why.to_string());
    }

    /// The status of a call this connection failed with `err`. When
    /// healthlb closed the connection itself (a silent peer, a grace period
    /// over), that is the reason, whichever of h2's errors reached the
    /// call first.
    pub(crate) fn status_of(&self, err: &h2::Error) -> Status {
        match self.signals.kill_reason() {
            Some(why) if !err.is_reset() => Status::unavailable(format!(
                "the connection to {} failed under the call: healthlb closed the connection: {why}",
                self.addr
            )),
            _ => transport_status(self.addr, err),
        }
    }

    /// The server's first GOAWAY, once it arrived.
    pub(crate) fn poll_goaway(&self, cx: &mut Context<'_>) -> Poll<GoAway> {
        if let Some(goaway) = self.signals.goaway() {
            return Poll::Ready(goaway);
        }
        self.signals.goaway_waker.register(cx.waker());
        match self.signals.goaway() {
            Some(goaway) => Poll::Ready(goaway),
            None => Poll::Pending,
        }
    }

    /// Ready once the server's first SETTINGS frame arrived, so its stream
    /// limit is known.
    pub(crate) fn poll_settings(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signals.settings.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.signals.settings_waker.register(cx.waker());
        match self.signals.settings.load(Ordering::Acquire) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS; unlimited until it
    /// says otherwise, as HTTP/2 has it.
    pub(crate) fn max_streams(&self) -> usize {
        self.signals.max_streams.load(Ordering::Relaxed) as usize
    }

    /// When the server last sent anything at all.
    pub(crate) fn last_read(&self) -> Instant {
        self.established + Duration::from_nanos(self.signals.last_read.load(Ordering::Acquire))
    }

    /// Since when no call has been open, if none is.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.in_flight() == 0).then(|| {
            self.established + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed))
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// How many calls may be open at once: the server's limit less the
    /// slots kept for the balancer's streams and the liveness probe, so
    /// those never wait behind calls. Under a limit too small for all, only
    /// the streams' slots are kept.
    pub(crate) fn capacity(&self) -> usize {
        let max = self.max_streams();
        let watch = self.role.watches;
        let kept = watch + usize::from(self.role.probe);
        match max.saturating_sub(kept) {
            0 => max.saturating_sub(watch),
            n => n,
        }
    }

    /// Whether a liveness probe would get a stream slot now, rather than
    /// queue behind calls.
    pub(crate) fn probe_has_slot(&self) -> bool {
        self.in_flight() + self.role.watches < self.max_streams()
    }

    /// Counts a call in, if a slot is free. False, and not counted, when the
    /// connection is full or draining: a call picked just before a drain
    /// must go elsewhere, or the drain could close the connection under it.
    pub(crate) fn try_start_call(&self) -> bool {
        let capacity = self.capacity();
        // SeqCst pairs with `drained` and with `Slots::released`: either the
        // drain sees this call or this call sees the drain, and a waiter
        // either sees a freed slot or is woken.
        let mut n = self.in_flight.load(Ordering::SeqCst);
        loop {
            if n >= capacity {
                return false;
            }
            match self
                .in_flight
                .compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => n = actual,
            }
        }
        if self.draining.load(Ordering::SeqCst) {
            self.call_ended(false);
            return false;
        }
        true
    }

    /// A call is over; `wake` wakes the calls waiting for a slot.
    pub(crate) fn call_ended(&self, wake: bool) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            if self.draining.load(Ordering::SeqCst) {
                self.idle.notify_waiters();
            }
            if self.role.extra {
                let ns = self.established.elapsed().as_nanos() as u64;
                self.idle_since.store(ns, Ordering::Relaxed);
            }
        }
        if wake {
            self.slots.released();
        }
    }

    /// Waits until no call is left on the connection. New calls must already
    /// have stopped coming.
    pub(crate) async fn drained(&self) {
        self.draining.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// What became of the balancer's own request (health, liveness).
#[derive(Debug)]
pub(crate) enum Internal {
    Response(Response<Body>),
    /// The connection had closed before it could be sent.
    Unsent,
    Failed(Status),
}

// === impl Conn ===

impl Conn {
    /// Sends the balancer's own request (health, liveness): not counted, and
    /// not waited for when draining. Its body is whole (one message).
    pub(crate) async fn send_internal(&self, mut req: Request<Body>) -> Internal {
        prepare(&mut req, &self.origin);
        let Some(mut send) = self.sender() else {
            return Internal::Unsent;
        };
        let (head, body) = req.into_parts();
        let opened = Opening {
            send: &mut send,
            request: Some((Request::from_parts(head, ()), body)),
        }
        .await;
        // Nothing a waiting request holds may keep the sender alive.
        drop(send);
        let exchange = match opened {
            Ok(exchange) => exchange,
            Err(NotOpened::Body(status)) => return Internal::Failed(status),
            Err(NotOpened::Refused(_)) => return Internal::Unsent,
        };
        let answered = exchange.await;
        match answered.response {
            Ok(response) => {
                let addr = self.addr;
                Internal::Response(response.map(|recv| {
                    let body = Incoming::new(recv, None, None);
                    Body::new(http_body_util::BodyExt::map_err(body, move |e| {
                        transport_status(addr, &e)
                    }))
                }))
            }
            Err(e) => Internal::Failed(self.status_of(&e)),
        }
    }
}

/// Addresses the request to the origin: tonic's generated clients send a
/// path only.
pub(crate) fn prepare<B>(req: &mut Request<B>, origin: &Origin) {
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

/// `grpc-status`, named once: a lookup by `&str` parses the name each time.
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` of a header or trailer map.
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get(&GRPC_STATUS)?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(value))
}
