//! Target parsing: a table of good targets with what they parse to, and of
//! bad ones with their exact error messages.

use std::net::SocketAddr;

use healthlb::ErrorKind;
use healthlb::{ServicePort, Target, TargetKind};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn dns(server: Option<&str>, host: &str, port: u16) -> TargetKind {
    TargetKind::Dns {
        server: server.map(addr),
        host: host.into(),
        port,
    }
}

fn fixed(addrs: &[&str]) -> TargetKind {
    TargetKind::Static {
        addrs: addrs.iter().map(|a| addr(a)).collect(),
    }
}

/// The error of a scheme healthlb doesn't resolve: it names the scheme and
/// every scheme that works.
fn unsupported(scheme: &str) -> &'static str {
    // Leaked: the table of cases holds `&str`s, for the length of a test.
    String::leak(format!(
        "the scheme \"{scheme}:\" is not supported; healthlb resolves dns:, srv:, ipv4:, ipv6:, kubernetes: (feature \"kubernetes\") and http:// or https:// targets, and host:port (as dns:)"
    ))
}

fn srv(server: Option<&str>, name: &str) -> TargetKind {
    TargetKind::Srv {
        server: server.map(addr),
        name: name.into(),
    }
}

/// URLs, as tonic users write them: DNS targets, `https` with TLS and port
/// 443 unless given, `http` with port 80.
#[test]
fn urls_are_dns_targets() {
    let cases = [
        ("http://echo.svc:50051", dns(None, "echo.svc", 50051), false),
        ("http://echo.svc", dns(None, "echo.svc", 80), false),
        ("https://echo.svc", dns(None, "echo.svc", 443), true),
        ("https://echo.svc:8443/", dns(None, "echo.svc", 8443), true),
        ("HTTPS://echo.svc:8443", dns(None, "echo.svc", 8443), true),
        ("http://127.0.0.1:50051", fixed(&["127.0.0.1:50051"]), false),
        ("https://[::1]:443", fixed(&["[::1]:443"]), true),
    ];
    for (input, kind, tls) in cases {
        let target = Target::parse(input, None).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(target.kind(), &kind, "{input}");
        assert_eq!(target.wants_tls(), tls, "{input}");
    }
    assert_eq!(
        Target::parse("https://echo.svc", None).unwrap().authority(),
        "echo.svc:443"
    );
}

