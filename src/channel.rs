//! [`LbChannel`]: the front door. A tower service any tonic-generated client
//! accepts, sending each call round robin to a SERVING endpoint.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::{oneshot, watch};
use tonic::body::Body;

use crate::balancer::{Running, ServingSet};
use crate::call::{BoxError, Calls, Replay, ResponseFuture};
use crate::deadline::deadline_in;
use crate::discover::Discover;
use crate::error::{Error, ErrorKind};
use crate::outlier::Ejections;
use crate::resolve::Resolution;
use crate::service_config::ServiceConfig;
use crate::status::EndpointStatus;
use crate::subchannel::Pool;

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
    calls: Arc<Calls>,
    /// The SERVING set, for [`discover`](Self::discover).
    serving: watch::Receiver<ServingSet>,
    /// The ejections in force, for [`endpoints`](Self::endpoints).
    ejections: Arc<Ejections>,
    /// Ends the balancer when the last clone drops.
    _stop: Arc<oneshot::Sender<()>>,
    /// The endpoint `poll_ready` picked for the next `call`.
    picked: Option<Arc<Pool>>,
    /// How resolution is going, as the resolver's task publishes it. A
    /// receiver doesn't keep that task running.
    resolution: watch::Receiver<Resolution>,
    /// Asks the resolver to look again.
    resolve_now: Arc<tokio::sync::Notify>,
}

/// How the channel treats each call.
pub(crate) struct CallSettings {
    pub(crate) ready_timeout: Duration,
    pub(crate) fail_fast: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) service_config: Arc<arc_swap::ArcSwapOption<crate::call::AppliedConfig>>,
    pub(crate) retry_buffer: Arc<crate::call::RetryBuffer>,
    pub(crate) telemetry: crate::telemetry::Telemetry,
    pub(crate) resolution: watch::Receiver<Resolution>,
    pub(crate) resolve_now: Arc<tokio::sync::Notify>,
}

impl Clone for LbChannel {
    /// Another handle on the same balancer. It starts with nothing picked.
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
            serving: self.serving.clone(),
            ejections: self.ejections.clone(),
            _stop: self._stop.clone(),
            picked: None,
            resolution: self.resolution.clone(),
            resolve_now: self.resolve_now.clone(),
        }
    }
}

