//! Endpoints and the normalised sets the resolver publishes.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

/// One address the balancer may connect to, with what DNS said about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    addr: SocketAddr,
    hostname: Option<Arc<str>>,
    priority: Option<u16>,
    weight: Option<u16>,
}

// === impl Endpoint ===

impl Endpoint {
    /// An endpoint known only by its address.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            hostname: None,
            priority: None,
            weight: None,
        }
    }

    pub(crate) fn with_hostname(mut self, hostname: Arc<str>) -> Self {
        self.hostname = Some(hostname);
        self
    }

    pub(crate) fn with_srv(mut self, priority: u16, weight: u16) -> Self {
        self.priority = Some(priority);
        self.weight = Some(weight);
        self
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name this address was found under: the `dns:` host, or the SRV
    /// record's target. `None` for fixed lists.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }

    /// The SRV priority, for endpoints found through SRV.
    pub fn priority(&self) -> Option<u16> {
        self.priority
    }

    /// The SRV weight, for endpoints found through SRV.
    pub fn weight(&self) -> Option<u16> {
        self.weight
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.hostname {
            Some(host) => write!(f, "{} ({host})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A resolved endpoint set: sorted by address, one entry per address.
/// Cloning shares it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints(Arc<[Endpoint]>);

// === impl Endpoints ===

impl Endpoints {
    /// Sorts, removes duplicate addresses, and keeps at most `cap` endpoints.
    ///
    /// Past the cap it keeps the `cap` endpoints that rank highest under a hash
    /// seeded with `seed` (rendezvous hashing). The subset is stable: the same
    /// answer gives the same subset, and an endpoint leaves it only when it
    /// leaves DNS or a higher-ranked one arrives, so refreshes don't churn
    /// connections. Clients with different seeds keep different subsets, so a
    /// large service's load still spreads over all its pods.
    ///
    /// Returns the set and how many distinct endpoints the cap dropped.
    pub(crate) fn normalize(mut list: Vec<Endpoint>, cap: usize, seed: u64) -> (Self, usize) {
        list.sort_unstable();
        list.dedup_by_key(|e| e.addr);
        let dropped = keep_ranked(&mut list, cap, seed, |e| e.addr);
        if dropped > 0 {
            list.sort_unstable();
        }
        (Self(list.into()), dropped)
    }

    /// The endpoints, in address order.
    pub fn as_slice(&self) -> &[Endpoint] {
        &self.0
    }

    /// Whether `addr` is in the set.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.binary_search_by_key(&addr, |e| e.addr).is_ok()
    }
}

impl Deref for Endpoints {
    type Target = [Endpoint];

    fn deref(&self) -> &[Endpoint] {
        &self.0
    }
}

impl From<Vec<Endpoint>> for Endpoints {
    /// Normalises the list without a cap.
    fn from(list: Vec<Endpoint>) -> Self {
        Self::normalize(list, usize::MAX, 0).0
    }
}

/// Keeps the `cap` items of `list` whose `key` ranks highest under `seed`;
/// returns how many it removed. Linear time.
pub(crate) fn keep_ranked<T, K: Hash>(
    list: &mut Vec<T>,
    cap: usize,
    seed: u64,
    key: impl Fn(&T) -> K,
) -> usize {
    if list.len() <= cap {
        return 0;
    }
    let dropped = list.len() - cap;
    let rank = |item: &T| {
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        key(item).hash(&mut h);
        std::cmp::Reverse(h.finish())
    };
    if cap > 0 {
        list.select_nth_unstable_by_key(cap - 1, rank);
    }
    list.truncate(cap);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u32) -> Endpoint {
        Endpoint::new(SocketAddr::from((
            [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            80,
        )))
    }

    #[test]
    fn sorted_and_unique() {
        let list = vec![ep(3), ep(1), ep(2), ep(1), ep(3)];
        let (set, dropped) = Endpoints::normalize(list, 10, 0);
        assert_eq!(dropped, 0);
        let addrs: Vec<_> = set.iter().map(|e| e.addr()).collect();
        assert_eq!(addrs, vec![ep(1).addr(), ep(2).addr(), ep(3).addr()]);
    }

    #[test]
    fn cap_keeps_a_stable_subset() {
        let all: Vec<Endpoint> = (0..5000).map(ep).collect();
        let (a, dropped) = Endpoints::normalize(all.clone(), 1024, 7);
        assert_eq!((a.len(), dropped), (1024, 5000 - 1024));
        assert!(a.windows(2).all(|w| w[0].addr() < w[1].addr()));

        // Same input in another order: same subset.
        let mut shuffled = all.clone();
        shuffled.reverse();
        assert_eq!(Endpoints::normalize(shuffled, 1024, 7).0, a);

        // One endpoint leaves DNS: at most one other enters.
        let kept = a[0].addr();
        let fewer: Vec<Endpoint> = all.iter().filter(|e| e.addr() != kept).cloned().collect();
        let (b, _) = Endpoints::normalize(fewer, 1024, 7);
        let changed = b.iter().filter(|e| !a.contains(e.addr())).count();
        assert_eq!(changed, 1);

        // Another seed keeps a different subset.
        assert_ne!(Endpoints::normalize(all, 1024, 8).0, a);
    }
}
