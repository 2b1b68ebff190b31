//! healthlb's test kit: real servers on loopback for its tests, examples
//! and benchmarks. A DNS server (hickory-server), echo backends (tonic with
//! tonic-health), a TCP proxy that can go silent or inject a GOAWAY, and a
//! hostile HTTP/2 peer; and helpers that wait, bounded, for a channel to
//! reach a state.

// The DNS server's types, for tests that read its query counts.
pub use hickory_server;

pub mod dns;
pub mod echo;

/// cncf/xds's ORCA messages and service, generated from the protos
/// vendored in `proto/xds`: the reference healthlb's own types are held
/// against.
pub mod xds {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    pub mod data {
        pub mod orca {
            pub mod v3 {
                tonic::include_proto!("xds.data.orca.v3");
            }
        }
    }
    pub mod service {
        pub mod orca {
            pub mod v3 {
                tonic::include_proto!("xds.service.orca.v3");
            }
        }
    }
}
pub mod hostile;
pub mod kube_api;
pub mod proxy;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use healthlb::LbChannel;

/// Whether a `harness = false` bench runs under `cargo bench`, which passes
/// `--bench`, rather than `cargo test`, where it only runs a short smoke
/// version of itself, as criterion does.
pub fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The numbers in `range` of the comma-separated list in the environment
/// variable `name`; empty when it is unset or holds none.
pub fn env_list(name: &str, range: std::ops::RangeInclusive<usize>) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| range.contains(n))
        .collect()
}

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

/// The IPv4 addresses among `addrs`, for A records.
pub fn ipv4s(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<Ipv4Addr> {
    addrs
        .into_iter()
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(*v4.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

/// Whether `channel` has `addr` SERVING and in rotation: the picker's
/// snapshot holds it, so new calls may go to it.
pub fn is_serving(channel: &LbChannel, addr: SocketAddr) -> bool {
    channel
        .endpoints()
        .iter()
        .any(|e| e.addr == addr && e.state.is_serving() && e.in_rotation)
}

/// Every endpoint of `channel` with its state, for failure messages.
pub fn states(channel: &LbChannel) -> Vec<String> {
    channel
        .endpoints()
        .iter()
        .map(|e| format!("{} {}", e.addr, e.state))
        .collect()
}

/// Connects `builder` and waits until its `n` endpoints are all SERVING.
pub async fn connect_serving(builder: healthlb::Builder, n: usize) -> LbChannel {
    let channel = builder.connect().await.expect("the channel connects");
    all_serving(&channel, n).await;
    channel
}

/// Waits up to 10 s until `channel` has exactly `n` endpoints, all
/// SERVING and in rotation; fails naming their states otherwise.
pub async fn all_serving(channel: &LbChannel, n: usize) {
    let done = wait_for(Duration::from_secs(10), || {
        let eps = channel.endpoints();
        eps.len() == n && eps.iter().all(|e| e.state.is_serving() && e.in_rotation)
    })
    .await;
    assert!(done.is_some(), "not all {n} SERVING: {:?}", states(channel));
}
