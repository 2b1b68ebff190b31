//! What an endpoint's own load reports say (ORCA, gRFC A51), kept as
//! weighted round robin's weight (gRFC A58): qps ÷ (utilization + eps ÷
//! qps × the error penalty), with when the reports began and when the last
//! one came. Per-call reports are written on the request path and OOB ones
//! by the subchannel's task; the balancer reads the weight when it
//! rebuilds its schedule. Atomics only: a report is a few stores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::report::Report;

/// Where an endpoint's weight stands, as gRFC A78 counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightState {
    /// No usable report yet, or reports for less than the blackout
    /// period: the endpoint gets the mean weight.
    NotYetUsable,
    /// Reports for at least the blackout period, the last one within the
    /// expiration period: its own weight.
    Usable,
    /// No report for the expiration period: the mean weight, and the
    /// blackout starts again with the next report.
    Stale,
}

impl WeightState {
    /// Its name: `not yet usable`, `usable`, `stale`.
    pub fn label(&self) -> &'static str {
        match self {
            WeightState::NotYetUsable => "not yet usable",
            WeightState::Usable => "usable",
            WeightState::Stale => "stale",
        }
    }
}

/// Where an endpoint's load reports come from, if it reads any.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) enum LoadReports {
    /// None: the policy doesn't weigh by them.
    #[default]
    Off,
    /// Each call's `endpoint-load-metrics-bin` trailer.
    PerCall { penalty: f64 },
    /// `OpenRcaService/StreamCoreMetrics` every `period`, on the
    /// endpoint's first connection.
    OutOfBand { period: Duration, penalty: f64 },
}

/// An endpoint's weight from its reports. Times are `load::now_ns` values; 0
/// is never.
#[derive(Debug, Default)]
pub(crate) struct ServerLoad {
    /// The weight of the last usable report, as f64 bits.
    weight: AtomicU64,
    /// When the last usable report came.
    last_update: AtomicU64,
    /// When the reports began, since the endpoint last turned SERVING or
    /// went stale.
    non_empty_since: AtomicU64,
    /// A usable report came since the balancer last looked. The request
    /// path reads no clock: the balancer dates reports when it looks, to
    /// within its update period.
    fresh: std::sync::atomic::AtomicBool,
    /// The last weight update's verdict, for status: the weight's bits
    /// and its state (0 before the first update).
    scheduled: AtomicU64,
    scheduled_state: std::sync::atomic::AtomicU8,
}

/// An endpoint's weight as weighted round robin's last update saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct ServerWeight {
    /// The weight its reports give it: qps ÷ (utilization + eps ÷ qps ×
    /// penalty); 0 when it has none usable (it is scheduled with the
    /// mean then).
    pub weight: f64,
    /// Where the weight stands.
    pub state: WeightState,
}

impl ServerLoad {
    /// Takes in a report. One with no qps or no utilization says nothing
    /// of the weight and is ignored, as grpc-go does.
    pub(crate) fn on_report(&self, report: &Report, error_penalty: f64) {
        let utilization = report.utilization();
        if !(utilization > 0.0 && report.rps > 0.0 && report.rps.is_finite()) {
            return;
        }
        let error_rate = report.eps / report.rps;
        let weight = report.rps / (utilization + error_rate * error_penalty);
        if !weight.is_finite() || weight <= 0.0 {
            return;
        }
        self.weight.store(weight.to_bits(), Ordering::Relaxed);
        self.fresh.store(true, Ordering::Release);
    }

    /// The endpoint turned SERVING: its reports start over, blackout and
    /// all (gRFC A58).
    pub(crate) fn restart(&self) {
        self.non_empty_since.store(0, Ordering::Relaxed);
    }

    /// Keeps the last update's verdict, for status.
    pub(crate) fn scheduled(&self, weight: f64, state: WeightState) {
        self.scheduled.store(weight.to_bits(), Ordering::Relaxed);
        let state = match state {
            WeightState::NotYetUsable => 1,
            WeightState::Usable => 2,
            WeightState::Stale => 3,
        };
        self.scheduled_state.store(state, Ordering::Relaxed);
    }

    /// The last update's verdict; `None` before the first.
    pub(crate) fn last_scheduled(&self) -> Option<ServerWeight> {
        let state = match self.scheduled_state.load(Ordering::Relaxed) {
            1 => WeightState::NotYetUsable,
            2 => WeightState::Usable,
            3 => WeightState::Stale,
            _ => return None,
        };
        Some(ServerWeight {
            weight: f64::from_bits(self.scheduled.load(Ordering::Relaxed)),
            state,
        })
    }

