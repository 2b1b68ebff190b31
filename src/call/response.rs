//! [`ResponseFuture`]: what a call through healthlb returns, and the
//! call's deadline, enforced on the client from start to end.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;

/// The error type of healthlb's services: a boxed [`tonic::Status`], which
/// tonic's generated clients hand to the caller as it is.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A call's deadline: how long it was given, and when that ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) limit: Duration,
    pub(crate) at: Instant,
}

/// The response future of [`Subchannel`](crate::subchannel::Subchannel) and
/// [`LbChannel`](crate::LbChannel).
pub struct ResponseFuture {
    inner: BoxFuture<'static, Result<Response<Body>, Status>>,
    /// The call's deadline, and its timer once polled: only a call with a
    /// deadline has one.
    deadline: Option<(Deadline, Option<Pin<Box<Sleep>>>)>,
}

impl ResponseFuture {
    /// `fut`, failed with DEADLINE_EXCEEDED once `deadline` has passed, as
    /// a gRPC client enforces its own deadline: while it waits for the
    /// response headers, and after them, on the response body, so that a
    /// streaming call ends at its deadline whatever the server does (as
    /// grpc-go's does). Here rather than in a wrapping future, which would
    /// make the boxed future twice the size of `fut`.
    pub(crate) fn new(
        fut: impl Future<Output = Result<Response<Body>, Status>> + Send + 'static,
        deadline: Option<Deadline>,
    ) -> Self {
        Self {
            inner: Box::pin(fut),
            deadline: deadline.map(|d| (d, None)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(result) = self.inner.as_mut().poll(cx) {
            let response = result.map_err(BoxError::from)?;
            return Poll::Ready(Ok(match self.deadline.take() {
                Some((deadline, sleep)) => bound(response, deadline, sleep, cx),
                None => response,
            }));
        }
        // The timer starts at the first poll, inside the runtime: `call`
        // may be made outside one.
        if let Some((deadline, sleep)) = &mut self.deadline
            && sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.at)))
                .as_mut()
                .poll(cx)
                .is_ready()
        {
            return Poll::Ready(Err(Status::deadline_exceeded(format!(
                "the call's deadline of {:?} passed before the response began",
                deadline.limit
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

/// `response` with its body ended by `deadline`, on `sleep` if it was
/// started.
fn bound(
    response: Response<Body>,
    deadline: Deadline,
    sleep: Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Response<Body> {
    let mut sleep = sleep.unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline.at)));
    // Registered with the timer now, so a body that is always ready still
    // sees it pass.
    let passed = sleep.as_mut().poll(cx).is_ready();
    response.map(|body| {
        Body::new(Bounded {
            body: Some(body),
            sleep,
            limit: deadline.limit,
            passed,
        })
    })
}

/// A response body that fails with DEADLINE_EXCEEDED once the call's
/// deadline passes, dropping the stream, which cancels it on the server.
struct Bounded {
    /// `None` once the deadline passed.
    body: Option<Body>,
    sleep: Pin<Box<Sleep>>,
    limit: Duration,
    passed: bool,
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if !this.passed && !this.sleep.is_elapsed() {
            if let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) {
                return Poll::Ready(frame);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        this.body = None;
        Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
            "the call's deadline of {:?} passed before the response ended",
            this.limit
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(SizeHint::default, HttpBody::size_hint)
    }
}
