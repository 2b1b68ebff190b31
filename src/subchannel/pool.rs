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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::task::AtomicWaker;
use tokio::time::Instant;

use super::stats::Stats;
use crate::connection::{Conn, Slots};

/// The open connections of one endpoint that may take calls.
///
/// `repr(C)` keeps `hint` first, in the cache line of the pool's reference
/// count, which every pick touches anyway.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Pool {
    /// Whether a call may come, for the picker: `serving` and some
    /// connection ready, as of the last change the subchannel published,
    /// in the low bit; the count of those changes above it. The picker
    /// reads only this, as the exact check reads every connection, cold on
    /// a large channel. A call checks exactly before it sends; one that
    /// finds the hint stale clears it, unless a change came since.
    hint: AtomicU64,
    addr: SocketAddr,
    /// The endpoint's counters: calls in flight and outcomes, for policies.
    stats: Arc<Stats>,
    max_connections: usize,
    /// `concurrency_limit`: calls in flight on the endpoint at most.
    concurrency_limit: Option<usize>,
    rate_limit: Option<RateLimit>,
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
    /// The endpoint's `concurrency_limit` stayed reached.
    Limited,
    /// The endpoint's `rate_limit` allows no more calls until then.
    RateLimited(Instant),
}

/// `rate_limit`: at most `limit` calls start in each window of `per`,
/// counted in one atomic as (window, calls) so that no call slips through
/// at a window's turn.
#[derive(Debug)]
struct RateLimit {
    limit: u64,
    per: Duration,
    epoch: Instant,
    /// The window's index in the high 40 bits, its calls in the low 24.
    state: AtomicU64,
}

/// The most calls a window counts; a larger limit is the same as none.
const RATE_COUNT_BITS: u32 = 24;
const RATE_COUNT_MASK: u64 = (1 << RATE_COUNT_BITS) - 1;

impl RateLimit {
    fn new(limit: u64, per: Duration) -> Self {
        Self {
            limit: limit.min(RATE_COUNT_MASK),
            per,
            epoch: Instant::now(),
            state: AtomicU64::new(0),
        }
    }

    /// Whether a call could be taken from the current window now.
    fn peek(&self) -> Result<(), Instant> {
        let (window, per) = self.window();
        let state = self.state.load(Ordering::Acquire);
        let (current, count) = (state >> RATE_COUNT_BITS, state & RATE_COUNT_MASK);
        if current == window && count >= self.limit {
            return Err(self.opens(window, per));
        }
        Ok(())
    }

    /// The current window's index, and a window's length in ns.
    fn window(&self) -> (u64, u128) {
        let per = self.per.as_nanos().max(1);
        let window = (self.epoch.elapsed().as_nanos() / per) as u64 & ((1 << 40) - 1);
        (window, per)
    }

    /// When the window after `window` opens.
    fn opens(&self, window: u64, _per: u128) -> Instant {
        let opens = u32::try_from(window + 1).unwrap_or(u32::MAX);
        self.epoch + crate::deadline::capped(self.per.saturating_mul(opens))
    }

    /// Takes one call from the current window, or says when the next
    /// window opens.
    fn take(&self) -> Result<(), Instant> {
        let (window, per) = self.window();
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (current, count) = (state >> RATE_COUNT_BITS, state & RATE_COUNT_MASK);
            let next = match (current == window, count < self.limit) {
                (false, _) => (window << RATE_COUNT_BITS) | 1,
                (true, true) => state + 1,
                (true, false) => return Err(self.opens(window, per)),
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => state = actual,
            }
        }
    }
}

impl crate::load::Candidate for Arc<Pool> {
    fn can_take_call(&self) -> bool {
        self.hint.load(Ordering::Acquire) & 1 == 1
    }

    fn in_flight(&self) -> usize {
        self.stats.calls_in_flight.load(Ordering::Relaxed)
    }

    fn latency_ns(&self, now: u64) -> Option<f64> {
        self.stats.latency.latency_ns(now)
    }
}

// === impl Pool ===

