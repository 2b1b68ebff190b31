//! Settings of the subchannel stage.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::call::RetryBuffer;
use crate::defaults;
use crate::{BackoffConfig, Error};

/// The HTTP/2 keepalive interval gRPC allows at the least (gRFC A8).
pub(crate) const MIN_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// The largest HTTP/2 flow-control window (RFC 9113 §6.9.1).
const MAX_WINDOW_SIZE: u32 = (1 << 31) - 1;

/// How each endpoint's connections are made, checked and recycled. Setters
/// take `self` by value; each states its default and why. Where tonic's
/// `Endpoint` has the same setting, it has tonic's name, type and meaning.
///
/// # Keepalive and dead peers
///
/// Two promises pull against each other. A balancer that sits idle, with only
/// its health streams open, must not be cut off with `too_many_pings`:
/// grpc-go and C-core servers allow a client ping only every 5 minutes by
/// default, and an idle Watch stream doesn't earn more. Yet a black-holed
/// peer must leave rotation within a bound.
///
/// healthlb keeps both with a **liveness probe**. Anything the peer sends
/// proves it alive, so a busy connection is never probed. After
/// `liveness_interval` (15 s) without a byte from the peer, one unary
/// `grpc.health.v1.Health/Check` goes out on the connection. Any answer at
/// all, even UNIMPLEMENTED, proves the peer alive. No answer within
/// `liveness_timeout` (15 s), and nothing else heard meanwhile, closes the
/// connection. A silent peer is out of rotation at most
/// `liveness_interval + liveness_timeout` (30 s) after its last word, and
/// up to 250 ms more, as probes go out in batches on a grid. A call
/// is not a ping, so no server counts it as a strike. The probe has a stream
/// slot kept for it, so a connection full of calls cannot make it time out;
/// where the server's limit is too small to keep one, a probe that would
/// have to queue is not sent, and proves nothing either way.
///
/// An `LbChannel` sends at most `liveness_probes_per_second` (200) probes
/// a second over all its endpoints: past 3,000 idle endpoints, each one's
/// interval stretches to endpoints ÷ 200 s (50 s at 10,000), so an idle
/// channel's probing costs the same at any size.
///
/// # Stream limits
///
/// Servers cap the streams open at once on a connection
/// (SETTINGS_MAX_CONCURRENT_STREAMS). When every connection to an endpoint
/// is at its cap, healthlb opens another connection to the same endpoint,
/// up to `max_connections_per_endpoint` (8), as Envoy does; grpc-go would
/// queue the call. Past that cap a call waits for a free slot, up to the
/// ready timeout. The first connection carries the health Watch and stays;
/// the extra ones close after `extra_connection_idle_timeout` (60 s)
/// without calls. Each connection keeps one slot for the health Watch (the
/// first only) and one for the liveness probe, so neither ever queues
/// behind calls. HTTP/2 keepalive pings are off by default, as gRFC A8 advises, and
/// can be turned on with
/// [`http2_keep_alive_interval`](Self::http2_keep_alive_interval). A server
/// that answers them with GOAWAY `too_many_pings` gets half as many: the
/// interval doubles for that endpoint's next connections.
#[derive(Clone, Debug)]
pub struct SubchannelConfig {
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: BackoffConfig,
    pub(crate) http2_keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) keep_alive_while_idle: bool,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) tcp_nodelay: bool,
    pub(crate) initial_stream_window_size: Option<u32>,
    pub(crate) initial_connection_window_size: Option<u32>,
    pub(crate) http2_adaptive_window: bool,
    pub(crate) health_check: bool,
    pub(crate) health_service: String,
    pub(crate) liveness_interval: Option<Duration>,
    pub(crate) liveness_timeout: Duration,
    pub(crate) liveness_probes_per_second: f64,
    pub(crate) max_connection_age: Option<Duration>,
    pub(crate) max_connection_age_grace: Duration,
    pub(crate) max_connections_per_endpoint: usize,
    pub(crate) extra_connection_idle_timeout: Duration,
    pub(crate) concurrency_limit: Option<usize>,
    pub(crate) rate_limit: Option<(u64, Duration)>,
    pub(crate) authority: Option<String>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) metrics_method_label: bool,
    /// Shared by every subchannel of one channel.
    pub(crate) retry_buffer: Arc<RetryBuffer>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::subchannel::TlsConfig>,
}

