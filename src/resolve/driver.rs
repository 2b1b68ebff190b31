//! The task that runs one endpoint source: it asks the source for its next
//! set, publishes it normalised when it changed, and keeps the last good
//! set while the source fails.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::config::ResolveConfig;
use super::endpoint::{Endpoint, Endpoints};
use super::source::{DynSource, SourceError};
use super::status::{Resolution, ResolveStatus};
use crate::{Error, ErrorKind};

/// Where the task publishes.
pub(crate) struct Publisher {
    pub(crate) endpoints: watch::Sender<Endpoints>,
    pub(crate) status: watch::Sender<Resolution>,
}

/// An ongoing run of failures.
struct Outage {
    since: Instant,
    attempts: u32,
}

/// Runs `source` until nobody listens any more.
pub(crate) async fn run(
    target: Arc<str>,
    source: Box<dyn DynSource>,
    config: ResolveConfig,
    seed: u64,
    publisher: Publisher,
) {
    let closed = publisher.endpoints.clone();
    let driver = Driver {
        target: target.clone(),
        config,
        seed,
        publisher,
        published: false,
        capped_from: 0,
        outage: None,
    };
    tokio::select! {
        _ = closed.closed() => debug!(target = %target, "resolver stopped: nobody listens"),
        () = driver.run(source) => {}
    }
}

struct Driver {
    target: Arc<str>,
    config: ResolveConfig,
    seed: u64,
    publisher: Publisher,
    published: bool,
    /// The size of the last answer cut to `max_endpoints`, so the warning
    /// comes once per answer size.
    capped_from: usize,
    outage: Option<Outage>,
}

// === impl Driver ===

impl Driver {
    async fn run(mut self, mut source: Box<dyn DynSource>) {
        loop {
            match source.next().await {
                Some(Ok(endpoints)) => self.resolved(endpoints),
                Some(Err(error)) => self.failed(&error),
                None => {
                    debug!(target = %self.target, "the endpoint source ended; its last set stays");
                    let gave_a_set = self.published;
                    self.publisher.status.send_modify(|r| {
                        r.status = ResolveStatus::Ended {
                            at: Instant::now(),
                            gave_a_set,
                        };
                    });
                    return std::future::pending().await;
                }
            }
        }
    }

    fn resolved(&mut self, endpoints: Vec<Endpoint>) {
        self.publish(endpoints);
        if let Some(outage) = self.outage.take() {
            info!(
                target = %self.target,
                failed_rounds = outage.attempts,
                outage_ms = outage.since.elapsed().as_millis() as u64,
                endpoints = self.publisher.endpoints.borrow().len(),
                "resolution recovered"
            );
        }
        let endpoints = self.publisher.endpoints.borrow().len();
        self.publisher.status.send_modify(|r| {
            r.status = ResolveStatus::Resolved { at: Instant::now() };
            r.endpoints = endpoints;
        });
    }

    fn failed(&mut self, why: &SourceError) {
        let target = &self.target;
        let outage = self.outage.get_or_insert_with(|| {
            match self.publisher.endpoints.borrow().len() {
                0 => warn!(
                    target = %target,
                    error = %why,
                    "resolution failing, with no endpoint to keep: calls fail at once unless wait-for-ready"
                ),
                kept => warn!(
                    target = %target,
                    error = %why,
                    kept_endpoints = kept,
                    "resolution failing; keeping the last good endpoints"
                ),
            }
            Outage {
                since: Instant::now(),
                attempts: 0,
            }
        });
        outage.attempts += 1;
        let error = Error::new(
            ErrorKind::Resolve,
            Some(target.clone()),
            format!("resolving {:?} failed: {why}", &**target),
        );
        let (since, attempts) = (outage.since, outage.attempts);
        self.publisher.status.send_modify(|r| {
            r.last_error = Some((error.clone(), Instant::now()));
            r.status = ResolveStatus::Failing {
                since,
                attempts,
                error,
            };
        });
    }

    /// Publishes the set `endpoints` make, if it changed.
    fn publish(&mut self, endpoints: Vec<Endpoint>) {
        let answered = endpoints.len();
        let (set, dropped) = Endpoints::normalize(endpoints, self.config.keep(), self.seed);
        // Subsetting keeps fewer on purpose; only the cap is worth a warning.
        let capped = dropped > 0 && answered > self.config.max_endpoints;
        if capped && answered != self.capped_from {
            warn!(
                target = %self.target,
                answered,
                kept = set.len(),
                max_endpoints = self.config.max_endpoints,
                "the answer exceeds max_endpoints; keeping a stable subset"
            );
        }
        self.capped_from = if capped { answered } else { 0 };
        let first = !self.published;
        self.published = true;
        let target = &self.target;
        let changed = self.publisher.endpoints.send_if_modified(|current| {
            if !first && *current == set {
                return false;
            }
            if set.is_empty() && (first || !current.is_empty()) {
                warn!(target = %target, "the target has no endpoints; publishing the empty set");
            } else {
                let added = set.iter().filter(|e| !current.contains(e.addr())).count();
                let removed = current.iter().filter(|e| !set.contains(e.addr())).count();
                debug!(target = %target, endpoints = set.len(), added, removed, "endpoint set changed");
            }
            *current = set;
            true
        });
        if changed {
            let endpoints = self.publisher.endpoints.borrow().len();
            self.publisher.status.send_modify(|r| {
                r.endpoints = endpoints;
                r.last_change = Some(Instant::now());
            });
        }
    }
}
