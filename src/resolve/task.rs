//! The background task that keeps one target's endpoint set current.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::config::ResolveConfig;
use super::dns::{Answer, Dns, Failure};
use super::endpoint::{Endpoint, Endpoints};
use super::status::ResolveStatus;
use crate::backoff::{Backoff, jittered};
use crate::deadline::{capped, deadline_in};
use crate::service_config::{Chooser, ServiceConfig};
use crate::{Error, ErrorKind};

/// Jitter on refresh intervals: ±10 %.
const REFRESH_JITTER: f64 = 0.1;

/// What to ask.
pub(crate) enum Query {
    Addresses {
        server: Option<std::net::SocketAddr>,
        host: String,
        port: u16,
    },
    Srv {
        server: Option<std::net::SocketAddr>,
        name: String,
    },
}

impl Query {
    fn server(&self) -> Option<std::net::SocketAddr> {
        match self {
            Query::Addresses { server, .. } | Query::Srv { server, .. } => *server,
        }
    }

    /// How many independent parts one round has: A and AAAA, or one SRV.
    fn parts(&self) -> usize {
        match self {
            Query::Addresses { .. } => 2,
            Query::Srv { .. } => 1,
        }
    }

    async fn round(
        &self,
        dns: &Dns,
        config: &ResolveConfig,
        seed: u64,
    ) -> Vec<Result<Answer, Failure>> {
        match self {
            Query::Addresses { host, port, .. } => dns.addresses(host, *port).await.into(),
            Query::Srv { name, .. } => vec![dns.srv(name, config.max_endpoints, seed).await],
        }
    }
}

pub(crate) struct Publisher {
    pub(crate) endpoints: watch::Sender<Endpoints>,
    pub(crate) status: watch::Sender<ResolveStatus>,
    /// The service config from DNS, when asked for.
    pub(crate) service_config: Option<watch::Sender<Option<Arc<ServiceConfig>>>>,
}

/// The DNS service config's state.
struct TxtState {
    chooser: Chooser,
    /// The records behind the config published last.
    last: Option<Vec<String>>,
    /// A bad record or lookup was logged; quiet until one works again.
    warned: bool,
}

/// An ongoing run of failed rounds.
struct Outage {
    since: StdInstant,
    attempts: u32,
}

pub(crate) async fn run(
    target: Arc<str>,
    query: Query,
    config: ResolveConfig,
    seed: u64,
    publisher: Publisher,
    now: Arc<Notify>,
) {
    let closed = publisher.endpoints.clone();
    tokio::select! {
        _ = closed.closed() => debug!(target = %target, "resolver stopped: nobody listens"),
        _ = Resolution::new(target.clone(), query, config, seed, publisher).run(now) => {}
    }
}

struct Resolution {
    target: Arc<str>,
    query: Query,
    config: ResolveConfig,
    seed: u64,
    publisher: Publisher,
    dns: Option<Dns>,
    backoff: Backoff,
    /// The last good answer of each part; `None` until one succeeded.
    parts: Vec<Option<Vec<Endpoint>>>,
    published: bool,
    outage: Option<Outage>,
    capped_from: usize,
    txt: Option<TxtState>,
    /// The refresh interval of the last good answer; retries during an
    /// outage never wait longer than a healthy refresh would.
    refresh: Duration,
}

impl Resolution {
    fn new(
        target: Arc<str>,
        query: Query,
        config: ResolveConfig,
        seed: u64,
        publisher: Publisher,
    ) -> Self {
        Self {
            backoff: Backoff::new(config.retry_backoff()),
            parts: vec![None; query.parts()],
            target,
            query,
            seed,
            publisher,
            dns: None,
            published: false,
            outage: None,
            capped_from: 0,
            txt: None,
            refresh: config.max_refresh,
            config,
        }
    }

