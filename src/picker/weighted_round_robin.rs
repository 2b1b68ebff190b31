//! `weighted_round_robin` (gRFC A58): round robin weighted by what each
//! endpoint's ORCA load reports say, qps ÷ utilization.
//!
//! The balancer works the weights out every `weight_update_period` and
//! publishes a schedule per group of the snapshot (the whole set, or each
//! zone group); a pick reads it with one atomic load and walks grpc-go's
//! and C-core's static stride scheduler: one atomic add, no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::Error;
use crate::defaults;

/// The settings of [`Policy::WeightedRoundRobin`](crate::Policy::WeightedRoundRobin),
/// gRFC A58's, each with its default.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct WeightedRoundRobin {
    /// Whether the weights come from out-of-band reports
    /// (`OpenRcaService/StreamCoreMetrics` on each endpoint's connection)
    /// rather than each call's `endpoint-load-metrics-bin` trailer.
    /// Default: false, per call.
    pub enable_oob_load_report: bool,
    /// How often out-of-band reports are asked for. Default:
    /// [`defaults::WRR_OOB_REPORTING_PERIOD`].
    pub oob_reporting_period: Duration,
    /// How long an endpoint must report before its weight counts; until
    /// then it gets the mean. Default: [`defaults::WRR_BLACKOUT_PERIOD`].
    pub blackout_period: Duration,
    /// How long without a report before a weight is stale and the
    /// endpoint gets the mean again. Default:
    /// [`defaults::WRR_WEIGHT_EXPIRATION_PERIOD`].
    pub weight_expiration_period: Duration,
    /// How often the weights are worked out again; at least 100 ms.
    /// Default: [`defaults::WRR_WEIGHT_UPDATE_PERIOD`].
    pub weight_update_period: Duration,
    /// How much errors count against a weight: qps ÷ (utilization + eps ÷
    /// qps × this). Default: 1.0.
    pub error_utilization_penalty: f64,
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        Self {
            enable_oob_load_report: false,
            oob_reporting_period: defaults::WRR_OOB_REPORTING_PERIOD,
            blackout_period: defaults::WRR_BLACKOUT_PERIOD,
            weight_expiration_period: defaults::WRR_WEIGHT_EXPIRATION_PERIOD,
            weight_update_period: defaults::WRR_WEIGHT_UPDATE_PERIOD,
            error_utilization_penalty: 1.0,
        }
    }
}

/// The floor of `weight_update_period` (gRFC A58).
const MIN_UPDATE_PERIOD: Duration = Duration::from_millis(100);

impl WeightedRoundRobin {
    /// Out-of-band reports every `period` instead of per-call ones.
    pub fn oob_load_report(mut self, period: Duration) -> Self {
        self.enable_oob_load_report = true;
        self.oob_reporting_period = period;
        self
    }

    /// Sets `blackout_period`.
    pub fn blackout_period(mut self, d: Duration) -> Self {
        self.blackout_period = d;
        self
    }

    /// Sets `weight_expiration_period`.
    pub fn weight_expiration_period(mut self, d: Duration) -> Self {
        self.weight_expiration_period = d;
        self
    }

    /// Sets `weight_update_period`; below 100 ms is taken as 100 ms.
    pub fn weight_update_period(mut self, d: Duration) -> Self {
        self.weight_update_period = d;
        self
    }

    /// Sets `error_utilization_penalty`, 0 or more.
    pub fn error_utilization_penalty(mut self, penalty: f64) -> Self {
        self.error_utilization_penalty = penalty;
        self
    }

    /// The update period in force: at least 100 ms.
    pub(crate) fn update_period(&self) -> Duration {
        self.weight_update_period.max(MIN_UPDATE_PERIOD)
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !(self.error_utilization_penalty.is_finite() && self.error_utilization_penalty >= 0.0) {
            return Err(Error::invalid_config(format!(
                "weighted_round_robin.errorUtilizationPenalty must be 0 or more, got {}",
                self.error_utilization_penalty
            )));
        }
        if self.enable_oob_load_report && self.oob_reporting_period.is_zero() {
            return Err(Error::invalid_config(
                "weighted_round_robin.oobReportingPeriod must be above zero",
            ));
        }
        if self.weight_expiration_period.is_zero() {
            return Err(Error::invalid_config(
                "weighted_round_robin.weightExpirationPeriod must be above zero",
            ));
        }
        Ok(())
    }
}