#[test]
fn good_targets() {
    let cases: Vec<(&str, Option<u16>, TargetKind)> = vec![
        (
            "dns:///echo.default.svc.cluster.local:50051",
            None,
            dns(None, "echo.default.svc.cluster.local", 50051),
        ),
        (
            "dns://127.0.0.1:5353/svc.test.local:50051",
            None,
            dns(Some("127.0.0.1:5353"), "svc.test.local", 50051),
        ),
        (
            "dns://10.96.0.10/svc:80",
            None,
            dns(Some("10.96.0.10:53"), "svc", 80),
        ),
        (
            "dns://[::1]:5353/svc:80",
            None,
            dns(Some("[::1]:5353"), "svc", 80),
        ),
        ("dns://[::1]/svc:80", None, dns(Some("[::1]:53"), "svc", 80)),
        ("dns:svc.ns:8080", None, dns(None, "svc.ns", 8080)),
        ("dns:/svc.ns:8080", None, dns(None, "svc.ns", 8080)),
        ("DNS:///svc:1", None, dns(None, "svc", 1)),
        ("echo:50051", None, dns(None, "echo", 50051)),
        // A service may be called like a scheme; a port after it makes it a host.
        ("grpc:50051", None, dns(None, "grpc", 50051)),
        ("localhost:50051", None, dns(None, "localhost", 50051)),
        (
            "svc.ns.svc.cluster.local.:443",
            None,
            dns(None, "svc.ns.svc.cluster.local.", 443),
        ),
        ("my_svc-1.ns:9000", None, dns(None, "my_svc-1.ns", 9000)),
        ("10.0.0.1:50051", None, fixed(&["10.0.0.1:50051"])),
        ("[::1]:50051", None, fixed(&["[::1]:50051"])),
        ("dns:///10.0.0.1:50051", None, fixed(&["10.0.0.1:50051"])),
        (
            "ipv4:1.2.3.4:50051,5.6.7.8:50051",
            None,
            fixed(&["1.2.3.4:50051", "5.6.7.8:50051"]),
        ),
        ("ipv4:1.2.3.4:1,1.2.3.4:1", None, fixed(&["1.2.3.4:1"])),
        (
            "ipv6:[::1]:50051,[2001:db8::2]:50052",
            None,
            fixed(&["[::1]:50051", "[2001:db8::2]:50052"]),
        ),
        (
            "srv:_grpc._tcp.echo.default.svc.cluster.local",
            None,
            srv(None, "_grpc._tcp.echo.default.svc.cluster.local"),
        ),
        (
            "srv://127.0.0.1:5353/_grpc._tcp.echo.test.local",
            None,
            srv(Some("127.0.0.1:5353"), "_grpc._tcp.echo.test.local"),
        ),
        // With TLS, a missing port is 443.
        ("dns:///svc.ns", Some(443), dns(None, "svc.ns", 443)),
        ("svc.ns", Some(443), dns(None, "svc.ns", 443)),
        ("ipv4:1.2.3.4", Some(443), fixed(&["1.2.3.4:443"])),
        (
            "ipv6:::1,[::2]",
            Some(443),
            fixed(&["[::1]:443", "[::2]:443"]),
        ),
        // An explicit port wins over the default.
        ("svc.ns:8443", Some(443), dns(None, "svc.ns", 8443)),
    ];
    for (input, default_port, expected) in cases {
        let target = Target::parse(input, default_port)
            .unwrap_or_else(|e| panic!("{input:?} should parse, got: {e}"));
        assert_eq!(target.kind(), &expected, "for {input:?}");
        assert_eq!(target.as_str(), input);
        assert_eq!(target.to_string(), input);
    }
}

