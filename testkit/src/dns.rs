//! An in-process authoritative DNS server (hickory-server) on loopback, whose
//! records and failure modes a test changes while it runs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// From the records.
    Normal,
    /// SERVFAIL to everything.
    ServFail,
    /// No answer at all, like a black hole.
    Drop,
    /// Every answer has the TC bit, over UDP and TCP alike.
    Truncate,
}

/// The records and settings, shared by the server and the test; it outlives
/// a stop, so a restarted server serves what the test set meanwhile.
#[derive(Debug)]
pub struct Zone {
    records: Mutex<HashMap<(String, RecordType), Vec<Record>>>,
    mode: Mutex<Mode>,
    glue: Mutex<bool>,
    negative_ttl: Mutex<u32>,
    queries: Mutex<HashMap<(String, RecordType), usize>>,
    total: AtomicUsize,
}

pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Zone>,
    server: Server<Handler>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(s: &str) -> Name {
    let mut n = Name::from_str(s).expect("test names are valid");
    n.set_fqdn(true);
    n
}

impl TestDns {
    /// A server on 127.0.0.1, UDP and TCP on one free port.
    pub async fn start() -> Self {
        Self::serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(Zone::default()),
        )
        .await
    }

    /// Serves `zone` on `addr`; `addr`'s port 0 picks a free port.
    pub async fn serve(addr: SocketAddr, zone: Arc<Zone>) -> Self {
        // UDP first, then TCP on the same port; retry if another test took
        // the TCP side of the port UDP got.
        for _ in 0..50 {
            let udp = UdpSocket::bind(addr).await.expect("bind DNS UDP");
            let local = udp.local_addr().expect("local addr");
            let tcp = match TcpListener::bind(local).await {
                Ok(tcp) => tcp,
                Err(_) if addr.port() == 0 => continue,
                Err(e) => panic!("bind DNS TCP on {local}: {e}"),
            };
            let mut server = Server::new(Handler { zone: zone.clone() });
            server.register_socket(udp);
            server.register_listener(tcp, Duration::from_secs(5), 64);
            return Self {
                addr: local,
                zone,
                server,
            };
        }
        panic!("no free port for the DNS server");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn zone(&self) -> Arc<Zone> {
        self.zone.clone()
    }

    /// `dns://ADDR/host:port`
    pub fn target(&self, host: &str, port: u16) -> String {
        format!("dns://{}/{host}:{port}", self.addr)
    }

    /// Stops answering and frees the port; the zone survives.
    pub async fn stop(mut self) -> Arc<Zone> {
        let _ = self.server.shutdown_gracefully().await;
        self.zone
    }
}

impl std::ops::Deref for TestDns {
    type Target = Zone;

    fn deref(&self) -> &Zone {
        &self.zone
    }
}

impl Default for Zone {
    fn default() -> Self {
        Self {
            records: Mutex::default(),
            mode: Mutex::new(Mode::Normal),
            glue: Mutex::new(true),
            negative_ttl: Mutex::new(1),
            queries: Mutex::default(),
            total: AtomicUsize::new(0),
        }
    }
}

impl Zone {
    fn put(&self, host: &str, rtype: RecordType, records: Vec<Record>) {
        let mut map = self.records.lock().unwrap();
        if records.is_empty() {
            map.remove(&(key(host), rtype));
        } else {
            map.insert((key(host), rtype), records);
        }
    }

    /// Replaces the A records of `host`; an empty list removes them.
    pub fn set_a(&self, host: &str, ips: &[Ipv4Addr], ttl: u32) {
        let records = ips
            .iter()
            .map(|ip| Record::from_rdata(name(host), ttl, RData::A(A(*ip))))
            .collect();
        self.put(host, RecordType::A, records);
    }

    /// Replaces the AAAA records of `host`; an empty list removes them.
    pub fn set_aaaa(&self, host: &str, ips: &[Ipv6Addr], ttl: u32) {
        let records = ips
            .iter()
            .map(|ip| Record::from_rdata(name(host), ttl, RData::AAAA(AAAA(*ip))))
            .collect();
        self.put(host, RecordType::AAAA, records);
    }

    /// Replaces the SRV records of `srv_name`: (priority, weight, port, target).
    pub fn set_srv(&self, srv_name: &str, records: &[(u16, u16, u16, &str)], ttl: u32) {
        let records = records
            .iter()
            .map(|(p, w, port, target)| {
                Record::from_rdata(
                    name(srv_name),
                    ttl,
                    RData::SRV(SRV::new(*p, *w, *port, name(target))),
                )
            })
            .collect();
        self.put(srv_name, RecordType::SRV, records);
    }

    /// Replaces the TXT records of `host`, each made of `strings`, which a
    /// client joins; an empty list removes them.
    pub fn set_txt(&self, host: &str, records: &[&[&str]], ttl: u32) {
        let records = records
            .iter()
            .map(|strings| {
                let strings = strings.iter().map(|s| (*s).to_owned()).collect();
                Record::from_rdata(name(host), ttl, RData::TXT(TXT::new(strings)))
            })
            .collect();
        self.put(host, RecordType::TXT, records);
    }

    /// Makes `host` a CNAME of `target`.
    pub fn set_cname(&self, host: &str, target: &str, ttl: u32) {
        let record = Record::from_rdata(name(host), ttl, RData::CNAME(CNAME(name(target))));
        self.put(host, RecordType::CNAME, vec![record]);
    }