/// The largest scaled weight: weights are scaled to u16, as grpc-go's.
const MAX_WEIGHT: u64 = u16::MAX as u64;

/// One group's schedule: plain round robin when fewer than two endpoints
/// have a usable weight or all weigh the same, else a static stride over
/// the weights scaled to u16.
#[derive(Debug)]
pub(crate) struct Schedule {
    /// The group: indexes `start..end` of the snapshot's `ready`.
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// Scaled weights, one per endpoint of the group; empty for plain
    /// round robin.
    weights: Vec<u16>,
    /// The sequence every pick advances. 32 bits: it wraps every 4 billion
    /// picks, where the schedule skips a beat, and divides by the group's
    /// size without a division instruction.
    next: AtomicU32,
    /// Divides by the group's size.
    by_size: Divider,
}

/// Division of a `u32` by a fixed divisor with a multiply and a shift
/// (Granlund and Montgomery's round-up method): a pick divides twice per
/// step, and a hardware division costs 14 to 46 cycles.
#[derive(Debug, Clone, Copy)]
struct Divider {
    divisor: u32,
    magic: u64,
    shift: u32,
}

impl Divider {
    fn new(divisor: u32) -> Self {
        let divisor = divisor.max(1);
        // l = ⌈log2 d⌉; m = ⌊2^(32 + l) / d⌋ + 1.
        let l = 32 - (divisor - 1).leading_zeros();
        let magic = ((1u128 << (32 + l)) / u128::from(divisor) + 1) as u64;
        Self {
            divisor,
            magic,
            shift: 32 + l,
        }
    }

    /// `(n / d, n % d)`.
    fn div_rem(&self, n: u32) -> (u32, u32) {
        let q = ((u128::from(n) * u128::from(self.magic)) >> self.shift) as u32;
        (q, n - q * self.divisor)
    }
}

/// How a schedule was made, for gRFC A78's `rr_fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Made {
    Weighted,
    /// Fewer than two usable weights: round robin.
    Fallback,
    /// Every weight the same: round robin, as good as weighted.
    Even,
}

impl Schedule {
    /// The schedule over `weights` (0 for none usable) of the group
    /// `start..end`.
    pub(crate) fn new(start: usize, end: usize, weights: &[f64]) -> (Schedule, Made) {
        let usable: Vec<f64> = weights.iter().copied().filter(|w| *w > 0.0).collect();
        let seed = rand::random_range(0..u32::MAX);
        let size = u32::try_from(end - start).unwrap_or(u32::MAX);
        let mut schedule = Schedule {
            start,
            end,
            weights: Vec::new(),
            next: AtomicU32::new(seed),
            by_size: Divider::new(size),
        };
        if usable.len() < 2 {
            return (schedule, Made::Fallback);
        }
        let max = usable.iter().copied().fold(0.0, f64::max);
        let mean = usable.iter().sum::<f64>() / usable.len() as f64;
        let scale = MAX_WEIGHT as f64 / max;
        let scaled = |w: f64| ((w * scale).round() as u64).clamp(1, MAX_WEIGHT) as u16;
        let mean = scaled(mean);
        let weights: Vec<u16> = weights
            .iter()
            .map(|&w| if w > 0.0 { scaled(w) } else { mean })
            .collect();
        if weights.iter().all(|w| *w == weights[0]) {
            return (schedule, Made::Even);
        }
        schedule.weights = weights;
        (schedule, Made::Weighted)
    }

    /// The next endpoint's index in the group. A static stride: endpoint
    /// `i` of sequence number `seq` is taken when its weight, stepped by
    /// generation, crosses the threshold, so each gets calls in
    /// proportion to its weight, spread evenly.
    pub(crate) fn next(&self) -> usize {
        if self.weights.is_empty() {
            let (_, index) = self
                .by_size
                .div_rem(self.next.fetch_add(1, Ordering::Relaxed));
            return index as usize;
        }
        const OFFSET: u64 = MAX_WEIGHT / 2;
        // Bounded: the heaviest endpoint is taken at every one of its turns.
        loop {
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            let (generation, index) = self.by_size.div_rem(seq);
            let weight = u64::from(self.weights[index as usize]);
            let m = (weight * u64::from(generation) + u64::from(index) * OFFSET) % MAX_WEIGHT;
            if m < MAX_WEIGHT - weight {
                continue;
            }
            return index as usize;
        }
    }
}

