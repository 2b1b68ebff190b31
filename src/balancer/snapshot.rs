//! Building the picker's snapshot from what the endpoints are: a pure step,
//! as grpc-go builds a picker from the ready set. The balancer gathers each
//! endpoint's state, readiness and ejection, and applies what this returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::zones::{self, Decision, Group, Placed};
use crate::picker::{SlowStart, Snapshot};

/// One endpoint, as the snapshot sees it.
#[derive(Debug, Clone)]
pub(crate) struct Seen<T> {
    pub(crate) addr: SocketAddr,
    /// SERVING, as its health says.
    pub(crate) serving: bool,
    /// Its state's label, for the summary: "SERVING", "connect refused"...
    pub(crate) label: String,
    /// Its state's metric label: serving, not_serving, connecting or
    /// transient_failure.
    pub(crate) metric: &'static str,
    /// When its state began.
    pub(crate) since: Instant,
    /// What calls go to, when it can take one now (connected, no GOAWAY).
    pub(crate) ready: Option<T>,
    /// Ejected as an outlier.
    pub(crate) ejected: bool,
    /// Its zone and zone hints, from its source.
    pub(crate) placed: Placed,
}

/// What the balancer publishes.
#[derive(Debug)]
pub(crate) struct Built<T> {
    pub(crate) snapshot: Snapshot<T>,
    /// The endpoints in the snapshot, in address order.
    pub(crate) in_rotation: Vec<SocketAddr>,
    /// The SERVING endpoints tower's balancers get (`Discover`), in address
    /// order: the ones in rotation, and those not yet connected.
    pub(crate) serving: Vec<SocketAddr>,
    /// Endpoints per metric label, in the metric's order.
    pub(crate) states: [(&'static str, usize); 4],
    /// SERVING endpoints ejected.
    pub(crate) ejected: usize,
    /// Every SERVING endpoint is ejected, and calls go to them anyway.
    pub(crate) panic: bool,
    /// When the last slow-start ramp ends, if one runs.
    pub(crate) ramp_end: Option<Instant>,
    /// What zone-aware routing chose.
    pub(crate) zones: Decision,
    /// The share of calls that lands in the client's zone; `None` without
    /// a client zone.
    pub(crate) local_share: Option<f64>,
}

/// The endpoints calls may go to, kept apart for the ejected ones.
struct Rotation<T> {
    ready: Vec<T>,
    since: Vec<Instant>,
    placed: Vec<Placed>,
    in_rotation: Vec<SocketAddr>,
    serving: Vec<SocketAddr>,
}

impl<T> Default for Rotation<T> {
    fn default() -> Self {
        Self {
            ready: Vec::new(),
            since: Vec::new(),
            placed: Vec::new(),
            in_rotation: Vec::new(),
            serving: Vec::new(),
        }
    }
}

/// The snapshot of `endpoints` (in address order) at `now`: the SERVING
/// ones that can take a call, without the ejected ones unless no other is
/// left (panic mode, Envoy's threshold at 0 %). With slow start, each
/// endpoint's start is kept while any ramps. With a client `zone`, zone
/// routing (`zones.rs`) orders and groups them. `note` ends the summary.
pub(crate) fn build<T>(
    endpoints: impl IntoIterator<Item = Seen<T>>,
    slow_start: Option<SlowStart>,
    zone: Option<&str>,
    note: Option<&str>,
    now: Instant,
) -> Built<T> {
    let window = slow_start.map_or(Duration::ZERO, |r| r.window);
    let mut states = [
        ("serving", 0),
        ("not_serving", 0),
        ("connecting", 0),
        ("transient_failure", 0),
    ];
    let (mut kept, mut ejected) = (Rotation::default(), Rotation::default());
    let mut labels = Vec::new();
    let mut ramp_end: Option<Instant> = None;
    let mut spanned: Vec<Arc<str>> = Vec::new();
    for seen in endpoints {
        if let Some(z) = &seen.placed.zone
            && !spanned.contains(z)
        {
            spanned.push(z.clone());
        }
        if let Some(slot) = states.iter_mut().find(|(s, _)| *s == seen.metric) {
            slot.1 += 1;
        }
        if seen.serving {
            let rotation = if seen.ejected {
                &mut ejected
            } else {
                &mut kept
            };
            if let Some(ready) = seen.ready {
                rotation.ready.push(ready);
                rotation.in_rotation.push(seen.addr);
                rotation.since.push(seen.since);
                rotation.placed.push(seen.placed.clone());
                if slow_start.is_some() && now.saturating_duration_since(seen.since) < window {
                    // Saturating: a window of Duration::MAX ramps "forever".
                    let end = seen.since + crate::deadline::capped(window);
                    ramp_end = Some(ramp_end.map_or(end, |e| e.max(end)));
                }
            }
            rotation.serving.push(seen.addr);
        }
        labels.push(match seen.ejected && seen.serving {
            true => "SERVING but ejected".to_owned(),
            false => seen.label,
        });
    }
    let ejected_count = ejected.serving.len();
    let panic = kept.ready.is_empty() && !ejected.ready.is_empty();
    let mut rotation = if panic { ejected } else { kept };
    // Panic mode spreads over every endpoint, zones or not.
    let route = zones::route(
        zone.filter(|_| !panic),
        &rotation.placed,
        spanned.iter().map(|z| &**z),
    );
    let local_share = match panic {
        true => zone.map(|z| zones::share_in(z, &rotation.placed, 0..rotation.placed.len())),
        false => route.local_share,
    };
    let groups = if route.groups.is_empty() {
        Vec::new()
    } else {
        rotation = reorder(rotation, &route.order, &route.groups);
        route.groups
    };
    if ramp_end.is_none() {
        rotation.since.clear();
    }
    let by_state = Snapshot::summarize(labels.iter().map(String::as_str), None);
    Built {
        snapshot: Snapshot {
            ready: rotation.ready,
            since: rotation.since,
            groups,
            note_at: by_state.len(),
            summary: match note {
                Some(note) => format!("{by_state} ({note})"),
                None => by_state,
            },
            failing: None,
            settled: false,
            generation: 0,
        },
        in_rotation: rotation.in_rotation,
        serving: rotation.serving,
        states,
        ejected: ejected_count,
        panic,
        ramp_end,
        zones: route.decision,
        local_share,
    }
}

/// `rotation` in zone routing's `order`; in rotation are only the
/// endpoints of a group with a share.
fn reorder<T>(mut rotation: Rotation<T>, order: &[usize], groups: &[Group]) -> Rotation<T> {
    let mut ready: Vec<Option<T>> = rotation.ready.into_iter().map(Some).collect();
    let since = &rotation.since;
    let in_groups = groups.last().map_or(0, |g| g.end);
    let mut in_rotation: Vec<SocketAddr> = order[..in_groups]
        .iter()
        .map(|&i| rotation.in_rotation[i])
        .collect();
    in_rotation.sort_unstable();
    Rotation {
        ready: order.iter().filter_map(|&i| ready[i].take()).collect(),
        since: order
            .iter()
            .filter_map(|&i| since.get(i).copied())
            .collect(),
        placed: Vec::new(),
        in_rotation,
        serving: std::mem::take(&mut rotation.serving),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 50051))
    }

