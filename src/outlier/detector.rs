//! The detector: A50's state machine, one function per algorithm. Pure:
//! the ejector feeds it counts and the time, and applies what it decides.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::time::Instant;

use super::config::OutlierDetection;

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    ConsecutiveFailures,
    SuccessRate,
    FailurePercentage,
}

impl Reason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::SuccessRate => "success_rate",
            Reason::FailurePercentage => "failure_percentage",
        }
    }
}

/// One endpoint's figures for an interval, or its failures in a row.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) consecutive: u32,
}

/// An ejection decided, with the figures behind it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Ejection {
    pub(crate) addr: SocketAddr,
    pub(crate) reason: Reason,
    pub(crate) until: Instant,
    /// What was measured: failures in a row, success rate, or failure %.
    pub(crate) figure: f64,
    /// The bar it crossed.
    pub(crate) bar: f64,
}

#[derive(Debug, Default)]
struct Entry {
    /// Until when, and why, while it is ejected.
    ejected: Option<(Instant, Reason)>,
    /// Ejections in a row, less one per interval spent in rotation.
    multiplier: u32,
}

/// Outlier ejection's state machine. Pure: the balancer feeds it counts
/// and the time, and applies what it decides.
#[derive(Debug)]
pub(crate) struct Detector {
    config: OutlierDetection,
    entries: HashMap<SocketAddr, Entry>,
    /// For enforcement percentages.
    rng: u64,
}

impl Detector {
    pub(crate) fn new(config: OutlierDetection) -> Self {
        Self {
            config,
            entries: HashMap::new(),
            rng: rand::random::<u64>() | 1,
        }
    }

    /// Keeps state only for `addrs`, the endpoints there are.
    pub(crate) fn retain(&mut self, addrs: impl Iterator<Item = SocketAddr>) {
        let keep: std::collections::HashSet<_> = addrs.collect();
        self.entries.retain(|a, _| keep.contains(a));
        for a in keep {
            self.entries.entry(a).or_default();
        }
    }

    pub(crate) fn is_ejected(&self, addr: &SocketAddr) -> bool {
        self.entries.get(addr).is_some_and(|e| e.ejected.is_some())
    }

