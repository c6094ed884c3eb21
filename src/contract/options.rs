//! Policy read from the contract: the `(protomesh.v1.method)` and
//! `(protomesh.v1.service)` options, validated into the same fields the
//! config file uses.

use std::time::Duration;

use bytesize::ByteSize;

use crate::duration;
use crate::grpc::Code;
use crate::pb::protomesh::v1 as pb;
use crate::policy::authz::CallerPattern;
use crate::policy::bulkhead::ConcurrencyPolicy;
use crate::policy::circuit_breaker::CircuitBreakerPolicy;
use crate::policy::fields::PolicyFields;
use crate::policy::hedge::HedgingPolicy;
use crate::policy::rate_limit::RateLimitPolicy;
use crate::policy::retry::RetryPolicy;
use crate::policy::source::{Source, Sourced};

/// What a method's contract says of its policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContractPolicy {
    pub method: Option<PolicyFields>,
    pub service: Option<PolicyFields>,
    /// From the method's option, or else its service's.
    pub allowed_callers: Option<Sourced<Vec<CallerPattern>>>,
    /// The service option's, which also govern methods its contract does not declare.
    pub service_callers: Option<Vec<CallerPattern>>,
}

impl ContractPolicy {
    /// Errors name the option and field, e.g. `(protomesh.v1.method).timeout: ...`.
    pub fn from_options(method: Option<&pb::Policy>, service: Option<&pb::Policy>) -> Result<ContractPolicy, String> {
        let fields = |option: Option<&pb::Policy>, source: Source| {
            option.map(|o| policy_fields(o).map_err(|e| format!("{source}.{e}"))).transpose()
        };
        let callers = |option: Option<&pb::Policy>, source: Source| -> Result<_, String> {
            let Some(option) = option.filter(|o| !o.allowed_callers.is_empty()) else {
                return Ok(None);
            };
            let value = option
                .allowed_callers
                .iter()
                .map(|c| CallerPattern::try_from(c.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{source}.allowed_callers: {e}"))?;
            Ok(Some(Sourced { value, source }))
        };
        let service_callers = callers(service, Source::ServiceOption)?;
        Ok(ContractPolicy {
            method: fields(method, Source::MethodOption)?,
            service: fields(service, Source::ServiceOption)?,
            allowed_callers: callers(method, Source::MethodOption)?.or_else(|| service_callers.clone()),
            service_callers: service_callers.map(|callers| callers.value),
        })
    }
}

fn optional_duration(text: &str, name: &str) -> Result<Option<Duration>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    duration::parse(text).map(Some).map_err(|e| format!("{name}: {e}"))
}

fn optional_size(text: &str, name: &str) -> Result<Option<ByteSize>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| format!("{name}: `{text}` is not a size such as \"4MiB\" or \"65536\": {e}"))
}

fn policy_fields(option: &pb::Policy) -> Result<PolicyFields, String> {
    let fields = PolicyFields {
        timeout: optional_duration(&option.timeout, "timeout")?,
        idle_timeout: optional_duration(&option.idle_timeout, "idle_timeout")?,
        stream_timeout: optional_duration(&option.stream_timeout, "stream_timeout")?,
        retry: option.retry.as_ref().map(retry_policy).transpose()?,
        hedging: option.hedging.as_ref().map(hedging_policy).transpose()?,
        circuit_breaker: option.circuit_breaker.as_ref().map(circuit_breaker).transpose()?,
        concurrency: option.concurrency.as_ref().map(concurrency_policy).transpose()?,
        max_message_size: optional_size(&option.max_message_size, "max_message_size")?,
        endpoint_failure_codes: match option.endpoint_failure_codes.as_slice() {
            [] => None,
            names => Some(codes(names, "endpoint_failure_codes")?),
        },
        rate_limit: option.rate_limit.as_ref().map(rate_limit),
        caller_rate_limit: option.caller_rate_limit.as_ref().map(rate_limit),
    };
    fields.validate()?;
    Ok(fields)
}

