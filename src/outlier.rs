//! Outlier ejection: passive health from what calls show.
//!
//! The health protocol only says what a server thinks of itself. A pod that
//! says SERVING and fails every call, because a dependency or its config is
//! broken, keeps its share of calls. Outlier ejection takes such a pod out
//! of rotation for a while, as gRFC A50 (`outlier_detection_experimental`)
//! and Envoy do, with three algorithms:
//!
//! - **consecutive failures** (Envoy's `consecutive_5xx`, Linkerd's failure
//!   accrual): `threshold` failures in a row eject at once, without waiting
//!   for the interval. It works from 2 pods up, and is the one on by
//!   default.
//! - **success rate** (A50): every `interval`, an endpoint whose success
//!   rate is more than `stdev_factor / 1000` standard deviations below the
//!   mean is ejected. It needs `minimum_hosts` endpoints with
//!   `request_volume` calls each.
//! - **failure percentage** (A50): every `interval`, an endpoint failing
//!   more than `threshold` % of its calls is ejected.
//!
//! An ejected endpoint keeps its connection and its health Watch, and gets
//! no new calls until `base_ejection_time × ejections in a row` (at most
//! `max(base_ejection_time, max_ejection_time)`) has passed. The count of
//! ejections in a row drops by one for each interval it spends in
//! rotation, as A50 says. At most `max_ejection_percent` of the endpoints
//! are ejected at once, but at least one may be. If ejection leaves no
//! endpoint to call, calls go to the ejected ones that are SERVING (panic
//! mode) rather than fail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use crate::Error;
use crate::subchannel::CodeSet;

/// Outlier ejection's settings. [`OutlierDetection::default`] is what a
/// channel uses unless told otherwise: consecutive failures only.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct OutlierDetection {
    /// How often the success-rate and failure-percentage algorithms run,
    /// and ejection counts decay. Default: 10 s (A50).
    pub interval: Duration,
    /// An ejection's length, times the ejections in a row. Default: 30 s
    /// (A50).
    pub base_ejection_time: Duration,
    /// The longest ejection. Default: 300 s (A50).
    pub max_ejection_time: Duration,
    /// The most endpoints ejected at once, in percent; one may always be.
    /// Default: 10 (A50).
    pub max_ejection_percent: u32,
    /// Consecutive-failure ejection. Default: on, 5 in a row.
    pub consecutive_failures: Option<ConsecutiveFailures>,
    /// A50's success-rate ejection. Default: off.
    pub success_rate: Option<SuccessRateEjection>,
    /// A50's failure-percentage ejection. Default: off.
    pub failure_percentage: Option<FailurePercentageEjection>,
    /// The gRPC codes that count as failures. Default: UNKNOWN, INTERNAL,
    /// UNAVAILABLE, DATA_LOSS; transport failures read as UNAVAILABLE.
    /// Application codes such as NOT_FOUND or INVALID_ARGUMENT say the
    /// server works, and DEADLINE_EXCEEDED depends on the caller's deadline.
    pub failure_codes: Vec<Code>,
}

/// Ejection after a number of failures in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsecutiveFailures {
    /// Failures in a row that eject. Default: 5, as Envoy's.
    pub threshold: u32,
    /// The chance, in percent, that an endpoint found over the threshold
    /// is ejected. Default: 100.
    pub enforcement_percentage: u32,
}

/// A50's success-rate ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SuccessRateEjection {
    /// Ejected below mean − stdev × `stdev_factor / 1000`. Default: 1900.
    pub stdev_factor: u32,
    /// The chance, in percent, that an outlier is ejected. Default: 100.
    pub enforcement_percentage: u32,
    /// Endpoints with enough calls needed to judge. Default: 5.
    pub minimum_hosts: u32,
    /// Calls in an interval for an endpoint to count. Default: 100.
    pub request_volume: u32,
}

/// A50's failure-percentage ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailurePercentageEjection {
    /// Ejected above this percentage of failed calls. Default: 85.
    pub threshold: u32,
    /// The chance, in percent, that an outlier is ejected. Default: 100.
    pub enforcement_percentage: u32,
    /// Endpoints with enough calls needed to judge. Default: 5.
    pub minimum_hosts: u32,
    /// Calls in an interval for an endpoint to count. Default: 50.
    pub request_volume: u32,
}

impl Default for ConsecutiveFailures {
    fn default() -> Self {
        Self {
            threshold: 5,
            enforcement_percentage: 100,
        }
    }
}

impl ConsecutiveFailures {
    /// Ejection after `threshold` failures in a row.
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold,
            ..Self::default()
        }
    }
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        Self {
            stdev_factor: 1900,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 100,
        }
    }
}

impl SuccessRateEjection {
    /// Sets the endpoints needed to judge. Default: 5.
    pub fn minimum_hosts(mut self, n: u32) -> Self {
        self.minimum_hosts = n;
        self
    }

    /// Sets the calls per interval an endpoint needs to count. Default: 100.
    pub fn request_volume(mut self, n: u32) -> Self {
        self.request_volume = n;
        self
    }
}

