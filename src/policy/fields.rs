//! The policy fields of a method, the same wherever they are written: a
//! contract's `(protomesh.v1.method)` or `(protomesh.v1.service)` option,
//! `policy.defaults`, or an override in `policy.methods`.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::bulkhead::ConcurrencyPolicy;
use super::circuit_breaker::CircuitBreakerPolicy;
use super::hedge::HedgingPolicy;
use super::rate_limit::RateLimitPolicy;
use super::retry::RetryPolicy;
use crate::duration;
use crate::grpc::Code;

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFields {
    /// Whole-call timeout of unary and client-streaming calls.
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    pub timeout: Option<Duration>,
    /// Streaming responses: the longest gap between two messages.
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    pub idle_timeout: Option<Duration>,
    /// Server- and bidi-streaming calls: the longest a stream may stay open.
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    pub stream_timeout: Option<Duration>,
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// Attempts side by side for an idempotent method, in place of `retry`.
    #[serde(default)]
    pub hedging: Option<HedgingPolicy>,
    #[serde(default)]
    pub concurrency: Option<ConcurrencyPolicy>,
    /// The largest gRPC message either way; a larger one ends the call with RESOURCE_EXHAUSTED.
    #[serde(default)]
    pub max_message_size: Option<ByteSize>,
    /// Statuses counted against the endpoint that answered them (outlier
    /// detection); by default `policy.outlier_detection.failure_codes`, none.
    #[serde(default)]
    pub endpoint_failure_codes: Option<Vec<Code>>,
    /// Outbound: cuts the method off while its calls keep failing.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    /// Inbound: calls per second for all callers together.
    #[serde(default)]
    pub rate_limit: Option<RateLimitPolicy>,
    /// Inbound: calls per second for each caller identity.
    #[serde(default)]
    pub caller_rate_limit: Option<RateLimitPolicy>,
}

impl PolicyFields {
    /// Errors are `field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(hedging) = &self.hedging {
            if self.retry.is_some() {
                return Err(
                    "hedging: a method retries or hedges, not both (gRFC A6); remove `retry` or `hedging`".into()
                );
            }
            hedging.validate().map_err(|e| format!("hedging.{e}"))?;
        }
        if let Some(retry) = &self.retry {
            retry.validate().map_err(|e| format!("retry.{e}"))?;
        }
        if let Some(concurrency) = &self.concurrency {
            concurrency.validate().map_err(|e| format!("concurrency.{e}"))?;
        }
        if let Some(breaker) = &self.circuit_breaker {
            breaker.validate().map_err(|e| format!("circuit_breaker.{e}"))?;
        }
        for (name, limit) in [("rate_limit", &self.rate_limit), ("caller_rate_limit", &self.caller_rate_limit)] {
            if let Some(limit) = limit {
                limit.validate().map_err(|e| format!("{name}.{e}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let retry = PolicyFields { retry: Some(RetryPolicy::new(0, vec![])), ..Default::default() };
        assert!(retry.validate().unwrap_err().starts_with("retry.max_attempts"));
        let fields = PolicyFields {
            concurrency: Some(ConcurrencyPolicy { max_in_flight: 0, max_queue: 0, queue_timeout: Duration::ZERO }),
            ..Default::default()
        };
        assert!(fields.validate().unwrap_err().starts_with("concurrency.max_in_flight"));
    }
}
