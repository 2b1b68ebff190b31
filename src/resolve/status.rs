//! [`ResolveStatus`]: how resolution is going.

use std::time::Instant;

use crate::Error;

/// How resolution is going.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ResolveStatus {
    /// The first lookup has not finished.
    Pending,
    /// The last lookup got an answer, possibly an empty one.
    Resolved {
        /// When that answer arrived.
        at: Instant,
    },
    /// The source said it has no more to say: the last set it gave stays
    /// for the channel's life (none, if it ended before its first).
    Ended {
        /// When it ended.
        at: Instant,
        /// Whether it gave a set before it ended.
        gave_a_set: bool,
    },
    /// Lookups are failing; the last good set is still published.
    Failing {
        /// When the first of the failed lookups ran.
        since: Instant,
        /// How many lookups failed in a row.
        attempts: u32,
        /// The latest failure.
        error: Error,
    },
}