#[test]
fn bad_targets_say_what_is_wrong() {
    let long_label = "a".repeat(64);
    let long_name = ["abcdefghij"; 30].join(".");
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "the target is empty"),
        (
            " svc:80".into(),
            "it contains the character ' '; remove whitespace and control characters",
        ),
        (
            "svc:80\n".into(),
            "it contains the character '\\n'; remove whitespace and control characters",
        ),
        (
            "dns:///svc".into(),
            "no port; write \"svc:PORT\" (port 443 is assumed only when TLS is configured)",
        ),
        (
            "svc.ns".into(),
            "no port; write \"svc.ns:PORT\" (port 443 is assumed only when TLS is configured)",
        ),
        (
            "svc:0".into(),
            "port 0 is not a port a server can listen on",
        ),
        (
            "svc:99999".into(),
            "the port \"99999\" is not a number from 1 to 65535",
        ),
        (
            "svc:http".into(),
            "the port \"http\" is not a number from 1 to 65535",
        ),
        ("svc:".into(), "the port after \":\" is empty"),
        ("dns:///:80".into(), "the host is empty"),
        ("dns:///".into(), "the host is empty"),
        (
            "dns://".into(),
            "expected \"/\" after the DNS server: write dns://SERVER/host:port, or dns:///host:port for the system's DNS",
        ),
        (
            "dns://dns.google/svc:80".into(),
            "the DNS server \"dns.google\" is not an IP address with an optional port, such as 10.96.0.10 or 127.0.0.1:5353",
        ),
        (
            "dns://1.2.3.4:0/svc:80".into(),
            "the DNS server \"1.2.3.4:0\" has port 0",
        ),
        ("unix:///tmp/grpc.sock".into(), unsupported("unix")),
        (
            "http:svc:80".into(),
            "a http: target is a URL: http://host:port",
        ),
        (
            "https://svc.test/echo.Echo/Unary".into(),
            "a URL target names a host and port only; remove the path, query or fragment",
        ),
        (
            "http://user@svc:80".into(),
            "a URL target takes no user info; remove the \"user@\"",
        ),
        ("xds:///svc".into(), unsupported("xds")),
        ("foo://bar:1".into(), unsupported("foo")),
        ("tcp://echo:1".into(), unsupported("tcp")),
        ("grpcs://echo:1".into(), unsupported("grpcs")),
        ("grpc:echo:1".into(), unsupported("grpc")),
        (
            "::1:80".into(),
            "an IPv6 address needs brackets: [addr]:port",
        ),
        (
            "[::1:80".into(),
            "\"[\" opens an IPv6 address that no \"]\" closes",
        ),
        ("[::1]x".into(), "unexpected \"x\" after the IPv6 address"),
        ("[zz]:80".into(), "\"zz\" is not an IPv6 address"),
        (
            "svc..ns:80".into(),
            "the host name \"svc..ns\" has an empty label (\"..\" or a leading dot)",
        ),
        (
            ".svc:80".into(),
            "the host name \".svc\" has an empty label (\"..\" or a leading dot)",
        ),
        (
            "sv!c:80".into(),
            "the character '!' is not allowed in the host name \"sv!c\"",
        ),
        (
            "své.ns:80".into(),
            "the character 'é' is not allowed in the host name \"své.ns\"",
        ),
        (
            "-svc:80".into(),
            "the label \"-svc\" starts or ends with \"-\"",
        ),
        (
            format!("{long_label}.ns:80"),
            "the label \"aaaaaaaaaaaaaaaaaaaa…\" is 64 characters long; DNS allows at most 63",
        ),
        (
            format!("{long_name}:80"),
            "the host name is 329 characters long; DNS allows at most 253",
        ),
        ("ipv4:".into(), "the address list is empty"),
        (
            "ipv4:1.2.3.4:80,".into(),
            "the address list has an empty entry (\",,\" or a trailing comma)",
        ),
        (
            "ipv4:1.2.3.400:80".into(),
            "\"1.2.3.400\" is not an IPv4 address",
        ),
        (
            "ipv4:1.2.3.4".into(),
            "no port; write \"1.2.3.4:PORT\" (port 443 is assumed only when TLS is configured)",
        ),
        (
            "ipv6:[::1]:80,zz".into(),
            "\"zz\" is not an IPv6 address; write [addr]:port",
        ),
        ("srv:".into(), "the SRV name is empty"),
        (
            "srv:_grpc._tcp.svc:50051".into(),
            "an SRV target takes its ports from the records; remove the \":port\"",
        ),
    ];
    for (input, what) in cases {
        let err = Target::parse(&input, None).expect_err(&input);
        assert_eq!(err.kind(), ErrorKind::InvalidTarget, "for {input:?}");
        assert_eq!(err.target(), Some(input.as_str()));
        assert_eq!(err.to_string(), format!("invalid target {input:?}: {what}"));
    }
}

#[test]
fn host_and_authority() {
    let t = Target::parse("dns:///echo.ns.svc.cluster.local.:50051", None).unwrap();
    assert_eq!(t.host(), Some("echo.ns.svc.cluster.local"));
    assert_eq!(t.authority(), "echo.ns.svc.cluster.local:50051");

    let t = Target::parse("srv:_grpc._tcp.echo.ns.svc.cluster.local", None).unwrap();
    assert_eq!(t.host(), Some("echo.ns.svc.cluster.local"));
    assert_eq!(t.authority(), "echo.ns.svc.cluster.local");

    let t = Target::parse("ipv4:10.0.0.1:80,10.0.0.2:80", None).unwrap();
    assert_eq!(t.host(), None);
    assert_eq!(t.authority(), "10.0.0.1:80");
}

