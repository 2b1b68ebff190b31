//! [`Builder`]: every knob of every stage, in one place.

use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;

use crate::channel::{BalancerParts, LbChannel};
use crate::resolve::{ResolveConfig, Resolver};
use crate::target::Target;
use crate::{BackoffConfig, Error, SubchannelConfig};

/// Builds an [`LbChannel`]. Setters take `self` by value; each states its
/// default. The resolver's and the subchannels' settings can also be given
/// whole, with [`resolve_config`](Self::resolve_config) and
/// [`subchannel_config`](Self::subchannel_config).
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until built"]
pub struct Builder {
    target: String,
    resolve: ResolveConfig,
    subchannel: SubchannelConfig,
    ready_timeout: Duration,
    fail_fast: bool,
    connect_deadline: Duration,
}

/// Setters that hand their value to one stage's configuration.
macro_rules! delegate {
    ($stage:ident: $( $(#[$doc:meta])* fn $name:ident($arg:ident: $ty:ty); )*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.$stage = self.$stage.$name($arg);
                self
            }
        )*
    };
}

impl Builder {
    pub(crate) fn new(target: String) -> Self {
        Self {
            target,
            resolve: ResolveConfig::default(),
            subchannel: SubchannelConfig::default(),
            ready_timeout: Duration::from_secs(5),
            fail_fast: false,
            connect_deadline: Duration::from_secs(20),
        }
    }

    /// How long a call waits for an endpoint to become SERVING before it
    /// fails with UNAVAILABLE. Default: 5 s, long enough to ride out a
    /// rolling deploy's gap, short next to typical call deadlines. A call's
    /// own deadline (`grpc-timeout`) still applies.
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// Fails calls at once with UNAVAILABLE when no endpoint is SERVING,
    /// instead of waiting `ready_timeout`. Default: false, as gRPC's
    /// wait-for-ready is off but its picker queues calls while connecting.
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.fail_fast = on;
        self
    }

    /// How long [`connect`](Self::connect) waits for a SERVING endpoint.
    /// Default: 20 s, gRPC's minimum connect timeout.
    pub fn connect_deadline(mut self, d: Duration) -> Self {
        self.connect_deadline = d;
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

    /// Replaces each connection after this age, ±10 % per connection,
    /// make-before-break. Default: off.
    pub fn max_connection_age(mut self, d: Duration) -> Self {
        self.subchannel = self.subchannel.max_connection_age(Some(d));
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
        /// `max_endpoints`. Default: random per channel, so different
        /// clients keep different subsets.
        fn subset_seed(seed: u64);
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
        fn http2_keep_alive_interval(d: Option<Duration>);
        /// How long a PING may go unanswered. Default: 20 s.
        fn http2_keep_alive_timeout(d: Duration);
        /// Whether to PING without calls open. Default: false.
        fn http2_keep_alive_while_idle(on: bool);
        /// TCP keepalive idle time; `None` is off. Default: 60 s.
        fn tcp_keepalive(d: Option<Duration>);
        /// Whether to watch `grpc.health.v1.Health`. Default: on.
        fn health_check(on: bool);
        /// The health service name. Default: `""`, the whole server.
        fn health_service(name: impl Into<String>);
        /// How long a connection may be silent before the liveness probe
        /// asks; `None` is off. Default: 15 s.
        fn liveness_interval(d: Option<Duration>);
        /// How long the liveness probe waits. Default: 15 s.
        fn liveness_timeout(d: Duration);
        /// The most connections to one endpoint, opened as the server's
        /// stream limit is reached. Default: 8.
        fn max_connections_per_endpoint(n: usize);
        /// How long an extra connection stays open without calls.
        /// Default: 60 s.
        fn extra_connection_idle_timeout(d: Duration);
        /// How long a replaced connection's calls may run. Default: 30 s.
        fn max_connection_age_grace(d: Duration);
        /// A `user-agent` prefix. Default: none.
        fn user_agent(agent: impl Into<String>);
        /// A `method` label on request and message metrics (feature
        /// `metrics`). Default: off, to keep cardinality bounded.
        fn metrics_method_label(on: bool);
    }

    /// The `:authority` of every call, and the TLS server name unless one is
    /// set. Default: the target's host and port as written
    /// (`echo.default.svc.cluster.local:50051`; for SRV targets the SRV
    /// name, for fixed lists the first address).
    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.subchannel = self.subchannel.authority(authority);
        self
    }

    /// TLS to every endpoint; the certificate is checked against the
    /// target's hostname, and the default port becomes 443. Default:
    /// plaintext.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::subchannel::TlsConfig) -> Self {
        self.subchannel = self.subchannel.tls(tls);
        self
    }

    /// Starts the channel. It returns at once: resolution and connects run
    /// in the background. Needs a Tokio runtime; never blocks.
    pub fn build(self) -> Result<LbChannel, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::no_runtime("LbChannel::build"))?;
        let default_port = self.subchannel.is_tls().then_some(443);
        let target = Target::parse(&self.target, default_port)?;
        if self.ready_timeout.is_zero() {
            return Err(Error::invalid_config(
                "ready_timeout must be above zero; use fail_fast to fail at once",
            ));
        }
        self.subchannel.validate()?;
        let authority = Authority::try_from(target.authority().as_str()).ok();
        let resolver = Resolver::spawn(&target, self.resolve)?;
        Ok(LbChannel::start(BalancerParts {
            target: target.shared_str(),
            resolver,
            config: Arc::new(self.subchannel),
            authority,
            ready_timeout: self.ready_timeout,
            fail_fast: self.fail_fast,
            runtime,
        }))
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
