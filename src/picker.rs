//! The picker: the policy's choice among the endpoints of a snapshot.
//!
//! The balancer task publishes a [`Snapshot`] whenever an endpoint's state,
//! its ejection or the endpoint set changes. The request path loads it
//! through [`ArcSwap`], which takes no lock the background tasks hold, and
//! picks in O(1) whatever the number of endpoints:
//!
//! - round robin: one atomic add and one index into the list;
//! - least request and peak EWMA: a few random indexes (a thread-local
//!   xorshift, no shared state) and a few atomic loads per sample.
//!
//! Only when the chosen endpoint's connections have just closed (a GOAWAY
//! not yet published) does it look further. The picker chooses endpoints,
//! not connections: an endpoint with extra connections gets no more calls.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::policy::{Policy, SlowStart};
use crate::subchannel::{Pool, now_ns};

/// Something a call can be routed to.
pub(crate) trait Candidate: Clone {
    /// Whether it can take a new call right now.
    fn can_take_call(&self) -> bool;
    /// Calls in flight on it.
    fn in_flight(&self) -> usize;
    /// Its latency estimate in ns at `now`, if it has answered yet.
    fn latency_ns(&self, now: u64) -> Option<f64>;
}

impl Candidate for Arc<Pool> {
    fn can_take_call(&self) -> bool {
        self.is_ready()
    }

    fn in_flight(&self) -> usize {
        self.stats().calls_in_flight.load(Ordering::Relaxed)
    }

    fn latency_ns(&self, now: u64) -> Option<f64> {
        self.stats().outcomes.latency_ns(now)
    }
}

/// The policy as the picker runs it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pick {
    RoundRobin,
    /// The fewest calls in flight of `choices` samples.
    LeastRequest {
        choices: usize,
    },
    /// The lowest latency × (in flight + 1) of two samples.
    PeakEwma {
        default_rtt_ns: f64,
    },
}

impl From<&Policy> for Pick {
    fn from(policy: &Policy) -> Self {
        match policy {
            Policy::RoundRobin => Pick::RoundRobin,
            Policy::LeastRequest { choice_count } => Pick::LeastRequest {
                choices: (*choice_count).clamp(2, 10),
            },
            Policy::PeakEwma { default_rtt, .. } => Pick::PeakEwma {
                default_rtt_ns: default_rtt.as_nanos() as f64,
            },
        }
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
}

/// A random index below `n`: xorshift64*, per thread, so picks share no
/// cache line.
fn random_below(n: usize) -> usize {
    RNG.with(|rng| {
        let mut x = rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        rng.set(x);
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as usize * n) >> 32
    })
}

/// A random fraction in [0, 1).
fn random_fraction() -> f64 {
    random_below(1 << 24) as f64 / f64::from(1u32 << 24)
}

/// Power of `choices` random choices (gRFC A48, Linkerd's P2C): the index,
/// among that many distinct random samples of `ready` that can take a
/// call, of the lowest `cost / weight`. Distinct, unlike A48's: two draws
/// of the same slow endpoint would send it a call in `1 / n²` of picks.
fn best_of<T: Candidate>(
    ready: &[T],
    choices: usize,
    cost: impl Fn(&T) -> f64,
    weight: &impl Fn(usize) -> f64,
) -> Option<usize> {
    let n = ready.len();
    let mut best: Option<(usize, f64)> = None;
    let mut consider = |i: usize| {
        let candidate = &ready[i];
        if !candidate.can_take_call() {
            return;
        }
        let c = cost(candidate) / weight(i);
        if best.is_none_or(|(_, b)| c < b) {
            best = Some((i, c));
        }
    };
    if choices >= n {
        // From a random start, so that ties don't all go to the first.
        let start = random_below(n);
        (0..n).for_each(|k| consider((start + k) % n));
    } else {
        // Distinct samples: a repeat is drawn again, a few times at most.
        let mut seen = [usize::MAX; 10];
        for k in 0..choices.min(10) {
            let mut i = random_below(n);
            for _ in 0..8 {
                if !seen[..k].contains(&i) {
                    break;
                }
                i = random_below(n);
            }
            seen[k] = i;
            consider(i);
        }
    }
    best.map(|(i, _)| i)
}