/// Random strings, from printable ASCII and a few multi-byte characters:
/// parsing returns a target or an error naming the input, never a panic.
#[test]
fn random_input_never_panics() {
    const ALPHABET: &[char] = &[
        'd', 'n', 's', 'r', 'v', 'i', 'p', '4', '6', ':', '/', '[', ']', '.', ',', '0', '1', '5',
        '9', '_', '-', 'a', 'é', '€', ' ', '%', '\u{0}',
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut errors) = (0, 0);
    for _ in 0..20_000 {
        let len = (next() % 40) as usize;
        let s: String = (0..len)
            .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
            .collect();
        for default_port in [None, Some(443)] {
            match Target::parse(&s, default_port) {
                Ok(t) => {
                    ok += 1;
                    assert_eq!(t.as_str(), s);
                }
                Err(e) => {
                    errors += 1;
                    assert_eq!(e.kind(), ErrorKind::InvalidTarget);
                    assert!(
                        e.to_string()
                            .starts_with(&format!("invalid target {s:?}: "))
                    );
                }
            }
        }
    }
    assert!(
        ok > 0 && errors > 0,
        "the generator should hit both: {ok} ok, {errors} errors"
    );
}

fn kube(namespace: Option<&str>, service: &str, port: ServicePort) -> TargetKind {
    TargetKind::Kubernetes {
        namespace: namespace.map(str::to_owned),
        service: service.to_owned(),
        port,
    }
}

#[test]
fn kubernetes_targets_take_kuberesolvers_forms() {
    use ServicePort::{Name, Number};
    let cases = [
        (
            "kubernetes:///echo.default:50051",
            kube(Some("default"), "echo", Number(50051)),
            "echo.default:50051",
        ),
        (
            "kubernetes:///echo.default:grpc",
            kube(Some("default"), "echo", Name("grpc".into())),
            "echo.default",
        ),
        (
            "kubernetes:///echo:50051",
            kube(None, "echo", Number(50051)),
            "echo:50051",
        ),
        (
            "kubernetes://prod/echo:grpc",
            kube(Some("prod"), "echo", Name("grpc".into())),
            "echo",
        ),
        (
            "kubernetes:///echo.prod.svc.cluster.local:50051",
            kube(Some("prod"), "echo", Number(50051)),
            "echo.prod.svc.cluster.local:50051",
        ),
    ];
    for (input, kind, authority) in cases {
        let target = Target::parse(input, None).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(target.kind(), &kind, "{input}");
        assert_eq!(target.authority(), authority, "{input}");
    }
}

#[test]
fn bad_kubernetes_targets_say_what_is_wrong() {
    let cases = [
        ("kubernetes:echo:50051", "starts with \"//\""),
        ("kubernetes:///echo.default", "the port is missing"),
        ("kubernetes:///echo:0", "the port 0 is not a port"),
        (
            "kubernetes:///echo:Not_A_Port",
            "neither a number from 1 to 65535 nor a port name",
        ),
        (
            "kubernetes:///Echo:50051",
            "\"Echo\" is not a Kubernetes name",
        ),
        (
            "kubernetes://a/echo.b:50051",
            "the namespace is given twice",
        ),
    ];
    for (input, why) in cases {
        let err = Target::parse(input, None).expect_err(input);
        assert_eq!(err.kind(), ErrorKind::InvalidTarget, "{input}");
        let text = err.to_string();
        assert!(
            text.contains(input) && text.contains(why),
            "{input}: {text}"
        );
    }
}

#[cfg(not(feature = "kubernetes"))]
#[tokio::test]
async fn a_kubernetes_target_without_the_feature_says_which_feature() {
    let err = healthlb::LbChannel::builder("kubernetes:///echo.default:50051")
        .build()
        .expect_err("needs the feature");
    assert!(err.to_string().contains("`kubernetes` feature"), "{err}");
}
