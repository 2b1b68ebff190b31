//! `kubernetes:` endpoints against an in-process API server that speaks
//! the real protocol for EndpointSlices (testkit's `kube_api`): k8s-openapi's
//! JSON, `resourceVersion`, list pages, watch events, `410 Gone`, a watch
//! dropped mid-stream, a Service split over two slices. Behind it, real
//! tonic backends with tonic-health on 127.0.0.x.
#![cfg(feature = "kubernetes")]

use healthlb_testkit as support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use healthlb::resolve::kubernetes::EndpointSlices;
use healthlb::{LbChannel, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use support::echo::pb::EchoRequest;
use support::echo::pb::echo_client::EchoClient;
use support::echo::{Backend, backends, free_port};
use support::kube_api::{KubeApi, Pod, slice};
use support::{all_serving, is_serving, states, wait_for};

async fn client(api: &KubeApi) -> kube::Client {
    let config = kube::Config::new(api.url().parse().expect("a URL"));
    kube::Client::try_from(config).expect("a client")
}

/// A channel over Service `echo`'s slices, by the port's name.
async fn channel(api: &KubeApi, zone: Option<&str>) -> LbChannel {
    let source = EndpointSlices::new(
        client(api).await,
        "default",
        "echo",
        ServicePort::Name("grpc".into()),
    );
    let mut builder =
        LbChannel::from_source("echo.default:grpc", source).ready_timeout(Duration::from_secs(2));
    if let Some(zone) = zone {
        builder = builder.zone(zone);
    }
    builder.build().expect("builds")
}

async fn call(client: &mut EchoClient<LbChannel>) -> Result<String, tonic::Status> {
    let reply = client
        .unary(EchoRequest {
            message: "x".into(),
        })
        .await?;
    Ok(reply.into_inner().backend)
}

/// `n` calls; who answered how many. Every call must succeed.
async fn spread(channel: &LbChannel, n: usize) -> BTreeMap<String, usize> {
    let mut client = EchoClient::new(channel.clone());
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let who = call(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i} failed: {e}; {:?}", states(channel)));
        *seen.entry(who).or_default() += 1;
    }
    seen
}

fn names(backends: &[&Backend]) -> Vec<String> {
    let mut names: Vec<String> = backends.iter().map(|b| b.name.to_string()).collect();
    names.sort();
    names
}

#[test]
fn the_test_slices_are_what_k8s_openapi_reads() {
    let addr = "127.0.0.9:50051".parse().unwrap();
    let json = slice(
        "echo",
        "echo-a",
        &[Pod::Zoned(addr, "a", &["a", "b"]), Pod::Terminating(addr)],
    );
    let parsed: EndpointSlice =
        serde_json::from_value(json.clone()).expect("k8s-openapi parses it");
    assert_eq!(parsed.endpoints.len(), 2);
    assert_eq!(parsed.endpoints[0].zone.as_deref(), Some("a"));
    let hints = parsed.endpoints[0]
        .hints
        .as_ref()
        .and_then(|h| h.for_zones.as_ref());
    assert_eq!(hints.map(Vec::len), Some(2));
    assert_eq!(
        parsed.endpoints[1]
            .conditions
            .as_ref()
            .and_then(|c| c.terminating),
        Some(true)
    );
    assert_eq!(
        serde_json::to_value(&parsed).unwrap(),
        json,
        "nothing lost or renamed"
    );
}

