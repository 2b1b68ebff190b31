//! Load: what the picker knows of an endpoint beyond whether it is in
//! rotation. [`Candidate`] is all of it, as tower's `Load` is all its
//! balancers know; each estimate lives in a file of its own.
//!
//! - Calls in flight: an atomic the request path counts in and out.
//! - `peak_ewma.rs`: the latency estimate peak EWMA reads.
//! - `server_load.rs`: the weight the endpoint's own ORCA load reports
//!   give it, for weighted round robin; `report.rs` reads a report, and
//!   `orca_proto.rs` holds the whole messages.

#[cfg(feature = "internals")]
pub(crate) mod bench;
pub(crate) mod orca_proto;
mod peak_ewma;
pub(crate) mod report;
mod server_load;

pub(crate) use self::peak_ewma::{DEFAULT_DECAY, Ewma, now_ns};
pub(crate) use self::report::Report;
pub(crate) use self::server_load::{LoadReports, ServerLoad};
pub use self::server_load::{ServerWeight, WeightState};

/// Something a call can be routed to, as the policies see it.
pub(crate) trait Candidate: Clone {
    /// Whether it can take a new call right now.
    fn can_take_call(&self) -> bool;
    /// Calls in flight on it.
    fn in_flight(&self) -> usize;
    /// Its latency estimate in ns at `now`, if it has answered yet.
    fn latency_ns(&self, now: u64) -> Option<f64>;
}
