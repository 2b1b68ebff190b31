//! Retries and hedging (gRFC A6), as the service config's `methodConfig`
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

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

use crate::channel::{AppliedConfig, ChannelShared};
use crate::connection::grpc_status;
use crate::deadline::{deadline_in, scaled};
use crate::service_config::{HedgingPolicy, RetryPolicy, RetryThrottling};
use crate::subchannel::{AttemptId, MAX_ATTEMPTS, NoSlot, Pool, Replay, Sent};

/// A6's cap on `maxAttempts`, for retries and hedges alike.
pub(crate) const MAX_POLICY_ATTEMPTS: u32 = 5;

/// `retryThrottling`: one token bucket per channel, shared by retries and
/// hedges, in thousandths of a token.
#[derive(Debug)]
pub(crate) struct Throttle {
    milli_tokens: AtomicU64,
    max: u64,
    ratio: u64,
}

impl Throttle {
    pub(crate) fn new(config: &RetryThrottling) -> Self {
        let max = u64::from(config.max_tokens) * 1000;
        Self {
            milli_tokens: AtomicU64::new(max),
            max,
            // A6 keeps three decimal places of the ratio.
            ratio: (config.token_ratio * 1000.0).clamp(0.0, max as f64) as u64,
        }
    }

    /// Whether retries may go on: more than half the tokens are left.
    pub(crate) fn allows(&self) -> bool {
        self.milli_tokens.load(Ordering::Relaxed) > self.max / 2
    }

    /// A failed attempt costs a token. Whether retries may go on after it.
    pub(crate) fn failure(&self) -> bool {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(1000))
            });
        self.allows()
    }

    /// A call that ended OK gives back `tokenRatio` tokens.
    pub(crate) fn success(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + self.ratio).min(self.max))
            });
    }

    /// Tokens left, for tests and status.
    #[cfg(test)]
    fn tokens(&self) -> f64 {
        self.milli_tokens.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// How one call is sent: whether it waits for an endpoint, until when,
/// and by which retry or hedging policy.
pub(crate) struct Plan {
    pub(crate) fail_fast: bool,
    /// The call's deadline: no attempt waits past it.
    pub(crate) deadline: Option<Instant>,
    /// The service config in force when the call was made, and the index
    /// of the method's `methodConfig` entry, when that entry has a retry
    /// or hedging policy. Shared: a call copies no policy.
    pub(crate) policy: Option<(Arc<AppliedConfig>, usize)>,
}

/// A server's `grpc-retry-pushback-ms`.
#[derive(Debug, PartialEq, Eq)]
enum Pushback {
    Absent,
    /// Don't retry: negative or malformed.
    Stop,
    After(Duration),
}

fn pushback(headers: &http::HeaderMap) -> Pushback {
    let Some(value) = headers.get("grpc-retry-pushback-ms") else {
        return Pushback::Absent;
    };
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(ms) => Pushback::After(Duration::from_millis(ms)),
        None => Pushback::Stop,
    }
}

/// The status of a trailers-only response: a failed attempt, not yet an
/// answer. `None` for a response whose headers commit the call.
fn trailers_only(response: &Response<Body>) -> Option<Code> {
    grpc_status(response.headers())
}

/// What one attempt came to.
enum Outcome {
    Response(Response<Body>, AttemptId),
    /// Failed, on this attempt if it was sent at all.
    Failed(Status, Option<AttemptId>),
}

impl Outcome {
    fn attempt(&self) -> Option<AttemptId> {
        match self {
            Outcome::Response(_, attempt) => Some(*attempt),
            Outcome::Failed(_, attempt) => *attempt,
        }
    }

