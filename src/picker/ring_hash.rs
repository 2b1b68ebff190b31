//! `ring_hash_experimental` (gRFC A42, A76): the same request key to the
//! same endpoint, for caches, shards and per-key limits.
//!
//! Each endpoint is placed on a ring of XXH64 hashes of its hash key (its
//! address unless its source gives one) with `_0`, `_1`, … appended, in
//! proportion to its weight, exactly as grpc-go builds it; a call's key is
//! the value of `request_hash_header`, hashed the same way, or a random
//! hash when it has none (A76). A call goes to the first entry at or after
//! its hash whose endpoint can take it, walking on past the others (A42).
//! With a balance factor (Envoy's `hash_balance_factor`), an endpoint with
//! more than its share of the calls in flight times the factor is passed
//! over too, so one hot key can't melt its pod.
//!
//! The balancer builds the ring off the request path whenever the
//! endpoint set changes; a pick is a binary search and a short walk, with
//! no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::{HeaderMap, HeaderName};

use super::xxhash::xxh64;
use crate::Error;
use crate::load::Candidate;

/// The most ring entries anyone may ask for: 8,388,608, Envoy's and gRFC
/// A42's limit.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// The settings of [`Policy::RingHash`](crate::Policy::RingHash).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RingHash {
    /// The request header whose value is the call's key (gRFC A76); values
    /// of a repeated header are joined with `,`. A call without it gets a
    /// random key. Required: healthlb has no xDS route to hash by.
    pub request_hash_header: HeaderName,
    /// The fewest ring entries. Default: 1024 (gRFC A42).
    pub min_ring_size: u64,
    /// The most ring entries, at most 8,388,608. Default: 4096 (gRFC A42).
    pub max_ring_size: u64,
    /// The client's own cap on both sizes, as gRFC A42's local option.
    /// Default: 4096.
    pub ring_size_cap: u64,
    /// A stable ring: this many entries per unit of weight for every
    /// endpoint, whatever their number, instead of gRFC A42's sizing. A
    /// pod that leaves then moves only its own keys, and one that joins
    /// takes its share from each, where A42's ring, which gives each
    /// endpoint `minRingSize` ÷ their number, also moves keys between pods
    /// that stayed. Its keys don't land where grpc-go's would. Capped by
    /// the sizes above. Default: none, A42's ring.
    pub entries_per_weight: Option<u64>,
    /// Bounded load, Envoy's `hash_balance_factor` ÷ 100: an endpoint
    /// with more calls in flight than this × its share of all of them is
    /// passed over for the next on the ring. At least 1.0. Default: none,
    /// off.
    pub hash_balance_factor: Option<f64>,
}

impl RingHash {
    /// Ring hash on the value of the request header `header`, with gRFC
    /// A42's ring sizes and no bound on load.
    pub fn new(header: impl AsRef<str>) -> Result<Self, Error> {
        Ok(Self {
            request_hash_header: header_name(header.as_ref())?,
            min_ring_size: 1024,
            max_ring_size: 4096,
            ring_size_cap: 4096,
            entries_per_weight: None,
            hash_balance_factor: None,
        })
    }

    /// A stable ring of `n` entries per unit of weight (see
    /// [`entries_per_weight`](Self::entries_per_weight)).
    pub fn entries_per_weight(mut self, n: u64) -> Self {
        self.entries_per_weight = Some(n);
        self
    }

    /// Sets the fewest ring entries.
    pub fn min_ring_size(mut self, n: u64) -> Self {
        self.min_ring_size = n;
        self
    }

    /// Sets the most ring entries.
    pub fn max_ring_size(mut self, n: u64) -> Self {
        self.max_ring_size = n;
        self
    }

    /// Sets the client's cap on both sizes.
    pub fn ring_size_cap(mut self, n: u64) -> Self {
        self.ring_size_cap = n;
        self
    }

