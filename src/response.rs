//! [`ResponseFuture`]: what a call through healthlb returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::Response;
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

use crate::deadline::capped;

/// The error type of healthlb's services: a boxed [`tonic::Status`], which
/// tonic's generated clients hand to the caller as it is.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response future of [`Subchannel`](crate::Subchannel) and
/// [`LbChannel`](crate::LbChannel).
pub struct ResponseFuture {
    inner: BoxFuture<'static, Result<Response<Body>, Status>>,
    /// The call's deadline, and its timer once polled: only a call with a
    /// deadline has one.
    deadline: Option<(Duration, Option<Pin<Box<Sleep>>>)>,
}

impl ResponseFuture {
    /// `fut`, failed with DEADLINE_EXCEEDED once `deadline` has passed, as
    /// a gRPC client enforces its own deadline. It bounds the wait for
    /// response headers, as tonic's `Channel` does; the server enforces the
    /// rest. Here rather than in a wrapping future, which would make the
    /// boxed future twice the size of `fut`.
    pub(crate) fn new(
        fut: impl Future<Output = Result<Response<Body>, Status>> + Send + 'static,
        deadline: Option<Duration>,
    ) -> Self {
        Self {
            inner: Box::pin(fut),
            deadline: deadline.map(|limit| (limit, None)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(result) = self.inner.as_mut().poll(cx) {
            return Poll::Ready(result.map_err(BoxError::from));
        }
        // The timer starts at the first poll, inside the runtime: `call`
        // may be made outside one.
        if let Some((limit, sleep)) = &mut self.deadline
            && sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(capped(*limit))))
                .as_mut()
                .poll(cx)
                .is_ready()
        {
            return Poll::Ready(Err(Status::deadline_exceeded(format!(
                "the call's deadline of {limit:?} passed before the response began"
            ))
            .into()));
        }
        Poll::Pending
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
