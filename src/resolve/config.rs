//! Settings of the resolution stage.

use std::time::Duration;

use crate::defaults;
use crate::{BackoffConfig, Error};

/// How a [`Resolver`](super::Resolver) asks DNS. Setters take `self` by value;
/// each states its default.
///
/// ```
/// use std::time::Duration;
/// use healthlb::resolve::ResolveConfig;
///
/// let config = ResolveConfig::default()
///     .min_refresh(Duration::from_millis(500))
///     .max_endpoints(256);
/// ```
#[derive(Clone, Debug)]
pub struct ResolveConfig {
    pub(crate) min_refresh: Duration,
    pub(crate) max_refresh: Duration,
    pub(crate) max_endpoints: usize,
    pub(crate) dns_timeout: Duration,
    pub(crate) backoff: BackoffConfig,
    pub(crate) subset_seed: Option<u64>,
    pub(crate) subset_size: Option<usize>,
    pub(crate) service_config_from_dns: bool,
}

impl Default for ResolveConfig {
    fn default() -> Self {
        Self {
            min_refresh: defaults::MIN_REFRESH,
            max_refresh: defaults::MAX_REFRESH,
            max_endpoints: defaults::MAX_ENDPOINTS,
            dns_timeout: defaults::DNS_TIMEOUT,
            backoff: BackoffConfig::default(),
            subset_seed: None,
            subset_size: None,
            service_config_from_dns: false,
        }
    }
}

// === impl ResolveConfig ===

impl ResolveConfig {
    /// The shortest time between two lookups: a record's TTL below it is
    /// raised to it, and [`resolve_now`](super::Resolver::resolve_now) is
    /// honoured at most once per this interval. Default:
    /// [`defaults::MIN_REFRESH`].
    pub fn min_refresh(mut self, d: Duration) -> Self {
        self.min_refresh = d;
        self
    }

    /// The longest time between two lookups: a TTL above it is lowered to it,
    /// and retries after failures back off no further. Default: [`defaults::MAX_REFRESH`], the TTL
    /// kubeadm's default Corefile sets (`ttl 30`); CoreDNS's `kubernetes`
    /// plugin serves 5 s without it.
    pub fn max_refresh(mut self, d: Duration) -> Self {
        self.max_refresh = d;
        self
    }

    /// The most endpoints a resolution publishes. Past it, a stable subset is
    /// kept and a warning is logged. Default:
    /// [`defaults::MAX_ENDPOINTS`].
    pub fn max_endpoints(mut self, n: usize) -> Self {
        self.max_endpoints = n;
        self
    }

    /// How long one resolution round may take, all queries included, before
    /// it counts as failed. Default: [`defaults::DNS_TIMEOUT`].
    pub fn dns_timeout(mut self, d: Duration) -> Self {
        self.dns_timeout = d;
        self
    }

    /// Retry delays after failed lookups; they never exceed `max_refresh`.
    /// Default: [`defaults::BACKOFF`].
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// The seed that picks which endpoints stay when an answer exceeds
    /// `max_endpoints` or the subset size. Default: random per resolver, so
    /// different clients keep different subsets.
    pub fn subset_seed(mut self, seed: u64) -> Self {
        self.subset_seed = Some(seed);
        self
    }

    /// Random subsetting (gRFC A68): publishes at most `size` endpoints,
    /// the ones that rank highest under rendezvous hashing with the
    /// [`subset_seed`](Self::subset_seed). An endpoint that leaves takes
    /// only its own place in the subset with it, and one that arrives
    /// displaces at most one. Unlike `max_endpoints`, cutting an answer to
    /// its subset is not worth a warning. Default: off, every endpoint.
    pub fn subset_size(mut self, size: usize) -> Self {
        self.subset_size = Some(size);
        self
    }

    /// How many endpoints a resolution keeps: the smaller of
    /// `max_endpoints` and the subset size.
    pub(crate) fn keep(&self) -> usize {
        self.subset_size
            .map_or(self.max_endpoints, |size| size.min(self.max_endpoints))
    }

    /// Looks up the service config in DNS, in the TXT record
    /// `_grpc_config.<host>` of a `dns:` target, at every refresh. Its
    /// `methodConfig` and `retryThrottling` replace the default service
    /// config's; the policy chosen when the channel was built stays. A bad
    /// record keeps the last good config, with one warning. Default: off,
    /// as in C-core and grpc-java.
    pub fn service_config_from_dns(mut self, on: bool) -> Self {
        self.service_config_from_dns = on;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.min_refresh.is_zero() {
            return Err(Error::invalid_config("min_refresh must be above zero"));
        }
        if self.max_refresh < self.min_refresh {
            return Err(Error::invalid_config(format!(
                "max_refresh ({:?}) is below min_refresh ({:?})",
                self.max_refresh, self.min_refresh
            )));
        }
        if self.max_endpoints == 0 {
            return Err(Error::invalid_config("max_endpoints must be at least 1"));
        }
        if self.subset_size == Some(0) {
            return Err(Error::invalid_config(
                "subset_size must be at least 1 (random subsetting keeps that many endpoints)",
            ));
        }
        if self.dns_timeout.is_zero() {
            return Err(Error::invalid_config("dns_timeout must be above zero"));
        }
        self.backoff.validate()
    }

    /// The retry backoff, capped at `max_refresh`.
    pub(crate) fn retry_backoff(&self) -> BackoffConfig {
        let max = self.backoff.max.min(self.max_refresh);
        self.backoff.max(max).initial(self.backoff.initial.min(max))
    }
}
