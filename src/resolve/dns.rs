//! One round of DNS questions, through hickory-resolver with its cache off.
//!
//! This file only asks and classifies answers. When to ask, and what to do
//! with failures, is `task.rs`'s business.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::rdata::{CNAME, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

use super::endpoint::{Endpoint, keep_ranked};

/// SRV targets without glue are looked up this many at a time.
const TARGET_LOOKUP_CONCURRENCY: usize = 16;
/// hickory follows CNAME chains this far.
const MAX_CNAME_HOPS: usize = 8;

/// What one question found.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Records, and the smallest TTL among them.
    Found {
        endpoints: Vec<Endpoint>,
        ttl: Duration,
    },
    /// An authoritative "nothing": NXDOMAIN, or NOERROR without records.
    /// `ttl` is the negative TTL from the SOA, when there was one.
    Empty {
        nxdomain: bool,
        ttl: Option<Duration>,
    },
}

/// Why a question got no usable answer. The last good set stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure(pub(crate) String);

/// A hickory resolver set up the way healthlb wants it.
pub(crate) struct Dns {
    resolver: TokioResolver,
    /// Names are absolute when a DNS server was named: no search list.
    absolute: bool,
}

// === impl Dns ===

impl Dns {
    /// A resolver for `server`, or for the system's configuration. Reading
    /// `resolv.conf` is file IO, so it runs on the blocking pool.
    pub(crate) async fn new(
        server: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<Self, Failure> {
        let (builder, absolute) = match server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                let config = ResolverConfig::from_name_servers(vec![ns]);
                let mut builder =
                    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
                builder.options_mut().use_hosts_file = ResolveHosts::Never;
                (builder, true)
            }
            None => {
                let builder = tokio::task::spawn_blocking(TokioResolver::builder_tokio)
                    .await
                    .map_err(|e| {
                        Failure(format!("reading the system DNS configuration failed: {e}"))
                    })?
                    .map_err(|e| {
                        Failure(format!("reading the system DNS configuration failed: {e}"))
                    })?;
                (builder, false)
            }
        };
        let mut builder = builder;
        tune(builder.options_mut(), timeout);
        let resolver = builder
            .build()
            .map_err(|e| Failure(format!("setting up the DNS resolver failed: {e}")))?;
        Ok(Self { resolver, absolute })
    }

    fn name(&self, host: &str) -> Result<Name, Failure> {
        let mut name = Name::from_str(host)
            .map_err(|e| Failure(format!("{host:?} is not a DNS name: {e}")))?;
        if self.absolute {
            name.set_fqdn(true);
        }
        Ok(name)
    }

    /// A and AAAA records of `host`, asked at once; one answer per family.
    pub(crate) async fn addresses(&self, host: &str, port: u16) -> [Result<Answer, Failure>; 2] {
        let name = match self.name(host) {
            Ok(name) => name,
            Err(f) => return [Err(f.clone()), Err(f)],
        };
        let hostname: Arc<str> = host.trim_end_matches('.').into();
        let (mut v4, mut v6) = futures::join!(
            self.family(name.clone(), RecordType::A),
            self.family(name.clone(), RecordType::AAAA)
        );
        if v4.as_ref().is_ok_and(Family::is_bare_nodata)
            && v6.as_ref().is_ok_and(Family::is_bare_nodata)
            && let Err(f) = self.check_cname_chain(&name).await
        {
            (v4, v6) = (Err(f.clone()), Err(f));
        }
        [v4, v6].map(|family| {
            family.map(|answer| match answer {
                Family::Found { ips, ttl } => Answer::Found {
                    endpoints: ips
                        .into_iter()
                        .map(|ip| {
                            Endpoint::new(SocketAddr::new(ip, port)).with_hostname(hostname.clone())
                        })
                        .collect(),
                    ttl,
                },
                Family::Empty { nxdomain, ttl } => Answer::Empty { nxdomain, ttl },
            })
        })
    }

    /// SRV records of `name`: the lowest-priority group that has reachable
    /// targets, with their addresses from the additional section or, where
    /// it has none, from lookups. At most `cap` targets are looked up.
    pub(crate) async fn srv(&self, name: &str, cap: usize, seed: u64) -> Result<Answer, Failure> {
        let qname = self.name(name)?;
        let lookup = match self.resolver.srv_lookup(qname.clone()).await {
            Ok(lookup) => lookup,
            Err(e) => {
                let empty = classify(&qname, RecordType::SRV, e)?;
                if empty.is_bare_nodata() {
                    self.check_cname_chain(&qname).await?;
                }
                return Ok(empty.into_empty_answer());
            }
        };
        let (records, ttl) =
            typed_records(&qname, lookup.answers(), RecordType::SRV, |d| match d {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })?;
        if records.is_empty() {
            return Ok(Answer::Empty {
                nxdomain: false,
                ttl: None,
            });
        }
        let glue = glue(lookup.additionals());
        let mut groups: BTreeMap<u16, Vec<SRV>> = BTreeMap::new();
        for srv in records {
            // A target of "." means "no service here".
            if !srv.target.is_root() {
                groups.entry(srv.priority).or_default().push(srv);
            }
        }
        for (priority, mut group) in groups {
            keep_ranked(&mut group, cap, seed, |s| {
                let mut k = key(&s.target).into_bytes();
                k.push(0);
                k.extend_from_slice(&s.port.to_be_bytes());
                k
            });
            let resolved = self.resolve_targets(&group, &glue).await?;
            let mut min_ttl = ttl;
            let mut endpoints = Vec::new();
            for srv in &group {
                let Some((ips, addr_ttl)) = resolved.get(&key(&srv.target)) else {
                    continue;
                };
                min_ttl = min_ttl.min(*addr_ttl);
                let host: Arc<str> = key(&srv.target).into();
                endpoints.extend(ips.iter().map(|ip| {
                    Endpoint::new(SocketAddr::new(*ip, srv.port))
                        .with_hostname(host.clone())
                        .with_srv(priority, srv.weight)
                }));
            }
            if !endpoints.is_empty() {
                return Ok(Answer::Found {
                    endpoints,
                    ttl: min_ttl,
                });
            }
        }
        Ok(Answer::Empty {
            nxdomain: false,
            ttl: Some(ttl),
        })
    }

    /// Addresses for every target of `group`: glue first, lookups for the rest.
    /// A target that does not exist is skipped; any other failure fails the round,
    /// so a partial answer never replaces a complete one.
    async fn resolve_targets(
        &self,
        group: &[SRV],
        glue: &HashMap<String, (Vec<IpAddr>, Duration)>,
    ) -> Result<HashMap<String, (Vec<IpAddr>, Duration)>, Failure> {
        let mut resolved: HashMap<String, (Vec<IpAddr>, Duration)> = HashMap::new();
        let mut missing: Vec<Name> = Vec::new();
        for srv in group {
            let k = key(&srv.target);
            if let Some(found) = glue.get(&k) {
                resolved.insert(k, found.clone());
            } else if !missing.contains(&srv.target) {
                missing.push(srv.target.clone());
            }
        }
        let lookups = stream::iter(missing)
            .map(|target| async move {
                let (v4, v6) = futures::join!(
                    self.family(target.clone(), RecordType::A),
                    self.family(target.clone(), RecordType::AAAA)
                );
                (target, v4, v6)
            })
            .buffer_unordered(TARGET_LOOKUP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (target, v4, v6) in lookups {
            let mut ips = Vec::new();
            let mut ttl = Duration::MAX;
            for family in [v4, v6] {
                match family
                    .map_err(|f| Failure(format!("SRV target {}: {}", key(&target), f.0)))?
                {
                    Family::Found { ips: found, ttl: t } => {
                        ips.extend(found);
                        ttl = ttl.min(t);
                    }
                    Family::Empty { .. } => {}
                }
            }
            if !ips.is_empty() {
                resolved.insert(key(&target), (ips, ttl));
            }
        }
        Ok(resolved)
    }

    /// hickory reports a CNAME chain that never ends (a loop, or more than 8
    /// hops) as a bare NOERROR without records. Walk the chain to tell that
    /// apart from a name that has no addresses.
    async fn check_cname_chain(&self, start: &Name) -> Result<(), Failure> {
        let mut seen = vec![start.clone()];
        for _ in 0..MAX_CNAME_HOPS {
            let current = seen.last().cloned().unwrap_or_else(|| start.clone());
            let next = match self
                .resolver
                .lookup(current.clone(), RecordType::CNAME)
                .await
            {
                Ok(lookup) => lookup.answers().iter().find_map(|r| match &r.data {
                    RData::CNAME(CNAME(target)) if r.name == current => Some(target.clone()),
                    _ => None,
                }),
                Err(_) => None,
            };
            let Some(next) = next else { return Ok(()) };
            if seen.contains(&next) {
                return Err(Failure(format!(
                    "the CNAME chain of {start} loops back to {next}"
                )));
            }
            seen.push(next);
        }
        Err(Failure(format!(
            "the CNAME chain of {start} is longer than {MAX_CNAME_HOPS} hops"
        )))
    }

    /// The text of each TXT record of `_grpc_config.<host>`, its strings
    /// joined; none when the name has none.
    pub(crate) async fn grpc_config(&self, host: &str) -> Result<Vec<String>, Failure> {
        let name = self.name(&format!("_grpc_config.{}", host.trim_end_matches('.')))?;
        match self.resolver.lookup(name.clone(), RecordType::TXT).await {
            Ok(lookup) => {
                let (texts, _) =
                    typed_records(&name, lookup.answers(), RecordType::TXT, |d| match d {
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|part| String::from_utf8_lossy(part))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })?;
                Ok(texts)
            }
            Err(e) => classify(&name, RecordType::TXT, e).map(|_| Vec::new()),
        }
    }

    /// One record type of one name.
    async fn family(&self, name: Name, rtype: RecordType) -> Result<Family, Failure> {
        match self.resolver.lookup(name.clone(), rtype).await {
            Ok(lookup) => {
                let (ips, ttl) = typed_records(&name, lookup.answers(), rtype, |d| d.ip_addr())?;
                if ips.is_empty() {
                    Ok(Family::Empty {
                        nxdomain: false,
                        ttl: None,
                    })
                } else {
                    Ok(Family::Found { ips, ttl })
                }
            }
            Err(e) => classify(&name, rtype, e),
        }
    }
}

