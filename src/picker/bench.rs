//! The picker behind a generic service, so benchmarks can measure the
//! request path's routing cost against no-op endpoints. Not part of the API.

use std::sync::Arc;
use std::task::{Context, Poll};

use super::{Picker, Snapshot};
use crate::load::Candidate;

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
    /// Ring hash: the next call's key, a new one each call (xorshift).
    hashes: u64,
}

impl<S: Clone> Picked<S> {
    /// A picker over `services`, all SERVING; `None` if there are none.
    pub fn new(services: Vec<S>, policy: &crate::Policy) -> Option<Self> {
        let first = Ready(services.first()?.clone());
        let n = services.len();
        let picker = Picker::new(String::new(), super::Chooser::from(policy), None);
        picker.publish(Snapshot {
            ready: services.into_iter().map(Ready).collect(),
            since: Vec::new(),
            groups: Vec::new(),
            summary: String::new(),
            note_at: 0,
            failing: None,
            settled: false,
            generation: 0,
        });
        if let crate::Policy::RingHash(config) = policy {
            let members = (0..n)
                .map(|i| super::Member {
                    endpoint: Ready(first.0.clone()),
                    key: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255).into(),
                    weight: 1,
                })
                .collect();
            let ring = super::Ring::build(members, config, None);
            let picker = picker.hashing(config.clone());
            picker.set_ring(ring);
            return Some(Self {
                picker: Arc::new(picker),
                picked: None,
                first,
                hashes: 0x9E37_79B9_7F4A_7C15,
            });
        }
        if let crate::Policy::WeightedRoundRobin(_) = policy {
            // Weights 1 to 4 in turn, as reports from unlike pods would give.
            let weights: Vec<f64> = (0..n).map(|i| (i % 4 + 1) as f64).collect();
            let (schedule, _) = super::Schedule::new(0, n, &weights);
            picker.schedule(super::Schedules {
                generation: picker.current().generation,
                groups: vec![schedule],
            });
        }
        Some(Self {
            picker: Arc::new(picker),
            picked: None,
            first,
            hashes: 0,
        })
    }
}

/// Builds gRFC A42's ring over `n` endpoints of weight 1 with `config`;
/// its entries.
pub fn ring_build(n: usize, config: &crate::RingHash) -> usize {
    let members = (0..n)
        .map(|i| super::Member {
            endpoint: Ready(()),
            key: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255).into(),
            weight: 1,
        })
        .collect();
    super::Ring::build(members, config, None).len()
}

impl<S, R> tower::Service<R> for Picked<S>
where
    S: tower::Service<R> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.hashes != 0 {
            // Ring hash: what a call with a key does, a key per call.
            self.hashes ^= self.hashes << 13;
            self.hashes ^= self.hashes >> 7;
            self.hashes ^= self.hashes << 17;
            let ring = self.picker.ring();
            self.picked = ring.and_then(|r| r.pick(self.hashes, |_| false).map(|(p, _)| p.clone()));
            return Poll::Ready(Ok(()));
        }
        self.picked = self.picker.pick();
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> S::Future {
        // Without a poll_ready first, the first service takes it.
        let mut service = self.picked.take().unwrap_or_else(|| self.first.clone());
        service.0.call(request)
    }
}
