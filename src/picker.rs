//! The picker: round robin over the SERVING endpoints of a snapshot.
//!
//! The balancer task publishes a [`Snapshot`] whenever an endpoint's state
//! or the endpoint set changes. The request path loads it through
//! [`ArcSwap`], which takes no lock the background tasks hold, and picks in
//! O(1): one atomic add, and one index into the list. Only when the picked
//! endpoint's connections have just closed (a GOAWAY not yet published)
//! does it look at the next ones. The picker chooses endpoints, not
//! connections: an endpoint with extra connections gets no more calls.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::subchannel::Pool;

/// Something a call can be routed to.
pub(crate) trait Candidate: Clone {
    /// Whether it can take a new call right now.
    fn can_take_call(&self) -> bool;
}

impl Candidate for Arc<Pool> {
    fn can_take_call(&self) -> bool {
        self.is_ready()
    }
}

/// What the request path sees: the endpoints calls may go to, and a
/// summary of every endpoint for error messages.
#[derive(Debug)]
pub(crate) struct Snapshot<T = Arc<Pool>> {
    /// The serving endpoints, in address order.
    pub(crate) ready: Vec<T>,
    /// "3 endpoints: 2 NOT_SERVING, 1 connect refused".
    pub(crate) summary: String,
}

impl Snapshot {
    /// Summarises endpoint state labels: counts per label, most frequent
    /// first.
    pub(crate) fn summarize<'a>(
        labels: impl Iterator<Item = &'a str>,
        note: Option<&str>,
    ) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        let mut total = 0;
        for label in labels {
            total += 1;
            match counts.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => counts.push((label, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut out = format!("{total} endpoint{}", if total == 1 { "" } else { "s" });
        for (i, (label, n)) in counts.iter().enumerate() {
            out.push_str(if i == 0 { ": " } else { ", " });
            let _ = write!(out, "{n} {label}");
        }
        if let Some(note) = note {
            let _ = write!(out, " ({note})");
        }
        out
    }
}

/// The picker state one `LbChannel` and its clones share.
#[derive(Debug)]
pub(crate) struct Picker<T = Arc<Pool>> {
    snapshot: ArcSwap<Snapshot<T>>,
    /// Bumped after every publish, to wake calls waiting for an endpoint.
    published: watch::Sender<u64>,
    next: AtomicUsize,
}

impl<T: Candidate> Picker<T> {
    /// A picker starting at a random offset, so that many clients don't all
    /// begin with the same endpoint.
    pub(crate) fn new(summary: String) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                ready: Vec::new(),
                summary,
            }),
            published: watch::channel(0).0,
            next: AtomicUsize::new(rand::random_range(0..usize::MAX / 2)),
        }
    }

    pub(crate) fn publish(&self, snapshot: Snapshot<T>) {
        self.snapshot.store(Arc::new(snapshot));
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The next serving endpoint that can take a call, if any.
    pub(crate) fn pick(&self) -> Option<T> {
        let snapshot = self.snapshot.load();
        let n = snapshot.ready.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let candidate = &snapshot.ready[start.wrapping_add(i) % n];
            if candidate.can_take_call() {
                if i > 0 {
                    // Skip the closed ones next time too.
                    self.next.fetch_add(i, Ordering::Relaxed);
                }
                tracing::trace!(index = start.wrapping_add(i) % n, of = n, "picked");
                return Some(candidate.clone());
            }
        }
        None
    }

    /// The summary of the current snapshot.
    pub(crate) fn summary(&self) -> String {
        self.snapshot.load().summary.clone()
    }

    /// Wakes on every publish from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }
}

/// The picker behind a generic service, so benchmarks can measure the
/// request path's routing cost against no-op endpoints. Not part of the API.
#[cfg(feature = "internals")]
pub(crate) mod bench {
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use super::{Candidate, Picker, Snapshot};

    #[derive(Clone)]
    struct Ready<S>(S);

    impl<S: Clone> Candidate for Ready<S> {
        fn can_take_call(&self) -> bool {
            true
        }
    }

    /// Round robin over `services` through healthlb's picker, with
    /// `poll_ready` picking and `call` using the pick, as `LbChannel` does.
    #[allow(missing_debug_implementations)]
    pub struct RoundRobin<S> {
        picker: Arc<Picker<Ready<S>>>,
        picked: Option<Ready<S>>,
        first: Ready<S>,
    }

    impl<S: Clone> RoundRobin<S> {
        /// A picker over `services`, all SERVING; `None` if there are none.
        pub fn new(services: Vec<S>) -> Option<Self> {
            let first = Ready(services.first()?.clone());
            let picker = Picker::new(String::new());
            picker.publish(Snapshot {
                ready: services.into_iter().map(Ready).collect(),
                summary: String::new(),
            });
            Some(Self {
                picker: Arc::new(picker),
                picked: None,
                first,
            })
        }
    }

    impl<S, R> tower::Service<R> for RoundRobin<S>
    where
        S: tower::Service<R> + Clone,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.picked = self.picker.pick();
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: R) -> S::Future {
            // Without a poll_ready first, the first service takes it.
            let mut service = self.picked.take().unwrap_or_else(|| self.first.clone());
            service.0.call(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_count_labels() {
        let labels = ["NOT_SERVING", "connect refused", "NOT_SERVING"];
        assert_eq!(
            Snapshot::summarize(labels.into_iter(), None),
            "3 endpoints: 2 NOT_SERVING, 1 connect refused"
        );
        assert_eq!(
            Snapshot::summarize(std::iter::empty(), Some("DNS returned no address")),
            "0 endpoints (DNS returned no address)"
        );
        assert_eq!(
            Snapshot::summarize(["SERVING"].into_iter(), None),
            "1 endpoint: 1 SERVING"
        );
    }
}
