//! ORCA load reports (gRFC A51) for tonic servers (feature `orca`): what
//! lets clients with `weighted_round_robin` (healthlb's, grpc-go's,
//! grpc-java's, C-core's) send a server calls in proportion to how cheaply
//! it serves them.
//!
//! - [`OrcaLayer`]: a tower layer for `tonic::transport::Server` that gives
//!   each call a [`CallMetricsRecorder`] (in the request's extensions) and
//!   sends what was recorded, with the server's own metrics, as the
//!   `endpoint-load-metrics-bin` trailer. It also counts calls and errors,
//!   so qps and eps are reported without the application measuring them.
//! - [`OpenRcaService`]: `xds.service.orca.v3.OpenRcaService`, the
//!   out-of-band stream a client asks for reports on at its own interval.
//! - [`ServerMetricsRecorder`]: the server-wide metrics both read; the
//!   application sets them, and [`ServerMetricsRecorder::sample_process`]
//!   can keep CPU and memory utilization up to date from `/proc`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use healthlb::orca::{OpenRcaService, OrcaLayer, ServerMetricsRecorder};
//! # let my_service = tonic_health::server::health_reporter().1;
//!
//! let metrics = ServerMetricsRecorder::new();
//! let _sampler = metrics.sample_process(std::time::Duration::from_secs(1));
//! tonic::transport::Server::builder()
//!     .layer(OrcaLayer::new(metrics.clone()))
//!     .add_service(OpenRcaService::new(metrics.clone()))
//!     .add_service(my_service)
//!     .serve("0.0.0.0:50051".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! In a handler, per call:
//!
//! ```no_run
//! # fn handler(request: &tonic::Request<()>) {
//! if let Some(call) = healthlb::orca::CallMetricsRecorder::of(request) {
//!     call.set_application_utilization(0.42);
//!     call.record_request_cost("db_reads", 3.0);
//! }
//! # }
//! ```
//!
//! The messages are cncf/xds's (`proto/xds/` in the repository, under the
//! Apache License 2.0), as prost types: [`OrcaLoadReport`] and
//! [`OrcaLoadReportRequest`].

mod layer;
mod recorder;
mod sampler;
mod service;

pub use self::layer::{OrcaLayer, OrcaService, OrcaServiceFuture};
pub use self::recorder::{CallMetricsRecorder, ServerMetricsRecorder};
pub use self::sampler::Sampler;
pub use self::service::OpenRcaService;
pub use crate::load::orca_proto::{OrcaLoadReport, OrcaLoadReportRequest};

/// The trailer a per-call report travels in.
pub const TRAILER: &str = crate::load::report::TRAILER;
