//! Endpoints and the normalised sets the resolver publishes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::sync::Arc;

/// One address the balancer may connect to, with what its source said
/// about it: the name it was found under, its zone and its weight. DNS
/// gives none of these but the name; SRV records give a weight; an
/// [`EndpointSource`](super::EndpointSource) may give any.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    addr: SocketAddr,
    hostname: Option<Arc<str>>,
    zone: Option<Arc<str>>,
    /// The zones it should serve (EndpointSlice `hints.forZones`).
    for_zones: Option<Arc<[Arc<str>]>>,
    priority: Option<u16>,
    weight: Option<u16>,
    /// Its place on a hash ring, when not its address (gRFC A76).
    hash_key: Option<Arc<str>>,
}

// === impl Endpoint ===

impl Endpoint {
    /// An endpoint known only by its address.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            hostname: None,
            zone: None,
            for_zones: None,
            priority: None,
            weight: None,
            hash_key: None,
        }
    }

    /// The name it was found under.
    pub fn with_hostname(mut self, hostname: impl Into<Arc<str>>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// The zone it runs in, such as a Kubernetes node's
    /// `topology.kubernetes.io/zone`.
    pub fn with_zone(mut self, zone: impl Into<Arc<str>>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The zones whose clients it should serve, as an EndpointSlice's
    /// `hints.forZones` says. When every endpoint carries hints, a client
    /// with a zone calls only the endpoints hinted for it (as kube-proxy
    /// does), and all of them when none is.
    pub fn with_zone_hints<Z: Into<Arc<str>>>(
        mut self,
        zones: impl IntoIterator<Item = Z>,
    ) -> Self {
        self.for_zones = Some(zones.into_iter().map(Into::into).collect());
        self
    }

    /// Its weight relative to the others, as SRV records and service
    /// registries give it.
    pub fn with_weight(mut self, weight: u16) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Its hash key for ring hash (gRFC A76's `hash_key` attribute): where
    /// it sits on the ring. Default: its address. A stable name (a
    /// StatefulSet pod's) keeps its keys on it when its address changes.
    pub fn with_hash_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.hash_key = Some(key.into());
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

    /// The zone it runs in, where its source knows it; `None` for DNS.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The zones it should serve, if its source gave hints.
    pub fn zone_hints(&self) -> Option<&[Arc<str>]> {
        self.for_zones.as_deref()
    }

    pub(crate) fn zone_arc(&self) -> Option<Arc<str>> {
        self.zone.clone()
    }

    pub(crate) fn hints_arc(&self) -> Option<Arc<[Arc<str>]>> {
        self.for_zones.clone()
    }

    /// The SRV priority, for endpoints found through SRV.
    pub fn priority(&self) -> Option<u16> {
        self.priority
    }

    /// Its weight: the SRV weight, or what its source gave.
    pub fn weight(&self) -> Option<u16> {
        self.weight
    }

    /// Its hash key for ring hash, if its source gave one.
    pub fn hash_key(&self) -> Option<&str> {
        self.hash_key.as_deref()
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
        let dropped = keep_ranked(&mut list, cap, seed, |e| addr_key(e.addr));
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
pub(crate) fn keep_ranked<T>(
    list: &mut Vec<T>,
    cap: usize,
    seed: u64,
    key: impl Fn(&T) -> Vec<u8>,
) -> usize {
    if list.len() <= cap {
        return 0;
    }
    let dropped = list.len() - cap;
    if cap > 0 {
        list.select_nth_unstable_by_key(cap - 1, |item| std::cmp::Reverse(rank(seed, &key(item))));
    }
    list.truncate(cap);
    dropped
}

/// An address as rendezvous hashing sees it: the IP's octets (4 or 16),
/// then the port, big-endian.
pub(crate) fn addr_key(addr: SocketAddr) -> Vec<u8> {
    let mut key = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    key.extend_from_slice(&addr.port().to_be_bytes());
    key
}

/// The score of `key` under `seed` in rendezvous hashing: 64-bit FNV-1a
/// over the seed's 8 little-endian bytes and then the key's bytes, finished
/// with SplitMix64's mixer so that keys differing in one byte land far
/// apart. It is fixed here, not left to `std`'s hasher, whose output may
/// change between Rust releases: a given seed keeps the same subset across
/// builds, platforms and versions.
pub(crate) fn rank(seed: u64, key: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &byte in seed.to_le_bytes().iter().chain(key) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // SplitMix64's finalizer.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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

    #[test]
    fn a_subset_moves_only_the_slots_it_must() {
        let all: Vec<Endpoint> = (0..1000).map(ep).collect();
        let subset = |list: &[Endpoint]| Endpoints::normalize(list.to_vec(), 20, 42).0;
        let before = subset(&all);
        let moved = |after: &Endpoints| after.iter().filter(|e| !before.contains(e.addr())).count();

        // A pod of the subset leaves: one other takes its place.
        let gone = before[5].addr();
        let after = subset(
            &all.iter()
                .filter(|e| e.addr() != gone)
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert_eq!((after.len(), moved(&after)), (20, 1));
        // A pod outside it leaves: nothing moves.
        let outside = all
            .iter()
            .find(|e| !before.contains(e.addr()))
            .unwrap()
            .addr();
        let after = subset(
            &all.iter()
                .filter(|e| e.addr() != outside)
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert_eq!(after, before);
        // Pods arrive: each displaces at most one.
        let mut more = all.clone();
        more.extend((1000..1100).map(ep));
        let after = subset(&more);
        assert!(moved(&after) <= 100 * 20 / 1100 + 5, "{}", moved(&after));
        // Fewer pods than the subset: all of them.
        assert_eq!(subset(&all[..7]).len(), 7);
    }

    /// The hash is fixed: these values must never change, or every client's
    /// subset moves on upgrade.
    #[test]
    fn the_rank_is_a_fixed_function() {
        // Computed by an independent implementation of the doc comment.
        assert_eq!(rank(0, b""), 0x813f_0174_a236_7c13);
        assert_eq!(rank(7, &addr_key(ep(1).addr())), 0xbe57_7763_96e4_d4c9);
        let v6: SocketAddr = "[fd00::1]:50051".parse().unwrap();
        assert_eq!(rank(u64::MAX, &addr_key(v6)), 0xf252_6b58_26ec_2976);
        let (kept, _) = Endpoints::normalize((0..10).map(ep).collect(), 3, 7);
        let kept: Vec<String> = kept.iter().map(|e| e.addr().to_string()).collect();
        assert_eq!(kept, ["10.0.0.0:80", "10.0.0.1:80", "10.0.0.3:80"]);
    }

    #[test]
    fn ranks_spread_evenly() {
        // Each of 10 endpoints should top about a tenth of 10,000 seeds.
        let endpoints: Vec<Vec<u8>> = (0..10).map(|i| addr_key(ep(i).addr())).collect();
        let mut wins = [0u32; 10];
        for seed in 0..10_000u64 {
            let best = (0..10).max_by_key(|&i| rank(seed, &endpoints[i])).unwrap();
            wins[best] += 1;
        }
        assert!(wins.iter().all(|&w| (850..=1150).contains(&w)), "{wins:?}");
    }
}
