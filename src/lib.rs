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
//! - [`target`]: gRPC's target syntax (`dns:`, `srv:`, `ipv4:`, `ipv6:`).
//! - [`resolve`]: a live endpoint set from DNS, refreshed on the record's TTL.
//! - [`subchannel`]: one health-checked, kept-alive, age-recycled connection
//!   per endpoint.
//! - [`BackoffConfig`]: gRPC's retry backoff, shared by the stages.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backoff;
mod error;
pub mod resolve;
pub mod subchannel;
pub mod target;

pub use crate::backoff::BackoffConfig;
pub use crate::error::{Error, ErrorKind};
pub use crate::resolve::{Endpoint, Endpoints};
pub use crate::subchannel::{ResponseFuture, Subchannel, SubchannelConfig, SubchannelState};
pub use crate::target::Target;
