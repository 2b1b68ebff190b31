//! The balancer task: keeps one subchannel per resolved endpoint, ejects
//! outliers, and publishes the picker's snapshot whenever anything changes.
//!
//! It runs whether or not calls flow, so a new pod is connected and
//! health-checked before the first call that could use it. It owns its state,
//! the outlier detector's included; the request path only reads what it
//! publishes, and records outcomes in per-endpoint atomics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::uri::Authority;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::call::AppliedConfig;
use crate::connection::ProbeRate;
use crate::outlier::{Counts, Detector, Ejection, OutlierDetection};
use crate::picker::{Pick, Picker, Snapshot};
use crate::policy::{Policy, SlowStart};
use crate::resolve::{Endpoints, ResolveStatus, Resolver};
use crate::service_config::ServiceConfig;
use crate::subchannel::{CodeSet, Hooks, Judge, Subchannel, SubchannelConfig};

/// The SERVING subchannels, by address, for [`Discover`](crate::Discover).
/// The handles don't keep the subchannels running: only the balancer does.
pub(crate) type ServingSet = Arc<BTreeMap<SocketAddr, Subchannel>>;

/// What the balancer publishes to.
struct Outputs {
    picker: Arc<Picker>,
    endpoints: Arc<ArcSwap<Vec<Subchannel>>>,
    serving: watch::Sender<ServingSet>,
}

/// What a balancer is started with.
pub(crate) struct Spec {
    pub(crate) target: Arc<str>,
    pub(crate) resolver: Resolver,
    pub(crate) config: Arc<SubchannelConfig>,
    pub(crate) authority: Option<Authority>,
    pub(crate) ready_timeout: std::time::Duration,
    pub(crate) policy: Policy,
    pub(crate) slow_start: Option<SlowStart>,
    pub(crate) outlier_detection: Option<OutlierDetection>,
    /// Where calls read the service config, and the default one that a
    /// config from DNS replaces.
    pub(crate) service_config: Arc<ArcSwapOption<AppliedConfig>>,
    pub(crate) default_service_config: Option<Arc<ServiceConfig>>,
}

/// What a started balancer hands to its channel.
pub(crate) struct Running {
    pub(crate) picker: Arc<Picker>,
    pub(crate) endpoints: Arc<ArcSwap<Vec<Subchannel>>>,
    pub(crate) serving: watch::Receiver<ServingSet>,
    /// Dropping it stops the balancer.
    pub(crate) stop: oneshot::Sender<()>,
}

pub(crate) struct Balancer {
    target: Arc<str>,
    resolver: Resolver,
    config: Arc<SubchannelConfig>,
    authority: Option<Authority>,
    ready_timeout: std::time::Duration,
    /// How the subchannels judge their calls.
    judge: Judge,
    /// The cap on liveness probes, over every subchannel.
    probe_rate: Arc<ProbeRate>,
    outputs: Outputs,
}

/// The service config calls read, and the default one.
struct Configs {
    applied: Arc<ArcSwapOption<AppliedConfig>>,
    default: Option<Arc<ServiceConfig>>,
}

/// The next service config from DNS; never without one, or once DNS
/// stopped.
async fn next_config(
    from_dns: &mut Option<watch::Receiver<Option<Arc<ServiceConfig>>>>,
) -> Option<Arc<ServiceConfig>> {
    let Some(rx) = from_dns.as_mut() else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        *from_dns = None;
        return std::future::pending().await;
    }
    rx.borrow_and_update().clone()
}

/// The balancer's own state, beside its subchannels.
struct Ejections {
    detector: Option<Detector>,
    /// Told when an endpoint reaches its consecutive-failure threshold.
    failing: Arc<Notify>,
    next_interval: Option<Instant>,
}

/// Runs the balancer's `work`, and tells the picker if it ends for any
/// reason but the channel's drop, a panic included: calls then fail at
/// once, saying why, rather than wait for endpoints that will never come.
async fn supervised(picker: Arc<Picker>, work: impl Future<Output = Option<String>>) {
    use futures::FutureExt;
    let why = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
        Ok(None) => return,
        Ok(Some(why)) => why,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("it panicked: {message}")
        }
    };
    tracing::error!(reason = %why, "the balancer task stopped; calls on this channel will fail");
    picker.stop(why);
}