    /// The weight to schedule with at `now`, 0 when it is not usable, and
    /// why. Reports that came since the last look are dated `now`.
    pub(crate) fn weight(
        &self,
        now: u64,
        expiration: Duration,
        blackout: Duration,
    ) -> (f64, WeightState) {
        let now = now.max(1);
        if self.fresh.swap(false, Ordering::Acquire) {
            self.last_update.store(now, Ordering::Relaxed);
            let _ =
                self.non_empty_since
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        let last = self.last_update.load(Ordering::Relaxed);
        if last == 0 {
            return (0.0, WeightState::NotYetUsable);
        }
        if now.saturating_sub(last) >= nanos(expiration) {
            self.non_empty_since.store(0, Ordering::Relaxed);
            return (0.0, WeightState::Stale);
        }
        let since = self.non_empty_since.load(Ordering::Relaxed);
        if !blackout.is_zero() && (since == 0 || now.saturating_sub(since) < nanos(blackout)) {
            return (0.0, WeightState::NotYetUsable);
        }
        (
            f64::from_bits(self.weight.load(Ordering::Relaxed)),
            WeightState::Usable,
        )
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rps: f64, utilization: f64, eps: f64) -> Report {
        Report {
            cpu: utilization,
            rps,
            eps,
            application: 0.0,
        }
    }

    #[test]
    fn the_weight_is_qps_over_utilization_with_errors_penalised() {
        let load = ServerLoad::default();
        let (forever, none) = (Duration::from_secs(3600), Duration::ZERO);
        let now = 1_000_000;
        assert_eq!(
            load.weight(now, forever, none),
            (0.0, WeightState::NotYetUsable)
        );
        load.on_report(&report(100.0, 0.5, 0.0), 1.0);
        assert_eq!(
            load.weight(now, forever, none),
            (200.0, WeightState::Usable)
        );
        // 10 errors a second at 100 qps, penalty 2: 100 / (0.5 + 0.1 × 2).
        load.on_report(&report(100.0, 0.5, 10.0), 2.0);
        let (weight, _) = load.weight(now, forever, none);
        assert!((weight - 100.0 / 0.7).abs() < 1e-9, "{weight}");
        // Application utilization wins over CPU.
        load.on_report(
            &Report {
                cpu: 0.9,
                rps: 100.0,
                eps: 0.0,
                application: 0.25,
            },
            1.0,
        );
        assert_eq!(load.weight(now, forever, none).0, 400.0);
        // No qps, or no utilization: ignored, the last weight stays.
        load.on_report(&report(0.0, 0.5, 0.0), 1.0);
        load.on_report(&report(100.0, 0.0, 0.0), 1.0);
        assert_eq!(load.weight(now, forever, none).0, 400.0);
    }

    #[test]
    fn blackout_then_usable_then_stale_then_blackout_again() {
        let load = ServerLoad::default();
        let (expiration, blackout) = (Duration::from_secs(180), Duration::from_secs(10));
        let at = |s: u64| 1_000 + s * 1_000_000_000;
        let state = |s: u64| load.weight(at(s), expiration, blackout);
        // First seen at 0 s: blacked out for 10 s.
        load.on_report(&report(100.0, 0.5, 0.0), 1.0);
        assert_eq!(state(0).1, WeightState::NotYetUsable);
        load.on_report(&report(100.0, 0.5, 0.0), 1.0);
        assert_eq!(state(5).1, WeightState::NotYetUsable);
        assert_eq!(state(11), (200.0, WeightState::Usable));
        // Nothing since 5 s: stale from 185 s.
        assert_eq!(state(184).1, WeightState::Usable);
        assert_eq!(state(186), (0.0, WeightState::Stale));
        // Reports again after going stale: a fresh blackout.
        load.on_report(&report(100.0, 0.5, 0.0), 1.0);
        assert_eq!(state(190).1, WeightState::NotYetUsable);
        assert_eq!(state(201).1, WeightState::Usable);
        // Turning SERVING again restarts the blackout too.
        load.restart();
        load.on_report(&report(100.0, 0.5, 0.0), 1.0);
        assert_eq!(state(202).1, WeightState::NotYetUsable);
    }
}
