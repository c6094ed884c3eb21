//! Endpoints from the Kubernetes API: a Service's ready endpoints, read from
//! its EndpointSlices and watched while an upstream names the Service
//! (`k8s://name.namespace:port`). Only the Services the sidecar calls are
//! watched, each by a label selector in its own namespace, never every
//! EndpointSlice of the cluster; a watch ends with the upstream that needs it.
//! A captured destination's Service is found by its cluster IP; a pod's own
//! address, by `pods.rs`. `slices.rs` turns what the API says into
//! endpoints; `metrics.rs` counts the watches.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::Deserialize;

mod metrics;
mod pods;
mod slices;
mod trouble;
mod watches;

pub use metrics::DiscoveryMetrics;
use metrics::{ServiceLabels, WatchLabels, since_triggered};
pub use pods::{PodRef, endpoint_of};
use slices::MAX_IDENTITY_LEN;
pub use slices::{EXPECTED_IDENTITY, INIT, MAX_ENDPOINTS, PodFacts, SIDECAR, ServiceInfo, ready_endpoints};
pub use trouble::{ApiTrouble, TroubleSlot};
use watches::{EndpointsSender, Known, WatchTask};
pub use watches::{Reconnect, Watched};

/// How an upstream endpoint names a Kubernetes Service.
pub const SCHEME: &str = "k8s://";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The `kubernetes` section of the config, read at start.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Off: `k8s://` endpoints are refused, and the API is never asked.
    #[serde(default = "yes")]
    pub discovery: bool,
    /// A kubeconfig file to reach the API server with; by default the pod's
    /// service account, else `KUBECONFIG` or `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The pod's zone, for topology-aware routing; by default its node's
    /// `topology.kubernetes.io/zone` label, read from the node that
    /// `NODE_NAME` names (the injector sets it).
    #[serde(default)]
    pub zone: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig { discovery: true, kubeconfig: None, zone: None }
    }
}

/// The node label that names its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn yes() -> bool {
    true
}

/// The service account a pod runs as: its workload's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

/// A Service port of a Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
    pub port: ServicePort,
}

/// A Service's port by number (`spec.ports[].port`) or by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl ServiceRef {
    /// `k8s://name.namespace:port`, where the port is the Service port's
    /// number or its name.
    pub fn parse(text: &str) -> Result<ServiceRef, String> {
        let invalid =
            |why: &str| format!("`{text}`: {why}; write k8s://<service>.<namespace>:<port>, e.g. k8s://cart.shop:7070");
        let rest = text.strip_prefix(SCHEME).ok_or_else(|| invalid("not a k8s:// endpoint"))?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
        let (name, namespace) = host.split_once('.').ok_or_else(|| invalid("no namespace"))?;
        for label in [name, namespace] {
            if !is_dns_label(label) {
                return Err(invalid(&format!("`{label}` is not a Kubernetes name (lower-case letters, digits, '-')")));
            }
        }
        let port = match port.parse::<u16>() {
            Ok(0) => return Err(invalid("port 0")),
            Ok(number) => ServicePort::Number(number),
            Err(_) if is_dns_label(port) => ServicePort::Name(port.to_string()),
            Err(_) => return Err(invalid(&format!("`{port}` is neither a port number nor a port name"))),
        };
        Ok(ServiceRef { name: name.into(), namespace: namespace.into(), port })
    }

    fn selector(&self) -> String {
        format!("{SERVICE_NAME_LABEL}={}", self.name)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = match &self.port {
            ServicePort::Number(number) => number.to_string(),
            ServicePort::Name(name) => name.clone(),
        };
        write!(f, "{SCHEME}{}.{}:{port}", self.name, self.namespace)
    }
}

/// An RFC 1123 label, as Kubernetes names Services, namespaces and ports.
fn is_dns_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// The cluster's API server, as a client of it.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    metrics: DiscoveryMetrics,
    /// This pod's zone, when known: endpoints hinted for it are preferred.
    zone: Option<String>,
    /// Whether a pod lookup across namespaces was refused: said once, not per address.
    pod_lookup_refused: Arc<AtomicBool>,
    /// The Services watched now, each once however many upstreams and
    /// captured destinations follow it.
    watches: Arc<Mutex<HashMap<ServiceRef, Weak<WatchTask>>>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cluster")
    }
}

