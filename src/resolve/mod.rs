//! Resolution: the first stage of the pipeline, from a [`Target`] to a live,
//! changing set of [`Endpoints`].
//!
//! A [`Resolver`] runs one background task per target. It publishes the full
//! endpoint set each time it changes — sorted, one entry per address — and
//! nothing when a refresh finds the same set.
//!
//! # When it asks
//!
//! The next lookup runs when the answer's TTL runs out, clamped to
//! `[min_refresh, max_refresh]` (1 s and 30 s by default) and spread by ±10 %.
//! hickory's own cache is off, so the TTL is ours to honour. A scale-up behind
//! a Kubernetes headless Service is seen within one TTL: 5 s with CoreDNS's
//! `kubernetes` plugin default, 30 s with kubeadm's default Corefile
//! (`ttl 30`). grpc-go, by contrast, re-resolves only after a connection
//! breaks.
//!
//! [`Resolver::resolve_now`] asks early, at most once per `min_refresh`. The
//! subchannel stage calls it when a connect fails.
//!
//! # What it asks
//!
//! - `dns:` targets: A and AAAA at once. Each family keeps its own last good
//!   answer, so a server that fails AAAA queries doesn't hide the A records.
//! - `srv:` targets: the SRV records. The lowest-priority group that has
//!   reachable targets wins. Each target's addresses come from the
//!   additional section, or from lookups where it has none. Ports, priority
//!   and weight come from the records.
//! - Fixed lists (`ipv4:`, `ipv6:`, IP literals) are published once and
//!   never change; no task runs for them.
//!
//! # When it fails
//!
//! - **Transient failures** (a timeout, SERVFAIL, an unreachable DNS server,
//!   a CNAME loop, a malformed or truncated answer) keep the last good set.
//!   The lookup is retried with backoff: 1 s × 1.6 ± 20 %, capped at the
//!   refresh interval of the last good answer (so never slower than a
//!   healthy refresh, and at most `max_refresh`). A DNS server that comes
//!   back is noticed within one refresh interval. One warning is logged when
//!   the outage starts and one line when it ends.
//! - **An authoritative NXDOMAIN or empty answer** publishes the empty set.
//!   That is what Kubernetes says when no pod is ready.
//! - **An answer with more than `max_endpoints` addresses** (1024 by default)
//!   is cut to a stable subset, with a warning.
//!
//! ```no_run
//! use healthlb::resolve::{ResolveConfig, Resolver};
//!
//! # async fn demo() -> Result<(), healthlb::Error> {
//! let target = "dns://127.0.0.1:5353/echo.test.local:50051".parse()?;
//! let mut resolver = Resolver::spawn(&target, ResolveConfig::default())?;
//! while let Some(endpoints) = resolver.changed().await {
//!     let addrs: Vec<_> = endpoints.iter().map(|e| e.addr()).collect();
//!     tracing::info!(?addrs, "endpoints changed");
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod dns;
mod endpoint;
mod task;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Notify, watch};

pub use self::config::ResolveConfig;
pub use self::endpoint::{Endpoint, Endpoints};
use crate::Error;
use crate::target::{Target, TargetKind};

/// How resolution is going.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ResolveStatus {
    /// The first lookup has not finished.
    Pending,
    /// The last lookup got an answer, possibly an empty one.
    Resolved {
        /// When that answer arrived.
        at: Instant,
    },
    /// Lookups are failing; the last good set is still published.
    Failing {
        /// When the first of the failed lookups ran.
        since: Instant,
        /// How many lookups failed in a row.
        attempts: u32,
        /// The latest failure.
        error: Error,
    },
}

/// Runs the resolver's answer handling on a raw DNS message and returns how
/// many endpoints it kept. For the fuzzer only; not part of the API.
#[doc(hidden)]
pub fn fuzz_answer(bytes: &[u8]) -> usize {
    dns::fuzz_answer(bytes)
}

/// A handle to one target's resolution.
///
/// Cloning is cheap. The background task ends when the last handle and the
/// last [`subscribe`](Resolver::subscribe)d receiver are dropped.
#[derive(Clone, Debug)]
pub struct Resolver {
    target: Arc<str>,
    endpoints: watch::Receiver<Endpoints>,
    status: watch::Receiver<ResolveStatus>,
    now: Arc<Notify>,
    /// For fixed lists no task holds the senders, so the handle does.
    _fixed: Option<Arc<(watch::Sender<Endpoints>, watch::Sender<ResolveStatus>)>>,
}

// === impl Resolver ===

impl Resolver {
    /// Starts resolving `target` in the background. Needs a Tokio runtime;
    /// returns at once.
    pub fn spawn(target: &Target, config: ResolveConfig) -> Result<Self, Error> {
        config.validate()?;
        let name = target.shared_str();
        let seed = config.subset_seed.unwrap_or_else(rand::random);
        let query = match target.kind() {
            TargetKind::Static { addrs } => {
                let list = addrs.iter().map(|a| Endpoint::new(*a)).collect();
                let (set, _) = Endpoints::normalize(list, config.max_endpoints, seed);
                let (etx, endpoints) = watch::channel(set);
                let (stx, status) = watch::channel(ResolveStatus::Resolved { at: Instant::now() });
                let mut endpoints = endpoints;
                endpoints.mark_changed();
                return Ok(Self {
                    target: name,
                    endpoints,
                    status,
                    now: Arc::new(Notify::new()),
                    _fixed: Some(Arc::new((etx, stx))),
                });
            }
            TargetKind::Dns { server, host, port } => task::Query::Addresses {
                server: *server,
                host: host.clone(),
                port: *port,
            },
            TargetKind::Srv { server, name } => task::Query::Srv {
                server: *server,
                name: name.clone(),
            },
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::no_runtime("Resolver::spawn"))?;
        let (etx, endpoints) = watch::channel(Endpoints::default());
        let (stx, status) = watch::channel(ResolveStatus::Pending);
        let now = Arc::new(Notify::new());
        let publisher = task::Publisher {
            endpoints: etx,
            status: stx,
        };
        runtime.spawn(task::run(
            name.clone(),
            query,
            config,
            seed,
            publisher,
            now.clone(),
        ));
        Ok(Self {
            target: name,
            endpoints,
            status,
            now,
            _fixed: None,
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
        self.status.borrow().clone()
    }

    /// A receiver of every status change.
    pub(crate) fn status_receiver(&self) -> watch::Receiver<ResolveStatus> {
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