#[tokio::test]
async fn slices_of_the_service_are_merged_and_followed() {
    support::init_tracing();
    let api = KubeApi::start().await;
    let port = free_port();
    let b = backends(160, 4, port).await;
    // One Service split over two slices, and another Service's slice.
    api.apply(slice(
        "echo",
        "echo-a",
        &[Pod::Ready(b[0].addr), Pod::Ready(b[1].addr)],
    ));
    api.apply(slice("echo", "echo-b", &[Pod::Ready(b[2].addr)]));
    api.apply(slice("other", "other-a", &[Pod::Ready(b[3].addr)]));
    let channel = channel(&api, None).await;
    all_serving(&channel, 3).await;
    let seen = spread(&channel, 30).await;
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        names(&[&b[0], &b[1], &b[2]])
    );

    // A pod added to a slice: a MODIFIED event.
    let added = Instant::now();
    api.apply(slice(
        "echo",
        "echo-b",
        &[Pod::Ready(b[2].addr), Pod::Ready(b[3].addr)],
    ));
    let seen_in = wait_for(Duration::from_secs(5), || is_serving(&channel, b[3].addr)).await;
    assert!(seen_in.is_some(), "{:?}", states(&channel));
    assert!(added.elapsed() < Duration::from_secs(5));

    // A slice deleted: its pods leave.
    api.delete("default", "echo-a");
    let gone = wait_for(Duration::from_secs(5), || channel.endpoints().len() == 2).await;
    assert!(gone.is_some(), "{:?}", states(&channel));
    let seen = spread(&channel, 20).await;
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        names(&[&b[2], &b[3]])
    );
    assert_eq!(
        api.asked.lists.load(Ordering::SeqCst),
        1,
        "one list, then the watch"
    );
}

#[tokio::test]
async fn a_terminating_pod_gets_no_new_call_while_a_ready_one_exists() {
    let api = KubeApi::start().await;
    let port = free_port();
    let b = backends(165, 3, port).await;
    api.apply(slice(
        "echo",
        "echo-a",
        &[
            Pod::Ready(b[0].addr),
            Pod::Ready(b[1].addr),
            Pod::Ready(b[2].addr),
        ],
    ));
    let channel = channel(&api, None).await;
    all_serving(&channel, 3).await;

    api.apply(slice(
        "echo",
        "echo-a",
        &[
            Pod::Terminating(b[0].addr),
            Pod::Ready(b[1].addr),
            Pod::Ready(b[2].addr),
        ],
    ));
    let left = wait_for(Duration::from_secs(5), || channel.endpoints().len() == 2).await;
    assert!(left.is_some(), "{:?}", states(&channel));
    let before = b[0].calls();
    let seen = spread(&channel, 30).await;
    assert_eq!(
        b[0].calls(),
        before,
        "the terminating pod got calls: {seen:?}"
    );

    // Every pod terminating: the serving ones still take the calls.
    api.apply(slice(
        "echo",
        "echo-a",
        &[
            Pod::Terminating(b[0].addr),
            Pod::Terminating(b[1].addr),
            Pod::Terminating(b[2].addr),
        ],
    ));
    all_serving(&channel, 3).await;
    assert_eq!(spread(&channel, 30).await.len(), 3);
}

