//! A6 hedging: up to `maxAttempts` attempts, `hedgingDelay` apart, each on
//! another endpoint. The first that answers wins; a non-fatal failure sends
//! the next at once; the others are cancelled.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use http::Response;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use super::attempt::{Call, MAX_POLICY_ATTEMPTS, Outcome};
use super::throttle::Pushback;
use super::throttle::Throttle;
use crate::service_config::HedgingPolicy;
use crate::subchannel::Pool;

impl Call {
    /// A6 hedging: up to `maxAttempts` attempts, `hedgingDelay` apart, each
    /// on another endpoint. The first that answers wins; a non-fatal
    /// failure sends the next at once; the others are cancelled.
    pub(super) async fn hedge(
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
                        self.shared.telemetry.retry_throttled();
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
                // Nothing is left that could have claimed the call.
                self.replay.claim(outcome.attempt());
                return outcome.finish(&self.replay, throttle);
            }
            let outcome = tokio::select! {
                Some(outcome) = in_flight.next() => outcome,
                () = sleep_until(next) => continue,
            };
            // Once the call has committed (its request outgrew the buffer),
            // only the attempt it committed to may answer, whatever it says:
            // the others' requests were cut off.
            let committed = self.replay.committed_to();
            if committed.is_some_and(|c| outcome.attempt() != Some(c)) {
                outcome.retire(&self.replay);
                continue;
            }
            let (code, pushed) = match outcome.failure() {
                // A non-fatal failure while the call may still go elsewhere.
                Some((code, pushed))
                    if committed.is_none() && policy.non_fatal_status_codes.contains(&code) =>
                {
                    (code, pushed)
                }
                // An answer or a fatal code ends the call. The claim and the
                // commit are one step: a body that outgrows the buffer
                // meanwhile commits the call to its own attempt, and this
                // outcome is then no longer the call's.
                _ => {
                    if !self.replay.claim(outcome.attempt()) {
                        outcome.retire(&self.replay);
                        continue;
                    }
                    crate::metrics::call_attempts(target, "hedge", launched);
                    // Dropping the others cancels them on their servers.
                    return outcome.finish(&self.replay, throttle);
                }
            };
            // The code is non-fatal: the bucket and the pushback decide,
            // as for a retry; another hedge may go while any are left.
            let more = launched < max_attempts;
            next = match (self.may_retry(true, &pushed, throttle, more), pushed) {
                (false, _) => None,
                (true, Pushback::After(delay)) => Some(Instant::now() + delay),
                (true, _) => Some(Instant::now()),
            };
            if next.is_some() {
                crate::metrics::retry(target, "hedge", code);
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

/// Sleeps until `at`, or forever without one.
pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => crate::timer::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
