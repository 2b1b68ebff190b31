//! The picker: the policy's choice among the endpoints of a snapshot.
//!
//! The balancer publishes a [`Snapshot`] whenever an endpoint's state, its
//! ejection or the endpoint set changes. The request path loads it through
//! [`ArcSwap`], which takes no lock the background tasks hold, and picks in
//! O(1) whatever the number of endpoints:
//!
//! - round robin (`round_robin.rs`): one atomic add and one index;
//! - least request (`least_request.rs`) and peak EWMA (`peak_ewma.rs`): a
//!   few random indexes (`sample.rs`: a thread-local xorshift, no shared
//!   state) and a few atomic loads per sample.
//!
//! A policy knows endpoints only as [`Candidate`]s, and the picker knows a
//! policy only through [`Choose`]. The public [`Policy`] says which runs;
//! slow start (`policy.rs`) weighs an endpoint that just joined.
//!
//! Only when the chosen endpoint's connections have just closed (a GOAWAY
//! not yet published) does it look further. The picker chooses endpoints,
//! not connections: an endpoint with extra connections gets no more calls.

#[cfg(feature = "internals")]
pub(crate) mod bench;
mod least_request;
mod peak_ewma;
mod policy;
mod ring_hash;
mod round_robin;
mod sample;
mod snapshot;
mod weighted_round_robin;
mod xxhash;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use self::least_request::LeastRequest;
use self::peak_ewma::PeakEwma;
pub use self::policy::{Policy, SlowStart};
pub use self::ring_hash::RingHash;
pub(crate) use self::ring_hash::{Member, Ring, Walked};
use self::round_robin::RoundRobin;
use self::sample::{random_below, random_fraction};
pub(crate) use self::snapshot::{Group, Snapshot};
pub use self::weighted_round_robin::WeightedRoundRobin;
pub(crate) use self::weighted_round_robin::{Made, Schedule, Schedules};
use crate::load::Candidate;
use crate::subchannel::Pool;

/// A policy's choice among the endpoints of a snapshot: the index of the
/// one a call goes to, or `None` to leave it to round robin.
pub(crate) trait Choose {
    fn choose<T: Candidate>(&self, ready: &[T], weight: &impl Fn(usize) -> f64) -> Option<usize>;
}

/// The policy as the picker runs it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Chooser {
    RoundRobin,
    LeastRequest(LeastRequest),
    PeakEwma(PeakEwma),
    /// The balancer's schedules choose.
    WeightedRoundRobin,
    /// The ring chooses, by each call's key: only with the call.
    RingHash,
}

impl From<&Policy> for Chooser {
    fn from(policy: &Policy) -> Self {
        match policy {
            Policy::RoundRobin => Chooser::RoundRobin,
            Policy::LeastRequest { choice_count } => Chooser::LeastRequest(LeastRequest {
                choices: (*choice_count).clamp(2, 10),
            }),
            Policy::PeakEwma { default_rtt, .. } => Chooser::PeakEwma(PeakEwma {
                default_rtt_ns: default_rtt.as_nanos() as f64,
            }),
            Policy::WeightedRoundRobin(_) => Chooser::WeightedRoundRobin,
            Policy::RingHash(_) => Chooser::RingHash,
        }
    }
}

impl Choose for Chooser {
    fn choose<T: Candidate>(&self, ready: &[T], weight: &impl Fn(usize) -> f64) -> Option<usize> {
        match self {
            Chooser::RoundRobin | Chooser::WeightedRoundRobin | Chooser::RingHash => None,
            Chooser::LeastRequest(policy) => policy.choose(ready, weight),
            Chooser::PeakEwma(policy) => policy.choose(ready, weight),
        }
    }
}

/// The picker state one `LbChannel` and its clones share.
#[derive(Debug)]
pub(crate) struct Picker<T = Arc<Pool>> {
    snapshot: ArcSwap<Snapshot<T>>,
    /// Bumped at every publish, to wake calls waiting for an endpoint:
    /// the count is the snapshot's generation.
    published: watch::Sender<u64>,
    chooser: Chooser,
    /// The order of round robin, and every policy's fallback.
    round_robin: RoundRobin,
    slow_start: Option<SlowStart>,
    /// Weighted round robin's schedules, for the current snapshot.
    schedules: weighted_round_robin::Published,
    /// Ring hash's ring, over every endpoint, and its settings.
    ring: arc_swap::ArcSwapOption<Ring<T>>,
    ring_config: Option<RingHash>,
    /// Why the balancer stopped for good, if it did (a panic, its resolver
    /// gone): no snapshot will come again.
    stopped: OnceLock<String>,
}

// === impl Picker ===

