//! Targets: what the balancer connects to, in gRPC's naming syntax.
//!
//! | syntax | meaning |
//! | --- | --- |
//! | `dns:[//server/]host:port` | A and AAAA records of `host`. `server` is the DNS server to ask (`127.0.0.1:5353`, port 53 by default); without it, the system's `resolv.conf` applies, with its search domains and `ndots`. |
//! | `host:port` | the same as `dns:///host:port`. |
//! | `ipv4:1.2.3.4:50051,5.6.7.8:50051` | a fixed list. |
//! | `ipv6:[::1]:50051,[::2]:50051` | a fixed list. |
//! | `srv:[//server/]_grpc._tcp.svc.ns.svc.cluster.local` | SRV records; ports come from the records. |
//! | `http://host[:port]` | the same as `dns:///host:port`, port 80 if none is given, as tonic users write it. |
//! | `https://host[:port]` | the same, with TLS, port 443 if none is given. |
//!
//! A port is required, except that 443 is assumed when TLS is configured
//! (the caller passes it as `default_port`). A `dns:` host that is an IP
//! literal (`dns:///10.0.0.1:50051`) is a fixed list of one.
//!
//! Parsing never panics. Every error names the target and what is wrong with it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// Longest host name DNS allows, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;
/// Port of a DNS server named without one.
const DNS_PORT: u16 = 53;

/// Schemes of other gRPC implementations that healthlb does not resolve.
const UNSUPPORTED_SCHEMES: &[&str] = &[
    "unix",
    "unix-abstract",
    "vsock",
    "xds",
    "passthrough",
    "grpc",
];

/// What an unsupported scheme's error lists.
const SUPPORTED: &str = "healthlb resolves dns:, srv:, ipv4:, ipv6:, kubernetes: (feature \"kubernetes\") and http:// or https:// targets, and host:port (as dns:)";

/// A parsed target.
///
/// ```
/// use healthlb::{Target, TargetKind};
///
/// let t: Target = "dns://127.0.0.1:5353/echo.test.local:50051".parse()?;
/// assert!(matches!(t.kind(), TargetKind::Dns { port: 50051, .. }));
/// assert_eq!(t.authority(), "echo.test.local:50051");
/// # Ok::<(), healthlb::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    input: Arc<str>,
    kind: TargetKind,
    /// `https://`: TLS, whatever else is configured.
    tls: bool,
}

/// What a [`Target`] resolves through.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetKind {
    /// A and AAAA records of `host`, on `port`.
    Dns {
        /// The DNS server to ask; `None` means the system's configuration.
        server: Option<SocketAddr>,
        /// The host name, as written (a trailing dot makes it absolute).
        host: String,
        /// The port every address gets.
        port: u16,
    },
    /// SRV records of `name`, which carry their own ports.
    Srv {
        /// The DNS server to ask; `None` means the system's configuration.
        server: Option<SocketAddr>,
        /// The SRV name, such as `_grpc._tcp.echo.default.svc.cluster.local`.
        name: String,
    },
    /// A fixed list of addresses, in the order written, without duplicates.
    Static {
        /// The addresses.
        addrs: Vec<SocketAddr>,
    },
    /// A Service's EndpointSlices, from the Kubernetes API (`kubernetes:`,
    /// as kuberesolver writes it). Resolving it needs the feature
    /// `kubernetes`.
    Kubernetes {
        /// The namespace; `None` means the client's own (its service
        /// account's, or the kubeconfig context's).
        namespace: Option<String>,
        /// The Service's name.
        service: String,
        /// The port calls go to.
        port: ServicePort,
    },
}

/// The port of a `kubernetes:` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicePort {
    /// The port number every endpoint is called on.
    Number(u16),
    /// A named port: each EndpointSlice says its number.
    Name(String),
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServicePort::Number(n) => write!(f, "{n}"),
            ServicePort::Name(name) => f.write_str(name),
        }
    }
}

// === impl Target ===

impl Target {
    /// Parses `input`. `default_port` fills in a missing port; pass
    /// `Some(443)` when TLS is configured and `None` otherwise, so that a
    /// missing port is an error.
    pub fn parse(input: &str, default_port: Option<u16>) -> Result<Self, Error> {
        let kind =
            parse_kind(input, default_port).map_err(|what| Error::invalid_target(input, what))?;
        Ok(Self {
            input: input.into(),
            kind,
            tls: scheme_of(input).is_some_and(|s| s.eq_ignore_ascii_case("https")),
        })
    }

    /// Whether the target asks for TLS itself: an `https://` URL.
    pub fn wants_tls(&self) -> bool {
        self.tls
    }

    /// What this target resolves through.
    pub fn kind(&self) -> &TargetKind {
        &self.kind
    }

