//! `kubernetes:///` targets: a Service's endpoints from the Kubernetes
//! API's EndpointSlices, watched (feature `kubernetes`).
//!
//! kube's runtime watcher does the protocol: a paged list, then a watch
//! from its `resourceVersion` with bookmarks, a resumed watch when one
//! drops, and a fresh list after `410 Gone`, with backoff after errors.
//! Here, every slice of the Service (label `kubernetes.io/service-name`)
//! is kept by name and merged on each event, its endpoints read as
//! kube-proxy reads them. A relist replaces the kept slices only once it is
//! whole; until then, and while the API fails, the last good set stays.
//!
//! The client is kube's default: in a pod, its service account (needs
//! `list` and `watch` on `endpointslices` in the Service's namespace);
//! outside, the kubeconfig's current context.

mod slices;

use std::collections::BTreeMap;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tracing::{debug, warn};

use super::Endpoint;
use super::source::{EndpointSource, SourceError};
use crate::target::ServicePort;

/// The label a Service's EndpointSlices carry.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

type Events = BoxStream<'static, Result<Event<EndpointSlice>, watcher::Error>>;

/// A Service's endpoints from its EndpointSlices, watched through the
/// Kubernetes API: the source behind `kubernetes:///` targets, usable with
/// a client of your own through
/// [`LbChannel::from_source`](crate::LbChannel::from_source).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use healthlb::resolve::kubernetes::EndpointSlices;
/// use healthlb::ServicePort;
///
/// let client = kube::Client::try_default().await?;
/// let source = EndpointSlices::new(client, "default", "echo", ServicePort::Number(50051));
/// let channel = healthlb::LbChannel::from_source("echo.default:50051", source).build()?;
/// # drop(channel);
/// # Ok(())
/// # }
/// ```
pub struct EndpointSlices {
    /// `None` until the first `next`, for targets: kube's default client.
    client: Option<Client>,
    namespace: Option<String>,
    service: String,
    port: ServicePort,
    events: Option<Events>,
    /// The slices in force, by name.
    slices: BTreeMap<String, EndpointSlice>,
    /// A relist in progress: it replaces `slices` once whole.
    relist: Option<BTreeMap<String, EndpointSlice>>,
    /// The API server's address, when healthlb built the client, for
    /// errors: kube's own say "client error (Connect)" and no more.
    api_server: Option<String>,
}

impl std::fmt::Debug for EndpointSlices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSlices")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("port", &self.port)
            .field("slices", &self.slices.len())
            .finish_non_exhaustive()
    }
}

impl EndpointSlices {
    /// The endpoints of `service` in `namespace` on `port`, through
    /// `client`. Errors carry kube's whole cause but not the API server's
    /// address, which a `kube::Client` doesn't tell; `kubernetes:///`
    /// targets, whose client healthlb builds, name it.
    pub fn new(
        client: Client,
        namespace: impl Into<String>,
        service: impl Into<String>,
        port: ServicePort,
    ) -> Self {
        Self::with(Some(client), Some(namespace.into()), service.into(), port)
    }

    /// For a `kubernetes:` target: kube's default client, built on the
    /// first ask; `None` for the client's own namespace.
    pub(crate) fn for_target(
        namespace: Option<String>,
        service: String,
        port: ServicePort,
    ) -> Self {
        Self::with(None, namespace, service, port)
    }

    fn with(
        client: Option<Client>,
        namespace: Option<String>,
        service: String,
        port: ServicePort,
    ) -> Self {
        Self {
            client,
            namespace,
            service,
            port,
            events: None,
            slices: BTreeMap::new(),
            relist: None,
            api_server: None,
        }
    }

    /// Starts the watch, building the client if there is none yet. The
    /// channel paces the asks after a failure, as for any source.
    async fn start(&mut self) -> Result<(), SourceError> {
        let client = match &self.client {
            Some(client) => client.clone(),
            None => {
                let no_api = |e: &(dyn std::error::Error + 'static)| {
                    format!(
                        "no Kubernetes API to ask: neither a pod's service account nor a kubeconfig works ({})",
                        crate::connection::chain(e)
                    )
                };
                let config = kube::Config::infer().await.map_err(|e| no_api(&e))?;
                self.api_server = Some(config.cluster_url.to_string());
                let client = Client::try_from(config).map_err(|e| no_api(&e))?;
                self.client = Some(client.clone());
                client
            }
        };
        let namespace = self
            .namespace
            .get_or_insert_with(|| client.default_namespace().to_owned())
            .clone();
        let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
        let selector = format!("{SERVICE_LABEL}={}", self.service);
        let config = watcher::Config::default().labels(&selector);
        debug!(namespace, service = %self.service, "watching EndpointSlices");
        self.events = Some(watcher::watcher(api, config).default_backoff().boxed());
        Ok(())
    }

