//! `round_robin`: each endpoint in turn, from a random start. It is also
//! every policy's fallback when its samples can't take a call.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::sample::random_fraction;
use crate::load::Candidate;

/// Where the next pick starts.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    next: AtomicUsize,
}

impl Default for RoundRobin {
    /// Starts at a random offset, so that many clients don't all begin
    /// with the same endpoint.
    fn default() -> Self {
        Self {
            next: AtomicUsize::new(rand::random_range(0..usize::MAX / 2)),
        }
    }
}

impl RoundRobin {
    /// The next endpoint that can take a call. While slow start ramps
    /// (`ramping`), an endpoint is skipped in proportion to its ramp, and
    /// is the answer only if no other is.
    pub(crate) fn next<T: Candidate>(
        &self,
        ready: &[T],
        ramping: bool,
        weight: &impl Fn(usize) -> f64,
    ) -> Option<usize> {
        let n = ready.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let index = start.wrapping_add(i) % n;
            if ready[index].can_take_call() {
                if ramping && random_fraction() >= weight(index) {
                    fallback.get_or_insert(index);
                    continue;
                }
                if i > 0 {
                    // Skip the closed ones next time too.
                    self.next.fetch_add(i, Ordering::Relaxed);
                }
                tracing::trace!(index, of = n, "picked");
                return Some(index);
            }
        }
        fallback
    }
}
