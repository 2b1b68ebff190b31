//! [`Builder`]: every knob of every stage, in one place.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use http::uri::Authority;

use crate::balancer::{Balancer, Spec};
use crate::call::AppliedConfig;
use crate::channel::{CallSettings, LbChannel};
use crate::defaults;
use crate::resolve::{DynSource, EndpointSource, ResolveConfig, Resolver};
use crate::subchannel::SubchannelConfig;
use crate::target::Target;
use crate::{Error, OutlierDetection, Policy, ServiceConfig, SlowStart};

/// Builds an [`LbChannel`]. Setters take `self` by value; each states its
/// default. Where tonic's `Endpoint` has the same setting, it has tonic's
/// name, type and meaning; setters that can fail return
/// `Result<Self, Error>`, as tonic's do. The balancer's own settings are
/// here too; the rest are grouped by stage, in
/// [`resolution`](Self::resolution) and [`subchannels`](Self::subchannels).
/// Every default is a constant in [`defaults`](crate::defaults).
///
/// ```no_run
/// # fn run() -> Result<(), healthlb::Error> {
/// use std::time::Duration;
/// use healthlb::subchannel::TlsConfig;
///
/// let channel = healthlb::LbChannel::builder("https://echo.example.com") // port 443, TLS on
///     .timeout(Duration::from_secs(2))
///     .connect_timeout(Duration::from_secs(5))
///     .http2_keep_alive_interval(Duration::from_secs(60))
///     .keep_alive_timeout(Duration::from_secs(20))
///     .keep_alive_while_idle(false)
///     .tcp_keepalive(Some(Duration::from_secs(60)))
///     .tcp_nodelay(true)
///     .initial_stream_window_size(1u32 << 20)
///     .initial_connection_window_size(2u32 << 20)
///     .http2_adaptive_window(false)
///     .concurrency_limit(256)
///     .rate_limit(1000, Duration::from_secs(1))
///     .user_agent("my-service/1.2")?
///     .tls_config(TlsConfig::new().with_native_roots())?
///     .build()?;
/// # drop(channel);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until built"]
pub struct Builder {
    target: Origin,
    resolve: ResolveConfig,
    subchannel: SubchannelConfig,
    ready_timeout: Duration,
    fail_fast: bool,
    connect_deadline: Duration,
    timeout: Option<Duration>,
    policy: Policy,
    slow_start: Option<SlowStart>,
    outlier_detection: Option<OutlierDetection>,
    service_config: Option<Arc<ServiceConfig>>,
    zone: Option<Arc<str>>,
    #[cfg(feature = "opentelemetry")]
    meter_provider: Option<MeterProvider>,
    #[cfg(feature = "opentelemetry")]
    trace_context: crate::telemetry::TraceContext,
}

/// The user's OpenTelemetry `MeterProvider`.
#[cfg(feature = "opentelemetry")]
#[derive(Clone)]
struct MeterProvider(Arc<dyn opentelemetry::metrics::MeterProvider + Send + Sync>);

#[cfg(feature = "opentelemetry")]
impl fmt::Debug for MeterProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeterProvider")
    }
}

/// Where the endpoints come from.
#[derive(Clone)]
enum Origin {
    /// A target string, parsed at `build()`.
    Target(String),
    /// A user's [`EndpointSource`], under a name. The slot is shared by the
    /// builder's clones: the first `build()` takes the source.
    Source {
        name: Arc<str>,
        source: Arc<Mutex<Option<Box<dyn DynSource>>>>,
    },
}

impl Origin {
    fn name(&self) -> &str {
        match self {
            Self::Target(target) => target,
            Self::Source { name, .. } => name,
        }
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Target(target) => f.debug_tuple("Target").field(target).finish(),
            Self::Source { name, .. } => f.debug_struct("Source").field("name", name).finish(),
        }
    }
}

/// Setters that hand their value to one stage's configuration.
macro_rules! delegate {
    ($stage:ident: $( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*); )*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $($arg: $ty),*) -> Self {
                self.$stage = self.$stage.$name($($arg),*);
                self
            }
        )*
    };
}

// === impl LbChannel ===

impl LbChannel {
    /// A builder for a channel to `target`: gRPC's target syntax
    /// (`dns:///host:port`, `dns://server/host:port`, `host:port`,
    /// `ipv4:a:p,b:p`, `ipv6:[a]:p,...`, `srv:_grpc._tcp.name`), or a URL as
    /// tonic users write it (`http://host:port`; `https://host`, which
    /// turns TLS on and defaults to port 443).
    pub fn builder(target: impl Into<String>) -> Builder {
        Builder::new(Origin::Target(target.into()))
    }

