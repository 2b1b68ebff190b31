//! Sampling for the policies that choose among a few endpoints at random:
//! a per-thread random source, and power of `choices` random choices.

use std::cell::Cell;

use crate::load::Candidate;

thread_local! {
    static RNG: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
}

/// A random index below `n`: xorshift64*, per thread, so picks share no
/// cache line.
pub(super) fn random_below(n: usize) -> usize {
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
pub(super) fn random_fraction() -> f64 {
    random_below(1 << 24) as f64 / f64::from(1u32 << 24)
}

/// Power of `choices` random choices (gRFC A48, Linkerd's P2C): the index,
/// among that many distinct random samples of `ready` that can take a
/// call, of the lowest `cost / weight`. Distinct, unlike A48's: two draws
/// of the same slow endpoint would send it a call in `1 / n²` of picks.
pub(super) fn best_of<T: Candidate>(
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