    fn current(&self) -> Vec<Endpoint> {
        let read = slices::endpoints(self.slices.values(), &self.port);
        if read.skipped > 0 {
            warn!(
                service = %self.service,
                skipped = read.skipped,
                "EndpointSlices hold addresses that are not IPs; they are skipped"
            );
        }
        debug!(
            service = %self.service,
            slices = self.slices.len(),
            endpoints = read.endpoints.len(),
            terminating_left_out = read.terminating,
            "EndpointSlices read"
        );
        read.endpoints
    }
}

impl EndpointSource for EndpointSlices {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        if self.events.is_none()
            && let Err(e) = self.start().await
        {
            return Some(Err(e));
        }
        let events = self.events.as_mut()?;
        loop {
            let event = events.next().await?;
            match event {
                Ok(Event::Init) => self.relist = Some(BTreeMap::new()),
                Ok(Event::InitApply(slice)) => {
                    if let Some(relist) = &mut self.relist {
                        relist.insert(slice.metadata.name.clone().unwrap_or_default(), slice);
                    }
                }
                Ok(Event::InitDone) => {
                    self.slices = self.relist.take().unwrap_or_default();
                    return Some(Ok(self.current()));
                }
                Ok(Event::Apply(slice)) => {
                    self.slices
                        .insert(slice.metadata.name.clone().unwrap_or_default(), slice);
                    return Some(Ok(self.current()));
                }
                Ok(Event::Delete(slice)) => {
                    self.slices
                        .remove(slice.metadata.name.as_deref().unwrap_or_default());
                    return Some(Ok(self.current()));
                }
                // 410 Gone: the watch outlived the API server's history,
                // routine on long watches. The watcher lists again at once,
                // and the set stands meanwhile: not a failure to report.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    debug!(service = %self.service, reason = %status.message, "the watch expired (410 Gone); listing again");
                }
                Err(e) => {
                    let namespace = self.namespace.as_deref().unwrap_or_default();
                    let at = self
                        .api_server
                        .as_deref()
                        .map(|url| format!(" at {url}"))
                        .unwrap_or_default();
                    return Some(Err(format!(
                        "watching the EndpointSlices of {namespace}/{}{at}: {}",
                        self.service,
                        crate::connection::chain(&e)
                    )
                    .into()));
                }
            }
        }
    }
}

/// The zone of the Node named `node`: its `topology.kubernetes.io/zone`
/// label, for [`Builder::zone`](crate::Builder::zone). A pod learns its
/// node's name from the downward API (`spec.nodeName`, as `NODE_NAME`
/// below); reading the Node needs `get` on `nodes`, a ClusterRole.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = kube::Client::try_default().await?;
/// let node = std::env::var("NODE_NAME")?;
/// let zone = healthlb::resolve::kubernetes::node_zone(client, &node).await?;
/// let mut builder = healthlb::LbChannel::builder("kubernetes:///echo.default:50051");
/// if let Some(zone) = zone {
///     builder = builder.zone(zone);
/// }
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// A [`Resolve`](crate::ErrorKind::Resolve) error naming the Node and
/// kube's whole cause (`tcp connect error: Connection refused`, `nodes
/// "node-1" is forbidden`, …) when the API can't be read.
pub async fn node_zone(client: Client, node: &str) -> Result<Option<String>, crate::Error> {
    let node = Api::<Node>::all(client).get(node).await.map_err(|e| {
        crate::Error::new(
            crate::ErrorKind::Resolve,
            None,
            format!(
                "reading the zone label of Node {node:?}: {}",
                crate::connection::chain(&e)
            ),
        )
    })?;
    Ok(node
        .metadata
        .labels
        .and_then(|mut labels| labels.remove(ZONE_LABEL)))
}