/// One record type's outcome, before ports are attached.
#[derive(Debug)]
enum Family {
    Found {
        ips: Vec<IpAddr>,
        ttl: Duration,
    },
    Empty {
        nxdomain: bool,
        ttl: Option<Duration>,
    },
}

impl Family {
    /// NOERROR without records and without an SOA: an empty name, or the
    /// end of a CNAME chain hickory gave up on.
    fn is_bare_nodata(&self) -> bool {
        matches!(
            self,
            Family::Empty {
                nxdomain: false,
                ttl: None
            }
        )
    }

    fn into_empty_answer(self) -> Answer {
        match self {
            Family::Found { .. } => Answer::Empty {
                nxdomain: false,
                ttl: None,
            },
            Family::Empty { nxdomain, ttl } => Answer::Empty { nxdomain, ttl },
        }
    }
}

fn tune(opts: &mut ResolverOpts, timeout: Duration) {
    // We decide when to ask again; a cache would answer for us.
    opts.cache_size = 0;
    // One try per server within the round's budget; the round itself is
    // retried with backoff.
    opts.timeout = opts
        .timeout
        .min(timeout / 2)
        .max(Duration::from_millis(100));
    opts.attempts = 1;
    opts.try_tcp_on_error = true;
}

/// The records of type `rtype` among the answers, and their smallest TTL.
/// Only CNAMEs and no records of the type means the chain never ended.
fn typed_records<T>(
    name: &Name,
    answers: &[Record],
    rtype: RecordType,
    pick: impl Fn(&RData) -> Option<T>,
) -> Result<(Vec<T>, Duration), Failure> {
    let mut out = Vec::new();
    let mut ttl = u32::MAX;
    let mut cname = false;
    for record in answers {
        if record.record_type() == rtype {
            if let Some(item) = pick(&record.data) {
                out.push(item);
                ttl = ttl.min(record.ttl);
            }
        } else if record.record_type() == RecordType::CNAME {
            cname = true;
        }
    }
    if out.is_empty() && cname {
        return Err(Failure(format!(
            "the CNAME chain of {name} does not end in a {rtype} record (a loop, or more than 8 hops)"
        )));
    }
    Ok((out, Duration::from_secs(ttl.into())))
}

