//! Resolution: the first stage of the pipeline, from a [`Target`](crate::Target) to a live,
//! changing set of [`Endpoints`].
//!
//! Every source of endpoints plugs into one seam, [`EndpointSource`]: DNS
//! and SRV, fixed lists, the Kubernetes API, and a user's own registry. A
//! [`Resolver`] runs one background task per source. It
//! publishes the full endpoint set each time it changes — sorted, one entry
//! per address — and nothing when a refresh finds the same set.
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
//!   never change.
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
pub(crate) mod dns;
mod dns_source;
mod driver;
mod endpoint;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
mod resolver;
mod source;
mod status;

pub use self::config::ResolveConfig;
pub use self::endpoint::{Endpoint, Endpoints};
pub use self::resolver::Resolver;
pub(crate) use self::source::DynSource;
pub use self::source::{EndpointSource, SourceError, from_stream};
pub use self::status::{Resolution, ResolveStatus};
