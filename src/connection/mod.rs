//! One HTTP/2 connection to one address, and nothing about endpoints:
//! dialing it, watching it, and what its end means.
//!
//! healthlb drives h2 itself rather than a tonic `Channel`, because the
//! balancer must see what a `Channel` hides: why a connection ended (a
//! GOAWAY and its code, such as `too_many_pings`), and which requests never
//! left the client, so they can go to another endpoint; and because a call
//! that opens its own stream, in its own task, costs a third less than one
//! handed to hyper's dispatch task.
//!
//! - `dial.rs`: TCP, TLS when configured (`tls.rs`), the HTTP/2 handshake,
//!   and the task that drives the connection, with its PINGs (`ping.rs`:
//!   keepalive, the adaptive window).
//! - `stream.rs`: one stream: its request sent from the caller's task, its
//!   response body.
//! - `io.rs`: the byte stream, watched: each read is proof of life and
//!   passes the frame sniffer (`frames.rs`), which sees SETTINGS and GOAWAY
//!   arrive; a kill switch closes it.
//! - `conn.rs`: the established connection that calls and the subchannel
//!   share: readiness, stream slots, the balancer's own requests.
//! - `health.rs`: the `grpc.health.v1.Health/Watch` stream a connection
//!   carries (gRFC A17), and `load_reports.rs`: ORCA's out-of-band load
//!   reports (gRFC A51); both are a `watched.rs` stream, reopened with
//!   backoff.
//! - `liveness.rs`: the probe that notices a silent peer.
//! - `drain.rs`: a connection that takes no new calls finishes the ones it
//!   has, then closes.
//! - `transport_errors.rs`: what an h2 error means for a gRPC call.
//!
//! The endpoint's pool of connections, and when to open or replace one,
//! are the subchannel's (`crate::subchannel`).

mod conn;
mod dial;
mod drain;
pub(crate) mod frames;
mod health;
mod io;
mod liveness;
mod load_reports;
mod ping;
mod stream;
#[cfg(feature = "tls")]
mod tls;
mod transport_errors;
mod watched;

pub(crate) use self::conn::{Conn, Origin, Role, Slots, grpc_status, prepare};
pub(crate) use self::dial::{Dialer, Driver, Ended, GoAway, Http2Settings};
pub(crate) use self::drain::drain;
pub use self::health::HealthStatus;
pub(crate) use self::health::{HealthEvent, HealthWatch};
pub(crate) use self::liveness::{Liveness, Probe, ProbeRate, probe};
pub(crate) use self::load_reports::{LoadEvent, LoadReportStream};
pub(crate) use self::stream::{
    Answered, Incoming, Link, NotOpened, Opening, Stopped, finish_request,
};
#[cfg(feature = "tls")]
pub use self::tls::TlsConfig;
pub(crate) use self::transport_errors::{chain, refused_unprocessed, reset_by_client};
