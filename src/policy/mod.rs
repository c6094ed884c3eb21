//! Per-call policies. Each policy's file holds it whole: its config types
//! (and how they are read, checked and shown), the tower layer that enforces
//! it (built with its settings for one method, so it can be tested against
//! any plain service), the error it answers with, its metrics and the state
//! it keeps. Beside them: `replay.rs`, what retries and hedging share;
//! `fields.rs`, how a method's policy fields are described; `source.rs`,
//! where a value came from; and here, the list of a method's policy fields
//! and the config's `policy` section. The stacks that put the layers in
//! order are composed in `proxy`.

pub mod authz;
pub mod bulkhead;
pub mod circuit_breaker;
pub mod deadline;
pub mod fields;
pub mod hedge;
pub mod kept;
pub mod message_size;
pub mod outlier;
pub mod rate_limit;
pub mod replay;
pub mod retry;
pub mod source;
pub mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::duration;
use crate::grpc::Code;
use authz::MethodPattern;
use bulkhead::ConcurrencyPolicy;
use circuit_breaker::CircuitBreakerPolicy;
use fields::PolicyValue;
use hedge::HedgingPolicy;
use outlier::OutlierConfig;
use rate_limit::RateLimitPolicy;
use replay::RetryBudgetConfig;
use retry::RetryPolicy;

fields::method_policy! {
    /// Whole-call timeout of unary and client-streaming calls.
    timeout: Duration,
    /// Streaming responses: the longest gap between two messages.
    idle_timeout: Duration,
    /// Server- and bidi-streaming calls: the longest a stream may stay open.
    stream_timeout: Duration,
    retry: RetryPolicy,
    /// Attempts side by side for an idempotent method, in place of `retry`.
    hedging: HedgingPolicy,
    concurrency: ConcurrencyPolicy,
    /// The largest gRPC message either way; a larger one ends the call with RESOURCE_EXHAUSTED.
    max_message_size: ByteSize,
    /// Statuses counted against the endpoint that answered them (outlier
    /// detection); by default `policy.outlier_detection.failure_codes`, none.
    endpoint_failure_codes: Vec<Code>,
    /// Outbound: cuts the method off while its calls keep failing.
    circuit_breaker: CircuitBreakerPolicy,
    /// Inbound: calls per second for all callers together.
    rate_limit: RateLimitPolicy,
    /// Inbound: calls per second for each caller identity.
    caller_rate_limit: RateLimitPolicy,
    /// Inbound: each request message checked against its `buf.validate`
    /// rules before the app sees it; one that breaks them is refused with
    /// INVALID_ARGUMENT.
    validate: bool,
}

impl PolicyFields {
    /// Errors are `field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.hedging.is_some() && self.retry.is_some() {
            return Err("hedging: a method retries or hedges, not both (gRFC A6); remove `retry` or `hedging`".into());
        }
        self.validate_each()
    }
}

/// The `policy` section of the config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Policy for every method that neither its contract nor an override sets.
    /// A default `retry` applies only to idempotent or side-effect-free methods.
    #[serde(default)]
    pub defaults: PolicyFields,
    /// Overrides, keyed `pkg.Service/Method` or `pkg.Service/*`; they win over the contract.
    #[serde(default)]
    pub methods: BTreeMap<String, PolicyFields>,
    /// A call with less deadline budget left fails at once with DEADLINE_EXCEEDED.
    #[serde(default = "defaults::min_budget", deserialize_with = "duration::deserialize")]
    pub min_budget: Duration,
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// Requests up to this size are kept so that a retry can send them again.
    #[serde(default = "defaults::max_replay_bytes")]
    pub max_replay_bytes: usize,
    /// Outbound: a bulkhead around each upstream, across all its methods.
    #[serde(default)]
    pub upstream_concurrency: Option<ConcurrencyPolicy>,
    /// Inbound: a bulkhead for each caller identity, across all methods.
    #[serde(default)]
    pub caller_concurrency: Option<ConcurrencyPolicy>,
    /// Outbound: the circuit breaker of each upstream endpoint.
    #[serde(default)]
    pub outlier_detection: OutlierConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            defaults: PolicyFields::default(),
            methods: BTreeMap::new(),
            min_budget: defaults::min_budget(),
            retry_budget: RetryBudgetConfig::default(),
            max_replay_bytes: defaults::max_replay_bytes(),
            upstream_concurrency: None,
            caller_concurrency: None,
            outlier_detection: OutlierConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// Checks what serde cannot. Each error is (field path, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.defaults.validate().map_err(|e| ("policy.defaults".into(), e))?;
        for (key, fields) in &self.methods {
            let at = format!("policy.methods[\"{key}\"]");
            match MethodPattern::try_from(key.clone()) {
                Ok(MethodPattern::Service(_) | MethodPattern::Method { .. }) => {}
                _ => {
                    return Err((
                        at,
                        "key it `pkg.Service/Method` or `pkg.Service/*`; `policy.defaults` covers all".into(),
                    ));
                }
            }
            fields.validate().map_err(|e| (at, e))?;
        }
        for (name, concurrency) in
            [("upstream_concurrency", &self.upstream_concurrency), ("caller_concurrency", &self.caller_concurrency)]
        {
            if let Some(concurrency) = concurrency {
                concurrency.validate().map_err(|e| (format!("policy.{name}"), e))?;
            }
        }
        self.outlier_detection.validate().map_err(|e| ("policy.outlier_detection".into(), e))?;
        self.retry_budget.validate().map_err(|e| ("policy.retry_budget".into(), e))?;
        Ok(())
    }
}

mod defaults {
    use std::time::Duration;

    pub fn min_budget() -> Duration {
        Duration::from_millis(1)
    }
    pub fn max_replay_bytes() -> usize {
        64 * 1024
    }
}