impl Default for FailurePercentageEjection {
    fn default() -> Self {
        Self {
            threshold: 85,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

impl FailurePercentageEjection {
    /// Ejection above `threshold` percent of failed calls.
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold,
            ..Self::default()
        }
    }

    /// Sets the endpoints needed to judge. Default: 5.
    pub fn minimum_hosts(mut self, n: u32) -> Self {
        self.minimum_hosts = n;
        self
    }

    /// Sets the calls per interval an endpoint needs to count. Default: 50.
    pub fn request_volume(mut self, n: u32) -> Self {
        self.request_volume = n;
        self
    }
}

impl Default for OutlierDetection {
    /// Consecutive failures only, 5 in a row, with A50's times and
    /// percentages: it works from 2 endpoints up, where A50's own
    /// algorithms need 5.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            consecutive_failures: Some(ConsecutiveFailures::default()),
            success_rate: None,
            failure_percentage: None,
            failure_codes: CodeSet::SERVER_ERRORS.codes(),
        }
    }
}

impl OutlierDetection {
    /// A50's `outlier_detection_experimental` as its spec defaults it: no
    /// algorithm on until one is set.
    pub fn a50() -> Self {
        Self {
            consecutive_failures: None,
            max_ejection_percent: 10,
            ..Self::default()
        }
    }

    /// Sets the interval. Default: 10 s.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }

    /// Sets the base ejection time. Default: 30 s.
    pub fn base_ejection_time(mut self, d: Duration) -> Self {
        self.base_ejection_time = d;
        self
    }

    /// Sets the longest ejection, at least `base_ejection_time` (`build`
    /// refuses a shorter one). Default: 300 s.
    pub fn max_ejection_time(mut self, d: Duration) -> Self {
        self.max_ejection_time = d;
        self
    }

    /// Sets the most endpoints ejected at once, in percent. Default: 10.
    pub fn max_ejection_percent(mut self, percent: u32) -> Self {
        self.max_ejection_percent = percent;
        self
    }

    /// Sets consecutive-failure ejection; `None` turns it off. Default: 5.
    pub fn consecutive_failures(mut self, c: impl Into<Option<ConsecutiveFailures>>) -> Self {
        self.consecutive_failures = c.into();
        self
    }

    /// Sets success-rate ejection; `None` turns it off. Default: off.
    pub fn success_rate(mut self, s: impl Into<Option<SuccessRateEjection>>) -> Self {
        self.success_rate = s.into();
        self
    }

    /// Sets failure-percentage ejection; `None` turns it off. Default: off.
    pub fn failure_percentage(mut self, f: impl Into<Option<FailurePercentageEjection>>) -> Self {
        self.failure_percentage = f.into();
        self
    }

    /// Sets the codes that count as failures.
    pub fn failure_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.failure_codes = codes.into_iter().collect();
        self
    }

    pub(crate) fn codes(&self) -> CodeSet {
        CodeSet::of(self.failure_codes.iter().copied())
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let name = "outlier_detection";
        if self.interval.is_zero() {
            return Err(Error::invalid_config(format!(
                "{name}.interval must be above zero"
            )));
        }
        if self.base_ejection_time.is_zero() {
            return Err(Error::invalid_config(format!(
                "{name}.baseEjectionTime must be above zero"
            )));
        }
        if self.max_ejection_time < self.base_ejection_time {
            return Err(Error::invalid_config(format!(
                "{name}.maxEjectionTime ({:?}) is shorter than baseEjectionTime ({:?}): no ejection could last its base time; raise maxEjectionTime",
                self.max_ejection_time, self.base_ejection_time
            )));
        }
        let percents = [
            ("maxEjectionPercent", Some(self.max_ejection_percent)),
            (
                "consecutiveFailures.enforcementPercentage",
                self.consecutive_failures.map(|c| c.enforcement_percentage),
            ),
            (
                "successRateEjection.enforcementPercentage",
                self.success_rate.map(|s| s.enforcement_percentage),
            ),
            (
                "failurePercentageEjection.enforcementPercentage",
                self.failure_percentage.map(|f| f.enforcement_percentage),
            ),
            (
                "failurePercentageEjection.threshold",
                self.failure_percentage.map(|f| f.threshold),
            ),
        ];
        for (field, value) in percents {
            if let Some(v) = value
                && v > 100
            {
                return Err(Error::invalid_config(format!(
                    "{name}.{field} must be from 0 to 100, got {v}"
                )));
            }
        }
        if self.consecutive_failures.is_some_and(|c| c.threshold == 0) {
            return Err(Error::invalid_config(format!(
                "{name}.consecutiveFailures.threshold must be at least 1"
            )));
        }
        Ok(())
    }
}

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
    ejected_for: Option<Instant>,
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
        self.entries
            .get(addr)
            .is_some_and(|e| e.ejected_for.is_some())
    }

    pub(crate) fn ejected_for(&self, addr: &SocketAddr) -> Option<Instant> {
        self.entries.get(addr).and_then(|e| e.ejected_for)
    }

    fn ejected_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.ejected_for.is_some())
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
        if entry.ejected_for.is_some() {
            return None;
        }
        entry.multiplier = entry.multiplier.saturating_add(1);
        let length = base.saturating_mul(entry.multiplier).min(max);
        // Saturating: Duration::MAX means as long as the process lives.
        let until = now + crate::deadline::capped(length);
        entry.ejected_for = Some(until);
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
            if entry.ejected_for.is_none() && entry.multiplier > 0 {
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
            if entry.ejected_for.is_some_and(|until| until <= now) {
                entry.ejected_for = None;
                back.push(*addr);
            }
        }
        back
    }

    /// When the next ejection ends.
    pub(crate) fn next_return(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.ejected_for).min()
    }

    pub(crate) fn config(&self) -> &OutlierDetection {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let json = crate::service_config::parse_duration("315576000000s").unwrap();
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
