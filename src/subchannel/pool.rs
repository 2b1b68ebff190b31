//! An endpoint's connections, and how a call gets a stream slot on one.
//!
//! A server caps the streams open at once on each connection
//! (SETTINGS_MAX_CONCURRENT_STREAMS: often 100 to 1000, 128 on nginx,
//! sometimes single digits on C-core servers). grpc-go queues calls beyond
//! the cap on its one connection; so would hyper. healthlb does what
//! Envoy's HTTP/2 pool does: when every connection to an endpoint is full,
//! the next call opens another connection to the same endpoint, up to
//! `max_connections_per_endpoint`. Only past that does a call wait, here,
//! for a slot to free.
//!
//! A connection takes calls up to the server's cap less the slots kept for
//! its own health Watch and liveness probe, so those never queue behind
//! calls. The first connection carries the Watch and stays; the extra ones
//! close after `extra_connection_idle_timeout` without calls.
//!
//! Round robin stays per endpoint: the picker chooses an endpoint, and the
//! pool only chooses which of its connections carries the call, the first
//! one with a free slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::task::AtomicWaker;
use tokio::time::Instant;

use super::connect::{Conn, Slots};

/// The open connections of one endpoint that may take calls.
#[derive(Debug)]
pub(crate) struct Pool {
    addr: SocketAddr,
    max_connections: usize,
    /// The first connection, when there is one, then the extras.
    conns: ArcSwap<Vec<Arc<Conn>>>,
    slots: Arc<Slots>,
    /// Whether the endpoint is SERVING: set with each state change, before
    /// the balancer publishes it, so a call picked just before the change
    /// does not go out after it.
    serving: AtomicBool,
    /// Set by a call that found every connection full; the subchannel task
    /// opens another connection if it may.
    grow: AtomicBool,
    grow_waker: AtomicWaker,
}

/// Why no slot could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// No connection can take calls: the endpoint stopped serving or lost
    /// its connections.
    Closed,
    /// Every connection stayed full until the wait ended.
    Full,
}

// === impl Pool ===

impl Pool {
    pub(crate) fn new(addr: SocketAddr, max_connections: usize, slots: Arc<Slots>) -> Self {
        Self {
            addr,
            max_connections,
            conns: ArcSwap::from_pointee(Vec::new()),
            slots,
            serving: AtomicBool::new(false),
            grow: AtomicBool::new(false),
            grow_waker: AtomicWaker::new(),
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether some connection can take a call now, or after a wait for a
    /// slot: SERVING, open, and no GOAWAY seen.
    pub(crate) fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Acquire) && self.conns.load().iter().any(|c| c.is_ready())
    }

    /// Records whether the endpoint is SERVING.
    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
        if !serving {
            // Waiting calls go elsewhere.
            self.slots.released();
        }
    }

    /// How many connections are open for calls.
    pub(crate) fn len(&self) -> usize {
        self.conns.load().len()
    }

    /// The first connection's stream limit, if the server set one.
    pub(crate) fn max_concurrent_streams(&self) -> Option<u32> {
        let conns = self.conns.load();
        let max = conns.first()?.max_streams();
        u32::try_from(max).ok().filter(|m| *m != u32::MAX)
    }

    /// Replaces the connection list; waiting calls look again.
    pub(crate) fn publish(&self, conns: Vec<Arc<Conn>>) {
        self.conns.store(Arc::new(conns));
        self.slots.released();
    }

    /// A stream slot on the first connection that has one, while the
    /// endpoint is SERVING.
    pub(crate) fn try_acquire(&self) -> Result<Slot, NoSlot> {
        let conns = self.conns.load();
        let mut open = false;
        for conn in conns.iter() {
            if !conn.is_ready() {
                continue;
            }
            open = true;
            if conn.try_start_call() {
                // Counted first, then checked (SeqCst both): once a
                // NOT_SERVING endpoint shows no call in flight, none follows.
                let slot = Slot::counted(conn.clone());
                if !self.serving.load(Ordering::SeqCst) {
                    return Err(NoSlot::Closed);
                }
                return Ok(slot);
            }
        }
        Err(if open { NoSlot::Full } else { NoSlot::Closed })
    }

    /// A stream slot, waiting until `until` while every connection is full.
    /// Meanwhile the subchannel task is asked for another connection.
    pub(crate) async fn acquire(&self, until: Instant) -> Result<Slot, NoSlot> {
        loop {
            match self.try_acquire() {
                Err(NoSlot::Full) => {}
                done => return done,
            }
            // Registered before looking again, so a slot freed in between
            // wakes this call.
            let freed = self.slots.freed.notified();
            let _waiting = Waiting::new(&self.slots);
            match self.try_acquire() {
                Err(NoSlot::Full) => {}
                done => return done,
            }
            self.grow.store(true, Ordering::Release);
            self.grow_waker.wake();
            if tokio::time::timeout_at(until, freed).await.is_err() {
                return self.try_acquire();
            }
        }
    }

    /// Ready when a call asked for another connection since the last time.
    pub(crate) fn poll_grow(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.grow_waker.register(cx.waker());
        match self.grow.swap(false, Ordering::AcqRel) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// Why a call waited out its time for a slot, for its error.
    pub(crate) fn full_message(&self) -> String {
        let conns = self.conns.load();
        let limit = conns.iter().map(|c| c.max_streams()).min().unwrap_or(0);
        format!(
            "every stream slot on {} is taken: {} connections of at most {} \
             (max_connections_per_endpoint), each limited by the server to {limit} concurrent streams",
            self.addr,
            conns.len(),
            self.max_connections,
        )
    }

    /// Calls waiting for a slot right now.
    pub(crate) fn waiters(&self) -> usize {
        self.slots.waiters.load(Ordering::SeqCst)
    }
}

/// Counts a waiting call while it lives.
struct Waiting<'a>(&'a Slots);

impl<'a> Waiting<'a> {
    fn new(slots: &'a Slots) -> Self {
        slots.waiters.fetch_add(1, Ordering::SeqCst);
        Self(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One stream slot on one connection, held by a call until its response
/// ends or is dropped: it counts as in flight on the connection and the
/// endpoint meanwhile.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) conn: Arc<Conn>,
}

impl Slot {
    /// Counts the call on the endpoint too; the connection has counted it.
    fn counted(conn: Arc<Conn>) -> Self {
        conn.stats.calls_in_flight.fetch_add(1, Ordering::SeqCst);
        Self { conn }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn
            .stats
            .calls_in_flight
            .fetch_sub(1, Ordering::SeqCst);
        self.conn.call_ended();
    }
}