    /// Bounds each endpoint's calls in flight to `factor` × its share.
    pub fn hash_balance_factor(mut self, factor: f64) -> Self {
        self.hash_balance_factor = Some(factor);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |what: String| Err(Error::invalid_config(format!("ring_hash: {what}")));
        if self.min_ring_size == 0 || self.min_ring_size > MAX_RING_SIZE {
            return invalid(format!(
                "minRingSize must be from 1 to {MAX_RING_SIZE}, got {}",
                self.min_ring_size
            ));
        }
        if self.max_ring_size == 0 || self.max_ring_size > MAX_RING_SIZE {
            return invalid(format!(
                "maxRingSize must be from 1 to {MAX_RING_SIZE}, got {}",
                self.max_ring_size
            ));
        }
        if self.min_ring_size > self.max_ring_size {
            return invalid(format!(
                "minRingSize {} is above maxRingSize {}",
                self.min_ring_size, self.max_ring_size
            ));
        }
        if self.entries_per_weight == Some(0) {
            return invalid("entriesPerWeight must be above zero".to_owned());
        }
        if self.ring_size_cap == 0 {
            return invalid("the ring size cap must be above zero".to_owned());
        }
        if let Some(f) = self.hash_balance_factor
            && !(f.is_finite() && f >= 1.0)
        {
            return invalid(format!("hashBalanceFactor must be 1.0 or more, got {f}"));
        }
        Ok(())
    }

    /// The sizes in force: each capped by `ring_size_cap` (gRFC A42).
    fn sizes(&self) -> (u64, u64) {
        (
            self.min_ring_size.min(self.ring_size_cap),
            self.max_ring_size.min(self.ring_size_cap),
        )
    }

    /// The hash of `headers`' key; `None` when they have none.
    pub(crate) fn request_hash(&self, headers: &HeaderMap) -> Option<u64> {
        let mut values = headers.get_all(&self.request_hash_header).iter();
        let first = values.next()?;
        let Some(second) = values.next() else {
            return Some(xxh64(first.as_bytes(), 0));
        };
        let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
        for (i, value) in [first, second].into_iter().chain(values).enumerate() {
            if i > 0 {
                joined.push(b',');
            }
            joined.extend_from_slice(value.as_bytes());
        }
        Some(xxh64(&joined, 0))
    }
}

/// A header a key may come from: a valid name, not a binary (`-bin`) one
/// (gRFC A76).
pub(crate) fn header_name(name: &str) -> Result<HeaderName, Error> {
    let parsed = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
        Error::invalid_config(format!(
            "ring_hash: requestHashHeader {name:?} is not a valid header name"
        ))
    })?;
    if parsed.as_str().ends_with("-bin") {
        return Err(Error::invalid_config(format!(
            "ring_hash: requestHashHeader {name:?} is a binary header, which can't be a key (gRFC A76)"
        )));
    }
    Ok(parsed)
}

/// One endpoint as the ring sees it.
#[derive(Debug, Clone)]
pub(crate) struct Member<T> {
    pub(crate) endpoint: T,
    /// Its hash key: the source's, else its address.
    pub(crate) key: Arc<str>,
    /// Its weight, at least 1.
    pub(crate) weight: u32,
}

/// The ring: entries sorted by hash, each naming its endpoint.
#[derive(Debug)]
pub(crate) struct Ring<T> {
    hashes: Vec<u64>,
    owners: Vec<u32>,
    members: Vec<Member<T>>,
    /// Bounded load: the factor, the channel's calls in flight, and the
    /// weight of the endpoints in rotation (set after each publish).
    balance: Option<Balance>,
}

#[derive(Debug)]
struct Balance {
    factor: f64,
    in_flight: Arc<AtomicUsize>,
    weight_in_rotation: AtomicU64,
}

/// Why a pick went past its first endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walked {
    /// Its endpoint can't take calls now: not SERVING, ejected, closed.
    NotInRotation,
    /// Its endpoint had more than its bounded share of calls in flight.
    Overloaded,
}

impl Walked {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Walked::NotInRotation => "not_in_rotation",
            Walked::Overloaded => "overloaded",
        }
    }
}

