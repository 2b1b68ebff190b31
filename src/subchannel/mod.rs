//! Subchannels: one health-checked, kept-alive, age-recycled endpoint, with
//! as many connections as its server's stream limit calls for.
//!
//! An address in DNS is not a healthy backend: Kubernetes keeps a pod in DNS
//! for seconds after it stops being ready, and `publishNotReadyAddresses`
//! keeps it there for good. Only the backend can say whether it is SERVING.
//! A [`Subchannel`] asks it the gRPC way, with a long-lived
//! `grpc.health.v1.Health/Watch` stream on the very connection that carries
//! the calls.
//!
//! Each subchannel runs one background task that owns its
//! connections:
//!
//! - **Connect**: TCP, TLS when configured, the
//!   HTTP/2 handshake, and the first health answer, all within
//!   `connect_timeout`. A failed attempt is retried with gRPC's backoff
//!   (1 s × 1.6 ± 20 %, at most 120 s) and asks the resolver to re-resolve.
//! - **Health**: the Watch stream, per gRFC A17.
//! - **Liveness**: a probe after `liveness_interval` of
//!   silence closes a connection whose peer stopped answering. See
//!   [`SubchannelConfig`] for why a probe and not HTTP/2 pings.
//! - **Stream limits**: when every connection is at the server's
//!   SETTINGS_MAX_CONCURRENT_STREAMS, another one opens, up to
//!   `max_connections_per_endpoint`; extra ones close when idle.
//! - **Max connection age**: make-before-break recycling, with a grace
//!   period for calls on the old connection.
//! - **GOAWAY**: calls the server accepted finish; calls it never saw go
//!   to a fresh connection.
//!   GOAWAY `too_many_pings` doubles the keepalive interval for the
//!   endpoint's next connections (gRFC A8).
//!
//! The state is published through a [`tokio::sync::watch`] channel
//! ([`Subchannel::subscribe`]): Connecting, Serving, NotServing(reason),
//! TransientFailure(error). Every transition is logged with the endpoint.
//!
//! A [`Subchannel`] is also a [`tower::Service`] on its own connections,
//! with [`tower::load::Load`] reporting the calls in flight. That is what
//! [`LbChannel::discover`](crate::LbChannel::discover) hands to tower's
//! balancers.

mod active;
mod config;
mod handle;
mod max_age;
mod pool;
mod shared;
mod state;
mod stats;
mod task;

pub use self::config::SubchannelConfig;
pub use self::handle::Subchannel;
pub(crate) use self::pool::{NoSlot, Pool, Slot};
pub(crate) use self::shared::Hooks;
pub use self::state::{NotServingReason, SubchannelState, SubchannelStatus};
pub(crate) use self::stats::{Ended, Stats};
pub use crate::connection::HealthStatus;
#[cfg(feature = "tls")]
pub use crate::connection::TlsConfig;
