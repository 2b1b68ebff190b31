//! Ring hash's ring (gRFC A42), built by the balancer off the request
//! path: over every endpoint of the resolved set, SERVING or not, so a key
//! returns to its endpoint when it does; and, for bounded load, the weight
//! in rotation after each publish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tracing::debug;

use crate::picker::{Member, Picker, Policy, Ring};
use crate::resolve::Endpoints;
use crate::subchannel::Subchannel;

/// The picker of a channel whose policy is ring hash, with its settings,
/// and with bounded load, the channel's count of calls in flight.
pub(super) fn hashing(picker: Picker, policy: &Policy) -> (Picker, Option<Arc<AtomicUsize>>) {
    match policy {
        Policy::RingHash(ring) => {
            let in_flight = ring.hash_balance_factor.map(|_| Arc::default());
            (picker.hashing(ring.clone()), in_flight)
        }
        _ => (picker, None),
    }
}

/// A new ring over `set`: each endpoint placed by its hash key (its
/// address unless its source gives one) and weight.
pub(super) fn rebuild(
    picker: &Picker,
    target: &str,
    subchannels: &BTreeMap<SocketAddr, Subchannel>,
    set: &Endpoints,
    in_flight: Option<Arc<AtomicUsize>>,
) {
    let Some(config) = picker.ring_config() else {
        return;
    };
    let members = set
        .iter()
        .filter_map(|e| {
            let pool = subchannels.get(&e.addr())?.pool().clone();
            let key = e
                .hash_key()
                .map_or_else(|| e.addr().to_string(), str::to_owned);
            Some(Member {
                endpoint: pool,
                key: key.into(),
                weight: u32::from(e.weight().unwrap_or(1).max(1)),
            })
        })
        .collect();
    let ring = Ring::build(members, config, in_flight);
    debug!(
        target,
        entries = ring.len(),
        endpoints = ring.members().len(),
        "ring built"
    );
    picker.set_ring(ring);
}

/// Bounded load: the weight of the endpoints in rotation, of which each
/// one's share of the calls in flight is worked out.
pub(super) fn reshare(picker: &Picker, in_rotation: &[SocketAddr]) {
    let Some(ring) = picker.ring() else {
        return;
    };
    let weight: u64 = ring
        .members()
        .iter()
        .filter(|m| in_rotation.binary_search(&m.endpoint.addr()).is_ok())
        .map(|m| u64::from(m.weight))
        .sum();
    ring.set_weight_in_rotation(weight);
}
