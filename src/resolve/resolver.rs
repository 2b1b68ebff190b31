//! [`Resolver`]: the handle on one target's resolution, and how it starts.

use std::sync::Arc;

use tokio::sync::{Notify, watch};

use super::config::ResolveConfig;
use super::dns_source::{DnsSource, Query};
use super::driver;
use super::endpoint::{Endpoint, Endpoints};
use super::source::{DynSource, EndpointSource, Fixed, Paced};
use super::status::{Resolution, ResolveStatus};
use crate::Error;
use crate::service_config::ServiceConfig;
use crate::target::{Target, TargetKind};

/// A handle to one target's resolution.
///
/// Cloning is cheap. The background task ends when the last handle and the
/// last [`subscribe`](Resolver::subscribe)d receiver are dropped.
#[derive(Clone, Debug)]
pub struct Resolver {
    target: Arc<str>,
    endpoints: watch::Receiver<Endpoints>,
    status: watch::Receiver<Resolution>,
    now: Arc<Notify>,
    /// The service config from DNS, when asked for.
    service_config: Option<watch::Receiver<Option<Arc<ServiceConfig>>>>,
}

// === impl Resolver ===

impl Resolver {
    /// Starts resolving `target` in the background. Needs a Tokio runtime;
    /// returns at once.
    pub fn spawn(target: &Target, config: ResolveConfig) -> Result<Self, Error> {
        config.validate()?;
        let name = target.shared_str();
        let seed = config.subset_seed.unwrap_or_else(rand::random);
        let now = Arc::new(Notify::new());
        let query = match target.kind() {
            TargetKind::Static { addrs } => {
                let list = addrs.iter().map(|a| Endpoint::new(*a)).collect();
                return Self::start(name, Box::new(Fixed(Some(list))), config, seed, now, None);
            }
            TargetKind::Dns { server, host, port } => Query::Addresses {
                server: *server,
                host: host.clone(),
                port: *port,
            },
            TargetKind::Srv { server, name } => Query::Srv {
                server: *server,
                name: name.clone(),
            },
            #[cfg(feature = "kubernetes")]
            TargetKind::Kubernetes {
                namespace,
                service,
                port,
            } => {
                let source = super::kubernetes::EndpointSlices::for_target(
                    namespace.clone(),
                    service.clone(),
                    port.clone(),
                );
                return Self::from_dyn_source(name, Box::new(source), config);
            }
            #[cfg(not(feature = "kubernetes"))]
            TargetKind::Kubernetes { .. } => {
                return Err(Error::invalid_target(
                    target.as_str(),
                    "kubernetes: targets need healthlb's `kubernetes` feature",
                ));
            }
        };
        let (service_config, config_rx) = if config.service_config_from_dns {
            let (tx, rx) = watch::channel(None);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let source = DnsSource::new(
            name.clone(),
            query,
            config.clone(),
            seed,
            service_config,
            now.clone(),
        );
        Self::start(name, Box::new(source), config, seed, now, config_rx)
    }

    /// Runs `source` in the background, under the name `name` (for logs,
    /// metrics and errors). Needs a Tokio runtime; returns at once.
    pub fn from_source(
        name: impl Into<Arc<str>>,
        source: impl EndpointSource,
        config: ResolveConfig,
    ) -> Result<Self, Error> {
        Self::from_dyn_source(name.into(), Box::new(source), config)
    }

    pub(crate) fn from_dyn_source(
        name: Arc<str>,
        source: Box<dyn DynSource>,
        config: ResolveConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let seed = config.subset_seed.unwrap_or_else(rand::random);
        let now = Arc::new(Notify::new());
        let paced = Box::new(Paced::new(source, config.retry_backoff()));
        Self::start(name, paced, config, seed, now, None)
    }

    fn start(
        name: Arc<str>,
        source: Box<dyn DynSource>,
        config: ResolveConfig,
        seed: u64,
        now: Arc<Notify>,
        service_config: Option<watch::Receiver<Option<Arc<ServiceConfig>>>>,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::no_runtime("Resolver::spawn"))?;
        let (etx, endpoints) = watch::channel(Endpoints::default());
        let (stx, status) = watch::channel(Resolution::new(name.clone()));
        let publisher = driver::Publisher {
            endpoints: etx,
            status: stx,
        };
        runtime.spawn(driver::run(name.clone(), source, config, seed, publisher));
        Ok(Self {
            target: name,
            endpoints,
            status,
            now,
            service_config,
        })
    }

    /// The target, as written.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The current set; empty until the first answer.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.borrow().clone()
    }

    /// Waits for the next published set (the first one, if none has been
    /// seen through this handle yet). `None` if resolution has ended.
    pub async fn changed(&mut self) -> Option<Endpoints> {
        self.endpoints.changed().await.ok()?;
        Some(self.endpoints.borrow_and_update().clone())
    }

    /// A receiver of every published set, for use elsewhere. It keeps the
    /// resolution running as long as it lives.
    pub fn subscribe(&self) -> watch::Receiver<Endpoints> {
        self.endpoints.clone()
    }

    /// How resolution is going.
    pub fn status(&self) -> ResolveStatus {
        self.status.borrow().status.clone()
    }

    /// How resolution is going, with the endpoint count, the last change
    /// and the last failure.
    pub fn resolution(&self) -> Resolution {
        self.status.borrow().clone()
    }

    /// The service config DNS publishes, with
    /// [`ResolveConfig::service_config_from_dns`] on.
    pub(crate) fn service_config_receiver(
        &self,
    ) -> Option<watch::Receiver<Option<Arc<ServiceConfig>>>> {
        self.service_config.clone()
    }

    /// A receiver of every status change.
    pub(crate) fn status_receiver(&self) -> watch::Receiver<Resolution> {
        self.status.clone()
    }

    /// Asks to resolve again soon, without waiting for the TTL. Requests are
    /// coalesced, and honoured at most once per `min_refresh`.
    pub fn resolve_now(&self) {
        self.now.notify_one();
    }

    /// The notifier behind [`resolve_now`](Self::resolve_now), for the
    /// subchannels, which must not keep the resolution alive.
    pub(crate) fn resolve_now_handle(&self) -> Arc<Notify> {
        self.now.clone()
    }
}
