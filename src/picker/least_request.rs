//! `least_request_experimental` (gRFC A48): the fewest calls in flight
//! among `choice_count` random endpoints.

use super::Choose;
use super::sample::best_of;
use crate::load::Candidate;

#[derive(Debug, Clone, Copy)]
pub(crate) struct LeastRequest {
    /// Endpoints sampled per pick, 2 to 10.
    pub(crate) choices: usize,
}

impl Choose for LeastRequest {
    fn choose<T: Candidate>(&self, ready: &[T], weight: &impl Fn(usize) -> f64) -> Option<usize> {
        best_of(ready, self.choices, |c| c.in_flight() as f64, weight)
    }
}