impl<T: Candidate> Ring<T> {
    /// The ring over `members`, as gRFC A42 and grpc-go build it.
    pub(crate) fn build(
        mut members: Vec<Member<T>>,
        config: &RingHash,
        in_flight: Option<Arc<AtomicUsize>>,
    ) -> Self {
        // Sorted by key, so every client builds the same ring.
        members.sort_by(|a, b| a.key.cmp(&b.key));
        let total: f64 = members.iter().map(|m| f64::from(m.weight)).sum();
        let (min_size, max_size) = config.sizes();
        let mut hashes_owners: Vec<(u64, u32)> = Vec::new();
        if !members.is_empty() {
            let min_weight = members
                .iter()
                .map(|m| f64::from(m.weight) / total)
                .fold(1.0, f64::min);
            // The smallest ring at least `min_size` in which the lightest
            // endpoint has a whole number of entries, at most `max_size`;
            // or, stable, a fixed number per unit of weight.
            let scale = match config.entries_per_weight {
                Some(per) => (per as f64 * total).min(max_size as f64),
                None => (min_weight * min_size as f64).ceil() / min_weight,
            }
            .min(max_size as f64);
            hashes_owners.reserve(scale.ceil() as usize);
            let (mut current, mut target) = (0.0f64, 0.0f64);
            let mut key = String::new();
            for (owner, member) in members.iter().enumerate() {
                target += scale * f64::from(member.weight) / total;
                let mut i = 0u64;
                while current < target {
                    key.clear();
                    use std::fmt::Write as _;
                    let _ = write!(key, "{}_{i}", member.key);
                    hashes_owners.push((xxh64(key.as_bytes(), 0), owner as u32));
                    i += 1;
                    current += 1.0;
                }
            }
            hashes_owners.sort_unstable_by_key(|(hash, _)| *hash);
        }
        let (hashes, owners) = hashes_owners.into_iter().unzip();
        let balance = config
            .hash_balance_factor
            .zip(in_flight)
            .map(|(factor, in_flight)| Balance {
                factor,
                in_flight,
                weight_in_rotation: AtomicU64::new(total as u64),
            });
        Self {
            hashes,
            owners,
            members,
            balance,
        }
    }

    /// Entries on the ring.
    pub(crate) fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Each member's entries, in key order: for tests and status.
    #[cfg(test)]
    fn entries(&self) -> Vec<(u64, &str)> {
        self.hashes
            .iter()
            .zip(&self.owners)
            .map(|(h, o)| (*h, &*self.members[*o as usize].key))
            .collect()
    }

    /// The members, in key order.
    pub(crate) fn members(&self) -> &[Member<T>] {
        &self.members
    }

    /// Bounded load: the weight of the members in rotation now.
    pub(crate) fn set_weight_in_rotation(&self, weight: u64) {
        if let Some(b) = &self.balance {
            b.weight_in_rotation.store(weight.max(1), Ordering::Relaxed);
        }
    }

    /// The endpoint for `hash`: the first at or after it on the ring that
    /// can take a call (not one of `avoid` if another can), and whether
    /// the walk went past the first. `None` if none can.
    pub(crate) fn pick(
        &self,
        hash: u64,
        avoid: impl Fn(&T) -> bool,
    ) -> Option<(&T, Option<Walked>)> {
        let n = self.hashes.len();
        if n == 0 {
            return None;
        }
        let start = self.hashes.partition_point(|h| *h < hash) % n;
        let mut walked = None;
        // Bounded load: the least loaded seen, if all are over.
        let mut least: Option<(f64, &T)> = None;
        let mut last = u32::MAX;
        for i in 0..n {
            let owner = self.owners[(start + i) % n];
            if owner == last {
                continue;
            }
            last = owner;
            let member = &self.members[owner as usize];
            if !member.endpoint.can_take_call() || avoid(&member.endpoint) {
                walked.get_or_insert(Walked::NotInRotation);
                continue;
            }
            if let Some(b) = &self.balance {
                let slots = b.slots(member.weight);
                let active = member.endpoint.in_flight() as f64;
                if active >= slots {
                    let ratio = active / slots;
                    if least.is_none_or(|(r, _)| ratio < r) {
                        least = Some((ratio, &member.endpoint));
                    }
                    walked.get_or_insert(Walked::Overloaded);
                    continue;
                }
            }
            return Some((&member.endpoint, walked));
        }
        least.map(|(_, endpoint)| (endpoint, walked))
    }
}

