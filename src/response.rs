//! [`ResponseFuture`]: what a call through healthlb returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::Response;
use tonic::Status;
use tonic::body::Body;

/// The error type of healthlb's services: a boxed [`tonic::Status`], which
/// tonic's generated clients hand to the caller as it is.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response future of [`Subchannel`](crate::Subchannel) and
/// [`LbChannel`](crate::LbChannel).
pub struct ResponseFuture {
    inner: BoxFuture<'static, Result<Response<Body>, BoxError>>,
}

impl ResponseFuture {
    pub(crate) fn new(
        fut: impl Future<Output = Result<Response<Body>, Status>> + Send + 'static,
    ) -> Self {
        Self {
            inner: Box::pin(async move { fut.await.map_err(BoxError::from) }),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
