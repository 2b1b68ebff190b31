//! Load-balancing policies: how the picker chooses among the endpoints a
//! call may go to. Set with [`Builder::policy`](crate::Builder::policy) or
//! the service config's `loadBalancingConfig`.

use std::time::Duration;

use super::ring_hash::RingHash;
use super::weighted_round_robin::WeightedRoundRobin;
use crate::Error;
use crate::defaults;
use crate::service_config::json::{Field, invalid, single};

/// How calls are spread over the SERVING endpoints. Default: round robin.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub enum Policy {
    /// `round_robin`: each endpoint in turn. Even, and the cheapest, when
    /// the endpoints are alike.
    #[default]
    RoundRobin,
    /// `least_request_experimental` (gRFC A48): sample `choice_count`
    /// endpoints at random and pick the one with the fewest calls in
    /// flight. It keeps calls off an endpoint that slows down under load.
    LeastRequest {
        /// Endpoints sampled per pick, 2 to 10. Default:
        /// [`defaults::LEAST_REQUEST_CHOICES`].
        choice_count: usize,
    },
    /// `peak_ewma`, Linkerd's policy: sample two endpoints and pick the one
    /// with the lower latency estimate × (calls in flight + 1). The
    /// estimate is a peak-sensitive moving average of the time to response
    /// headers, so a slow endpoint is avoided even at a concurrency of 1.
    PeakEwma {
        /// How fast the estimate forgets. Default:
        /// [`defaults::PEAK_EWMA_DECAY`].
        decay: Duration,
        /// The estimate of an endpoint before its first answer. Default:
        /// 30 ms.
        default_rtt: Duration,
    },
    /// `weighted_round_robin` (gRFC A58): round robin weighted by what the
    /// endpoints' ORCA load reports say, qps ÷ utilization, so a pod that
    /// serves a call at less cost gets more of them. Servers must send the
    /// reports: see [`crate::orca`] (feature `orca`) for tonic servers, or
    /// grpc-go's and grpc-java's `orca` packages.
    WeightedRoundRobin(WeightedRoundRobin),
    /// `ring_hash_experimental` (gRFC A42, A76): the same value of a request
    /// header to the same endpoint, while it can take calls; the next on
    /// the ring while it can't; optionally bounded in load (Envoy's
    /// `hash_balance_factor`).
    RingHash(RingHash),
}

impl Policy {
    /// `least_request_experimental` with `choice_count` samples, 2 to 10;
    /// `build` refuses any other. (A service config's `choiceCount` above
    /// 10 is taken as 10, as gRFC A48 says.)
    pub fn least_request(choice_count: usize) -> Self {
        Policy::LeastRequest { choice_count }
    }

    /// `peak_ewma` with a decay of 10 s and a default latency of 30 ms.
    pub fn peak_ewma() -> Self {
        Policy::PeakEwma {
            decay: defaults::PEAK_EWMA_DECAY,
            default_rtt: defaults::PEAK_EWMA_DEFAULT_RTT,
        }
    }

    /// `weighted_round_robin` with gRFC A58's defaults: per-call reports,
    /// a 10 s blackout, weights stale after 3 min, worked out every second.
    pub fn weighted_round_robin() -> Self {
        Policy::WeightedRoundRobin(WeightedRoundRobin::default())
    }

    /// `ring_hash_experimental` on the value of the request header
    /// `header`, with gRFC A42's ring sizes; an invalid or binary (`-bin`)
    /// header name is refused.
    pub fn ring_hash(header: impl AsRef<str>) -> Result<Self, Error> {
        Ok(Policy::RingHash(RingHash::new(header)?))
    }

    /// The policy's name in the service config.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastRequest { .. } => "least_request_experimental",
            Policy::PeakEwma { .. } => "peak_ewma",
            Policy::WeightedRoundRobin(_) => "weighted_round_robin",
            Policy::RingHash(_) => "ring_hash_experimental",
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        match self {
            Policy::RoundRobin => Ok(()),
            Policy::LeastRequest { choice_count } if !(2..=10).contains(choice_count) => {
                Err(Error::invalid_config(format!(
                    "least_request's choice count must be from 2 to 10, got {choice_count} (in a service config, a choiceCount above 10 is taken as 10, as gRFC A48 says)"
                )))
            }
            Policy::LeastRequest { .. } => Ok(()),
            Policy::PeakEwma { decay, .. } if decay.is_zero() => {
                Err(Error::invalid_config("peak_ewma.decay must be above zero"))
            }
            Policy::PeakEwma { .. } => Ok(()),
            Policy::WeightedRoundRobin(wrr) => wrr.validate(),
            Policy::RingHash(ring) => ring.validate(),
        }
    }
}

