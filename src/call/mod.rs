//! The request path: everything between a caller's `call` and the response
//! it gets, and nothing that runs in the background.
//!
//! A call goes through these steps, each in its own file:
//!
//! 1. `plan.rs`: its `methodConfig` entry (retry or hedging policy, wait
//!    for ready) and its deadline, the shortest of the caller's, the
//!    channel's and the method's.
//! 2. `attempt.rs`: it is sent once, retried (`retry.rs`, gRFC A6) or
//!    hedged (`hedge.rs`), the token bucket of `throttle.rs` permitting.
//! 3. Each attempt picks an endpoint from the published snapshot, or waits
//!    for one, bounded (`pick.rs`), takes a stream slot on one of its
//!    connections, and is sent there (`send.rs`), again at once if the
//!    connection closes before it leaves. An attempt's request body is a
//!    replay of what the call recorded (`replay/`), so an unsent or
//!    retried call can go again until it commits.
//! 4. `response.rs`: the caller's future, and the deadline enforced to the
//!    end of the response.
//!
//! `subchannel.rs` is the same path for one endpoint: a subchannel as a
//! `tower::Service`, for tower's own balancers.

mod attempt;
mod config;
mod hedge;
mod linger;
mod observed;
mod pick;
mod plan;
mod replay;
mod response;
mod retry;
mod send;
mod subchannel;
mod throttle;
mod tracked;

pub(crate) use self::attempt::run;
pub(crate) use self::config::AppliedConfig;
pub(crate) use self::observed::observed;
pub(crate) use self::pick::{Calls, Wait};
pub(crate) use self::replay::{Replay, RetryBuffer};
pub(crate) use self::response::BoxError;
pub use self::response::ResponseFuture;
