//! The balancer task: keeps one subchannel per resolved endpoint, runs
//! outlier ejection, and publishes the picker's snapshot whenever anything
//! changes. Building the snapshot is a pure step (`snapshot.rs`).
//!
//! It runs whether or not calls flow, so a new pod is connected and
//! health-checked before the first call that could use it. It owns its state,
//! the outlier detector's included; the request path only reads what it
//! publishes, and records outcomes in per-endpoint atomics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
mod ring;
mod snapshot;
mod weights;
mod zones;

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::uri::Authority;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::snapshot::Seen;
use self::zones::{Decision, Placed};
use crate::call::AppliedConfig;
use crate::connection::ProbeRate;
use crate::load::LoadReports;
use crate::outlier::{Ejections, Ejector, OutlierDetection};
use crate::picker::{Chooser, Picker, Policy, SlowStart};
use crate::resolve::{Endpoints, ResolveStatus, Resolver};
use crate::service_config::ServiceConfig;
use crate::subchannel::{Hooks, Subchannel, SubchannelConfig};

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
    /// The client's zone, for zone-aware routing; `None` turns it off.
    pub(crate) zone: Option<Arc<str>>,
    pub(crate) telemetry: crate::telemetry::Telemetry,
}

/// What a started balancer hands to its channel.
pub(crate) struct Running {
    pub(crate) picker: Arc<Picker>,
    pub(crate) endpoints: Arc<ArcSwap<Vec<Subchannel>>>,
    pub(crate) serving: watch::Receiver<ServingSet>,
    /// The ejections in force, for status.
    pub(crate) ejections: Arc<Ejections>,
    /// Dropping it stops the balancer.
    pub(crate) stop: oneshot::Sender<()>,
}