/// A and AAAA records of the additional section, by owner name.
fn glue(additionals: &[Record]) -> HashMap<String, (Vec<IpAddr>, Duration)> {
    let mut glue: HashMap<String, (Vec<IpAddr>, Duration)> = HashMap::new();
    for record in additionals {
        if let Some(ip) = record.data.ip_addr() {
            let entry = glue
                .entry(key(&record.name))
                .or_insert_with(|| (Vec::new(), Duration::MAX));
            entry.0.push(ip);
            entry.1 = entry.1.min(Duration::from_secs(record.ttl.into()));
        }
    }
    glue
}

/// A name as a lowercase string without the trailing dot.
fn key(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// Splits hickory's errors into an authoritative "nothing here" and failures.
fn classify(name: &Name, rtype: RecordType, err: NetError) -> Result<Family, Failure> {
    let why = match err {
        NetError::Dns(DnsError::NoRecordsFound(none)) => {
            return Ok(Family::Empty {
                nxdomain: none.response_code == ResponseCode::NXDomain,
                ttl: none.negative_ttl.map(|t| Duration::from_secs(t.into())),
            });
        }
        NetError::Dns(DnsError::ResponseCode(code)) => format!("the DNS server answered {code}"),
        NetError::Timeout => "the DNS server did not answer in time".to_owned(),
        NetError::Truncated => "the answer was truncated, over TCP too".to_owned(),
        NetError::Io(e) => format!("the DNS server is unreachable: {e}"),
        NetError::Proto(e) => format!("the answer is malformed: {e}"),
        other => other.to_string(),
    };
    Err(Failure(format!("{rtype} {name}: {why}")))
}

/// Runs the answer handling on a raw DNS message, as the resolver does on
/// each answer: the typed records of A, AAAA and SRV (with the CNAME check),
/// the additional section's glue, and the capped endpoint set. Returns how
/// many endpoints were kept. For the fuzzer; not part of the API.
#[cfg(feature = "internals")]
pub(crate) fn fuzz_answer(bytes: &[u8]) -> usize {
    use hickory_resolver::proto::op::Message;

    let Ok(message) = Message::from_vec(bytes) else {
        return 0;
    };
    let name = message
        .queries
        .first()
        .map(|q| q.name().clone())
        .unwrap_or_else(Name::root);
    let mut ips = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        if let Ok((found, _)) = typed_records(&name, &message.answers, rtype, |d| d.ip_addr()) {
            ips.extend(found);
        }
    }
    let mut list: Vec<Endpoint> = ips
        .into_iter()
        .map(|ip| Endpoint::new(SocketAddr::new(ip, 443)))
        .collect();
    if let Ok((records, _)) = typed_records(&name, &message.answers, RecordType::SRV, |d| match d {
        RData::SRV(srv) => Some(srv.clone()),
        _ => None,
    }) {
        let glue = glue(&message.additionals);
        for srv in records {
            if let Some((addrs, _)) = glue.get(&key(&srv.target)) {
                list.extend(addrs.iter().map(|ip| {
                    Endpoint::new(SocketAddr::new(*ip, srv.port)).with_srv(srv.priority, srv.weight)
                }));
            }
        }
    }
    let (set, _) = super::Endpoints::normalize(list, 1024, 7);
    set.len()
}
