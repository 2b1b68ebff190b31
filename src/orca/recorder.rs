//! What a server reports: its own metrics, set by the application (or
//! sampled), and each call's, set by the handler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::OrcaLoadReport;

/// How long qps and eps are measured over when the application doesn't
/// set them: 1 s, long enough to smooth a burst, short enough to follow a
/// change within a client's weight update.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// The server's own metrics, for every report it sends, per call and out
/// of band. Cheap to clone: clones share one set.
///
/// qps (`rps_fractional`) and eps are measured from the calls
/// [`OrcaLayer`](super::OrcaLayer) sees, over 1 s windows, unless set with
/// [`set_qps`](Self::set_qps) / [`set_eps`](Self::set_eps). Utilizations
/// are the application's to set, or
/// [`sample_process`](Self::sample_process)'s.
#[derive(Clone, Debug, Default)]
pub struct ServerMetricsRecorder {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    set: Mutex<Set>,
    calls: AtomicU64,
    errors: AtomicU64,
    rates: Mutex<Rates>,
}

/// The values set, and which scalars were set explicitly.
#[derive(Debug, Default)]
struct Set {
    report: OrcaLoadReport,
    qps_set: bool,
    eps_set: bool,
}

#[derive(Debug, Default)]
struct Rates {
    since: Option<Instant>,
    calls: u64,
    errors: u64,
    qps: f64,
    eps: f64,
}

impl ServerMetricsRecorder {
    /// An empty set: nothing reported until something is set or measured.
    pub fn new() -> Self {
        Self::default()
    }

    fn with(&self, f: impl FnOnce(&mut Set)) {
        f(&mut self
            .inner
            .set
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }

    /// CPU utilization, as a fraction of the CPU available (may exceed 1).
    pub fn set_cpu_utilization(&self, value: f64) {
        self.with(|s| s.report.cpu_utilization = value);
    }

    /// Memory utilization, a fraction from 0 to 1.
    pub fn set_memory_utilization(&self, value: f64) {
        self.with(|s| s.report.mem_utilization = value);
    }

    /// Application utilization, which weighted round robin prefers to CPU
    /// (may exceed 1).
    pub fn set_application_utilization(&self, value: f64) {
        self.with(|s| s.report.application_utilization = value);
    }

    /// Requests per second, instead of the measured rate.
    pub fn set_qps(&self, value: f64) {
        self.with(|s| {
            s.report.rps_fractional = value;
            s.qps_set = true;
        });
    }

    /// Errors per second, instead of the measured rate.
    pub fn set_eps(&self, value: f64) {
        self.with(|s| {
            s.report.eps = value;
            s.eps_set = true;
        });
    }

    /// A named utilization, 0 to 1.
    pub fn set_named_utilization(&self, name: impl Into<String>, value: f64) {
        self.with(|s| {
            s.report.utilization.insert(name.into(), value);
        });
    }

    /// A named metric.
    pub fn set_named_metric(&self, name: impl Into<String>, value: f64) {
        self.with(|s| {
            s.report.named_metrics.insert(name.into(), value);
        });
    }

    /// The qps measured from the calls seen, over the last whole window.
    pub fn measured_qps(&self) -> f64 {
        self.rates().0
    }

    /// Counts a call [`OrcaLayer`](super::OrcaLayer) saw end.
    pub(super) fn count(&self, failed: bool) {
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// qps and eps over the last whole window, rolling it when it's over.
    fn rates(&self) -> (f64, f64) {
        let mut rates = self
            .inner
            .rates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let calls = self.inner.calls.load(Ordering::Relaxed);
        let errors = self.inner.errors.load(Ordering::Relaxed);
        match rates.since {
            None => {
                rates.since = Some(now);
                rates.calls = calls;
                rates.errors = errors;
            }
            Some(since) if now.duration_since(since) >= RATE_WINDOW => {
                let secs = now.duration_since(since).as_secs_f64();
                rates.qps = (calls - rates.calls) as f64 / secs;
                rates.eps = (errors - rates.errors) as f64 / secs;
                rates.since = Some(now);
                rates.calls = calls;
                rates.errors = errors;
            }
            Some(_) => {}
        }
        (rates.qps, rates.eps)
    }

    /// The report as it stands: what was set, and the measured rates
    /// where none were set.
    pub fn snapshot(&self) -> OrcaLoadReport {
        let (qps, eps) = self.rates();
        let set = self
            .inner
            .set
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut report = set.report.clone();
        if !set.qps_set {
            report.rps_fractional = qps;
        }
        if !set.eps_set {
            report.eps = eps;
        }
        report
    }

    pub(super) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(super) fn upgrade(weak: &std::sync::Weak<Inner>) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }
}

/// One call's metrics, recorded by its handler; [`OrcaLayer`](super::OrcaLayer)
/// puts one in each request's extensions and sends what it holds in the
/// call's trailer, over the server's own values.
#[derive(Clone, Debug, Default)]
pub struct CallMetricsRecorder {
    report: Arc<Mutex<(OrcaLoadReport, Fields)>>,
}

/// Which scalar fields a call set, so unset ones fall back to the
/// server's.
#[derive(Debug, Default, Clone, Copy)]
struct Fields(u8);

const CPU: u8 = 1;
const MEM: u8 = 2;
const APP: u8 = 4;
const QPS: u8 = 8;
const EPS: u8 = 16;

impl CallMetricsRecorder {
    /// The recorder of the call `request` belongs to, when the server runs
    /// [`OrcaLayer`](super::OrcaLayer).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&CallMetricsRecorder> {
        request.extensions().get::<CallMetricsRecorder>()
    }

