//! Exponential backoff, as gRPC's connection-backoff document specifies it.
//!
//! The first retry waits `initial` (1 s), each later one `multiplier` (1.6)
//! times longer, up to `max` (120 s). Every delay is spread by a uniformly
//! random `jitter` (±20 %) so that clients which failed together do not retry
//! together, and is never longer than `max`. A success resets the sequence.
//!
//! Connects, health streams and DNS retries all use it; DNS caps it at the
//! resolver's `max_refresh`.

use std::time::Duration;

use crate::deadline::{capped, scaled};

/// Backoff settings. The defaults are gRPC's: `defaults::BACKOFF`,
/// 1 s, × 1.6, ± 20 %, at most 120 s.
/// Set them with the chained setters; read them from the fields. They are
/// checked when the channel or subchannel is built.
///
/// ```
/// use std::time::Duration;
/// use healthlb::BackoffConfig;
///
/// let fast = BackoffConfig::default()
///     .initial(Duration::from_millis(100))
///     .max(Duration::from_secs(5));
/// assert_eq!(fast.multiplier, 1.6);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// The first delay. Default: 1 s.
    pub initial: Duration,
    /// The factor between one delay and the next; at least 1. Default: 1.6.
    pub multiplier: f64,
    /// The random spread of each delay, as a fraction of it, in [0, 1):
    /// 0.2 means ±20 %. Default: 0.2.
    pub jitter: f64,
    /// The longest delay. Default: 120 s.
    pub max: Duration,
}

// === impl BackoffConfig ===

impl BackoffConfig {
    /// The first delay. Default: 1 s.
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The factor between one delay and the next. Default: 1.6.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The random spread of each delay, as a fraction of it: 0.2 means
    /// ±20 %. Default: 0.2.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The longest delay. Default: 120 s.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        if self.initial.is_zero() {
            return Err(crate::Error::invalid_config(
                "backoff initial delay must be above zero",
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(crate::Error::invalid_config(format!(
                "backoff multiplier must be at least 1.0, got {}",
                self.multiplier
            )));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(crate::Error::invalid_config(format!(
                "backoff jitter must be in [0, 1), got {}",
                self.jitter
            )));
        }
        if self.max < self.initial {
            return Err(crate::Error::invalid_config(format!(
                "backoff max ({:?}) is below its initial delay ({:?})",
                self.max, self.initial
            )));
        }
        Ok(())
    }
}

/// The running state: which delay comes next.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    /// The next delay before jitter.
    current: Duration,
}

// === impl Backoff ===

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Self {
            current: config.initial,
            config,
        }
    }

    /// The delay before the next retry; each call moves one step further.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = scaled(base, self.config.multiplier).min(self.config.max);
        jittered(base, self.config.jitter).min(self.config.max)
    }

    /// The next delay, before jitter.
    pub(crate) fn current(&self) -> Duration {
        self.current
    }

    /// After a success: the next failure waits `initial` again.
    pub(crate) fn reset(&mut self) {
        self.current = self.config.initial;
    }
}

/// `d` spread uniformly by ±`fraction`, saturating.
pub(crate) fn jittered(d: Duration, fraction: f64) -> Duration {
    if !(fraction > 0.0 && fraction < 1.0) {
        return capped(d);
    }
    let factor = 1.0 + rand::random_range(-fraction..=fraction);
    scaled(d, factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const SPEC: [f64; 12] = [
        1.0,
        1.6,
        2.56,
        4.096,
        6.5536,
        10.48576,
        16.777216,
        26.8435456,
        42.94967296,
        68.719476736,
        109.9511627776,
        120.0,
    ];

    /// Sleeps through a sequence of delays on the paused clock and checks each
    /// against the spec's curve, ±20 %.
    #[tokio::test(start_paused = true)]
    async fn delays_follow_the_spec_within_jitter() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        for expected in SPEC {
            let start = Instant::now();
            tokio::time::sleep(backoff.next_delay()).await;
            let slept = start.elapsed().as_secs_f64();
            let low = expected * 0.8;
            let high = (expected * 1.2).min(120.0);
            assert!(
                (low - 0.001..=high + 0.001).contains(&slept),
                "slept {slept:.3}s, expected {expected}s ±20%"
            );
        }
        // Capped: it stays at the max.
        for _ in 0..20 {
            assert!(backoff.next_delay() <= Duration::from_secs(120));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reset_starts_over() {
        let mut backoff = Backoff::new(BackoffConfig::default().jitter(0.0));
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        let start = Instant::now();
        tokio::time::sleep(backoff.next_delay()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(), Duration::from_millis(1600));
    }

    #[test]
    fn jitter_spreads_both_ways() {
        let base = Duration::from_secs(10);
        let samples: Vec<Duration> = (0..2000).map(|_| jittered(base, 0.2)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_secs(8) && *d <= Duration::from_secs(12))
        );
        assert!(samples.iter().any(|d| *d < Duration::from_millis(9_000)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(11_000)));
    }

    #[test]
    fn huge_delays_saturate() {
        let mut backoff = Backoff::new(
            BackoffConfig::default()
                .initial(Duration::from_secs(u64::MAX / 4))
                .max(Duration::MAX),
        );
        for _ in 0..100 {
            assert!(backoff.next_delay() <= crate::deadline::FOREVER);
        }
        assert!(jittered(Duration::MAX, 0.1) <= crate::deadline::FOREVER);
    }

    #[test]
    fn bad_settings_are_refused() {
        let cases = [
            (
                BackoffConfig::default().initial(Duration::ZERO),
                "backoff initial delay must be above zero",
            ),
            (
                BackoffConfig::default().multiplier(0.5),
                "backoff multiplier must be at least 1.0, got 0.5",
            ),
            (
                BackoffConfig::default().jitter(1.5),
                "backoff jitter must be in [0, 1), got 1.5",
            ),
            (
                BackoffConfig::default().max(Duration::from_millis(10)),
                "backoff max (10ms) is below its initial delay (1s)",
            ),
        ];
        for (config, message) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.to_string(), format!("invalid configuration: {message}"));
        }
        assert!(BackoffConfig::default().validate().is_ok());
    }
}