fn codes(names: &[String], field: &str) -> Result<Vec<Code>, String> {
    names.iter().map(|name| Code::parse(name).map_err(|e| format!("{field}: {e}"))).collect()
}

fn retry_policy(retry: &pb::RetryPolicy) -> Result<RetryPolicy, String> {
    let retryable_codes = codes(&retry.retryable_codes, "retry.retryable_codes")?;
    let defaults = RetryPolicy::new(retry.max_attempts, retryable_codes);
    let backoff = |text: &str, name: &str, default| -> Result<Duration, String> {
        Ok(optional_duration(text, &format!("retry.{name}"))?.unwrap_or(default))
    };
    Ok(RetryPolicy {
        initial_backoff: backoff(&retry.initial_backoff, "initial_backoff", defaults.initial_backoff)?,
        max_backoff: backoff(&retry.max_backoff, "max_backoff", defaults.max_backoff)?,
        backoff_multiplier: if retry.backoff_multiplier == 0.0 {
            defaults.backoff_multiplier
        } else {
            retry.backoff_multiplier
        },
        ..defaults
    })
}

fn hedging_policy(hedging: &pb::HedgingPolicy) -> Result<HedgingPolicy, String> {
    Ok(HedgingPolicy {
        max_attempts: hedging.max_attempts,
        hedging_delay: optional_duration(&hedging.hedging_delay, "hedging.hedging_delay")?.unwrap_or_default(),
        non_fatal_codes: codes(&hedging.non_fatal_codes, "hedging.non_fatal_codes")?,
    })
}

fn circuit_breaker(breaker: &pb::CircuitBreaker) -> Result<CircuitBreakerPolicy, String> {
    let defaults = CircuitBreakerPolicy::default();
    let open = |text: &str, name: &str, default| -> Result<Duration, String> {
        Ok(optional_duration(text, &format!("circuit_breaker.{name}"))?.unwrap_or(default))
    };
    Ok(CircuitBreakerPolicy {
        consecutive_failures: match breaker.consecutive_failures {
            0 => defaults.consecutive_failures,
            count => count,
        },
        failure_codes: match breaker.failure_codes.as_slice() {
            [] => defaults.failure_codes,
            names => codes(names, "circuit_breaker.failure_codes")?,
        },
        open_for: open(&breaker.open_for, "open_for", defaults.open_for)?,
        max_open_for: open(&breaker.max_open_for, "max_open_for", defaults.max_open_for)?,
    })
}

fn rate_limit(limit: &pb::RateLimit) -> RateLimitPolicy {
    RateLimitPolicy::new(limit.per_second, (limit.burst > 0).then_some(limit.burst))
}

