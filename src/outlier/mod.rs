//! Outlier ejection: passive health from what calls show.
//!
//! The health protocol only says what a server thinks of itself. A pod that
//! says SERVING and fails every call, because a dependency or its config is
//! broken, keeps its share of calls. Outlier ejection takes such a pod out
//! of rotation for a while, as gRFC A50 (`outlier_detection_experimental`)
//! and Envoy do, with three algorithms:
//!
//! - **consecutive failures** (Envoy's `consecutive_5xx`, Linkerd's failure
//!   accrual): `threshold` failures in a row eject at once, without waiting
//!   for the interval. It works from 2 pods up, and is the one on by
//!   default.
//! - **success rate** (A50): every `interval`, an endpoint whose success
//!   rate is more than `stdev_factor / 1000` standard deviations below the
//!   mean is ejected. It needs `minimum_hosts` endpoints with
//!   `request_volume` calls each.
//! - **failure percentage** (A50): every `interval`, an endpoint failing
//!   more than `threshold` % of its calls is ejected.
//!
//! An ejected endpoint keeps its connection and its health Watch, and gets
//! no new calls until `base_ejection_time × ejections in a row` (at most
//! `max(base_ejection_time, max_ejection_time)`) has passed. The count of
//! ejections in a row drops by one for each interval it spends in
//! rotation, as A50 says. At most `max_ejection_percent` of the endpoints
//! are ejected at once, but at least one may be. If ejection leaves no
//! endpoint to call, calls go to the ejected ones that are SERVING (panic
//! mode) rather than fail.
//!
//! The folder owns all of it:
//!
//! - `config.rs`: the settings, their defaults and validation.
//! - `counters.rs`: what each endpoint's calls showed, kept in atomics the
//!   request path adds to.
//! - `detector.rs`: A50's algorithms, one function each, as a pure state
//!   machine.
//! - `ejector.rs`: the detector run in the balancer task: it reads the
//!   counters, ejects and returns endpoints, logs and counts each one, and
//!   publishes the ejections in force (`ejections.rs`), the one view the
//!   picker's snapshot, the endpoints' status and the metrics read.

mod config;
mod counters;
mod detector;
mod ejections;
mod ejector;

pub use self::config::{
    ConsecutiveFailures, FailurePercentageEjection, OutlierDetection, SuccessRateEjection,
};
pub(crate) use self::counters::{Judge, Outcomes};
pub(crate) use self::ejections::Ejections;
pub(crate) use self::ejector::Ejector;
