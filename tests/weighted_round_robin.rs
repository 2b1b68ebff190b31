//! Balancing on what servers report: ORCA load reports (gRFC A51) and
//! `weighted_round_robin` (A58), against real tonic servers on loopback
//! that send their reports through healthlb's `OrcaLayer` and
//! `OpenRcaService`, or through code generated from cncf/xds's protos.

use healthlb_testkit as support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use healthlb::{LbChannel, Policy, WeightState, WeightedRoundRobin};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, Options, OrcaOptions, free_port, loopback};

/// `costs.len()` backends on 127.0.0.`first`…, reporting per call; each
/// call to backend `i` costs `costs[i]` thousandths.
async fn reporting(first: u8, costs: &[u64], orca: OrcaOptions) -> Vec<Backend> {
    let port = free_port();
    let mut all = Vec::new();
    for (i, cost) in costs.iter().enumerate() {
        let options = Options {
            orca: Some(orca.clone()),
            ..Options::default()
        };
        let n = first + i as u8;
        let b = Backend::start_with(&format!("b{n}"), loopback(n, port), options).await;
        b.counters.cost_milli.store(*cost, Ordering::SeqCst);
        all.push(b);
    }
    all
}

fn target(backends: &[Backend]) -> String {
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    format!("ipv4:{}", list.join(","))
}

/// Short periods, so a test sees weights within a second.
fn quick() -> WeightedRoundRobin {
    WeightedRoundRobin::default()
        .blackout_period(Duration::from_millis(200))
        .weight_update_period(Duration::from_millis(100))
}

async fn channel(backends: &[Backend], wrr: WeightedRoundRobin) -> LbChannel {
    support::connect_serving(
        LbChannel::builder(target(backends)).policy(Policy::WeightedRoundRobin(wrr)),
        backends.len(),
    )
    .await
}

/// `n` calls from one caller; how many each backend answered.
async fn calls(channel: &LbChannel, n: usize) -> BTreeMap<String, usize> {
    let mut client = EchoClient::new(channel.clone());
    let mut answered = BTreeMap::new();
    for _ in 0..n {
        let call = client.unary(EchoRequest {
            message: "w".into(),
        });
        let reply = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a call hung")
            .expect("every call succeeds");
        *answered.entry(reply.into_inner().backend).or_default() += 1;
    }
    answered
}

