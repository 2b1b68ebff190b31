//! Ring hash (gRFC A42, A76) against real tonic servers on loopback: the
//! same key to the same pod, keys spread, few keys moved when pods come and
//! go, keys walking on past a pod that can't take calls and coming back,
//! and bounded load keeping a hot key from piling onto one pod.
//!
//! The pods are placed on the ring by hash keys of their own (`pod-0`, …),
//! not by their addresses, whose port changes from run to run: the ring,
//! and so every assertion on where a key lands, is the same every run.

use healthlb_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::channel::mpsc;
use healthlb::resolve::{Endpoint, SourceError, from_stream};
use healthlb::{LbChannel, Policy, RingHash};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};
use support::wait_for;

type Sets = mpsc::UnboundedSender<Result<Vec<Endpoint>, SourceError>>;

/// `n` pods on 127.0.0.`first`…, and a channel hashing on `x-user` over
/// the ones `publish` names.
struct Cluster {
    pods: Vec<Backend>,
    sets: Sets,
    channel: LbChannel,
}

impl Cluster {
    async fn start(first: u8, n: u8, ring: RingHash) -> Self {
        let port = free_port();
        let mut pods = Vec::new();
        for i in 0..n {
            pods.push(Backend::start(&format!("pod-{i}"), loopback(first + i, port)).await);
        }
        let (sets, rx) = mpsc::unbounded();
        let channel = LbChannel::from_source("echo", from_stream(rx))
            .policy(Policy::RingHash(ring))
            .build()
            .expect("builds");
        Self {
            pods,
            sets,
            channel,
        }
    }

    /// The source says pods `up` are there, each keyed by its name.
    async fn publish(&self, up: &[usize]) {
        let set = up
            .iter()
            .map(|&i| Endpoint::new(self.pods[i].addr).with_hash_key(format!("pod-{i}")))
            .collect();
        self.sets
            .unbounded_send(Ok(set))
            .expect("the channel listens");
        support::all_serving(&self.channel, up.len()).await;
    }

