//! The ejections in force, as the ejector last published them: the one
//! record of who is ejected, until when and why, that status and metrics
//! read. The detector decides; this is what it decided.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// One endpoint's ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ejected {
    /// When it ends.
    pub(crate) until: Instant,
    /// Why: `consecutive_failures`, `success_rate` or `failure_percentage`.
    pub(crate) reason: &'static str,
}

impl Ejected {
    /// How long it still lasts at `now`; `None` once over.
    pub(crate) fn left(&self, now: Instant) -> Option<Duration> {
        Some(self.until.saturating_duration_since(now)).filter(|d| !d.is_zero())
    }
}

/// The ejections in force, by address; read without a lock.
#[derive(Debug, Default)]
pub(crate) struct Ejections {
    current: ArcSwap<BTreeMap<SocketAddr, Ejected>>,
}

// === impl Ejections ===

impl Ejections {
    /// `addr`'s ejection, if it is ejected.
    pub(crate) fn get(&self, addr: &SocketAddr) -> Option<Ejected> {
        self.current.load().get(addr).copied()
    }

    /// Replaces the whole record: only the ejector writes it.
    pub(super) fn publish(&self, current: BTreeMap<SocketAddr, Ejected>) {
        self.current.store(Arc::new(current));
    }
}
