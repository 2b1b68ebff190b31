//! The send step against real tonic servers, with a hook that runs between
//! a call's readiness check and its send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::LbChannel;
use crate::connection::Conn;

type Hook = Box<dyn FnOnce(Arc<Conn>) -> BoxFuture<'static, ()> + Send>;

/// A hook for the next call of the test's channel, run once, with the
/// channel's target.
static BEFORE_SEND: Mutex<Option<(String, Hook)>> = Mutex::new(None);

/// Runs the hook, if one is set for a call of `conn`'s channel.
pub(super) async fn before_send(conn: &Arc<Conn>) {
    let hook = {
        let mut hook = BEFORE_SEND.lock().unwrap_or_else(|e| e.into_inner());
        let ours = hook
            .as_ref()
            .is_some_and(|(target, _)| target.contains(&conn.addr.to_string()));
        if ours { hook.take() } else { None }
    };
    if let Some((_, hook)) = hook {
        hook(conn.clone()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_task_ends_between_the_readiness_check_and_the_send_hands_the_call_on() {
    let (a, _ra, server_a) = crate::testing::health_server().await;
    let (b, _rb, server_b) = crate::testing::health_server().await;
    let target = format!("ipv4:{a},{b}");
    let channel = LbChannel::builder(target.clone())
        .connect()
        .await
        .expect("it connects");
    let both = crate::deadline::deadline_in(Duration::from_secs(5));
    while tokio::time::Instant::now() < both
        && channel.endpoints().iter().filter(|e| e.in_rotation).count() < 2
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next call finds its connection's task ended after its slot was
    // taken; the call holds the connection meanwhile.
    let sender_gone = Arc::new(AtomicBool::new(false));
    let gone = sender_gone.clone();
    let hook: Hook = Box::new(move |conn: Arc<Conn>| {
        Box::pin(async move {
            conn.kill("the test ends the connection's task");
            let until = crate::deadline::deadline_in(Duration::from_secs(2));
            while conn.sender().is_some() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Nothing the waiting call holds keeps the sender alive.
            gone.store(conn.sender().is_none(), Ordering::SeqCst);
        })
    });
    *BEFORE_SEND.lock().unwrap() = Some((target, hook));
    let mut client = HealthClient::new(channel.clone());
    let check = HealthCheckRequest {
        service: String::new(),
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), client.check(check)).await;
    let hook_ran = BEFORE_SEND.lock().unwrap().take().is_none();
    assert!(hook_ran, "the call ran the hook");
    let answer = answer.expect("the call does not wait for a connection that is gone");
    answer.expect("the call went elsewhere, never sent on the dead connection");
    assert!(
        sender_gone.load(Ordering::SeqCst),
        "the connection's sender ended with its task, though a call held the connection"
    );
    // Not the endpoint's fault, and nothing reached a server: no failure.
    for e in channel.endpoints() {
        assert_eq!(e.calls_transport_failed + e.calls_failed, 0, "{e}");
    }
    server_a.abort();
    server_b.abort();
}