    /// Every ejection in force: the endpoint, until when, and why.
    pub(crate) fn ejections(&self) -> impl Iterator<Item = (SocketAddr, Instant, Reason)> + '_ {
        self.entries
            .iter()
            .filter_map(|(addr, e)| e.ejected.map(|(until, reason)| (*addr, until, reason)))
    }

    fn ejected_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.ejected.is_some())
            .count()
    }

    /// Whether one more may be ejected: under the percentage, or none yet.
    fn may_eject(&self) -> bool {
        let ejected = self.ejected_count();
        let total = self.entries.len().max(1);
        ejected == 0 || ejected * 100 < self.config.max_ejection_percent as usize * total
    }

    fn roll(&mut self, percent: u32) -> bool {
        // xorshift64: enforcement needs a fair coin, not a secure one.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 100) < u64::from(percent)
    }

    fn eject(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        reason: Reason,
        figure: f64,
        bar: f64,
    ) -> Option<Ejection> {
        let base = self.config.base_ejection_time;
        let max = self.config.max_ejection_time.max(base);
        let entry = self.entries.get_mut(&addr)?;
        if entry.ejected.is_some() {
            return None;
        }
        entry.multiplier = entry.multiplier.saturating_add(1);
        let length = base.saturating_mul(entry.multiplier).min(max);
        // Saturating: Duration::MAX means as long as the process lives.
        let until = now + crate::deadline::capped(length);
        entry.ejected = Some((until, reason));
        Some(Ejection {
            addr,
            reason,
            until,
            figure,
            bar,
        })
    }

    /// Consecutive-failure ejection, which acts at once: `counts` holds
    /// each endpoint's failures in a row.
    pub(crate) fn on_failures(
        &mut self,
        now: Instant,
        counts: &[(SocketAddr, u32)],
    ) -> Vec<Ejection> {
        let Some(rule) = self.config.consecutive_failures else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &(addr, n) in counts {
            if n < rule.threshold || self.is_ejected(&addr) || !self.may_eject() {
                continue;
            }
            if !self.roll(rule.enforcement_percentage) {
                continue;
            }
            out.extend(self.eject(
                now,
                addr,
                Reason::ConsecutiveFailures,
                f64::from(n),
                f64::from(rule.threshold),
            ));
        }
        out
    }

    /// One interval of A50: success-rate and failure-percentage ejection
    /// over `counts`, then the ejection counts of endpoints in rotation
    /// decay.
    pub(crate) fn on_interval(
        &mut self,
        now: Instant,
        counts: &[(SocketAddr, Counts)],
    ) -> Vec<Ejection> {
        let mut out = Vec::new();
        if let Some(rule) = self.config.success_rate {
            let rates = self.with_volume(counts, rule.request_volume, rule.minimum_hosts);
            if !rates.is_empty() {
                let n = rates.len() as f64;
                let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
                let variance = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
                let bar = mean - variance.sqrt() * (f64::from(rule.stdev_factor) / 1000.0);
                for (addr, r) in rates {
                    if r < bar && self.may_eject() && self.roll(rule.enforcement_percentage) {
                        out.extend(self.eject(now, addr, Reason::SuccessRate, r, bar));
                    }
                }
            }
        }
        if let Some(rule) = self.config.failure_percentage {
            let bar = f64::from(rule.threshold);
            for (addr, r) in self.with_volume(counts, rule.request_volume, rule.minimum_hosts) {
                let pct = 100.0 * (1.0 - r);
                if pct > bar && self.may_eject() && self.roll(rule.enforcement_percentage) {
                    out.extend(self.eject(now, addr, Reason::FailurePercentage, pct, bar));
                }
            }
        }
        for entry in self.entries.values_mut() {
            if entry.ejected.is_none() && entry.multiplier > 0 {
                entry.multiplier -= 1;
            }
        }
        out
    }

    /// The success rates of the endpoints in rotation with at least
    /// `volume` calls, if there are at least `minimum_hosts` of them; none
    /// otherwise (A50's thresholds for both algorithms).
    fn with_volume(
        &self,
        counts: &[(SocketAddr, Counts)],
        volume: u32,
        minimum_hosts: u32,
    ) -> Vec<(SocketAddr, f64)> {
        let rates: Vec<(SocketAddr, f64)> = counts
            .iter()
            .filter(|(a, c)| !self.is_ejected(a) && c.successes + c.failures >= u64::from(volume))
            .map(|(a, c)| {
                (
                    *a,
                    c.successes as f64 / (c.successes + c.failures).max(1) as f64,
                )
            })
            .collect();
        match rates.len() >= minimum_hosts.max(1) as usize {
            true => rates,
            false => Vec::new(),
        }
    }

    /// Returns the endpoints whose ejection is over.
    pub(crate) fn returns(&mut self, now: Instant) -> Vec<SocketAddr> {
        let mut back = Vec::new();
        for (addr, entry) in &mut self.entries {
            if entry.ejected.is_some_and(|(until, _)| until <= now) {
                entry.ejected = None;
                back.push(*addr);
            }
        }
        back
    }

    /// When the next ejection ends.
    pub(crate) fn next_return(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| e.ejected.map(|(until, _)| until))
            .min()
    }

    pub(crate) fn config(&self) -> &OutlierDetection {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::outlier::{ConsecutiveFailures, FailurePercentageEjection, SuccessRateEjection};

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 50051))
    }

    fn detector(config: OutlierDetection, n: u8) -> Detector {
        let mut d = Detector::new(config);
        d.retain((1..=n).map(addr));
        d
    }

    #[test]
    fn the_longest_ejection_is_the_same_from_the_builder_and_the_json() {
        // Duration::MAX from the builder became a day; A2's largest JSON
        // duration, 10,000 years. Both are "as long as the process lives".
        let now = Instant::now();
        let eject_for = |length: Duration| {
            let config = OutlierDetection::default()
                .base_ejection_time(length)
                .max_ejection_time(length);
            let mut d = detector(config, 2);
            d.on_failures(now, &[(addr(1), 5)])[0].until
        };
        let json = crate::service_config::json::parse_duration("315576000000s").unwrap();
        assert_eq!(eject_for(Duration::MAX), eject_for(json));
        assert!(eject_for(Duration::MAX) > now + Duration::from_secs(20 * 365 * 86_400));
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_the_time_doubles_on_repeat() {
        let mut d = detector(OutlierDetection::default(), 2);
        let now = Instant::now();
        assert!(d.on_failures(now, &[(addr(1), 4)]).is_empty());
        let ejected = d.on_failures(now, &[(addr(1), 5)]);
        assert_eq!(ejected.len(), 1);
        assert_eq!(ejected[0].until, now + Duration::from_secs(30));
        // One of two may be ejected, not both.
        assert!(d.on_failures(now, &[(addr(2), 9)]).is_empty());

        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(d.returns(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(d.returns(Instant::now()), vec![addr(1)]);

        // Again at once: 60 s this time.
        let now = Instant::now();
        let again = d.on_failures(now, &[(addr(1), 5)]);
        assert_eq!(again[0].until, now + Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(d.returns(Instant::now()), vec![addr(1)]);
        // Two intervals in rotation bring the count back to zero: 30 s.
        d.on_interval(Instant::now(), &[]);
        d.on_interval(Instant::now(), &[]);
        let now = Instant::now();
        assert_eq!(
            d.on_failures(now, &[(addr(1), 5)])[0].until,
            now + Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejection_time_stops_at_the_maximum() {
        let config = OutlierDetection::default().max_ejection_time(Duration::from_secs(100));
        let mut d = detector(config, 1);
        let mut lengths = Vec::new();
        for _ in 0..6 {
            let now = Instant::now();
            let e = d.on_failures(now, &[(addr(1), 5)]);
            lengths.push((e[0].until - now).as_secs());
            tokio::time::advance(e[0].until - now).await;
            d.returns(Instant::now());
        }
        assert_eq!(lengths, [30, 60, 90, 100, 100, 100]);
    }

    fn counts(successes: u64, failures: u64) -> Counts {
        Counts {
            successes,
            failures,
            consecutive: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn success_rate_ejects_the_outlier_of_enough_hosts() {
        let config = OutlierDetection::a50()
            .success_rate(SuccessRateEjection::default())
            .max_ejection_percent(50);
        let mut d = detector(config.clone(), 6);
        let mut figures: Vec<_> = (1..=5).map(|n| (addr(n), counts(100, 0))).collect();
        figures.push((addr(6), counts(50, 50)));
        let out = d.on_interval(Instant::now(), &figures);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].addr, addr(6));
        assert_eq!(out[0].reason, Reason::SuccessRate);
        assert!(out[0].figure < out[0].bar);

        // Too few requests, or too few hosts: nothing.
        let mut d = detector(config.clone(), 6);
        let mut low: Vec<_> = (1..=5).map(|n| (addr(n), counts(99, 0))).collect();
        low.push((addr(6), counts(0, 99)));
        assert!(d.on_interval(Instant::now(), &low).is_empty());
        let mut d = detector(config, 4);
        let few: Vec<_> = (1..=3)
            .map(|n| (addr(n), counts(100, 0)))
            .chain([(addr(4), counts(0, 100))])
            .collect();
        assert!(d.on_interval(Instant::now(), &few).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failure_percentage_ejects_above_the_threshold() {
        let config = OutlierDetection::a50()
            .failure_percentage(FailurePercentageEjection::new(50).minimum_hosts(2))
            .max_ejection_percent(100);
        let mut d = detector(config, 3);
        let out = d.on_interval(
            Instant::now(),
            &[
                (addr(1), counts(100, 0)),
                (addr(2), counts(40, 60)),
                (addr(3), counts(10, 90)),
            ],
        );
        let ejected: Vec<_> = out.iter().map(|e| e.addr).collect();
        assert_eq!(ejected.len(), 2);
        assert!(ejected.contains(&addr(2)) && ejected.contains(&addr(3)));
        assert!(out.iter().all(|e| e.reason == Reason::FailurePercentage));
    }

    #[tokio::test(start_paused = true)]
    async fn enforcement_zero_never_ejects_and_the_percentage_caps() {
        let config = OutlierDetection::default().consecutive_failures(ConsecutiveFailures {
            threshold: 1,
            enforcement_percentage: 0,
        });
        let mut d = detector(config, 2);
        assert!(d.on_failures(Instant::now(), &[(addr(1), 10)]).is_empty());

        // 20 % of 10: two at most.
        let config = OutlierDetection::default().max_ejection_percent(20);
        let mut d = detector(config, 10);
        let all: Vec<_> = (1..=10).map(|n| (addr(n), 5)).collect();
        assert_eq!(d.on_failures(Instant::now(), &all).len(), 2);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let err = OutlierDetection::default()
            .max_ejection_percent(101)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("maxEjectionPercent"), "{err}");
        let err = OutlierDetection::default()
            .consecutive_failures(ConsecutiveFailures::new(0))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");
    }
}
