//! Max connection age: make-before-break recycling.
//!
//! When a connection reaches its age (±10 % per connection, so a fleet of
//! clients doesn't reconnect in step), a replacement is opened beside it.
//! Once the replacement's health stream says SERVING, new calls move to it.
//! The old connection stops its health stream and keeps its calls until they
//! finish, for at most the grace period (30 s by default). Then it is closed.
//! No call fails because of a recycle.
//!
//! gRPC servers offer MAX_CONNECTION_AGE (gRFC A9); no mainstream client
//! does. Here the client owner controls it, which helps when the servers
//! can't be configured, or when new pods behind an L4 load balancer must get
//! a share of long-lived clients.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use tokio::time::{Sleep, sleep};
use tracing::{debug, warn};

use super::active::{Active, ConnEvent, Ctx, establish};
use crate::Error;
use crate::backoff::{Backoff, jittered};
use crate::connection::HealthEvent;

/// Spread of each connection's age.
const AGE_JITTER: f64 = 0.1;

/// The replacement of one connection, from its age to a serving successor.
pub(crate) struct Recycle {
    ctx: Arc<Ctx>,
    state: State,
    backoff: Backoff,
}

enum State {
    Off,
    /// Until the age is reached, or until a failed attempt is retried.
    Waiting(Pin<Box<Sleep>>),
    Connecting(BoxFuture<'static, Result<(Active, HealthEvent), Error>>),
    /// Connected, not yet SERVING; given up after the connect timeout.
    Candidate(Box<Active>, Pin<Box<Sleep>>),
}

// === impl Recycle ===

impl Recycle {
    /// Schedules the replacement of a connection established just now.
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        let backoff = Backoff::new(ctx.config.backoff);
        let mut recycle = Self {
            ctx,
            state: State::Off,
            backoff,
        };
        recycle.schedule();
        recycle
    }

    fn schedule(&mut self) {
        self.state = match self.ctx.config.max_connection_age {
            Some(age) => State::Waiting(Box::pin(sleep(jittered(age, AGE_JITTER)))),
            None => State::Off,
        };
    }

    fn retry(&mut self, why: &dyn std::fmt::Display) {
        let delay = self.backoff.next_delay();
        warn!(
            endpoint = %self.ctx.shared.endpoint.addr(),
            error = %why,
            retry_in_ms = delay.as_millis() as u64,
            "the replacement connection did not become SERVING; the current one stays"
        );
        self.state = State::Waiting(Box::pin(sleep(delay)));
    }

    /// Ready with a SERVING replacement.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Active> {
        loop {
            match &mut self.state {
                State::Off => return Poll::Pending,
                State::Waiting(wait) => {
                    ready!(wait.as_mut().poll(cx));
                    debug!(endpoint = %self.ctx.shared.endpoint.addr(), "max connection age reached; opening a replacement");
                    let limit = self.ctx.config.connect_timeout;
                    self.state = State::Connecting(Box::pin(establish(self.ctx.clone(), limit)));
                }
                State::Connecting(connecting) => match ready!(connecting.as_mut().poll(cx)) {
                    Ok((active, first)) => {
                        if self.ctx.shared.health_state(&first).is_serving() {
                            return Poll::Ready(self.ready(active));
                        }
                        let deadline = Box::pin(sleep(self.ctx.config.connect_timeout));
                        self.state = State::Candidate(Box::new(active), deadline);
                    }
                    Err(error) => self.retry(&error),
                },
                State::Candidate(..) => {
                    let State::Candidate(mut candidate, mut deadline) =
                        std::mem::replace(&mut self.state, State::Off)
                    else {
                        return Poll::Pending;
                    };
                    match candidate.poll_event(cx) {
                        Poll::Ready(ConnEvent::Health(event)) => {
                            if self.ctx.shared.health_state(&event).is_serving() {
                                return Poll::Ready(self.ready(*candidate));
                            }
                            self.state = State::Candidate(candidate, deadline);
                        }
                        Poll::Ready(ConnEvent::Lost(lost)) => {
                            self.retry(&lost.error(self.ctx.shared.endpoint.addr()));
                        }
                        Poll::Ready(ConnEvent::GoingAway(goaway)) => self.retry(&goaway),
                        Poll::Pending => {
                            if deadline.as_mut().poll(cx).is_pending() {
                                self.state = State::Candidate(candidate, deadline);
                                return Poll::Pending;
                            }
                            let limit = self.ctx.config.connect_timeout;
                            self.retry(&format!("not SERVING within {limit:?}"));
                        }
                    }
                }
            }
        }
    }

    fn ready(&mut self, active: Active) -> Active {
        self.backoff.reset();
        self.schedule();
        active
    }
}
