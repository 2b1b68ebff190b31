//! Shared test servers and helpers, all on loopback: a real DNS server
//! (hickory-server), echo backends (tonic with tonic-health), and a TCP proxy
//! that can go silent or inject a GOAWAY.
#![allow(dead_code, unreachable_pub)]

pub mod dns;
pub mod echo;
pub mod proxy;

use std::future::Future;
use std::time::{Duration, Instant};

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 10 ms until it holds or `limit` passes; returns how
/// long it took, or `None` on timeout.
pub async fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check().then(|| start.elapsed())
}

/// Runs `fut`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}