impl Cluster {
    /// The API server, found as every Kubernetes client finds it:
    /// `config.kubeconfig` if set, else the pod's service account, else
    /// `KUBECONFIG` or `~/.kube/config`. `None` when discovery is off or no
    /// API server is found; an error when the named kubeconfig cannot be used.
    pub async fn find(config: &KubernetesConfig, metrics: DiscoveryMetrics) -> Result<Option<Cluster>, String> {
        if !config.discovery {
            return Ok(None);
        }
        let found = match &config.kubeconfig {
            Some(path) => read_kubeconfig(path).await.map_err(|e| format!("kubernetes.kubeconfig: {e}"))?,
            None => match kube::Config::infer().await {
                Ok(found) => found,
                Err(error) => {
                    tracing::info!(%error, "no Kubernetes API server found: k8s:// endpoints are unavailable");
                    return Ok(None);
                }
            },
        };
        tracing::info!(server = %found.cluster_url, "Kubernetes API server found");
        let client = kube::Client::try_from(found).map_err(|e| format!("kubernetes: cannot make a client: {e}"))?;
        let zone = match &config.zone {
            Some(zone) => Some(zone.clone()),
            None => zone_of_node(&client).await,
        };
        Ok(Some(Cluster { client, metrics, zone, pod_lookup_refused: Arc::default(), watches: Arc::default() }))
    }

