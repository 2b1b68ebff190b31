//! Liveness: notice a peer that went silent, and never mistake a busy or
//! full connection for a dead one.
//!
//! Anything the peer sends proves it alive, so the probe runs only after
//! `liveness_interval` without a single byte read from it. It is one unary
//! `grpc.health.v1.Health/Check`: any answer at all, whatever its status,
//! proves the peer alive. No answer within `liveness_timeout`, and still
//! nothing else read meanwhile, closes the connection. So a black-holed peer
//! is out within `liveness_interval + liveness_timeout` of its last word,
//! plus up to a sixteenth of the interval (at most 250 ms): probes fall due
//! on a grid so that an idle channel's go out in batches.
//!
//! A probe is a stream, and a server caps its streams. The pool keeps a slot
//! free for it; where the server's cap is too small for that, a probe that
//! would have to queue behind calls is not sent, and its absence proves
//! nothing. A probe is a call, not a PING, so no server counts it as a
//! keepalive strike (gRFC A8).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http::Request;
use http_body_util::{BodyExt, Limited};
use prost::Message;
use tokio::time::{Sleep, sleep, sleep_until};
use tonic::body::Body;
use tonic_health::pb::HealthCheckRequest;
use tracing::debug;

use super::conn::Conn;
use super::conn::Internal;
use crate::deadline::capped;

/// The most of a probe's answer that is read: a `HealthCheckResponse` is a
/// few bytes, and a peer sending more is alive all the same.
const PROBE_BODY_LIMIT: usize = 4 * 1024;

/// The outcome of one liveness probe.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The peer answered.
    Alive,
    /// The connection had closed: it takes no new calls (after a GOAWAY).
    Closed,
    /// No answer, or the transport failed.
    Dead(String),
}

/// The channel-wide cap on liveness probes: with more endpoints than
/// `interval × per_second`, each endpoint's interval stretches to
/// `endpoints ÷ per_second`, so an idle channel probes at a fixed rate
/// whatever its size.
#[derive(Debug)]
pub(crate) struct ProbeRate {
    endpoints: AtomicUsize,
    per_second: f64,
}

impl ProbeRate {
    pub(crate) fn new(per_second: f64) -> Arc<Self> {
        Arc::new(Self {
            endpoints: AtomicUsize::new(0),
            per_second,
        })
    }

    /// The balancer's endpoint count changed.
    pub(crate) fn set_endpoints(&self, n: usize) {
        self.endpoints.store(n, Ordering::Relaxed);
    }

    /// The interval each endpoint waits: `base`, or longer to keep the rate.
    pub(crate) fn interval(&self, base: Duration) -> Duration {
        let endpoints = self.endpoints.load(Ordering::Relaxed) as f64;
        let spread =
            Duration::try_from_secs_f64(endpoints / self.per_second).unwrap_or(Duration::MAX);
        base.max(spread)
    }
}

/// One connection's liveness checks.
pub(crate) struct Liveness {
    interval: Duration,
    rate: Option<Arc<ProbeRate>>,
    timeout: Duration,
    service: Arc<str>,
    state: State,
}

enum State {
    Off,
    /// Until `interval` after the last byte read.
    Waiting(Pin<Box<Sleep>>),
    Probing {
        probe: BoxFuture<'static, Probe>,
        sent: Instant,
    },
}

// === impl Liveness ===

impl Liveness {
    pub(crate) fn new(
        interval: Option<Duration>,
        rate: Option<Arc<ProbeRate>>,
        timeout: Duration,
        service: &str,
    ) -> Self {
        let state = match interval {
            Some(every) => {
                let every = rate.as_ref().map_or(every, |r| r.interval(every));
                State::Waiting(Box::pin(sleep(capped(every))))
            }
            None => State::Off,
        };
        Self {
            interval: interval.unwrap_or(Duration::MAX),
            rate,
            timeout,
            service: service.into(),
            state,
        }
    }

    /// How long a connection may be silent before it is probed now.
    fn interval(&self) -> Duration {
        match &self.rate {
            Some(rate) => rate.interval(self.interval),
            None => self.interval,
        }
    }

