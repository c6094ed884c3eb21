//! The Prometheus metrics. Request counts and latencies are recorded per call
//! through handles cached per method and status, so a call does no label
//! hashing; policy state (retries, bulkheads, ejections) lives in the
//! policies' own atomics and is read at scrape time by a collector.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::grpc::Code;
use crate::proxy::error::Direction;

/// Latency buckets in seconds: half a millisecond to ten seconds.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub direction: &'static str,
    pub service: String,
    pub method: String,
    pub grpc_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

type Latency = Family<CallLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<CallLabels, Counter>,
    latency: Latency,
    refused: Family<RefusalLabels, Counter>,
    tls_handshakes: Family<HandshakeLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
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
        let requests = Family::<CallLabels, Counter>::default();
        registry.register("requests", "Calls carried, by direction, method and final gRPC status", requests.clone());
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from a call's arrival to its final status",
            latency.clone(),
        );
        let refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refused",
            "Calls refused before routing: unknown method, no route, no caller identity",
            refused.clone(),
        );
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register("tls_handshakes", "Inbound TLS handshakes by result", tls_handshakes.clone());
        let open_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register("open_connections", "Connections accepted and still open", open_connections.clone());
        Metrics { registry: Mutex::new(root), requests, latency, refused, tls_handshakes, open_connections }
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

    /// Counts an open connection until the guard drops.
    pub fn connection_opened(self: &Arc<Self>, direction: Direction) -> OpenConnection {
        let gauge = self.open_connections.get_or_create_owned(&DirectionLabels { direction: direction.as_str() });
        gauge.inc();
        OpenConnection(gauge)
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
    pub fn new(metrics: Arc<Metrics>, direction: Direction, service: &str, method: &str) -> CallMetrics {
        CallMetrics {
            metrics,
            direction,
            service: service.to_string(),
            method: method.to_string(),
            by_status: Default::default(),
        }
    }

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