/// Slow start, as Envoy has it: an endpoint that just became SERVING gets
/// a share of calls that grows from `min_weight_percent` to a full one over
/// `window`, so a cold pod (empty caches, a JIT not warmed up) is not
/// flooded. Off by default.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct SlowStart {
    /// How long the ramp lasts. Default: [`defaults::SLOW_START_WINDOW`].
    pub window: Duration,
    /// The ramp's shape: the share at time `t` is `(t / window)^(1 /
    /// aggression)`; 1.0 is linear, larger ramps faster at first. Default:
    /// 1.0.
    pub aggression: f64,
    /// The smallest share, in percent. Default: 10.
    pub min_weight_percent: f64,
}

impl Default for SlowStart {
    fn default() -> Self {
        Self {
            window: defaults::SLOW_START_WINDOW,
            aggression: 1.0,
            min_weight_percent: defaults::SLOW_START_MIN_WEIGHT_PERCENT,
        }
    }
}

impl SlowStart {
    /// A linear ramp over `window`, from 10 %.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            ..Self::default()
        }
    }

    /// Sets the ramp's shape. Default: 1.0, linear.
    pub fn aggression(mut self, aggression: f64) -> Self {
        self.aggression = aggression;
        self
    }

    /// Sets the smallest share, in percent. Default: 10.
    pub fn min_weight_percent(mut self, percent: f64) -> Self {
        self.min_weight_percent = percent;
        self
    }

    /// The share of a full weight an endpoint `age` into its ramp gets,
    /// from `min_weight_percent / 100` to 1.
    pub(crate) fn weight(&self, age: Duration) -> f64 {
        if age >= self.window {
            return 1.0;
        }
        let t = age.as_secs_f64() / self.window.as_secs_f64();
        let min = self.min_weight_percent / 100.0;
        t.powf(1.0 / self.aggression).clamp(min, 1.0)
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.window.is_zero() {
            return Err(Error::invalid_config("slowStart.window must be above zero"));
        }
        if !(self.aggression.is_finite() && self.aggression > 0.0) {
            return Err(Error::invalid_config(format!(
                "slowStart.aggression must be a positive number, got {}",
                self.aggression
            )));
        }
        if !(0.0..=100.0).contains(&self.min_weight_percent) {
            return Err(Error::invalid_config(format!(
                "slowStart.minWeightPercent must be from 0 to 100, got {}",
                self.min_weight_percent
            )));
        }
        Ok(())
    }
}

// === The service config's entries (gRFC A2) ===

