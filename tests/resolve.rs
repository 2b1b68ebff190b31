//! Resolution against a real DNS server (hickory-server, in-process on
//! loopback), on real time with 1 s TTLs, records changed while it runs.

use healthlb_testkit as support;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use healthlb::ErrorKind;
use healthlb::Target;
use healthlb::resolve::{ResolveConfig, ResolveStatus, Resolver};
use support::dns::{Mode, TestDns, garbage_server, many_ips};
use support::hickory_server::proto::rr::RecordType;
use support::{wait_for, within};

const HOST: &str = "echo.test.local";
/// TTL + 1 s: how soon a change must show.
const CHANGE_LIMIT: Duration = Duration::from_secs(2);

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

fn addrs(resolver: &Resolver) -> Vec<SocketAddr> {
    resolver.endpoints().iter().map(|e| e.addr()).collect()
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn spawn(target: &str, config: ResolveConfig) -> Resolver {
    let target: Target = target.parse().expect("test targets parse");
    Resolver::spawn(&target, config).expect("resolver spawns")
}

async fn first(resolver: &mut Resolver) -> Vec<SocketAddr> {
    within(
        Duration::from_secs(5),
        "the first resolution",
        resolver.changed(),
    )
    .await
    .expect("resolution runs")
    .iter()
    .map(|e| e.addr())
    .collect()
}

#[tokio::test]
async fn a_records_added_and_removed_show_within_ttl_plus_one_second() {
    support::init_tracing();
    let dns = TestDns::start().await;
    dns.set_a(HOST, &[v4(3), v4(2)], 1);
    let mut resolver = spawn(&dns.target(HOST, 50051), ResolveConfig::default());

    assert_eq!(
        first(&mut resolver).await,
        vec![sock(v4(2), 50051), sock(v4(3), 50051)]
    );
    let e = &resolver.endpoints()[0];
    assert_eq!(e.hostname(), Some(HOST));
    assert_eq!((e.priority(), e.weight()), (None, None));

    dns.set_a(HOST, &[v4(2), v4(3), v4(4)], 1);
    let took = wait_for(CHANGE_LIMIT, || addrs(&resolver).len() == 3).await;
    assert!(
        took.is_some(),
        "an added record must show within TTL + 1 s: {:?}",
        addrs(&resolver)
    );

    dns.set_a(HOST, &[v4(3), v4(4)], 1);
    let took = wait_for(CHANGE_LIMIT, || {
        addrs(&resolver) == vec![sock(v4(3), 50051), sock(v4(4), 50051)]
    })
    .await;
    assert!(
        took.is_some(),
        "a removed record must go within TTL + 1 s: {:?}",
        addrs(&resolver)
    );

    // hickory's cache is off: with a 1 s TTL it asks about once a second.
    let before = dns.queries(HOST, RecordType::A);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let asked = dns.queries(HOST, RecordType::A) - before;
    assert!(
        (2..=5).contains(&asked),
        "expected about 3 A queries in 3.5 s, got {asked}"
    );
    assert!(matches!(resolver.status(), ResolveStatus::Resolved { .. }));
}

#[tokio::test]
async fn unchanged_answers_publish_nothing() {
    let dns = TestDns::start().await;
    dns.set_a(HOST, &[v4(2)], 1);
    let mut resolver = spawn(&dns.target(HOST, 80), ResolveConfig::default());
    first(&mut resolver).await;
    let before = dns.queries(HOST, RecordType::A);
    let next = tokio::time::timeout(Duration::from_millis(2500), resolver.changed()).await;
    assert!(next.is_err(), "the same answer must not be published again");
    assert!(
        dns.queries(HOST, RecordType::A) > before,
        "it did ask again"
    );
}

#[tokio::test]
async fn aaaa_records_are_resolved_with_a_records() {
    let dns = TestDns::start().await;
    dns.set_a(HOST, &[v4(2)], 1);
    dns.set_aaaa(HOST, &[Ipv6Addr::LOCALHOST], 1);
    let mut resolver = spawn(&dns.target(HOST, 50051), ResolveConfig::default());
    let got = first(&mut resolver).await;
    assert_eq!(
        got,
        vec![sock(v4(2), 50051), "[::1]:50051".parse().unwrap()]
    );

    // IPv6 only.
    dns.set_a(HOST, &[], 1);
    let only_v6 = wait_for(CHANGE_LIMIT, || {
        addrs(&resolver) == vec!["[::1]:50051".parse().unwrap()]
    })
    .await;
    assert!(only_v6.is_some(), "{:?}", addrs(&resolver));
}

#[tokio::test]
async fn srv_picks_the_lowest_priority_group_with_addresses() {
    for glue in [true, false] {
        let dns = TestDns::start().await;
        dns.set_glue(glue);
        let name = "_grpc._tcp.echo.test.local";
        dns.set_srv(
            name,
            &[
                (10, 5, 50051, "pod-a.echo.test.local"),
                (10, 7, 50052, "pod-b.echo.test.local"),
                (20, 1, 50053, "pod-c.echo.test.local"),
            ],
            1,
        );
        dns.set_a("pod-a.echo.test.local", &[v4(2)], 1);
        dns.set_a("pod-b.echo.test.local", &[v4(3)], 1);
        dns.set_a("pod-c.echo.test.local", &[v4(4)], 1);
        let mut resolver = spawn(
            &format!("srv://{}/{name}", dns.addr()),
            ResolveConfig::default(),
        );

        let got = first(&mut resolver).await;
        assert_eq!(
            got,
            vec![sock(v4(2), 50051), sock(v4(3), 50052)],
            "glue: {glue}"
        );
        let eps = resolver.endpoints();
        assert_eq!(eps[0].hostname(), Some("pod-a.echo.test.local"));
        assert_eq!((eps[0].priority(), eps[0].weight()), (Some(10), Some(5)));
        assert_eq!((eps[1].priority(), eps[1].weight()), (Some(10), Some(7)));
        if glue {
            assert_eq!(
                dns.queries("pod-a.echo.test.local", RecordType::A),
                0,
                "glue saves lookups"
            );
        } else {
            assert!(dns.queries("pod-a.echo.test.local", RecordType::A) > 0);
        }

        // The first group loses its addresses: the next group takes over.
        dns.remove("pod-a.echo.test.local");
        dns.remove("pod-b.echo.test.local");
        let fallback = wait_for(CHANGE_LIMIT, || {
            addrs(&resolver) == vec![sock(v4(4), 50053)]
        })
        .await;
        assert!(fallback.is_some(), "glue {glue}: {:?}", addrs(&resolver));
        assert_eq!(resolver.endpoints()[0].priority(), Some(20));
    }
}

#[tokio::test]
async fn a_stopped_dns_server_keeps_the_last_set_and_a_restarted_one_is_picked_up() {
    support::init_tracing();
    let dns = TestDns::start().await;
    let server = dns.addr();
    dns.set_a(HOST, &[v4(2), v4(3)], 1);
    let config = ResolveConfig::default().dns_timeout(Duration::from_millis(500));
    let mut resolver = spawn(&dns.target(HOST, 80), config);
    let before = first(&mut resolver).await;

    let zone = dns.stop().await;
    let failing = wait_for(Duration::from_secs(3), || {
        matches!(resolver.status(), ResolveStatus::Failing { .. })
    })
    .await;
    assert!(
        failing.is_some(),
        "a silent DNS server must show as failing"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        addrs(&resolver),
        before,
        "the last good set is kept during the outage"
    );
    let ResolveStatus::Failing {
        attempts, error, ..
    } = resolver.status()
    else {
        panic!("still failing")
    };
    assert!(attempts >= 2, "it keeps retrying: {attempts}");
    assert_eq!(error.kind(), ErrorKind::Resolve);
    assert!(
        error
            .to_string()
            .starts_with(&format!("resolving \"dns://{server}/{HOST}:80\" failed: ")),
        "{error}"
    );

    zone.set_a(HOST, &[v4(4)], 1);
    let _dns = TestDns::serve(server, zone).await;
    let picked_up = wait_for(CHANGE_LIMIT, || addrs(&resolver) == vec![sock(v4(4), 80)]).await;
    assert!(
        picked_up.is_some(),
        "restart must be seen within TTL + 1 s: {:?}",
        addrs(&resolver)
    );
    assert!(matches!(resolver.status(), ResolveStatus::Resolved { .. }));
}

#[tokio::test]
async fn nxdomain_and_empty_answers_publish_the_empty_set() {
    let dns = TestDns::start().await;
    // NXDOMAIN from the start is published, as an empty set.
    let mut resolver = spawn(
        &dns.target("nobody.test.local", 80),
        ResolveConfig::default(),
    );
    assert_eq!(first(&mut resolver).await, vec![]);
    assert!(matches!(resolver.status(), ResolveStatus::Resolved { .. }));

    dns.set_a(HOST, &[v4(2)], 1);
    let mut resolver = spawn(&dns.target(HOST, 80), ResolveConfig::default());
    assert_eq!(first(&mut resolver).await.len(), 1);
    // Every pod unready: NXDOMAIN.
    dns.remove(HOST);
    let gone = within(CHANGE_LIMIT, "the empty set", resolver.changed())
        .await
        .unwrap();
    assert!(gone.is_empty());

    // NOERROR without A records (the name has other records): also empty.
    dns.set_a(HOST, &[v4(2)], 1);
    assert_eq!(
        within(CHANGE_LIMIT, "records again", resolver.changed())
            .await
            .unwrap()
            .len(),
        1
    );
    dns.set_a(HOST, &[], 1);
    dns.set_cname("alias.test.local", HOST, 1);
    dns.set_aaaa(HOST, &[], 1);
    dns.set_srv(HOST, &[(1, 1, 80, "x.test.local")], 1);
    let empty = within(CHANGE_LIMIT, "the empty set", resolver.changed())
        .await
        .unwrap();
    assert!(empty.is_empty());
    assert!(matches!(resolver.status(), ResolveStatus::Resolved { .. }));
}

#[tokio::test]
async fn an_answer_of_2000_records_respects_the_cap() {
    let dns = TestDns::start().await;
    dns.set_a(HOST, &many_ips(2000), 1);
    let mut resolver = spawn(
        &dns.target(HOST, 80),
        ResolveConfig::default().max_endpoints(1024),
    );
    let got = first(&mut resolver).await;
    assert_eq!(got.len(), 1024);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "sorted and unique");

    // The same answer keeps the same subset: no churn across refreshes.
    let next = tokio::time::timeout(Duration::from_millis(2500), resolver.changed()).await;
    assert!(
        next.is_err(),
        "refreshes must not publish a different subset"
    );
    assert!(dns.queries(HOST, RecordType::A) >= 2);

    // The default cap is 1024 too.
    let mut resolver = spawn(&dns.target(HOST, 80), ResolveConfig::default());
    assert_eq!(first(&mut resolver).await.len(), 1024);
}

