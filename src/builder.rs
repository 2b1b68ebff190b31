//! [`Builder`]: every knob of every stage, in one place.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use http::uri::Authority;

use crate::balancer::{Balancer, Spec};
use crate::call::AppliedConfig;
use crate::channel::{CallSettings, LbChannel};
use crate::resolve::{ResolveConfig, Resolver};
use crate::target::Target;
use crate::{
    BackoffConfig, Error, OutlierDetection, Policy, ServiceConfig, SlowStart, SubchannelConfig,
};

/// Builds an [`LbChannel`]. Setters take `self` by value; each states its
/// default. Where tonic's `Endpoint` has the same setting, it has tonic's
/// name, type and meaning; setters that can fail return
/// `Result<Self, Error>`, as tonic's do. The resolver's and the
/// subchannels' settings can also be given whole, with
/// [`resolve_config`](Self::resolve_config) and
/// [`subchannel_config`](Self::subchannel_config).
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
    target: String,
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
        Builder::new(target.into())
    }
}

// === impl Builder ===

impl Builder {
    fn new(target: String) -> Self {
        Self {
            target,
            resolve: ResolveConfig::default(),
            subchannel: SubchannelConfig::default(),
            ready_timeout: Duration::from_secs(5),
            fail_fast: false,
            connect_deadline: Duration::from_secs(20),
            timeout: None,
            policy: Policy::RoundRobin,
            slow_start: None,
            outlier_detection: Some(OutlierDetection::default()),
            service_config: None,
        }
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
        config.log_warnings(&self.target);
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
    /// free stream slot, before it fails with UNAVAILABLE. Default: 5 s,
    /// long enough to ride out a rolling deploy's gap, short next to typical
    /// call deadlines. A call's own deadline still applies.
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// Fails calls at once with UNAVAILABLE when no endpoint is SERVING,
    /// instead of waiting `ready_timeout`. Default: false, as gRPC's
    /// wait-for-ready is off but its picker queues calls while connecting.
    pub fn fail_fast(mut self, enabled: bool) -> Self {
        self.fail_fast = enabled;
        self
    }

    /// How long [`connect`](Self::connect) waits for a SERVING endpoint.
    /// Default: 20 s, gRPC's minimum connect timeout.
    pub fn connect_deadline(mut self, d: Duration) -> Self {
        self.connect_deadline = d;
        self
    }

    /// A deadline for each call: the shorter of this and the call's own
    /// (`grpc-timeout`) applies, until the response begins, as with tonic.
    /// A call that carries none gets a `grpc-timeout` header with this one,
    /// so the server knows it too. Default: none.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// All resolver settings at once. Default: [`ResolveConfig::default`].
    pub fn resolve_config(mut self, config: ResolveConfig) -> Self {
        self.resolve = config;
        self
    }

    /// All subchannel settings at once. Default:
    /// [`SubchannelConfig::default`].
    pub fn subchannel_config(mut self, config: SubchannelConfig) -> Self {
        self.subchannel = config;
        self
    }

    delegate! { resolve:
        /// The shortest time between two DNS lookups. Default: 1 s.
        fn min_refresh(d: Duration);
        /// The longest time between two DNS lookups, whatever the TTL.
        /// Default: 30 s.
        fn max_refresh(d: Duration);
        /// The most endpoints kept; past it a stable subset is used.
        /// Default: 1024.
        fn max_endpoints(n: usize);
        /// How long one DNS query may take. Default: 5 s.
        fn dns_timeout(d: Duration);
        /// The seed that picks which endpoints stay when an answer exceeds
        /// `max_endpoints` or the subset size. Default: random per channel,
        /// so different clients keep different subsets.
        fn subset_seed(seed: u64);
        /// Random subsetting (gRFC A68): connects to at most `size` of the
        /// resolved endpoints, chosen by rendezvous hashing over the
        /// channel's `subset_seed`, and balances over those. While the
        /// endpoint set changes, the subset changes only where it must: an
        /// endpoint that leaves is replaced by one other, and one that
        /// arrives displaces at most one. For services with more pods than
        /// a client should keep connections to. A service config's
        /// `random_subsetting` entry sets it too. Default: off, every
        /// endpoint (up to `max_endpoints`).
        fn subset_size(size: usize);
        /// Looks up the service config in the TXT record
        /// `_grpc_config.<host>` of a `dns:` target, at every refresh
        /// (gRPC's format, with choices by `clientLanguage` "rust",
        /// `percentage` and `clientHostname`). Its `methodConfig` and
        /// `retryThrottling` replace the default service config's; the
        /// policy chosen at build stays. A bad record keeps the last good
        /// config, with one warning. Default: off, as in C-core and
        /// grpc-java.
        fn service_config_from_dns(on: bool);
    }

    /// Backoff between failed DNS lookups. Default: 1 s × 1.6 ± 20 %,
    /// capped at the last healthy refresh interval.
    pub fn resolve_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.resolve = self.resolve.backoff(backoff);
        self
    }