    /// A builder for a channel over the endpoints `source` gives: a service
    /// registry, a control plane, a file; see [`EndpointSource`]. `name`
    /// names the channel in logs, metrics and errors, and is the calls'
    /// `:authority` when it is a valid one (`host` or `host:port`; set
    /// [`SubchannelConfig::authority`] otherwise). Every other stage
    /// (connections, health checks, balancing, ejection, retries) is as
    /// for a DNS target; the resolver settings that apply to any source
    /// (`max_endpoints`, subsetting) apply here too.
    ///
    /// The source runs once: a clone of this builder that is built after
    /// the first fails with [`Error`] naming the source.
    pub fn from_source(name: impl Into<Arc<str>>, source: impl EndpointSource) -> Builder {
        Builder::new(Origin::Source {
            name: name.into(),
            source: Arc::new(Mutex::new(Some(Box::new(source)))),
        })
    }
}

// === impl Builder ===

impl Builder {
    fn new(target: Origin) -> Self {
        Self {
            target,
            resolve: ResolveConfig::default(),
            subchannel: SubchannelConfig::default(),
            ready_timeout: defaults::READY_TIMEOUT,
            fail_fast: false,
            connect_deadline: defaults::CONNECT_DEADLINE,
            timeout: None,
            policy: Policy::RoundRobin,
            slow_start: None,
            outlier_detection: Some(OutlierDetection::default()),
            service_config: None,
            zone: None,
            #[cfg(feature = "opentelemetry")]
            meter_provider: None,
            #[cfg(feature = "opentelemetry")]
            trace_context: crate::telemetry::TraceContext::default(),
        }
    }

    /// gRPC's standard metrics (gRFC A66 per call and attempt, A94 per
    /// subchannel, and healthlb's own `grpc.lb.*`) recorded on `provider`,
    /// as grpc-go's `opentelemetry.DialOption` takes one; and gRFC A72's
    /// call and attempt spans through `tracing`, with each attempt's trace
    /// context sent to the server (see [`Builder::trace_context`]). See the
    /// README, "OpenTelemetry". Feature `opentelemetry`. Default: none, no
    /// metric recorded. Spans don't need it: they open whenever a `tracing`
    /// subscriber records them, as `tracing-opentelemetry`'s layer does.
    #[cfg(feature = "opentelemetry")]
    pub fn meter_provider<P>(mut self, provider: P) -> Self
    where
        P: opentelemetry::metrics::MeterProvider + Send + Sync + 'static,
    {
        self.meter_provider = Some(MeterProvider(Arc::new(provider)));
        self
    }

    /// Which headers carry each attempt's trace context to the server, as
    /// gRFC A72's propagators: W3C `traceparent`, gRPC's binary
    /// `grpc-trace-bin` (what servers with gRPC's OpenCensus plugin read),
    /// or both during a migration. Sent when a `tracing` layer records
    /// OpenTelemetry spans, with or without a
    /// [`meter_provider`](Builder::meter_provider). Feature `opentelemetry`. Default:
    /// [`TraceContext::W3c`](crate::TraceContext::W3c).
    #[cfg(feature = "opentelemetry")]
    pub fn trace_context(mut self, headers: crate::telemetry::TraceContext) -> Self {
        self.trace_context = headers;
        self
    }

    /// The zone this client runs in, which turns on zone-aware routing for
    /// endpoints whose source gives their zone (`kubernetes:///` targets,
    /// or an [`EndpointSource`] that sets [`Endpoint::with_zone`](crate::resolve::Endpoint::with_zone)):
    ///
    /// - when every endpoint carries EndpointSlice `hints.forZones`, calls
    ///   go to the endpoints hinted for this zone, as kube-proxy routes
    ///   (all of them if none is);
    /// - otherwise calls stay in this zone while it has at least its share
    ///   of the ready endpoints (one zone's share is 1 ÷ the zones the
    ///   service spans), and spill over as Envoy's zone-aware routing does
    ///   when it has fewer: the zone keeps `its endpoints' share ÷ its
    ///   share` of calls, and the rest go to the zones with more than their
    ///   share, in proportion to their surplus. With no ready endpoint in
    ///   the zone, every call spills. As Envoy's, this is off below 6 ready
    ///   endpoints and while every endpoint is ejected (panic mode).
    ///
    /// Endpoints without a zone (DNS) make it a no-op. A pod learns its
    /// zone from its Node's `topology.kubernetes.io/zone` label: see the
    /// README, "Zone-aware routing". Default: none, off.
    pub fn zone(mut self, zone: impl Into<Arc<str>>) -> Self {
        self.zone = Some(zone.into()).filter(|z: &Arc<str>| !z.is_empty());
        self
    }

