//! DNS and SRV as an endpoint source: one round of questions, then the
//! next when the answer's TTL runs out, clamped to `[min_refresh,
//! max_refresh]` and spread by ±10 %; after a failed round, a backoff, never
//! slower than a healthy refresh. `resolve_now` brings the next round
//! forward, at most once per `min_refresh`. With `service_config_from_dns`,
//! each round also reads the `_grpc_config` TXT record.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::config::ResolveConfig;
use super::dns::{Answer, Dns, Failure};
use super::endpoint::Endpoint;
use super::source::{EndpointSource, SourceError};
use crate::backoff::{Backoff, jittered};
use crate::deadline::{capped, deadline_in};
use crate::service_config::{Chooser, ServiceConfig};

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

/// The DNS service config's state.
struct TxtState {
    chooser: Chooser,
    /// The records behind the config published last.
    last: Option<Vec<String>>,
    /// A bad record or lookup was logged; quiet until one works again.
    warned: bool,
}

/// A `dns:` or `srv:` target's source.
pub(crate) struct DnsSource {
    target: Arc<str>,
    query: Query,
    config: ResolveConfig,
    seed: u64,
    dns: Option<Dns>,
    backoff: Backoff,
    /// The last good answer of each part; `None` until one succeeded.
    parts: Vec<Option<Vec<Endpoint>>>,
    txt: Option<TxtState>,
    /// Where the service config from DNS goes, when asked for.
    service_config: Option<watch::Sender<Option<Arc<ServiceConfig>>>>,
    /// The refresh interval of the last good answer; retries during an
    /// outage never wait longer than a healthy refresh would.
    refresh: Duration,
    /// When the last round began, and the delay before the next.
    last_round: Option<(Instant, Duration)>,
    /// A failure to report after a round that also had a set to publish.
    pending: Option<SourceError>,
    /// The last set said, so a round that half failed says its set only
    /// when it changed, and the outage isn't ended and begun each round.
    said: Option<Vec<Endpoint>>,
    /// `resolve_now`'s requests.
    now: Arc<Notify>,
}

impl EndpointSource for DnsSource {
    async fn next(&mut self) -> Option<Result<Vec<Endpoint>, SourceError>> {
        if let Some(error) = self.pending.take() {
            return Some(Err(error));
        }
        if let Some((started, delay)) = self.last_round {
            self.wait(started, delay).await;
        }
        let started = Instant::now();
        let (set, failure, delay) = self.round().await;
        self.service_config().await;
        self.last_round = Some((started, delay));
        Some(match (set, failure) {
            (Some(set), None) => {
                self.said = Some(set.clone());
                Ok(set)
            }
            // Some parts answered and others failed: their union now if it
            // is news, and the failure (next, at once).
            (Some(set), Some(failure)) if self.said.as_ref() != Some(&set) => {
                self.pending = Some(failure);
                self.said = Some(set.clone());
                Ok(set)
            }
            (Some(_), Some(failure)) => Err(failure),
            (None, Some(failure)) => Err(failure),
            (None, None) => Ok(Vec::new()),
        })
    }
}

impl DnsSource {
    pub(crate) fn new(
        target: Arc<str>,
        query: Query,
        config: ResolveConfig,
        seed: u64,
        service_config: Option<watch::Sender<Option<Arc<ServiceConfig>>>>,
        now: Arc<Notify>,
    ) -> Self {
        Self {
            backoff: Backoff::new(config.retry_backoff()),
            parts: vec![None; query.parts()],
            refresh: config.max_refresh,
            target,
            query,
            seed,
            dns: None,
            txt: None,
            service_config,
            last_round: None,
            pending: None,
            said: None,
            now,
            config,
        }
    }

    /// Sleeps until the next round; `resolve_now` brings it forward, but
    /// never to less than `min_refresh` after the last round began.
    async fn wait(&self, started: Instant, delay: Duration) {
        let mut next = deadline_in(delay);
        loop {
            tokio::select! {
                _ = sleep_until(next) => return,
                _ = self.now.notified() => {
                    let earliest = (started + capped(self.config.min_refresh)).max(Instant::now());
                    if earliest < next {
                        debug!(target = %self.target, "re-resolving early on request");
                        next = earliest;
                    }
                }
            }
        }
    }

    /// Runs one round: the union of the parts' last good answers, if any
    /// part has answered yet; why the round failed, if it did; and the
    /// delay before the next.
    async fn round(&mut self) -> (Option<Vec<Endpoint>>, Option<SourceError>, Duration) {
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
        let mut answered = false;
        for (slot, result) in self.parts.iter_mut().zip(results) {
            answered |= result.is_ok();
            match result {
                Ok(Answer::Found { endpoints, ttl: t }) => {
                    *slot = Some(endpoints);
                    ttl = Some(ttl.map_or(t, |old| old.min(t)));
                }
                Ok(Answer::Empty {
                    ttl: t,
                    nxdomain: nx,
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
        // A round where nothing answered has no new set: the last one
        // stands, and the failure alone is news.
        let set = answered.then(|| {
            self.parts
                .iter()
                .flatten()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
        });
        if nxdomain && set.as_ref().is_some_and(Vec::is_empty) {
            debug!(target = %self.target, "NXDOMAIN: Kubernetes says so when no pod is ready");
        }
        let result = match (&set, failures.is_empty()) {
            (_, false) => "error",
            (Some(set), true) if set.is_empty() => "empty",
            _ => "ok",
        };
        crate::metrics::resolution(&self.target, result);
        if failures.is_empty() {
            self.backoff.reset();
            // No TTL (an empty answer without SOA): ask again soon, since an
            // empty set leaves the client with nothing.
            let ttl = ttl.unwrap_or(self.config.min_refresh);
            self.refresh = ttl.clamp(self.config.min_refresh, self.config.max_refresh);
            (set, None, jittered(self.refresh, REFRESH_JITTER))
        } else {
            let why = failures.join("; ");
            let delay = self.backoff.next_delay().min(self.refresh);
            (set, Some(why.into()), delay)
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
        let (Some(sender), Query::Addresses { host, .. }) = (&self.service_config, &self.query)
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
