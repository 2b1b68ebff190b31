//! Outlier ejection's settings: A50's, and healthlb's consecutive
//! failures, with their defaults and their validation.

use std::time::Duration;

use tonic::Code;

use super::counters::CodeSet;
use crate::Error;
use crate::defaults;
use crate::service_config::json::{Field, positive};

/// Outlier ejection's settings. [`OutlierDetection::default`] is what a
/// channel uses unless told otherwise: consecutive failures only.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct OutlierDetection {
    /// How often the success-rate and failure-percentage algorithms run,
    /// and ejection counts decay. Default: [`defaults::EJECTION_INTERVAL`].
    pub interval: Duration,
    /// An ejection's length, times the ejections in a row. Default:
    /// [`defaults::BASE_EJECTION_TIME`].
    pub base_ejection_time: Duration,
    /// The longest ejection. Default: [`defaults::MAX_EJECTION_TIME`].
    pub max_ejection_time: Duration,
    /// The most endpoints ejected at once, in percent; one may always be.
    /// Default: [`defaults::MAX_EJECTION_PERCENT`].
    pub max_ejection_percent: u32,
    /// Consecutive-failure ejection. Default: on,
    /// [`defaults::CONSECUTIVE_FAILURES`] in a row.
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
    /// Failures in a row that eject. Default:
    /// [`defaults::CONSECUTIVE_FAILURES`], as Envoy's.
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
            threshold: defaults::CONSECUTIVE_FAILURES,
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
            interval: defaults::EJECTION_INTERVAL,
            base_ejection_time: defaults::BASE_EJECTION_TIME,
            max_ejection_time: defaults::MAX_EJECTION_TIME,
            max_ejection_percent: defaults::MAX_EJECTION_PERCENT,
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

    /// Sets the interval. Default: [`defaults::EJECTION_INTERVAL`].
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }

    /// Sets the base ejection time. Default:
    /// [`defaults::BASE_EJECTION_TIME`].
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

// === The service config's `outlier_detection_experimental` (gRFC A50) ===

impl OutlierDetection {
    /// The entry's settings; its `childPolicy` is read by the service config.
    pub(crate) fn from_json(field: &Field<'_>) -> Result<OutlierDetection, Error> {
        let o = field.object()?;
        field.known(
            o,
            &[
                "interval",
                "baseEjectionTime",
                "maxEjectionTime",
                "maxEjectionPercent",
                "successRateEjection",
                "failurePercentageEjection",
                "consecutiveFailures",
                "failureCodes",
                "childPolicy",
                "child_policy",
            ],
        );
        let mut od = OutlierDetection::a50();
        if let Some(d) = field.get(o, "interval") {
            od.interval = positive(&d)?;
        }
        if let Some(d) = field.get(o, "baseEjectionTime") {
            od.base_ejection_time = positive(&d)?;
        }
        match field.get(o, "maxEjectionTime") {
            Some(d) => od.max_ejection_time = d.duration()?,
            // A50: 300 s, or the base ejection time if that is longer.
            None => od.max_ejection_time = od.max_ejection_time.max(od.base_ejection_time),
        }
        if let Some(p) = field.get(o, "maxEjectionPercent") {
            od.max_ejection_percent = p.percent()?;
        }
        if let Some(s) = field.get(o, "successRateEjection") {
            let so = s.object()?;
            s.known(
                so,
                &[
                    "stdevFactor",
                    "enforcementPercentage",
                    "minimumHosts",
                    "requestVolume",
                ],
            );
            let mut rule = SuccessRateEjection::default();
            if let Some(v) = s.get(so, "stdevFactor") {
                rule.stdev_factor = v.count(0)?;
            }
            if let Some(v) = s.get(so, "enforcementPercentage") {
                rule.enforcement_percentage = v.percent()?;
            }
            if let Some(v) = s.get(so, "minimumHosts") {
                rule.minimum_hosts = v.count(0)?;
            }
            if let Some(v) = s.get(so, "requestVolume") {
                rule.request_volume = v.count(0)?;
            }
            od.success_rate = Some(rule);
        }
        if let Some(f) = field.get(o, "failurePercentageEjection") {
            let fo = f.object()?;
            f.known(
                fo,
                &[
                    "threshold",
                    "enforcementPercentage",
                    "minimumHosts",
                    "requestVolume",
                ],
            );
            let mut rule = FailurePercentageEjection::default();
            if let Some(v) = f.get(fo, "threshold") {
                rule.threshold = v.percent()?;
            }
            if let Some(v) = f.get(fo, "enforcementPercentage") {
                rule.enforcement_percentage = v.percent()?;
            }
            if let Some(v) = f.get(fo, "minimumHosts") {
                rule.minimum_hosts = v.count(0)?;
            }
            if let Some(v) = f.get(fo, "requestVolume") {
                rule.request_volume = v.count(0)?;
            }
            od.failure_percentage = Some(rule);
        }
        if let Some(c) = field.get(o, "consecutiveFailures") {
            let co = c.object()?;
            c.known(co, &["threshold", "enforcementPercentage"]);
            let mut rule = ConsecutiveFailures::default();
            if let Some(v) = c.get(co, "threshold") {
                rule.threshold = v.count(1)?;
            }
            if let Some(v) = c.get(co, "enforcementPercentage") {
                rule.enforcement_percentage = v.percent()?;
            }
            od.consecutive_failures = Some(rule);
        }
        if let Some(codes) = field.get(o, "failureCodes") {
            od.failure_codes = codes.codes()?;
        }
        Ok(od)
    }
}
