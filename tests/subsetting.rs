//! Random subsetting (gRFC A68) end to end: a real DNS server in-process,
//! 8 tonic backends with tonic-health on 127.0.0.x, and channels that keep
//! 3 of them, while DNS changes under them.

use healthlb_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use healthlb::LbChannel;
use support::dns::TestDns;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, backends, free_port};
use support::{all_serving, ipv4s, states, wait_for};

const HOST: &str = "subset.test.local";

fn subset(channel: &LbChannel) -> BTreeSet<SocketAddr> {
    channel.endpoints().iter().map(|e| e.addr).collect()
}

fn connects(channel: &LbChannel) -> BTreeMap<SocketAddr, u64> {
    channel
        .endpoints()
        .iter()
        .map(|e| (e.addr, e.connects))
        .collect()
}

/// 300 calls; how many each backend answered, by address.
async fn spread(channel: &LbChannel, all: &[Backend]) -> BTreeMap<SocketAddr, u32> {
    let mut client = EchoClient::new(channel.clone());
    let mut counts = BTreeMap::new();
    for _ in 0..300 {
        let reply = client
            .unary(EchoRequest {
                message: "x".into(),
            })
            .await
            .expect("the call succeeds")
            .into_inner();
        let backend = all
            .iter()
            .find(|b| *b.name == reply.backend)
            .expect("a known backend answered");
        *counts.entry(backend.addr).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn each_client_balances_over_its_own_stable_subset() {
    support::init_tracing();
    let port = free_port();
    let all = backends(60, 8, port).await;
    let dns = TestDns::start().await;
    dns.zone()
        .set_a(HOST, &ipv4s(all.iter().map(|b| b.addr)), 1);

    // One set in code, one in a service config, with seeds that give
    // different subsets. The addresses' port is new each run, and any two
    // seeds pick the same 3 of 8 one time in 56: so the second seed is the
    // first after 1 whose subset differs, and both channels must keep
    // exactly what random subsetting ranks for their seed.
    let addrs: Vec<SocketAddr> = all.iter().map(|b| b.addr).collect();
    let ranked = |seed| -> BTreeSet<SocketAddr> {
        healthlb::internals::random_subset(&addrs, 3, seed)
            .into_iter()
            .collect()
    };
    let other_seed = (2..100)
        .find(|seed| ranked(*seed) != ranked(1))
        .expect("a seed with another subset");
    let by_builder = LbChannel::builder(dns.target(HOST, port))
        .resolution(|r| r.subset_size(3).subset_seed(1))
        .connect()
        .await
        .expect("connects");
    let by_config = LbChannel::builder(dns.target(HOST, port))
        .default_service_config(
            r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 3,
                "childPolicy": [{"round_robin": {}}]}}]}"#,
        )
        .expect("a valid config")
        .resolution(|r| r.subset_seed(other_seed))
        .connect()
        .await
        .expect("connects");
    all_serving(&by_builder, 3).await;
    all_serving(&by_config, 3).await;
    let first = subset(&by_builder);
    assert_eq!(first, ranked(1), "seed 1's subset");
    assert_eq!(
        subset(&by_config),
        ranked(other_seed),
        "seed {other_seed}'s subset"
    );
    assert_ne!(first, subset(&by_config), "other seeds, other subsets");

    // Calls go round robin over the subset, and nowhere else.
    for channel in [&by_builder, &by_config] {
        let counts = spread(channel, &all).await;
        let answered: BTreeSet<SocketAddr> = counts.keys().copied().collect();
        assert_eq!(answered, subset(channel));
        assert!(counts.values().all(|&n| n == 100), "{counts:?}");
    }

    // A pod outside the subset leaves DNS: nothing moves.
    let before = connects(&by_builder);
    let outside = all
        .iter()
        .map(|b| b.addr)
        .find(|a| !first.contains(a))
        .expect("5 pods are outside");
    let left: Vec<SocketAddr> = all
        .iter()
        .map(|b| b.addr)
        .filter(|a| *a != outside)
        .collect();
    dns.zone().set_a(HOST, &ipv4s(left.iter().copied()), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(connects(&by_builder), before, "{:?}", states(&by_builder));

    // A pod of the subset leaves: one other takes its place, and the two
    // that stay keep their connections.
    let gone = *first.iter().next().expect("3 in the subset");
    let left: Vec<SocketAddr> = left.into_iter().filter(|a| *a != gone).collect();
    dns.zone().set_a(HOST, &ipv4s(left.iter().copied()), 1);
    let moved = wait_for(Duration::from_secs(5), || {
        let now = subset(&by_builder);
        !now.contains(&gone)
            && now.len() == 3
            && by_builder
                .endpoints()
                .iter()
                .all(|e| e.state.is_serving() && e.in_rotation)
    })
    .await;
    assert!(moved.is_some(), "no new subset: {:?}", states(&by_builder));
    let now = subset(&by_builder);
    assert_eq!(now.difference(&first).count(), 1, "one slot moved");
    let after = connects(&by_builder);
    for addr in first.iter().filter(|a| **a != gone) {
        assert_eq!(after[addr], before[addr], "{addr} kept its connection");
    }
    let counts = spread(&by_builder, &all).await;
    assert_eq!(counts.keys().copied().collect::<BTreeSet<_>>(), now);

    drop((by_builder, by_config));
    for backend in all {
        backend.stop().await;
    }
}

#[tokio::test]
async fn a_subset_size_of_zero_is_refused_with_a_reason() {
    let err = LbChannel::builder("ipv4:127.0.0.1:1")
        .resolution(|r| r.subset_size(0))
        .build()
        .expect_err("zero is not a subset");
    assert!(
        err.to_string().contains("subset_size must be at least 1"),
        "{err}"
    );
}
