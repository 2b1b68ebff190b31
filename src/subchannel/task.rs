//! The subchannel's background task: connect, serve, notice the end,
//! reconnect.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Sleep, sleep};
use tracing::{debug, info, warn};

use super::call::h2_error;
use super::config::SubchannelConfig;
use super::connect::{Conn, Driver, GoAway, Http2Settings, Origin, connect};
use super::health::{HealthEvent, HealthWatch, Probe, probe};
use super::max_age::{Recycle, drain};
use super::{Shared, SubchannelState};
use crate::Error;
use crate::backoff::Backoff;

/// What the task works with.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Arc<SubchannelConfig>,
    pub(crate) origin: Arc<Origin>,
}

pub(crate) async fn run(ctx: Arc<Ctx>, stopped: oneshot::Receiver<()>) {
    let addr = ctx.shared.endpoint.addr();
    let grace = ctx.config.max_connection_age_grace;
    let mut task = Task {
        backoff: Backoff::new(ctx.config.backoff),
        ctx,
        active: None,
        drains: JoinSet::new(),
    };
    tokio::select! {
        _ = stopped => {}
        _ = task.run() => {}
    }
    // Removed or dropped: no new calls come, and the calls in flight finish
    // within the grace period before the connection closes.
    if let Some(active) = task.active.take() {
        task.drains.spawn(drain(active, Some(grace)));
    }
    let drained = async { while task.drains.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(grace, drained).await;
    debug!(endpoint = %addr, "subchannel stopped");
}

struct Task {
    ctx: Arc<Ctx>,
    backoff: Backoff,
    /// The connection calls go to, once established.
    active: Option<Active>,
    /// Replaced connections finishing their calls.
    drains: JoinSet<()>,
}

impl Task {
    async fn run(&mut self) {
        let shared = self.ctx.shared.clone();
        let addr = shared.endpoint.addr();
        loop {
            // gRPC: an attempt gets at least connect_timeout, or the current
            // backoff if longer.
            let limit = self.ctx.config.connect_timeout.max(self.backoff.current());
            match establish(self.ctx.clone(), limit).await {
                Err(error) => {
                    shared.publish(SubchannelState::TransientFailure(error), None, None);
                    shared.resolve_now();
                    let delay = self.backoff.next_delay();
                    debug!(endpoint = %addr, retry_in_ms = delay.as_millis() as u64, "connect failed; backing off");
                    self.idle_for(delay).await;
                }
                Ok((active, first)) => {
                    self.backoff.reset();
                    shared.stats.connects.fetch_add(1, Ordering::Relaxed);
                    let lost = self.serve(active, first).await;
                    let error = lost.error(addr);
                    match &lost {
                        Lost::Closed | Lost::GoAway { graceful: true, .. } => {
                            debug!(endpoint = %addr, "the server closed the connection; reconnecting");
                            shared.publish(SubchannelState::Connecting, None, None);
                        }
                        Lost::GoAway {
                            too_many_pings: true,
                            ..
                        } => {
                            let doubled = shared.keep_alive().map(|d| d * 2);
                            shared.set_keep_alive(doubled);
                            warn!(
                                endpoint = %addr,
                                http2_keep_alive_interval_ms = doubled.map(|d| d.as_millis() as u64),
                                "the server sent GOAWAY too_many_pings; doubling the keepalive interval"
                            );
                            shared.publish(SubchannelState::TransientFailure(error), None, None);
                        }
                        _ => shared.publish(SubchannelState::TransientFailure(error), None, None),
                    }
                }
            }
        }
    }

    /// Sleeps, reaping finished drains meanwhile.
    async fn idle_for(&mut self, delay: Duration) {
        let wake = sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => return,
                Some(_) = self.drains.join_next(), if !self.drains.is_empty() => {}
            }
        }
    }

    /// Runs an established connection until it is lost.
    async fn serve(&mut self, active: Active, first: HealthEvent) -> Lost {
        let shared = self.ctx.shared.clone();
        let health = |event: &HealthEvent| match event {
            HealthEvent::Status(value) => Some(*value),
            _ => None,
        };
        shared.publish(
            shared.health_state(&first),
            Some(active.conn.clone()),
            health(&first),
        );
        self.active = Some(active);
        let mut recycle = Recycle::new(self.ctx.clone());
        loop {
            let Some(active) = self.active.as_mut() else {
                return Lost::Closed;
            };
            tokio::select! {
                event = active.next_event() => match event {
                    ConnEvent::Health(event) => {
                        let state = shared.health_state(&event);
                        shared.publish(state, Some(active.conn.clone()), health(&event));
                    }
                    ConnEvent::Lost(lost) => {
                        shared.stats.metrics.recycle("lost");
                        self.active = None;
                        return lost;
                    }
                    ConnEvent::GoingAway(goaway) => {
                        info!(
                            endpoint = %shared.endpoint.addr(),
                            goaway = %goaway,
                            in_flight = active.conn.in_flight(),
                            "the server is closing the connection; new calls wait for a new one"
                        );
                        shared.stats.metrics.recycle(if goaway.is_too_many_pings() { "too_many_pings" } else { "goaway" });
                        let lost = Lost::GoAway {
                            too_many_pings: goaway.is_too_many_pings(),
                            graceful: goaway.code == h2::Reason::NO_ERROR,
                            message: goaway.to_string(),
                        };
                        // Calls the server accepted finish, under the server's own grace.
                        if let Some(old) = self.active.take() {
                            self.drains.spawn(drain(old, None));
                        }
                        return lost;
                    }
                },
                next = recycle.next() => {
                    let old = std::mem::replace(active, next);
                    shared.stats.recycles.fetch_add(1, Ordering::Relaxed);
                    shared.stats.metrics.recycle("max_age");
                    shared.publish(SubchannelState::Serving, Some(active.conn.clone()), Some(1));
                    info!(
                        endpoint = %shared.endpoint.addr(),
                        age_ms = old.conn.established.elapsed().as_millis() as u64,
                        in_flight = old.conn.in_flight(),
                        "connection recycled: new calls go to the replacement"
                    );
                    self.drains.spawn(drain(old, Some(self.ctx.config.max_connection_age_grace)));
                }
                Some(_) = self.drains.join_next(), if !self.drains.is_empty() => {}
            }
        }
    }
}