fn concurrency_policy(concurrency: &pb::ConcurrencyPolicy) -> Result<ConcurrencyPolicy, String> {
    let defaults = ConcurrencyPolicy::new(concurrency.max_in_flight);
    Ok(ConcurrencyPolicy {
        max_queue: concurrency.max_queue,
        queue_timeout: optional_duration(&concurrency.queue_timeout, "concurrency.queue_timeout")?
            .unwrap_or(defaults.queue_timeout),
        ..defaults
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hedging_and_a_circuit_breaker_with_their_defaults() {
        let method = pb::Policy {
            hedging: Some(pb::HedgingPolicy {
                max_attempts: 3,
                hedging_delay: "40ms".into(),
                non_fatal_codes: vec!["UNAVAILABLE".into()],
            }),
            circuit_breaker: Some(pb::CircuitBreaker { open_for: "2s".into(), ..Default::default() }),
            ..Default::default()
        };
        let fields = ContractPolicy::from_options(Some(&method), None).unwrap().method.unwrap();
        let hedging = fields.hedging.unwrap();
        assert_eq!((hedging.max_attempts, hedging.hedging_delay), (3, Duration::from_millis(40)));
        let breaker = fields.circuit_breaker.unwrap();
        assert_eq!(breaker.open_for, Duration::from_secs(2));
        assert_eq!(breaker.consecutive_failures, CircuitBreakerPolicy::default().consecutive_failures);

        let both = pb::Policy { retry: Some(pb::RetryPolicy { max_attempts: 2, ..Default::default() }), ..method };
        let err = ContractPolicy::from_options(Some(&both), None).unwrap_err();
        assert!(err.contains("a method retries or hedges, not both"), "{err}");
    }

    #[test]
    fn reads_both_options_and_takes_the_methods_allowed_callers_first() {
        let service =
            pb::Policy { timeout: "2s".into(), allowed_callers: vec!["spiffe://td/*".into()], ..Default::default() };
        let method = pb::Policy { timeout: "250ms".into(), ..Default::default() };
        let policy = ContractPolicy::from_options(Some(&method), Some(&service)).unwrap();
        assert_eq!(policy.method.unwrap().timeout, Some(Duration::from_millis(250)));
        assert_eq!(policy.service.unwrap().timeout, Some(Duration::from_secs(2)));
        assert_eq!(policy.allowed_callers.unwrap().source, Source::ServiceOption);
    }

    #[test]
    fn sizes_are_written_with_units() {
        let sized = pb::Policy { max_message_size: "4MiB".into(), ..Default::default() };
        let policy = ContractPolicy::from_options(Some(&sized), None).unwrap();
        assert_eq!(policy.method.unwrap().max_message_size, Some(ByteSize::mib(4)));
        let not_a_size = pb::Policy { max_message_size: "4 lots".into(), ..Default::default() };
        let err = ContractPolicy::from_options(Some(&not_a_size), None).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).max_message_size: `4 lots` is not a size"), "{err}");
    }

    #[test]
    fn unset_backoff_takes_the_defaults() {
        let method = pb::Policy {
            retry: Some(pb::RetryPolicy {
                max_attempts: 3,
                retryable_codes: vec!["UNAVAILABLE".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let retry = ContractPolicy::from_options(Some(&method), None).unwrap().method.unwrap().retry.unwrap();
        assert_eq!((retry.initial_backoff, retry.backoff_multiplier), (Duration::from_millis(25), 2.0));
    }

    #[test]
    fn invalid_option_values_name_the_option_and_field() {
        let method = pb::Policy {
            retry: Some(pb::RetryPolicy {
                max_attempts: 3,
                retryable_codes: vec!["UNAVAIL".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = ContractPolicy::from_options(Some(&method), None).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).retry.retryable_codes: `UNAVAIL`"), "{err}");
        assert!(err.contains("UNAVAILABLE"), "{err}");

        let service = pb::Policy { timeout: "1 sec".into(), ..Default::default() };
        let err = ContractPolicy::from_options(None, Some(&service)).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.service).timeout:"), "{err}");

        let no_codes =
            pb::Policy { retry: Some(pb::RetryPolicy { max_attempts: 3, ..Default::default() }), ..Default::default() };
        let err = ContractPolicy::from_options(Some(&no_codes), None).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).retry.retryable_codes"), "{err}");
    }

    #[test]
    fn endpoint_failure_codes_are_status_names() {
        let counted = pb::Policy { endpoint_failure_codes: vec!["UNAVAILABLE".into()], ..Default::default() };
        assert_eq!(policy_fields(&counted).unwrap().endpoint_failure_codes, Some(vec![Code::Unavailable]));
        assert_eq!(policy_fields(&pb::Policy::default()).unwrap().endpoint_failure_codes, None, "none: the default");
        let bad = pb::Policy { endpoint_failure_codes: vec!["BROKEN".into()], ..Default::default() };
        assert!(policy_fields(&bad).unwrap_err().starts_with("endpoint_failure_codes: "));
    }
}