    delegate! { subchannel:
        /// How long one connect attempt may take, up to the first health
        /// answer. Default: 20 s.
        fn connect_timeout(d: Duration);
        /// Backoff between failed connects and ended health streams.
        /// Default: 1 s × 1.6 ± 20 %, at most 120 s.
        fn backoff(backoff: BackoffConfig);
        /// HTTP/2 keepalive PINGs; at least 10 s. Default: off, because
        /// default grpc-go and C-core servers punish PINGs with GOAWAY
        /// `too_many_pings`; the liveness probe covers dead peers.
        fn http2_keep_alive_interval(interval: Duration);
        /// How long a PING may go unanswered. Default: 20 s.
        fn keep_alive_timeout(d: Duration);
        /// Whether to PING without calls open. Default: false.
        fn keep_alive_while_idle(enabled: bool);
        /// TCP keepalive idle time; `None` is off. Default: 60 s.
        fn tcp_keepalive(d: Option<Duration>);
        /// Whether to set `TCP_NODELAY`. Default: true.
        fn tcp_nodelay(enabled: bool);
        /// HTTP/2 stream-level flow-control window, at most 2^31 − 1.
        /// Default: 2 MiB.
        fn initial_stream_window_size(size: impl Into<Option<u32>>);
        /// HTTP/2 connection-level flow-control window, at most 2^31 − 1.
        /// Default: 5 MiB.
        fn initial_connection_window_size(size: impl Into<Option<u32>>);
        /// Windows sized from measured bandwidth-delay. Default: false.
        fn http2_adaptive_window(enabled: bool);
        /// Whether to watch `grpc.health.v1.Health`. Default: on.
        fn health_check(enabled: bool);
        /// The health service name. Default: `""`, the whole server.
        fn health_service(name: impl Into<String>);
        /// How long a connection may be silent before the liveness probe
        /// asks; `None` is off. Default: 15 s.
        fn liveness_interval(d: Option<Duration>);
        /// How long the liveness probe waits. Default: 15 s.
        fn liveness_timeout(d: Duration);
        /// The most liveness probes a second over all endpoints; past
        /// `liveness_interval` × this endpoints, each endpoint's interval
        /// stretches to endpoints ÷ this. Default: 200, so the 15 s
        /// interval holds up to 3,000 endpoints (50 s at 10,000).
        fn liveness_probes_per_second(rate: f64);
        /// Replaces each connection after this age, ±10 % per connection,
        /// make-before-break. Default: off.
        fn max_connection_age(age: Duration);
        /// How long a replaced connection's calls may run. Default: 30 s.
        fn max_connection_age_grace(d: Duration);
        /// The most connections to one endpoint, opened as the server's
        /// stream limit is reached. Default: 8.
        fn max_connections_per_endpoint(n: usize);
        /// How long an extra connection stays open without calls.
        /// Default: 60 s.
        fn extra_connection_idle_timeout(d: Duration);
        /// The most calls in flight on each endpoint. Default: none.
        fn concurrency_limit(limit: usize);
        /// The request bytes kept so a call can be sent again until it
        /// commits (transparent retries, and the service config's retries
        /// and hedges): at most `per_call` for one call and `total` for the
        /// whole channel. A call past either commits to its attempt rather
        /// than failing. Default: 256 KiB and 16 MiB, grpc-go's.
        fn retry_buffer_size(per_call: usize, total: usize);
        /// The most calls each endpoint starts per `duration`. Default:
        /// none.
        fn rate_limit(limit: u64, duration: Duration);
        /// The `:authority` of every call, and the TLS server name unless
        /// one is set. Default: the target's host and port as written
        /// (`echo.default.svc.cluster.local:50051`; for SRV targets the SRV
        /// name, for fixed lists the first address).
        fn authority(authority: impl Into<String>);
        /// A `method` label on request and message metrics (feature
        /// `metrics`). Default: off, to keep cardinality bounded.
        fn metrics_method_label(enabled: bool);
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
        let target = Target::parse(&self.target, self.subchannel.is_tls().then_some(443))?;
        if target.wants_tls() && !self.subchannel.is_tls() {
            self.subchannel = default_tls(self.subchannel, &target)?;
        }
        if self.ready_timeout.is_zero() {
            return Err(Error::invalid_config(
                "ready_timeout must be above zero; use fail_fast to fail at once",
            ));
        }
        if self.timeout.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid_config("timeout must be above zero"));
        }
        self.subchannel.validate()?;
        self.policy.validate()?;
        if let Some(slow_start) = &self.slow_start {
            slow_start.validate()?;
        }
        if let Some(outlier) = &self.outlier_detection {
            outlier.validate()?;
        }
        let authority = Authority::try_from(target.authority().as_str()).ok();
        let retry_buffer = self.subchannel.retry_buffer.clone();
        let service_config = Arc::new(ArcSwapOption::new(
            self.service_config.clone().map(AppliedConfig::new),
        ));
        let resolver = Resolver::spawn(&target, self.resolve)?;
        let running = Balancer::spawn(
            Spec {
                target: target.shared_str(),
                resolver,
                config: Arc::new(self.subchannel),
                authority,
                ready_timeout: self.ready_timeout,
                policy: self.policy,
                slow_start: self.slow_start,
                outlier_detection: self.outlier_detection,
                service_config: service_config.clone(),
                default_service_config: self.service_config,
            },
            &runtime,
        );
        Ok(LbChannel::new(
            target.shared_str(),
            running,
            CallSettings {
                ready_timeout: self.ready_timeout,
                fail_fast: self.fail_fast,
                timeout: self.timeout,
                service_config,
                retry_buffer,
            },
        ))
    }

    /// Starts the channel and waits until an endpoint is SERVING, for at
    /// most `connect_deadline`. The error names the target and every
    /// endpoint's state.
    pub async fn connect(self) -> Result<LbChannel, Error> {
        let deadline = self.connect_deadline;
        let channel = self.build()?;
        channel.wait_for_serving(deadline).await?;
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