    /// The Service whose cluster IP and TCP port `addr` is, as a captured
    /// connection to it names it; `None` when the API knows of none. One
    /// request, selected by the API server (`spec.clusterIP`, a Service's
    /// primary cluster IP): nothing of the cluster is watched to answer it.
    pub async fn service_at(&self, addr: SocketAddr) -> Result<Option<ServiceRef>, String> {
        let selected = ListParams::default().fields(&format!("spec.clusterIP={}", addr.ip()));
        let found = Api::<Service>::all(self.client.clone())
            .list(&selected)
            .await
            .map_err(|e| format!("finding the Service at {addr}: {}", api_error(&e, Grant::Lookup)))?;
        let port = i32::from(addr.port());
        let at_port = found.items.into_iter().find(|service| {
            let ports = service.spec.as_ref().and_then(|spec| spec.ports.as_ref());
            ports.is_some_and(|ports| {
                ports.iter().any(|p| p.port == port && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            })
        });
        Ok(at_port.map(|service| ServiceRef {
            name: name_of(&service.metadata),
            namespace: service.metadata.namespace.unwrap_or_default(),
            port: ServicePort::Number(addr.port()),
        }))
    }

    /// Watches the Service's EndpointSlices and pods, sending its ready
    /// endpoints once both are listed, then at each change, until the last
    /// receiver is dropped. The watches reconnect with backoff, and relist
    /// when their history is gone; meanwhile the last endpoints stay. A
    /// Service watched already is not watched twice: its receivers share it.
    pub fn watch(&self, service: ServiceRef) -> Watched {
        let mut watches = self.watches.lock().expect("watches lock");
        if let Some(task) = watches.get(&service).and_then(Weak::upgrade) {
            return task.watched();
        }
        watches.retain(|_, task| task.strong_count() > 0);
        let cluster = self.clone();
        let followed = service.clone();
        let watched = WatchTask::spawn(|mut sender| async move { cluster.follow(&followed, &mut sender).await });
        watches.insert(service, Arc::downgrade(&watched.task));
        watched
    }

    async fn follow(&self, service: &ServiceRef, sender: &mut EndpointsSender) {
        let trouble = self.metrics.trouble.slot(service.to_string());
        let info = loop {
            match self.read_service(service).await {
                Ok(info) => break info,
                Err(error) => {
                    tracing::warn!(%error, "Kubernetes Service not read yet; asking again in 5s");
                    trouble.failed(&error);
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            }
        };
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), &service.namespace);
        let slices = watcher::watcher(slices, watcher::Config::default().labels(&service.selector()))
            .backoff(Reconnect::default())
            .map(|event| Change::Slice(Box::new(event)));
        let pods = match &info.pods {
            Some(selector) => {
                let pods = Api::<Pod>::namespaced(self.client.clone(), &service.namespace);
                let pods = watcher::watcher(pods, watcher::Config::default().labels(selector));
                pods.backoff(Reconnect::default()).map(|event| Change::Pod(Box::new(event))).boxed()
            }
            None => futures_util::stream::pending().boxed(),
        };
        let events = futures_util::stream::select(slices, pods);
        tokio::pin!(events);
        let (mut slices, mut pods) = (Known::default(), Known::default());
        let labels = ServiceLabels { service: format!("{}/{}", service.namespace, service.name) };
        let events_of =
            |kind| self.metrics.events.get_or_create_owned(&WatchLabels { service: labels.service.clone(), kind });
        let (slice_events, pod_events) = (events_of("endpointslices"), events_of("pods"));
        let restarts = self.metrics.restarts.get_or_create_owned(&labels);
        while let Some(change) = events.next().await {
            let failed = |watched: &'static str| {
                let (restarts, trouble) = (&restarts, &trouble);
                move |error: watcher::Error| {
                    let error = watch_error(&error);
                    tracing::warn!(%service, %error, "watching its {watched} failed; keeping the last endpoints");
                    trouble.failed(&format!("watching its {watched}: {error}"));
                    restarts.inc();
                    false
                }
            };
            if change.answered() {
                trouble.answered();
            }
            let from_slices = matches!(change, Change::Slice(_));
            let changed = match change {
                Change::Slice(event) => {
                    slice_events.inc();
                    event.map_or_else(failed("EndpointSlices"), |event| slices.apply(event, Some))
                }
                Change::Pod(event) => {
                    pod_events.inc();
                    event.map_or_else(failed("pods"), |event| pods.apply(event, |pod| PodFacts::of(&pod)))
                }
            };
            // Until both lists are in, endpoints would lack their pods: they are not sent half-known.
            if !changed || !slices.listed || (info.pods.is_some() && !pods.listed) {
                continue;
            }
            let zone = self.zone.as_deref();
            let endpoints = ready_endpoints(slices.current.values(), &pods.current, &info, service, zone);
            self.metrics.count_states(&labels.service, slices.current.values());
            // The upstreams that follow the Service log what they route to.
            let count = endpoints.len();
            if sender.send(endpoints) {
                tracing::debug!(%service, count, "Kubernetes endpoints changed");
            }
            // The routes took the change as it was sent: the delay ends here.
            if let Some(delay) = slices.current.values().filter_map(since_triggered).min().filter(|_| from_slices) {
                self.metrics.change_seconds.observe(delay.as_secs_f64());
            }
        }
    }

    /// The name of the Service port that `service` names (EndpointSlices
    /// carry the target port under it) and the selector of its pods.
    async fn read_service(&self, service: &ServiceRef) -> Result<ServiceInfo, String> {
        let found = Api::<Service>::namespaced(self.client.clone(), &service.namespace)
            .get(&service.name)
            .await
            .map_err(|e| format!("{service}: reading the Service: {}", api_error(&e, Grant::Endpoints)))?;
        let spec = found.spec.unwrap_or_default();
        let port = match &service.port {
            ServicePort::Name(name) => name.clone(),
            ServicePort::Number(number) => {
                let ports = spec.ports.iter().flatten();
                let port = ports.into_iter().find(|p| p.port == i32::from(*number));
                let port = port.ok_or_else(|| format!("{service}: the Service has no port {number}"))?;
                port.name.clone().unwrap_or_default()
            }
        };
        let selector = spec.selector.filter(|labels| !labels.is_empty());
        let pods = selector.map(|labels| labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","));
        let annotations = found.metadata.annotations.unwrap_or_default();
        let expected = annotations.get(EXPECTED_IDENTITY).map(|id| id.trim().to_string());
        if let Some(id) = &expected
            && (id.len() > MAX_IDENTITY_LEN || !id.starts_with("spiffe://"))
        {
            return Err(format!(
                "{service}: annotation {EXPECTED_IDENTITY} is not a SPIFFE ID (spiffe://<trust domain>/<path>, at \
                 most {MAX_IDENTITY_LEN} bytes)"
            ));
        }
        Ok(ServiceInfo { port, pods, expected })
    }
}

