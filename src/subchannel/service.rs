//! A subchannel as a [`tower::Service`] on its own connection.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::deadline::{deadline_in, grpc_timeout, with_deadline};
use tonic::Status;
use tonic::body::Body;

use super::pool::Slot;
use super::{NoSlot, Pool, Replay, Sent, Subchannel, SubchannelState, SubchannelStatus};

/// The error type of healthlb's services: a boxed [`tonic::Status`], which
/// tonic's generated clients hand to the caller as it is.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How many times a call is handed to a connection, when each one closes
/// before the call could leave the client.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// The response future of [`Subchannel`] and [`LbChannel`](crate::LbChannel).
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

/// A stream slot on `pool` once `status` shows the endpoint serving,
/// waiting until `until`, `waited` after the call began.
async fn serving_slot(
    status: &mut watch::Receiver<SubchannelStatus>,
    pool: &Pool,
    until: Instant,
    waited: std::time::Duration,
) -> Result<Slot, Status> {
    loop {
        if let SubchannelState::Shutdown = status.borrow_and_update().state() {
            return Err(Status::unavailable(format!(
                "{} was shut down: its endpoint left the resolver's set, or its channel was dropped",
                pool.addr()
            )));
        }
        if status.borrow_and_update().state().is_serving() {
            match pool.acquire(until).await {
                Ok(slot) => return Ok(slot),
                // Lost since: the state changes next.
                Err(NoSlot::Closed) => {}
                Err(NoSlot::Full) => {
                    return Err(Status::unavailable(format!(
                        "{}, after waiting {waited:?}",
                        pool.full_message()
                    )));
                }
            }
        }
        match tokio::time::timeout_at(until, status.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(Status::unavailable(format!(
                    "{} is not serving ({}) after waiting {waited:?}",
                    pool.addr(),
                    status.borrow().state()
                )));
            }
        }
    }
}

impl tower::Service<Request<Body>> for Subchannel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: the wait for a serving connection happens in `call`,
    /// bounded by the ready timeout, so a caller never hangs. Never an
    /// error either: tower's balancers evict a service for good on error,
    /// and a subchannel recovers by itself.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let mut status = self.status.clone();
        let ready_timeout = self.ready_timeout;
        let shared = self.shared.clone();
        let deadline = grpc_timeout(request.headers());
        ResponseFuture::new(with_deadline(deadline, async move {
            let addr = shared.endpoint.addr();
            let mut replay = Replay::new(request);
            for _ in 0..MAX_ATTEMPTS {
                let until = deadline_in(ready_timeout);
                let slot = serving_slot(&mut status, &shared.pool, until, ready_timeout).await?;
                match slot.send(replay).await {
                    Sent::Response(response) => return Ok(response),
                    Sent::Failed(status) => return Err(status),
                    // The connection closed before the call left: wait for
                    // the next one.
                    Sent::Unsent(unsent) => replay = unsent,
                }
            }
            Err(Status::unavailable(format!(
                "{addr} closed {MAX_ATTEMPTS} connections in a row before the call could be sent"
            )))
        }))
    }
}

impl tower::load::Load for Subchannel {
    type Metric = usize;

    /// Calls in flight on this endpoint: a real load for p2c, where tonic's
    /// balancer always says 0.
    fn load(&self) -> usize {
        self.calls_in_flight()
    }
}