impl Balancer {
    /// Starts the balancer task on `runtime`.
    pub(crate) fn spawn(spec: Spec, runtime: &tokio::runtime::Handle) -> Running {
        let Spec {
            target,
            resolver,
            config,
            authority,
            ready_timeout,
            policy,
            slow_start,
            outlier_detection,
            service_config,
            default_service_config,
        } = spec;
        let picker = Arc::new(Picker::new(
            format!("0 endpoints ({target} is being resolved)"),
            Pick::from(&policy),
            slow_start,
        ));
        crate::metrics::policy(&target, policy.name(), outlier_detection.is_some());
        let failing = Arc::new(Notify::new());
        let judge = Judge {
            failures: outlier_detection
                .as_ref()
                .map_or(CodeSet::SERVER_ERRORS, OutlierDetection::codes),
            consecutive: outlier_detection
                .as_ref()
                .and_then(|o| o.consecutive_failures)
                .map_or(0, |c| c.threshold),
            notify: Some(failing.clone()),
            decay: match policy {
                Policy::PeakEwma { decay, .. } => decay,
                _ => Judge::default().decay,
            },
        };
        let ejections = Ejections {
            next_interval: outlier_detection
                .as_ref()
                .map(|o| Instant::now() + crate::deadline::capped(o.interval)),
            detector: outlier_detection.map(Detector::new),
            failing,
        };
        let endpoints = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let (serving_tx, serving) = watch::channel(ServingSet::default());
        let (stop, stopped) = oneshot::channel();
        let balancer = Balancer {
            target,
            resolver,
            probe_rate: ProbeRate::new(config.liveness_probes_per_second),
            config,
            authority,
            ready_timeout,
            judge,
            outputs: Outputs {
                picker: picker.clone(),
                endpoints: endpoints.clone(),
                serving: serving_tx,
            },
        };
        let configs = Configs {
            applied: service_config,
            default: default_service_config,
        };
        runtime.spawn(supervised(
            picker.clone(),
            balancer.run(stopped, ejections, configs),
        ));
        Running {
            picker,
            endpoints,
            serving,
            stop,
        }
    }

