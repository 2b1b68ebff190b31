//! [`LbChannel`]: the front door. A tower service any tonic-generated client
//! accepts, sending each call round robin to a SERVING endpoint.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use crate::balancer::{Balancer, Outputs, ServingSet};
use crate::builder::Builder;
use crate::deadline::{deadline_in, grpc_timeout, with_deadline};
use crate::discover::Discover;
use crate::picker::Picker;
use crate::status::EndpointStatus;
use crate::subchannel::service::{BoxError, MAX_ATTEMPTS};
use crate::subchannel::{NoSlot, Pool, Replay, ResponseFuture, Sent, Subchannel};
use crate::{Error, ErrorKind};

/// A load-balanced channel: round robin over the endpoints of one target that
/// report SERVING.
///
/// It replaces `tonic::transport::Channel` in any generated client. Cloning
/// is cheap, and clones share everything. Background tasks resolve the
/// target, connect to each endpoint and watch its health whether or not
/// calls flow; the last clone's drop ends them all.
///
/// See the crate's quickstart for use with a generated client. With
/// [`Builder::connect`] the channel waits for a SERVING endpoint first, and
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
    /// `poll_ready`'s wait for an endpoint to serve.
    wait: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// `poll_ready` waited the whole ready timeout: the next call fails at
    /// once unless an endpoint serves by then.
    waited_out: bool,
}

pub(crate) struct ChannelShared {
    pub(crate) target: Arc<str>,
    pub(crate) picker: Arc<Picker>,
    pub(crate) endpoints: Arc<ArcSwap<Vec<Subchannel>>>,
    pub(crate) serving: watch::Receiver<ServingSet>,
    pub(crate) ready_timeout: Duration,
    pub(crate) fail_fast: bool,
}

impl Clone for LbChannel {
    /// Another handle on the same balancer. It starts with nothing picked.
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _stop: self._stop.clone(),
            picked: None,
            wait: None,
            waited_out: false,
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
    /// A builder for a channel to `target`, in gRPC's target syntax:
    /// `dns:///host:port`, `dns://server/host:port`, `host:port`,
    /// `ipv4:a:p,b:p`, `ipv6:[a]:p,...` or `srv:_grpc._tcp.name`.
    pub fn builder(target: impl Into<String>) -> Builder {
        Builder::new(target.into())
    }

    /// Starts the background tasks for a built configuration.
    pub(crate) fn start(balancer: BalancerParts) -> Self {
        let BalancerParts {
            target,
            resolver,
            config,
            authority,
            ready_timeout,
            fail_fast,
            runtime,
        } = balancer;
        let picker = Arc::new(Picker::new(format!(
            "0 endpoints ({target} is being resolved)"
        )));
        let endpoints = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let (serving_tx, serving) = watch::channel(ServingSet::default());
        let (stop, stopped) = oneshot::channel();
        let balancer = Balancer {
            target: target.clone(),
            resolver,
            config,
            authority,
            ready_timeout,
            outputs: Outputs {
                picker: picker.clone(),
                endpoints: endpoints.clone(),
                serving: serving_tx,
            },
        };
        runtime.spawn(balancer.run(stopped));
        Self {
            shared: Arc::new(ChannelShared {
                target,
                picker,
                endpoints,
                serving,
                ready_timeout,
                fail_fast,
            }),
            _stop: Arc::new(stop),
            picked: None,
            wait: None,
            waited_out: false,
        }
    }

    /// The target, as written.
    pub fn target(&self) -> &str {
        &self.shared.target
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

/// What [`Builder::build`] hands to [`LbChannel::start`].
pub(crate) struct BalancerParts {
    pub(crate) target: Arc<str>,
    pub(crate) resolver: crate::resolve::Resolver,
    pub(crate) config: Arc<crate::SubchannelConfig>,
    pub(crate) authority: Option<http::uri::Authority>,
    pub(crate) ready_timeout: Duration,
    pub(crate) fail_fast: bool,
    pub(crate) runtime: tokio::runtime::Handle,
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

    /// Picks the endpoint for the next call. With none SERVING it waits, up
    /// to the ready timeout, then reports ready anyway: the call then fails
    /// with UNAVAILABLE and a summary, rather than hang. Never an error.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.picked.as_ref().is_some_and(|c| c.is_ready()) {
            return Poll::Ready(Ok(()));
        }
        if let Some(conn) = self.shared.picker.pick() {
            self.picked = Some(conn);
            self.wait = None;
            self.waited_out = false;
            return Poll::Ready(Ok(()));
        }
        if self.shared.fail_fast {
            return Poll::Ready(Ok(()));
        }
        let wait = self.wait.get_or_insert_with(|| {
            let shared = self.shared.clone();
            Box::pin(async move {
                let _ = shared.wait_pick(deadline_in(shared.ready_timeout)).await;
            })
        });
        ready!(wait.as_mut().poll(cx));
        self.wait = None;
        self.picked = self.shared.picker.pick();
        self.waited_out = self.picked.is_none();
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let shared = self.shared.clone();
        let mut picked = self.picked.take();
        let waited_out = std::mem::take(&mut self.waited_out);
        let deadline = grpc_timeout(request.headers());
        ResponseFuture::new(with_deadline(deadline, async move {
            let until = match waited_out {
                true => Instant::now(),
                false => deadline_in(shared.ready_timeout),
            };
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
                    Err(NoSlot::Full) => {
                        return Err(Status::unavailable(format!(
                            "{}: {}, after waiting {:?}",
                            shared.target,
                            pool.full_message(),
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
