//! A captured destination that is a pod's own address, as a headless
//! Service's DNS or a StatefulSet's peer names give it: the app chose the
//! pod, so its calls go to that pod, which must present its own service
//! account's identity. The pod is found by the API server's `status.podIP`
//! field selector: first in this pod's namespace (which the
//! protomesh-discovery grant covers there), then in every namespace where
//! protomesh-pod-lookup is granted (reading every pod's spec is a wider
//! grant than most apps need, so it is a ClusterRole of its own, asked for
//! only when the own namespace has no answer). Once found, the pod is
//! watched by name while its address is called; when it is gone, or has
//! another address, the watch ends and the address is looked up again.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

use super::slices::PodFacts;
use super::{
    Cluster, EndpointsSender, Grant, Known, Reconnect, ServiceAccount, WatchTask, Watched, api_error, name_of,
    watch_error,
};
use crate::discovery::{Found, PodIdentity, Workload};

/// A pod, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pod {}/{}", self.namespace, self.name)
    }
}

impl Cluster {
    /// The pod whose address `addr` is, when the API server says so. Pods
    /// that have ended, or share their node's address, are not taken.
    pub async fn pod_at(&self, addr: SocketAddr) -> Result<Option<PodRef>, String> {
        let selected = ListParams::default().fields(&format!("status.podIP={}", addr.ip()));
        let own = Api::<Pod>::namespaced(self.client.clone(), self.client.default_namespace());
        let found = own.list(&selected).await.map_err(|e| {
            let namespace = self.client.default_namespace();
            format!("finding the pod at {addr} in namespace {namespace}: {}", api_error(&e, Grant::Endpoints))
        })?;
        if let Some(pod) = found.items.iter().find(|pod| runs_at(pod, addr)) {
            return Ok(Some(pod_ref(pod)));
        }
        match Api::<Pod>::all(self.client.clone()).list(&selected).await {
            Ok(found) => Ok(found.items.iter().find(|pod| runs_at(pod, addr)).map(pod_ref)),
            Err(kube::Error::Api(status)) if status.code == 403 => {
                if !self.pod_lookup_refused.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "pod addresses outside this pod's namespace are not looked up ({}): calls to them go to \
                         the address; to check such a pod's identity, {}",
                        status.message,
                        Grant::PodLookup.fix()
                    );
                }
                Ok(None)
            }
            Err(error) => Err(format!("finding the pod at {addr}: {}", api_error(&error, Grant::PodLookup))),
        }
    }

    /// Watches `pod` while it is at `addr`: sends it as the one endpoint
    /// there once listed, then at each change; ends (the receiver sees the
    /// sender gone) once the pod is gone or has another address.
    pub fn watch_pod(&self, pod: PodRef, addr: SocketAddr) -> Watched {
        let cluster = self.clone();
        WatchTask::spawn(|mut sender| async move { follow(&cluster, &pod, addr, &mut sender).await })
    }
}

async fn follow(cluster: &Cluster, pod: &PodRef, addr: SocketAddr, sender: &mut EndpointsSender) {
    let client = cluster.client.clone();
    let trouble = cluster.metrics.trouble.slot(pod.to_string());
    let pods = Api::<Pod>::namespaced(client, &pod.namespace);
    let by_name = watcher::Config::default().fields(&format!("metadata.name={}", pod.name));
    let events = watcher::watcher(pods, by_name).backoff(Reconnect::default());
    tokio::pin!(events);
    let mut known = Known::default();
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(event) => {
                trouble.answered();
                known.apply(event, Some)
            }
            Err(error) => {
                let error = watch_error(&error);
                tracing::warn!(%pod, %error, "watching the pod failed; keeping what was known of it");
                trouble.failed(&format!("watching it: {error}"));
                false
            }
        };
        if !changed || !known.listed {
            continue;
        }
        let Some(found) = known.current.get(&pod.name).and_then(|current| endpoint_of(current, addr)) else {
            tracing::info!(%pod, %addr, "the pod is gone from this address");
            return;
        };
        sender.send(vec![found]);
    }
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef { namespace: pod.metadata.namespace.clone().unwrap_or_default(), name: name_of(&pod.metadata) }
}

/// The pod as the endpoint at `addr`: `None` unless the pod has that
/// address of its own and still runs (not ended, not on its node's network).
pub fn endpoint_of(pod: &Pod, addr: SocketAddr) -> Option<Found> {
    if !runs_at(pod, addr) {
        return None;
    }
    let PodFacts { account, sidecar } = PodFacts::of(pod)?;
    let account = ServiceAccount { namespace: pod.metadata.namespace.clone().unwrap_or_default(), name: account };
    let workload = Workload::Pod { name: name_of(&pod.metadata), identity: PodIdentity::Account(account), sidecar };
    Some(Found { addr, workload, in_zone: false })
}

/// Whether the pod has `addr`'s IP of its own and still runs.
fn runs_at(pod: &Pod, addr: SocketAddr) -> bool {
    let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else { return false };
    let ip = addr.ip().to_string();
    let mut addresses = status.pod_ips.iter().flatten().map(|a| &a.ip).chain(status.pod_ip.as_ref());
    let ended = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    !ended && spec.host_network != Some(true) && addresses.any(|a| *a == ip)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::discovery::Sidecar;

    fn pod(ips: &[&str], phase: &str, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta { name: Some("db-0".into()), namespace: Some("shop".into()), ..Default::default() },
            spec: Some(PodSpec {
                service_account_name: Some("db".into()),
                host_network: Some(host_network),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ips.first().map(|ip| ip.to_string()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_running_pod_at_the_address_is_its_endpoint_with_its_service_account() {
        let addr: SocketAddr = "10.1.0.7:5432".parse().unwrap();
        let found = endpoint_of(&pod(&["10.1.0.7"], "Running", false), addr).unwrap();
        let account = ServiceAccount { namespace: "shop".into(), name: "db".into() };
        let expected =
            Workload::Pod { name: "db-0".into(), identity: PodIdentity::Account(account), sidecar: Sidecar::None };
        assert_eq!(found, Found { addr, workload: expected, in_zone: false });
        // Its second address (dual-stack) is its own too.
        let v6: SocketAddr = "[fd00::7]:5432".parse().unwrap();
        assert!(endpoint_of(&pod(&["10.1.0.7", "fd00::7"], "Running", false), v6).is_some());
    }

    #[test]
    fn an_ended_pod_a_pod_on_its_nodes_network_or_at_another_address_is_not() {
        let addr: SocketAddr = "10.1.0.7:5432".parse().unwrap();
        assert_eq!(endpoint_of(&pod(&["10.1.0.7"], "Succeeded", false), addr), None);
        assert_eq!(endpoint_of(&pod(&["10.1.0.7"], "Failed", false), addr), None);
        assert_eq!(endpoint_of(&pod(&["10.1.0.7"], "Running", true), addr), None);
        assert_eq!(endpoint_of(&pod(&["10.1.0.8"], "Running", false), addr), None);
        assert_eq!(endpoint_of(&pod(&[], "Pending", false), addr), None);
        assert_eq!(endpoint_of(&Pod::default(), addr), None);
    }
}