/// The client configuration a kubeconfig file names; errors name the file.
pub async fn read_kubeconfig(path: &std::path::Path) -> Result<kube::Config, String> {
    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
    kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The zone of the node `NODE_NAME` names, from its label; `None` (and
/// logged) when it cannot be read: topology hints are then not followed.
async fn zone_of_node(client: &kube::Client) -> Option<String> {
    let node = std::env::var("NODE_NAME").ok().filter(|name| !name.is_empty())?;
    match Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get(&node).await {
        Ok(found) => {
            let zone = found.metadata.labels.unwrap_or_default().remove(ZONE_LABEL);
            tracing::info!(%node, zone = zone.as_deref().unwrap_or("none"), "this pod's zone, for topology hints");
            zone
        }
        Err(error) => {
            let error = api_error(&error, Grant::Lookup);
            tracing::warn!(%node, %error, "the node's zone was not read: topology hints are not followed");
            None
        }
    }
}

/// An event of either watch of a Service.
enum Change {
    // Boxed: objects are large, and of different sizes.
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
    Pod(Box<Result<Event<Pod>, watcher::Error>>),
}

impl Change {
    /// Whether the API server answered, rather than failed.
    fn answered(&self) -> bool {
        match self {
            Change::Slice(event) => event.is_ok(),
            Change::Pod(event) => event.is_ok(),
        }
    }
}

fn name_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    metadata.name.clone().unwrap_or_default()
}

/// What an API error means to whoever reads the log. A denied request says
/// what was denied (the API server's message names the verb, the resource
/// and the namespace) and what grants it.
fn api_error(error: &kube::Error, grant: Grant) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => {
            format!("forbidden by RBAC: {} ({})", status.message, grant.fix())
        }
        other => other.to_string(),
    }
}

/// Which of k8s/discovery's ClusterRoles grants a request.
#[derive(Clone, Copy)]
enum Grant {
    /// A Service's EndpointSlices and pods, in its namespace.
    Endpoints,
    /// Finding the Service at a cluster IP, in any namespace.
    Lookup,
    /// Finding the pod at an address, in any namespace.
    PodLookup,
}

impl Grant {
    fn fix(self) -> &'static str {
        match self {
            Grant::Endpoints => {
                "bind the ClusterRole protomesh-discovery of k8s/discovery to the pod's service account in that \
                 namespace"
            }
            Grant::Lookup => {
                "bind the ClusterRole protomesh-service-lookup of k8s/discovery to the pod's service account with \
                 a ClusterRoleBinding"
            }
            Grant::PodLookup => {
                "bind the ClusterRole protomesh-pod-lookup of k8s/discovery to the pod's service account with a \
                 ClusterRoleBinding"
            }
        }
    }
}

/// A watch's failure, told as [`api_error`] tells the API's own.
fn watch_error(error: &watcher::Error) -> String {
    match error {
        watcher::Error::InitialListFailed(error)
        | watcher::Error::WatchStartFailed(error)
        | watcher::Error::WatchFailed(error) => api_error(error, Grant::Endpoints),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_named_by_name_namespace_and_port() {
        let parsed = ServiceRef::parse("k8s://cart.shop:7070").unwrap();
        assert_eq!(
            parsed,
            ServiceRef { name: "cart".into(), namespace: "shop".into(), port: ServicePort::Number(7070) }
        );
        assert_eq!(ServiceRef::parse("k8s://cart.shop:grpc").unwrap().port, ServicePort::Name("grpc".into()));
        assert_eq!(parsed.to_string(), "k8s://cart.shop:7070");
        for bad in [
            "k8s://cart:7070",
            "k8s://cart.shop",
            "k8s://Cart.shop:1",
            "k8s://cart.shop:0",
            "k8s://c.s:-x",
            "cart.shop:1",
        ] {
            let error = ServiceRef::parse(bad).unwrap_err();
            assert!(error.contains("k8s://<service>.<namespace>:<port>"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_denied_list_or_watch_names_what_was_denied_and_what_grants_it() {
        let denied = "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:shop:cart\" \
                      cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"shop\"";
        let forbidden = || kube::Error::Api(Box::new(kube::core::Status::failure(denied, "Forbidden").with_code(403)));
        for error in
            [watch_error(&watcher::Error::InitialListFailed(forbidden())), api_error(&forbidden(), Grant::Endpoints)]
        {
            assert!(error.starts_with("forbidden by RBAC: endpointslices.discovery.k8s.io is forbidden"), "{error}");
            assert!(error.contains("ClusterRole protomesh-discovery of k8s/discovery"), "{error}");
        }
    }
}
