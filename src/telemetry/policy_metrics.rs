//! The policies' counters and gauges, read from their own atomics at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::policy::CallPolicy;
use crate::policy::bulkhead::Bulkhead;
use crate::policy::outlier::Outliers;

/// What a scrape reads: every method's policy in both directions, every
/// bulkhead, and every upstream's outlier state.
pub struct PolicyCollector {
    pub methods: Vec<(&'static str, Arc<CallPolicy>)>,
    /// Bulkheads shared beyond one method, found at each scrape (callers appear over time).
    pub shared_bulkheads: Box<dyn Fn() -> Vec<Arc<Bulkhead>> + Send + Sync>,
    pub upstreams: Vec<(Arc<str>, Arc<Outliers>)>,
}

impl std::fmt::Debug for PolicyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyCollector({} methods)", self.methods.len())
    }
}

fn method_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    methods: &[(&'static str, Arc<CallPolicy>)],
    value: fn(&CallPolicy) -> &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (direction, policy) in methods {
        let (service, method) = crate::grpc::split_path(&policy.path).unwrap_or(("*", "*"));
        let labels = [("direction", *direction), ("service", service), ("method", method)];
        ConstCounter::new(value(policy).load(Ordering::Relaxed)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for PolicyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "Retries sent, after the first attempt";
        method_counter(&mut encoder, "retries", help, &self.methods, |p| &p.counters.retries)?;
        let help = "Retries not sent because the upstream's retry budget was spent";
        method_counter(&mut encoder, "retry_budget_exhausted", help, &self.methods, |p| {
            &p.counters.retry_budget_exhausted
        })?;
        let help = "Calls the sidecar ended at their deadline or idle timeout";
        method_counter(&mut encoder, "deadline_exceeded", help, &self.methods, |p| &p.counters.deadline_exceeded)?;

        let bulkheads: Vec<Arc<Bulkhead>> =
            self.methods.iter().filter_map(|(_, p)| p.bulkhead.clone()).chain((self.shared_bulkheads)()).collect();
        let mut rejections = encoder.encode_descriptor(
            "bulkhead_rejections",
            "Calls a full bulkhead refused with RESOURCE_EXHAUSTED",
            None,
            MetricType::Counter,
        )?;
        for bulkhead in &bulkheads {
            let value = bulkhead.rejected.load(Ordering::Relaxed);
            ConstCounter::new(value).encode(rejections.encode_family(&[("bulkhead", bulkhead.name.as_str())])?)?;
        }
        let mut depth = encoder.encode_descriptor(
            "bulkhead_queue_depth",
            "Calls waiting for a bulkhead place",
            None,
            MetricType::Gauge,
        )?;
        for bulkhead in &bulkheads {
            let value = bulkhead.queue_depth() as i64;
            ConstGauge::new(value).encode(depth.encode_family(&[("bulkhead", bulkhead.name.as_str())])?)?;
        }

        let mut ejections = encoder.encode_descriptor(
            "endpoint_ejections",
            "Times outlier detection ejected an endpoint",
            None,
            MetricType::Counter,
        )?;
        for (upstream, outliers) in &self.upstreams {
            let value = outliers.ejections.load(Ordering::Relaxed);
            ConstCounter::new(value).encode(ejections.encode_family(&[("upstream", &**upstream)])?)?;
        }
        let mut ejected = encoder.encode_descriptor(
            "endpoints_ejected",
            "Endpoints out now (the circuit is open)",
            None,
            MetricType::Gauge,
        )?;
        for (upstream, outliers) in &self.upstreams {
            let value = outliers.ejected() as i64;
            ConstGauge::new(value).encode(ejected.encode_family(&[("upstream", &**upstream)])?)?;
        }
        Ok(())
    }
}
