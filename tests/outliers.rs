//! Balancing on what calls show, against real tonic servers on loopback:
//! outlier ejection of a pod that says SERVING but fails its calls, panic
//! mode, the load-aware policies against a slow pod, slow start, and the
//! service config that sets them.

use healthlb_testkit as support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use healthlb::{ConsecutiveFailures, LbChannel, OutlierDetection, Policy, SlowStart};
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, free_port, loopback};
use support::wait_for;
use tower::discover::Change;

async fn backends(first: u8, n: u8) -> Vec<Backend> {
    support::echo::backends(first, n, free_port()).await
}

fn target(backends: &[Backend]) -> String {
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    format!("ipv4:{}", list.join(","))
}

async fn serving(channel: &LbChannel, n: usize) {
    let all = wait_for(Duration::from_secs(10), || {
        channel
            .endpoints()
            .iter()
            .filter(|e| e.state.is_serving() && e.in_rotation)
            .count()
            == n
    })
    .await;
    assert!(all.is_some(), "{:?}", channel.endpoints());
}

/// `n` calls from one caller: which backend answered each, and the errors.
async fn calls(channel: &LbChannel, n: usize) -> (HashMap<String, usize>, Vec<tonic::Status>) {
    let mut client = EchoClient::new(channel.clone());
    let mut answered = HashMap::new();
    let mut failed = Vec::new();
    for _ in 0..n {
        let call = client.unary(EchoRequest {
            message: "o".into(),
        });
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(reply)) => *answered.entry(reply.into_inner().backend).or_default() += 1,
            Ok(Err(status)) => failed.push(status),
            Err(_) => panic!("a call hung"),
        }
    }
    (answered, failed)
}

fn fail(backend: &Backend, code: tonic::Code) {
    backend
        .counters
        .fail_with
        .store(code as i32, Ordering::SeqCst);
}

