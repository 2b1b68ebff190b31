//! What calls show about an endpoint: success or failure by gRPC status,
//! and failures in a row. The request path records with a few atomic
//! operations; the ejector reads them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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
    /// Consecutive failures that tell the ejector at once; 0 never.
    pub(crate) consecutive: u32,
    /// The ejector to tell.
    pub(crate) notify: Option<Arc<Notify>>,
}

impl Default for Judge {
    fn default() -> Self {
        Self {
            failures: CodeSet::SERVER_ERRORS,
            consecutive: 0,
            notify: None,
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
}
