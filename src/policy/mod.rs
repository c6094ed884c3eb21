//! Per-call policies, each a tower layer in its own file. Each decides from
//! data resolved once per method and direction ([`CallPolicy`]), which the
//! admission layer hands down in the request's [`CallContext`].

pub mod authz;
pub mod bulkhead;
pub mod deadline;
pub mod method;
pub mod outlier;
pub mod retry;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::time::Instant;

use crate::config::PolicyConfig;
use crate::contract::{CallShape, MethodInfo};
use crate::proxy::error::Direction;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::CallMetrics;
use bulkhead::Bulkhead;
use method::MethodPolicy;

/// A method's policy in one direction, with the state that enforces it.
#[derive(Debug)]
pub struct CallPolicy {
    /// `/pkg.Service/Method`.
    pub path: Arc<str>,
    /// `None` for a method outside the contracts (permissive mode).
    pub shape: Option<CallShape>,
    pub policy: MethodPolicy,
    pub bulkhead: Option<Arc<Bulkhead>>,
    pub counters: CallCounters,
    pub metrics: CallMetrics,
}

/// What the policies did to this method's calls, for the metrics.
#[derive(Debug, Default)]
pub struct CallCounters {
    pub retries: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    pub deadline_exceeded: AtomicU64,
}

impl CallPolicy {
    /// A contract method's policy, with its own bulkhead and metrics.
    pub fn new(
        service: &str,
        method: &str,
        info: Option<&MethodInfo>,
        config: &PolicyConfig,
        metrics: &Arc<Metrics>,
        direction: Direction,
    ) -> CallPolicy {
        let mut call = CallPolicy::resolved(service, method, info, config, metrics, direction, (service, method));
        call.bulkhead = call
            .policy
            .concurrency
            .as_ref()
            .map(|c| Arc::new(Bulkhead::new(format!("method {} ({})", call.path, c.source), &c.value)));
        call
    }

    /// For a call to a method outside the contracts (permissive mode): its
    /// service's override and the defaults apply, but no method bulkhead, as
    /// one cannot be kept for every path a peer might send; for the same
    /// reason its metrics are counted under service and method `*`.
    pub fn outside_contracts(
        service: &str,
        method: &str,
        config: &PolicyConfig,
        metrics: &Arc<Metrics>,
        direction: Direction,
    ) -> CallPolicy {
        CallPolicy::resolved(service, method, None, config, metrics, direction, ("*", "*"))
    }

    /// The policy without a bulkhead, its metrics labelled `labels` (service, method).
    fn resolved(
        service: &str,
        method: &str,
        info: Option<&MethodInfo>,
        config: &PolicyConfig,
        metrics: &Arc<Metrics>,
        direction: Direction,
        labels: (&str, &str),
    ) -> CallPolicy {
        CallPolicy {
            path: format!("/{service}/{method}").into(),
            shape: info.map(|i| i.shape),
            policy: MethodPolicy::resolve(service, method, info, config),
            bulkhead: None,
            counters: CallCounters::default(),
            metrics: CallMetrics::new(metrics.clone(), direction, labels.0, labels.1),
        }
    }
}

/// What the layers know of one call: set by admission, read and extended below it.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub policy: Arc<CallPolicy>,
    /// A bulkhead beyond the method's: the upstream's (outbound) or the caller's (inbound).
    pub shared_bulkhead: Option<Arc<Bulkhead>>,
    /// When the call must be over, if it has a deadline.
    pub deadline: Option<Instant>,
    /// Who is on the other side: the caller (inbound) or the upstream (outbound).
    pub peer: Peer,
    /// The call's span, when the call is traced; retries hang their attempts under it.
    pub span: Option<opentelemetry::trace::SpanContext>,
    /// What retries of this call draw from (outbound: its upstream's budget).
    pub retry_budget: Option<retry::RetryBudget>,
}

/// The other side of a call, for traces.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub identity: Option<crate::identity::SpiffeId>,
    /// The caller's address, or the upstream's endpoints.
    pub address: Option<Arc<str>>,
}

impl CallContext {
    pub fn new(policy: Arc<CallPolicy>, shared_bulkhead: Option<Arc<Bulkhead>>, peer: Peer) -> CallContext {
        CallContext { policy, shared_bulkhead, deadline: None, peer, span: None, retry_budget: None }
    }

    /// The context admission put on the request; every stack begins with admission.
    pub fn of<B>(request: &http::Request<B>) -> &CallContext {
        request.extensions().get::<CallContext>().expect("admission sets the call context first")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::method::{ConcurrencyPolicy, PolicyFields};
    use std::time::Duration;

    #[test]
    fn a_method_outside_the_contracts_takes_its_services_policy_but_no_bulkhead() {
        let mut config = PolicyConfig::default();
        let fields = PolicyFields {
            timeout: Some(Duration::from_millis(100)),
            concurrency: Some(ConcurrencyPolicy::new(4)),
            ..Default::default()
        };
        config.methods.insert("s.S/*".into(), fields);
        let metrics = Arc::new(Metrics::default());
        let outside = CallPolicy::outside_contracts("s.S", "Shout", &config, &metrics, Direction::Inbound);
        assert_eq!(&*outside.path, "/s.S/Shout");
        assert!(outside.policy.concurrency.is_some(), "the override applies");
        assert!(outside.bulkhead.is_none(), "but no bulkhead is kept for a peer-chosen path");
        let info = crate::contract::MethodInfo {
            service: "s.S".into(),
            method: "M".into(),
            path: "/s.S/M".into(),
            shape: CallShape::Unary,
            idempotency: crate::contract::Idempotency::Unknown,
            contract: Default::default(),
            file: "s.proto".into(),
        };
        let known = CallPolicy::new("s.S", "M", Some(&info), &config, &metrics, Direction::Inbound);
        assert_eq!(known.bulkhead.unwrap().name, "method /s.S/M (config policy.methods[\"s.S/*\"])");
    }
}