/// What the request path sees: the endpoints calls may go to, and a
/// summary of every endpoint for error messages.
#[derive(Debug)]
pub(crate) struct Snapshot<T = Arc<Pool>> {
    /// The endpoints calls may go to, in address order.
    pub(crate) ready: Vec<T>,
    /// When each became SERVING, for slow start; empty without it.
    pub(crate) since: Vec<Instant>,
    /// "3 endpoints: 2 NOT_SERVING, 1 connect refused".
    pub(crate) summary: String,
}

impl Snapshot {
    /// Summarises endpoint state labels: counts per label, most frequent
    /// first.
    pub(crate) fn summarize<'a>(
        labels: impl Iterator<Item = &'a str>,
        note: Option<&str>,
    ) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        let mut total = 0;
        for label in labels {
            total += 1;
            match counts.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => counts.push((label, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut out = format!("{total} endpoint{}", if total == 1 { "" } else { "s" });
        for (i, (label, n)) in counts.iter().enumerate() {
            out.push_str(if i == 0 { ": " } else { ", " });
            let _ = write!(out, "{n} {label}");
        }
        if let Some(note) = note {
            let _ = write!(out, " ({note})");
        }
        out
    }
}

/// The picker state one `LbChannel` and its clones share.
#[derive(Debug)]
pub(crate) struct Picker<T = Arc<Pool>> {
    snapshot: ArcSwap<Snapshot<T>>,
    /// Bumped after every publish, to wake calls waiting for an endpoint.
    published: watch::Sender<u64>,
    next: AtomicUsize,
    pick: Pick,
    slow_start: Option<SlowStart>,
    /// Why the balancer stopped for good, if it did (a panic, its resolver
    /// gone): no snapshot will come again.
    stopped: std::sync::OnceLock<String>,
}

impl<T: Candidate> Picker<T> {
    /// A picker starting at a random offset, so that many clients don't all
    /// begin with the same endpoint.
    pub(crate) fn new(summary: String, pick: Pick, slow_start: Option<SlowStart>) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                ready: Vec::new(),
                since: Vec::new(),
                summary,
            }),
            published: watch::channel(0).0,
            next: AtomicUsize::new(rand::random_range(0..usize::MAX / 2)),
            pick,
            slow_start,
            stopped: std::sync::OnceLock::new(),
        }
    }

    /// The balancer stopped for good, for `why`: an empty snapshot, and
    /// every call waiting for an endpoint is woken to fail.
    pub(crate) fn stop(&self, why: String) {
        let summary = format!("the balancer stopped: {why}");
        let _ = self.stopped.set(why);
        self.publish(Snapshot {
            ready: Vec::new(),
            since: Vec::new(),
            summary,
        });
    }

    /// Why the balancer stopped for good, if it did.
    pub(crate) fn stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    /// Whether the picker wants to know when each endpoint became SERVING.
    pub(crate) fn slow_start(&self) -> Option<SlowStart> {
        self.slow_start
    }

    pub(crate) fn publish(&self, snapshot: Snapshot<T>) {
        self.snapshot.store(Arc::new(snapshot));
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The policy's choice among the endpoints that can take a call, if
    /// any can.
    pub(crate) fn pick(&self) -> Option<T> {
        let snapshot = self.snapshot.load();
        let n = snapshot.ready.len();
        if n == 0 {
            return None;
        }
        // Slow start only costs a clock read while an endpoint ramps up.
        let ramp = self.slow_start.filter(|_| !snapshot.since.is_empty());
        let now = ramp.map(|_| Instant::now());
        let weight = |i: usize| match (ramp, now) {
            (Some(ramp), Some(now)) => {
                ramp.weight(now.saturating_duration_since(snapshot.since[i]))
            }
            _ => 1.0,
        };
        match self.pick {
            Pick::RoundRobin => {}
            Pick::LeastRequest { choices } => {
                if let Some(i) =
                    best_of(&snapshot.ready, choices, |c| c.in_flight() as f64, &weight)
                {
                    return Some(snapshot.ready[i].clone());
                }
            }
            Pick::PeakEwma { default_rtt_ns } => {
                let now_ns = now_ns();
                if let Some(i) = best_of(
                    &snapshot.ready,
                    2,
                    |c| {
                        let latency = c.latency_ns(now_ns).unwrap_or(default_rtt_ns);
                        latency * (c.in_flight() + 1) as f64
                    },
                    &weight,
                ) {
                    return Some(snapshot.ready[i].clone());
                }
            }
        }
        // Round robin, and the fallback when no sample could take a call.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let index = start.wrapping_add(i) % n;
            let candidate = &snapshot.ready[index];
            if candidate.can_take_call() {
                // A ramping endpoint is skipped in proportion to its ramp.
                if ramp.is_some() && random_fraction() >= weight(index) {
                    fallback.get_or_insert(index);
                    continue;
                }
                if i > 0 {
                    // Skip the closed ones next time too.
                    self.next.fetch_add(i, Ordering::Relaxed);
                }
                tracing::trace!(index, of = n, "picked");
                return Some(candidate.clone());
            }
        }
        fallback.map(|i| snapshot.ready[i].clone())
    }

    /// The summary of the current snapshot.
    pub(crate) fn summary(&self) -> String {
        self.snapshot.load().summary.clone()
    }

    /// Wakes on every publish from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }
}

