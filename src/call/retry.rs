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
            let retryable = policy.retryable_status_codes.contains(&code);
            let more = attempts < max_attempts && self.replay.can_retry();
            if !self.may_retry(retryable, &pushed, throttle, more) {
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

    /// Whether a failed attempt may be followed by another, `more` telling
    /// whether the policy allows one; records the throttling and pushback
    /// it saw (see [`decide`]).
    pub(super) fn may_retry(
        &self,
        retryable: bool,
        pushed: &Pushback,
        throttle: Option<&Arc<Throttle>>,
        more: bool,
    ) -> bool {
        let target = &self.shared.target;
        let decision = decide(retryable, pushed, throttle.map(|t| &**t), more);
        match pushed {
            Pushback::Stop => crate::metrics::pushback(target, "stop"),
            Pushback::After(_) if retryable => crate::metrics::pushback(target, "delay"),
            _ => {}
        }
        if decision == Decision::Throttled {
            crate::metrics::retry_throttled(target);
            self.shared.telemetry.retry_throttled();
        }
        decision == Decision::Retry
    }
}

/// What comes of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    Retry,
    /// The token bucket refused a retry the policy would have made.
    Throttled,
    Stop,
}

/// gRFC A6's order, as grpc-go's `shouldRetry`: a "don't" pushback stops
/// the call and costs a token, whatever its code; a code the policy doesn't
/// list stops it at no cost; any other failure costs a token, and the
/// bucket may then refuse. `more`: the policy allows another attempt
/// (`maxAttempts`, the call not committed). A refusal is `Throttled` only
/// when the policy would have retried.
pub(super) fn decide(
    retryable: bool,
    pushed: &Pushback,
    throttle: Option<&Throttle>,
    more: bool,
) -> Decision {
    if *pushed == Pushback::Stop {
        if let Some(t) = throttle {
            t.failure();
        }
        return Decision::Stop;
    }
    if !retryable {
        return Decision::Stop;
    }
    if throttle.is_some_and(|t| !t.failure()) {
        return match more {
            true => Decision::Throttled,
            false => Decision::Stop,
        };
    }
    match more {
        true => Decision::Retry,
        false => Decision::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_config::RetryThrottling;

    fn bucket(max_tokens: u32) -> Throttle {
        Throttle::new(&RetryThrottling {
            max_tokens,
            token_ratio: 0.1,
        })
    }

    #[test]
    fn a_stop_pushback_costs_a_token_whatever_the_code() {
        let throttle = bucket(10);
        for retryable in [true, false] {
            let decision = decide(retryable, &Pushback::Stop, Some(&throttle), true);
            assert_eq!(decision, Decision::Stop);
        }
        assert_eq!(throttle.tokens(), 8.0);
    }

    #[test]
    fn a_code_the_policy_does_not_list_is_free() {
        let throttle = bucket(10);
        let decision = decide(false, &Pushback::Absent, Some(&throttle), true);
        assert_eq!(decision, Decision::Stop);
        assert_eq!(throttle.tokens(), 10.0);
    }

    #[test]
    fn only_a_retry_the_policy_would_make_counts_as_throttled() {
        let throttle = bucket(2);
        // 2 → 1 token: at half, refused.
        assert_eq!(
            decide(true, &Pushback::Absent, Some(&throttle), true),
            Decision::Throttled
        );
        // maxAttempts was reached anyway: a failure, charged, not a throttle.
        assert_eq!(
            decide(true, &Pushback::Absent, Some(&throttle), false),
            Decision::Stop
        );
        assert_eq!(throttle.tokens(), 0.0);
        let plenty = bucket(100);
        assert_eq!(
            decide(true, &Pushback::Absent, Some(&plenty), false),
            Decision::Stop
        );
        assert_eq!(
            decide(
                true,
                &Pushback::After(std::time::Duration::ZERO),
                Some(&plenty),
                true
            ),
            Decision::Retry
        );
        assert_eq!(decide(true, &Pushback::Absent, None, true), Decision::Retry);
    }
}
