//! `methodConfig` (gRFC A2, A6): each method's timeout, wait for ready,
//! and retry or hedging policy.

use std::time::Duration;

use tonic::Code;

use super::json::{Field, invalid, positive};
use crate::Error;

/// One `methodConfig` entry.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The methods it applies to.
    pub name: Vec<MethodName>,
    /// `timeout`: the deadline of a call that carries none.
    pub timeout: Option<Duration>,
    /// `waitForReady`.
    pub wait_for_ready: Option<bool>,
    /// `retryPolicy`.
    pub retry_policy: Option<RetryPolicy>,
    /// `hedgingPolicy`.
    pub hedging_policy: Option<HedgingPolicy>,
    /// `maxRequestMessageBytes`.
    pub max_request_message_bytes: Option<u64>,
    /// `maxResponseMessageBytes`.
    pub max_response_message_bytes: Option<u64>,
}

/// A `methodConfig` name: a service and a method, a whole service, or
/// (both empty) every method.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct MethodName {
    /// `service`, such as `echo.Echo`; empty for all.
    pub service: String,
    /// `method`, such as `Unary`; empty for all of the service's.
    pub method: String,
}

/// gRFC A6's `retryPolicy`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 2 or more, taken as at most 5.
    pub max_attempts: u32,
    /// The first backoff's upper bound.
    pub initial_backoff: Duration,
    /// The largest backoff.
    pub max_backoff: Duration,
    /// The backoff's growth per attempt.
    pub backoff_multiplier: f64,
    /// The codes worth another attempt.
    pub retryable_status_codes: Vec<Code>,
}

/// gRFC A6's `hedgingPolicy`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HedgingPolicy {
    /// Copies in all: 2 or more, taken as at most 5.
    pub max_attempts: u32,
    /// The time between copies. Default: 0.
    pub hedging_delay: Duration,
    /// Codes that don't end the hedged call.
    pub non_fatal_status_codes: Vec<Code>,
}

/// A6's `maxAttempts`: at least 2, and above 5 taken as 5.
fn max_attempts(field: &Field<'_>) -> Result<u32, Error> {
    let n = field.whole(0, u64::from(u32::MAX))?;
    if n < 2 {
        return Err(invalid(
            &field.path,
            format!(
                "must be at least 2, the first attempt included (above 5 is taken as 5, as gRFC A6 says), got {n}"
            ),
        ));
    }
    if n > 5 {
        field.note(format!("{} {n} is taken as 5 (gRFC A6)", field.path));
    }
    Ok(n.min(5) as u32)
}

pub(crate) fn method_config(entry: &Field<'_>) -> Result<MethodConfig, Error> {
    let o = entry.object()?;
    entry.known(
        o,
        &[
            "name",
            "timeout",
            "waitForReady",
            "maxRequestMessageBytes",
            "maxResponseMessageBytes",
            "retryPolicy",
            "hedgingPolicy",
        ],
    );
    let mut m = MethodConfig::default();
    if let Some(names) = entry.get(o, "name") {
        for name in names.array()? {
            let no = name.object()?;
            name.known(no, &["service", "method"]);
            let service = match name.get(no, "service") {
                Some(s) => s.string()?.to_owned(),
                None => String::new(),
            };
            let method = match name.get(no, "method") {
                Some(s) => s.string()?.to_owned(),
                None => String::new(),
            };
            if service.is_empty() && !method.is_empty() {
                return Err(invalid(&name.path, "names a method without its service"));
            }
            m.name.push(MethodName { service, method });
        }
    }
    if let Some(t) = entry.get(o, "timeout") {
        m.timeout = Some(t.duration()?);
    }
    if let Some(w) = entry.get(o, "waitForReady") {
        m.wait_for_ready = Some(w.boolean()?);
    }
    if let Some(n) = entry.get(o, "maxRequestMessageBytes") {
        m.max_request_message_bytes = Some(n.whole(0, u64::MAX >> 11)?);
    }
    if let Some(n) = entry.get(o, "maxResponseMessageBytes") {
        m.max_response_message_bytes = Some(n.whole(0, u64::MAX >> 11)?);
    }
    let retry = entry.get(o, "retryPolicy");
    let hedging = entry.get(o, "hedgingPolicy");
    if retry.is_some() && hedging.is_some() {
        return Err(invalid(
            &entry.path,
            "has both retryPolicy and hedgingPolicy; gRFC A6 allows one",
        ));
    }
    if let Some(r) = retry {
        let ro = r.object()?;
        r.known(
            ro,
            &[
                "maxAttempts",
                "initialBackoff",
                "maxBackoff",
                "backoffMultiplier",
                "retryableStatusCodes",
            ],
        );
        let max_attempts = max_attempts(&r.require(ro, "maxAttempts")?)?;
        let initial_backoff = positive(&r.require(ro, "initialBackoff")?)?;
        let max_backoff = positive(&r.require(ro, "maxBackoff")?)?;
        let multiplier = r.require(ro, "backoffMultiplier")?;
        let backoff_multiplier = multiplier.number()?;
        if backoff_multiplier <= 0.0 {
            return Err(invalid(
                &multiplier.path,
                format!("must be above 0, got {backoff_multiplier}"),
            ));
        }
        let codes = r.require(ro, "retryableStatusCodes")?;
        let retryable_status_codes = codes.codes()?;
        if retryable_status_codes.is_empty() {
            return Err(invalid(&codes.path, "must name at least one code"));
        }
        m.retry_policy = Some(RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff,
            backoff_multiplier,
            retryable_status_codes,
        });
    }
    if let Some(h) = hedging {
        let ho = h.object()?;
        h.known(ho, &["maxAttempts", "hedgingDelay", "nonFatalStatusCodes"]);
        let max_attempts = max_attempts(&h.require(ho, "maxAttempts")?)?;
        let hedging_delay = match h.get(ho, "hedgingDelay") {
            Some(d) => d.duration()?,
            None => Duration::ZERO,
        };
        let non_fatal_status_codes = match h.get(ho, "nonFatalStatusCodes") {
            Some(c) => c.codes()?,
            None => Vec::new(),
        };
        m.hedging_policy = Some(HedgingPolicy {
            max_attempts,
            hedging_delay,
            non_fatal_status_codes,
        });
    }
    Ok(m)
}