    /// How calls are spread over the SERVING endpoints. Default:
    /// [`Policy::RoundRobin`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Slow start for endpoints that just became SERVING; `None` is off.
    /// Default: off.
    pub fn slow_start(mut self, slow_start: impl Into<Option<SlowStart>>) -> Self {
        self.slow_start = slow_start.into();
        self
    }

    /// Outlier ejection; `None` turns it off. Default:
    /// [`OutlierDetection::default`], on: 5 failures in a row (UNKNOWN,
    /// INTERNAL, UNAVAILABLE, DATA_LOSS, or a transport failure) eject an
    /// endpoint for 30 s, doubling on each repeat up to 300 s; at most
    /// 10 % of the endpoints, but always one, are ejected at once.
    pub fn outlier_detection(mut self, config: impl Into<Option<OutlierDetection>>) -> Self {
        self.outlier_detection = config.into();
        self
    }

    /// A gRPC service config (gRFC A2), as grpc-go's
    /// `WithDefaultServiceConfig` takes it. Its `loadBalancingConfig` sets
    /// the policy, slow start, outlier ejection (when its entry is
    /// `outlier_detection_experimental`; otherwise the default ejection
    /// stays on) and random subsetting (`random_subsetting`). Its `methodConfig` and `retryThrottling` are kept, and
    /// calls follow them: `timeout`, `waitForReady`, `retryPolicy` and
    /// `hedgingPolicy` per method, and the token bucket channel-wide
    /// (README, "Retries and hedging"). Fails with an error
    /// naming the field for an invalid config. Fields it doesn't know are
    /// ignored, as gRFC A2 says, each with a warning logged
    /// ([`ServiceConfig::warnings`]). Default: none.
    pub fn default_service_config(mut self, json: &str) -> Result<Self, Error> {
        let config = ServiceConfig::parse(json)?;
        config.log_warnings(self.target.name());
        if let Some(policy) = &config.policy {
            self.policy = policy.clone();
            self.slow_start = config.slow_start;
        }
        if let Some(outlier) = &config.outlier_detection {
            self.outlier_detection = Some(outlier.clone());
        }
        if let Some(size) = config.subset_size {
            self.resolve = self.resolve.subset_size(size as usize);
        }
        self.service_config = Some(Arc::new(config));
        Ok(self)
    }

    /// How long a call waits for an endpoint to become SERVING, or for a
    /// free stream slot, before it fails with UNAVAILABLE. Default:
    /// [`defaults::READY_TIMEOUT`],
    /// long enough to ride out a rolling deploy's gap, short next to typical
    /// call deadlines. A call's own deadline still applies.
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// Fails calls at once with UNAVAILABLE when no endpoint is SERVING,
    /// instead of waiting `ready_timeout`. Default: false, as gRPC's
    /// wait-for-ready is off but its picker queues calls while connecting.
    ///
    /// Either way, while resolution is failing with no endpoint to offer
    /// (gRPC's TRANSIENT_FAILURE) a call fails at once with the resolver's
    /// error, unless its method is wait-for-ready (`waitForReady` in the
    /// service config); see [`LbChannel::resolution`](crate::LbChannel::resolution).
    pub fn fail_fast(mut self, enabled: bool) -> Self {
        self.fail_fast = enabled;
        self
    }

    /// How long [`connect`](Self::connect) waits for the first set to settle
    /// and an endpoint of it to be SERVING;
    /// above zero ([`build`](Self::build) refuses zero, as it does every
    /// duration). Default: [`defaults::CONNECT_DEADLINE`].
    pub fn connect_deadline(mut self, d: Duration) -> Self {
        self.connect_deadline = d;
        self
    }

