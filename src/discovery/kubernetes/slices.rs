//! What a Service's EndpointSlices and pods say: the endpoints to call,
//! each with the identity it must present, its sidecar, and whether
//! topology hints prefer it. Pure conversion of API objects, fuzzed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{ServiceAccount, ServiceRef};
use crate::discovery::{Found, PodIdentity, Sidecar, Workload};

/// The most endpoints taken from one Service: a hostile or broken object
/// cannot make the sidecar hold more.
pub const MAX_ENDPOINTS: usize = 10_000;
/// The sidecar container the injector adds (`kube/`): a pod with it is meshed.
pub const SIDECAR: &str = "protomesh-proxy";
/// The init container that installs the capture rules: with it, connections
/// to the pod's app ports reach its sidecar.
pub const INIT: &str = "protomesh-init";
/// The sidecar container's port that takes mTLS for the app in explicit mode.
const INBOUND_PORT_NAME: &str = "protomesh-in";

/// The Service annotation that names the SPIFFE ID all its endpoints must
/// present, for workloads whose certificates follow another scheme than
/// their service accounts.
pub const EXPECTED_IDENTITY: &str = "protomesh.io/expected-identity";
/// The longest annotation value taken: a SPIFFE ID is at most 2048 bytes.
pub(super) const MAX_IDENTITY_LEN: usize = 2048;

/// What the sidecar reads of a Service.
#[derive(Clone, Debug, Default)]
pub struct ServiceInfo {
    /// The name its port has in the EndpointSlices.
    pub port: String,
    /// The selector of its pods, if it has one.
    pub pods: Option<String>,
    /// What its `protomesh.io/expected-identity` annotation names.
    pub expected: Option<String>,
}

/// What is kept of each pod of a Service: who it runs as and how it takes
/// calls. The rest of the object (often kilobytes) is dropped as it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub account: String,
    pub sidecar: Sidecar,
}

impl PodFacts {
    /// `None` for a pod without a spec, which the API never serves.
    pub fn of(pod: &Pod) -> Option<PodFacts> {
        let spec = pod.spec.as_ref()?;
        // A pod without a service account named runs as `default`.
        let account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
        Some(PodFacts { account, sidecar: sidecar_of(spec) })
    }
}

/// How a pod takes calls from the mesh, read from the containers the
/// injector added.
fn sidecar_of(spec: &k8s_openapi::api::core::v1::PodSpec) -> Sidecar {
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    let Some(sidecar) = containers.clone().find(|c| c.name == SIDECAR) else { return Sidecar::None };
    if containers.clone().any(|c| c.name == INIT) {
        return Sidecar::Captured;
    }
    let ports = sidecar.ports.iter().flatten();
    let inbound = ports
        .filter(|p| p.name.as_deref() == Some(INBOUND_PORT_NAME))
        .find_map(|p| u16::try_from(p.container_port).ok());
    match inbound {
        Some(port) => Sidecar::Listening(port),
        None => Sidecar::None,
    }
}