    /// Ready with the reason when the peer is found silent: nothing read for
    /// `interval`, and then no answer to a probe within `timeout`.
    pub(crate) fn poll_silent(&mut self, conn: &Arc<Conn>, cx: &mut Context<'_>) -> Poll<String> {
        loop {
            let interval = self.interval();
            match &mut self.state {
                State::Off => return Poll::Pending,
                State::Waiting(wait) => {
                    ready!(wait.as_mut().poll(cx));
                    let now = Instant::now();
                    let due = after(conn.last_read(), interval);
                    if due > now {
                        wait.as_mut().reset(due.into());
                        continue;
                    }
                    if !conn.probe_has_slot() {
                        // Every stream slot is taken: a probe would queue
                        // behind calls, and its silence would prove nothing.
                        debug!(
                            endpoint = %conn.addr,
                            in_flight = conn.in_flight(),
                            max_streams = conn.max_streams(),
                            "no stream slot for the liveness probe; it waits"
                        );
                        wait.as_mut().reset(after(now, interval).into());
                        continue;
                    }
                    let (conn, service, timeout) =
                        (conn.clone(), self.service.clone(), self.timeout);
                    self.state = State::Probing {
                        probe: Box::pin(async move { probe(&conn, &service, timeout).await }),
                        sent: now,
                    };
                }
                State::Probing { probe, sent } => {
                    let outcome = ready!(probe.as_mut().poll(cx));
                    let sent = *sent;
                    self.state = State::Waiting(Box::pin(sleep_until(
                        after(conn.last_read().max(sent), interval).into(),
                    )));
                    match outcome {
                        // A closed connection: the driver reports why.
                        Probe::Alive | Probe::Closed => {}
                        // The peer spoke meanwhile: alive, whatever became
                        // of the probe.
                        Probe::Dead(_) if conn.last_read() > sent => {}
                        Probe::Dead(why) => return Poll::Ready(why),
                    }
                }
            }
        }
    }
}

/// `at + d`, saturating, rounded up to the probe grid.
fn after(at: Instant, d: Duration) -> Instant {
    on_grid(at + capped(d), (d / 16).min(GRID))
}

/// Probes fall due on a grid shared by the process, so an idle channel's
/// probes go out in batches: the runtime wakes once for many, not once for
/// each. The grid is a sixteenth of the interval, at most 250 ms, so a
/// probe is late by at most that.
const GRID: Duration = Duration::from_millis(250);

/// `at` rounded up to the next point of a grid of `step`.
fn on_grid(at: Instant, step: Duration) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let since = at.saturating_duration_since(epoch).as_nanos();
    let grid = step.as_nanos().max(1);
    let rounded = u64::try_from(since.div_ceil(grid) * grid).unwrap_or(u64::MAX);
    epoch
        .checked_add(Duration::from_nanos(rounded))
        .unwrap_or(at)
}

/// Sends one unary `Health/Check`. Any answer at all, whatever its status,
/// proves the peer alive; only silence or a broken transport doesn't.
pub(crate) async fn probe(conn: &Conn, service: &str, timeout: Duration) -> Probe {
    let request = grpc_request(
        "/grpc.health.v1.Health/Check",
        &HealthCheckRequest {
            service: service.to_owned(),
        },
    );
    let exchange = async {
        match conn.send_internal(request).await {
            Internal::Response(response) => {
                // Read to the end, so the stream closes cleanly; a longer
                // answer is cut off, and still an answer.
                let _ = Limited::new(response.into_body(), PROBE_BODY_LIMIT)
                    .collect()
                    .await;
                Probe::Alive
            }
            Internal::Unsent => Probe::Closed,
            Internal::Failed(status) => Probe::Dead(status.message().to_owned()),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Probe::Dead(format!(
            "no answer to the liveness probe within {timeout:?}"
        )),
    }
}

/// A unary gRPC request with `message` as its body.
fn grpc_request(path: &'static str, message: &impl Message) -> Request<Body> {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Encoding into a buffer with enough room cannot fail.
    let _ = message.encode(&mut buf);
    let body = http_body_util::Full::new(Bytes::from(buf));
    let mut request = Request::new(Body::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(path);
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_round_up_to_the_grid() {
        let now = Instant::now();
        let a = on_grid(now + Duration::from_millis(1), GRID);
        let b = on_grid(now + Duration::from_millis(200), GRID);
        assert!(a >= now + Duration::from_millis(1) && a <= now + GRID + Duration::from_millis(1));
        assert!(b >= now + Duration::from_millis(200));
        // Close due times share a point of the grid, or sit one apart.
        let apart = b.saturating_duration_since(a);
        assert!(apart == Duration::ZERO || apart == GRID, "{apart:?}");
        assert_eq!(on_grid(a, GRID), a, "a point of the grid stays");
        // A short interval gets a fine grid: 100 ms is late by 6.25 ms at most.
        let soon = after(now, Duration::from_millis(100));
        assert!(
            soon <= now + Duration::from_micros(106_250),
            "{:?}",
            soon - now
        );
    }

    #[test]
    fn the_rate_stretches_the_interval_only_past_its_endpoint_count() {
        let rate = ProbeRate::new(200.0);
        let base = Duration::from_secs(15);
        assert_eq!(rate.interval(base), base, "no endpoints yet");
        rate.set_endpoints(3000);
        assert_eq!(rate.interval(base), base);
        rate.set_endpoints(10_000);
        assert_eq!(rate.interval(base), Duration::from_secs(50));
        rate.set_endpoints(usize::MAX);
        assert!(
            rate.interval(base) > Duration::from_secs(1 << 40),
            "no overflow"
        );
    }
}