#[tokio::test]
async fn a_pod_failing_with_unavailable_is_ejected_and_returns() {
    let backends = backends(60, 3).await;
    let channel = LbChannel::builder(target(&backends))
        .outlier_detection(
            OutlierDetection::default().base_ejection_time(Duration::from_millis(1500)),
        )
        .build()
        .unwrap();
    serving(&channel, 3).await;
    let mut discover = channel.discover();
    let mut inserted = 0;
    while inserted < 3 {
        let change = tokio::time::timeout(Duration::from_secs(5), discover.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(change, Change::Insert(..)));
        inserted += 1;
    }

    let bad = &backends[0];
    fail(bad, tonic::Code::Unavailable);
    // Calls one at a time, each noted with whether the pod was ejected (and
    // out of rotation) before it began and after it ended: a call with both
    // ran wholly inside an ejection. On a slow machine an ejection may end
    // during the calls, and the pod, still failing, is ejected again after
    // 5 more failures: the product's promise either way.
    let ejected = |channel: &LbChannel| {
        channel
            .endpoints()
            .into_iter()
            .find(|e| e.addr == bad.addr && e.ejected_for.is_some() && !e.in_rotation)
    };
    let mut client = EchoClient::new(channel.clone());
    let (mut failed, mut inside, mut first_ejection) = (Vec::new(), 0, None);
    let mut first_line = None;
    for _ in 0..1000 {
        let before = ejected(&channel).is_some();
        let call = client.unary(EchoRequest {
            message: "o".into(),
        });
        let answer = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a call hung");
        let after = ejected(&channel);
        match answer {
            Ok(reply) if before && after.is_some() => {
                assert_ne!(
                    reply.into_inner().backend,
                    "b60",
                    "a call inside an ejection"
                );
                inside += 1;
            }
            Ok(_) => {}
            Err(status) => failed.push(status),
        }
        if first_ejection.is_none() && after.is_some() {
            first_line = after.as_ref().map(ToString::to_string);
            first_ejection = after;
        }
        if inside >= 100 {
            break;
        }
    }
    assert!(inside >= 100, "calls ran inside an ejection: {inside}");
    // Five in a row eject it: those five are all that fail, per ejection.
    assert!(
        !failed.is_empty() && failed.len() % 5 == 0,
        "{} failed: {failed:?}",
        failed.len()
    );
    assert!(failed.iter().all(|s| s.code() == tonic::Code::Unavailable));
    let n = failed.len() as u64;
    let status = first_ejection.expect("it was ejected");
    assert!(
        status.state.is_serving(),
        "its Watch stays up: {}",
        status.state
    );
    assert_eq!(status.ejection_reason, Some("consecutive_failures"));
    assert!(
        status
            .ejected_for
            .is_some_and(|d| d <= Duration::from_millis(1500))
    );
    assert_eq!(status.connections, 1, "its connection stays up");
    // What its calls came to, as a person reads the status.
    let status = channel
        .endpoints()
        .into_iter()
        .find(|e| e.addr == bad.addr)
        .unwrap();
    assert_eq!(
        (status.calls_started, status.calls_ok, status.calls_failed),
        (n, 0, n),
        "{status}"
    );
    assert_eq!(status.calls_transport_failed + status.calls_cancelled, 0);
    let last = status.last_call_error.as_ref().expect("the last failure");
    assert_eq!(last.code(), tonic::Code::Unavailable);
    assert_eq!(last.message(), "b60 fails on purpose");
    // As a person reads it, at the first ejection: right after the fifth.
    let line = first_line.expect("it was ejected");
    assert!(
        line.contains("SERVING, ejected for")
            && line.contains("(consecutive_failures), out of rotation")
            && line.contains("5 started, 0 ok, 5 failed")
            && line.contains("b60 fails on purpose"),
        "{line}"
    );
    // The others' counts add up.
    for e in channel.endpoints().iter().filter(|e| e.addr != bad.addr) {
        assert_eq!(e.calls_started, e.calls_ok, "{e}");
        assert!(e.last_call_error.is_none(), "{e}");
    }
    // Discover drops it too.
    let removed = tokio::time::timeout(Duration::from_secs(5), discover.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(removed, Change::Remove(addr) if addr == bad.addr));

    // Fixed, it returns once its ejection ends, and gets its share again.
    fail(bad, tonic::Code::Ok);
    let back = wait_for(Duration::from_secs(5), || {
        channel
            .endpoints()
            .iter()
            .all(|e| e.ejected_for.is_none() && e.in_rotation)
    })
    .await;
    assert!(back.is_some(), "{:?}", channel.endpoints());
    let (answered, failed) = calls(&channel, 90).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(answered.get("b60"), Some(&30), "{answered:?}");
}

#[tokio::test]
async fn a_request_the_client_refuses_to_send_ejects_nothing() {
    let backends = backends(57, 2).await;
    let channel = LbChannel::builder(target(&backends)).build().unwrap();
    serving(&channel, 2).await;
    // Over the client's own limit: tonic's encoder fails the request body,
    // and the client resets the stream. The servers did nothing wrong.
    let mut client = EchoClient::new(channel.clone()).max_encoding_message_size(64);
    for _ in 0..12 {
        let call = client.unary(EchoRequest {
            message: "x".repeat(1000),
        });
        let status = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("no hang")
            .expect_err("too large to send");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(
            status
                .message()
                .contains("encoded message length too large"),
            "the caller hears why, from the encoder: {status:?}"
        );
    }
    for e in channel.endpoints() {
        assert!(e.ejected_for.is_none() && e.in_rotation, "{e}");
        assert_eq!(e.calls_transport_failed + e.calls_failed, 0, "{e}");
        assert!(e.last_call_error.is_none(), "{e}");
    }
    // And the channel still works.
    let (answered, failed) = calls(&channel, 4).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(answered.values().sum::<usize>(), 4);
}

