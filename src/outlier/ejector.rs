//! The ejector: the detector run in the balancer task. It reads the
//! endpoints' counters when one reaches its failures in a row and at each
//! interval, ejects and returns endpoints, logs and counts each, and
//! publishes the ejections in force.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::config::OutlierDetection;
use super::counters::{CodeSet, Judge, Outcomes};
use super::detector::{Counts, Detector, Ejection};
use super::ejections::{Ejected, Ejections};

/// Outlier ejection for one channel.
#[derive(Debug)]
pub(crate) struct Ejector {
    target: Arc<str>,
    telemetry: crate::telemetry::Telemetry,
    /// `None` with outlier ejection off: nothing is ever ejected.
    detector: Option<Detector>,
    /// Told by the counters when an endpoint reaches its failures in a row.
    failing: Arc<Notify>,
    next_interval: Option<Instant>,
    /// What status and metrics read.
    published: Arc<Ejections>,
}

// === impl Ejector ===

impl Ejector {
    pub(crate) fn new(
        target: Arc<str>,
        config: Option<OutlierDetection>,
        telemetry: crate::telemetry::Telemetry,
    ) -> Self {
        Self {
            target,
            telemetry,
            next_interval: config
                .as_ref()
                .map(|o| Instant::now() + crate::deadline::capped(o.interval)),
            detector: config.map(Detector::new),
            failing: Arc::new(Notify::new()),
            published: Arc::new(Ejections::default()),
        }
    }

    /// How each endpoint's calls are judged: the codes that count as
    /// failures, and the failures in a row that wake the ejector.
    pub(crate) fn judge(&self) -> Judge {
        let config = self.detector.as_ref().map(Detector::config);
        Judge {
            failures: config.map_or(CodeSet::SERVER_ERRORS, OutlierDetection::codes),
            consecutive: config
                .and_then(|o| o.consecutive_failures)
                .map_or(0, |c| c.threshold),
            notify: Some(self.failing.clone()),
        }
    }

    /// The ejections in force, as published.
    pub(crate) fn published(&self) -> Arc<Ejections> {
        self.published.clone()
    }

    /// Ready when an endpoint reached its failures in a row.
    pub(crate) async fn failing(&self) {
        self.failing.notified().await;
    }

    /// When the ejector next has work: an interval, or an ejection's end.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let returns = self.detector.as_ref().and_then(Detector::next_return);
        [self.next_interval, returns].into_iter().flatten().min()
    }

    pub(crate) fn is_ejected(&self, addr: &SocketAddr) -> bool {
        self.detector.as_ref().is_some_and(|d| d.is_ejected(addr))
    }

    /// Keeps state only for the endpoints there are.
    pub(crate) fn retain(&mut self, addrs: impl Iterator<Item = SocketAddr>) {
        if let Some(detector) = self.detector.as_mut() {
            detector.retain(addrs);
        }
    }

    /// Consecutive-failure ejection: at once, not at the next interval.
    /// Whether any endpoint was ejected.
    pub(crate) fn on_failing<'a>(
        &mut self,
        endpoints: impl Iterator<Item = (SocketAddr, &'a Outcomes)>,
    ) -> bool {
        let Some(detector) = self.detector.as_mut() else {
            return false;
        };
        let counts: Vec<(SocketAddr, u32)> = endpoints
            .map(|(a, o)| (a, o.consecutive_failures()))
            .collect();
        let ejected = detector.on_failures(Instant::now(), &counts);
        self.apply(ejected)
    }

    /// Returns endpoints whose ejection is over, and runs A50's interval
    /// when it is due. Whether any endpoint returned or was ejected.
    pub(crate) fn on_timer<'a>(
        &mut self,
        endpoints: impl Iterator<Item = (SocketAddr, &'a Outcomes)>,
    ) -> bool {
        let now = Instant::now();
        let Some(detector) = self.detector.as_mut() else {
            return false;
        };
        let endpoints: BTreeMap<SocketAddr, &Outcomes> = endpoints.collect();
        let mut changed = false;
        for addr in detector.returns(now) {
            changed = true;
            if let Some(outcomes) = endpoints.get(&addr) {
                outcomes.reset();
            }
            info!(target = %self.target, endpoint = %addr, "an ejected endpoint returns to rotation");
        }
        let mut ejected = Vec::new();
        if self.next_interval.is_some_and(|at| at <= now) {
            let interval = crate::deadline::capped(detector.config().interval);
            self.next_interval = Some(now + interval);
            let counts: Vec<(SocketAddr, Counts)> = endpoints
                .iter()
                .map(|(a, outcomes)| {
                    let (successes, failures) = outcomes.take_counts();
                    let consecutive = outcomes.consecutive_failures();
                    (
                        *a,
                        Counts {
                            successes,
                            failures,
                            consecutive,
                        },
                    )
                })
                .collect();
            ejected = detector.on_interval(now, &counts);
            // Failures in a row that could not eject before (the cap) may now.
            let consecutive: Vec<_> = counts.iter().map(|(a, c)| (*a, c.consecutive)).collect();
            ejected.extend(detector.on_failures(now, &consecutive));
        }
        let ejected = self.apply(ejected);
        if changed && !ejected {
            self.publish();
        }
        changed || ejected
    }

    /// Logs and counts each ejection, and publishes the record. Whether
    /// any endpoint was ejected.
    fn apply(&mut self, ejected: Vec<Ejection>) -> bool {
        if ejected.is_empty() {
            return false;
        }
        for e in &ejected {
            let length = e.until.saturating_duration_since(Instant::now());
            warn!(
                target = %self.target,
                endpoint = %e.addr,
                reason = e.reason.label(),
                figure = e.figure,
                bar = e.bar,
                ejected_for = ?length,
                "an endpoint is ejected as an outlier"
            );
            crate::metrics::ejection(&self.target, e.addr, e.reason.label());
            self.telemetry.ejection(e.reason.label());
        }
        self.publish();
        true
    }

    /// Publishes the detector's ejections as the record others read.
    fn publish(&self) {
        let Some(detector) = self.detector.as_ref() else {
            return;
        };
        let now = Instant::now();
        let std_now = std::time::Instant::now();
        let current = detector
            .ejections()
            .map(|(addr, until, reason)| {
                let left = until.saturating_duration_since(now);
                let ejected = Ejected {
                    until: std_now + left,
                    reason: reason.label(),
                };
                (addr, ejected)
            })
            .collect();
        self.published.publish(current);
    }
}
