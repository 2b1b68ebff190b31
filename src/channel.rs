//! [`LbChannel`]: the front door. A tower service any tonic-generated client
//! accepts, sending each call round robin to a SERVING endpoint.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use crate::balancer::{Running, ServingSet};
use crate::deadline::{deadline_in, encode_grpc_timeout, grpc_timeout, with_deadline};
use crate::discover::Discover;
use crate::error::{Error, ErrorKind};
use crate::picker::Picker;
use crate::response::{BoxError, ResponseFuture};
use crate::service_config::ServiceConfig;
use crate::status::EndpointStatus;
use crate::subchannel::{MAX_ATTEMPTS, NoSlot, Pool, Replay, Sent, Subchannel};

/// A load-balanced channel: round robin over the endpoints of one target that
/// report SERVING.
///
/// It replaces `tonic::transport::Channel` in any generated client. Cloning
/// is cheap, and clones share everything. Background tasks resolve the
/// target, connect to each endpoint and watch its health whether or not
/// calls flow; the last clone's drop ends them all.
///
/// See the crate's quickstart for use with a generated client. With
/// [`Builder::connect`](crate::Builder::connect) the channel waits for a SERVING endpoint first, and
/// [`discover`](Self::discover) feeds tower's own balancers:
///
/// ```no_run
/// # async fn run() -> Result<(), healthlb::Error> {
/// use std::time::Duration;
///
/// let channel = healthlb::LbChannel::builder("srv:_grpc._tcp.echo.default.svc.cluster.local")
///     .ready_timeout(Duration::from_secs(2)) // default 5 s
///     .connect() // waits up to connect_deadline (20 s) for one SERVING endpoint
///     .await?;
/// let p2c = tower::balance::p2c::Balance::new(channel.discover());
/// # drop(p2c);
/// # Ok(())
/// # }
/// ```
pub struct LbChannel {
    shared: Arc<ChannelShared>,
    /// Ends the balancer when the last clone drops.
    _stop: Arc<oneshot::Sender<()>>,
    /// The endpoint `poll_ready` picked for the next `call`.
    picked: Option<Arc<Pool>>,
}

pub(crate) struct ChannelShared {
    pub(crate) target: Arc<str>,
    pub(crate) picker: Arc<Picker>,
    pub(crate) endpoints: Arc<ArcSwap<Vec<Subchannel>>>,
    pub(crate) serving: watch::Receiver<ServingSet>,
    pub(crate) ready_timeout: Duration,
    pub(crate) fail_fast: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) service_config: Option<Arc<ServiceConfig>>,
}

/// How the channel treats each call.
pub(crate) struct CallSettings {
    pub(crate) ready_timeout: Duration,
    pub(crate) fail_fast: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) service_config: Option<Arc<ServiceConfig>>,
}

impl Clone for LbChannel {
    /// Another handle on the same balancer. It starts with nothing picked.
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _stop: self._stop.clone(),
            picked: None,
        }
    }
}

impl fmt::Debug for LbChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LbChannel")
            .field("target", &self.shared.target)
            .field("endpoints", &self.shared.picker.summary())
            .finish_non_exhaustive()
    }
}

// === impl LbChannel ===

impl LbChannel {
    /// A channel over a started balancer.
    pub(crate) fn new(target: Arc<str>, running: Running, settings: CallSettings) -> Self {
        let CallSettings {
            ready_timeout,
            fail_fast,
            timeout,
            service_config,
        } = settings;
        let Running {
            picker,
            endpoints,
            serving,
            stop,
        } = running;
        Self {
            shared: Arc::new(ChannelShared {
                target,
                picker,
                endpoints,
                serving,
                ready_timeout,
                fail_fast,
                timeout,
                service_config,
            }),
            _stop: Arc::new(stop),
            picked: None,
        }
    }

    /// The target, as written.
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// The service config given to
    /// [`Builder::default_service_config`](crate::Builder::default_service_config),
    /// parsed; `None` without one.
    pub fn service_config(&self) -> Option<&ServiceConfig> {
        self.shared.service_config.as_deref()
    }