#[tokio::test]
async fn a_gone_watch_and_a_dropped_one_keep_the_set_and_catch_up() {
    support::init_tracing();
    let api = KubeApi::start().await;
    api.page_size(1); // chunked lists: a page per slice
    let port = free_port();
    let b = backends(170, 4, port).await;
    api.apply(slice("echo", "echo-a", &[Pod::Ready(b[0].addr)]));
    api.apply(slice("echo", "echo-b", &[Pod::Ready(b[1].addr)]));
    let channel = channel(&api, None).await;
    all_serving(&channel, 2).await;
    assert!(
        api.asked.continued.load(Ordering::SeqCst) >= 1,
        "the list came in pages"
    );

    // 410 Gone: the watcher lists again; calls go on meanwhile.
    let lists = api.asked.lists.load(Ordering::SeqCst);
    api.expire();
    let mut client = EchoClient::new(channel.clone());
    for i in 0..20 {
        call(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    api.apply(slice("echo", "echo-c", &[Pod::Ready(b[2].addr)]));
    let relisted = wait_for(Duration::from_secs(10), || is_serving(&channel, b[2].addr)).await;
    assert!(relisted.is_some(), "{:?}", states(&channel));
    assert!(
        api.asked.lists.load(Ordering::SeqCst) > lists,
        "a relist after 410"
    );

    // A watch dropped mid-stream: a new one, and nothing missed.
    let watches = api.asked.watches.load(Ordering::SeqCst);
    api.drop_watches();
    api.bookmark();
    api.apply(slice("echo", "echo-d", &[Pod::Ready(b[3].addr)]));
    let resumed = wait_for(Duration::from_secs(10), || is_serving(&channel, b[3].addr)).await;
    assert!(resumed.is_some(), "{:?}", states(&channel));
    assert!(api.asked.watches.load(Ordering::SeqCst) > watches);
    assert_eq!(channel.endpoints().len(), 4);
    assert_eq!(spread(&channel, 40).await.len(), 4);
}

#[tokio::test]
async fn a_gone_watch_is_routine_and_the_source_reports_no_failure() {
    use healthlb::resolve::EndpointSource;
    let api = KubeApi::start().await;
    let port = free_port();
    let (a, b) = (
        format!("127.0.0.180:{port}").parse().unwrap(),
        format!("127.0.0.181:{port}").parse().unwrap(),
    );
    api.apply(slice("echo", "echo-a", &[Pod::Ready(a)]));
    let mut source = EndpointSlices::new(
        client(&api).await,
        "default",
        "echo",
        ServicePort::Name("grpc".into()),
    );
    let first = tokio::time::timeout(Duration::from_secs(5), source.next())
        .await
        .expect("the first set within 5 s")
        .expect("the source goes on")
        .expect("a set");
    assert_eq!(first.len(), 1);
    let lists = api.asked.lists.load(Ordering::SeqCst);
    api.expire();
    api.apply(slice("echo", "echo-b", &[Pod::Ready(b)]));
    // Each answer until the new slice shows is a set: a 410 is no failure
    // (the channel would log a warning and report resolution failing).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for _ in 0..100 {
        let next = tokio::time::timeout_at(deadline, source.next())
            .await
            .expect("the new slice within 10 s")
            .expect("the source goes on");
        let set = next.unwrap_or_else(|e| panic!("a 410 reported as a failure: {e}"));
        if set.len() == 2 {
            break;
        }
    }
    assert!(
        api.asked.lists.load(Ordering::SeqCst) > lists,
        "listed again"
    );
}

#[tokio::test]
async fn an_unreachable_api_fails_calls_saying_so() {
    let api = KubeApi::start().await;
    let url = api.url();
    drop(api);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let config = kube::Config::new(url.parse().unwrap());
    let source = EndpointSlices::new(
        kube::Client::try_from(config).unwrap(),
        "default",
        "echo",
        ServicePort::Number(50051),
    );
    let channel = LbChannel::from_source("echo.default:50051", source)
        .ready_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut client = EchoClient::new(channel);
    let err = call(&mut client).await.expect_err("no endpoint");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    for what in ["EndpointSlices of default/echo", "Connection refused"] {
        assert!(err.message().contains(what), "{what}: {}", err.message());
    }

    let config = kube::Config::new(url.parse().unwrap());
    let err =
        healthlb::resolve::kubernetes::node_zone(kube::Client::try_from(config).unwrap(), "node-1")
            .await
            .expect_err("no API");
    for what in ["Node \"node-1\"", "Connection refused"] {
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}

#[tokio::test]
async fn hints_for_zones_route_exactly_where_they_say() {
    let api = KubeApi::start().await;
    let port = free_port();
    let b = backends(175, 3, port).await;
    api.apply(slice(
        "echo",
        "echo-a",
        &[
            Pod::Zoned(b[0].addr, "a", &["a"]),
            Pod::Zoned(b[1].addr, "b", &["b"]),
            Pod::Zoned(b[2].addr, "b", &["c"]),
        ],
    ));
    for (zone, expect) in [("a", &b[0]), ("b", &b[1]), ("c", &b[2])] {
        let channel = channel(&api, Some(zone)).await;
        let only = wait_for(Duration::from_secs(10), || {
            let eps = channel.endpoints();
            eps.len() == 3 && eps.iter().filter(|e| e.in_rotation).count() == 1
        })
        .await;
        assert!(only.is_some(), "{zone}: {:?}", states(&channel));
        let seen = spread(&channel, 20).await;
        assert_eq!(
            seen.keys().cloned().collect::<Vec<_>>(),
            names(&[expect]),
            "zone {zone}"
        );
        let status = channel.endpoints();
        let mine = status.iter().find(|e| e.addr == expect.addr).unwrap();
        assert!(mine.to_string().contains("(zone "), "{mine}");
    }
}