impl Pool {
    pub(crate) fn new(
        addr: SocketAddr,
        config: &super::config::SubchannelConfig,
        slots: Arc<Slots>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            hint: AtomicU64::new(0),
            addr,
            stats,
            max_connections: config.max_connections_per_endpoint,
            concurrency_limit: config.concurrency_limit,
            rate_limit: config
                .rate_limit
                .map(|(limit, per)| RateLimit::new(limit, per)),
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

    /// The endpoint's counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether some connection can take a call now, or after a wait for a
    /// slot: SERVING, open, and no GOAWAY seen.
    pub(crate) fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Acquire) && self.conns.load().iter().any(|c| c.is_ready())
    }

    /// Records whether the endpoint is SERVING.
    pub(crate) fn set_serving(&self, serving: bool) {
        if !self.serving.swap(serving, Ordering::SeqCst) && serving {
            // Load reports start over, blackout and all (gRFC A58).
            self.stats.server_load.restart();
        }
        self.refresh_hint();
        if !serving {
            // Waiting calls go elsewhere.
            self.slots.released();
        }
    }

    /// Works the picker's hint out again: after every change.
    fn refresh_hint(&self) {
        let usable = u64::from(self.is_ready());
        let _ = self
            .hint
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                Some(((h >> 1).wrapping_add(1) << 1) | usable)
            });
    }

    /// A call found the endpoint unable to take it, though the picker's
    /// hint said it could: the hint is cleared, unless a change was
    /// published since (which worked it out afresh).
    pub(crate) fn hint_was_stale(&self) {
        let seen = self.hint.load(Ordering::Acquire);
        if seen & 1 == 1 && !self.is_ready() {
            let _ =
                self.hint
                    .compare_exchange(seen, seen & !1, Ordering::AcqRel, Ordering::Relaxed);
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
        self.refresh_hint();
        self.slots.released();
    }

    /// A stream slot on the first connection that has one, while the
    /// endpoint is SERVING and within its limits.
    ///
    /// Limits are looked at before anything is taken, so a refusal takes
    /// nothing back; a waiting call that took and gave back would wake
    /// every waiter, itself included. Only a call that loses a race gives
    /// back, quietly.
    pub(crate) fn try_acquire(&self) -> Result<Slot, NoSlot> {
        if let Some(rate) = &self.rate_limit
            && let Err(opens) = rate.peek()
        {
            return Err(NoSlot::RateLimited(opens));
        }
        let conns = self.conns.load();
        if !conns.iter().any(|c| c.is_ready()) {
            return Err(NoSlot::Closed);
        }
        let in_flight = &self.stats.calls_in_flight;
        if self
            .concurrency_limit
            .is_some_and(|limit| in_flight.load(Ordering::SeqCst) >= limit)
        {
            return Err(NoSlot::Limited);
        }
        let Some(conn) = conns.iter().find(|c| c.is_ready() && c.try_start_call()) else {
            return Err(NoSlot::Full);
        };
        let mut slot = Slot {
            conn: conn.clone(),
            endpoint: self.stats.clone(),
            counted: false,
            quiet: false,
        };
        if !count_in(in_flight, self.concurrency_limit) {
            slot.quiet = true;
            return Err(NoSlot::Limited);
        }
        slot.counted = true;
        if let Some(all) = &self.stats.channel_in_flight {
            all.fetch_add(1, Ordering::Relaxed);
        }
        // Counted first, then checked (SeqCst both): once a NOT_SERVING
        // endpoint shows no call in flight, none follows.
        if !self.serving.load(Ordering::SeqCst) {
            return Err(NoSlot::Closed);
        }
        if let Some(rate) = &self.rate_limit
            && let Err(opens) = rate.take()
        {
            slot.quiet = true;
            return Err(NoSlot::RateLimited(opens));
        }
        Ok(slot)
    }

    /// A stream slot, waiting until `until` while every connection is
    /// full, or a limit holds. Full connections make the subchannel task
    /// open another one.
    pub(crate) async fn acquire(&self, until: Instant) -> Result<Slot, NoSlot> {
        // The common case costs no registration: a free slot at once.
        match self.try_acquire() {
            Err(NoSlot::Full | NoSlot::Limited | NoSlot::RateLimited(_)) => {}
            done => return done,
        }
        loop {
            // Registered before looking again, so a slot freed in between
            // wakes this call.
            let freed = self.slots.freed.notified();
            let _waiting = Waiting::new(&self.slots);
            let wake = match self.try_acquire() {
                Err(NoSlot::Full) => {
                    self.grow.store(true, Ordering::Release);
                    self.grow_waker.wake();
                    until
                }
                Err(NoSlot::Limited) => until,
                Err(NoSlot::RateLimited(opens)) => opens.min(until),
                done => return done,
            };
            if tokio::time::timeout_at(wake, freed).await.is_err() && wake >= until {
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
    pub(crate) fn refusal(&self, why: NoSlot) -> String {
        let addr = self.addr;
        match why {
            NoSlot::Closed => format!("{addr} has no connection that takes calls"),
            NoSlot::Full => {
                let conns = self.conns.load();
                let limit = conns.iter().map(|c| c.max_streams()).min().unwrap_or(0);
                format!(
                    "every stream slot on {addr} is taken: {} connections of at most {} \
                     (max_connections_per_endpoint), each limited by the server to {limit} \
                     concurrent streams",
                    conns.len(),
                    self.max_connections,
                )
            }
            NoSlot::Limited => format!(
                "{addr} has {} calls in flight, its concurrency_limit",
                self.concurrency_limit.unwrap_or(0)
            ),
            NoSlot::RateLimited(_) => match &self.rate_limit {
                Some(rate) => format!(
                    "{addr} started its rate_limit of {} calls per {:?}",
                    rate.limit, rate.per
                ),
                None => format!("{addr} is rate limited"),
            },
        }
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
    /// The endpoint's counters, which the call reports to.
    pub(crate) endpoint: Arc<Stats>,
    /// Counted on the endpoint too.
    counted: bool,
    /// Given back by a call that lost a race: nobody waits for it, and
    /// waking the waiters would wake the call itself.
    quiet: bool,
}

/// Counts a call in on `in_flight`, unless that would pass `limit`.
fn count_in(in_flight: &std::sync::atomic::AtomicUsize, limit: Option<usize>) -> bool {
    let Some(limit) = limit else {
        in_flight.fetch_add(1, Ordering::SeqCst);
        return true;
    };
    in_flight
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.counted {
            self.endpoint.calls_in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Some(all) = &self.endpoint.channel_in_flight {
                all.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.conn.call_ended(!self.quiet);
    }
}