    /// A deadline for each call: the shorter of this and the call's own
    /// (`grpc-timeout`) applies. It holds for the whole call, after the
    /// response headers too: a stream still open at its deadline ends with
    /// DEADLINE_EXCEEDED. A call that carries none gets a `grpc-timeout`
    /// header with this one, so the server knows it too. Default: none.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// The resolver's settings (refresh times, `max_endpoints`, DNS
    /// timeout and backoff, subsetting, service config from DNS), given to
    /// `f` and taken back. Default: [`ResolveConfig::default`].
    ///
    /// ```no_run
    /// # fn run() -> Result<(), healthlb::Error> {
    /// use std::time::Duration;
    ///
    /// let channel = healthlb::LbChannel::builder("dns:///echo.default.svc:50051")
    ///     .resolution(|r| r.max_refresh(Duration::from_secs(10)).subset_size(20))
    ///     .subchannels(|s| s.health_service("echo.Echo").max_connection_age(Duration::from_secs(300)))
    ///     .build()?;
    /// # drop(channel);
    /// # Ok(())
    /// # }
    /// ```
    pub fn resolution(mut self, f: impl FnOnce(ResolveConfig) -> ResolveConfig) -> Self {
        self.resolve = f(self.resolve);
        self
    }

    /// The subchannels' settings beyond tonic's (health checks, liveness,
    /// connection age, connections per endpoint, backoff, the retry
    /// buffer, `:authority`, metric labels), given to `f` and taken back.
    /// Default: [`SubchannelConfig::default`].
    pub fn subchannels(mut self, f: impl FnOnce(SubchannelConfig) -> SubchannelConfig) -> Self {
        self.subchannel = f(self.subchannel);
        self
    }

    delegate! { subchannel:
        /// How long one connect attempt may take, up to the first health
        /// answer. Default: [`defaults::CONNECT_TIMEOUT`].
        fn connect_timeout(d: Duration);
        /// HTTP/2 keepalive PINGs; at least 10 s. Default: off, because
        /// default grpc-go and C-core servers punish PINGs with GOAWAY
        /// `too_many_pings`; the liveness probe covers dead peers.
        fn http2_keep_alive_interval(interval: Duration);
        /// How long a PING may go unanswered. Default:
        /// [`defaults::KEEP_ALIVE_TIMEOUT`].
        fn keep_alive_timeout(d: Duration);
        /// Whether to PING without calls open. Default: false.
        fn keep_alive_while_idle(enabled: bool);
        /// TCP keepalive idle time; `None` is off. Default:
        /// [`defaults::TCP_KEEPALIVE`].
        fn tcp_keepalive(d: Option<Duration>);
        /// Whether to set `TCP_NODELAY`. Default: true.
        fn tcp_nodelay(enabled: bool);
        /// HTTP/2 stream-level flow-control window, at most 2^31 − 1.
        /// Default: hyper's, 2 MiB.
        fn initial_stream_window_size(size: impl Into<Option<u32>>);
        /// HTTP/2 connection-level flow-control window, at most 2^31 − 1.
        /// Default: hyper's, 5 MiB.
        fn initial_connection_window_size(size: impl Into<Option<u32>>);
        /// Windows sized from measured bandwidth-delay. Default: false.
        fn http2_adaptive_window(enabled: bool);
        /// The most calls in flight on each endpoint. Default: none.
        fn concurrency_limit(limit: usize);
        /// The most calls each endpoint starts per `duration`. Default:
        /// none.
        fn rate_limit(limit: u64, duration: Duration);
    }

    /// A `user-agent` prefix; `healthlb/VERSION` follows it. Fails if it is
    /// not a valid header value. Default: none.
    pub fn user_agent<T>(mut self, user_agent: T) -> Result<Self, Error>
    where
        T: TryInto<HeaderValue>,
    {
        self.subchannel = self.subchannel.user_agent(user_agent)?;
        Ok(self)
    }

