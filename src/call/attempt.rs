//! Sending a call as its plan says: once, retried or hedged (gRFC A6), as the service config's `methodConfig`
//! asks, with `retryThrottling`'s token bucket.
//!
//! Every attempt goes through the picker, so outlier ejection and the
//! endpoint's counters see each one. An attempt avoids the endpoints this
//! call has already tried whenever another one can take it (A6 doesn't
//! promise this; Envoy's `previous_hosts` does). Transparent retries of
//! calls that never left the client (`subchannel/replay.rs`) happen inside
//! an attempt and don't count against `maxAttempts`.
//!
//! A call commits when an attempt's response headers arrive: a response
//! that carries its `grpc-status` in the headers (trailers-only) is a
//! failed attempt, any other response is the call's answer, whatever its
//! trailers say later.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

use super::pick::Calls;
use super::plan::Plan;
use super::replay::{AttemptId, MAX_ATTEMPTS, Replay};
use super::send::Sent;
use super::throttle::{Pushback, pushback};
use super::throttle::{Refunding, Throttle};
use crate::connection::grpc_status;
use crate::deadline::deadline_in;
use crate::subchannel::{NoSlot, Pool};
use crate::telemetry::Attempt;

/// A6's cap on `maxAttempts`, for retries and hedges alike.
pub(crate) const MAX_POLICY_ATTEMPTS: u32 = 5;

/// The status of a trailers-only response: a failed attempt, not yet an
/// answer. `None` for a response whose headers commit the call.
pub(super) fn trailers_only(response: &Response<Body>) -> Option<Code> {
    grpc_status(response.headers())
}

/// What one attempt came to.
pub(super) enum Outcome {
    Response(Response<Body>, AttemptId),
    /// Failed, on this attempt if it was sent at all.
    Failed(Status, Option<AttemptId>),
}

impl Outcome {
    pub(super) fn attempt(&self) -> Option<AttemptId> {
        match self {
            Outcome::Response(_, attempt) => Some(*attempt),
            Outcome::Failed(_, attempt) => *attempt,
        }
    }

    /// The code of a failed attempt, and the server's pushback; `None` when
    /// the attempt answered the call (headers, or trailers-only OK).
    pub(super) fn failure(&self) -> Option<(Code, Pushback)> {
        match self {
            Outcome::Response(response, _) => match trailers_only(response) {
                None | Some(Code::Ok) => None,
                Some(code) => Some((code, pushback(response.headers()))),
            },
            Outcome::Failed(status, _) => Some((status.code(), Pushback::Absent)),
        }
    }

    /// The call's result: commits to this attempt, which the caller has
    /// checked the call is not committed away from.
    pub(super) fn finish(
        self,
        replay: &Replay,
        throttle: Option<&Arc<Throttle>>,
    ) -> Result<Response<Body>, Status> {
        if let Outcome::Response(_, attempt) = &self {
            let ours = replay.commit(*attempt);
            debug_assert!(ours, "an attempt answered a call committed to another");
        }
        self.answer(throttle)
    }

    /// The call's result, committed already or by the replay's drop.
    pub(super) fn answer(self, throttle: Option<&Arc<Throttle>>) -> Result<Response<Body>, Status> {
        match self {
            Outcome::Response(response, _) => {
                let Some(throttle) = throttle else {
                    return Ok(response);
                };
                match trailers_only(&response) {
                    Some(Code::Ok) => {
                        throttle.success();
                        Ok(response)
                    }
                    Some(_) => Ok(response),
                    None => Ok(response.map(|body| {
                        Body::new(Refunding {
                            body,
                            throttle: Some(throttle.clone()),
                        })
                    })),
                }
            }
            Outcome::Failed(status, _) => Err(status),
        }
    }

    /// The attempt is over and the call goes on without it.
    pub(super) fn retire(self, replay: &Replay) {
        self.stop(replay);
    }

    /// The attempt's request body reads no more; its outcome is kept.
    pub(super) fn stop(&self, replay: &Replay) {
        if let Some(attempt) = self.attempt() {
            replay.retire(attempt);
        }
    }
}

/// Sends `request` as `plan` says: once, retried, or hedged.
pub(crate) async fn run(
    shared: Arc<Calls>,
    picked: Option<Arc<Pool>>,
    replay: Replay,
    plan: Plan,
) -> Result<Response<Body>, Status> {
    // A retry policy wins over a hedging one in the same entry.
    let (retry, hedge) = match &plan.policy {
        Some((applied, i)) => {
            let entry = &applied.config.method_config[*i];
            let retry = entry.retry_policy.as_ref();
            let hedge = entry.hedging_policy.as_ref().filter(|_| retry.is_none());
            (retry, hedge)
        }
        None => (None, None),
    };
    let throttle = plan.throttle.as_ref();
    let call = Call {
        deadline: plan.deadline,
        shared,
        replay,
        fail_fast: plan.fail_fast,
        wait_for_ready: plan.wait_for_ready,
        hash: plan.hash,
        tried: Mutex::new(Vec::new()),
        track: plan.policy.is_some(),
        linger: hedge.is_some(),
    };
    // Retries and hedges live in boxes of their own, so a call without a
    // policy, the common case, builds a small future.
    match (retry, hedge) {
        (Some(policy), _) => boxed(call.retry(picked, policy, throttle)).await,
        (None, Some(policy)) => boxed(call.hedge(picked, policy, throttle)).await,
        // No policy: the call still refills the bucket when it ends OK. Its
        // one live attempt is the latest, which the replay's drop commits to.
        (None, None) => call.attempt(picked, 0).await.answer(throttle),
    }
}