    async fn run(mut self, now: Arc<Notify>) {
        loop {
            let started = Instant::now();
            let delay = self.round().await;
            self.service_config().await;
            // Sleep until the next round; resolve_now brings it forward, but
            // never to less than min_refresh after this round began.
            let mut next = deadline_in(delay);
            loop {
                tokio::select! {
                    _ = sleep_until(next) => break,
                    _ = now.notified() => {
                        let earliest = (started + capped(self.config.min_refresh)).max(Instant::now());
                        if earliest < next {
                            debug!(target = %self.target, "re-resolving early on request");
                            next = earliest;
                        }
                    }
                }
            }
        }
    }

    /// Runs one round; returns the delay before the next.
    async fn round(&mut self) -> Duration {
        let results = match timeout(self.config.dns_timeout, self.ask()).await {
            Ok(Ok(results)) => results,
            Ok(Err(failure)) => (0..self.parts.len())
                .map(|_| Err(failure.clone()))
                .collect(),
            Err(_) => {
                let failure = Failure(format!(
                    "no complete answer within the DNS timeout of {:?}",
                    self.config.dns_timeout
                ));
                (0..self.parts.len())
                    .map(|_| Err(failure.clone()))
                    .collect()
            }
        };

        let mut failures: Vec<String> = Vec::new();
        let mut ttl: Option<Duration> = None;
        let mut nxdomain = false;
        for (slot, result) in self.parts.iter_mut().zip(results) {
            match result {
                Ok(Answer::Found { endpoints, ttl: t }) => {
                    *slot = Some(endpoints);
                    ttl = Some(ttl.map_or(t, |old| old.min(t)));
                }
                Ok(Answer::Empty {
                    nxdomain: nx,
                    ttl: t,
                }) => {
                    *slot = Some(Vec::new());
                    nxdomain |= nx;
                    if let Some(t) = t {
                        ttl = Some(ttl.map_or(t, |old| old.min(t)));
                    }
                }
                Err(Failure(why)) => {
                    if !failures.contains(&why) {
                        failures.push(why);
                    }
                }
            }
        }
        if self.parts.iter().any(Option::is_some) {
            self.publish(nxdomain);
        }
        let result = if !failures.is_empty() {
            "error"
        } else if self.publisher.endpoints.borrow().is_empty() {
            "empty"
        } else {
            "ok"
        };
        crate::metrics::resolution(&self.target, result);

        if failures.is_empty() {
            if let Some(outage) = self.outage.take() {
                info!(
                    target = %self.target,
                    failed_rounds = outage.attempts,
                    outage_ms = outage.since.elapsed().as_millis() as u64,
                    endpoints = self.publisher.endpoints.borrow().len(),
                    "DNS resolution recovered"
                );
            }
            self.backoff.reset();
            self.publisher.status.send_replace(ResolveStatus::Resolved {
                at: StdInstant::now(),
            });
            // No TTL (an empty answer without SOA): ask again soon, since an
            // empty set leaves the client with nothing.
            let ttl = ttl.unwrap_or(self.config.min_refresh);
            self.refresh = ttl.clamp(self.config.min_refresh, self.config.max_refresh);
            jittered(self.refresh, REFRESH_JITTER)
        } else {
            let why = failures.join("; ");
            let error = Error::new(
                ErrorKind::Resolve,
                Some(self.target.clone()),
                format!("resolving {:?} failed: {why}", &*self.target),
            );
            let outage = self.outage.get_or_insert_with(|| {
                warn!(
                    target = %self.target,
                    error = %why,
                    kept_endpoints = self.publisher.endpoints.borrow().len(),
                    "DNS resolution failing; keeping the last good endpoints and retrying with backoff"
                );
                Outage {
                    since: StdInstant::now(),
                    attempts: 0,
                }
            });
            outage.attempts += 1;
            let status = ResolveStatus::Failing {
                since: outage.since,
                attempts: outage.attempts,
                error,
            };
            self.publisher.status.send_replace(status);
            self.backoff.next_delay().min(self.refresh)
        }
    }

