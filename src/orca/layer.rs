//! [`OrcaLayer`]: per-call load reports in the `endpoint-load-metrics-bin`
//! trailer, from the call's [`CallMetricsRecorder`] over the server's
//! [`ServerMetricsRecorder`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message;

use super::recorder::{CallMetricsRecorder, ServerMetricsRecorder};
use crate::load::report::{TRAILER, base64_encode};

/// A tower layer for `tonic::transport::Server::builder().layer(..)` that
/// sends each call's ORCA report in its trailers. Default: no server
/// recorder, so only what handlers record is sent (and no qps, which
/// weighted round robin needs: give it one with [`OrcaLayer::new`]).
#[derive(Clone, Debug, Default)]
pub struct OrcaLayer {
    server: Option<ServerMetricsRecorder>,
}

impl OrcaLayer {
    /// Reports over `server`'s metrics, whose qps and eps it measures from
    /// the calls it sees.
    pub fn new(server: ServerMetricsRecorder) -> Self {
        Self {
            server: Some(server),
        }
    }
}

impl<S> tower::Layer<S> for OrcaLayer {
    type Service = OrcaService<S>;

    fn layer(&self, inner: S) -> OrcaService<S> {
        OrcaService {
            inner,
            server: self.server.clone(),
        }
    }
}

/// The service [`OrcaLayer`] makes.
#[derive(Clone, Debug)]
pub struct OrcaService<S> {
    inner: S,
    server: Option<ServerMetricsRecorder>,
}

impl<S, B, R> tower::Service<Request<B>> for OrcaService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    R: Body<Data = bytes::Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = OrcaServiceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let call = CallMetricsRecorder::default();
        request.extensions_mut().insert(call.clone());
        OrcaServiceFuture {
            inner: self.inner.call(request),
            call: Some(Reporter {
                call,
                server: self.server.clone(),
            }),
        }
    }
}

/// What a call's report is made of when it ends.
#[derive(Debug)]
struct Reporter {
    call: CallMetricsRecorder,
    server: Option<ServerMetricsRecorder>,
}

impl Reporter {
    /// Adds the report to `headers` (the trailers, or a trailers-only
    /// response's headers), and counts the call for the measured rates.
    fn finish(self, headers: &mut HeaderMap) {
        let failed = headers
            .get("grpc-status")
            .is_some_and(|code| code.as_bytes() != b"0");
        if let Some(server) = &self.server {
            server.count(failed);
        }
        let report = self.call.report(self.server.as_ref());
        if report == Default::default() {
            return;
        }
        let value = base64_encode(&report.encode_to_vec());
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(TRAILER, value);
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`OrcaService`].
    #[derive(Debug)]
    pub struct OrcaServiceFuture<F> {
        #[pin]
        inner: F,
        call: Option<Reporter>,
    }
}

impl<F, R, E> Future for OrcaServiceFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
    R: Body<Data = bytes::Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        let mut call = this.call.take();
        if response.headers().contains_key("grpc-status")
            && let Some(call) = call.take()
        {
            // Trailers-only: the status, and so the report, is in the headers.
            call.finish(response.headers_mut());
        }
        Poll::Ready(Ok(
            response.map(|body| tonic::body::Body::new(OrcaBody { body, call }))
        ))
    }
}

pin_project_lite::pin_project! {
    /// A response body that adds the call's report to its trailers.
    #[derive(Debug)]
    struct OrcaBody<B> {
        #[pin]
        body: B,
        call: Option<Reporter>,
    }
}

impl<B: Body> Body for OrcaBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let mut frame = ready!(this.body.poll_frame(cx));
        if let Some(Ok(frame)) = &mut frame
            && let Some(trailers) = frame.trailers_mut()
            && let Some(call) = this.call.take()
        {
            call.finish(trailers);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