    /// The pod that answered one call with key `key` (none: no header).
    async fn call(&self, key: Option<&str>) -> String {
        let mut client = EchoClient::new(self.channel.clone());
        let mut request = tonic::Request::new(EchoRequest {
            message: "k".into(),
        });
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("x-user", key.parse().expect("ascii"));
        }
        let reply = tokio::time::timeout(Duration::from_secs(5), client.unary(request))
            .await
            .expect("a call hung")
            .expect("every call succeeds");
        reply.into_inner().backend
    }

    /// Where each of `keys` lands: one call each.
    async fn placement(&self, keys: &[String]) -> BTreeMap<String, String> {
        let mut placed = BTreeMap::new();
        for key in keys {
            placed.insert(key.clone(), self.call(Some(key)).await);
        }
        placed
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

fn header() -> RingHash {
    RingHash::new("x-user").expect("a valid header")
}

#[tokio::test]
async fn a_key_always_reaches_the_same_pod_and_keys_spread_evenly() {
    let cluster = Cluster::start(40, 4, header()).await;
    cluster.publish(&[0, 1, 2, 3]).await;
    // 2,000 keys, 5 calls each: 10,000 calls.
    let keys = keys(2000);
    let first = cluster.placement(&keys).await;
    for _ in 0..4 {
        assert_eq!(cluster.placement(&keys).await, first, "a key changed pods");
    }
    let mut per_pod: BTreeMap<&str, usize> = BTreeMap::new();
    for pod in first.values() {
        *per_pod.entry(pod).or_default() += 1;
    }
    assert_eq!(per_pod.len(), 4, "{per_pod:?}");
    for (pod, n) in &per_pod {
        assert!(
            n.abs_diff(500) <= 75,
            "{pod} holds {n} of 2000 keys: {per_pod:?}"
        );
    }
    // The channel says how it balances.
    let line = cluster.channel.to_string();
    assert!(
        line.contains(
            "policy ring_hash_experimental on x-user, a ring of 1024 entries over 4 endpoints"
        ),
        "{line}"
    );
    // Without the header, a random key: calls reach every pod.
    let mut anywhere = BTreeSet::new();
    for _ in 0..200 {
        anywhere.insert(cluster.call(None).await);
    }
    assert_eq!(anywhere.len(), 4, "{anywhere:?}");
}

/// Keys that moved from `before` to `after`, and of those, how many
/// moved between two pods in both.
fn moved(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    gone: &str,
    new: &str,
) -> (usize, usize) {
    let moved: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    let between = moved
        .iter()
        .filter(|k| before[**k] != gone && after[**k] != new)
        .count();
    (moved.len(), between)
}

#[tokio::test]
async fn a_pod_that_leaves_moves_only_its_keys_and_one_that_joins_takes_its_share() {
    // A stable ring: 1024 entries per pod, however many there are (up to
    // 8 pods under this cap).
    let stable = header()
        .entries_per_weight(1024)
        .max_ring_size(8192)
        .ring_size_cap(8192);
    let cluster = Cluster::start(50, 5, stable).await;
    cluster.publish(&[0, 1, 2, 3]).await;
    let keys = keys(2000);
    let before = cluster.placement(&keys).await;

    // pod-3 leaves: only its keys move, each to one other pod.
    cluster.publish(&[0, 1, 2]).await;
    let after = cluster.placement(&keys).await;
    let (n, between) = moved(&before, &after, "pod-3", "");
    let held = before.values().filter(|p| *p == "pod-3").count();
    assert_eq!((n, between), (held, 0), "only pod-3's {held} keys move");
    assert!(n as f64 / 2000.0 <= 0.25 + 0.02, "{n} moved");

    // pod-3 comes back and pod-4 joins: every key pod-4 doesn't take is
    // where it was at first, pod-4 takes about a fifth, and no key moves
    // between two pods that stayed.
    cluster.publish(&[0, 1, 2, 3, 4]).await;
    let grown = cluster.placement(&keys).await;
    let (n, between) = moved(&before, &grown, "", "pod-4");
    let taken = grown.values().filter(|p| *p == "pod-4").count();
    assert_eq!((n, between), (taken, 0), "only keys pod-4 takes move");
    // The figures for the README and BENCHMARKS.md (`-- --nocapture`).
    println!(
        "stable ring, 2000 keys: 4 -> 3 pods moved {held} (the leaving pod's), 4 -> 5 moved {taken} (to the new pod)"
    );
    assert!(
        (taken as f64 / 2000.0 - 0.2).abs() <= 0.05,
        "pod-4 took {taken} of 2000"
    );
}

#[tokio::test]
async fn a42s_ring_moves_the_leaving_pods_keys_and_some_between_others() {
    // gRFC A42's ring, as grpc-go builds it: each pod gets minRingSize ÷
    // their number of entries, so a change of number moves keys between
    // pods that stayed too. What it promises: a leaving pod's keys all
    // move, and a key goes where grpc-go's ring sends it.
    let cluster = Cluster::start(90, 5, header()).await;
    cluster.publish(&[0, 1, 2, 3]).await;
    let keys = keys(2000);
    let before = cluster.placement(&keys).await;
    cluster.publish(&[0, 1, 2]).await;
    let after = cluster.placement(&keys).await;
    let held = before.values().filter(|p| *p == "pod-3").count();
    assert!(after.values().all(|p| p != "pod-3"));
    let (n, between) = moved(&before, &after, "pod-3", "");
    cluster.publish(&[0, 1, 2, 3, 4]).await;
    let grown = cluster.placement(&keys).await;
    let (m, between_grown) = moved(&before, &grown, "", "pod-4");
    let taken = grown.values().filter(|p| *p == "pod-4").count();
    // The figures for BENCHMARKS.md (`-- --nocapture`).
    println!(
        "A42 ring, 2000 keys: 4 -> 3 pods moved {n} ({held} of the leaving pod's, {between} between others); 4 -> 5 moved {m} ({taken} to the new pod, {between_grown} between others)"
    );
    assert_eq!(n - between, held);
}

#[tokio::test]
async fn a_pod_that_stops_serving_lends_its_keys_to_the_next_and_gets_them_back() {
    let cluster = Cluster::start(60, 4, header()).await;
    cluster.publish(&[0, 1, 2, 3]).await;
    let keys = keys(400);
    let before = cluster.placement(&keys).await;
    let gone = cluster.pods[1].addr;
    cluster.pods[1].set_serving(false).await;
    let out = wait_for(Duration::from_secs(5), || {
        !support::is_serving(&cluster.channel, gone)
    })
    .await;
    assert!(out.is_some(), "{:?}", support::states(&cluster.channel));
    let during = cluster.placement(&keys).await;
    for key in &keys {
        match before[key].as_str() {
            "pod-1" => assert_ne!(during[key], "pod-1", "{key}"),
            pod => assert_eq!(during[key], pod, "{key} moved though its pod serves"),
        }
    }
    // Each lent key stays on one pod while it is lent.
    assert_eq!(cluster.placement(&keys).await, during);
    cluster.pods[1].set_serving(true).await;
    support::all_serving(&cluster.channel, 4).await;
    assert_eq!(cluster.placement(&keys).await, before, "the keys came back");

    // Ejected, as outlier detection does to a pod that fails its calls:
    // the same.
    cluster.pods[2]
        .counters
        .fail_with
        .store(tonic::Code::Unavailable as i32, Ordering::SeqCst);
    let victim = keys
        .iter()
        .find(|k| before[*k] == "pod-2")
        .expect("pod-2 holds keys");
    let mut client = EchoClient::new(cluster.channel.clone());
    for _ in 0..5 {
        let mut request = tonic::Request::new(EchoRequest {
            message: "f".into(),
        });
        request
            .metadata_mut()
            .insert("x-user", victim.parse().unwrap());
        let _ = client.unary(request).await;
    }
    let ejected = wait_for(Duration::from_secs(5), || {
        cluster
            .channel
            .endpoints()
            .iter()
            .any(|e| e.ejected_for.is_some())
    })
    .await;
    assert!(ejected.is_some(), "{:?}", support::states(&cluster.channel));
    cluster.pods[2]
        .counters
        .fail_with
        .store(0, Ordering::SeqCst);
    let ejected_now = cluster.placement(&keys).await;
    for key in &keys {
        match before[key].as_str() {
            "pod-2" => assert_ne!(ejected_now[key], "pod-2", "{key}"),
            pod => assert_eq!(ejected_now[key], pod, "{key}"),
        }
    }
}

#[tokio::test]
async fn bounded_load_keeps_a_hot_key_from_piling_onto_its_pod() {
    let cluster = Cluster::start(70, 4, header().hash_balance_factor(1.25)).await;
    cluster.publish(&[0, 1, 2, 3]).await;
    for pod in &cluster.pods {
        // Calls last, so they are in flight together.
        pod.counters.delay_us.store(20_000, Ordering::SeqCst);
    }
    let hot = "user-hot";
    let home = cluster.call(Some(hot)).await;
    // 32 callers, 30 calls each: half always on the hot key, half on keys
    // of their own. Half of all calls carry the hot key.
    let callers: Vec<_> = (0..32)
        .map(|i| {
            let channel = cluster.channel.clone();
            tokio::spawn(async move {
                let mut client = EchoClient::new(channel);
                let mut hot_at: BTreeMap<String, usize> = BTreeMap::new();
                for n in 0..30 {
                    let key = match i % 2 {
                        0 => hot.to_owned(),
                        _ => format!("user-{i}-{n}"),
                    };
                    let mut request = tonic::Request::new(EchoRequest {
                        message: "b".into(),
                    });
                    request
                        .metadata_mut()
                        .insert("x-user", key.parse().unwrap());
                    let reply =
                        tokio::time::timeout(Duration::from_secs(10), client.unary(request))
                            .await
                            .expect("a call hung")
                            .expect("every call succeeds");
                    if i % 2 == 0 {
                        *hot_at.entry(reply.into_inner().backend).or_default() += 1;
                    }
                }
                hot_at
            })
        })
        .collect();
    let mut hot_at: BTreeMap<String, usize> = BTreeMap::new();
    for caller in callers {
        for (pod, n) in caller.await.expect("a caller") {
            *hot_at.entry(pod).or_default() += n;
        }
    }
    // At most 32 calls in flight: each pod's bound is ⌈⌈33 × 1.25⌉ × ¼⌉ =
    // 11, against the 16 hot calls alone an unbounded ring would pile on
    // one pod. Picks that race may each take the last slot: 2 over, at
    // most, on a machine this busy.
    for pod in &cluster.pods {
        let most = pod.counters.max_unary_in_flight.load(Ordering::SeqCst);
        assert!(
            most <= 13,
            "{} had {most} calls in flight at once",
            pod.name
        );
    }
    // The hot key still prefers its pod: more of its calls there than on
    // any other.
    let at_home = hot_at.get(&home).copied().unwrap_or(0);
    assert!(
        hot_at.iter().all(|(pod, n)| *pod == home || *n < at_home),
        "the hot key's calls, home {home}: {hot_at:?}"
    );
    assert!(
        at_home * 3 >= 480,
        "{home} took {at_home} of the hot key's 480 calls: {hot_at:?}"
    );
    let walked = cluster.channel.to_string();
    assert!(walked.contains("ring_hash_experimental"), "{walked}");
}

#[tokio::test]
async fn the_service_config_sets_ring_hash_and_refuses_bad_headers() {
    let b = Backend::start("solo", loopback(80, free_port())).await;
    let config = r#"{"loadBalancingConfig": [{"ring_hash_experimental": {
        "requestHashHeader": "x-tenant", "minRingSize": 16, "maxRingSize": 64}}]}"#;
    let channel = support::connect_serving(
        LbChannel::builder(format!("ipv4:{}", b.addr))
            .default_service_config(config)
            .expect("valid"),
        1,
    )
    .await;
    let line = channel.to_string();
    assert!(
        line.contains("ring_hash_experimental on x-tenant, a ring of 16 entries over 1 endpoints"),
        "{line}"
    );
    for (bad, why) in [
        (r#"{"requestHashHeader": "x-tenant-bin"}"#, "binary"),
        (
            r#"{"requestHashHeader": "no spaces"}"#,
            "not a valid header name",
        ),
        (r#"{"minRingSize": 16}"#, "requestHashHeader"),
        (
            r#"{"requestHashHeader": "k", "maxRingSize": 9000000}"#,
            "maxRingSize",
        ),
        (
            r#"{"requestHashHeader": "k", "hashBalanceFactor": 0.5}"#,
            "hashBalanceFactor",
        ),
    ] {
        let config = format!(r#"{{"loadBalancingConfig": [{{"ring_hash_experimental": {bad}}}]}}"#);
        let err = LbChannel::builder(format!("ipv4:{}", b.addr))
            .default_service_config(&config)
            .expect_err(bad);
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
}