impl Picker<Arc<Pool>> {
    /// The policy's choice, unless it is one of `tried`: then any other
    /// endpoint that can take a call, from a random start. Only a retry or
    /// a hedge has a `tried`, so the O(n) look is off the common path.
    pub(crate) fn pick_avoiding(&self, tried: &[Arc<Pool>]) -> Option<Arc<Pool>> {
        let first = self.pick()?;
        let was_tried = |c: &Arc<Pool>| tried.iter().any(|t| Arc::ptr_eq(t, c));
        if !was_tried(&first) {
            return Some(first);
        }
        let snapshot = self.snapshot.load();
        let n = snapshot.ready.len();
        let start = random_below(n);
        (0..n)
            .map(|k| &snapshot.ready[(start + k) % n])
            .find(|c| c.can_take_call() && !was_tried(c))
            .cloned()
            .or(Some(first))
    }
}

/// The picker behind a generic service, so benchmarks can measure the
/// request path's routing cost against no-op endpoints. Not part of the API.
#[cfg(feature = "internals")]
pub(crate) mod bench {
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use super::{Candidate, Picker, Snapshot};

    #[derive(Clone)]
    struct Ready<S>(S);

    impl<S: Clone> Candidate for Ready<S> {
        fn can_take_call(&self) -> bool {
            true
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn latency_ns(&self, _: u64) -> Option<f64> {
            None
        }
    }

    /// `policy` over `services` through healthlb's picker, with
    /// `poll_ready` picking and `call` using the pick, as `LbChannel` does.
    #[allow(missing_debug_implementations)]
    pub struct Picked<S> {
        picker: Arc<Picker<Ready<S>>>,
        picked: Option<Ready<S>>,
        first: Ready<S>,
    }

    impl<S: Clone> Picked<S> {
        /// A picker over `services`, all SERVING; `None` if there are none.
        pub fn new(services: Vec<S>, policy: &crate::Policy) -> Option<Self> {
            let first = Ready(services.first()?.clone());
            let picker = Picker::new(String::new(), super::Pick::from(policy), None);
            picker.publish(Snapshot {
                ready: services.into_iter().map(Ready).collect(),
                since: Vec::new(),
                summary: String::new(),
            });
            Some(Self {
                picker: Arc::new(picker),
                picked: None,
                first,
            })
        }
    }

    impl<S, R> tower::Service<R> for Picked<S>
    where
        S: tower::Service<R> + Clone,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.picked = self.picker.pick();
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: R) -> S::Future {
            // Without a poll_ready first, the first service takes it.
            let mut service = self.picked.take().unwrap_or_else(|| self.first.clone());
            service.0.call(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_count_labels() {
        let labels = ["NOT_SERVING", "connect refused", "NOT_SERVING"];
        assert_eq!(
            Snapshot::summarize(labels.into_iter(), None),
            "3 endpoints: 2 NOT_SERVING, 1 connect refused"
        );
        assert_eq!(
            Snapshot::summarize(std::iter::empty(), Some("DNS returned no address")),
            "0 endpoints (DNS returned no address)"
        );
        assert_eq!(
            Snapshot::summarize(["SERVING"].into_iter(), None),
            "1 endpoint: 1 SERVING"
        );
    }
}
