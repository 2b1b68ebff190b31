//! A6 retries: one attempt at a time, after a random backoff, as long as
//! the code is retryable, the token bucket allows it, and the server did
//! not push back with "don't".

use std::sync::Arc;

use http::Response;
use tonic::Status;
use tonic::body::Body;

use super::attempt::{Call, MAX_POLICY_ATTEMPTS};
use super::throttle::{Pushback, Throttle};
use crate::deadline::scaled;
use crate::service_config::RetryPolicy;
use crate::subchannel::Pool;

impl Call {
    /// A6 retries: one attempt at a time, after a random backoff.
    pub(super) async fn retry(
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
    pub(super) fn go_on(&self, throttle: Option<&Arc<Throttle>>, pushed: &Pushback) -> bool {
        let target = &self.shared.target;
        if throttle.is_some_and(|t| !t.failure()) {
            crate::metrics::retry_throttled(target);
            self.shared.telemetry.retry_throttled();
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
}
