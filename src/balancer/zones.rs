//! Zone-aware routing, a pure step: which of the endpoints in rotation a
//! client in `zone` calls, and with what share each group.
//!
//! - When every endpoint carries `hints.forZones`, as kube-proxy does: the
//!   endpoints hinted for the client's zone, or all if none is.
//! - Otherwise Envoy's zone-aware routing, with clients assumed spread
//!   evenly over the zones: a zone with at least its share of the ready
//!   endpoints keeps its calls; one with less keeps `local / share` of
//!   them and spills the rest to the zones with room, in proportion to the
//!   room they have, so a zone that lost pods doesn't overload the few it
//!   has left. A zone with no ready endpoint spills all. As Envoy's, it is
//!   off below [`MIN_CLUSTER_SIZE`] ready endpoints, where one zone's few
//!   would take a whole zone's calls, and in panic mode (the caller's).

use std::fmt;
use std::sync::Arc;

pub(crate) use crate::picker::Group;

/// The fewest ready endpoints that spill-over routing runs with: 6, Envoy's
/// `min_cluster_size`.
pub(crate) const MIN_CLUSTER_SIZE: usize = 6;

/// One endpoint in rotation, as zone routing sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Placed {
    pub(crate) zone: Option<Arc<str>>,
    pub(crate) hints: Option<Arc<[Arc<str>]>>,
}

/// What zone routing chose, for status, metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// No client zone, or no endpoint with a zone: every endpoint alike.
    Off,
    /// Hints: only the endpoints hinted for this zone.
    Hints,
    /// Hints, but none for this zone: every endpoint.
    HintsMissing,
    /// The zone has its share of endpoints: all calls stay in it.
    Local,
    /// The zone has too few: this share stays, the rest spills.
    Spill { local: f64 },
    /// The zone has no ready endpoint: all calls spill.
    NoLocal,
}

impl Decision {
    /// The share of calls spill-over routing keeps in the client's zone;
    /// `None` where it doesn't route.
    fn kept(&self) -> Option<f64> {
        match self {
            Decision::Off | Decision::HintsMissing | Decision::Hints => None,
            Decision::Local => Some(1.0),
            Decision::Spill { local } => Some(*local),
            Decision::NoLocal => Some(0.0),
        }
    }
}

/// The share of calls that lands in `client`'s zone when they spread
/// evenly over `ready[i]` for each `i` of `among`: what the client's zone
/// really gets while routing is off, under hints, or in panic mode. 0 when
/// there is nothing to call.
pub(crate) fn share_in(
    client: &str,
    ready: &[Placed],
    among: impl ExactSizeIterator<Item = usize>,
) -> f64 {
    let n = among.len();
    let local = among
        .filter(|&i| ready[i].zone.as_deref() == Some(client))
        .count();
    match n {
        0 => 0.0,
        n => local as f64 / n as f64,
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Off => f.write_str("off"),
            Decision::Hints => f.write_str("hints for this zone"),
            Decision::HintsMissing => f.write_str("no hint for this zone: every endpoint"),
            Decision::Local => f.write_str("all in zone"),
            Decision::Spill { local } => {
                write!(f, "{:.0} % in zone, the rest spills", local * 100.0)
            }
            Decision::NoLocal => f.write_str("no endpoint in zone: all spill"),
        }
    }
}

/// The route: `order` lists the indexes of `ready` as the snapshot keeps
/// them, grouped; `groups` is empty when one group holds all.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Route {
    pub(crate) order: Vec<usize>,
    pub(crate) groups: Vec<Group>,
    pub(crate) decision: Decision,
    /// The share of calls that lands in the client's zone, whatever the
    /// decision; `None` without a client zone.
    pub(crate) local_share: Option<f64>,
}

impl Route {
    /// Every endpoint alike: the client's zone gets its endpoints' share.
    fn all(client: Option<&str>, ready: &[Placed], decision: Decision) -> Self {
        Self {
            order: (0..ready.len()).collect(),
            groups: Vec::new(),
            decision,
            local_share: client.map(|c| share_in(c, ready, 0..ready.len())),
        }
    }
}

