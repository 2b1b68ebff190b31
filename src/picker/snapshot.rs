//! What the picker picks from: the endpoints calls may go to, as the
//! balancer last published them, and a summary of every endpoint for
//! error messages.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use crate::subchannel::Pool;

/// What the request path sees: the endpoints calls may go to, and a
/// summary of every endpoint for error messages.
#[derive(Debug)]
pub(crate) struct Snapshot<T = Arc<Pool>> {
    /// The endpoints calls may go to, in address order.
    pub(crate) ready: Vec<T>,
    /// When each became SERVING, for slow start; empty without it.
    pub(crate) since: Vec<Instant>,
    /// Zone-aware routing's runs of `ready`, each with its share of
    /// calls; empty when calls go to any of `ready` alike.
    pub(crate) groups: Vec<Group>,
    /// "3 endpoints: 2 NOT_SERVING, 1 connect refused".
    pub(crate) summary: String,
    /// Where `summary`'s closing note (why there is nothing) begins; its
    /// length when there is none.
    pub(crate) note_at: usize,
    /// Why the channel is in TRANSIENT_FAILURE, if it is: resolution
    /// failed with nothing to offer. A call that is not wait-for-ready
    /// fails at once with it.
    pub(crate) failing: Option<Arc<str>>,
    /// The first set has settled: resolved, and no endpoint of it still
    /// connecting (each SERVING, not serving, or failed to connect).
    pub(crate) settled: bool,
    /// Set by [`Picker::publish`](super::Picker::publish): which publish
    /// this is, so weighted round robin's schedules match their snapshot.
    pub(crate) generation: u64,
}

/// A run of a snapshot's `ready`, and the share of calls up to its end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Group {
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The cumulative share: a call whose random draw is below it, and
    /// above the previous group's, goes here.
    pub(crate) upto: f64,
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