impl Default for SubchannelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: defaults::CONNECT_TIMEOUT,
            backoff: BackoffConfig::default(),
            http2_keep_alive_interval: None,
            keep_alive_timeout: defaults::KEEP_ALIVE_TIMEOUT,
            keep_alive_while_idle: false,
            tcp_keepalive: Some(defaults::TCP_KEEPALIVE),
            tcp_nodelay: true,
            initial_stream_window_size: None,
            initial_connection_window_size: None,
            http2_adaptive_window: false,
            health_check: true,
            health_service: String::new(),
            liveness_interval: Some(defaults::LIVENESS_INTERVAL),
            liveness_timeout: defaults::LIVENESS_TIMEOUT,
            liveness_probes_per_second: defaults::LIVENESS_PROBES_PER_SECOND,
            max_connection_age: None,
            max_connection_age_grace: defaults::MAX_CONNECTION_AGE_GRACE,
            max_connections_per_endpoint: defaults::MAX_CONNECTIONS_PER_ENDPOINT,
            extra_connection_idle_timeout: defaults::EXTRA_CONNECTION_IDLE_TIMEOUT,
            concurrency_limit: None,
            rate_limit: None,
            authority: None,
            user_agent: None,
            metrics_method_label: false,
            retry_buffer: RetryBuffer::new(
                defaults::RETRY_BUFFER_PER_CALL,
                defaults::RETRY_BUFFER_TOTAL,
            ),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

// === impl SubchannelConfig ===

impl SubchannelConfig {
    /// How long one attempt may take: TCP, TLS, the HTTP/2 handshake and the
    /// first health answer. An attempt gets at least this, or the current
    /// backoff delay if that is longer, as gRPC's connection-backoff spec
    /// says. Default: [`defaults::CONNECT_TIMEOUT`] (tonic: none).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// The request bytes kept so that a call can be sent again until it
    /// commits: at most `per_call` for one call, and `total` for every call
    /// of the channel together. A call past either commits to the attempt
    /// it is on; it is not failed. Each kept frame counts its data and
    /// about 100 bytes of bookkeeping. `per_call` must be at least 1 and
    /// `total` at least `per_call`. Default: [`defaults::RETRY_BUFFER_PER_CALL`] and
    /// [`defaults::RETRY_BUFFER_TOTAL`], grpc-go's.
    pub fn retry_buffer_size(mut self, per_call: usize, total: usize) -> Self {
        self.retry_buffer = RetryBuffer::new(per_call, total);
        self
    }

    /// Delays between failed connects, and between health streams that end
    /// before delivering anything. Default: gRPC's, [`defaults::BACKOFF`].
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sends HTTP/2 PINGs this often and closes the connection when one goes
    /// unanswered within [`keep_alive_timeout`](Self::keep_alive_timeout).
    /// Default: off, as gRFC A8 advises: default grpc-go and C-core servers
    /// answer pings more often than every 5 minutes with GOAWAY
    /// `too_many_pings`. The liveness probe covers dead peers instead.
    /// Values below 10 s are refused, as in gRPC.
    pub fn http2_keep_alive_interval(mut self, interval: Duration) -> Self {
        self.http2_keep_alive_interval = Some(interval);
        self
    }

    /// How long to wait for a PING's answer. Default:
    /// [`defaults::KEEP_ALIVE_TIMEOUT`] (gRFC A8).
    pub fn keep_alive_timeout(mut self, d: Duration) -> Self {
        self.keep_alive_timeout = d;
        self
    }

    /// Whether to PING with no call open. The health stream counts as a
    /// call, so this rarely matters. Default: false (gRFC A8).
    pub fn keep_alive_while_idle(mut self, enabled: bool) -> Self {
        self.keep_alive_while_idle = enabled;
        self
    }

    /// TCP keepalive idle time, a kernel-level backstop that no server
    /// counts. `None` turns it off; zero is refused, as every zero
    /// duration is. Default: [`defaults::TCP_KEEPALIVE`] (tonic: off).
    pub fn tcp_keepalive(mut self, d: Option<Duration>) -> Self {
        self.tcp_keepalive = d;
        self
    }

