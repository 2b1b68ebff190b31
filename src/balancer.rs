//! The balancer task: keeps one subchannel per resolved endpoint and
//! publishes the picker's snapshot whenever anything changes.
//!
//! It runs whether or not calls flow, so a new pod is connected and
//! health-checked before the first call that could use it. It owns its state;
//! the request path only reads what it publishes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio::sync::{Notify, oneshot, watch};
use tracing::{debug, info, warn};

use crate::picker::{Picker, Snapshot};
use crate::resolve::{Endpoints, ResolveStatus, Resolver};
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
    outputs: Outputs,
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
        } = spec;
        let picker = Arc::new(Picker::new(format!(
            "0 endpoints ({target} is being resolved)"
        )));
        let endpoints = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let (serving_tx, serving) = watch::channel(ServingSet::default());
        let (stop, stopped) = oneshot::channel();
        let balancer = Balancer {
            target,
            resolver,
            config,
            authority,
            ready_timeout,
            outputs: Outputs {
                picker: picker.clone(),
                endpoints: endpoints.clone(),
                serving: serving_tx,
            },
        };
        runtime.spawn(balancer.run(stopped));
        Running {
            picker,
            endpoints,
            serving,
            stop,
        }
    }

    /// Runs until `stopped` fires (the last `LbChannel` clone is gone) or
    /// resolution ends. Dropping the subchannels then closes their
    /// connections once their calls are done.
    async fn run(self, mut stopped: oneshot::Receiver<()>) {
        let changed = Arc::new(Notify::new());
        let mut subchannels: BTreeMap<SocketAddr, Subchannel> = BTreeMap::new();
        let mut resolved = self.resolver.subscribe();
        let mut status = self.resolver.status_receiver();
        let first = resolved.borrow_and_update().clone();
        self.apply(&mut subchannels, &first, &changed);
        self.publish(&subchannels);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                result = resolved.changed() => {
                    if result.is_err() {
                        break;
                    }
                    let set = resolved.borrow_and_update().clone();
                    self.apply(&mut subchannels, &set, &changed);
                    self.publish(&subchannels);
                }
                _ = changed.notified() => self.publish(&subchannels),
                result = status.changed() => {
                    if result.is_err() {
                        break;
                    }
                    // Only the error summary depends on it.
                    self.publish(&subchannels);
                }
            }
        }
        debug!(target = %self.target, "balancer stopped");
    }

    /// Starts subchannels for new endpoints and drops those that left.
    fn apply(
        &self,
        subchannels: &mut BTreeMap<SocketAddr, Subchannel>,
        set: &Endpoints,
        changed: &Arc<Notify>,
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
    }

    /// Publishes the picker's snapshot, the endpoint list and the SERVING set.
    fn publish(&self, subchannels: &BTreeMap<SocketAddr, Subchannel>) {
        let mut ready = Vec::new();
        let mut labels = Vec::with_capacity(subchannels.len());
        let mut serving = BTreeMap::new();
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
                if pool.is_ready() {
                    ready.push(pool.clone());
                }
                serving.insert(*addr, sub.handle());
            }
            labels.push(status.state().label().to_owned());
        }
        let note = match self.resolver.status() {
            ResolveStatus::Pending => Some("the first resolution has not finished".to_owned()),
            ResolveStatus::Failing { error, .. } => Some(format!("resolution is failing: {error}")),
            _ if subchannels.is_empty() => Some("the resolver found no address".to_owned()),
            _ => None,
        };
        crate::metrics::endpoints(&self.target, states);
        let summary = Snapshot::summarize(labels.iter().map(String::as_str), note.as_deref());
        self.outputs.picker.publish(Snapshot { ready, summary });
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
    }
}