/// Connects and waits for the first health answer: a connection counts as
/// established once the server has spoken HTTP/2 and gRPC on it.
pub(crate) async fn establish(
    ctx: Arc<Ctx>,
    limit: Duration,
) -> Result<(Active, HealthEvent), Error> {
    let addr = ctx.shared.endpoint.addr();
    let config = &ctx.config;
    let attempt = async {
        let settings = Http2Settings {
            keep_alive_interval: ctx.shared.keep_alive(),
            keep_alive_timeout: config.http2_keep_alive_timeout,
            keep_alive_while_idle: config.http2_keep_alive_while_idle,
        };
        let (conn, driver) = connect(
            addr,
            settings,
            config.tcp_keepalive,
            ctx.origin.clone(),
            #[cfg(feature = "tls")]
            config.tls.as_ref(),
            ctx.shared.stats.clone(),
        )
        .await?;
        let mut active = Active::new(conn, driver, config);
        if active.health.is_none() {
            // No health stream: one probe proves the peer speaks gRPC.
            let conn = active.conn.clone();
            let answer = probe(&conn, &config.health_service, limit);
            tokio::pin!(answer);
            // The driver must run for the probe to get through.
            let outcome = poll_fn(|cx| match active.driver.as_mut().poll(cx) {
                Poll::Ready(result) => Poll::Ready(Err(Lost::from_driver(result))),
                Poll::Pending => answer.as_mut().poll(cx).map(Ok),
            })
            .await;
            return match outcome.map_err(|lost| lost.error(addr))? {
                Probe::Alive => Ok((active, HealthEvent::Status(1))),
                Probe::Closed => Err(Error::connect(
                    "connection closed",
                    format!("{addr} closed the connection right after it opened"),
                    None,
                )),
                Probe::Dead(why) => Err(Error::connect(
                    "connect failed",
                    format!("{addr}: {why}"),
                    None,
                )),
            };
        }
        match active.next_event().await {
            ConnEvent::Health(HealthEvent::Ended(_)) if !active.conn.is_ready() => {
                Err(Error::connect(
                    "connection closed",
                    format!("{addr} closed the connection before answering the health check"),
                    None,
                ))
            }
            ConnEvent::Health(first) => Ok((active, first)),
            ConnEvent::GoingAway(goaway) => Err(Error::connect(
                "GOAWAY",
                format!("{addr} sent {goaway} before answering the health check"),
                None,
            )),
            ConnEvent::Lost(lost) => Err(lost.error(addr)),
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::connect(
            "connect timed out",
            format!(
                "{addr} did not answer within the connect timeout of {limit:?} (TCP, HTTP/2 and the first health answer)"
            ),
            None,
        )),
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Lost {
    /// GOAWAY NO_ERROR, or a clean close: the server is recycling it or
    /// shutting down.
    Closed,
    /// The server sent GOAWAY; `graceful` when its code is NO_ERROR.
    GoAway {
        too_many_pings: bool,
        graceful: bool,
        message: String,
    },
    /// The transport failed.
    Failed(String),
    /// The liveness probe went unanswered.
    Silent(String),
}

impl Lost {
    fn from_driver(result: Result<(), hyper::Error>) -> Self {
        let err = match result {
            Ok(()) => return Lost::Closed,
            Err(err) => err,
        };
        if err.is_timeout() {
            return Lost::Failed(format!("an HTTP/2 keepalive PING went unanswered: {err}"));
        }
        match h2_error(&err) {
            Some(h2) if h2.is_go_away() && h2.is_remote() => {
                let message = h2.to_string();
                Lost::GoAway {
                    too_many_pings: h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                        && message.contains("too_many_pings"),
                    graceful: h2.reason() == Some(h2::Reason::NO_ERROR),
                    message,
                }
            }
            _ => Lost::Failed(err.to_string()),
        }
    }

    pub(crate) fn error(&self, addr: std::net::SocketAddr) -> Error {
        match self {
            Lost::Closed => Error::connect(
                "connection closed",
                format!("{addr} closed the connection"),
                None,
            ),
            Lost::GoAway { message, .. } => Error::connect(
                "GOAWAY",
                format!("{addr} closed the connection: {message}"),
                None,
            ),
            Lost::Failed(why) => Error::connect(
                "connection lost",
                format!("the connection to {addr} failed: {why}"),
                None,
            ),
            Lost::Silent(why) => Error::connect(
                "no liveness answer",
                format!("{addr} went silent: {why}"),
                None,
            ),
        }
    }
}

/// What an established connection reports.
pub(crate) enum ConnEvent {
    Health(HealthEvent),
    /// The server sent GOAWAY: no new calls may start on the connection.
    GoingAway(GoAway),
    Lost(Lost),
}

/// An established connection with its health stream and liveness probe.
pub(crate) struct Active {
    pub(crate) conn: Arc<Conn>,
    pub(crate) driver: Driver,
    pub(crate) health: Option<HealthWatch>,
    probe: ProbeState,
    probe_interval: Option<Duration>,
    probe_timeout: Duration,
    service: Arc<str>,
    goaway_reported: bool,
}

enum ProbeState {
    Off,
    Waiting(Pin<Box<Sleep>>),
    Running(BoxFuture<'static, Probe>),
}

impl Active {
    fn new(conn: Arc<Conn>, driver: Driver, config: &SubchannelConfig) -> Self {
        let health = config.health_check.then(|| {
            HealthWatch::start(conn.clone(), config.health_service.clone(), config.backoff)
        });
        let probe = match config.liveness_interval {
            Some(every) => ProbeState::Waiting(Box::pin(sleep(every))),
            None => ProbeState::Off,
        };
        Self {
            conn,
            driver,
            health,
            probe,
            probe_interval: config.liveness_interval,
            probe_timeout: config.liveness_timeout,
            service: config.health_service.as_str().into(),
            goaway_reported: false,
        }
    }

    /// The next event; cancel-safe, as all progress lives in `self`. Not to
    /// be called again after it returned [`ConnEvent::Lost`].
    pub(crate) async fn next_event(&mut self) -> ConnEvent {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<ConnEvent> {
        if let Poll::Ready(result) = self.driver.as_mut().poll(cx) {
            return Poll::Ready(ConnEvent::Lost(Lost::from_driver(result)));
        }
        if !self.goaway_reported {
            if let Poll::Ready(goaway) = self.conn.poll_goaway(cx) {
                self.goaway_reported = true;
                return Poll::Ready(ConnEvent::GoingAway(goaway));
            }
        }
        if let Some(lost) = self.poll_probe(cx) {
            return Poll::Ready(ConnEvent::Lost(lost));
        }
        if let Some(health) = &mut self.health {
            if let Poll::Ready(event) = health.poll_event(cx) {
                return Poll::Ready(ConnEvent::Health(event));
            }
        }
        Poll::Pending
    }

    fn poll_probe(&mut self, cx: &mut Context<'_>) -> Option<Lost> {
        loop {
            match &mut self.probe {
                ProbeState::Off => return None,
                ProbeState::Waiting(wait) => {
                    if wait.as_mut().poll(cx).is_pending() {
                        return None;
                    }
                    let (conn, service, timeout) =
                        (self.conn.clone(), self.service.clone(), self.probe_timeout);
                    self.probe = ProbeState::Running(Box::pin(async move {
                        probe(&conn, &service, timeout).await
                    }));
                }
                ProbeState::Running(running) => {
                    let outcome = match running.as_mut().poll(cx) {
                        Poll::Pending => return None,
                        Poll::Ready(outcome) => outcome,
                    };
                    let every = self.probe_interval.unwrap_or(Duration::from_secs(15));
                    self.probe = ProbeState::Waiting(Box::pin(sleep(every)));
                    match outcome {
                        // A closed connection: the driver reports why.
                        Probe::Alive | Probe::Closed => {}
                        Probe::Dead(why) => {
                            self.conn.kill();
                            return Some(Lost::Silent(why));
                        }
                    }
                }
            }
        }
    }
}