impl Policy {
    /// A `loadBalancingConfig` entry naming a policy other than outlier
    /// detection or subsetting: the policy and its slow start, or `None`
    /// for one healthlb doesn't run.
    pub(crate) fn from_json(
        entry: &Field<'_>,
    ) -> Result<Option<(Policy, Option<SlowStart>)>, Error> {
        let (name, config) = single(entry)?;
        let o = config.object()?;
        let policy = match name.as_str() {
            "round_robin" => {
                config.known(o, &["slowStart"]);
                Policy::RoundRobin
            }
            "least_request_experimental" => {
                config.known(o, &["choiceCount", "slowStart"]);
                let choice_count = match config.get(o, "choiceCount") {
                    Some(c) => {
                        let n = c.whole(0, u64::from(u32::MAX))?;
                        if n < 2 {
                            return Err(invalid(
                                &c.path,
                                format!("must be at least 2 (above 10 is taken as 10), got {n}"),
                            ));
                        }
                        if n > 10 {
                            c.note(format!("{} {n} is taken as 10 (gRFC A48)", c.path));
                        }
                        n.min(10) as usize
                    }
                    None => defaults::LEAST_REQUEST_CHOICES,
                };
                Policy::LeastRequest { choice_count }
            }
            "peak_ewma" => {
                config.known(o, &["decay", "defaultRtt", "slowStart"]);
                let Policy::PeakEwma {
                    mut decay,
                    mut default_rtt,
                } = Policy::peak_ewma()
                else {
                    unreachable!("peak_ewma() is PeakEwma")
                };
                if let Some(d) = config.get(o, "decay") {
                    decay = d.duration()?;
                    if decay.is_zero() {
                        return Err(invalid(&d.path, "must be above zero"));
                    }
                }
                if let Some(d) = config.get(o, "defaultRtt") {
                    default_rtt = d.duration()?;
                }
                Policy::PeakEwma { decay, default_rtt }
            }
            "weighted_round_robin" => {
                config.known(
                    o,
                    &[
                        "enableOobLoadReport",
                        "oobReportingPeriod",
                        "blackoutPeriod",
                        "weightExpirationPeriod",
                        "weightUpdatePeriod",
                        "errorUtilizationPenalty",
                        "slowStart",
                    ],
                );
                let mut wrr = WeightedRoundRobin::default();
                if let Some(b) = config.get(o, "enableOobLoadReport") {
                    wrr.enable_oob_load_report = b.boolean()?;
                }
                let durations = [
                    ("oobReportingPeriod", &mut wrr.oob_reporting_period),
                    ("blackoutPeriod", &mut wrr.blackout_period),
                    ("weightExpirationPeriod", &mut wrr.weight_expiration_period),
                    ("weightUpdatePeriod", &mut wrr.weight_update_period),
                ];
                for (name, slot) in durations {
                    if let Some(d) = config.get(o, name) {
                        *slot = d.duration()?;
                    }
                }
                if let Some(p) = config.get(o, "errorUtilizationPenalty") {
                    wrr.error_utilization_penalty = p.number()?;
                    if wrr.error_utilization_penalty < 0.0 {
                        return Err(invalid(&p.path, "must be 0 or more"));
                    }
                }
                wrr.validate()
                    .map_err(|e| invalid(&config.path, format!("is not valid: {e}")))?;
                Policy::WeightedRoundRobin(wrr)
            }
            "ring_hash_experimental" | "ring_hash" => {
                config.known(
                    o,
                    &[
                        "minRingSize",
                        "maxRingSize",
                        "requestHashHeader",
                        "hashBalanceFactor",
                        "entriesPerWeight",
                    ],
                );
                let header = config.require(o, "requestHashHeader")?;
                let mut ring = RingHash::new(header.string()?)
                    .map_err(|e| invalid(&header.path, e.to_string()))?;
                if let Some(n) = config.get(o, "minRingSize") {
                    ring.min_ring_size = n.whole(1, 8 * 1024 * 1024)?;
                }
                if let Some(n) = config.get(o, "maxRingSize") {
                    ring.max_ring_size = n.whole(1, 8 * 1024 * 1024)?;
                }
                if let Some(n) = config.get(o, "entriesPerWeight") {
                    ring.entries_per_weight = Some(n.whole(1, 8 * 1024 * 1024)?);
                }
                if let Some(f) = config.get(o, "hashBalanceFactor") {
                    ring.hash_balance_factor = Some(f.number()?);
                }
                ring.validate()
                    .map_err(|e| invalid(&config.path, format!("is not valid: {e}")))?;
                Policy::RingHash(ring)
            }
            _ => return Ok(None),
        };
        let slow_start = match config.get(o, "slowStart") {
            Some(s) => Some(slow_start(&s)?),
            None => None,
        };
        Ok(Some((policy, slow_start)))
    }
}

fn slow_start(field: &Field<'_>) -> Result<SlowStart, Error> {
    let o = field.object()?;
    field.known(o, &["window", "aggression", "minWeightPercent"]);
    let mut s = SlowStart::new(field.require(o, "window")?.duration()?);
    if let Some(a) = field.get(o, "aggression") {
        s.aggression = a.number()?;
    }
    if let Some(m) = field.get(o, "minWeightPercent") {
        s.min_weight_percent = m.number()?;
    }
    s.validate()
        .map_err(|e| invalid(&field.path, format!("is not valid: {e}")))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_ramps_from_the_minimum_to_full() {
        let ramp = SlowStart::new(Duration::from_secs(10));
        assert_eq!(ramp.weight(Duration::ZERO), 0.1);
        assert!((ramp.weight(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(ramp.weight(Duration::from_secs(10)), 1.0);
        let eager = ramp.aggression(2.0);
        assert!((eager.weight(Duration::from_secs(5)) - 0.5f64.sqrt()).abs() < 1e-9);
    }
}
