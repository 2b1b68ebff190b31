//! From a Service's EndpointSlices to endpoints, as kube-proxy reads them:
//! a pure step.
//!
//! - `ready` endpoints get calls. When none is ready, the ones `serving`
//!   and `terminating` do, so a Service whose pods are all shutting down
//!   still answers while they drain. A terminating endpoint gets no new
//!   call while a ready one exists; leaving the set drains its calls.
//! - Unset conditions read as the API says: `ready` unset is ready,
//!   `serving` unset is `ready`, `terminating` unset is not terminating.
//! - A numbered port is used as written; a named port takes each slice's
//!   number for that name, and a slice without it is skipped.
//! - IPv4 and IPv6 slices are read; FQDN slices have no address to call.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};

use crate::resolve::Endpoint;
use crate::target::ServicePort;

/// What the slices say, and what was left out, for logs.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Read {
    pub(crate) endpoints: Vec<Endpoint>,
    /// Addresses that don't parse, or slices of an unknown type.
    pub(crate) skipped: usize,
    /// Endpoints left out for being terminating while others are ready.
    pub(crate) terminating: usize,
}

/// The endpoints of `slices` on `port`.
pub(crate) fn endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &ServicePort,
) -> Read {
    let mut ready = Vec::new();
    let mut draining = Vec::new();
    let mut skipped = 0;
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            skipped += slice.endpoints.len();
            continue;
        }
        let Some(number) = port_of(slice, port) else {
            continue;
        };
        for e in &slice.endpoints {
            let conditions = e.conditions.clone().unwrap_or_default();
            let is_ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(is_ready);
            let terminating = conditions.terminating.unwrap_or(false);
            let into = if is_ready && !terminating {
                &mut ready
            } else if serving && terminating {
                &mut draining
            } else {
                continue;
            };
            for address in &e.addresses {
                match address.parse::<IpAddr>() {
                    Ok(ip) => into.push(endpoint(SocketAddr::new(ip, number), e)),
                    Err(_) => skipped += 1,
                }
            }
        }
    }
    if ready.is_empty() {
        Read {
            endpoints: draining,
            skipped,
            terminating: 0,
        }
    } else {
        Read {
            endpoints: ready,
            skipped,
            terminating: draining.len(),
        }
    }
}

/// The port number `port` names in `slice`.
fn port_of(slice: &EndpointSlice, port: &ServicePort) -> Option<u16> {
    match port {
        ServicePort::Number(n) => Some(*n),
        ServicePort::Name(name) => slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.port?).ok())
            .filter(|n| *n != 0),
    }
}

fn endpoint(addr: SocketAddr, e: &SliceEndpoint) -> Endpoint {
    let mut endpoint = Endpoint::new(addr);
    if let Some(name) = e.target_ref.as_ref().and_then(|r| r.name.as_deref()) {
        // The pod's name is its place on a hash ring: a StatefulSet pod
        // that comes back on a new IP keeps its keys.
        endpoint = endpoint.with_hostname(name).with_hash_key(name);
    }
    if let Some(zone) = &e.zone {
        endpoint = endpoint.with_zone(zone.as_str());
    }
    if let Some(zones) = e.hints.as_ref().and_then(|h| h.for_zones.as_ref()) {
        endpoint = endpoint.with_zone_hints(zones.iter().map(|z| z.name.as_str()));
    }
    endpoint
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};

    fn ep(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            zone: Some("a".to_owned()),
            ..Default::default()
        }
    }

    fn slice(endpoints: Vec<SliceEndpoint>, port: Option<(&str, i32)>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".to_owned(),
            endpoints,
            ports: port.map(|(name, n)| {
                vec![EndpointPort {
                    name: Some(name.to_owned()),
                    port: Some(n),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }
    }

    fn addrs(read: &Read) -> Vec<String> {
        read.endpoints
            .iter()
            .map(|e| e.addr().to_string())
            .collect()
    }

    #[test]
    fn ready_endpoints_get_calls_and_terminating_ones_only_when_none_is() {
        let port = ServicePort::Number(50051);
        let s = slice(
            vec![
                ep("10.0.0.1", Some(true), Some(true), Some(false)),
                ep("10.0.0.2", Some(false), Some(true), Some(true)),
                ep("10.0.0.3", Some(false), Some(false), Some(false)),
                ep("10.0.0.4", None, None, None),
            ],
            None,
        );
        let read = endpoints([&s], &port);
        assert_eq!(addrs(&read), ["10.0.0.1:50051", "10.0.0.4:50051"]);
        assert_eq!(read.terminating, 1);
        assert_eq!(read.endpoints[0].zone(), Some("a"));

        // None ready: the serving, terminating ones drain the calls.
        let s = slice(
            vec![
                ep("10.0.0.2", Some(false), Some(true), Some(true)),
                ep("10.0.0.3", Some(false), Some(false), Some(true)),
            ],
            None,
        );
        assert_eq!(addrs(&endpoints([&s], &port)), ["10.0.0.2:50051"]);
    }

    #[test]
    fn a_named_port_takes_each_slices_number() {
        let port = ServicePort::Name("grpc".to_owned());
        let a = slice(
            vec![ep("10.0.0.1", None, None, None)],
            Some(("grpc", 50051)),
        );
        let b = slice(
            vec![ep("10.0.0.2", None, None, None)],
            Some(("grpc", 50052)),
        );
        let other = slice(vec![ep("10.0.0.3", None, None, None)], Some(("http", 80)));
        let read = endpoints([&a, &b, &other], &port);
        assert_eq!(addrs(&read), ["10.0.0.1:50051", "10.0.0.2:50052"]);
    }

    #[test]
    fn garbage_addresses_and_fqdn_slices_are_skipped() {
        let port = ServicePort::Number(80);
        let mut fqdn = slice(vec![ep("pod.example.com", None, None, None)], None);
        fqdn.address_type = "FQDN".to_owned();
        let bad = slice(vec![ep("not an ip", None, None, None)], None);
        let read = endpoints([&fqdn, &bad], &port);
        assert!(read.endpoints.is_empty());
        assert_eq!(read.skipped, 2);
    }
}
