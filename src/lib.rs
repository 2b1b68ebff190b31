//! healthlb: a health-aware, client-side load balancer for tonic gRPC clients.
//!
//! In Kubernetes, kube-proxy pins each HTTP/2 connection to one pod, so one
//! pod does all the work, new pods get nothing until something breaks, and
//! pods that are alive but not ready keep getting calls. healthlb balances
//! inside the client instead, over exactly the pods that say they are SERVING.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! target ─► resolve ─► subchannel per endpoint ─► picker ─► LbChannel
//! ```
//!
//! - [`target`]: gRPC's target syntax (`dns:`, `srv:`, `ipv4:`, `ipv6:`, and
//!   tonic's `http://` and `https://`).
//! - [`resolve`]: a live endpoint set from DNS, refreshed on the record's TTL.
//! - [`subchannel`]: one health-checked, kept-alive, age-recycled endpoint,
//!   with its connections (its module docs map its files).
//! - `balancer.rs`: the task that keeps one subchannel per resolved endpoint
//!   and publishes the SERVING ones.
//! - `picker.rs`: the [`Policy`] (`policy.rs`) over the SERVING endpoints,
//!   read lock-free; `outlier.rs` ejects the ones whose calls fail, and
//!   `service_config.rs` reads all of it from gRPC's service config.
//! - [`LbChannel`] (`channel.rs`): the tower service tonic clients use, and
//!   [`Discover`] (`discover.rs`) for tower's own balancers. [`Builder`]
//!   (`builder.rs`) holds every setting of every stage.
//!
//! Beside the pipeline: [`BackoffConfig`] (`backoff.rs`), gRPC's retry
//! backoff; `deadline.rs`, call deadlines and saturating time arithmetic;
//! `retry.rs`, A6 retries and hedging, with `timer.rs`'s sub-millisecond sleep;
//! [`EndpointStatus`] (`status.rs`); [`ResponseFuture`] (`response.rs`);
//! [`Error`] (`error.rs`); and
//! `metrics.rs` (feature `metrics`).
//!
//! # Quickstart
//!
//! Swap `tonic::transport::Channel` for [`LbChannel`] in any generated
//! client:
//!
//! ```no_run
//! # mod pb { tonic::include_proto!("echo"); }
//! use std::time::Duration;
//!
//! use pb::{EchoRequest, echo_client::EchoClient};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let channel = healthlb::LbChannel::builder("dns:///echo.default.svc.cluster.local:50051")
//!     .health_service("echo.Echo") // default "": whole-server health
//!     .max_connection_age(Duration::from_secs(300)) // default: off
//!     .build()?; // sync; needs a Tokio runtime; never blocks
//! let mut client = EchoClient::new(channel.clone());
//! let reply = client.unary(EchoRequest { message: "hi".into() }).await?;
//! tracing::info!(backend = %reply.into_inner().backend, "served");
//!
//! for endpoint in channel.endpoints() {
//!     tracing::info!(addr = %endpoint.addr, state = %endpoint.state, calls = endpoint.calls_started);
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backoff;
mod balancer;
mod builder;
mod channel;
mod deadline;
mod discover;
mod error;
mod metrics;
mod outlier;
mod picker;
mod policy;
pub mod resolve;
mod response;
mod retry;
mod service_config;
mod status;
pub mod subchannel;
pub mod target;
mod timer;

/// Hooks for healthlb's own benchmarks and fuzzers, with the feature
/// `internals` (off by default). Not part of the API: they change without
/// notice.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::metrics::bench::PerCall;
    pub use crate::picker::bench::Picked;

    /// Runs the resolver's answer handling on a raw DNS message; how many
    /// endpoints it kept.
    pub fn fuzz_dns_answer(bytes: &[u8]) -> usize {
        crate::resolve::dns::fuzz_answer(bytes)
    }

    /// The endpoints random subsetting keeps: the `size` of `addrs` that
    /// rank highest under `seed`, in address order.
    pub fn random_subset(
        addrs: &[std::net::SocketAddr],
        size: usize,
        seed: u64,
    ) -> Vec<std::net::SocketAddr> {
        let list = addrs.iter().map(|a| crate::Endpoint::new(*a)).collect();
        let (set, _) = crate::Endpoints::normalize(list, size, seed);
        set.iter().map(|e| e.addr()).collect()
    }

    /// Runs the HTTP/2 frame sniffer over `bytes`, split into chunks whose
    /// size the first byte picks, checking the split changes nothing.
    pub fn fuzz_frames(bytes: &[u8]) -> usize {
        crate::subchannel::frames::fuzz(bytes)
    }
}

pub use crate::backoff::BackoffConfig;
pub use crate::builder::Builder;
pub use crate::channel::LbChannel;
pub use crate::discover::Discover;
pub use crate::error::{Error, ErrorKind};
pub use crate::outlier::{
    ConsecutiveFailures, FailurePercentageEjection, OutlierDetection, SuccessRateEjection,
};
pub use crate::policy::{Policy, SlowStart};
pub use crate::resolve::{Endpoint, Endpoints};
pub use crate::response::ResponseFuture;
pub use crate::service_config::{
    HedgingPolicy, MethodConfig, MethodName, RetryPolicy, RetryThrottling, ServiceConfig,
};
pub use crate::status::EndpointStatus;
pub use crate::subchannel::{Subchannel, SubchannelConfig, SubchannelState};
pub use crate::target::Target;