#[tokio::test]
async fn application_errors_do_not_eject() {
    let backends = backends(64, 3).await;
    let channel = LbChannel::builder(target(&backends)).build().unwrap();
    serving(&channel, 3).await;
    fail(&backends[0], tonic::Code::NotFound);
    fail(&backends[1], tonic::Code::InvalidArgument);
    let (answered, failed) = calls(&channel, 150).await;
    assert_eq!(
        failed.len(),
        100,
        "round robin still sends them their share"
    );
    assert_eq!(answered.get("b66"), Some(&50));
    assert!(
        channel
            .endpoints()
            .iter()
            .all(|e| e.ejected_for.is_none() && e.in_rotation)
    );
    // DEADLINE_EXCEEDED depends on the caller: not counted either.
    fail(&backends[0], tonic::Code::DeadlineExceeded);
    let _ = calls(&channel, 60).await;
    assert!(
        channel
            .endpoints()
            .iter()
            .all(|e| e.ejected_for.is_none() && e.in_rotation)
    );
}

#[tokio::test]
async fn with_every_pod_ejected_calls_still_go_to_them() {
    let backends = backends(68, 2).await;
    let channel = LbChannel::builder(target(&backends))
        .outlier_detection(
            OutlierDetection::default()
                .consecutive_failures(ConsecutiveFailures::new(3))
                .max_ejection_percent(100),
        )
        .build()
        .unwrap();
    serving(&channel, 2).await;
    for b in &backends {
        fail(b, tonic::Code::Internal);
    }
    let (_, failed) = calls(&channel, 40).await;
    assert_eq!(failed.len(), 40);
    let ejected = channel
        .endpoints()
        .iter()
        .filter(|e| e.ejected_for.is_some())
        .count();
    assert_eq!(ejected, 2, "{:?}", channel.endpoints());
    // Panic mode: the servers still answer, with their own errors, rather
    // than the channel failing for want of an endpoint.
    let before: u64 = backends.iter().map(Backend::calls).sum();
    let (_, failed) = calls(&channel, 10).await;
    let after: u64 = backends.iter().map(Backend::calls).sum();
    assert_eq!(after - before, 10);
    assert!(
        failed
            .iter()
            .all(|s| s.code() == tonic::Code::Internal && s.message().contains("on purpose")),
        "{failed:?}"
    );
}

