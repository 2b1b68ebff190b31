//! A subchannel as a [`tower::Service`] on its own connection.

use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use super::replay::{MAX_ATTEMPTS, Replay};
use super::response::{BoxError, Deadline, ResponseFuture};
use super::send::Sent;
use crate::deadline::{deadline_in, grpc_timeout, rounded};
use crate::subchannel::Subchannel;
use crate::subchannel::{NoSlot, Pool, Slot};
use crate::subchannel::{SubchannelState, SubchannelStatus};
use crate::telemetry::Attempt;

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
                Err(why) => {
                    return Err(Status::unavailable(format!(
                        "{}, after waiting {waited:?}",
                        pool.refusal(why)
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
        let mut status = self.subscribe();
        let ready_timeout = self.waits_for();
        let pool = self.pool().clone();
        let retry_buffer = self.retry_buffer().clone();
        let deadline = grpc_timeout(request.headers()).map(|limit| Deadline {
            limit,
            at: deadline_in(limit),
        });
        let at = deadline.map(|d| d.at);
        // A call span and A66's call metrics, as for a call through the
        // channel: tower's balancers call here directly.
        let telemetry = self.counters().telemetry.call(request.uri().path(), at);
        let replay = Replay::new(request, retry_buffer, at);
        if let Some(telemetry) = &telemetry {
            telemetry.attach(&replay);
        }
        let run = async move {
            let addr = pool.addr();
            let mut transparent = false;
            for _ in 0..MAX_ATTEMPTS {
                let waits = deadline_in(ready_timeout);
                let until = at.map_or(waits, |at| at.min(waits));
                let waited = rounded(until.saturating_duration_since(Instant::now()));
                let slot = serving_slot(&mut status, &pool, until, waited)
                    .await
                    .map_err(|status| match at {
                        // The call's deadline ended the wait, as it ends the call.
                        Some(at) if at <= Instant::now() => Status::deadline_exceeded(format!(
                            "the call's deadline passed while it waited: {}",
                            status.message()
                        )),
                        _ => status,
                    })?;
                let attempt = Attempt {
                    transparent,
                    ..Attempt::default()
                };
                match slot.send(&replay, attempt, false).await {
                    Sent::Response(response, attempt) => {
                        replay.commit(attempt);
                        return Ok(response);
                    }
                    Sent::Failed(status, _) => return Err(status),
                    // The connection closed before the call left: wait for
                    // the next one.
                    Sent::Unsent => transparent = true,
                }
            }
            Err(Status::unavailable(format!(
                "{addr} closed {MAX_ATTEMPTS} connections in a row before the call could be sent"
            )))
        };
        match telemetry {
            None => ResponseFuture::new(run, deadline),
            Some(telemetry) => ResponseFuture::new(super::observed(run, telemetry), deadline),
        }
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
