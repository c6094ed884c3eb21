//! The Prometheus registry, and the metrics of calls, connections, reloads
//! and discovery. Policies own their families and register them here on
//! first use ([`Metrics::families`]). Each family is keyed by its labels,
//! which makes it the registry of its handles: the routes built from each
//! config take their handles from here, and a reload that keeps a label keeps
//! its counts. A call records through handles cached per method and status,
//! so it does no label hashing.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::call::Direction;
use crate::discovery::kubernetes::DiscoveryMetrics;
use crate::grpc::Code;
use crate::policy::kept::Families;

/// Latency buckets in seconds: half a millisecond to ten seconds.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    direction: &'static str,
    service: String,
    method: String,
    grpc_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    direction: &'static str,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpaqueLabels {
    direction: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type Latency = Family<CallLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Mutex<Registry>,
    /// Policies' own families, by type, registered on first use.
    families: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    requests: Family<CallLabels, Counter>,
    latency: Latency,
    refused: Family<RefusalLabels, Counter>,
    tls_handshakes: Family<HandshakeLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
    closed_at_limit: Family<LimitLabels, Counter>,
    connections_refused: Family<RefusalLabels, Counter>,
    opaque_connections: Family<OpaqueLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    reload_failing: Gauge,
    original_destination_calls: Family<PeerLabels, Counter>,
    service_lookups: Family<ResultLabels, Counter>,
    /// What the Kubernetes watches count, handed to discovery.
    pub discovery: DiscoveryMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(super::process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("protomesh");
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        let metrics = Metrics {
            registry: Mutex::new(Registry::default()),
            families: Mutex::default(),
            requests: Family::default(),
            latency,
            refused: Family::default(),
            tls_handshakes: Family::default(),
            open_connections: Family::default(),
            closed_at_limit: Family::default(),
            connections_refused: Family::default(),
            opaque_connections: Family::default(),
            reloads: Family::default(),
            reload_failing: Gauge::default(),
            original_destination_calls: Family::default(),
            service_lookups: Family::default(),
            discovery: DiscoveryMetrics::default(),
        };
        let m = &metrics;
        registry.register("requests", "Calls carried, by direction, method and final gRPC status", m.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time from a call's arrival to its final status",
            m.latency.clone(),
        );
        registry.register(
            "refused",
            "Calls refused before routing: unknown method, no route, no caller identity",
            m.refused.clone(),
        );
        registry.register("tls_handshakes", "Inbound TLS handshakes by result", m.tls_handshakes.clone());
        registry.register("open_connections", "Connections accepted and still open", m.open_connections.clone());
        registry.register(
            "connections_closed_at_limit",
            "Connections refused or closed by a limit, by the `limits` setting that acted",
            m.closed_at_limit.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused because of where they come from or go: \
             to the outbound listener from outside the pod, to the sidecar's own port by capture",
            m.connections_refused.clone(),
        );
        registry.register(
            "opaque_connections",
            "Captured connections carried as opaque TCP (not gRPC), by how they ended",
            m.opaque_connections.clone(),
        );
        registry.register(
            "config_reloads",
            "Reloads of config, contracts and identity: applied, or failed (the running version stays)",
            m.reloads.clone(),
        );
        registry.register(
            "config_reload_failing",
            "1 while the newest config, contracts or identity files fail to load",
            m.reload_failing.clone(),
        );
        registry.register(
            "original_destination_calls",
            "Captured calls that no upstream routes, by who answers: peer=service (a Kubernetes Service's pods, \
             balanced per call, each pod's identity checked), address (the address dialled, any workload of the \
             trust domain), plaintext (outbound.original_destination.plaintext_networks)",
            m.original_destination_calls.clone(),
        );
        let discovery = &m.discovery;
        registry.register(
            "kubernetes_watch_events",
            "Events of the watches of each Service called, by kind (endpointslices, pods)",
            discovery.events.clone(),
        );
        registry.register(
            "kubernetes_watch_restarts",
            "Watches of each Service called that failed and started again (the last endpoints stay meanwhile)",
            discovery.restarts.clone(),
        );
        registry.register(
            "kubernetes_endpoints",
            "Endpoints of each Service called, by state: ready, terminating (no new calls), not_ready",
            discovery.endpoints.clone(),
        );
        registry.register(
            "kubernetes_endpoints_change_seconds",
            "From an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time) to the sidecar \
             routing by it",
            discovery.change_seconds.clone(),
        );
        registry.register(
            "kubernetes_service_lookups",
            "Lookups of the Kubernetes Service at a captured destination: result=service, no_service (the API \
             knows none there), failed (the API did not answer; calls go to the address meanwhile)",
            m.service_lookups.clone(),
        );
        *metrics.registry.lock().expect("metrics registry lock") = root;
        metrics
    }
}