    async fn ask(&mut self) -> Result<Vec<Result<Answer, Failure>>, Failure> {
        let dns = match &mut self.dns {
            Some(dns) => dns,
            slot => slot.insert(Dns::new(self.query.server(), self.config.dns_timeout).await?),
        };
        Ok(self.query.round(dns, &self.config, self.seed).await)
    }

    /// Looks up `_grpc_config.<host>` and publishes the config it chooses,
    /// if it changed. A failed lookup or a bad record keeps the last good
    /// one, with one warning until a lookup works again.
    async fn service_config(&mut self) {
        let (Some(sender), Query::Addresses { host, .. }) =
            (&self.publisher.service_config, &self.query)
        else {
            return;
        };
        let Some(dns) = &self.dns else {
            return;
        };
        if self.txt.is_none() {
            self.txt = Some(TxtState {
                chooser: Chooser {
                    percentile: rand::random_range(0..100),
                    hostname: hostname().await,
                },
                last: None,
                warned: false,
            });
        }
        let Some(state) = self.txt.as_mut() else {
            return;
        };
        let looked_up = match timeout(self.config.dns_timeout, dns.grpc_config(host)).await {
            Ok(Ok(records)) => Ok(records),
            Ok(Err(Failure(why))) => Err(why),
            Err(_) => Err("no answer within the DNS timeout".to_owned()),
        };
        let parsed = looked_up.and_then(|records| {
            if state.last.as_ref() == Some(&records) {
                return Ok(None);
            }
            let config =
                ServiceConfig::from_txt(&records, &state.chooser).map_err(|e| e.to_string())?;
            Ok(Some((records, config)))
        });
        match parsed {
            Ok(None) => state.warned = false,
            Ok(Some((records, config))) => {
                info!(target = %self.target, found = config.is_some(), "the service config in DNS changed");
                state.last = Some(records);
                state.warned = false;
                sender.send_replace(config.map(Arc::new));
            }
            Err(why) => {
                if !state.warned {
                    warn!(target = %self.target, error = %why, "the service config in DNS is unusable; keeping the last good one");
                    state.warned = true;
                }
            }
        }
    }

    /// Publishes the union of the parts' last good answers, if it changed.
    fn publish(&mut self, nxdomain: bool) {
        let all: Vec<Endpoint> = self.parts.iter().flatten().flatten().cloned().collect();
        let answered = all.len();
        let (set, dropped) = Endpoints::normalize(all, self.config.keep(), self.seed);
        // Subsetting keeps fewer on purpose; only the cap is worth a warning.
        let capped = dropped > 0 && answered > self.config.max_endpoints;
        if capped && answered != self.capped_from {
            warn!(
                target = %self.target,
                answered,
                kept = set.len(),
                max_endpoints = self.config.max_endpoints,
                "the answer exceeds max_endpoints; keeping a stable subset"
            );
        }
        self.capped_from = if capped { answered } else { 0 };

        let first = !self.published;
        self.published = true;
        let target = &self.target;
        self.publisher.endpoints.send_if_modified(|current| {
            if !first && *current == set {
                return false;
            }
            if set.is_empty() && (first || !current.is_empty()) {
                warn!(
                    target = %target,
                    answer = if nxdomain { "NXDOMAIN" } else { "no records" },
                    "DNS has no endpoints for the target; publishing the empty set"
                );
            } else {
                let added = set.iter().filter(|e| !current.contains(e.addr())).count();
                let removed = current.iter().filter(|e| !set.contains(e.addr())).count();
                debug!(target = %target, endpoints = set.len(), added, removed, "endpoint set changed");
            }
            *current = set;
            true
        });
    }
}

/// This machine's host name, for `clientHostname`: `$HOSTNAME`, else the
/// kernel's.
async fn hostname() -> Option<String> {
    if let Ok(name) = std::env::var("HOSTNAME")
        && !name.is_empty()
    {
        return Some(name);
    }
    let name = tokio::task::spawn_blocking(|| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .await
        .ok()?
        .ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}