#[tokio::test]
async fn resolve_now_is_rate_limited_to_once_per_min_refresh() {
    let dns = TestDns::start().await;
    dns.set_a(HOST, &[v4(2)], 30);
    let mut resolver = spawn(&dns.target(HOST, 80), ResolveConfig::default());
    first(&mut resolver).await;
    let before = dns.queries(HOST, RecordType::A);

    // 250 requests over 2.5 s.
    for _ in 0..250 {
        resolver.resolve_now();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = dns.queries(HOST, RecordType::A) - before;
    assert!(
        (1..=3).contains(&asked),
        "250 requests in 2.5 s gave {asked} lookups; want at most 3"
    );

    // It works: a change behind a 30 s TTL is seen at once on request.
    dns.set_a(HOST, &[v4(5)], 30);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    resolver.resolve_now();
    let seen = wait_for(Duration::from_millis(1500), || {
        addrs(&resolver) == vec![sock(v4(5), 80)]
    })
    .await;
    assert!(
        seen.is_some(),
        "resolve_now must re-resolve early: {:?}",
        addrs(&resolver)
    );
}

#[tokio::test]
async fn cname_chains_resolve_and_loops_keep_the_last_set() {
    let dns = TestDns::start().await;
    dns.set_cname("alias.test.local", "alias2.test.local", 1);
    dns.set_cname("alias2.test.local", HOST, 1);
    dns.set_a(HOST, &[v4(2)], 1);
    let mut resolver = spawn(
        &dns.target("alias.test.local", 80),
        ResolveConfig::default(),
    );
    assert_eq!(first(&mut resolver).await, vec![sock(v4(2), 80)]);

    // Now a loop.
    dns.set_cname("alias2.test.local", "alias.test.local", 1);
    let failing = wait_for(Duration::from_secs(4), || {
        matches!(resolver.status(), ResolveStatus::Failing { .. })
    })
    .await;
    assert!(
        failing.is_some(),
        "a CNAME loop is a failure: {:?} {:?}",
        resolver.status(),
        addrs(&resolver)
    );
    let ResolveStatus::Failing { error, .. } = resolver.status() else {
        unreachable!()
    };
    assert!(error.to_string().contains("CNAME chain"), "{error}");
    assert_eq!(
        addrs(&resolver),
        vec![sock(v4(2), 80)],
        "the last good set stays"
    );
}

#[tokio::test]
async fn servfail_and_truncation_keep_the_last_set_then_recover() {
    for (mode, expect) in [
        (Mode::ServFail, "Server Failure"),
        (Mode::Truncate, "truncated"),
    ] {
        let dns = TestDns::start().await;
        dns.set_a(HOST, &[v4(2)], 1);
        let mut resolver = spawn(&dns.target(HOST, 80), ResolveConfig::default());
        first(&mut resolver).await;

        dns.set_mode(mode);
        let failing = wait_for(Duration::from_secs(4), || {
            matches!(resolver.status(), ResolveStatus::Failing { .. })
        })
        .await;
        assert!(failing.is_some(), "{mode:?} must show as failing");
        let ResolveStatus::Failing { error, .. } = resolver.status() else {
            unreachable!()
        };
        assert!(error.to_string().contains(expect), "{mode:?}: {error}");
        assert_eq!(addrs(&resolver), vec![sock(v4(2), 80)]);

        dns.set_a(HOST, &[v4(3)], 1);
        dns.set_mode(Mode::Normal);
        let back = wait_for(Duration::from_secs(3), || {
            addrs(&resolver) == vec![sock(v4(3), 80)]
        })
        .await;
        assert!(back.is_some(), "{mode:?}: recovery within about a refresh");
        assert!(matches!(resolver.status(), ResolveStatus::Resolved { .. }));
    }
}

#[tokio::test]
async fn a_peer_sending_garbage_fails_cleanly() {
    let (addr, server) = garbage_server().await;
    let config = ResolveConfig::default().dns_timeout(Duration::from_millis(800));
    let resolver = spawn(&format!("dns://{addr}/{HOST}:80"), config);
    let failing = wait_for(Duration::from_secs(4), || {
        matches!(resolver.status(), ResolveStatus::Failing { .. })
    })
    .await;
    assert!(failing.is_some(), "garbage must be a failure, not a hang");
    assert!(resolver.endpoints().is_empty());
    server.abort();
}

#[tokio::test]
async fn fixed_lists_publish_once() {
    let mut resolver = spawn(
        "ipv4:127.0.0.3:80,127.0.0.2:80,127.0.0.3:80",
        ResolveConfig::default(),
    );
    assert_eq!(
        first(&mut resolver).await,
        vec![sock(v4(2), 80), sock(v4(3), 80)]
    );
    let again = tokio::time::timeout(Duration::from_millis(300), resolver.changed()).await;
    assert!(again.is_err(), "a fixed list never changes");
}

#[tokio::test]
async fn the_system_configuration_resolves_localhost() {
    // No authority: resolv.conf and the hosts file apply.
    let mut resolver = spawn("dns:///localhost:50051", ResolveConfig::default());
    let got = first(&mut resolver).await;
    assert!(got.contains(&"127.0.0.1:50051".parse().unwrap()), "{got:?}");
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_task() {
    let dns = TestDns::start().await;
    dns.set_a(HOST, &[v4(2)], 1);
    let mut resolver = spawn(&dns.target(HOST, 80), ResolveConfig::default());
    first(&mut resolver).await;
    let clone = resolver.clone();
    drop(resolver);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        dns.queries(HOST, RecordType::A) >= 2,
        "a clone keeps it running"
    );
    drop(clone);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_drop = dns.total_queries();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        dns.total_queries(),
        after_drop,
        "no lookups after the last handle is gone"
    );
}

#[tokio::test]
async fn bad_configuration_is_refused() {
    let target: Target = "dns:///svc:80".parse().unwrap();
    let cases = [
        (
            ResolveConfig::default().min_refresh(Duration::ZERO),
            "min_refresh must be above zero",
        ),
        (
            ResolveConfig::default().max_refresh(Duration::from_millis(10)),
            "max_refresh (10ms) is below min_refresh (1s)",
        ),
        (
            ResolveConfig::default().max_endpoints(0),
            "max_endpoints must be at least 1",
        ),
        (
            ResolveConfig::default().dns_timeout(Duration::ZERO),
            "dns_timeout must be above zero",
        ),
    ];
    for (config, what) in cases {
        let err = Resolver::spawn(&target, config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert_eq!(err.to_string(), format!("invalid configuration: {what}"));
    }
}

#[test]
fn spawning_outside_a_runtime_is_an_error() {
    let target: Target = "dns:///svc:80".parse().unwrap();
    let err = Resolver::spawn(&target, ResolveConfig::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoRuntime);
    assert_eq!(
        err.to_string(),
        "Resolver::spawn needs a running Tokio runtime; call it from within one"
    );
}