    /// The target as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.input
    }

    pub(crate) fn shared_str(&self) -> Arc<str> {
        self.input.clone()
    }

    /// The target in gRPC's canonical form, as grpc-go's `CanonicalTarget`
    /// writes it for the `grpc.target` label: a target with a scheme stays
    /// as written, and one without (`localhost:50051`), or a URL, is a
    /// `dns:///` target (`dns:///localhost:50051`).
    ///
    /// ```
    /// let t: healthlb::Target = "localhost:50051".parse()?;
    /// assert_eq!(t.canonical(), "dns:///localhost:50051");
    /// let t: healthlb::Target = "ipv4:10.0.0.1:50051".parse()?;
    /// assert_eq!(t.canonical(), "ipv4:10.0.0.1:50051");
    /// # Ok::<(), healthlb::Error>(())
    /// ```
    pub fn canonical(&self) -> String {
        let scheme = scheme_of(&self.input).map(str::to_ascii_lowercase);
        if let Some("dns" | "srv" | "ipv4" | "ipv6" | "kubernetes") = scheme.as_deref() {
            return self.input.to_string();
        }
        match &self.kind {
            TargetKind::Dns { host, port, .. } => format!("dns:///{host}:{port}"),
            TargetKind::Static { addrs } => {
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                format!("dns:///{}", addrs.join(","))
            }
            _ => self.input.to_string(),
        }
    }

    /// The host name a server expects to be called by: the `dns:` host, or the
    /// service part of an SRV name (`_grpc._tcp.echo.ns.svc.cluster.local`
    /// gives `echo.ns.svc.cluster.local`). `None` for fixed address lists.
    ///
    /// This is the TLS server name and the `:authority` of calls, because a
    /// headless Service's certificate names the service, not each pod.
    pub fn host(&self) -> Option<&str> {
        match &self.kind {
            TargetKind::Dns { host, .. } => Some(host.trim_end_matches('.')),
            TargetKind::Srv { name, .. } => {
                let mut rest = name.trim_end_matches('.');
                // Strip the `_service._proto.` labels.
                for _ in 0..2 {
                    match rest.split_once('.') {
                        Some((label, tail)) if label.starts_with('_') => rest = tail,
                        _ => break,
                    }
                }
                Some(rest)
            }
            TargetKind::Static { .. } => None,
            // The path as written, without its port: `svc.ns` or `svc`, as
            // grpc-go's :authority for kuberesolver's targets.
            TargetKind::Kubernetes { .. } => {
                let path = self.input.rsplit('/').next().unwrap_or_default();
                Some(path.rsplit_once(':').map_or(path, |(host, _)| host))
            }
        }
    }

    /// The `:authority` calls carry: `host:port` for `dns:`, the service name
    /// for `srv:`, and the first address for a fixed list.
    pub fn authority(&self) -> String {
        match &self.kind {
            TargetKind::Dns { port, .. } => format!("{}:{port}", self.host().unwrap_or_default()),
            TargetKind::Srv { .. } => self.host().unwrap_or_default().to_owned(),
            TargetKind::Static { addrs } => {
                addrs.first().map(ToString::to_string).unwrap_or_default()
            }
            TargetKind::Kubernetes { port, .. } => match port {
                ServicePort::Number(n) => format!("{}:{n}", self.host().unwrap_or_default()),
                ServicePort::Name(_) => self.host().unwrap_or_default().to_owned(),
            },
        }
    }
}

impl FromStr for Target {
    type Err = Error;

    /// Parses a target that must name its port.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, None)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.input)
    }
}

// === parsing ===

/// The scheme of `input`, if it has one.
fn scheme_of(input: &str) -> Option<&str> {
    input
        .split_once(':')
        .map(|(s, _)| s)
        .filter(|s| is_scheme(s))
}