    /// TLS to every endpoint; the certificate is checked against the
    /// target's hostname, and the default port becomes 443. Fails if the
    /// configuration is not usable. Default: plaintext, or for an
    /// `https://` target, the system's root certificates.
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, tls: crate::subchannel::TlsConfig) -> Result<Self, Error> {
        self.subchannel = self.subchannel.tls_config(tls)?;
        Ok(self)
    }

    /// Starts the channel. It returns at once: resolution and connects run
    /// in the background. Needs a Tokio runtime; never blocks.
    pub fn build(mut self) -> Result<LbChannel, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::no_runtime("LbChannel::build"))?;
        crate::metrics::describe();
        let origin = match std::mem::replace(&mut self.target, Origin::Target(String::new())) {
            Origin::Target(target) => {
                let target = Target::parse(&target, self.subchannel.is_tls().then_some(443))?;
                if target.wants_tls() && !self.subchannel.is_tls() {
                    self.subchannel = default_tls(self.subchannel, &target)?;
                }
                Ok(target)
            }
            Origin::Source { name, source } => Err((name, source)),
        };
        if self.ready_timeout.is_zero() {
            return Err(Error::invalid_config(
                "ready_timeout must be above zero; use fail_fast to fail at once",
            ));
        }
        if self.timeout.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid_config("timeout must be above zero"));
        }
        if self.connect_deadline.is_zero() {
            return Err(Error::invalid_config(
                "connect_deadline must be above zero; use build() not to wait",
            ));
        }
        self.subchannel.validate()?;
        self.policy.validate()?;
        if let Some(slow_start) = &self.slow_start {
            slow_start.validate()?;
        }
        if let Some(outlier) = &self.outlier_detection {
            outlier.validate()?;
        }
        // `canonical`: the target as gRPC's telemetry labels it.
        let (name, canonical, authority, resolver) = match origin {
            Ok(target) => {
                let authority = Authority::try_from(target.authority().as_str()).ok();
                let resolver = Resolver::spawn(&target, self.resolve)?;
                (target.shared_str(), target.canonical(), authority, resolver)
            }
            Err((name, source)) => {
                let taken = source.lock().unwrap_or_else(|e| e.into_inner()).take();
                let source = taken.ok_or_else(|| {
                    Error::invalid_target(
                        &name,
                        "this endpoint source was already started by another build() \
                         of the same builder; make one builder per channel",
                    )
                })?;
                let authority = Authority::try_from(&*name).ok();
                let resolver = Resolver::from_dyn_source(name.clone(), source, self.resolve)?;
                (name.clone(), name.to_string(), authority, resolver)
            }
        };
        let retry_buffer = self.subchannel.retry_buffer.clone();
        // Spans follow the tracing subscriber alone; metrics need a provider.
        #[cfg(feature = "opentelemetry")]
        let telemetry = crate::telemetry::Telemetry::new(
            self.meter_provider
                .as_ref()
                .map(|p| &*p.0 as &dyn opentelemetry::metrics::MeterProvider),
            &canonical,
            self.trace_context,
        );
        #[cfg(not(feature = "opentelemetry"))]
        let telemetry = {
            let _ = canonical;
            crate::telemetry::Telemetry::default()
        };
        let service_config = Arc::new(ArcSwapOption::new(
            self.service_config.clone().map(AppliedConfig::new),
        ));
        let resolution = resolver.status_receiver();
        let resolve_now = resolver.resolve_now_handle();
        let running = Balancer::spawn(
            Spec {
                target: name.clone(),
                resolver,
                config: Arc::new(self.subchannel),
                authority,
                ready_timeout: self.ready_timeout,
                policy: self.policy,
                slow_start: self.slow_start,
                outlier_detection: self.outlier_detection,
                service_config: service_config.clone(),
                default_service_config: self.service_config,
                zone: self.zone,
                telemetry: telemetry.clone(),
            },
            &runtime,
        );
        Ok(LbChannel::new(
            name,
            running,
            CallSettings {
                ready_timeout: self.ready_timeout,
                fail_fast: self.fail_fast,
                timeout: self.timeout,
                service_config,
                retry_buffer,
                telemetry,
                resolution,
                resolve_now,
            },
        ))
    }

    /// Starts the channel and waits, for at most `connect_deadline`, until
    /// its first set has settled: every endpoint of it has given its first
    /// health answer or failed to connect, so the first calls already
    /// spread over every SERVING one. It fails unless one is SERVING then;
    /// the error names the target and every endpoint's state.
    pub async fn connect(self) -> Result<LbChannel, Error> {
        let deadline = self.connect_deadline;
        let channel = self.build()?;
        let until = crate::deadline::deadline_in(deadline);
        channel.settled(until).await;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        channel
            .wait_for_serving(left.max(std::time::Duration::from_millis(1)))
            .await
            .map_err(|_| channel.not_serving(deadline))?;
        Ok(channel)
    }
}

/// TLS for an `https://` target the user gave no TLS settings for: the
/// system's root certificates, as a browser or tonic's `with_native_roots`.
#[cfg(feature = "tls")]
fn default_tls(config: SubchannelConfig, _: &Target) -> Result<SubchannelConfig, Error> {
    config.tls_config(crate::subchannel::TlsConfig::new().with_native_roots())
}

#[cfg(not(feature = "tls"))]
fn default_tls(_: SubchannelConfig, target: &Target) -> Result<SubchannelConfig, Error> {
    Err(Error::invalid_target(
        target.as_str(),
        "an https:// target needs healthlb's `tls` feature",
    ))
}
