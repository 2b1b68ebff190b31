//! A call seen by gRPC's standard telemetry (feature `opentelemetry`): its
//! span around every attempt, and its duration and status at its end,
//! which for a streaming response is when its body ends.

use tonic::Status;
use tonic::body::Body;

use crate::telemetry::CallTelemetry;

/// `run`, recorded on `telemetry`.
#[cfg(feature = "opentelemetry")]
pub(crate) async fn observed(
    run: impl Future<Output = Result<http::Response<Body>, Status>> + Send + 'static,
    mut telemetry: CallTelemetry,
) -> Result<http::Response<Body>, Status> {
    // The call's span is not entered: its attempts name it as their
    // parent, and entering it at every poll would cost each call.
    match run.await {
        Err(status) => {
            telemetry.end(status.code());
            Err(status)
        }
        Ok(response) => match crate::connection::grpc_status(response.headers()) {
            Some(code) => {
                telemetry.end(code);
                Ok(response)
            }
            None => Ok(response.map(|body| {
                Body::new(Ending {
                    body,
                    telemetry: Some(telemetry),
                })
            })),
        },
    }
}

/// Without the feature there is no telemetry to record on.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) async fn observed(
    _: impl Future<Output = Result<http::Response<Body>, Status>> + Send + 'static,
    telemetry: CallTelemetry,
) -> Result<http::Response<Body>, Status> {
    match telemetry {}
}

/// A response body that records the call's end: its trailers' status, its
/// error's, or CANCELLED if dropped first.
#[cfg(feature = "opentelemetry")]
struct Ending {
    body: Body,
    telemetry: Option<CallTelemetry>,
}

#[cfg(feature = "opentelemetry")]
impl http_body::Body for Ending {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(frame) = &polled {
            let code = match frame {
                Some(Ok(frame)) => frame
                    .trailers_ref()
                    .map(|t| crate::connection::grpc_status(t).unwrap_or(tonic::Code::Unknown)),
                Some(Err(status)) => Some(status.code()),
                None => Some(tonic::Code::Unknown),
            };
            if let Some(code) = code
                && let Some(mut telemetry) = self.telemetry.take()
            {
                telemetry.end(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