    /// A SERVING endpoint that can take calls, its state `age` old.
    fn serving(n: u8, now: Instant, age: Duration) -> Seen<u8> {
        Seen {
            addr: addr(n),
            serving: true,
            label: "SERVING".to_owned(),
            metric: "serving",
            since: now - age,
            ready: Some(n),
            ejected: false,
            placed: Placed::default(),
        }
    }

    #[test]
    fn ejected_and_not_serving_endpoints_are_left_out() {
        let now = Instant::now();
        let old = Duration::from_secs(60);
        let mut ejected = serving(2, now, old);
        ejected.ejected = true;
        let down = Seen {
            serving: false,
            label: "NOT_SERVING".to_owned(),
            metric: "not_serving",
            ready: None,
            ..serving(3, now, old)
        };
        let connecting = Seen {
            ready: None,
            ..serving(4, now, old)
        };
        let built = build(
            [serving(1, now, old), ejected, down, connecting],
            None,
            None,
            None,
            now,
        );
        assert_eq!(built.snapshot.ready, [1]);
        assert_eq!(built.in_rotation, [addr(1)]);
        assert_eq!(
            built.serving,
            [addr(1), addr(4)],
            "SERVING, if not yet connected"
        );
        assert_eq!((built.ejected, built.panic), (1, false));
        assert_eq!(
            built.snapshot.summary,
            "4 endpoints: 2 SERVING, 1 NOT_SERVING, 1 SERVING but ejected"
        );
        assert_eq!(built.states[0], ("serving", 3));
        assert_eq!(built.states[1], ("not_serving", 1));
    }

    #[test]
    fn with_every_serving_endpoint_ejected_calls_go_to_them() {
        let now = Instant::now();
        let old = Duration::from_secs(60);
        let endpoints = (1..=3).map(|n| Seen {
            ejected: true,
            ..serving(n, now, old)
        });
        let built = build(endpoints, None, None, None, now);
        assert!(built.panic);
        assert_eq!(built.snapshot.ready, [1, 2, 3]);
        assert_eq!(built.in_rotation.len(), 3);
        assert_eq!(built.ejected, 3);
    }

    #[test]
    fn a_ramp_keeps_every_start_until_the_last_one_ends() {
        let now = Instant::now();
        let ramp = SlowStart::new(Duration::from_secs(30));
        let endpoints = [
            serving(1, now, Duration::from_secs(60)),
            serving(2, now, Duration::from_secs(10)),
        ];
        let built = build(endpoints.clone(), Some(ramp), None, None, now);
        assert_eq!(built.snapshot.since.len(), 2);
        assert_eq!(built.ramp_end, Some(now + Duration::from_secs(20)));
        // Past every window: nothing ramps, and no start is kept.
        let later = now + Duration::from_secs(25);
        let built = build(endpoints, Some(ramp), None, None, later);
        assert!(built.snapshot.since.is_empty());
        assert_eq!(built.ramp_end, None);
        // A window of Duration::MAX saturates rather than overflow.
        let forever = SlowStart::new(Duration::MAX);
        let built = build(
            [serving(1, now, Duration::ZERO)],
            Some(forever),
            None,
            None,
            now,
        );
        assert!(built.ramp_end.is_some_and(|end| end > now));
    }

    #[test]
    fn the_summary_notes_why_there_is_nothing() {
        let built = build(
            Vec::<Seen<u8>>::new(),
            None,
            None,
            Some("the resolver found no address"),
            Instant::now(),
        );
        assert_eq!(
            built.snapshot.summary,
            "0 endpoints (the resolver found no address)"
        );
        assert!(built.snapshot.ready.is_empty());
    }
}
