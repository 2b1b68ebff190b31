//! [`LbChannel`]: the front door. A tower service any tonic-generated client
//! accepts, sending each call round robin to a SERVING endpoint.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Request, Response};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use crate::balancer::{Running, ServingSet};
use crate::deadline::{deadline_in, grpc_timeout};
use crate::discover::Discover;
use crate::error::{Error, ErrorKind};
use crate::picker::Picker;
use crate::response::{BoxError, Deadline, ResponseFuture};
use crate::retry::{Plan, Throttle};
use crate::service_config::ServiceConfig;
use crate::status::EndpointStatus;
use crate::subchannel::{Pool, Replay, RetryBuffer, Subchannel};

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
    /// The service config in force, from the builder or DNS.
    pub(crate) service_config: Arc<ArcSwapOption<AppliedConfig>>,
    pub(crate) retry_buffer: Arc<RetryBuffer>,
}

/// A service config as calls use it, with its token bucket.
#[derive(Debug)]
pub(crate) struct AppliedConfig {
    pub(crate) config: Arc<ServiceConfig>,
    pub(crate) throttle: Option<Arc<Throttle>>,
}

impl AppliedConfig {
    pub(crate) fn new(config: Arc<ServiceConfig>) -> Arc<Self> {
        let throttle = config
            .retry_throttling
            .as_ref()
            .map(|t| Arc::new(Throttle::new(t)));
        Arc::new(Self { config, throttle })
    }
}

/// How the channel treats each call.
pub(crate) struct CallSettings {
    pub(crate) ready_timeout: Duration,
    pub(crate) fail_fast: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) service_config: Arc<ArcSwapOption<AppliedConfig>>,
    pub(crate) retry_buffer: Arc<RetryBuffer>,
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
            retry_buffer,
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
                retry_buffer,
            }),
            _stop: Arc::new(stop),
            picked: None,
        }
    }

    /// The target, as written.
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// The service config in force, parsed: the last good one from DNS
    /// (with [`Builder::service_config_from_dns`](crate::Builder::service_config_from_dns)),
    /// else the one given to
    /// [`Builder::default_service_config`](crate::Builder::default_service_config);
    /// `None` without either.
    pub fn service_config(&self) -> Option<Arc<ServiceConfig>> {
        self.shared
            .service_config
            .load()
            .as_ref()
            .map(|a| a.config.clone())
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
        match self
            .shared
            .wait_pick(until, self.shared.fail_fast, &[])
            .await
        {
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
    /// The error of every call once the balancer stopped for good: it
    /// says why, and that the endpoints are shut down, as `endpoints()`
    /// then shows them.
    fn stopped(&self, why: &str) -> Status {
        let endpoints = match self.endpoints.load().len() {
            1 => "its 1 endpoint is".to_owned(),
            n => format!("its {n} endpoints are"),
        };
        Status::internal(format!(
            "{}: the channel's balancer stopped ({why}); {endpoints} SHUTDOWN, and no call can be sent: build a new channel",
            self.target,
        ))
    }

    /// A serving endpoint, not one of `tried` if another can take the
    /// call, waiting until `until` for one unless `fail_fast`.
    pub(crate) async fn wait_pick(
        &self,
        until: Instant,
        fail_fast: bool,
        tried: &[Arc<Pool>],
    ) -> Result<Arc<Pool>, Status> {
        let mut published = self.picker.subscribe();
        let started = Instant::now();
        let limit = crate::deadline::rounded(until.saturating_duration_since(started));
        let mut waited = false;
        loop {
            if let Some(conn) = self.picker.pick_avoiding(tried) {
                if waited {
                    crate::metrics::pick_wait(&self.target, started.elapsed());
                }
                return Ok(conn);
            }
            if let Some(why) = self.picker.stopped() {
                return Err(self.stopped(why));
            }
            waited = true;
            if fail_fast {
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
                        "{}: no endpoint is SERVING after waiting {limit:?}; {}",
                        self.target,
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

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let shared = self.shared.clone();
        let picked = self.picked.take();
        let applied = shared.service_config.load();
        let method = applied
            .as_ref()
            .and_then(|a| Some((a, method_index(&a.config, request.uri().path())?)));
        let entry = method.map(|(a, i)| &a.config.method_config[i]);
        let timeout = match (shared.timeout, entry.and_then(|m| m.timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let limit = call_deadline(&request, timeout);
        let deadline = limit.map(|limit| Deadline {
            limit,
            at: deadline_in(limit),
        });
        let plan = Plan {
            deadline: deadline.map(|d| d.at),
            fail_fast: entry
                .and_then(|m| m.wait_for_ready)
                .map_or(shared.fail_fast, |wait| !wait),
            policy: method
                .filter(|(a, i)| {
                    let m = &a.config.method_config[*i];
                    m.retry_policy.is_some() || m.hedging_policy.is_some()
                })
                .map(|(a, i)| (Arc::clone(a), i)),
        };
        drop(applied);
        let replay = Replay::new(request, shared.retry_buffer.clone(), deadline.map(|d| d.at));
        ResponseFuture::new(crate::retry::run(shared, picked, replay, plan), deadline)
    }
}

/// Where the `methodConfig` entry for a request path `/service/method` is.
fn method_index(config: &ServiceConfig, path: &str) -> Option<usize> {
    if config.method_config.is_empty() {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    config.method_index(service, method)
}

/// The call's deadline: the shortest of its own `grpc-timeout`, the
/// channel's `timeout` and the method's. Each attempt tells the server the
/// time left until it (`subchannel/replay.rs`).
fn call_deadline(request: &Request<Body>, timeout: Option<Duration>) -> Option<Duration> {
    match (grpc_timeout(request.headers()), timeout) {
        (Some(own), Some(channel)) => Some(own.min(channel)),
        (own, channel) => own.or(channel),
    }
}