impl fmt::Debug for LbChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LbChannel")
            .field("target", &self.calls.target)
            .field("endpoints", &self.calls.picker.summary())
            .field("policy", &self.calls.picker.describe())
            .field("resolution", &self.resolution.borrow().to_string())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for LbChannel {
    /// One line: the endpoints by state, how resolution is going, and the
    /// policy (with ring hash, its header and ring).
    ///
    /// ```text
    /// dns:///echo.prod.svc.cluster.local:50051: 3 endpoints: 3 SERVING; resolved 1.2s ago, 3 endpoints, the set last changed 40.0s ago; policy ring_hash_experimental on x-user, a ring of 1026 entries over 3 endpoints
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let resolution = self.resolution.borrow();
        let how = resolution.to_string();
        // The resolution's line starts with the target too.
        let how = how
            .strip_prefix(&format!("{}: ", resolution.target))
            .unwrap_or(&how);
        write!(
            f,
            "{}: {}; {how}; policy {}",
            self.calls.target,
            self.calls.picker.states(),
            self.calls.picker.describe()
        )
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
            telemetry,
            resolution,
            resolve_now,
        } = settings;
        let Running {
            picker,
            endpoints,
            serving,
            ejections,
            stop,
        } = running;
        Self {
            calls: Arc::new(Calls {
                target,
                picker,
                endpoints,
                ready_timeout,
                fail_fast,
                timeout,
                service_config,
                retry_buffer,
                telemetry,
            }),
            serving,
            ejections,
            _stop: Arc::new(stop),
            picked: None,
            resolution,
            resolve_now,
        }
    }

    /// The target, as written.
    pub fn target(&self) -> &str {
        &self.calls.target
    }

    /// The service config in force, parsed: the last good one from DNS
    /// (with [`ResolveConfig::service_config_from_dns`](crate::resolve::ResolveConfig::service_config_from_dns)),
    /// else the one given to
    /// [`Builder::default_service_config`](crate::Builder::default_service_config);
    /// `None` without either.
    pub fn service_config(&self) -> Option<Arc<ServiceConfig>> {
        self.calls
            .service_config
            .load()
            .as_ref()
            .map(|a| a.config.clone())
    }

    /// Every resolved endpoint with its state and counters. It reads what
    /// the background tasks publish; calls never wait for it.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.calls
            .endpoints
            .load()
            .iter()
            .map(|sub| EndpointStatus::of(sub, &self.ejections))
            .collect()
    }

    /// How resolution is going: its state (pending, resolved, failing,
    /// ended), the endpoint count, when the set last changed, and the last
    /// failure and when. It reads what the resolver's task publishes.
    ///
    /// With resolution failing and no endpoint to offer, the channel is in
    /// gRPC's TRANSIENT_FAILURE: a call fails at once with the resolver's
    /// error, unless its method is wait-for-ready (`waitForReady` in the
    /// service config).
    pub fn resolution(&self) -> Resolution {
        self.resolution.borrow().clone()
    }

    /// Asks the resolver to look again now rather than at its next
    /// refresh, at most once per `min_refresh` (1 s by default). DNS and
    /// SRV targets honour it; a fixed list has nothing to ask, and a
    /// source of your own (`from_source`) decides when it answers.
    pub fn resolve_now(&self) {
        self.resolve_now.notify_one();
    }

    /// A [`tower::discover::Discover`] of the SERVING endpoints, keyed by
    /// address, for tower's own balancers such as `p2c::Balance`.
    pub fn discover(&self) -> Discover {
        Discover::new(self.serving.clone())
    }

    /// Waits until at least one endpoint is SERVING, for at most `limit`.
    /// The error names the target and every endpoint's state.
    ///
    /// Not named `ready`, so it doesn't hide `tower::ServiceExt::ready`.
    pub async fn wait_for_serving(&self, limit: Duration) -> Result<(), Error> {
        let until = deadline_in(limit);
        let wait = crate::call::Wait {
            until,
            fail_fast: self.calls.fail_fast,
            wait_for_ready: true,
            hash: None,
        };
        match self.calls.wait_pick(wait, &[]).await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.not_serving(limit)),
        }
    }

    /// The error of a wait for a SERVING endpoint that lasted `limit`.
    pub(crate) fn not_serving(&self, limit: Duration) -> Error {
        let mut states: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("{} {}", e.addr, e.state))
            .collect();
        if states.is_empty() {
            states.push(self.calls.picker.summary());
        }
        states.push(format!("resolution: {}", *self.resolution.borrow()));
        Error::new(
            ErrorKind::Unavailable,
            Some(self.calls.target.clone()),
            format!(
                "no endpoint became SERVING within {limit:?}: {}",
                states.join("; ")
            ),
        )
    }

    /// Waits, until `until` at most, for the first set to settle: resolved,
    /// and no endpoint of it still connecting. A source that ended without
    /// a set won't settle; this returns at once then.
    pub(crate) async fn settled(&self, until: tokio::time::Instant) {
        let mut published = self.calls.picker.subscribe();
        loop {
            let ended_empty = matches!(
                self.resolution.borrow().status,
                crate::resolve::ResolveStatus::Ended {
                    gave_a_set: false,
                    ..
                }
            );
            if self.calls.picker.settled() || ended_empty || self.calls.picker.stopped().is_some() {
                return;
            }
            if tokio::time::timeout_at(until, published.changed())
                .await
                .is_err()
            {
                return;
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
    /// The call checks its pick's connections first thing, and picks again
    /// if they closed meanwhile: checking here too would read another
    /// endpoint's cold state on every call of a large channel.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.picked.is_none() {
            self.picked = self.calls.picker.pick();
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let calls = self.calls.clone();
        let (plan, deadline) = calls.plan(&request);
        let telemetry = calls.telemetry.call(request.uri().path(), plan.deadline);
        let replay = Replay::new(request, calls.retry_buffer.clone(), plan.deadline);
        if let Some(telemetry) = &telemetry {
            telemetry.attach(&replay);
        }
        let picked = self.picked.take();
        let run = crate::call::run(calls, picked, replay, plan);
        match telemetry {
            None => ResponseFuture::new(run, deadline),
            Some(telemetry) => ResponseFuture::new(crate::call::observed(run, telemetry), deadline),
        }
    }
}