fn parse_kind(input: &str, default_port: Option<u16>) -> Result<TargetKind, String> {
    if input.is_empty() {
        return Err("the target is empty".into());
    }
    if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "it contains the character {c:?}; remove whitespace and control characters"
        ));
    }
    let (scheme, rest) = match input.split_once(':') {
        Some((scheme, rest)) if is_scheme(scheme) => (scheme.to_ascii_lowercase(), rest),
        _ => return parse_host_port(input, default_port),
    };
    match scheme.as_str() {
        // URLs as tonic users write them: DNS, on port 80 or 443 unless
        // given.
        "http" | "https" => {
            let Some(rest) = rest.strip_prefix("//") else {
                return Err(format!("a {scheme}: target is a URL: {scheme}://host:port"));
            };
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            if authority.contains('/') || authority.contains('?') || authority.contains('#') {
                return Err(
                    "a URL target names a host and port only; remove the path, query or fragment"
                        .into(),
                );
            }
            if authority.contains('@') {
                return Err("a URL target takes no user info; remove the \"user@\"".into());
            }
            let port = if scheme == "https" { 443 } else { 80 };
            parse_host_port(authority, Some(port))
        }
        "dns" => {
            let (server, endpoint) = split_authority(rest)?;
            match parse_host_port(endpoint, default_port)? {
                TargetKind::Dns { host, port, .. } => Ok(TargetKind::Dns { server, host, port }),
                literal => Ok(literal),
            }
        }
        "srv" => {
            let (server, name) = split_authority(rest)?;
            if name.is_empty() {
                return Err("the SRV name is empty".into());
            }
            if name.contains(':') {
                return Err(
                    "an SRV target takes its ports from the records; remove the \":port\"".into(),
                );
            }
            validate_hostname(name)?;
            Ok(TargetKind::Srv {
                server,
                name: name.to_owned(),
            })
        }
        "kubernetes" => parse_kubernetes(rest),
        "ipv4" => parse_list(rest, default_port, parse_ipv4_item),
        "ipv6" => parse_list(rest, default_port, parse_ipv6_item),
        // A service called `grpc` on port 50051 is a host, not a scheme.
        _ if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => {
            parse_host_port(input, default_port)
        }
        // gRPC's other schemes, and any `scheme://`: a scheme, not a host.
        other if UNSUPPORTED_SCHEMES.contains(&other) || rest.starts_with("//") => Err(format!(
            "the scheme \"{other}:\" is not supported; {SUPPORTED}"
        )),
        // `localhost:50051` has the shape of `scheme:rest`; like gRPC, an
        // unknown scheme means the whole string is a host and port.
        _ => parse_host_port(input, default_port),
    }
}

/// `kubernetes:///svc[.ns[.svc…]]:port` or `kubernetes://ns/svc:port`, the
/// port a number or a name.
fn parse_kubernetes(rest: &str) -> Result<TargetKind, String> {
    const FORM: &str = "write kubernetes:///service.namespace:port or kubernetes://namespace/service:port (the port a number or a name)";
    let Some(after) = rest.strip_prefix("//") else {
        return Err(format!("a kubernetes: target starts with \"//\"; {FORM}"));
    };
    let Some((authority, path)) = after.split_once('/') else {
        return Err(format!("expected \"/\" after the namespace; {FORM}"));
    };
    let Some((name, port)) = path.rsplit_once(':') else {
        return Err(format!("the port is missing; {FORM}"));
    };
    let port = match port.parse::<u16>() {
        Ok(0) => return Err("the port 0 is not a port".into()),
        Ok(n) => ServicePort::Number(n),
        Err(_) if is_port_name(port) => ServicePort::Name(port.to_owned()),
        Err(_) => {
            return Err(format!(
                "the port {port:?} is neither a number from 1 to 65535 nor a port name (lowercase letters, digits and '-', at most 15)"
            ));
        }
    };
    let mut labels = name.split('.');
    let service = labels.next().unwrap_or_default().to_owned();
    let from_path = labels.next().map(str::to_owned);
    let namespace = match (authority, from_path) {
        ("", ns) => ns,
        (ns, None) => Some(ns.to_owned()),
        (ns, Some(other)) if ns == other => Some(other),
        (ns, Some(other)) => {
            return Err(format!(
                "the namespace is given twice, as {ns:?} and {other:?}; {FORM}"
            ));
        }
    };
    for label in std::iter::once(&service).chain(&namespace) {
        if !is_dns_label(label) {
            return Err(format!(
                "{label:?} is not a Kubernetes name (lowercase letters, digits and '-', at most 63)"
            ));
        }
    }
    Ok(TargetKind::Kubernetes {
        namespace,
        service,
        port,
    })
}

/// An RFC 1123 label, as Kubernetes names Services and namespaces.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An IANA service name, as Kubernetes names ports.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

/// RFC 3986 scheme characters, and long enough not to be a drive letter.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Splits `//server/rest` into the DNS server and `rest`. Without `//`, a
/// single leading `/` is dropped, as gRPC does for `dns:/host:port`.
fn split_authority(rest: &str) -> Result<(Option<SocketAddr>, &str), String> {
    let Some(after) = rest.strip_prefix("//") else {
        return Ok((None, rest.strip_prefix('/').unwrap_or(rest)));
    };
    let Some((authority, endpoint)) = after.split_once('/') else {
        return Err("expected \"/\" after the DNS server: write dns://SERVER/host:port, or dns:///host:port for the system's DNS".into());
    };
    if authority.is_empty() {
        return Ok((None, endpoint));
    }
    let server = if let Ok(addr) = authority.parse::<SocketAddr>() {
        addr
    } else if let Ok(ip) = authority.parse::<IpAddr>() {
        SocketAddr::new(ip, DNS_PORT)
    } else if let Some(ip) = authority
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse::<Ipv6Addr>().ok())
    {
        SocketAddr::new(ip.into(), DNS_PORT)
    } else {
        return Err(format!(
            "the DNS server {authority:?} is not an IP address with an optional port, such as 10.96.0.10 or 127.0.0.1:5353"
        ));
    };
    if server.port() == 0 {
        return Err(format!("the DNS server {authority:?} has port 0"));
    }
    Ok((Some(server), endpoint))
}