/// The schedules of one snapshot, published beside it.
#[derive(Debug)]
pub(crate) struct Schedules {
    /// The snapshot they were made for.
    pub(crate) generation: u64,
    pub(crate) groups: Vec<Schedule>,
}

/// Where the balancer publishes the schedules and picks read them.
#[derive(Debug, Default)]
pub(crate) struct Published(ArcSwapOption<Schedules>);

impl Published {
    pub(crate) fn store(&self, schedules: Schedules) {
        self.0.store(Some(Arc::new(schedules)));
    }

    /// The pick among `start..end` of the snapshot `generation`; `None`
    /// when no schedule is made for it yet (round robin then).
    pub(crate) fn pick(&self, generation: u64, start: usize, end: usize) -> Option<usize> {
        let schedules = self.0.load();
        let schedules = schedules.as_ref().filter(|s| s.generation == generation)?;
        let group = schedules
            .groups
            .iter()
            .find(|g| g.start == start && g.end == end)?;
        Some(start + group.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(schedule: &Schedule, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; schedule.end - schedule.start];
        for _ in 0..picks {
            counts[schedule.next()] += 1;
        }
        counts
    }

    #[test]
    fn the_divider_divides_exactly() {
        let mut x = 0x9E37_79B9u32;
        for d in (1..2000).chain([65_535, 65_536, 1 << 20, 10_007, u32::MAX - 1, u32::MAX]) {
            let div = Divider::new(d);
            for n in [0, 1, d - 1, d, d.wrapping_add(1), u32::MAX, u32::MAX - 1] {
                assert_eq!(div.div_rem(n), (n / d, n % d), "{n} / {d}");
            }
            for _ in 0..50 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                assert_eq!(div.div_rem(x), (x / d, x % d), "{x} / {d}");
            }
        }
    }

    #[test]
    fn picks_follow_the_weights() {
        let (schedule, made) = Schedule::new(0, 4, &[2.0, 2.0, 1.0, 1.0]);
        assert_eq!(made, Made::Weighted);
        let got = counts(&schedule, 60_000);
        for (i, want) in [20_000, 20_000, 10_000, 10_000].into_iter().enumerate() {
            assert!(got[i].abs_diff(want) <= 10, "{got:?}");
        }
    }

    #[test]
    fn endpoints_without_a_weight_get_the_mean() {
        // Usable 1 and 3: the mean, 2, for the third.
        let (schedule, made) = Schedule::new(0, 3, &[1.0, 3.0, 0.0]);
        assert_eq!(made, Made::Weighted);
        let got = counts(&schedule, 60_000);
        for (i, want) in [10_000, 30_000, 20_000].into_iter().enumerate() {
            assert!(got[i].abs_diff(want) <= 10, "{got:?}");
        }
    }

    #[test]
    fn fewer_than_two_weights_or_equal_ones_are_round_robin() {
        for (weights, want) in [
            (&[0.0, 5.0, 0.0][..], Made::Fallback),
            (&[0.0, 0.0][..], Made::Fallback),
            (&[4.0, 4.0, 4.0][..], Made::Even),
        ] {
            let (schedule, made) = Schedule::new(2, 2 + weights.len(), weights);
            assert_eq!(made, want);
            let got = counts(&schedule, 3 * weights.len());
            assert!(got.iter().all(|c| *c == 3), "{got:?}");
        }
    }

    #[test]
    fn a_schedule_is_read_only_for_its_own_snapshot_and_group() {
        let published = Published::default();
        assert_eq!(published.pick(1, 0, 2), None);
        let (group, _) = Schedule::new(4, 6, &[1.0, 1.0]);
        published.store(Schedules {
            generation: 7,
            groups: vec![group],
        });
        assert_eq!(published.pick(6, 4, 6), None);
        assert_eq!(published.pick(7, 0, 6), None);
        assert!((4..6).contains(&published.pick(7, 4, 6).unwrap()));
    }
}
