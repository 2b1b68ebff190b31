//! The subchannel's background task: it owns the endpoint's connections.
//!
//! - The first connection carries the health Watch: connect, serve, notice
//!   the end, reconnect with backoff. Max age replaces it make-before-break.
//! - Extra connections open when calls find every connection full, close
//!   when idle or past max age, and leave the pool on GOAWAY or failure.
//! - Every change is published to the pool the request path reads.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{Sleep, sleep};
use tracing::{debug, info, warn};

use super::active::{Active, ConnEvent, Ctx, Lost, establish, establish_extra};
use super::max_age::Recycle;
use super::state::SubchannelState;
use crate::Error;
use crate::backoff::{Backoff, jittered};
use crate::connection::HealthEvent;
use crate::connection::HealthStatus;

/// Spread of each extra connection's max age, as for the first one.
const AGE_JITTER: f64 = 0.1;

pub(crate) async fn run(ctx: Arc<Ctx>, stopped: oneshot::Receiver<()>) {
    let addr = ctx.shared.endpoint.addr();
    let grace = ctx.config.max_connection_age_grace;
    let mut task = Task::new(ctx);
    tokio::select! {
        _ = stopped => {}
        _ = poll_fn(|cx| task.poll(cx)) => {}
    }
    // Removed or dropped: no new calls come, and the calls in flight finish
    // within the grace period before the connections close.
    task.shutdown(grace).await;
    debug!(endpoint = %addr, "subchannel stopped");
}

/// Where the endpoint's first connection stands.
enum Primary {
    Connecting(BoxFuture<'static, Result<(Active, HealthEvent), Error>>),
    Backoff(Pin<Box<Sleep>>),
    Connected(Box<Active>, Recycle),
}

/// An extra connection, and when max age retires it.
struct Extra {
    active: Active,
    retire_at: Option<Instant>,
}

struct Task {
    ctx: Arc<Ctx>,
    backoff: Backoff,
    primary: Primary,
    extras: Vec<Extra>,
    opening: FuturesUnordered<BoxFuture<'static, Result<Active, Error>>>,
    /// After a failed extra connect, no other is tried until this passes.
    extra_backoff: Backoff,
    extra_retry: Option<Pin<Box<Sleep>>>,
    /// The next time an extra connection may be idle or old enough to close.
    retire: Pin<Box<Sleep>>,
    /// Connections taken out of the pool, finishing their calls.
    drains: JoinSet<()>,
    /// Connections last reported open to telemetry.
    open_reported: usize,
}

// === impl Task ===

impl Task {
    fn new(ctx: Arc<Ctx>) -> Self {
        let backoff = Backoff::new(ctx.config.backoff);
        let limit = ctx.config.connect_timeout.max(backoff.current());
        Self {
            primary: Primary::Connecting(Box::pin(establish(ctx.clone(), limit))),
            backoff,
            extras: Vec::new(),
            opening: FuturesUnordered::new(),
            extra_backoff: Backoff::new(ctx.config.backoff),
            extra_retry: None,
            retire: Box::pin(sleep(Duration::MAX)),
            drains: JoinSet::new(),
            open_reported: 0,
            ctx,
        }
    }