/// Makes calls, bounded, until every endpoint's weight stands as `want`
/// says; fails naming the endpoints otherwise.
async fn until_weights(
    channel: &LbChannel,
    want: impl Fn(SocketAddr, Option<healthlb::ServerWeight>) -> bool,
) {
    for _ in 0..100 {
        if channel
            .endpoints()
            .iter()
            .all(|e| want(e.addr, e.server_weight))
        {
            return;
        }
        calls(channel, 20).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen: Vec<String> = channel.endpoints().iter().map(|e| e.to_string()).collect();
    panic!("the weights never stood as wanted: {seen:#?}");
}

fn usable(w: Option<healthlb::ServerWeight>) -> bool {
    w.is_some_and(|w| w.state == WeightState::Usable)
}

/// Each backend's share of `got`, next to the share `want` says, within
/// ±10 % of it.
fn assert_shares(got: &BTreeMap<String, usize>, want: &[(&str, f64)]) {
    let total: usize = got.values().sum();
    for (name, share) in want {
        let seen = *got.get(*name).unwrap_or(&0) as f64 / total as f64;
        assert!(
            (seen - share).abs() <= share * 0.10,
            "{name}: {seen:.3} of the calls, want {share:.3} ± 10 %: {got:?}"
        );
    }
}

#[tokio::test]
async fn calls_follow_what_each_pod_reports_it_costs() {
    // Two pods at cost 1, two at cost 2: weights 1 : 1 : ½ : ½.
    let b = reporting(2, &[1000, 1000, 2000, 2000], OrcaOptions::default()).await;
    let channel = channel(&b, quick().weight_expiration_period(Duration::from_secs(1))).await;
    until_weights(&channel, |_, w| usable(w)).await;
    let got = calls(&channel, 3000).await;
    assert_shares(
        &got,
        &[
            ("b2", 1.0 / 3.0),
            ("b3", 1.0 / 3.0),
            ("b4", 1.0 / 6.0),
            ("b5", 1.0 / 6.0),
        ],
    );
    let weights: Vec<f64> = channel
        .endpoints()
        .iter()
        .map(|e| e.server_weight.expect("weighted").weight)
        .collect();
    for (weight, want) in weights.iter().zip([1.0, 1.0, 0.5, 0.5]) {
        assert!((weight - want).abs() < 1e-6, "{weights:?}");
    }
    assert!(
        channel.endpoints()[0]
            .to_string()
            .contains("weight 1.0 (usable)")
    );

    // b2's cost triples: weights ⅓ : 1 : ½ : ½; it sheds its share once
    // its next report is in and the weights are worked out again.
    b[0].counters.cost_milli.store(3000, Ordering::SeqCst);
    let b2 = b[0].addr;
    until_weights(&channel, |addr, w| {
        addr != b2 || w.is_some_and(|w| (w.weight - 1.0 / 3.0).abs() < 1e-6)
    })
    .await;
    // The update that reads the new weight comes within one period.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = calls(&channel, 3000).await;
    let sum = 1.0 / 3.0 + 1.0 + 0.5 + 0.5;
    assert_shares(
        &got,
        &[
            ("b2", (1.0 / 3.0) / sum),
            ("b3", 1.0 / sum),
            ("b4", 0.5 / sum),
            ("b5", 0.5 / sum),
        ],
    );

    // b2 stops reporting: after the expiration period its weight is stale,
    // and it gets the mean of the others' (⅔).
    b[0].counters.cost_milli.store(0, Ordering::SeqCst);
    until_weights(&channel, |addr, w| {
        addr != b2 || w.is_some_and(|w| w.state == WeightState::Stale)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = calls(&channel, 3000).await;
    let mean = (1.0 + 0.5 + 0.5) / 3.0;
    let sum = mean + 2.0;
    assert_shares(
        &got,
        &[
            ("b2", mean / sum),
            ("b3", 1.0 / sum),
            ("b4", 0.5 / sum),
            ("b5", 0.5 / sum),
        ],
    );
}

#[tokio::test]
async fn out_of_band_reports_weigh_too_and_a_server_without_them_gets_the_mean() {
    // Three pods stream their reports at 50 ms; a fourth has no
    // OpenRcaService (UNIMPLEMENTED), and no per-call report counts in
    // out-of-band mode.
    let oob = OrcaOptions {
        oob_interval: Some(Duration::from_millis(50)),
    };
    let mut b = reporting(10, &[0, 0, 0], oob).await;
    let silent = Options {
        orca: Some(OrcaOptions::default()),
        ..Options::default()
    };
    let port = b[0].addr.port();
    b.push(Backend::start_with("b13", loopback(13, port), silent).await);
    b[3].counters.cost_milli.store(500, Ordering::SeqCst);
    for (backend, utilization) in b.iter().zip([0.25, 0.5, 0.5]) {
        let orca = backend.orca.as_ref().expect("reports");
        orca.set_qps(100.0);
        orca.set_application_utilization(utilization);
    }
    let wrr = quick().oob_load_report(Duration::from_millis(50));
    let channel = channel(&b, wrr).await;
    let b13 = b[3].addr;
    until_weights(&channel, |addr, w| match addr == b13 {
        true => w.is_some_and(|w| w.state == WeightState::NotYetUsable),
        false => usable(w),
    })
    .await;
    let weights: Vec<f64> = channel
        .endpoints()
        .iter()
        .map(|e| e.server_weight.expect("weighted").weight)
        .collect();
    assert_eq!(weights, [400.0, 200.0, 200.0, 0.0]);
    // b13 is scheduled at the mean of the others, 266.7.
    let got = calls(&channel, 3000).await;
    let mean = 800.0 / 3.0;
    let sum = 800.0 + mean;
    assert_shares(
        &got,
        &[
            ("b10", 400.0 / sum),
            ("b11", 200.0 / sum),
            ("b12", 200.0 / sum),
            ("b13", mean / sum),
        ],
    );
}

#[tokio::test]
async fn the_service_config_sets_weighted_round_robin_with_its_fields() {
    let b = reporting(20, &[1000, 4000], OrcaOptions::default()).await;
    let config = r#"{"loadBalancingConfig": [{"weighted_round_robin": {
        "blackoutPeriod": "0.2s", "weightUpdatePeriod": "0.05s",
        "weightExpirationPeriod": "60s", "errorUtilizationPenalty": 2.5}}]}"#;
    let channel = support::connect_serving(
        LbChannel::builder(target(&b))
            .default_service_config(config)
            .expect("valid"),
        2,
    )
    .await;
    until_weights(&channel, |_, w| usable(w)).await;
    let got = calls(&channel, 1000).await;
    assert_shares(&got, &[("b20", 0.8), ("b21", 0.2)]);

    let bad =
        r#"{"loadBalancingConfig": [{"weighted_round_robin": {"errorUtilizationPenalty": -1}}]}"#;
    let err = LbChannel::builder(target(&b))
        .default_service_config(bad)
        .expect_err("a negative penalty is refused");
    assert!(err.to_string().contains("errorUtilizationPenalty"), "{err}");
}
