//! Zone-aware routing against real backends: 3 zones × 3 pods on
//! 127.0.0.x, one client per zone with its zone set, equal load, endpoints
//! from a source that gives each pod's zone. Prints what it measured
//! (`cargo test --test zones -- --nocapture`), for BENCHMARKS.md.

use healthlb_testkit as support;

use std::time::Duration;

use futures::channel::mpsc;
use futures::future::join_all;
use healthlb::LbChannel;
use healthlb::resolve::{Endpoint, SourceError, from_stream};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, backends, free_port};
use support::{states, wait_for};

const ZONES: [&str; 3] = ["a", "b", "c"];
const CALLS: usize = 600;

type Sets = mpsc::UnboundedSender<Result<Vec<Endpoint>, SourceError>>;

struct Cluster {
    pods: Vec<Backend>,
    clients: Vec<(Sets, LbChannel)>,
}

fn zone_of(i: usize) -> &'static str {
    ZONES[i / 3]
}

impl Cluster {
    async fn start(first: u8) -> Self {
        let pods = backends(first, 9, free_port()).await;
        let mut clients = Vec::new();
        for zone in ZONES {
            let (tx, rx) = mpsc::unbounded();
            let channel = LbChannel::from_source(format!("echo-{zone}"), from_stream(rx))
                .zone(zone)
                .build()
                .unwrap();
            clients.push((tx, channel));
        }
        let cluster = Self { pods, clients };
        cluster.publish(&(0..9).collect::<Vec<_>>());
        cluster
    }

    /// Every client's source says the pods `up` are there.
    fn publish(&self, up: &[usize]) {
        for (tx, _) in &self.clients {
            let set = up
                .iter()
                .map(|&i| Endpoint::new(self.pods[i].addr).with_zone(zone_of(i)))
                .collect();
            tx.unbounded_send(Ok(set)).unwrap();
        }
    }

    /// Waits until every client sees exactly `n` endpoints SERVING.
    async fn settled(&self, n: usize) {
        for (_, channel) in &self.clients {
            let done = wait_for(Duration::from_secs(10), || {
                let eps = channel.endpoints();
                eps.len() == n && eps.iter().all(|e| e.state.is_serving())
            })
            .await;
            assert!(done.is_some(), "{:?}", states(channel));
        }
        // Let the last publish reach the pickers.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// `CALLS` calls from each client at once; calls per pod, per client,
    /// and the failures.
    async fn load(&self) -> (Vec<[u64; 3]>, usize) {
        let before: Vec<u64> = self.pods.iter().map(Backend::calls).collect();
        let runs = self.clients.iter().map(|(_, channel)| {
            let mut client = EchoClient::new(channel.clone());
            async move {
                let mut seen = Vec::with_capacity(CALLS);
                let mut failed = 0;
                for _ in 0..CALLS {
                    let reply = client.unary(EchoRequest {
                        message: "x".into(),
                    });
                    match reply.await {
                        Ok(r) => seen.push(r.into_inner().backend),
                        Err(_) => failed += 1,
                    }
                }
                (seen, failed)
            }
        });
        let results = join_all(runs).await;
        let mut per_pod = vec![[0u64; 3]; 9];
        let mut failed = 0;
        for (c, (seen, f)) in results.iter().enumerate() {
            failed += f;
            for name in seen {
                let i = self.pods.iter().position(|p| *p.name == **name).unwrap();
                per_pod[i][c] += 1;
            }
        }
        let total: u64 = per_pod.iter().flatten().sum();
        let served: u64 = self
            .pods
            .iter()
            .zip(&before)
            .map(|(p, b)| p.calls() - b)
            .sum();
        assert_eq!(total, served, "every answered call reached a pod once");
        (per_pod, failed)
    }
}

/// The share of client `c`'s calls that stayed in its zone.
fn in_zone(per_pod: &[[u64; 3]], c: usize) -> f64 {
    let mine: u64 = (0..9)
        .filter(|&i| zone_of(i) == ZONES[c])
        .map(|i| per_pod[i][c])
        .sum();
    let all: u64 = per_pod.iter().map(|p| p[c]).sum();
    mine as f64 / all.max(1) as f64
}

fn pod_loads(per_pod: &[[u64; 3]], up: &[usize]) -> Vec<u64> {
    up.iter().map(|&i| per_pod[i].iter().sum()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_zone_and_spill_only_as_far_as_they_must() {
    support::init_tracing();
    let cluster = Cluster::start(180).await;

    // All healthy: every call stays in its zone.
    cluster.settled(9).await;
    let (per_pod, failed) = cluster.load().await;
    let shares: Vec<f64> = (0..3).map(|c| in_zone(&per_pod, c)).collect();
    println!("all healthy: in-zone shares {shares:?}, failed {failed}");
    assert!(shares.iter().all(|&s| s >= 0.99), "{shares:?}");
    assert_eq!(failed, 0);
    let status = cluster.clients[1].1.endpoints();
    let in_rotation = status.iter().filter(|e| e.in_rotation).count();
    assert_eq!(in_rotation, 3, "zone b's client calls zone b only");

    // Zone a down to 1 of 3: no pod above 1.5 x the mean.
    let up = [0, 3, 4, 5, 6, 7, 8];
    cluster.publish(&up);
    cluster.settled(7).await;
    let (per_pod, failed) = cluster.load().await;
    let loads = pod_loads(&per_pod, &up);
    let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
    let max = *loads.iter().max().unwrap() as f64;
    println!(
        "zone a down to 1 pod: loads {loads:?}, max/mean {:.2}, zone a kept {:.2} of its calls, failed {failed}",
        max / mean,
        in_zone(&per_pod, 0)
    );
    assert!(max <= 1.5 * mean, "{loads:?}");
    assert_eq!(failed, 0);

    // Zone a with no pod: all of its calls spill, none fails.
    let up = [3, 4, 5, 6, 7, 8];
    cluster.publish(&up);
    cluster.settled(6).await;
    let (per_pod, failed) = cluster.load().await;
    let spilled: u64 = per_pod.iter().map(|p| p[0]).sum();
    println!(
        "zone a empty: {spilled} of {CALLS} calls spilled, loads {:?}, failed {failed}",
        pod_loads(&per_pod, &up)
    );
    assert_eq!(spilled, CALLS as u64);
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn without_a_client_zone_zones_change_nothing() {
    let pods = backends(190, 3, free_port()).await;
    let (tx, rx) = mpsc::unbounded::<Result<Vec<Endpoint>, SourceError>>();
    let channel = LbChannel::from_source("echo", from_stream(rx))
        .build()
        .unwrap();
    let set = pods
        .iter()
        .enumerate()
        .map(|(i, p)| Endpoint::new(p.addr).with_zone(ZONES[i]))
        .collect();
    tx.unbounded_send(Ok(set)).unwrap();
    support::all_serving(&channel, 3).await;
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..30 {
        client
            .unary(EchoRequest {
                message: "x".into(),
            })
            .await
            .unwrap();
    }
    let calls: Vec<u64> = pods.iter().map(Backend::calls).collect();
    assert!(
        calls.iter().all(|&c| c == 10),
        "round robin over all: {calls:?}"
    );
}