    /// Runs every part until none can move; never ends by itself.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut moved = self.poll_primary(cx);
            moved |= self.poll_growth(cx);
            moved |= self.poll_opening(cx);
            moved |= self.poll_extras(cx);
            moved |= self.poll_retire(cx);
            while let Poll::Ready(Some(_)) = self.drains.poll_join_next(cx) {}
            if !moved {
                return Poll::Pending;
            }
        }
    }

    /// The first connection's progress; true if its state changed.
    fn poll_primary(&mut self, cx: &mut Context<'_>) -> bool {
        let shared = self.ctx.shared.clone();
        let addr = shared.endpoint.addr();
        match &mut self.primary {
            Primary::Backoff(wait) => {
                if wait.as_mut().poll(cx).is_pending() {
                    return false;
                }
                // gRPC: an attempt gets at least connect_timeout, or the
                // current backoff if longer.
                let limit = self.ctx.config.connect_timeout.max(self.backoff.current());
                self.primary = Primary::Connecting(Box::pin(establish(self.ctx.clone(), limit)));
            }
            Primary::Connecting(connecting) => match connecting.as_mut().poll(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(error)) => {
                    shared
                        .stats
                        .telemetry
                        .connection_attempt(shared.endpoint.zone(), false);
                    shared.publish(SubchannelState::TransientFailure(error), None, None);
                    shared.resolve_now();
                    let delay = self.backoff.next_delay();
                    debug!(endpoint = %addr, retry_in_ms = delay.as_millis() as u64, "connect failed; backing off");
                    self.primary = Primary::Backoff(Box::pin(sleep(delay)));
                }
                Poll::Ready(Ok((active, first))) => {
                    self.backoff.reset();
                    shared.stats.connects.fetch_add(1, Ordering::Relaxed);
                    shared
                        .stats
                        .telemetry
                        .connection_attempt(shared.endpoint.zone(), true);
                    let conn = active.conn.clone();
                    let recycle = Recycle::new(self.ctx.clone());
                    self.primary = Primary::Connected(Box::new(active), recycle);
                    // The connection first, then the state that lets calls
                    // come: the balancer reads both when the state changes.
                    self.publish_pool();
                    shared.publish(
                        shared.health_state(&first),
                        Some(conn),
                        health_value(&first),
                    );
                }
            },
            Primary::Connected(active, recycle) => {
                if let Poll::Ready(event) = active.poll_event(cx) {
                    match event {
                        ConnEvent::Health(event) => {
                            let state = shared.health_state(&event);
                            shared.publish(state, Some(active.conn.clone()), health_value(&event));
                        }
                        ConnEvent::Lost(lost) => {
                            shared.stats.metrics.recycle("lost");
                            self.reconnect(lost);
                        }
                        ConnEvent::GoingAway(goaway) => {
                            info!(
                                endpoint = %addr,
                                goaway = %goaway,
                                in_flight = active.conn.in_flight(),
                                "the server is closing the connection; new calls wait for a new one"
                            );
                            let reason = match goaway.is_too_many_pings() {
                                true => "too_many_pings",
                                false => "goaway",
                            };
                            shared.stats.metrics.recycle(reason);
                            let lost = Lost::GoAway {
                                too_many_pings: goaway.is_too_many_pings(),
                                graceful: goaway.code == h2::Reason::NO_ERROR,
                                message: goaway.to_string(),
                            };
                            // Calls the server accepted finish, under the
                            // server's own grace.
                            if let Some(old) = self.reconnect(lost) {
                                self.drains.spawn(old.drain(None));
                            }
                        }
                    }
                    return true;
                }
                let Poll::Ready(next) = recycle.poll_next(cx) else {
                    return false;
                };
                let old = std::mem::replace(&mut **active, next);
                shared.stats.recycles.fetch_add(1, Ordering::Relaxed);
                shared.stats.metrics.recycle("max_age");
                let conn = active.conn.clone();
                self.publish_pool();
                shared.publish(
                    SubchannelState::Serving,
                    Some(conn),
                    Some(HealthStatus::Serving),
                );
                info!(
                    endpoint = %addr,
                    age_ms = old.conn.established.elapsed().as_millis() as u64,
                    in_flight = old.conn.in_flight(),
                    "connection recycled: new calls go to the replacement"
                );
                let grace = self.ctx.config.max_connection_age_grace;
                self.drains.spawn(old.drain(Some(grace)));
            }
        }
        true
    }

    /// The first connection is gone: publishes why and connects again at
    /// once. Returns the old connection, for a caller that drains it.
    fn reconnect(&mut self, lost: Lost) -> Option<Active> {
        let shared = &self.ctx.shared;
        let addr = shared.endpoint.addr();
        let error = lost.error(addr);
        shared
            .stats
            .telemetry
            .disconnection(shared.endpoint.zone(), lost.reason());
        match &lost {
            Lost::Closed | Lost::GoAway { graceful: true, .. } => {
                debug!(endpoint = %addr, "the server closed the connection; reconnecting");
                shared.publish(SubchannelState::Connecting, None, None);
            }
            Lost::GoAway {
                too_many_pings: true,
                ..
            } => {
                let doubled = shared.keep_alive().map(|d| d.saturating_mul(2));
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
        let limit = self.ctx.config.connect_timeout.max(self.backoff.current());
        let connecting = Primary::Connecting(Box::pin(establish(self.ctx.clone(), limit)));
        let old = match std::mem::replace(&mut self.primary, connecting) {
            Primary::Connected(active, _) => Some(*active),
            _ => None,
        };
        self.publish_pool();
        old
    }

    /// Calls asked for another connection, or a failed attempt's wait is
    /// over: opens as many as the waiting calls need, within the cap.
    fn poll_growth(&mut self, cx: &mut Context<'_>) -> bool {
        let pool = &self.ctx.shared.pool;
        let mut asked = pool.poll_grow(cx).is_ready();
        if let Some(wait) = &mut self.extra_retry {
            if wait.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.extra_retry = None;
            asked = true;
        }
        if !asked {
            return false;
        }
        let Primary::Connected(first, _) = &self.primary else {
            return false;
        };
        if !self.ctx.shared.status.borrow().state().is_serving() {
            return false;
        }
        let max = self.ctx.config.max_connections_per_endpoint;
        let open = 1 + self.extras.len() + self.opening.len();
        let waiters = pool.waiters();
        if open >= max || waiters == 0 {
            return false;
        }
        // An extra takes as many calls as the server allows, less the
        // liveness probe's slot.
        let per_connection = first
            .conn
            .max_streams()
            .saturating_sub(usize::from(first.conn.role.probe))
            .max(1);
        let wanted = waiters
            .div_ceil(per_connection)
            .saturating_sub(self.opening.len())
            .min(max - open);
        for _ in 0..wanted {
            self.opening
                .push(Box::pin(establish_extra(self.ctx.clone())));
        }
        if wanted > 0 {
            debug!(
                endpoint = %self.ctx.shared.endpoint.addr(),
                waiting_calls = waiters,
                opening = wanted,
                connections = open - self.opening.len() + wanted,
                "every connection is at the server's stream limit; opening more"
            );
        }
        wanted > 0
    }

    /// Extra connections being opened.
    fn poll_opening(&mut self, cx: &mut Context<'_>) -> bool {
        let mut moved = false;
        while let Poll::Ready(Some(result)) = self.opening.poll_next_unpin(cx) {
            moved = true;
            match result {
                Ok(active) => {
                    self.extra_backoff.reset();
                    let retire_at = self.ctx.config.max_connection_age.and_then(|age| {
                        active
                            .conn
                            .established
                            .checked_add(jittered(age, AGE_JITTER))
                    });
                    debug!(
                        endpoint = %self.ctx.shared.endpoint.addr(),
                        max_streams = active.conn.max_streams(),
                        connections = self.extras.len() + 2,
                        "extra connection open"
                    );
                    self.extras.push(Extra { active, retire_at });
                    self.publish_pool();
                    self.rearm_retire();
                }
                Err(error) => {
                    let delay = self.extra_backoff.next_delay();
                    warn!(
                        endpoint = %self.ctx.shared.endpoint.addr(),
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "an extra connection failed; calls wait for a free stream slot"
                    );
                    self.extra_retry = Some(Box::pin(sleep(delay)));
                }
            }
        }
        moved
    }

    /// Events of the extra connections: any that is lost or told to go
    /// away leaves the pool.
    fn poll_extras(&mut self, cx: &mut Context<'_>) -> bool {
        let mut moved = false;
        let mut i = 0;
        while i < self.extras.len() {
            let event = match self.extras[i].active.poll_event(cx) {
                Poll::Pending => {
                    i += 1;
                    continue;
                }
                Poll::Ready(event) => event,
            };
            moved = true;
            let addr = self.ctx.shared.endpoint.addr();
            match event {
                // Extras carry no Watch.
                ConnEvent::Health(_) => continue,
                ConnEvent::Lost(lost) => {
                    let extra = self.extras.swap_remove(i);
                    self.ctx.shared.stats.metrics.recycle("lost");
                    debug!(endpoint = %addr, error = %lost.error(addr), "an extra connection was lost");
                    drop(extra);
                }
                ConnEvent::GoingAway(goaway) => {
                    let extra = self.extras.swap_remove(i);
                    self.ctx.shared.stats.metrics.recycle("goaway");
                    debug!(endpoint = %addr, %goaway, "the server is closing an extra connection");
                    self.drains.spawn(extra.active.drain(None));
                }
            }
            self.publish_pool();
        }
        moved
    }

    /// Closes extra connections idle for `extra_connection_idle_timeout`,
    /// or past their max age.
    fn poll_retire(&mut self, cx: &mut Context<'_>) -> bool {
        if self.retire.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = Instant::now();
        let idle_timeout = self.ctx.config.extra_connection_idle_timeout;
        let grace = self.ctx.config.max_connection_age_grace;
        let before = self.extras.len();
        let mut i = 0;
        while i < self.extras.len() {
            let extra = &self.extras[i];
            let idle = extra
                .active
                .conn
                .idle_since()
                .is_some_and(|since| now.saturating_duration_since(since) >= idle_timeout);
            let old = extra.retire_at.is_some_and(|at| at <= now);
            if !(idle || old) {
                i += 1;
                continue;
            }
            let extra = self.extras.swap_remove(i);
            debug!(
                endpoint = %self.ctx.shared.endpoint.addr(),
                reason = if idle { "idle" } else { "max age" },
                connections = self.extras.len() + 1,
                "closing an extra connection"
            );
            self.drains.spawn(extra.active.drain(Some(grace)));
        }
        if self.extras.len() != before {
            self.publish_pool();
        }
        self.rearm_retire();
        // The re-armed timer must be polled to be heard.
        let _ = self.retire.as_mut().poll(cx);
        true
    }

    /// Sets the retire timer to the earliest moment an extra connection may
    /// be due.
    fn rearm_retire(&mut self) {
        let now = Instant::now();
        let idle_timeout = self.ctx.config.extra_connection_idle_timeout;
        let next = self
            .extras
            .iter()
            .map(|extra| {
                // A busy connection is due no sooner than a full idle period
                // from now.
                let since = extra.active.conn.idle_since().unwrap_or(now);
                let idle_due = since.checked_add(idle_timeout);
                match (idle_due, extra.retire_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min();
        match next.flatten() {
            Some(at) => self.retire.as_mut().reset(at.max(now).into()),
            None => self.retire.as_mut().reset(far_future()),
        }
    }

    /// Tells the request path which connections may take calls: the first,
    /// then the extras.
    fn publish_pool(&mut self) {
        let mut conns = Vec::with_capacity(1 + self.extras.len());
        if let Primary::Connected(active, _) = &self.primary {
            conns.push(active.conn.clone());
        }
        conns.extend(self.extras.iter().map(|e| e.active.conn.clone()));
        self.ctx.shared.stats.metrics.connections(conns.len());
        self.report_open(conns.len());
        self.ctx.shared.pool.publish(conns);
        // Whether the endpoint can take calls may have changed with it.
        self.ctx.shared.notify_changed();
    }

    /// Tells telemetry how many connections are open now.
    fn report_open(&mut self, open: usize) {
        let delta = open as i64 - self.open_reported as i64;
        if delta != 0 {
            let shared = &self.ctx.shared;
            let tls = self.ctx.config.is_tls();
            shared
                .stats
                .telemetry
                .open_connections(shared.endpoint.zone(), tls, delta);
            self.open_reported = open;
        }
    }

    /// Takes every connection out of the pool and lets them finish their
    /// calls, for at most `grace`.
    async fn shutdown(mut self, grace: Duration) {
        self.ctx
            .shared
            .publish(SubchannelState::Shutdown, None, None);
        let primary =
            std::mem::replace(&mut self.primary, Primary::Backoff(Box::pin(sleep(grace))));
        if let Primary::Connected(active, _) = primary {
            self.drains.spawn(active.drain(Some(grace)));
        }
        for extra in self.extras.drain(..) {
            self.drains.spawn(extra.active.drain(Some(grace)));
        }
        self.ctx.shared.stats.metrics.connections(0);
        self.report_open(0);
        let zone = self.ctx.shared.endpoint.zone();
        self.ctx
            .shared
            .stats
            .telemetry
            .disconnection(zone, "subchannel shutdown");
        self.ctx.shared.pool.publish(Vec::new());
        let drains = &mut self.drains;
        let drained = async { while drains.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(grace, drained).await;
    }
}

/// The health answer in an event, for `EndpointStatus::last_health`.
fn health_value(event: &HealthEvent) -> Option<HealthStatus> {
    match event {
        HealthEvent::Status(status) => Some(*status),
        _ => None,
    }
}

/// A deadline that never comes in practice.
fn far_future() -> tokio::time::Instant {
    crate::deadline::deadline_in(crate::deadline::FOREVER)
}
