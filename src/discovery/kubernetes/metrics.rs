//! What the watches of each Service count, registered with the sidecar's
//! other metrics by `telemetry/`.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::trouble::ApiTrouble;

/// What the watches of each Service count, by Service (`namespace/name`):
/// registered with the sidecar's other metrics (`telemetry/`).
#[derive(Clone, Debug)]
pub struct DiscoveryMetrics {
    /// Watch events taken in, by `kind` (`endpointslices`, `pods`).
    pub events: Family<WatchLabels, Counter>,
    /// Watches that failed and started again.
    pub restarts: Family<ServiceLabels, Counter>,
    /// Endpoints by `state`: `ready`, `terminating` (still serving, taking
    /// no new calls), `not_ready`.
    pub endpoints: Family<StateLabels, Gauge>,
    /// From an EndpointSlice change (its `endpoints.kubernetes.io/last-change-trigger-time`)
    /// to the sidecar routing by it.
    pub change_seconds: Histogram,
    /// Not a count: the failures in force, which `/ready`'s body tells, kept
    /// with the counts because both are handed to discovery together.
    pub trouble: ApiTrouble,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub service: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    service: String,
    state: &'static str,
}

impl Default for DiscoveryMetrics {
    fn default() -> Self {
        DiscoveryMetrics {
            events: Family::default(),
            restarts: Family::default(),
            endpoints: Family::default(),
            change_seconds: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            trouble: ApiTrouble::default(),
        }
    }
}

/// The annotation the EndpointSlice controller sets to when the change that
/// a slice carries was triggered (kube-proxy measures the same delay by it).
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl DiscoveryMetrics {
    /// Sets the Service's endpoint gauges from its EndpointSlices.
    pub fn count_states<'a>(&self, service: &str, slices: impl Iterator<Item = &'a EndpointSlice>) {
        let mut counts = [("ready", 0), ("terminating", 0), ("not_ready", 0)];
        for endpoint in slices.flat_map(|slice| &slice.endpoints) {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let state = match (conditions.ready.unwrap_or(true), conditions.terminating.unwrap_or(false)) {
                (true, _) => 0,
                (false, true) => 1,
                (false, false) => 2,
            };
            counts[state].1 += 1;
        }
        for (state, count) in counts {
            let labels = StateLabels { service: service.to_string(), state };
            self.endpoints.get_or_create(&labels).set(count);
        }
    }
}

/// How long ago the change a slice carries was triggered, if it says; none
/// when the controller's clock is ahead of this node's.
pub fn since_triggered(slice: &EndpointSlice) -> Option<std::time::Duration> {
    let annotations = slice.metadata.annotations.as_ref()?;
    let triggered: k8s_openapi::jiff::Timestamp = annotations.get(TRIGGER_TIME)?.parse().ok()?;
    let since = k8s_openapi::jiff::Timestamp::now().duration_since(triggered);
    Some(since.try_into().unwrap_or_default())
}