    /// Every resolved endpoint with its state and counters. It reads what
    /// the background tasks publish; calls never wait for it.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.shared
            .endpoints
            .load()
            .iter()
            .map(EndpointStatus::of)
            .collect()
    }

    /// A [`tower::discover::Discover`] of the SERVING endpoints, keyed by
    /// address, for tower's own balancers such as `p2c::Balance`.
    pub fn discover(&self) -> Discover {
        Discover::new(self.shared.serving.clone())
    }

    /// Waits until at least one endpoint is SERVING, for at most `limit`.
    /// The error names the target and every endpoint's state.
    ///
    /// Not named `ready`, so it doesn't hide `tower::ServiceExt::ready`.
    pub async fn wait_for_serving(&self, limit: Duration) -> Result<(), Error> {
        let until = deadline_in(limit);
        match self.shared.wait_pick(until).await {
            Ok(_) => Ok(()),
            Err(_) => {
                let mut states: Vec<String> = self
                    .endpoints()
                    .iter()
                    .map(|e| format!("{} {}", e.addr, e.state))
                    .collect();
                if states.is_empty() {
                    states.push(self.shared.picker.summary());
                }
                Err(Error::new(
                    ErrorKind::Unavailable,
                    Some(self.shared.target.clone()),
                    format!(
                        "no endpoint became SERVING within {limit:?}: {}",
                        states.join("; ")
                    ),
                ))
            }
        }
    }
}

impl ChannelShared {
    /// A serving endpoint, waiting until `until` for one.
    async fn wait_pick(&self, until: Instant) -> Result<Arc<Pool>, Status> {
        let mut published = self.picker.subscribe();
        let started = Instant::now();
        let mut waited = false;
        loop {
            if let Some(conn) = self.picker.pick() {
                if waited {
                    crate::metrics::pick_wait(&self.target, started.elapsed());
                }
                return Ok(conn);
            }
            waited = true;
            if self.fail_fast {
                return Err(Status::unavailable(format!(
                    "{}: no endpoint is SERVING (fail_fast); {}",
                    self.target,
                    self.picker.summary()
                )));
            }
            match tokio::time::timeout_at(until, published.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(Status::unavailable(format!(
                        "{}: the channel has shut down",
                        self.target
                    )));
                }
                Err(_) => {
                    crate::metrics::pick_wait(&self.target, started.elapsed());
                    return Err(Status::unavailable(format!(
                        "{}: no endpoint is SERVING after waiting {:?}; {}",
                        self.target,
                        self.ready_timeout,
                        self.picker.summary()
                    )));
                }
            }
        }
    }
}

impl tower::Service<Request<Body>> for LbChannel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Picks the endpoint for the next call, and is always ready at once.
    /// With none SERVING, the call itself waits, up to the ready timeout or
    /// its deadline, whichever ends first: only the call knows its deadline.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if !self.picked.as_ref().is_some_and(|c| c.is_ready()) {
            self.picked = self.shared.picker.pick();
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> ResponseFuture {
        let shared = self.shared.clone();
        let mut picked = self.picked.take();
        let deadline = call_deadline(&mut request, self.shared.timeout);
        ResponseFuture::new(with_deadline(deadline, async move {
            let until = deadline_in(shared.ready_timeout);
            let mut replay = Replay::new(request);
            for _ in 0..MAX_ATTEMPTS {
                let pool = match picked.take() {
                    Some(pool) if pool.is_ready() => pool,
                    // Closed since it was picked: take the next one.
                    _ => shared.wait_pick(until).await?,
                };
                let slot = match pool.acquire(until).await {
                    Ok(slot) => slot,
                    // Its connections closed meanwhile: pick again.
                    Err(NoSlot::Closed) => continue,
                    Err(why) => {
                        return Err(Status::unavailable(format!(
                            "{}: {}, after waiting {:?}",
                            shared.target,
                            pool.refusal(why),
                            shared.ready_timeout
                        )));
                    }
                };
                match slot.send(replay).await {
                    Sent::Response(response) => return Ok(response),
                    Sent::Failed(status) => return Err(status),
                    // The connection closed before the call left: another
                    // endpoint takes it.
                    Sent::Unsent(unsent) => replay = unsent,
                }
            }
            Err(Status::unavailable(format!(
                "{}: {MAX_ATTEMPTS} connections closed in a row before the call could be sent",
                shared.target
            )))
        }))
    }
}

/// The call's deadline: the shorter of its own `grpc-timeout` and the
/// channel's `timeout`. A call without one is given the channel's, header
/// included, so the server knows it too.
fn call_deadline(request: &mut Request<Body>, timeout: Option<Duration>) -> Option<Duration> {
    match (grpc_timeout(request.headers()), timeout) {
        (Some(own), Some(channel)) => Some(own.min(channel)),
        (Some(own), None) => Some(own),
        (None, Some(channel)) => {
            request
                .headers_mut()
                .insert("grpc-timeout", encode_grpc_timeout(channel));
            Some(channel)
        }
        (None, None) => None,
    }
}
