//! The bound on the request bytes a channel keeps for another attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes of request bodies kept for another attempt: per call, and in
/// total for one channel. grpc-go's defaults: 256 KiB and 16 MiB. A kept
/// frame counts what it holds: its data and its entry in the recording
/// ([`FRAME_COST`]), so a stream of empty frames is bounded too.
#[derive(Debug)]
pub(crate) struct RetryBuffer {
    pub(super) per_call: usize,
    pub(super) total: usize,
    pub(super) used: AtomicUsize,
}

impl RetryBuffer {
    pub(crate) fn new(per_call: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_call,
            total,
            used: AtomicUsize::new(0),
        })
    }

    /// The limits: per call, and for the channel.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.per_call, self.total)
    }

    /// Takes `n` more bytes for a call already holding `held`, if both
    /// limits allow it.
    pub(super) fn reserve(&self, held: usize, n: usize) -> bool {
        if held.saturating_add(n) > self.per_call {
            return false;
        }
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&u| u <= self.total) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    pub(super) fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Bytes held now by every call of the channel.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}
