//! [`OpenRcaService`]: `xds.service.orca.v3.OpenRcaService`, ORCA's
//! out-of-band reports: a server stream sending the server's metrics at
//! the interval the client asks for, no more often than the minimum.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, ServerStreamingService};

use super::recorder::ServerMetricsRecorder;
use super::{OrcaLoadReport, OrcaLoadReportRequest};

/// The method's path.
const STREAM_CORE_METRICS: &str = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics";

/// The shortest interval sent at by default: 30 s, grpc-go's.
const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// `xds.service.orca.v3.OpenRcaService` for `tonic::transport::Server`:
/// each `StreamCoreMetrics` stream gets
/// [`ServerMetricsRecorder::snapshot`] at once and then every interval the
/// client asked for, but never more often than
/// [`min_report_interval`](Self::min_report_interval) (default 30 s, as
/// grpc-go's server).
#[derive(Clone, Debug)]
pub struct OpenRcaService {
    recorder: ServerMetricsRecorder,
    min_interval: Duration,
}

impl OpenRcaService {
    /// Reports `recorder`'s metrics.
    pub fn new(recorder: ServerMetricsRecorder) -> Self {
        Self {
            recorder,
            min_interval: MIN_REPORT_INTERVAL,
        }
    }

    /// The shortest interval a client may ask for; shorter requests get
    /// this one. Default: 30 s. Above zero.
    pub fn min_report_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval.max(Duration::from_millis(1));
        self
    }
}

impl NamedService for OpenRcaService {
    const NAME: &'static str = "xds.service.orca.v3.OpenRcaService";
}

impl tower::Service<Request<Body>> for OpenRcaService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if request.uri().path() != STREAM_CORE_METRICS {
            let status = Status::unimplemented(format!(
                "{} has no method {}",
                Self::NAME,
                request.uri().path()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let streams = Streams(self.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<OrcaLoadReport, OrcaLoadReportRequest>::default();
            let mut grpc = Grpc::new(codec);
            Ok(grpc.server_streaming(streams, request).await)
        })
    }
}

struct Streams(OpenRcaService);

impl ServerStreamingService<OrcaLoadReportRequest> for Streams {
    type Response = OrcaLoadReport;
    type ResponseStream = BoxStream<'static, Result<OrcaLoadReport, Status>>;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<OrcaLoadReportRequest>) -> Self::Future {
        let asked = request
            .get_ref()
            .report_interval
            .and_then(|d| {
                let secs = u64::try_from(d.seconds).ok()?;
                let nanos = u32::try_from(d.nanos).ok()?;
                Some(Duration::new(secs, nanos))
            })
            .unwrap_or_default();
        let interval = asked.max(self.0.min_interval);
        let recorder = self.0.recorder.clone();
        let mut ticks = tokio::time::interval(interval);
        // A stalled server sends late, never in a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reports =
            futures::stream::unfold((recorder, ticks), |(recorder, mut ticks)| async move {
                ticks.tick().await;
                Some((Ok(recorder.snapshot()), (recorder, ticks)))
            });
        Box::pin(async move {
            Ok(tonic::Response::new(
                Box::pin(reports) as Self::ResponseStream
            ))
        })
    }
}
