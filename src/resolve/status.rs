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

/// How a channel's resolution is going, with what came before: what
/// [`LbChannel::resolution`](crate::LbChannel::resolution) and
/// [`Resolver::resolution`](super::Resolver::resolution) return, and what
/// the channel's `Display` prints.
///
/// ```text
/// dns:///echo.prod.svc.cluster.local:50051: resolved 1.2s ago, 3 endpoints, the set last changed 40.0s ago
/// registry:echo: failing for 3.5s (4 attempts): resolving "registry:echo" failed: the registry answered 503, 0 endpoints
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Resolution {
    /// The target, or the source's name.
    pub target: std::sync::Arc<str>,
    /// How the last lookup went.
    pub status: ResolveStatus,
    /// Endpoints in the set the channel balances over now (after
    /// `max_endpoints` and subsetting).
    pub endpoints: usize,
    /// When the set last changed; `None` before the first set.
    pub last_change: Option<Instant>,
    /// The last failure and when it came; kept after a recovery, so a
    /// flapping registry shows.
    pub last_error: Option<(Error, Instant)>,
}

impl Resolution {
    pub(crate) fn new(target: std::sync::Arc<str>) -> Self {
        Self {
            target,
            status: ResolveStatus::Pending,
            endpoints: 0,
            last_change: None,
            last_error: None,
        }
    }

    /// Whether lookups are failing with nothing to offer: the channel is in
    /// TRANSIENT_FAILURE, and a call that is not wait-for-ready fails at
    /// once with the reason.
    pub fn is_failing_empty(&self) -> bool {
        self.endpoints == 0
            && matches!(
                self.status,
                ResolveStatus::Failing { .. }
                    | ResolveStatus::Ended {
                        gave_a_set: false,
                        ..
                    }
            )
    }
}

/// `d` rounded for people: "1.2s", "40.0s", "3m 5s".
fn ago(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
    }
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.target)?;
        match &self.status {
            ResolveStatus::Pending => f.write_str("the first resolution has not finished")?,
            ResolveStatus::Resolved { at } => write!(f, "resolved {} ago", ago(at.elapsed()))?,
            ResolveStatus::Ended { at, gave_a_set } => {
                write!(f, "the endpoint source ended {} ago", ago(at.elapsed()))?;
                if !gave_a_set {
                    f.write_str(" before giving any endpoints")?;
                }
            }
            ResolveStatus::Failing {
                since,
                attempts,
                error,
            } => write!(
                f,
                "failing for {} ({attempts} attempt{}): {error}",
                ago(since.elapsed()),
                if *attempts == 1 { "" } else { "s" }
            )?,
        }
        let s = if self.endpoints == 1 { "" } else { "s" };
        write!(f, ", {} endpoint{s}", self.endpoints)?;
        if let Some(changed) = self.last_change {
            write!(f, ", the set last changed {} ago", ago(changed.elapsed()))?;
        }
        if !matches!(self.status, ResolveStatus::Failing { .. })
            && let Some((error, at)) = &self.last_error
        {
            write!(f, "; last failure {} ago: {error}", ago(at.elapsed()))?;
        }
        Ok(())
    }
}
