//! What calls show about an endpoint: success or failure by gRPC status,
//! consecutive failures, and a peak-EWMA of latency. The request path
//! records with a few atomic operations; the balancer reads them to eject
//! outliers and the picker to weigh endpoints.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tonic::Code;

/// The gRPC codes that count as an endpoint's failure, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CodeSet(u32);

impl CodeSet {
    /// UNKNOWN, INTERNAL, UNAVAILABLE and DATA_LOSS: what a broken server
    /// or transport gives, never an application's answer. Transport failures
    /// read as UNAVAILABLE.
    pub(crate) const SERVER_ERRORS: CodeSet = CodeSet(
        1 << Code::Unknown as u32
            | 1 << Code::Internal as u32
            | 1 << Code::Unavailable as u32
            | 1 << Code::DataLoss as u32,
    );

    pub(crate) fn of(codes: impl IntoIterator<Item = Code>) -> Self {
        Self(codes.into_iter().fold(0, |set, c| set | 1 << (c as u32)))
    }

    pub(crate) fn contains(self, code: Code) -> bool {
        (code as u32) < 32 && self.0 & (1 << code as u32) != 0
    }

    pub(crate) fn codes(self) -> Vec<Code> {
        (0..17)
            .map(Code::from_i32)
            .filter(|c| self.contains(*c))
            .collect()
    }
}

/// How an endpoint's outcomes are judged, fixed for the channel's life.
#[derive(Debug, Clone)]
pub(crate) struct Judge {
    /// Codes that count as failures.
    pub(crate) failures: CodeSet,
    /// Consecutive failures that tell the balancer at once; 0 never.
    pub(crate) consecutive: u32,
    /// The balancer to tell.
    pub(crate) notify: Option<Arc<Notify>>,
    /// The EWMA's decay.
    pub(crate) decay: Duration,
}

impl Default for Judge {
    fn default() -> Self {
        Self {
            failures: CodeSet::SERVER_ERRORS,
            consecutive: 0,
            notify: None,
            decay: Duration::from_secs(10),
        }
    }
}

/// One endpoint's outcomes.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    judge: Judge,
    /// Since the balancer last took them (A50's interval buckets).
    successes: AtomicU64,
    failures: AtomicU64,
    consecutive: AtomicU32,
    /// The latency estimate in ns, as f64 bits; 0 until the first answer.
    ewma: AtomicU64,
    /// When it was last updated, in ns since [`epoch`].
    ewma_at: AtomicU64,
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

impl Outcomes {
    pub(crate) fn new(judge: Judge) -> Self {
        Self {
            judge,
            ..Self::default()
        }
    }

    /// Records a call's status. Cancelled calls say nothing of the endpoint
    /// and are left out.
    pub(crate) fn record(&self, code: Code) {
        if code == Code::Cancelled {
            return;
        }
        if self.judge.failures.contains(code) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
            if n == self.judge.consecutive
                && let Some(notify) = &self.judge.notify
            {
                notify.notify_one();
            }
        } else {
            self.successes.fetch_add(1, Ordering::Relaxed);
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Records how long a call took to its response headers, into a
    /// peak-sensitive EWMA: a slower answer replaces the estimate at once, a
    /// faster one pulls it down over the decay time (Linkerd's, Finagle's).
    /// `sent_at` is when the call left; one clock read serves for both the
    /// latency and the estimate's timestamp.
    pub(crate) fn observe(&self, sent_at: Instant) {
        let received = Instant::now();
        let rtt = received.saturating_duration_since(sent_at).as_nanos() as f64;
        let now = u64::try_from(received.saturating_duration_since(epoch()).as_nanos())
            .unwrap_or(u64::MAX);
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let at = self.ewma_at.load(Ordering::Relaxed);
        let next = if rtt > prev || at == 0 {
            rtt
        } else {
            let w = self.weight(now.saturating_sub(at));
            prev * w + rtt * (1.0 - w)
        };
        // Racing writers lose an observation, never corrupt one.
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now.max(1), Ordering::Relaxed);
    }

    /// How much of an estimate `elapsed_ns` old is left.
    fn weight(&self, elapsed_ns: u64) -> f64 {
        let decay = self.judge.decay.as_nanos().max(1) as f64;
        (-(elapsed_ns as f64) / decay).exp()
    }

    /// The latency estimate at `now` (ns since the epoch), decayed towards
    /// zero since its last update, so an endpoint not tried for a while is
    /// tried again; `None` before the first answer.
    pub(crate) fn latency_ns(&self, now: u64) -> Option<f64> {
        let at = self.ewma_at.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        Some(ewma * self.weight(now.saturating_sub(at)))
    }

    /// The latency estimate now, for status.
    pub(crate) fn latency(&self) -> Option<Duration> {
        self.latency_ns(now_ns())
            .map(|ns| Duration::from_nanos(ns.clamp(0.0, u64::MAX as f64) as u64))
    }

    /// Failures in a row, up to the last success.
    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// Takes the successes and failures counted since the last take.
    pub(crate) fn take_counts(&self) -> (u64, u64) {
        (
            self.successes.swap(0, Ordering::Relaxed),
            self.failures.swap(0, Ordering::Relaxed),
        )
    }

    /// Starts over, as an endpoint back from ejection does.
    pub(crate) fn reset(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.take_counts();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_only_server_errors_and_reset_on_success() {
        let notify = Arc::new(Notify::new());
        let outcomes = Outcomes::new(Judge {
            consecutive: 3,
            notify: Some(notify.clone()),
            ..Judge::default()
        });
        outcomes.record(Code::Unavailable);
        outcomes.record(Code::NotFound);
        assert_eq!(outcomes.consecutive_failures(), 0);
        outcomes.record(Code::Internal);
        outcomes.record(Code::Cancelled);
        outcomes.record(Code::Unknown);
        outcomes.record(Code::DataLoss);
        assert_eq!(outcomes.consecutive_failures(), 3);
        assert_eq!(outcomes.take_counts(), (1, 4));
        assert_eq!(outcomes.take_counts(), (0, 0));
        // The third in a row stored a wakeup for the balancer.
        let woken = futures::FutureExt::now_or_never(notify.notified());
        assert!(woken.is_some());
    }

    #[test]
    fn the_estimate_takes_peaks_at_once_and_decays() {
        let outcomes = Outcomes::default();
        assert_eq!(outcomes.latency(), None);
        let now = Instant::now();
        outcomes.observe(now - Duration::from_millis(1));
        outcomes.observe(now - Duration::from_millis(50));
        let now = now_ns();
        let at_once = outcomes.latency_ns(now).unwrap();
        assert!(at_once > 49e6, "{at_once}");
        // One decay time later, about e^-1 of it is left.
        let later = outcomes.latency_ns(now + 10_000_000_000).unwrap();
        assert!((later / at_once - (-1f64).exp()).abs() < 0.01, "{later}");
    }
}
