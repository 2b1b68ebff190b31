//! `peak_ewma`, Linkerd's policy: the lower latency estimate × (calls in
//! flight + 1) of two random endpoints. The estimate itself is
//! `crate::load`'s.

use super::Choose;
use super::sample::best_of;
use crate::load::{Candidate, now_ns};

#[derive(Debug, Clone, Copy)]
pub(crate) struct PeakEwma {
    /// The estimate of an endpoint before its first answer, in ns.
    pub(crate) default_rtt_ns: f64,
}

impl Choose for PeakEwma {
    fn choose<T: Candidate>(&self, ready: &[T], weight: &impl Fn(usize) -> f64) -> Option<usize> {
        let now = now_ns();
        let cost = |c: &T| {
            let latency = c.latency_ns(now).unwrap_or(self.default_rtt_ns);
            latency * (c.in_flight() + 1) as f64
        };
        best_of(ready, 2, cost, weight)
    }
}