    /// Whether to set `TCP_NODELAY`, so small gRPC messages do not wait for
    /// Nagle's algorithm. Default: true.
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.tcp_nodelay = enabled;
        self
    }

    /// HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE: stream-level flow control.
    /// Default: hyper's, 2 MiB. Setting it turns the adaptive window off.
    /// At most 2^31 − 1, as HTTP/2 allows; a larger size is refused.
    pub fn initial_stream_window_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.initial_stream_window_size = size.into();
        self
    }

    /// The connection-level flow-control window. Default: hyper's, 5 MiB.
    /// Setting it turns the adaptive window off. At most 2^31 − 1.
    pub fn initial_connection_window_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.initial_connection_window_size = size.into();
        self
    }

    /// Whether to size flow-control windows from measured bandwidth-delay
    /// (BDP pings). Default: false, as in hyper and tonic.
    pub fn http2_adaptive_window(mut self, enabled: bool) -> Self {
        self.http2_adaptive_window = enabled;
        self
    }

    /// Whether to watch `grpc.health.v1.Health`. Off, a connected endpoint
    /// counts as serving. Default: on.
    pub fn health_check(mut self, enabled: bool) -> Self {
        self.health_check = enabled;
        self
    }

    /// The service name sent in health requests. Default: `""`, which means
    /// the whole server.
    pub fn health_service(mut self, name: impl Into<String>) -> Self {
        self.health_service = name.into();
        self
    }

    /// How long a connection may be silent before the liveness probe asks;
    /// `None` turns it off. Default: [`defaults::LIVENESS_INTERVAL`].
    pub fn liveness_interval(mut self, d: Option<Duration>) -> Self {
        self.liveness_interval = d;
        self
    }

    /// How long the liveness probe waits for an answer. Default:
    /// [`defaults::LIVENESS_TIMEOUT`].
    pub fn liveness_timeout(mut self, d: Duration) -> Self {
        self.liveness_timeout = d;
        self
    }

    /// The most liveness probes an `LbChannel` sends a second, over all its
    /// endpoints. With more endpoints than `liveness_interval` × this, each
    /// endpoint's interval stretches to endpoints ÷ this, so an idle
    /// channel's probing stops growing with its size. A lone
    /// [`Subchannel`](crate::subchannel::Subchannel) keeps `liveness_interval`.
    /// Default: 200, which keeps the 15 s interval up to 3,000 endpoints.
    pub fn liveness_probes_per_second(mut self, rate: f64) -> Self {
        self.liveness_probes_per_second = rate;
        self
    }

    /// Replaces each connection after this age, ±10 % per connection,
    /// make-before-break: the new one takes calls once its health says
    /// SERVING. Default: off.
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = Some(age);
        self
    }

    /// How long calls on a replaced connection may run before it is closed
    /// under them; above zero. Default: [`defaults::MAX_CONNECTION_AGE_GRACE`].
    pub fn max_connection_age_grace(mut self, d: Duration) -> Self {
        self.max_connection_age_grace = d;
        self
    }

    /// The most connections to one endpoint. When every one is at the
    /// server's SETTINGS_MAX_CONCURRENT_STREAMS, the next call opens another
    /// up to this many; past it, calls wait for a free slot. 1 makes calls
    /// queue on one connection, as grpc-go does. Default:
    /// [`defaults::MAX_CONNECTIONS_PER_ENDPOINT`].
    pub fn max_connections_per_endpoint(mut self, n: usize) -> Self {
        self.max_connections_per_endpoint = n;
        self
    }

    /// How long an extra connection, opened past the server's stream limit,
    /// stays open without calls. The endpoint's first connection stays
    /// regardless. Default: [`defaults::EXTRA_CONNECTION_IDLE_TIMEOUT`].
    pub fn extra_connection_idle_timeout(mut self, d: Duration) -> Self {
        self.extra_connection_idle_timeout = d;
        self
    }

    /// The most calls in flight on each endpoint; more wait for one to end,
    /// up to the ready timeout. As tonic's, per endpoint. Default: none.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency_limit = Some(limit);
        self
    }

    /// The most calls each endpoint starts per `duration`; more wait for the
    /// next window, up to the ready timeout. As tonic's, per endpoint.
    /// Default: none.
    pub fn rate_limit(mut self, limit: u64, duration: Duration) -> Self {
        self.rate_limit = Some((limit, duration));
        self
    }

    /// The `:authority` of calls, and the TLS server name unless one is set.
    /// Default: the endpoint's address.
    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = Some(authority.into());
        self
    }

    /// A `user-agent` prefix; `healthlb/VERSION` follows it. Fails if it is
    /// not a valid header value. Default: none.
    pub fn user_agent<T>(mut self, user_agent: T) -> Result<Self, Error>
    where
        T: TryInto<HeaderValue>,
    {
        let value = user_agent
            .try_into()
            .map_err(|_| Error::invalid_config("user_agent is not a valid header value"))?;
        self.user_agent = Some(value);
        Ok(self)
    }

    /// Adds a `method` label (the gRPC path) to the request and message
    /// metrics (feature `metrics`). Default: off, since every method then
    /// makes a series per endpoint.
    pub fn metrics_method_label(mut self, enabled: bool) -> Self {
        self.metrics_method_label = enabled;
        self
    }

    /// Connects with TLS. Fails if the configuration is not usable.
    /// Default: plaintext.
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, tls: crate::subchannel::TlsConfig) -> Result<Self, Error> {
        tls.validate()?;
        self.tls = Some(tls);
        Ok(self)
    }

    /// Whether TLS is configured.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            self.tls.is_some()
        }
        #[cfg(not(feature = "tls"))]
        {
            false
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("connect_timeout", self.connect_timeout),
            ("keep_alive_timeout", self.keep_alive_timeout),
            ("liveness_timeout", self.liveness_timeout),
            (
                "extra_connection_idle_timeout",
                self.extra_connection_idle_timeout,
            ),
            ("max_connection_age_grace", self.max_connection_age_grace),
            ("tcp_keepalive", self.tcp_keepalive.unwrap_or(Duration::MAX)),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(Error::invalid_config(format!("{name} must be above zero")));
            }
        }
        if let Some(d) = self.http2_keep_alive_interval
            && d < MIN_KEEP_ALIVE_INTERVAL
        {
            return Err(Error::invalid_config(format!(
                "http2_keep_alive_interval must be at least {MIN_KEEP_ALIVE_INTERVAL:?} (gRFC A8), got {d:?}"
            )));
        }
        if self.liveness_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid_config(
                "liveness_interval must be above zero",
            ));
        }
        if !(self.liveness_probes_per_second.is_finite() && self.liveness_probes_per_second > 0.0) {
            return Err(Error::invalid_config(format!(
                "liveness_probes_per_second must be a number above zero, got {}",
                self.liveness_probes_per_second
            )));
        }
        if self.max_connection_age.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid_config(
                "max_connection_age must be above zero",
            ));
        }
        if self.max_connections_per_endpoint == 0 {
            return Err(Error::invalid_config(
                "max_connections_per_endpoint must be at least 1",
            ));
        }
        if self.concurrency_limit == Some(0) {
            return Err(Error::invalid_config(
                "concurrency_limit must be at least 1",
            ));
        }
        if let Some((limit, per)) = self.rate_limit
            && (limit == 0 || per.is_zero())
        {
            return Err(Error::invalid_config(format!(
                "rate_limit must allow at least 1 call per non-zero duration, got {limit} per {per:?}"
            )));
        }
        let windows = [
            (
                "initial_stream_window_size",
                self.initial_stream_window_size,
            ),
            (
                "initial_connection_window_size",
                self.initial_connection_window_size,
            ),
        ];
        for (name, size) in windows {
            // HTTP/2 caps a flow-control window at 2^31 - 1 (RFC 9113 §6.9.1).
            if let Some(size) = size
                && size > MAX_WINDOW_SIZE
            {
                return Err(Error::invalid_config(format!(
                    "{name} must be at most {MAX_WINDOW_SIZE} (HTTP/2's limit), got {size}"
                )));
            }
        }
        let (per_call, total) = self.retry_buffer.sizes();
        if per_call == 0 || total < per_call {
            return Err(Error::invalid_config(format!(
                "retry_buffer_size must keep at least 1 byte per call, within a total at least as large; got {per_call} per call of {total} in all. Without it, a call a closing connection never sent (a GOAWAY) could not be sent again"
            )));
        }
        if let Some(authority) = &self.authority {
            http::uri::Authority::try_from(authority.as_str()).map_err(|e| {
                Error::invalid_config(format!("authority {authority:?} is not valid: {e}"))
            })?;
        }
        self.backoff.validate()
    }
}