pub(crate) struct Balancer {
    target: Arc<str>,
    resolver: Resolver,
    config: Arc<SubchannelConfig>,
    authority: Option<Authority>,
    ready_timeout: std::time::Duration,
    /// How fast the endpoints' latency estimates forget (peak EWMA).
    latency_decay: Option<std::time::Duration>,
    /// Weighted round robin's settings, when it runs.
    wrr: Option<crate::picker::WeightedRoundRobin>,
    /// Ring hash with bounded load: the channel's calls in flight.
    ring_in_flight: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// The cap on liveness probes, over every subchannel.
    probe_rate: Arc<ProbeRate>,
    outputs: Outputs,
    /// The client's zone, for zone-aware routing.
    zone: Option<Arc<str>>,
    telemetry: crate::telemetry::Telemetry,
    /// Each endpoint's zone and hints as its source last said, and zone
    /// routing's last choice. Only this task touches it.
    zones: std::sync::Mutex<(BTreeMap<SocketAddr, Placed>, Decision)>,
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
            zone,
            telemetry,
        } = spec;
        let picker = Picker::new(
            format!("0 endpoints ({target} is being resolved)"),
            Chooser::from(&policy),
            slow_start,
        );
        let (picker, ring_in_flight) = ring::hashing(picker, &policy);
        let picker = Arc::new(picker);
        crate::metrics::policy(&target, policy.name(), outlier_detection.is_some());
        let ejector = Ejector::new(target.clone(), outlier_detection, telemetry.clone());
        let ejections = ejector.published();
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
            latency_decay: match policy {
                Policy::PeakEwma { decay, .. } => Some(decay),
                _ => None,
            },
            wrr: match policy {
                Policy::WeightedRoundRobin(wrr) => Some(wrr),
                _ => None,
            },
            ring_in_flight,
            outputs: Outputs {
                picker: picker.clone(),
                endpoints: endpoints.clone(),
                serving: serving_tx,
            },
            zone,
            telemetry,
            zones: std::sync::Mutex::new((BTreeMap::new(), Decision::Off)),
        };
        let configs = Configs {
            applied: service_config,
            default: default_service_config,
        };
        runtime.spawn(supervised(
            picker.clone(),
            balancer.run(stopped, ejector, configs),
        ));
        Running {
            picker,
            endpoints,
            serving,
            ejections,
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
        mut ejector: Ejector,
        configs: Configs,
    ) -> Option<String> {
        let mut from_dns = self.resolver.service_config_receiver();
        let changed = Arc::new(Notify::new());
        let mut subchannels: BTreeMap<SocketAddr, Subchannel> = BTreeMap::new();
        let mut resolved = self.resolver.subscribe();
        let mut status = self.resolver.status_receiver();
        let first = resolved.borrow_and_update().clone();
        self.apply(&mut subchannels, &first, &changed, &mut ejector);
        let mut ramp_end = self.publish(&subchannels, &ejector);
        let mut reweigh_at = weights::next_update(self.wrr.as_ref(), Instant::now());
        loop {
            // The next timed event: an interval, a return, a ramp's end.
            let wake = [ejector.next_wake(), ramp_end].into_iter().flatten().min();
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let reweigh = async {
                match reweigh_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stopped => break,
                () = reweigh => {
                    self.reweigh();
                    reweigh_at = weights::next_update(self.wrr.as_ref(), Instant::now());
                    continue;
                }
                result = resolved.changed() => {
                    if result.is_err() {
                        return Some("its resolver task stopped".to_owned());
                    }
                    let set = resolved.borrow_and_update().clone();
                    self.apply(&mut subchannels, &set, &changed, &mut ejector);
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
                () = ejector.failing() => {
                    if !ejector.on_failing(outcomes(&subchannels)) {
                        continue;
                    }
                }
                _ = timer => {
                    // An interval that ejected and returned nothing leaves
                    // nothing to publish, unless a slow-start ramp runs: an
                    // O(endpoints) publish every 10 s is most of a large
                    // idle channel's work.
                    if !ejector.on_timer(outcomes(&subchannels)) && ramp_end.is_none() {
                        continue;
                    }
                }
                result = status.changed() => {
                    if result.is_err() {
                        return Some("its resolver task stopped".to_owned());
                    }
                    let failing =
                        matches!(status.borrow_and_update().status, ResolveStatus::Failing { .. });
                    crate::metrics::resolution_failing(&self.target, failing);
                    self.telemetry.resolution_failing(failing);
                    // The summary and the channel's state depend on it.
                }
            }
            #[cfg(test)]
            tests::crash_if_asked(&self.target);
            ramp_end = self.publish(&subchannels, &ejector);
        }
        debug!(target = %self.target, "balancer stopped");
        None
    }

    /// Weighted round robin: works the weights out for the current
    /// snapshot.
    fn reweigh(&self) {
        if let Some(wrr) = &self.wrr {
            let zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
            let picker = &self.outputs.picker;
            weights::reweigh(picker, wrr, &self.target, &self.telemetry, &zones.0);
        }
    }

    /// Starts subchannels for new endpoints and drops those that left.
    fn apply(
        &self,
        subchannels: &mut BTreeMap<SocketAddr, Subchannel>,
        set: &Endpoints,
        changed: &Arc<Notify>,
        ejector: &mut Ejector,
    ) {
        let placed = set.iter().map(|e| {
            let placed = Placed {
                zone: e.zone_arc(),
                hints: e.hints_arc(),
            };
            (e.addr(), placed)
        });
        self.zones.lock().unwrap_or_else(|e| e.into_inner()).0 = placed.collect();
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
                judge: ejector.judge(),
                latency_decay: self.latency_decay,
                load_reports: match &self.wrr {
                    Some(wrr) if wrr.enable_oob_load_report => LoadReports::OutOfBand {
                        period: wrr.oob_reporting_period,
                        penalty: wrr.error_utilization_penalty,
                    },
                    Some(wrr) => LoadReports::PerCall {
                        penalty: wrr.error_utilization_penalty,
                    },
                    None => LoadReports::Off,
                },
                channel_in_flight: self.ring_in_flight.clone(),
                probe_rate: Some(self.probe_rate.clone()),
                telemetry: self.telemetry.clone(),
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
        let in_flight = self.ring_in_flight.clone();
        ring::rebuild(
            &self.outputs.picker,
            &self.target,
            subchannels,
            set,
            in_flight,
        );
        self.probe_rate.set_endpoints(subchannels.len());
        ejector.retain(subchannels.keys().copied());
    }

    /// Publishes the picker's snapshot, the endpoint list and the SERVING
    /// set (`snapshot.rs` builds them), and each endpoint's place in
    /// rotation. Returns when the last slow-start ramp ends, if one runs.
    fn publish(
        &self,
        subchannels: &BTreeMap<SocketAddr, Subchannel>,
        ejector: &Ejector,
    ) -> Option<Instant> {
        let mut zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        let (placed, last) = &mut *zones;
        let seen = subchannels.iter().map(|(addr, sub)| {
            let status = sub.status();
            let state = status.state();
            Seen {
                addr: *addr,
                serving: state.is_serving(),
                label: state.label().to_owned(),
                metric: state.metric_label(),
                since: status.since(),
                ready: state
                    .is_serving()
                    .then(|| sub.pool())
                    .filter(|pool| pool.is_ready())
                    .cloned(),
                ejected: ejector.is_ejected(addr),
                placed: placed.get(addr).cloned().unwrap_or_default(),
            }
        });
        let resolution = self.resolver.resolution();
        let note = match resolution.status.clone() {
            ResolveStatus::Pending => Some("the first resolution has not finished".to_owned()),
            ResolveStatus::Ended {
                gave_a_set: false, ..
            } => Some("the endpoint source ended before giving any endpoints".to_owned()),
            ResolveStatus::Failing { error, .. } => Some(format!("resolution is failing: {error}")),
            _ if subchannels.is_empty() => Some("the resolver found no address".to_owned()),
            _ => None,
        };
        let slow_start = self.outputs.picker.slow_start();
        let zone = self.zone.as_deref();
        let now = std::time::Instant::now();
        let built = snapshot::build(seen, slow_start, zone, note.as_deref(), now);
        if built.zones != *last {
            info!(
                target = %self.target,
                zone = zone.unwrap_or_default(),
                routing = %built.zones,
                local_share = built.local_share.unwrap_or(1.0),
                "zone-aware routing changed"
            );
            *last = built.zones.clone();
        }
        crate::metrics::zone_local_share(&self.target, built.local_share);
        self.telemetry.zone_local_share(built.local_share);
        self.telemetry.ejected(built.ejected, built.panic);
        drop(zones);
        if built.panic {
            debug!(target = %self.target, endpoints = built.in_rotation.len(), "every serving endpoint is ejected: calls go to them anyway");
        }
        crate::metrics::ejected(&self.target, built.ejected, built.panic);
        crate::metrics::endpoints(&self.target, built.states);
        let mut snapshot = built.snapshot;
        snapshot.failing = failing(&resolution).map(Arc::from);
        snapshot.settled = !matches!(resolution.status, ResolveStatus::Pending)
            && subchannels
                .values()
                .all(|sub| !matches!(sub.state(), crate::subchannel::SubchannelState::Connecting));
        self.outputs.picker.publish(snapshot);
        self.reweigh();
        // After the snapshot: "not in rotation" means no new pick finds it.
        for (addr, sub) in subchannels {
            sub.set_in_rotation(built.in_rotation.binary_search(addr).is_ok());
        }
        ring::reshare(&self.outputs.picker, &built.in_rotation);
        self.outputs.endpoints.store(Arc::new(
            subchannels.values().map(Subchannel::handle).collect(),
        ));
        let serving: BTreeMap<SocketAddr, Subchannel> = built
            .serving
            .iter()
            .filter_map(|addr| Some((*addr, subchannels.get(addr)?.handle())))
            .collect();
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
        built.ramp_end.map(Instant::from_std)
    }
}

