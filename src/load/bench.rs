//! What a call's end does with its ORCA report, for benchmarks. Not part
//! of the API.

use super::{Report, ServerLoad, now_ns};

/// Reads per-call reports into one endpoint's weight, as a call that ends
/// under `weighted_round_robin` does.
#[derive(Debug, Default)]
pub struct LoadReportReader(ServerLoad);

impl LoadReportReader {
    /// Takes in the report in `trailers`, if there is one.
    pub fn read(&self, trailers: &http::HeaderMap) {
        if let Some(report) = Report::from_trailers(trailers) {
            self.0.on_report(&report, 1.0);
        }
    }

    /// The weight the reports give, with no blackout.
    pub fn weight(&self) -> f64 {
        let forever = std::time::Duration::from_secs(3600);
        self.0
            .weight(now_ns(), forever, std::time::Duration::ZERO)
            .0
    }
}