    /// The code of a failed attempt, and the server's pushback; `None` when
    /// the attempt answered the call (headers, or trailers-only OK).
    fn failure(&self) -> Option<(Code, Pushback)> {
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
    fn finish(
        self,
        replay: &Replay,
        throttle: Option<&Arc<Throttle>>,
    ) -> Result<Response<Body>, Status> {
        match self {
            Outcome::Response(response, attempt) => {
                let ours = replay.commit(attempt);
                debug_assert!(ours, "an attempt answered a call committed to another");
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
    fn retire(self, replay: &Replay) {
        self.stop(replay);
    }

    /// The attempt's request body reads no more; its outcome is kept.
    fn stop(&self, replay: &Replay) {
        if let Some(attempt) = self.attempt() {
            replay.retire(attempt);
        }
    }
}

/// Sends `request` as `plan` says: once, retried, or hedged.
pub(crate) async fn run(
    shared: Arc<ChannelShared>,
    picked: Option<Arc<Pool>>,
    replay: Replay,
    plan: Plan,
) -> Result<Response<Body>, Status> {
    // A retry policy wins over a hedging one in the same entry.
    let (retry, hedge, throttle) = match &plan.policy {
        Some((applied, i)) => {
            let entry = &applied.config.method_config[*i];
            let retry = entry.retry_policy.as_ref();
            let hedge = entry.hedging_policy.as_ref().filter(|_| retry.is_none());
            (retry, hedge, applied.throttle.as_ref())
        }
        None => (None, None, None),
    };
    let call = Call {
        deadline: plan.deadline,
        shared,
        replay,
        fail_fast: plan.fail_fast,
        tried: Mutex::new(Vec::new()),
        track: plan.policy.is_some(),
        linger: hedge.is_some(),
    };
    // Retries and hedges live in boxes of their own, so a call without a
    // policy, the common case, builds a small future.
    match (retry, hedge) {
        (Some(policy), _) => boxed(call.retry(picked, policy, throttle)).await,
        (None, Some(policy)) => boxed(call.hedge(picked, policy, throttle)).await,
        (None, None) => call.attempt(picked, 0).await.finish(&call.replay, None),
    }
}

struct Call {
    shared: Arc<ChannelShared>,
    replay: Replay,
    fail_fast: bool,
    /// The call's deadline: no attempt waits past it.
    deadline: Option<Instant>,
    /// The endpoints this call's attempts went to.
    tried: Mutex<Vec<Arc<Pool>>>,
    /// Whether to keep `tried`: only a call that may have another attempt.
    track: bool,
    /// Whether a losing attempt keeps its stream a while (hedging).
    linger: bool,
}

impl Call {
    /// One attempt, after `previous` others: on a serving endpoint this
    /// call has not tried if there is one, sent again at once while
    /// connections close under it unsent.
    async fn attempt(&self, mut picked: Option<Arc<Pool>>, previous: u32) -> Outcome {
        let target = &self.shared.target;
        // Each attempt may wait the ready timeout for an endpoint or a
        // slot, however long the ones before it took; never past the call's
        // deadline.
        let started = Instant::now();
        let waits = deadline_in(self.shared.ready_timeout);
        let until = self.deadline.map_or(waits, |d| d.min(waits));
        let planned = crate::deadline::rounded(until.saturating_duration_since(started));
        for _ in 0..MAX_ATTEMPTS {
            let pool = match picked.take() {
                Some(pool) if pool.is_ready() => pool,
                // Closed since it was picked: take the next one.
                _ => {
                    let tried = self
                        .tried
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    // Boxed: waiting is rare, and its future is large.
                    match boxed(self.shared.wait_pick(until, self.fail_fast, &tried)).await {
                        Ok(pool) => pool,
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
                    boxed(pool.acquire(until)).await
                }
                done => done,
            };
            let slot = match acquired {
                Ok(slot) => slot,
                // Its connections closed meanwhile: pick again.
                Err(NoSlot::Closed) => continue,
                Err(why) => {
                    let status = Status::unavailable(format!(
                        "{target}: {}, after waiting {planned:?}",
                        pool.refusal(why),
                    ));
                    return Outcome::Failed(self.waited(status), None);
                }
            };
            match slot.send(&self.replay, previous, self.linger).await {
                Sent::Response(response, attempt) => return Outcome::Response(response, attempt),
                Sent::Failed(status, attempt) => return Outcome::Failed(status, attempt),
                // The connection closed before the call left: another
                // endpoint takes it.
                Sent::Unsent => {}
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
    fn waited(&self, status: Status) -> Status {
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

    /// A6 retries: one attempt at a time, after a random backoff.
    async fn retry(
        &self,
        mut picked: Option<Arc<Pool>>,
        policy: &RetryPolicy,
        throttle: Option<&Arc<Throttle>>,
    ) -> Result<Response<Body>, Status> {
        let target = &self.shared.target;
        let max_attempts = policy.max_attempts.clamp(1, MAX_POLICY_ATTEMPTS);
        let mut backoff = policy.initial_backoff;
        let mut attempts = 0;
        loop {
            let outcome = self.attempt(picked.take(), attempts).await;
            attempts += 1;
            let Some((code, pushed)) = outcome.failure() else {
                crate::metrics::call_attempts(target, "retry", attempts);
                return outcome.finish(&self.replay, throttle);
            };
            let retry = policy.retryable_status_codes.contains(&code)
                && self.go_on(throttle, &pushed)
                && attempts < max_attempts
                && self.replay.can_retry();
            if !retry {
                crate::metrics::call_attempts(target, "retry", attempts);
                return outcome.finish(&self.replay, throttle);
            }
            outcome.retire(&self.replay);
            let delay = match pushed {
                Pushback::After(delay) => {
                    backoff = policy.initial_backoff;
                    delay
                }
                _ => {
                    let delay = scaled(backoff, rand::random::<f64>());
                    backoff = scaled(backoff, policy.backoff_multiplier).min(policy.max_backoff);
                    delay
                }
            };
            tracing::debug!(%target, path = self.replay.path(), ?code, attempts, ?delay, "retrying the call");
            crate::metrics::retry(target, "retry", code);
            crate::timer::sleep(delay).await;
        }
    }

    /// Whether a retryable failure may be tried again: the token bucket
    /// allows it, and the server did not push back with "don't".
    fn go_on(&self, throttle: Option<&Arc<Throttle>>, pushed: &Pushback) -> bool {
        let target = &self.shared.target;
        if throttle.is_some_and(|t| !t.failure()) {
            crate::metrics::retry_throttled(target);
            return false;
        }
        match pushed {
            Pushback::Absent => true,
            Pushback::Stop => {
                crate::metrics::pushback(target, "stop");
                false
            }
            Pushback::After(_) => {
                crate::metrics::pushback(target, "delay");
                true
            }
        }
    }

    /// A6 hedging: up to `maxAttempts` attempts, `hedgingDelay` apart, each
    /// on another endpoint. The first that answers wins; a non-fatal
    /// failure sends the next at once; the others are cancelled.
    async fn hedge(
        &self,
        picked: Option<Arc<Pool>>,
        policy: &HedgingPolicy,
        throttle: Option<&Arc<Throttle>>,
    ) -> Result<Response<Body>, Status> {
        let target = &self.shared.target;
        let max_attempts = policy.max_attempts.clamp(1, MAX_POLICY_ATTEMPTS);
        let mut picked = picked;
        let mut in_flight = FuturesUnordered::new();
        let mut launched = 0;
        let mut next = Some(Instant::now());
        let mut last: Option<Outcome> = None;
        loop {
            // Send the next hedge when it is due.
            if next.is_some_and(|at| at <= Instant::now()) {
                let may = launched == 0 || throttle.is_none_or(|t| t.allows());
                if may && self.replay.can_retry() {
                    in_flight.push(self.attempt(picked.take(), launched));
                    launched += 1;
                    next = (launched < max_attempts).then(|| Instant::now() + policy.hedging_delay);
                } else {
                    if !may {
                        crate::metrics::retry_throttled(target);
                    }
                    next = None;
                }
            }
            if in_flight.is_empty() && next.is_none() {
                crate::metrics::call_attempts(target, "hedge", launched);
                let outcome = last.unwrap_or_else(|| {
                    Outcome::Failed(
                        Status::unavailable(format!("{target}: no attempt was sent")),
                        None,
                    )
                });
                return outcome.finish(&self.replay, throttle);
            }
            let outcome = tokio::select! {
                Some(outcome) = in_flight.next() => outcome,
                () = sleep_until(next) => continue,
            };
            // Once the call has committed (its request outgrew the buffer),
            // only the attempt it committed to may answer, whatever it says:
            // the others' requests were cut off.
            match self.replay.committed_to() {
                Some(committed) if outcome.attempt() != Some(committed) => {
                    outcome.retire(&self.replay);
                    continue;
                }
                Some(_) => {
                    crate::metrics::call_attempts(target, "hedge", launched);
                    return outcome.finish(&self.replay, throttle);
                }
                None => {}
            }
            let Some((code, pushed)) = outcome.failure() else {
                crate::metrics::call_attempts(target, "hedge", launched);
                // Dropping the others cancels them on their servers.
                return outcome.finish(&self.replay, throttle);
            };
            if !policy.non_fatal_status_codes.contains(&code) {
                crate::metrics::call_attempts(target, "hedge", launched);
                return outcome.finish(&self.replay, throttle);
            }
            if next.is_some() || launched < max_attempts {
                let go_on = self.go_on(throttle, &pushed);
                next = match pushed {
                    _ if !go_on || launched >= max_attempts => None,
                    Pushback::After(delay) => Some(Instant::now() + delay),
                    _ => Some(Instant::now()),
                };
                if next.is_some() {
                    crate::metrics::retry(target, "hedge", code);
                }
            } else if let Some(t) = throttle {
                t.failure();
            }
            // A failed attempt reads no more of the request, so it can't
            // commit the call by outgrowing the buffer.
            outcome.stop(&self.replay);
            if let Some(previous) = last.replace(outcome) {
                previous.retire(&self.replay);
            }
        }
    }
}

/// `fut` in a box. A plain function, so the caller's future holds only the
/// box: boxing inside an `async fn` can still reserve room for the
/// unboxed future in the caller's state.
#[inline(never)]
fn boxed<'a, T>(fut: impl Future<Output = T> + Send + 'a) -> futures::future::BoxFuture<'a, T> {
    Box::pin(fut)
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => crate::timer::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A committed call's response body that refunds the token bucket when
/// the call ends OK.
struct Refunding {
    body: Body,
    throttle: Option<Arc<Throttle>>,
}

impl HttpBody for Refunding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.trailers_ref().and_then(grpc_status) == Some(Code::Ok)
            && let Some(throttle) = self.throttle.take()
        {
            throttle.success();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_stops_retries_at_half_and_refills_by_the_ratio() {
        let throttle = Throttle::new(&RetryThrottling {
            max_tokens: 10,
            token_ratio: 0.5,
        });
        assert!(throttle.allows());
        // 10 → 6 tokens: still above half.
        for _ in 0..4 {
            assert!(throttle.failure());
        }
        // The fifth failure leaves 5: at half, no more retries.
        assert!(!throttle.failure());
        assert_eq!(throttle.tokens(), 5.0);
        throttle.success();
        assert_eq!(throttle.tokens(), 5.5);
        assert!(throttle.allows());
        for _ in 0..20 {
            throttle.failure();
        }
        assert_eq!(throttle.tokens(), 0.0, "never below zero");
        for _ in 0..100 {
            throttle.success();
        }
        assert_eq!(throttle.tokens(), 10.0, "never above maxTokens");
    }

    #[test]
    fn pushback_is_a_delay_or_a_stop() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(pushback(&headers), Pushback::Absent);
        headers.insert("grpc-retry-pushback-ms", "250".parse().unwrap());
        assert_eq!(
            pushback(&headers),
            Pushback::After(Duration::from_millis(250))
        );
        for bad in ["-1", "soon", "1.5", ""] {
            headers.insert("grpc-retry-pushback-ms", bad.parse().unwrap());
            assert_eq!(pushback(&headers), Pushback::Stop, "{bad:?}");
        }
    }
}