    /// Runs until `stopped` fires (the last `LbChannel` clone is gone) or
    /// resolution ends. Dropping the subchannels then closes their
    /// connections once their calls are done. Why it ended, unless the
    /// channel asked it to.
    async fn run(
        self,
        mut stopped: oneshot::Receiver<()>,
        mut ejections: Ejections,
        configs: Configs,
    ) -> Option<String> {
        let mut from_dns = self.resolver.service_config_receiver();
        let changed = Arc::new(Notify::new());
        let mut subchannels: BTreeMap<SocketAddr, Subchannel> = BTreeMap::new();
        let mut resolved = self.resolver.subscribe();
        let mut status = self.resolver.status_receiver();
        let first = resolved.borrow_and_update().clone();
        self.apply(&mut subchannels, &first, &changed, &mut ejections);
        let mut ramp_end = self.publish(&subchannels, &ejections);
        loop {
            // The next timed event: an interval, a return, a ramp's end.
            let wake = [
                ejections.next_interval,
                ejections.detector.as_ref().and_then(Detector::next_return),
                ramp_end,
            ]
            .into_iter()
            .flatten()
            .min();
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stopped => break,
                result = resolved.changed() => {
                    if result.is_err() {
                        return Some("its resolver task stopped".to_owned());
                    }
                    let set = resolved.borrow_and_update().clone();
                    self.apply(&mut subchannels, &set, &changed, &mut ejections);
                }
                _ = changed.notified() => {}
                config = next_config(&mut from_dns) => {
                    if let Some(config) = &config {
                        config.log_warnings(&self.target);
                    }
                    let config = config.or_else(|| configs.default.clone());
                    configs.applied.store(config.map(AppliedConfig::new));
                    continue;
                }
                _ = ejections.failing.notified() => {
                    if !self.eject_failing(&subchannels, &mut ejections) {
                        continue;
                    }
                }
                _ = timer => {
                    // An interval that ejected and returned nothing leaves
                    // nothing to publish, unless a slow-start ramp runs: an
                    // O(endpoints) publish every 10 s is most of a large
                    // idle channel's work.
                    if !self.on_timer(&subchannels, &mut ejections) && ramp_end.is_none() {
                        continue;
                    }
                }
                result = status.changed() => {
                    if result.is_err() {
                        return Some("its resolver task stopped".to_owned());
                    }
                    // Only the error summary depends on it.
                }
            }
            #[cfg(test)]
            tests::crash_if_asked(&self.target);
            ramp_end = self.publish(&subchannels, &ejections);
        }
        debug!(target = %self.target, "balancer stopped");
        None
    }

    /// Consecutive-failure ejection: at once, not at the next interval.
    /// Whether any endpoint was ejected.
    fn eject_failing(
        &self,
        subchannels: &BTreeMap<SocketAddr, Subchannel>,
        ejections: &mut Ejections,
    ) -> bool {
        let Some(detector) = ejections.detector.as_mut() else {
            return false;
        };
        let counts: Vec<(SocketAddr, u32)> = subchannels
            .iter()
            .map(|(a, s)| (*a, s.shared.stats.outcomes.consecutive_failures()))
            .collect();
        let ejected = detector.on_failures(Instant::now(), &counts);
        self.ejected(subchannels, ejected)
    }

    /// Returns endpoints whose ejection is over, and runs A50's interval.
    /// Whether any endpoint returned or was ejected.
    fn on_timer(
        &self,
        subchannels: &BTreeMap<SocketAddr, Subchannel>,
        ejections: &mut Ejections,
    ) -> bool {
        let now = Instant::now();
        let Some(detector) = ejections.detector.as_mut() else {
            return false;
        };
        let mut changed = false;
        for addr in detector.returns(now) {
            changed = true;
            if let Some(sub) = subchannels.get(&addr) {
                sub.shared.stats.outcomes.reset();
                *sub.shared.stats.ejection.lock().expect("ejection") = None;
            }
            info!(target = %self.target, endpoint = %addr, "an ejected endpoint returns to rotation");
        }
        if ejections.next_interval.is_some_and(|at| at <= now) {
            let interval = crate::deadline::capped(detector.config().interval);
            ejections.next_interval = Some(now + interval);
            let counts: Vec<(SocketAddr, Counts)> = subchannels
                .iter()
                .map(|(a, s)| {
                    let outcomes = &s.shared.stats.outcomes;
                    let (successes, failures) = outcomes.take_counts();
                    let consecutive = outcomes.consecutive_failures();
                    (
                        *a,
                        Counts {
                            successes,
                            failures,
                            consecutive,
                        },
                    )
                })
                .collect();
            let mut ejected = detector.on_interval(now, &counts);
            // Failures in a row that could not eject before (the cap) may now.
            let consecutive: Vec<_> = counts.iter().map(|(a, c)| (*a, c.consecutive)).collect();
            ejected.extend(detector.on_failures(now, &consecutive));
            changed |= self.ejected(subchannels, ejected);
        }
        changed
    }

    /// Applies ejections: status, logs and metrics.
    /// Whether any endpoint was ejected.
    fn ejected(
        &self,
        subchannels: &BTreeMap<SocketAddr, Subchannel>,
        ejected: Vec<Ejection>,
    ) -> bool {
        let any = !ejected.is_empty();
        for e in ejected {
            let length = e.until.saturating_duration_since(Instant::now());
            if let Some(sub) = subchannels.get(&e.addr) {
                let until = std::time::Instant::now() + length;
                *sub.shared.stats.ejection.lock().expect("ejection") =
                    Some((until, e.reason.label()));
            }
            warn!(
                target = %self.target,
                endpoint = %e.addr,
                reason = e.reason.label(),
                figure = e.figure,
                bar = e.bar,
                ejected_for = ?length,
                "an endpoint is ejected as an outlier"
            );
            crate::metrics::ejection(&self.target, e.addr, e.reason.label());
        }
        any
    }

    /// Starts subchannels for new endpoints and drops those that left.
    fn apply(
        &self,
        subchannels: &mut BTreeMap<SocketAddr, Subchannel>,
        set: &Endpoints,
        changed: &Arc<Notify>,
        ejections: &mut Ejections,
    ) {
        let before = subchannels.len();
        subchannels.retain(|addr, _| set.contains(*addr));
        let removed = before - subchannels.len();
        let mut added = 0;
        for endpoint in set.iter() {
            let addr = endpoint.addr();
            if subchannels.contains_key(&addr) {
                continue;
            }
            let hooks = Hooks {
                changed: Some(changed.clone()),
                resolve_now: Some(self.resolver.resolve_now_handle()),
                authority: self.authority.clone(),
                target: Some(self.target.clone()),
                judge: self.judge.clone(),
                probe_rate: Some(self.probe_rate.clone()),
            };
            match Subchannel::spawn_with(endpoint.clone(), self.config.clone(), hooks) {
                Ok(sub) => {
                    subchannels.insert(addr, sub.ready_timeout(self.ready_timeout));
                    added += 1;
                }
                Err(error) => {
                    warn!(target = %self.target, endpoint = %addr, %error, "cannot start a subchannel")
                }
            }
        }
        if added + removed > 0 {
            info!(target = %self.target, added, removed, endpoints = subchannels.len(), "endpoint set changed");
        }
        self.probe_rate.set_endpoints(subchannels.len());
        if let Some(detector) = ejections.detector.as_mut() {
            detector.retain(subchannels.keys().copied());
        }
    }

    /// Publishes the picker's snapshot, the endpoint list and the SERVING
    /// set, without ejected endpoints unless no other is left (panic mode).
    /// Returns when the last slow-start ramp ends, if one is running.
    fn publish(
        &self,
        subchannels: &BTreeMap<SocketAddr, Subchannel>,
        ejections: &Ejections,
    ) -> Option<Instant> {
        let mut ready = Vec::new();
        let mut since = Vec::new();
        let mut in_rotation = Vec::new();
        let mut ejected_ready = Vec::new();
        let mut ejected_since = Vec::new();
        let mut ejected_in_rotation = Vec::new();
        let mut ejected_serving = BTreeMap::new();
        let mut labels = Vec::with_capacity(subchannels.len());
        let mut serving = BTreeMap::new();
        let ramp = self.outputs.picker.slow_start();
        let window = ramp.map_or(std::time::Duration::ZERO, |r| r.window);
        let mut ramp_end: Option<std::time::Instant> = None;
        let mut states = [
            ("serving", 0),
            ("not_serving", 0),
            ("connecting", 0),
            ("transient_failure", 0),
        ];
        for (addr, sub) in subchannels {
            let status = sub.status();
            if let Some(slot) = states
                .iter_mut()
                .find(|(s, _)| *s == status.state().metric_label())
            {
                slot.1 += 1;
            }
            if status.state().is_serving() {
                let pool = &sub.shared.pool;
                let ejected = ejections
                    .detector
                    .as_ref()
                    .is_some_and(|d| d.is_ejected(addr));
                let (ready, since, in_rotation, serving) = match ejected {
                    false => (&mut ready, &mut since, &mut in_rotation, &mut serving),
                    true => (
                        &mut ejected_ready,
                        &mut ejected_since,
                        &mut ejected_in_rotation,
                        &mut ejected_serving,
                    ),
                };
                if pool.is_ready() {
                    ready.push(pool.clone());
                    in_rotation.push(*addr);
                    since.push(status.since());
                    if ramp.is_some() && status.since().elapsed() < window {
                        // Saturating: a window of Duration::MAX ramps "forever".
                        let end = status.since() + crate::deadline::capped(window);
                        ramp_end = Some(ramp_end.map_or(end, |e| e.max(end)));
                    }
                }
                serving.insert(*addr, sub.handle());
            }
            labels.push(
                match ejections
                    .detector
                    .as_ref()
                    .and_then(|d| d.ejected_for(addr))
                {
                    Some(_) if status.state().is_serving() => "SERVING but ejected".to_owned(),
                    _ => status.state().label().to_owned(),
                },
            );
        }
        let ejected = ejected_serving.len();
        let panic = ready.is_empty() && !ejected_ready.is_empty();
        if panic {
            // Panic mode: ejected endpoints that still say SERVING beat none.
            ready = ejected_ready;
            since = ejected_since;
            in_rotation = ejected_in_rotation;
            serving = ejected_serving;
            debug!(target = %self.target, endpoints = ready.len(), "every serving endpoint is ejected: calls go to them anyway");
        }
        crate::metrics::ejected(&self.target, ejected, panic);
        if ramp_end.is_none() {
            since.clear();
        }
        let note = match self.resolver.status() {
            ResolveStatus::Pending => Some("the first resolution has not finished".to_owned()),
            ResolveStatus::Failing { error, .. } => Some(format!("resolution is failing: {error}")),
            _ if subchannels.is_empty() => Some("the resolver found no address".to_owned()),
            _ => None,
        };
        crate::metrics::endpoints(&self.target, states);
        let summary = Snapshot::summarize(labels.iter().map(String::as_str), note.as_deref());
        self.outputs.picker.publish(Snapshot {
            ready,
            since,
            summary,
        });
        // After the snapshot: "not in rotation" means no new pick finds it.
        for (addr, sub) in subchannels {
            let picked = in_rotation.binary_search(addr).is_ok();
            sub.shared
                .stats
                .in_rotation
                .store(picked, Ordering::Release);
        }
        self.outputs.endpoints.store(Arc::new(
            subchannels.values().map(Subchannel::handle).collect(),
        ));
        self.outputs.serving.send_if_modified(|current| {
            // The same addresses with the same subchannels: a subchannel
            // replaced at its address (a pod back on the same IP) is a change.
            let same = current.len() == serving.len()
                && current
                    .iter()
                    .zip(serving.iter())
                    .all(|((a, x), (b, y))| a == b && x.same(y));
            if same {
                return false;
            }
            *current = Arc::new(serving);
            true
        });
        ramp_end.map(Instant::from_std)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use crate::LbChannel;

    /// Targets whose balancer panics at its next event: how a test kills one.
    static CRASH: Mutex<Vec<String>> = Mutex::new(Vec::new());

    pub(super) fn crash_if_asked(target: &str) {
        let asked = CRASH.lock().map(|t| t.iter().any(|c| c == target));
        if asked.unwrap_or(false) {
            panic!("a crash a test asked for");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_balancer_that_dies_fails_calls_at_once_and_says_why() {
        // A real server with tonic-health on loopback.
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(incoming),
        );
        let target = format!("ipv4:{addr}");
        let channel = LbChannel::builder(target.clone())
            .connect()
            .await
            .expect("it connects");
        let mut client = HealthClient::new(channel.clone());
        let check = HealthCheckRequest {
            service: String::new(),
        };
        client.check(check.clone()).await.expect("a call works");

        // Its next event, a health change, kills the balancer.
        CRASH.lock().unwrap().push(target.clone());
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let started = Instant::now();
        let mut status = None;
        while started.elapsed() < Duration::from_secs(5) {
            match client.check(check.clone()).await {
                Err(s) if s.code() == tonic::Code::Internal => {
                    status = Some(s);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let status = status.expect("calls fail once the balancer died");
        assert!(
            status
                .message()
                .contains("it panicked: a crash a test asked for")
                && status.message().contains(&target)
                && status.message().contains("its 1 endpoint is SHUTDOWN"),
            "{status:?}"
        );
        // Later calls fail at once, not after the 5 s ready timeout.
        let started = Instant::now();
        let again = client.check(check).await.expect_err("still dead");
        assert_eq!(again.code(), tonic::Code::Internal);
        assert!(started.elapsed() < Duration::from_secs(1));
        // The status agrees: its subchannel is shut down.
        let shut = crate::deadline::deadline_in(Duration::from_secs(5));
        while tokio::time::Instant::now() < shut
            && !channel
                .endpoints()
                .iter()
                .all(|e| matches!(e.state, crate::SubchannelState::Shutdown))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let endpoints = channel.endpoints();
        assert_eq!(endpoints.len(), 1);
        assert!(
            matches!(endpoints[0].state, crate::SubchannelState::Shutdown),
            "{endpoints:?}"
        );
        server.abort();
    }
}
