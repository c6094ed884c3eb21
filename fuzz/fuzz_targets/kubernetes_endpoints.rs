//! An EndpointSlice and a Pod as an API server serves them, or anything in
//! their place: turned into endpoints without panicking, sorted and distinct,
//! and within the bound; the pod alone, as the endpoint at its own address.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use libfuzzer_sys::fuzz_target;
use protomesh::discovery::kubernetes::{
    MAX_ENDPOINTS, PodFacts, ServiceInfo, ServiceRef, endpoint_of, ready_endpoints,
};

fuzz_target!(|data: &[u8]| {
    // The first byte says where the slice's JSON ends and the pod's begins.
    let Some((&split, rest)) = data.split_first() else { return };
    let (slice, pod) = rest.split_at(usize::from(split).min(rest.len()));
    let Ok(slice) = serde_json::from_slice::<EndpointSlice>(slice) else { return };
    let pod = serde_json::from_slice::<Pod>(pod).ok();
    let pods: BTreeMap<String, PodFacts> = pod
        .iter()
        .filter_map(|pod| Some((pod.metadata.name.clone().unwrap_or_default(), PodFacts::of(pod)?)))
        .collect();
    let service = ServiceRef::parse("k8s://fuzz.test:grpc").unwrap();
    for port in ["grpc", ""] {
        let info = ServiceInfo { port: port.into(), ..Default::default() };
        let found = ready_endpoints(std::iter::once(&slice), &pods, &info, &service, Some("zone-a"));
        assert!(found.len() <= MAX_ENDPOINTS);
        assert!(found.windows(2).all(|pair| pair[0] < pair[1]), "sorted and distinct");
    }
    if let Some(pod) = &pod {
        let addr = "10.0.0.1:8080".parse().unwrap();
        if let Some(found) = endpoint_of(pod, addr) {
            assert_eq!(found.addr, addr, "the endpoint is at the address asked about");
        }
    }
});