impl Balance {
    /// The calls in flight `weight` may have before it is passed over:
    /// Envoy's `ceil(ceil((all + 1) × factor) × share)`, at least 1.
    fn slots(&self, weight: u32) -> f64 {
        let all = self.in_flight.load(Ordering::Relaxed) as f64;
        let share = f64::from(weight) / self.weight_in_rotation.load(Ordering::Relaxed) as f64;
        (((all + 1.0) * self.factor).ceil() * share).ceil().max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// An endpoint for the ring alone: its calls in flight, and whether
    /// it takes calls.
    #[derive(Debug, Clone)]
    struct Fake(Arc<(AtomicUsize, AtomicBool)>);

    impl Fake {
        fn new() -> Self {
            Self(Arc::new((AtomicUsize::new(0), AtomicBool::new(true))))
        }
    }

    impl Candidate for Fake {
        fn can_take_call(&self) -> bool {
            self.0.1.load(Ordering::Relaxed)
        }
        fn in_flight(&self) -> usize {
            self.0.0.load(Ordering::Relaxed)
        }
        fn latency_ns(&self, _: u64) -> Option<f64> {
            None
        }
    }

    fn members(keys: &[(&str, u32)]) -> Vec<Member<Fake>> {
        keys.iter()
            .map(|(key, weight)| Member {
                endpoint: Fake::new(),
                key: (*key).into(),
                weight: *weight,
            })
            .collect()
    }

    fn config(min: u64, max: u64) -> RingHash {
        RingHash::new("x-key")
            .unwrap()
            .min_ring_size(min)
            .max_ring_size(max)
    }

    /// gRFC A42's construction, worked by hand for weights 3, 3 and 4
    /// with `minRingSize` 7: normalised weights 0.3, 0.3 and 0.4; the
    /// lightest needs a whole number of entries, so the scale is ⌈0.3 ×
    /// 7⌉ ÷ 0.3 = 10; the entries are 3, 3 and 4, keyed `<key>_<n>`, and
    /// sorted by their XXH64.
    #[test]
    fn the_ring_is_a42s_construction_worked_by_hand() {
        let ring = Ring::build(
            members(&[("10.0.0.3:80", 4), ("10.0.0.1:80", 3), ("10.0.0.2:80", 3)]),
            &config(7, 4096),
            None,
        );
        assert_eq!(ring.len(), 10);
        let mut want: Vec<(u64, &str)> = [
            ("10.0.0.1:80", "10.0.0.1:80_0"),
            ("10.0.0.1:80", "10.0.0.1:80_1"),
            ("10.0.0.1:80", "10.0.0.1:80_2"),
            ("10.0.0.2:80", "10.0.0.2:80_0"),
            ("10.0.0.2:80", "10.0.0.2:80_1"),
            ("10.0.0.2:80", "10.0.0.2:80_2"),
            ("10.0.0.3:80", "10.0.0.3:80_0"),
            ("10.0.0.3:80", "10.0.0.3:80_1"),
            ("10.0.0.3:80", "10.0.0.3:80_2"),
            ("10.0.0.3:80", "10.0.0.3:80_3"),
        ]
        .into_iter()
        .map(|(owner, entry)| (xxh64(entry.as_bytes(), 0), owner))
        .collect();
        want.sort_unstable();
        assert_eq!(ring.entries(), want);

        // Equal weights, 3 endpoints, A42's default minimum of 1024: the
        // scale is ⌈⅓ × 1024⌉ × 3 = 1026 entries, 342 each.
        let ring = Ring::build(
            members(&[("a", 1), ("b", 1), ("c", 1)]),
            &config(1024, 4096),
            None,
        );
        assert_eq!(ring.len(), 1026);
        let a = ring.entries().iter().filter(|(_, k)| *k == "a").count();
        assert_eq!(a, 342);
        // The cap: asking for more than 4096 gets 4096.
        let ring = Ring::build(members(&[("a", 1), ("b", 1)]), &config(8000, 8000), None);
        assert_eq!(ring.len(), 4096);
    }

    #[test]
    fn a_stable_ring_gives_each_endpoint_its_entries_whatever_their_number() {
        let stable = config(1024, 4096).entries_per_weight(100);
        for n in 1..=5 {
            let names: Vec<(String, u32)> =
                (0..n).map(|i| (format!("pod-{i}"), 1 + i % 2)).collect();
            let named: Vec<(&str, u32)> = names.iter().map(|(k, w)| (k.as_str(), *w)).collect();
            let ring = Ring::build(members(&named), &stable, None);
            for (key, weight) in &named {
                let entries = ring.entries().iter().filter(|(_, k)| k == key).count();
                assert_eq!(entries as u32, 100 * weight, "{key} of {n}");
            }
        }
    }

    #[test]
    fn a_pick_walks_past_endpoints_that_cant_take_calls() {
        let ring = Ring::build(
            members(&[("a", 1), ("b", 1), ("c", 1)]),
            &config(64, 64),
            None,
        );
        for key in 0..200u64 {
            let hash = xxh64(&key.to_le_bytes(), 0);
            let (first, walked) = ring.pick(hash, |_| false).unwrap();
            assert_eq!(walked, None);
            let owner = ring
                .members()
                .iter()
                .position(|m| Arc::ptr_eq(&m.endpoint.0, &first.0))
                .unwrap();
            // Take it out: the same key goes to the next distinct endpoint
            // on the ring, and back when it returns.
            ring.members()[owner]
                .endpoint
                .0
                .1
                .store(false, Ordering::Relaxed);
            let (next, walked) = ring.pick(hash, |_| false).unwrap();
            assert!(!Arc::ptr_eq(&next.0, &first.0));
            assert_eq!(walked, Some(Walked::NotInRotation));
            ring.members()[owner]
                .endpoint
                .0
                .1
                .store(true, Ordering::Relaxed);
            assert!(Arc::ptr_eq(
                &ring.pick(hash, |_| false).unwrap().0.0,
                &first.0
            ));
        }
        for m in ring.members() {
            m.endpoint.0.1.store(false, Ordering::Relaxed);
        }
        assert!(ring.pick(1, |_| false).is_none());
    }

    #[test]
    fn bounded_load_passes_over_an_endpoint_past_its_share() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let config = config(64, 64).hash_balance_factor(1.25);
        let ring = Ring::build(
            members(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]),
            &config,
            Some(in_flight.clone()),
        );
        ring.set_weight_in_rotation(4);
        let hash = 42;
        let (first, walked) = ring.pick(hash, |_| false).unwrap();
        assert_eq!(walked, None);
        // 8 calls in flight, all on the first: its slots are ⌈⌈9 × 1.25⌉ ×
        // ¼⌉ = 3, so it is passed over.
        first.0.0.store(8, Ordering::Relaxed);
        in_flight.store(8, Ordering::Relaxed);
        let (next, walked) = ring.pick(hash, |_| false).unwrap();
        assert!(!Arc::ptr_eq(&next.0, &first.0));
        assert_eq!(walked, Some(Walked::Overloaded));
        // Under its share again (1 of 3 in flight: ⌈⌈4 × 1.25⌉ × ¼⌉ = 2
        // slots), it gets the key back.
        first.0.0.store(1, Ordering::Relaxed);
        in_flight.store(3, Ordering::Relaxed);
        assert!(Arc::ptr_eq(
            &ring.pick(hash, |_| false).unwrap().0.0,
            &first.0
        ));
    }

    #[test]
    fn a_key_is_the_header_s_values_joined_and_bad_headers_are_refused() {
        let ring = RingHash::new("X-User").unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(ring.request_hash(&headers), None);
        headers.append("x-user", "alice".parse().unwrap());
        assert_eq!(ring.request_hash(&headers), Some(xxh64(b"alice", 0)));
        headers.append("x-user", "bob".parse().unwrap());
        assert_eq!(ring.request_hash(&headers), Some(xxh64(b"alice,bob", 0)));
        assert!(
            RingHash::new("x-user-bin")
                .unwrap_err()
                .to_string()
                .contains("binary")
        );
        assert!(
            RingHash::new("bad header")
                .unwrap_err()
                .to_string()
                .contains("not a valid")
        );
        assert!(config(0, 10).validate().is_err());
        assert!(config(10, 9_000_000).validate().is_err());
        assert!(config(20, 10).validate().is_err());
        assert!(
            RingHash::new("k")
                .unwrap()
                .hash_balance_factor(0.5)
                .validate()
                .is_err()
        );
    }
}