/// The ready endpoints of `slices` at the Service port that `info` names,
/// each with the identity it must present (its pod's service account, or
/// the Service's expected identity) and its sidecar when `pods` knows the
/// pod, sorted, at most [`MAX_ENDPOINTS`]. Where every one has topology
/// hints (`hints.forZones`), those hinted for `zone` are marked to be
/// preferred, as kube-proxy does; otherwise none is.
pub fn ready_endpoints<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    pods: &BTreeMap<String, PodFacts>,
    info: &ServiceInfo,
    service: &ServiceRef,
    zone: Option<&str>,
) -> Vec<Found> {
    let port = info.port.as_str();
    let mut endpoints = Vec::new();
    let mut all_hinted = true;
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let ports = slice.ports.iter().flatten();
        let Some(number) = ports.filter(|p| p.name.as_deref().unwrap_or("") == port).find_map(|p| p.port) else {
            continue;
        };
        let Ok(number) = u16::try_from(number) else { continue };
        for endpoint in &slice.endpoints {
            // An unknown readiness is ready, as the API says.
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            // Every address of an endpoint is the same pod: the first will do.
            let address = endpoint.addresses.first().and_then(|a| a.parse::<IpAddr>().ok());
            let (true, Some(address)) = (ready, address) else { continue };
            let pod = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod"));
            let pod = pod.and_then(|r| Some((r.name.as_deref()?, pods.get(r.name.as_deref()?)?)));
            let workload = match pod {
                Some((name, pod)) => Workload::Pod {
                    name: name.to_string(),
                    identity: match &info.expected {
                        Some(id) => PodIdentity::Named(id.clone()),
                        None => PodIdentity::Account(ServiceAccount {
                            namespace: service.namespace.clone(),
                            name: pod.account.clone(),
                        }),
                    },
                    sidecar: pod.sidecar,
                },
                None => Workload::PodNotKnown,
            };
            let zones = endpoint.hints.as_ref().and_then(|hints| hints.for_zones.as_ref());
            all_hinted &= zones.is_some();
            let in_zone = zones.is_some_and(|zones| zones.iter().any(|hinted| Some(hinted.name.as_str()) == zone));
            endpoints.push(Found { addr: SocketAddr::new(address, number), workload, in_zone });
        }
    }
    if !all_hinted {
        endpoints.iter_mut().for_each(|found| found.in_zone = false);
    }
    endpoints.sort();
    endpoints.dedup();
    if endpoints.len() > MAX_ENDPOINTS {
        tracing::warn!(%service, found = endpoints.len(), kept = MAX_ENDPOINTS, "too many endpoints; the rest are ignored");
        endpoints.truncate(MAX_ENDPOINTS);
    }
    endpoints
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ObjectReference, PodSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn named(port: &str) -> ServiceInfo {
        ServiceInfo { port: port.into(), ..Default::default() }
    }
    fn slice(port: Option<&str>, number: i32, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort { name: port.map(Into::into), port: Some(number), ..Default::default() }]),
            endpoints: endpoints
                .iter()
                .map(|(address, ready)| Endpoint {
                    addresses: vec![address.to_string()],
                    conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(format!("pod-{address}")),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_at_the_named_port_are_taken_and_the_rest_left() {
        let service = ServiceRef::parse("k8s://echo.test:grpc").unwrap();
        let slices = [
            slice(Some("grpc"), 8080, &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(false)), ("10.0.0.3", None)]),
            slice(Some("grpc"), 9090, &[("10.0.0.4", Some(true)), ("not an address", Some(true))]),
            slice(Some("metrics"), 9100, &[("10.0.0.5", Some(true))]),
            slice(None, 7000, &[("10.0.0.6", Some(true))]),
        ];
        // Pods known for two of the endpoints: one names its account, one runs as `default`.
        let pod = |name: &str, account: Option<&str>| {
            let spec = PodSpec { service_account_name: account.map(Into::into), ..Default::default() };
            (name.to_string(), PodFacts::of(&Pod { spec: Some(spec), ..Default::default() }).unwrap())
        };
        let pods = BTreeMap::from([pod("pod-10.0.0.1", Some("cart")), pod("pod-10.0.0.4", None)]);
        let endpoints = ready_endpoints(slices.iter(), &pods, &named("grpc"), &service, None);
        let pod = |pod: &str, name: &str| Workload::Pod {
            name: pod.into(),
            identity: PodIdentity::Account(ServiceAccount { namespace: "test".into(), name: name.into() }),
            sidecar: Sidecar::None,
        };
        let expected = vec![
            Found { addr: "10.0.0.1:8080".parse().unwrap(), workload: pod("pod-10.0.0.1", "cart"), in_zone: false },
            Found { addr: "10.0.0.3:8080".parse().unwrap(), workload: Workload::PodNotKnown, in_zone: false },
            Found { addr: "10.0.0.4:9090".parse().unwrap(), workload: pod("pod-10.0.0.4", "default"), in_zone: false },
        ];
        assert_eq!(endpoints, expected, "a pod not known has no account");
        let unnamed = ready_endpoints(slices.iter(), &pods, &named(""), &service, None);
        let addrs: Vec<SocketAddr> = unnamed.iter().map(|found| found.addr).collect();
        assert_eq!(
            addrs,
            vec!["10.0.0.6:7000".parse::<SocketAddr>().unwrap()],
            "a one-port Service's port has no name"
        );
    }

    #[test]
    fn endpoints_hinted_for_this_zone_are_marked_only_when_every_endpoint_has_hints() {
        use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
        let service = ServiceRef::parse("k8s://echo.test:grpc").unwrap();
        let hinted = |mut slice: EndpointSlice, zones: &[Option<&str>]| {
            for (endpoint, zone) in slice.endpoints.iter_mut().zip(zones) {
                endpoint.hints = zone.map(|zone| EndpointHints {
                    for_zones: Some(vec![ForZone { name: zone.into() }]),
                    ..Default::default()
                });
            }
            slice
        };
        let two = || slice(Some("grpc"), 80, &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(true))]);
        let in_zone = |slices: &[EndpointSlice], zone| {
            let found = ready_endpoints(slices.iter(), &BTreeMap::new(), &named("grpc"), &service, zone);
            found.iter().map(|found| found.in_zone).collect::<Vec<_>>()
        };
        let all = [hinted(two(), &[Some("a"), Some("b")])];
        assert_eq!(in_zone(&all, Some("a")), [true, false]);
        assert_eq!(in_zone(&all, Some("c")), [false, false], "none for this zone: no preference");
        assert_eq!(in_zone(&all, None), [false, false], "a pod whose zone is not known prefers none");
        let some = [hinted(two(), &[Some("a"), None])];
        assert_eq!(in_zone(&some, Some("a")), [false, false], "hints on some endpoints only are not followed");
    }

    #[test]
    fn a_pod_is_meshed_when_it_has_the_sidecar_and_captured_when_it_has_the_init_container() {
        use k8s_openapi::api::core::v1::{Container, ContainerPort};
        let container = |name: &str, port: Option<i32>| Container {
            name: name.into(),
            ports: port.map(|port| {
                vec![ContainerPort { name: Some("protomesh-in".into()), container_port: port, ..Default::default() }]
            }),
            ..Default::default()
        };
        let spec = |containers: Vec<Container>, init: Vec<Container>| PodSpec {
            containers,
            init_containers: Some(init),
            ..Default::default()
        };
        let app = || container("app", None);
        assert_eq!(sidecar_of(&spec(vec![app()], vec![])), Sidecar::None);
        let captured = spec(vec![app(), container(SIDECAR, Some(4143))], vec![container(INIT, None)]);
        assert_eq!(sidecar_of(&captured), Sidecar::Captured);
        // A native sidecar is an init container too.
        let native = spec(vec![app()], vec![container(INIT, None), container(SIDECAR, Some(4143))]);
        assert_eq!(sidecar_of(&native), Sidecar::Captured);
        let explicit = spec(vec![app(), container(SIDECAR, Some(4143))], vec![]);
        assert_eq!(sidecar_of(&explicit), Sidecar::Listening(4143));
        let outbound_only = spec(vec![app(), container(SIDECAR, None)], vec![]);
        assert_eq!(sidecar_of(&outbound_only), Sidecar::None, "no inbound: its app is called as it is");
    }

    #[test]
    fn a_service_with_too_many_endpoints_is_cut_to_the_bound() {
        let service = ServiceRef::parse("k8s://big.test:grpc").unwrap();
        let addresses: Vec<String> =
            (0..MAX_ENDPOINTS + 10).map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)).collect();
        let endpoints: Vec<(&str, Option<bool>)> = addresses.iter().map(|a| (a.as_str(), Some(true))).collect();
        let slices = [slice(Some("grpc"), 80, &endpoints)];
        assert_eq!(
            ready_endpoints(slices.iter(), &BTreeMap::new(), &named("grpc"), &service, None).len(),
            MAX_ENDPOINTS
        );
    }
}