/// Routes a client in `client` over `ready`; `zones` counts the zones the
/// service spans (every endpoint's, ready or not).
pub(crate) fn route<'a>(
    client: Option<&str>,
    ready: &[Placed],
    zones: impl IntoIterator<Item = &'a str>,
) -> Route {
    let Some(client) = client else {
        return Route::all(None, ready, Decision::Off);
    };
    if !ready.is_empty()
        && ready
            .iter()
            .all(|p| p.hints.as_ref().is_some_and(|h| !h.is_empty()))
    {
        let hinted: Vec<usize> = (0..ready.len())
            .filter(|&i| {
                let hints = ready[i].hints.as_deref().unwrap_or_default();
                hints.iter().any(|z| &**z == client)
            })
            .collect();
        if hinted.is_empty() {
            return Route::all(Some(client), ready, Decision::HintsMissing);
        }
        let n = hinted.len();
        let local_share = Some(share_in(client, ready, hinted.iter().copied()));
        return Route {
            local_share,
            order: hinted,
            groups: vec![Group {
                start: 0,
                end: n,
                upto: 1.0,
            }],
            decision: Decision::Hints,
        };
    }
    if ready.len() < MIN_CLUSTER_SIZE || ready.iter().all(|p| p.zone.is_none()) {
        return Route::all(Some(client), ready, Decision::Off);
    }
    // The zones of the ready endpoints, in order of first appearance.
    let zone_of = |p: &Placed| p.zone.as_deref().unwrap_or("").to_owned();
    let mut names: Vec<String> = Vec::new();
    for p in ready {
        let z = zone_of(p);
        if !names.contains(&z) {
            names.push(z);
        }
    }
    let mut spanned: Vec<String> = zones.into_iter().map(str::to_owned).collect();
    spanned.extend(names.iter().cloned());
    spanned.push(client.to_owned());
    spanned.sort();
    spanned.dedup();
    let share = 1.0 / spanned.len() as f64;
    let total = ready.len() as f64;
    let count = |z: &str| ready.iter().filter(|p| zone_of(p) == z).count();
    let local = count(client);
    let local_pct = local as f64 / total;
    let decision = if local == 0 {
        Decision::NoLocal
    } else if local_pct >= share {
        Decision::Local
    } else {
        Decision::Spill {
            local: local_pct / share,
        }
    };
    // Local first, then the others; each zone one run.
    names.sort_by_key(|z| (z != client, z.clone()));
    let stay = decision.kept().unwrap_or(1.0);
    let others: Vec<&String> = names.iter().filter(|z| *z != client).collect();
    let room = |z: &str| (count(z) as f64 / total - share).max(0.0);
    let room_total: f64 = others.iter().map(|z| room(z)).sum();
    let mut order = Vec::with_capacity(ready.len());
    let mut groups = Vec::new();
    let mut upto = 0.0;
    for z in &names {
        let start = order.len();
        order.extend((0..ready.len()).filter(|&i| zone_of(&ready[i]) == **z));
        let part = if z == client {
            stay
        } else if room_total > 0.0 {
            (1.0 - stay) * room(z) / room_total
        } else {
            let other_total: usize = others.iter().map(|z| count(z)).sum();
            (1.0 - stay) * count(z) as f64 / other_total.max(1) as f64
        };
        if part <= 0.0 {
            continue;
        }
        upto += part;
        groups.push(Group {
            start,
            end: order.len(),
            upto,
        });
    }
    // Endpoints of a zone with no share stay out of the order's groups but
    // in `order`, after them, for a retry's look at every endpoint.
    if let Some(last) = groups.last_mut() {
        last.upto = 1.0;
    }
    let mut kept: Vec<usize> = Vec::with_capacity(order.len());
    let mut moved = Vec::with_capacity(groups.len());
    for g in &groups {
        let start = kept.len();
        kept.extend_from_slice(&order[g.start..g.end]);
        moved.push(Group {
            start,
            end: kept.len(),
            upto: g.upto,
        });
    }
    for i in order {
        if !kept.contains(&i) {
            kept.push(i);
        }
    }
    Route {
        order: kept,
        groups: moved,
        local_share: Some(stay),
        decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(zones: &[&str]) -> Vec<Placed> {
        zones
            .iter()
            .map(|z| Placed {
                zone: Some((*z).into()),
                hints: None,
            })
            .collect()
    }

    /// The share of calls each endpoint gets.
    fn shares(route: &Route, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; n];
        if route.groups.is_empty() {
            return vec![1.0 / n as f64; n];
        }
        let mut below = 0.0;
        for g in &route.groups {
            let size = (g.end - g.start) as f64;
            for &i in &route.order[g.start..g.end] {
                out[i] = (g.upto - below) / size;
            }
            below = g.upto;
        }
        out
    }

    #[test]
    fn without_a_client_zone_or_endpoint_zones_it_is_off() {
        let ready = placed(&["a", "b"]);
        assert_eq!(route(None, &ready, []).decision, Decision::Off);
        let bare = vec![Placed::default(); 3];
        let r = route(Some("a"), &bare, []);
        assert_eq!(r.decision, Decision::Off);
        assert!(r.groups.is_empty());
    }

    #[test]
    fn a_zone_with_its_share_keeps_every_call() {
        let ready = placed(&["a", "a", "a", "b", "b", "b", "c", "c", "c"]);
        let r = route(Some("b"), &ready, []);
        assert_eq!(r.decision, Decision::Local);
        let s = shares(&r, 9);
        assert_eq!(&s[3..6], &[1.0 / 3.0; 3]);
        assert!(s[..3].iter().chain(&s[6..]).all(|&x| x == 0.0));
    }

    #[test]
    fn a_zone_short_of_pods_spills_and_no_pod_is_overloaded() {
        // Zone a down to 1 of 3: each zone's client sends a third of the
        // calls; no pod gets above 1.5 x the mean.
        let ready = placed(&["a", "b", "b", "b", "c", "c", "c"]);
        let mut load = [0.0; 7];
        for client in ["a", "b", "c"] {
            let r = route(Some(client), &ready, ["a", "b", "c"]);
            for (i, s) in shares(&r, 7).iter().enumerate() {
                load[i] += s / 3.0;
            }
        }
        let mean = 1.0 / 7.0;
        assert!(load.iter().all(|&l| l <= 1.5 * mean), "{load:?}");
        let r = route(Some("a"), &ready, []);
        let Decision::Spill { local } = r.decision else {
            panic!("{:?}", r.decision)
        };
        assert!((local - 3.0 / 7.0).abs() < 1e-9, "{local}");
    }

    #[test]
    fn a_zone_without_pods_spills_everything() {
        let ready = placed(&["b", "b", "b", "c", "c", "c"]);
        let r = route(Some("a"), &ready, ["a", "b", "c"]);
        assert_eq!(r.decision, Decision::NoLocal);
        let s = shares(&r, 6);
        assert!(s.iter().all(|&x| (x - 1.0 / 6.0).abs() < 1e-9), "{s:?}");
        // Below Envoy's min_cluster_size, off.
        let few = placed(&["b", "b", "c", "c"]);
        assert_eq!(route(Some("a"), &few, []).decision, Decision::Off);
    }

    #[test]
    fn hints_say_exactly_where_calls_go() {
        let hinted = |zone: &str, hints: &[&str]| Placed {
            zone: Some(zone.into()),
            hints: Some(hints.iter().map(|h| Arc::from(*h)).collect()),
        };
        let ready = vec![
            hinted("a", &["a"]),
            hinted("a", &["b"]),
            hinted("b", &["b"]),
            hinted("c", &["c"]),
        ];
        let r = route(Some("b"), &ready, []);
        assert_eq!(r.decision, Decision::Hints);
        assert_eq!(&r.order[..2], &[1, 2]);
        assert_eq!(
            r.groups,
            vec![Group {
                start: 0,
                end: 2,
                upto: 1.0
            }]
        );
        // No hint for the zone: every endpoint, as kube-proxy falls back.
        let r = route(Some("d"), &ready, []);
        assert_eq!(r.decision, Decision::HintsMissing);
        assert!(r.groups.is_empty());
        // Hints on some endpoints only: ignored, as kube-proxy does.
        let mut partial = ready.clone();
        partial[3].hints = None;
        assert_ne!(route(Some("b"), &partial, []).decision, Decision::Hints);
    }

    #[test]
    fn the_local_share_is_what_the_zone_really_gets_whatever_the_decision() {
        let zones = ["a", "b", "c"];
        // Below six endpoints routing is off: a, b, b spread evenly.
        let r = route(Some("a"), &placed(&["a", "b", "b"]), zones);
        assert_eq!(r.decision, Decision::Off);
        assert!((r.local_share.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // The zone lost its endpoints.
        let r = route(Some("a"), &placed(&["b", "b", "c"]), zones);
        assert_eq!(r.local_share, Some(0.0));
        let r = route(Some("a"), &placed(&["b", "b", "c", "c", "b", "c"]), zones);
        assert_eq!(
            (r.decision.clone(), r.local_share),
            (Decision::NoLocal, Some(0.0))
        );
        // Routing keeps all in zone.
        let r = route(Some("a"), &placed(&["a", "a", "b", "b", "c", "c"]), zones);
        assert_eq!(
            (r.decision.clone(), r.local_share),
            (Decision::Local, Some(1.0))
        );
        // No client zone: no share to speak of; nothing ready: none kept.
        assert_eq!(route(None, &placed(&["a"]), zones).local_share, None);
        assert_eq!(route(Some("a"), &[], zones).local_share, Some(0.0));
    }
}