    fn with(&self, field: u8, f: impl FnOnce(&mut OrcaLoadReport)) {
        let mut guard = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        guard.1.0 |= field;
        f(&mut guard.0);
    }

    /// CPU utilization for this call's report.
    pub fn set_cpu_utilization(&self, value: f64) {
        self.with(CPU, |r| r.cpu_utilization = value);
    }

    /// Memory utilization for this call's report.
    pub fn set_memory_utilization(&self, value: f64) {
        self.with(MEM, |r| r.mem_utilization = value);
    }

    /// Application utilization for this call's report.
    pub fn set_application_utilization(&self, value: f64) {
        self.with(APP, |r| r.application_utilization = value);
    }

    /// Requests per second for this call's report.
    pub fn set_qps(&self, value: f64) {
        self.with(QPS, |r| r.rps_fractional = value);
    }

    /// Errors per second for this call's report.
    pub fn set_eps(&self, value: f64) {
        self.with(EPS, |r| r.eps = value);
    }

    /// A cost of this request (`request_cost`), such as bytes read.
    pub fn record_request_cost(&self, name: impl Into<String>, value: f64) {
        self.with(0, |r| {
            r.request_cost.insert(name.into(), value);
        });
    }

    /// A named utilization for this call's report.
    pub fn set_named_utilization(&self, name: impl Into<String>, value: f64) {
        self.with(0, |r| {
            r.utilization.insert(name.into(), value);
        });
    }

    /// A named metric for this call's report.
    pub fn set_named_metric(&self, name: impl Into<String>, value: f64) {
        self.with(0, |r| {
            r.named_metrics.insert(name.into(), value);
        });
    }

    /// The call's report: its own values over the server's, when it has
    /// a server recorder.
    pub(super) fn report(&self, server: Option<&ServerMetricsRecorder>) -> OrcaLoadReport {
        let (call, Fields(set)) = self
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(server) = server else {
            return call;
        };
        let mut report = server.snapshot();
        let pick = |bit: u8, mine: f64, theirs: &mut f64| {
            if set & bit != 0 {
                *theirs = mine;
            }
        };
        pick(CPU, call.cpu_utilization, &mut report.cpu_utilization);
        pick(MEM, call.mem_utilization, &mut report.mem_utilization);
        pick(
            APP,
            call.application_utilization,
            &mut report.application_utilization,
        );
        pick(QPS, call.rps_fractional, &mut report.rps_fractional);
        pick(EPS, call.eps, &mut report.eps);
        merge(&mut report.utilization, call.utilization);
        merge(&mut report.named_metrics, call.named_metrics);
        report.request_cost = call.request_cost;
        report
    }
}

fn merge(into: &mut HashMap<String, f64>, from: HashMap<String, f64>) {
    into.extend(from);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_s_values_win_over_the_server_s_and_the_rest_come_from_it() {
        let server = ServerMetricsRecorder::new();
        server.set_cpu_utilization(0.5);
        server.set_application_utilization(0.3);
        server.set_qps(200.0);
        server.set_named_metric("queue", 4.0);
        let call = CallMetricsRecorder::default();
        call.set_application_utilization(0.9);
        call.record_request_cost("db", 2.0);
        call.set_named_metric("queue", 7.0);
        let report = call.report(Some(&server));
        assert_eq!(report.cpu_utilization, 0.5);
        assert_eq!(report.application_utilization, 0.9);
        assert_eq!(report.rps_fractional, 200.0);
        assert_eq!(report.named_metrics["queue"], 7.0);
        assert_eq!(report.request_cost["db"], 2.0);
        // Without a server recorder, the call's alone.
        assert_eq!(call.report(None).rps_fractional, 0.0);
    }

    #[test]
    fn qps_and_eps_are_measured_unless_set() {
        let server = ServerMetricsRecorder::new();
        assert_eq!(server.snapshot().rps_fractional, 0.0);
        for i in 0..50 {
            server.count(i % 5 == 0);
        }
        // The window opened at the first read; roll it by hand.
        server.inner.rates.lock().unwrap().since = Some(Instant::now() - Duration::from_secs(2));
        let report = server.snapshot();
        assert!((report.rps_fractional - 25.0).abs() < 0.5, "{report:?}");
        assert!((report.eps - 5.0).abs() < 0.5, "{report:?}");
        server.set_qps(7.0);
        assert_eq!(server.snapshot().rps_fractional, 7.0);
    }
}