/// Why the channel is in TRANSIENT_FAILURE, if it is: resolution failed
/// with nothing to offer (gRPC's channel state, in which a call that isn't
/// wait-for-ready fails at once).
fn failing(resolution: &crate::resolve::Resolution) -> Option<String> {
    if !resolution.is_failing_empty() {
        return None;
    }
    let target = &resolution.target;
    Some(match &resolution.status {
        ResolveStatus::Failing { error, .. } => {
            format!("{target}: no endpoint to call, resolution is failing: {error}")
        }
        _ => format!(
            "{target}: no endpoint to call: the endpoint source ended before giving any endpoints"
        ),
    })
}

/// Each endpoint's outcomes, for the ejector.
fn outcomes(
    subchannels: &BTreeMap<SocketAddr, Subchannel>,
) -> impl Iterator<Item = (SocketAddr, &crate::outlier::Outcomes)> {
    subchannels.iter().map(|(a, s)| (*a, s.outcomes()))
}

#[cfg(test)]
mod tests {
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
        let (addr, reporter, server) = crate::testing::health_server().await;
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
                .all(|e| matches!(e.state, crate::subchannel::SubchannelState::Shutdown))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let endpoints = channel.endpoints();
        assert_eq!(endpoints.len(), 1);
        assert!(
            matches!(
                endpoints[0].state,
                crate::subchannel::SubchannelState::Shutdown
            ),
            "{endpoints:?}"
        );
        server.abort();
    }
}