/// `concurrency` callers for `n` calls each; calls per backend.
async fn load(channel: &LbChannel, concurrency: usize, n: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move { calls(&channel, n).await }));
    }
    let mut total = HashMap::new();
    for task in tasks {
        let (answered, failed) = task.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        for (k, v) in answered {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_policies_keep_calls_off_a_slow_pod() {
    let backends = backends(72, 3).await;
    // 200 ms: far slower than the others even on a starved machine, where
    // they slow down too.
    backends[0]
        .counters
        .delay_us
        .store(200_000, Ordering::SeqCst);
    // peak_ewma tells the slow pod apart at a concurrency of 1.
    let ewma = LbChannel::builder(target(&backends))
        .policy(Policy::peak_ewma())
        .build()
        .unwrap();
    serving(&ewma, 3).await;
    let per = load(&ewma, 1, 200).await;
    let slow = per.get("b72").copied().unwrap_or(0);
    assert!(
        slow <= 6,
        "peak_ewma sent {slow} of 200 to the slow pod: {per:?}"
    );

    // least_request under concurrency: the slow pod's calls pile up, so
    // it is picked less. By Little's law its share is about its latency's
    // inverse: 1 % here, 5 % if the others took 20 ms.
    let least = LbChannel::builder(target(&backends))
        .policy(Policy::least_request(2))
        .build()
        .unwrap();
    serving(&least, 3).await;
    let per = load(&least, 12, 50).await;
    let slow = per.get("b72").copied().unwrap_or(0);
    assert!(
        slow < 60,
        "least_request sent {slow} of 600 to the slow pod: {per:?}"
    );

    // Round robin, for contrast, gives it a third.
    backends[0].counters.delay_us.store(1_000, Ordering::SeqCst);
    let rr = LbChannel::builder(target(&backends)).build().unwrap();
    serving(&rr, 3).await;
    let per = load(&rr, 3, 30).await;
    assert_eq!(per.get("b72"), Some(&30), "{per:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_pod_up() {
    let mut backends = backends(76, 2).await;
    let port = backends[0].addr.port();
    let dns = support::dns::TestDns::start().await;
    let host = "ramp.test.local";
    let ips = |bs: &[Backend]| {
        bs.iter()
            .map(|b| match b.addr.ip() {
                std::net::IpAddr::V4(ip) => ip,
                _ => unreachable!(),
            })
            .collect::<Vec<_>>()
    };
    dns.zone().set_a(host, &ips(&backends), 1);
    let channel = LbChannel::builder(dns.target(host, port))
        .slow_start(SlowStart::new(Duration::from_secs(3)))
        .build()
        .unwrap();
    serving(&channel, 2).await;
    // The first pods ramp too, all alike; past their window they are at
    // full weight.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    backends.push(Backend::start("b78", loopback(78, port)).await);
    dns.zone().set_a(host, &ips(&backends), 1);
    serving(&channel, 3).await;
    let joined = Instant::now();
    // Early in its ramp the new pod gets 10 % to 25 % of a full share,
    // where round robin would give it a third of the calls.
    let per = load(&channel, 4, 50).await;
    let new = per.get("b78").copied().unwrap_or(0);
    if joined.elapsed() < Duration::from_millis(750) {
        assert!(
            (1..=40).contains(&new),
            "the new pod got {new} of 200 in {:?}: {per:?}",
            joined.elapsed()
        );
    }
    // Past its window, it gets its full share.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let per = load(&channel, 3, 60).await;
    assert_eq!(per.get("b78"), Some(&60), "{per:?}");
}

#[tokio::test]
async fn the_service_config_sets_policy_and_ejection() {
    let backends = backends(80, 3).await;
    let config = r#"{
        "loadBalancingConfig": [
            {"pick_first": {}},
            {"outlier_detection_experimental": {
                "interval": "0.2s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 50,
                "failurePercentageEjection": {"threshold": 50, "minimumHosts": 3, "requestVolume": 10},
                "childPolicy": [{"least_request_experimental": {"choiceCount": 3}}]
            }}
        ],
        "methodConfig": [{"name": [{"service": "echo.Echo"}], "timeout": "2s"}]
    }"#;
    let channel = LbChannel::builder(target(&backends))
        .default_service_config(config)
        .unwrap()
        .build()
        .unwrap();
    let kept = channel.service_config().unwrap();
    assert_eq!(kept.policy, Some(Policy::least_request(3)));
    assert_eq!(
        kept.method("echo.Echo", "Unary").unwrap().timeout,
        Some(Duration::from_secs(2))
    );
    serving(&channel, 3).await;
    // A50's failure percentage: no consecutive-failure rule here, so the
    // pod is ejected at an interval's end, not after five in a row.
    fail(&backends[1], tonic::Code::Unavailable);
    let caller = {
        let channel = channel.clone();
        tokio::spawn(async move {
            // Bounded: at most 2,000 calls, until the pod is ejected.
            for _ in 0..100 {
                calls(&channel, 20).await;
                if channel.endpoints().iter().any(|e| e.ejected_for.is_some()) {
                    break;
                }
            }
        })
    };
    let ejected = wait_for(Duration::from_secs(10), || {
        channel
            .endpoints()
            .iter()
            .any(|e| e.addr == backends[1].addr && e.ejection_reason == Some("failure_percentage"))
    })
    .await;
    assert!(ejected.is_some(), "{:?}", channel.endpoints());
    caller.await.unwrap();
    let (answered, failed) = calls(&channel, 60).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(!answered.contains_key("b81"));

    let err = LbChannel::builder(target(&backends))
        .default_service_config(r#"{"loadBalancingConfig": [{"pick_first": {}}]}"#)
        .unwrap_err();
    assert_eq!(err.kind(), healthlb::ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("loadBalancingConfig"), "{err}");
}
