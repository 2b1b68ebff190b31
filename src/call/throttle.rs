//! `retryThrottling` (gRFC A6): one token bucket per channel, shared by
//! retries and hedges, refilled by calls that end OK.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::{Code, Status};

use crate::connection::grpc_status;
use crate::service_config::RetryThrottling;

/// `retryThrottling`: one token bucket per channel, shared by retries and
/// hedges, in thousandths of a token.
#[derive(Debug)]
pub(crate) struct Throttle {
    pub(super) milli_tokens: AtomicU64,
    pub(super) max: u64,
    pub(super) ratio: u64,
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
    pub(crate) fn tokens(&self) -> f64 {
        self.milli_tokens.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// A committed call's response body that refunds the token bucket when
/// the call ends OK.
pub(super) struct Refunding {
    pub(super) body: Body,
    pub(super) throttle: Option<Arc<Throttle>>,
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

/// A server's `grpc-retry-pushback-ms`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pushback {
    Absent,
    /// Don't retry: negative or malformed.
    Stop,
    After(Duration),
}

pub(super) fn pushback(headers: &http::HeaderMap) -> Pushback {
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