impl<T: Candidate> Picker<T> {
    pub(crate) fn new(summary: String, chooser: Chooser, slow_start: Option<SlowStart>) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                ready: Vec::new(),
                since: Vec::new(),
                groups: Vec::new(),
                note_at: summary.len(),
                summary,
                failing: None,
                settled: false,
                generation: 0,
            }),
            published: watch::channel(0).0,
            chooser,
            round_robin: RoundRobin::default(),
            slow_start,
            schedules: Default::default(),
            ring: Default::default(),
            ring_config: None,
            stopped: OnceLock::new(),
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
            groups: Vec::new(),
            note_at: summary.len(),
            summary,
            failing: None,
            settled: false,
            generation: 0,
        });
    }

    /// Ring hash's settings, for a channel that hashes.
    pub(crate) fn hashing(mut self, config: RingHash) -> Self {
        self.ring_config = Some(config);
        self
    }

    /// Ring hash: the key of a call with `headers`, or a random one when
    /// it has none (gRFC A76); `None` under other policies.
    pub(crate) fn request_hash(&self, headers: &http::HeaderMap) -> Option<u64> {
        let config = self.ring_config.as_ref()?;
        Some(config.request_hash(headers).unwrap_or_else(rand::random))
    }

    /// Ring hash's settings, if it runs.
    pub(crate) fn ring_config(&self) -> Option<&RingHash> {
        self.ring_config.as_ref()
    }

    /// Publishes a new ring.
    pub(crate) fn set_ring(&self, ring: Ring<T>) {
        self.ring.store(Some(Arc::new(ring)));
    }

    /// The ring, if one is published.
    pub(crate) fn ring(&self) -> Option<Arc<Ring<T>>> {
        self.ring.load_full()
    }

    /// The policy as people read it: its name, and the ring's size.
    pub(crate) fn describe(&self) -> String {
        let name = match self.chooser {
            Chooser::RoundRobin => "round_robin",
            Chooser::LeastRequest(_) => "least_request_experimental",
            Chooser::PeakEwma(_) => "peak_ewma",
            Chooser::WeightedRoundRobin => "weighted_round_robin",
            Chooser::RingHash => "ring_hash_experimental",
        };
        match (self.ring.load().as_ref(), &self.ring_config) {
            (Some(ring), Some(config)) => format!(
                "{name} on {}, a ring of {} entries over {} endpoints",
                config.request_hash_header,
                ring.len(),
                ring.members().len()
            ),
            _ => name.to_owned(),
        }
    }

    /// Why the balancer stopped for good, if it did.
    pub(crate) fn stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    /// Why the channel is in TRANSIENT_FAILURE, if it is.
    pub(crate) fn failing(&self) -> Option<Arc<str>> {
        self.snapshot.load().failing.clone()
    }

    /// Whether the first set has settled (see [`Snapshot::settled`]).
    pub(crate) fn settled(&self) -> bool {
        self.snapshot.load().settled
    }

    /// Whether the picker wants to know when each endpoint became SERVING.
    pub(crate) fn slow_start(&self) -> Option<SlowStart> {
        self.slow_start
    }

    pub(crate) fn publish(&self, mut snapshot: Snapshot<T>) {
        // The publish count is the snapshot's generation; it is stored
        // before the count's watchers wake.
        self.published.send_modify(|n| {
            *n = n.wrapping_add(1);
            snapshot.generation = *n;
            self.snapshot.store(Arc::new(snapshot));
        });
    }

    /// The policy's choice among the endpoints that can take a call, if
    /// any can.
    pub(crate) fn pick(&self) -> Option<T> {
        if let Chooser::RingHash = self.chooser {
            // Only the call knows its key.
            return None;
        }
        let snapshot = self.snapshot.load();
        if snapshot.ready.is_empty() {
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
        // Zone-aware routing: a group by its share, then the policy in it;
        // the whole set only if none of the group can take a call.
        let (start, end) = match snapshot.groups.len() {
            0 => (0, snapshot.ready.len()),
            1 => (snapshot.groups[0].start, snapshot.groups[0].end),
            _ => {
                let draw = random_fraction();
                let g = snapshot.groups.iter().find(|g| draw < g.upto);
                let g = g.unwrap_or(&snapshot.groups[snapshot.groups.len() - 1]);
                (g.start, g.end)
            }
        };
        let choose = |start: usize, end: usize| {
            let ready = &snapshot.ready[start..end];
            if let Chooser::WeightedRoundRobin = self.chooser
                && let Some(index) = self.schedules.pick(snapshot.generation, start, end)
                && ready[index - start].can_take_call()
            {
                return Some(index);
            }
            let weight = |i: usize| weight(start + i);
            let index = self
                .chooser
                .choose(ready, &weight)
                .or_else(|| self.round_robin.next(ready, ramp.is_some(), &weight))?;
            Some(start + index)
        };
        let index = choose(start, end).or_else(|| match (start, end) {
            (0, n) if n == snapshot.ready.len() => None,
            _ => choose(0, snapshot.ready.len()),
        })?;
        Some(snapshot.ready[index].clone())
    }

    /// The summary of the current snapshot.
    pub(crate) fn summary(&self) -> String {
        self.snapshot.load().summary.clone()
    }

    /// The summary's endpoint states, without its note on resolution.
    pub(crate) fn states(&self) -> String {
        let snapshot = self.snapshot.load();
        snapshot.summary[..snapshot.note_at].to_owned()
    }

    /// The current snapshot, for the balancer's weighted round robin.
    pub(crate) fn current(&self) -> Arc<Snapshot<T>> {
        self.snapshot.load_full()
    }

    /// Publishes weighted round robin's schedules, made for the snapshot
    /// of their generation.
    pub(crate) fn schedule(&self, schedules: Schedules) {
        self.schedules.store(schedules);
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
    pub(crate) fn pick_avoiding(
        &self,
        tried: &[Arc<Pool>],
        hash: Option<u64>,
    ) -> Option<(Arc<Pool>, Option<Walked>)> {
        if let Chooser::RingHash = self.chooser {
            let ring = self.ring.load();
            let hash = hash.unwrap_or_else(rand::random);
            let in_rotation = |p: &Arc<Pool>| {
                p.stats()
                    .in_rotation
                    .load(std::sync::atomic::Ordering::Acquire)
            };
            let (pool, walked) = ring.as_ref()?.pick(hash, |p| {
                !in_rotation(p) || tried.iter().any(|t| Arc::ptr_eq(t, p))
            })?;
            return Some((pool.clone(), walked));
        }
        self.pick_unhashed(tried).map(|pool| (pool, None))
    }

    fn pick_unhashed(&self, tried: &[Arc<Pool>]) -> Option<Arc<Pool>> {
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