    /// Removes every record of `host`: it answers NXDOMAIN.
    pub fn remove(&self, host: &str) {
        self.records
            .lock()
            .unwrap()
            .retain(|(n, _), _| *n != key(host));
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Whether SRV answers carry the targets' addresses (on by default).
    pub fn set_glue(&self, on: bool) {
        *self.glue.lock().unwrap() = on;
    }

    /// The SOA minimum in negative answers (1 s by default).
    pub fn set_negative_ttl(&self, ttl: u32) {
        *self.negative_ttl.lock().unwrap() = ttl;
    }

    /// Queries received for `host` and `rtype`.
    pub fn queries(&self, host: &str, rtype: RecordType) -> usize {
        self.queries
            .lock()
            .unwrap()
            .get(&(key(host), rtype))
            .copied()
            .unwrap_or(0)
    }

    /// Queries received in all.
    pub fn total_queries(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    fn lookup(&self, host: &str, rtype: RecordType) -> Vec<Record> {
        self.records
            .lock()
            .unwrap()
            .get(&(key(host), rtype))
            .cloned()
            .unwrap_or_default()
    }

    fn exists(&self, host: &str) -> bool {
        self.records
            .lock()
            .unwrap()
            .keys()
            .any(|(n, _)| *n == key(host))
    }

    /// Answers, additionals and whether the name exists.
    fn answer(&self, host: &str, rtype: RecordType) -> (Vec<Record>, Vec<Record>, bool) {
        let mut answers = Vec::new();
        let mut current = key(host);
        // Follow CNAMEs, stopping at a loop.
        let mut seen = vec![current.clone()];
        loop {
            let direct = self.lookup(&current, rtype);
            if !direct.is_empty() {
                answers.extend(direct);
                break;
            }
            let cname = self.lookup(&current, RecordType::CNAME);
            let Some(record) = cname.first() else { break };
            answers.push(record.clone());
            let RData::CNAME(CNAME(next)) = &record.data else {
                break;
            };
            current = key(&next.to_ascii());
            if seen.contains(&current) {
                break;
            }
            seen.push(current.clone());
        }
        let mut additionals = Vec::new();
        if rtype == RecordType::SRV && *self.glue.lock().unwrap() {
            for record in &answers {
                if let RData::SRV(srv) = &record.data {
                    let target = srv.target.to_ascii();
                    additionals.extend(self.lookup(&target, RecordType::A));
                    additionals.extend(self.lookup(&target, RecordType::AAAA));
                }
            }
        }
        (answers, additionals, self.exists(host))
    }

    fn soa(&self, host: &str) -> Record {
        let zone = host.split_once('.').map(|(_, z)| z).unwrap_or(host);
        let ttl = *self.negative_ttl.lock().unwrap();
        Record::from_rdata(
            name(zone),
            ttl,
            RData::SOA(SOA::new(
                name(&format!("ns.{zone}")),
                name(&format!("admin.{zone}")),
                1,
                60,
                60,
                600,
                ttl,
            )),
        )
    }
}

pub struct Handler {
    zone: Arc<Zone>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let builder = MessageResponseBuilder::from_message_request(request);
        let Some(query) = request.queries.queries().first() else {
            metadata.response_code = ResponseCode::FormErr;
            return reply(
                &mut response_handle,
                builder.build_no_records(metadata),
                metadata,
            )
            .await;
        };
        let host = query.original().name().to_ascii();
        let rtype = query.original().query_type();
        self.zone.total.fetch_add(1, Ordering::SeqCst);
        *self
            .zone
            .queries
            .lock()
            .unwrap()
            .entry((key(&host), rtype))
            .or_default() += 1;

        let mode = *self.zone.mode.lock().unwrap();
        metadata.authoritative = true;
        match mode {
            Mode::Drop => {
                return ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
            }
            Mode::ServFail => {
                metadata.response_code = ResponseCode::ServFail;
                return reply(
                    &mut response_handle,
                    builder.build_no_records(metadata),
                    metadata,
                )
                .await;
            }
            Mode::Truncate => {
                metadata.truncation = true;
                return reply(
                    &mut response_handle,
                    builder.build_no_records(metadata),
                    metadata,
                )
                .await;
            }
            Mode::Normal => {}
        }
        let (answers, additionals, exists) = self.zone.answer(&host, rtype);
        let soa = if answers.is_empty() {
            if !exists {
                metadata.response_code = ResponseCode::NXDomain;
            }
            vec![self.zone.soa(&key(&host))]
        } else {
            Vec::new()
        };
        let mut builder = builder;
        if let Some(edns) = &request.edns {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            answers.iter(),
            [].iter(),
            soa.iter(),
            additionals.iter(),
        );
        reply(&mut response_handle, response, metadata).await
    }
}

async fn reply<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    metadata: Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => ResponseInfo::from(Header {
            metadata,
            counts: HeaderCounts::default(),
        }),
    }
}

/// A UDP "DNS server" that answers every query with the query's ID followed
/// by junk: a peer that sends nonsense.
pub async fn garbage_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind garbage DNS");
    let addr = socket.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        let mut junk: u32 = 0x9e37_79b9;
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if n < 2 {
                continue;
            }
            let mut reply = vec![buf[0], buf[1], 0x81, 0x80];
            for _ in 0..60 {
                junk = junk.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                reply.push((junk >> 24) as u8);
            }
            let _ = socket.send_to(&reply, from).await;
        }
    });
    (addr, task)
}

/// `n` addresses from 10.0.0.0/8, in order.
pub fn many_ips(n: u32) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| Ipv4Addr::from(0x0a00_0000 + i + 1))
        .collect()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IPs are valid")
}
