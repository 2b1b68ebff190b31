//! The messages of cncf/xds's ORCA protos (`proto/xds/`, Apache-2.0), as
//! prost types: `xds.data.orca.v3.OrcaLoadReport` and
//! `xds.service.orca.v3.OrcaLoadReportRequest`. Written as prost's code
//! generator writes them, with the same field numbers and types; the
//! tests hold them against code generated from the vendored `.proto`.

// Public through `crate::orca` with the feature; the client reads them
// either way.
#![cfg_attr(not(feature = "orca"), allow(unreachable_pub))]

use std::collections::HashMap;

/// `xds.data.orca.v3.OrcaLoadReport`: an endpoint's load, per call in the
/// `endpoint-load-metrics-bin` trailer or out of band.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReport {
    /// CPU utilization as a fraction of the CPU available; may exceed 1.0.
    #[prost(double, tag = "1")]
    pub cpu_utilization: f64,
    /// Memory utilization as a fraction of the memory available, 0 to 1.
    #[prost(double, tag = "2")]
    pub mem_utilization: f64,
    /// Deprecated: requests per second, whole; use `rps_fractional`.
    #[prost(uint64, tag = "3")]
    pub rps: u64,
    /// Application-specific costs of this request.
    #[prost(map = "string, double", tag = "4")]
    pub request_cost: HashMap<String, f64>,
    /// Named resource utilizations, each a fraction 0 to 1.
    #[prost(map = "string, double", tag = "5")]
    pub utilization: HashMap<String, f64>,
    /// Requests per second the endpoint serves, over all its services.
    #[prost(double, tag = "6")]
    pub rps_fractional: f64,
    /// Errors per second the endpoint serves.
    #[prost(double, tag = "7")]
    pub eps: f64,
    /// Application-specific opaque metrics.
    #[prost(map = "string, double", tag = "8")]
    pub named_metrics: HashMap<String, f64>,
    /// Application-specific utilization; may exceed 1.0. Weighted round
    /// robin prefers it to `cpu_utilization`.
    #[prost(double, tag = "9")]
    pub application_utilization: f64,
}

/// `xds.service.orca.v3.OrcaLoadReportRequest`: what a client asks of
/// `OpenRcaService/StreamCoreMetrics`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReportRequest {
    /// How often to send a report.
    #[prost(message, optional, tag = "1")]
    pub report_interval: Option<prost_types::Duration>,
    /// The request costs to include; all of them when empty.
    #[prost(string, repeated, tag = "2")]
    pub request_cost_names: Vec<String>,
}
