//! An endpoint's latency estimate: a peak-sensitive moving average of its
//! time to response headers (Linkerd's, Finagle's), kept in atomics the
//! request path writes and the picker reads.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How fast an estimate forgets by default.
pub(crate) const DEFAULT_DECAY: Duration = crate::defaults::PEAK_EWMA_DECAY;

/// One endpoint's estimate.
#[derive(Debug)]
pub(crate) struct Ewma {
    decay: Duration,
    /// The estimate in ns, as f64 bits; 0 until the first answer.
    ewma: AtomicU64,
    /// When it was last updated, in ns since [`epoch`].
    at: AtomicU64,
}

impl Default for Ewma {
    fn default() -> Self {
        Self::new(DEFAULT_DECAY)
    }
}

/// The process's reference instant for the atomics' timestamps.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub(crate) fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

// === impl Ewma ===

impl Ewma {
    pub(crate) fn new(decay: Duration) -> Self {
        Self {
            decay,
            ewma: AtomicU64::new(0),
            at: AtomicU64::new(0),
        }
    }

    /// Records how long a call took to its response headers: a slower
    /// answer replaces the estimate at once, a faster one pulls it down
    /// over the decay time. `sent_at` is when the call left; one clock read
    /// serves for both the latency and the estimate's timestamp.
    pub(crate) fn observe(&self, sent_at: Instant) {
        let received = Instant::now();
        let rtt = received.saturating_duration_since(sent_at).as_nanos() as f64;
        let now = u64::try_from(received.saturating_duration_since(epoch()).as_nanos())
            .unwrap_or(u64::MAX);
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let at = self.at.load(Ordering::Relaxed);
        let next = if rtt > prev || at == 0 {
            rtt
        } else {
            let w = self.weight(now.saturating_sub(at));
            prev * w + rtt * (1.0 - w)
        };
        // Racing writers lose an observation, never corrupt one.
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now.max(1), Ordering::Relaxed);
    }

    /// How much of an estimate `elapsed_ns` old is left.
    fn weight(&self, elapsed_ns: u64) -> f64 {
        let decay = self.decay.as_nanos().max(1) as f64;
        (-(elapsed_ns as f64) / decay).exp()
    }

    /// The estimate at `now` (ns since the epoch), decayed towards zero
    /// since its last update, so an endpoint not tried for a while is tried
    /// again; `None` before the first answer.
    pub(crate) fn latency_ns(&self, now: u64) -> Option<f64> {
        let at = self.at.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        Some(ewma * self.weight(now.saturating_sub(at)))
    }

    /// The estimate now, for status.
    pub(crate) fn latency(&self) -> Option<Duration> {
        self.latency_ns(now_ns())
            .map(|ns| Duration::from_nanos(ns.clamp(0.0, u64::MAX as f64) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_takes_peaks_at_once_and_decays() {
        let ewma = Ewma::default();
        assert_eq!(ewma.latency(), None);
        let now = Instant::now();
        ewma.observe(now - Duration::from_millis(1));
        ewma.observe(now - Duration::from_millis(50));
        let now = now_ns();
        let at_once = ewma.latency_ns(now).unwrap();
        assert!(at_once > 49e6, "{at_once}");
        // One decay time later, about e^-1 of it is left.
        let later = ewma.latency_ns(now + 10_000_000_000).unwrap();
        assert!((later / at_once - (-1f64).exp()).abs() < 0.01, "{later}");
    }
}
