//! Weighted round robin's weights (gRFC A58), worked out by the balancer
//! every `weight_update_period` and after each publish: each endpoint in
//! rotation gets the weight its load reports give it, or the mean when it
//! has none usable, times its slow-start ramp; each group of the snapshot
//! gets a schedule the picker reads. A78's metrics are recorded here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::zones::Placed;
use crate::load::{WeightState, now_ns};
use crate::picker::{Made, Picker, Schedule, Schedules, SlowStart, WeightedRoundRobin};
use crate::telemetry::Telemetry;

/// Works the weights out for the picker's current snapshot and publishes
/// its schedules.
pub(super) fn reweigh(
    picker: &Picker,
    wrr: &WeightedRoundRobin,
    target: &str,
    telemetry: &Telemetry,
    placed: &BTreeMap<SocketAddr, Placed>,
) {
    let snapshot = picker.current();
    let now = now_ns();
    let (mut not_yet_usable, mut stale) = (0, 0);
    let mut weights: Vec<f64> = snapshot
        .ready
        .iter()
        .map(|pool| {
            let load = &pool.stats().server_load;
            let (weight, state) =
                load.weight(now, wrr.weight_expiration_period, wrr.blackout_period);
            match state {
                WeightState::NotYetUsable => not_yet_usable += 1,
                WeightState::Stale => stale += 1,
                WeightState::Usable => {}
            }
            load.scheduled(weight, state);
            let zone = placed.get(&pool.addr()).and_then(|p| p.zone.as_deref());
            telemetry.wrr_endpoint(zone, state, weight);
            weight
        })
        .collect();
    crate::metrics::wrr_weights(target, not_yet_usable, stale);
    if let Some(ramp) = picker.slow_start().filter(|_| !snapshot.since.is_empty()) {
        ramped(&mut weights, ramp, &snapshot.since, Instant::now());
    }
    let n = snapshot.ready.len();
    let mut ranges: Vec<(usize, usize)> =
        snapshot.groups.iter().map(|g| (g.start, g.end)).collect();
    if !ranges.contains(&(0, n)) {
        ranges.push((0, n));
    }
    let mut groups = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        let (schedule, made) = Schedule::new(start, end, &weights[start..end]);
        if made == Made::Fallback && end > start {
            crate::metrics::wrr_fell_back(target);
            telemetry.wrr_fell_back();
        }
        groups.push(schedule);
    }
    picker.schedule(Schedules {
        generation: snapshot.generation,
        groups,
    });
}

/// Slow start's ramp over weighted round robin: an endpoint without a
/// usable weight takes the mean of the others first, then each is scaled
/// by its ramp. With fewer than two usable weights it stays round robin.
fn ramped(weights: &mut [f64], ramp: SlowStart, since: &[Instant], now: Instant) {
    let usable: Vec<f64> = weights.iter().copied().filter(|w| *w > 0.0).collect();
    if usable.len() < 2 {
        return;
    }
    let mean = usable.iter().sum::<f64>() / usable.len() as f64;
    for (weight, since) in weights.iter_mut().zip(since) {
        let full = if *weight > 0.0 { *weight } else { mean };
        *weight = full * ramp.weight(now.saturating_duration_since(*since));
    }
}

/// When the balancer works the weights out next: every update period.
pub(super) fn next_update(
    wrr: Option<&WeightedRoundRobin>,
    last: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let period: Duration = wrr?.update_period();
    Some(last + period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_scales_weights_and_gives_the_mean_to_those_without() {
        let ramp = SlowStart::new(Duration::from_secs(10));
        let now = Instant::now();
        let since = [
            now - Duration::from_secs(20),
            now - Duration::from_secs(5),
            now,
        ];
        let mut weights = [4.0, 2.0, 0.0];
        ramped(&mut weights, ramp, &since, now);
        assert_eq!(weights[0], 4.0);
        assert!((weights[1] - 1.0).abs() < 1e-9, "{weights:?}");
        assert!((weights[2] - 0.3).abs() < 1e-9, "{weights:?}");
        let mut one = [3.0, 0.0, 0.0];
        ramped(&mut one, ramp, &since, now);
        assert_eq!(one, [3.0, 0.0, 0.0]);
    }
}