pub(super) struct Call {
    pub(super) shared: Arc<Calls>,
    pub(super) replay: Replay,
    pub(super) fail_fast: bool,
    /// Waits even in TRANSIENT_FAILURE.
    pub(super) wait_for_ready: bool,
    /// Ring hash: the call's key, the same for each attempt.
    pub(super) hash: Option<u64>,
    /// The call's deadline: no attempt waits past it.
    pub(super) deadline: Option<Instant>,
    /// The endpoints this call's attempts went to.
    pub(super) tried: Mutex<Vec<Arc<Pool>>>,
    /// Whether to keep `tried`: only a call that may have another attempt.
    pub(super) track: bool,
    /// Whether a losing attempt keeps its stream a while (hedging).
    pub(super) linger: bool,
}

impl Call {
    /// One attempt, after `previous` others: on a serving endpoint this
    /// call has not tried if there is one, sent again at once while
    /// connections close under it unsent.
    pub(super) async fn attempt(&self, mut picked: Option<Arc<Pool>>, previous: u32) -> Outcome {
        let target = &self.shared.target;
        // Each attempt may wait the ready timeout for an endpoint or a
        // slot, however long the ones before it took; never past the call's
        // deadline. Worked out only when it waits: most attempts don't.
        let mut waits: Option<(Instant, Duration)> = None;
        let mut bounds = || {
            *waits.get_or_insert_with(|| {
                let started = Instant::now();
                let waits = deadline_in(self.shared.ready_timeout);
                let until = self.deadline.map_or(waits, |d| d.min(waits));
                let planned = crate::deadline::rounded(until.saturating_duration_since(started));
                (until, planned)
            })
        };
        let mut transparent = false;
        let mut delayed = false;
        for _ in 0..MAX_ATTEMPTS {
            let pool = match picked.take() {
                Some(pool) if pool.is_ready() => pool,
                // Closed since it was picked: take the next one.
                picked => {
                    if let Some(stale) = picked {
                        stale.hint_was_stale();
                    }
                    let tried = self
                        .tried
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let (until, _) = bounds();
                    // Boxed: waiting is rare, and its future is large.
                    let wait = super::pick::Wait {
                        until,
                        fail_fast: self.fail_fast,
                        wait_for_ready: self.wait_for_ready,
                        hash: self.hash,
                    };
                    match boxed(self.shared.wait_pick(wait, &tried)).await {
                        Ok((pool, waited)) => {
                            delayed |= waited;
                            pool
                        }
                        Err(status) => return Outcome::Failed(self.waited(status), None),
                    }
                }
            };
            if self.track {
                self.tried
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(pool.clone());
            }
            let acquired = match pool.try_acquire() {
                // Boxed: waiting for a slot is rare, and its future large.
                Err(NoSlot::Full | NoSlot::Limited | NoSlot::RateLimited(_)) => {
                    boxed(pool.acquire(bounds().0)).await
                }
                done => done,
            };
            let slot = match acquired {
                Ok(slot) => slot,
                // Its connections closed meanwhile: pick again.
                Err(NoSlot::Closed) => {
                    pool.hint_was_stale();
                    continue;
                }
                Err(why) => {
                    let status = Status::unavailable(format!(
                        "{target}: {}, after waiting {:?}",
                        pool.refusal(why),
                        bounds().1,
                    ));
                    return Outcome::Failed(self.waited(status), None);
                }
            };
            let attempt = Attempt {
                previous,
                transparent,
                delayed,
            };
            let sent = slot.send(&self.replay, attempt, self.linger);
            match sent.await {
                Sent::Response(response, attempt) => return Outcome::Response(response, attempt),
                Sent::Failed(status, attempt) => return Outcome::Failed(status, attempt),
                // The connection closed before the call left: another
                // endpoint takes it.
                Sent::Unsent => transparent = true,
            }
        }
        Outcome::Failed(
            Status::unavailable(format!(
                "{target}: {MAX_ATTEMPTS} connections closed in a row before the call could be sent"
            )),
            None,
        )
    }

    /// A wait for an endpoint or a slot that failed: DEADLINE_EXCEEDED if
    /// the call's deadline is what ended it, as it ends the call.
    pub(super) fn waited(&self, status: Status) -> Status {
        match self.deadline {
            Some(deadline) if status.code() == Code::Unavailable && deadline <= Instant::now() => {
                Status::deadline_exceeded(format!(
                    "the call's deadline passed while it waited: {}",
                    status.message()
                ))
            }
            _ => status,
        }
    }
}

/// `fut` in a box. A plain function, so the caller's future holds only the
/// box: boxing inside an `async fn` can still reserve room for the
/// unboxed future in the caller's state.
#[inline(never)]
pub(super) fn boxed<'a, T>(
    fut: impl Future<Output = T> + Send + 'a,
) -> futures::future::BoxFuture<'a, T> {
    Box::pin(fut)
}