impl Metrics {
    /// The Prometheus text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("metrics registry lock");
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }

    /// Adds a collector of `protomesh_*` metrics, read at every scrape.
    /// A policy's metric families, registered the first time they are asked for.
    pub fn families<F: Families>(&self) -> Arc<F> {
        let mut families = self.families.lock().expect("metric families lock");
        let kept = families.entry(TypeId::of::<F>()).or_insert_with(|| {
            let new = Arc::new(F::default());
            new.register(self.registry.lock().expect("metrics registry lock").sub_registry_with_prefix("protomesh"));
            new
        });
        kept.clone().downcast().expect("families are kept by their type")
    }

    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        let mut registry = self.registry.lock().expect("metrics registry lock");
        registry.sub_registry_with_prefix("protomesh").register_collector(collector);
    }

    pub fn refused(&self, direction: Direction, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { direction: direction.as_str(), reason }).inc();
    }

    pub fn tls_handshake(&self, direction: Direction, result: String) {
        self.tls_handshakes.get_or_create(&HandshakeLabels { direction: direction.as_str(), result }).inc();
    }

    /// Counts a connection refused or closed by the setting `limit`.
    pub fn closed_at_limit(&self, direction: Direction, limit: &'static str) {
        self.closed_at_limit.get_or_create(&LimitLabels { direction: direction.as_str(), limit }).inc();
    }

    /// Counts a connection refused for `reason`, before it carried anything.
    pub fn connection_refused(&self, direction: Direction, reason: &'static str) {
        self.connections_refused.get_or_create(&RefusalLabels { direction: direction.as_str(), reason }).inc();
    }

    /// Counts a captured connection carried as opaque TCP, once it has ended.
    pub fn opaque_connection(&self, direction: Direction, result: &'static str) {
        self.opaque_connections.get_or_create(&OpaqueLabels { direction: direction.as_str(), result }).inc();
    }

    /// Counts an open connection until the guard drops.
    pub fn connection_opened(&self, direction: Direction) -> OpenConnection {
        let gauge = self.open_connections.get_or_create_owned(&DirectionLabels { direction: direction.as_str() });
        gauge.inc();
        OpenConnection(gauge)
    }

    /// A method's request metrics in one direction.
    pub fn calls(self: &Arc<Self>, direction: Direction, service: &str, method: &str) -> CallMetrics {
        CallMetrics {
            metrics: self.clone(),
            direction,
            service: service.to_string(),
            method: method.to_string(),
            by_status: Default::default(),
        }
    }

    /// Counts a reload by its result, `applied` or `failed`.
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Whether the files as they read now fail to load.
    pub fn reload_failing(&self, failing: bool) {
        self.reload_failing.set(i64::from(failing));
    }

    /// The counter of captured calls to original destinations whose peer is known as `peer`.
    pub fn original_destination_calls(&self, peer: &'static str) -> Counter {
        self.original_destination_calls.get_or_create(&PeerLabels { peer }).clone()
    }

    pub fn service_lookup(&self, result: &'static str) {
        self.service_lookups.get_or_create(&ResultLabels { result }).inc();
    }
}

pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One method's request metrics in one direction, with a handle per status
/// made on first use.
pub struct CallMetrics {
    metrics: Arc<Metrics>,
    direction: Direction,
    service: String,
    method: String,
    by_status: [OnceLock<(Counter, Histogram)>; 17],
}

impl std::fmt::Debug for CallMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallMetrics({} /{}/{})", self.direction, self.service, self.method)
    }
}

impl CallMetrics {
    pub fn record(&self, status: Code, elapsed: Duration) {
        let (count, latency) = self.by_status[status as usize].get_or_init(|| {
            let labels = CallLabels {
                direction: self.direction.as_str(),
                service: self.service.clone(),
                method: self.method.clone(),
                grpc_status: status.name(),
            };
            (self.metrics.requests.get_or_create_owned(&labels), self.metrics.latency.get_or_create_owned(&labels))
        });
        count.inc();
        latency.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::replay::RetryFamilies;

    #[test]
    fn handles_taken_again_under_the_same_labels_keep_counting() {
        let metrics = Arc::new(Metrics::default());
        let retries = || metrics.families::<RetryFamilies>().of(Direction::Outbound, "s.S", "M");
        retries().retries.inc();
        let again = retries();
        again.retries.inc();
        assert_eq!(again.retries.get(), 2);
        let text = metrics.encode();
        assert!(text.contains(r#"protomesh_retries_total{direction="outbound",service="s.S",method="M"} 2"#), "{text}");
    }

    #[test]
    fn a_policys_families_are_registered_once_on_first_use() {
        use crate::policy::bulkhead::BulkheadFamilies;
        use crate::policy::kept::NamedFamilies;

        let metrics = Metrics::default();
        assert!(!metrics.encode().contains("protomesh_bulkhead_rejections"), "not before first use");
        let families = metrics.families::<BulkheadFamilies>();
        assert!(Arc::ptr_eq(&families, &metrics.families::<BulkheadFamilies>()));
        families.handles("method /s.S/M (config policy.defaults)").rejected.inc();
        let text = metrics.encode();
        assert_eq!(text.matches("# HELP protomesh_bulkhead_rejections ").count(), 1, "{text}");
        let counted = r#"protomesh_bulkhead_rejections_total{bulkhead="method /s.S/M (config policy.defaults)"} 1"#;
        assert!(text.contains(counted), "{text}");
    }
}