/// `host[:port]` or `[v6][:port]`. An IP literal gives a fixed list of one.
fn parse_host_port(s: &str, default_port: Option<u16>) -> Result<TargetKind, String> {
    if s.is_empty() {
        return Err("the host is empty".into());
    }
    let (host, port) = if let Some(bracketed) = s.strip_prefix('[') {
        let Some((ip, after)) = bracketed.split_once(']') else {
            return Err("\"[\" opens an IPv6 address that no \"]\" closes".into());
        };
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(parse_port(port)?),
                None => return Err(format!("unexpected {after:?} after the IPv6 address")),
            },
        };
        let port = require_port(port, default_port, s)?;
        return Ok(TargetKind::Static {
            addrs: vec![SocketAddr::new(ip.into(), port)],
        });
    } else {
        match s.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err("an IPv6 address needs brackets: [addr]:port".into());
            }
            Some((host, port)) => (host, Some(parse_port(port)?)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let port = require_port(port, default_port, host)?;
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(TargetKind::Static {
            addrs: vec![SocketAddr::new(ip.into(), port)],
        });
    }
    validate_hostname(host)?;
    Ok(TargetKind::Dns {
        server: None,
        host: host.to_owned(),
        port,
    })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port a server can listen on".into()),
        Ok(port) => Ok(port),
        Err(_) if s.is_empty() => Err("the port after \":\" is empty".into()),
        Err(_) => Err(format!("the port {s:?} is not a number from 1 to 65535")),
    }
}

fn require_port(port: Option<u16>, default_port: Option<u16>, host: &str) -> Result<u16, String> {
    port.or(default_port).ok_or_else(|| {
        format!("no port; write \"{host}:PORT\" (port 443 is assumed only when TLS is configured)")
    })
}

fn validate_hostname(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("the host name is empty".into());
    }
    if bare.len() > MAX_NAME_LEN {
        return Err(format!(
            "the host name is {} characters long; DNS allows at most {MAX_NAME_LEN}",
            bare.len()
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(format!(
                "the host name {name:?} has an empty label (\"..\" or a leading dot)"
            ));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "the label {:?} is {} characters long; DNS allows at most {MAX_LABEL_LEN}",
                truncate(label, 20),
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "the character {c:?} is not allowed in the host name {name:?}"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("the label {label:?} starts or ends with \"-\""));
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn parse_list(
    rest: &str,
    default_port: Option<u16>,
    item: fn(&str, Option<u16>) -> Result<SocketAddr, String>,
) -> Result<TargetKind, String> {
    if rest.is_empty() {
        return Err("the address list is empty".into());
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for part in rest.split(',') {
        if part.is_empty() {
            return Err("the address list has an empty entry (\",,\" or a trailing comma)".into());
        }
        let addr = item(part, default_port)?;
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    Ok(TargetKind::Static { addrs })
}

fn parse_ipv4_item(s: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    if s.starts_with('[') || s.matches(':').count() > 1 {
        return Err(format!(
            "{s:?} is an IPv6 address; IPv6 addresses take the scheme ipv6:, as in ipv6:[::1]:50051"
        ));
    }
    let (ip, port) = match s.split_once(':') {
        Some((ip, port)) => (ip, Some(parse_port(port)?)),
        None => (s, None),
    };
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    Ok(SocketAddr::new(
        ip.into(),
        require_port(port, default_port, s)?,
    ))
}

fn parse_ipv6_item(s: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    if s.starts_with('[') {
        return match parse_host_port(s, default_port)? {
            TargetKind::Static { addrs } if addrs.len() == 1 => Ok(addrs[0]),
            _ => Err(format!("{s:?} is not an IPv6 address")),
        };
    }
    // A bare address has no port: `ipv6:::1` or `ipv6:2001:db8::1`.
    let ip: Ipv6Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 address; write [addr]:port"))?;
    Ok(SocketAddr::new(
        ip.into(),
        require_port(None, default_port, &format!("[{s}]"))?,
    ))
}
