// The guide a user reads on docs.rs is the README: one text, whose
// examples compile as doctests. DEVELOPERS.md maps the modules.
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backoff;
mod balancer;
mod builder;
mod call;
mod channel;
mod connection;
mod deadline;
pub mod defaults;
mod discover;
mod error;
mod load;
mod metrics;
#[cfg(feature = "orca")]
pub mod orca;
mod outlier;
mod picker;
pub mod resolve;
mod service_config;
mod status;
pub mod subchannel;
mod target;
mod telemetry;
#[cfg(test)]
mod testing;
mod timer;

/// Hooks for healthlb's own benchmarks and fuzzers, with the feature
/// `internals` (off by default). Not part of the API: they change without
/// notice.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::load::bench::LoadReportReader;
    pub use crate::metrics::bench::PerCall;
    pub use crate::picker::bench::{Picked, ring_build};

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
        let list = addrs
            .iter()
            .map(|a| crate::resolve::Endpoint::new(*a))
            .collect();
        let (set, _) = crate::resolve::Endpoints::normalize(list, size, seed);
        set.iter().map(|e| e.addr()).collect()
    }

    /// Runs the HTTP/2 frame sniffer over `bytes`, split into chunks whose
    /// size the first byte picks, checking the split changes nothing.
    pub fn fuzz_frames(bytes: &[u8]) -> usize {
        crate::connection::frames::fuzz(bytes)
    }
}

pub use crate::backoff::BackoffConfig;
pub use crate::builder::Builder;
pub use crate::call::ResponseFuture;
pub use crate::channel::LbChannel;
pub use crate::discover::Discover;
pub use crate::error::{Error, ErrorKind};
pub use crate::load::{ServerWeight, WeightState};
pub use crate::outlier::{
    ConsecutiveFailures, FailurePercentageEjection, OutlierDetection, SuccessRateEjection,
};
pub use crate::picker::{Policy, RingHash, SlowStart, WeightedRoundRobin};
pub use crate::service_config::{
    HedgingPolicy, MethodConfig, MethodName, RetryPolicy, RetryThrottling, ServiceConfig,
};
pub use crate::status::EndpointStatus;
pub use crate::target::{ServicePort, Target, TargetKind};
#[cfg(feature = "opentelemetry")]
pub use crate::telemetry::TraceContext;
