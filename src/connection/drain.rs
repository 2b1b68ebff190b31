//! Draining: a connection that takes no new calls finishes the ones it has,
//! then closes. Max-age recycling, a server's GOAWAY, an idle extra
//! connection and a removed endpoint all end this way.

use std::time::Duration;

use std::sync::Arc;

use tokio::time::sleep;
use tracing::{debug, warn};

use super::conn::Conn;
use super::dial::Driver;

/// Lets a connection taken out of the pool finish its calls, for at most
/// `grace` when given, then closes it. Without a grace, the server decides:
/// it sent GOAWAY and closes the connection when it sees fit. The caller
/// has dropped its health stream already, freeing the server's stream.
pub(crate) async fn drain(conn: Arc<Conn>, mut driver: Driver, grace: Option<Duration>) {
    let addr = conn.addr;
    tokio::select! {
        _ = conn.drained() => debug!(endpoint = %addr, "replaced connection drained"),
        _ = sleep(grace.unwrap_or(Duration::MAX)), if grace.is_some() => {
            warn!(
                endpoint = %addr,
                in_flight = conn.in_flight(),
                grace_ms = grace.map(|g| g.as_millis() as u64),
                "grace period over; closing the replaced connection under its calls"
            );
            conn.kill(format_args!(
                "the connection to {addr} was replaced, and its calls outlived the grace period of {grace:?}"
            ));
        }
        _ = &mut driver => debug!(endpoint = %addr, "replaced connection closed by the server"),
    }
}
