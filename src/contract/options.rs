//! Policy read from the contract: the `(protomesh.v1.method)` and
//! `(protomesh.v1.service)` options, each field validated and tagged with the
//! option that set it.

use std::fmt;
use std::time::Duration;

use crate::config::duration;
use crate::grpc::Code;
use crate::pb::protomesh::v1 as pb;
use crate::policy::authz::CallerPattern;

/// Where a policy field's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    MethodOption,
    ServiceOption,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::MethodOption => "(protomesh.v1.method)",
            Source::ServiceOption => "(protomesh.v1.service)",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: Source,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub retryable_codes: Vec<Code>,
    pub initial_backoff: Option<Duration>,
    pub max_backoff: Option<Duration>,
    pub backoff_multiplier: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConcurrencyPolicy {
    pub max_in_flight: u32,
    pub max_queue: u32,
    pub queue_timeout: Option<Duration>,
}

/// A method's policy as its contract states it; a field is `None` where
/// neither the method nor its service sets it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodPolicy {
    pub timeout: Option<Sourced<Duration>>,
    pub idle_timeout: Option<Sourced<Duration>>,
    pub stream_timeout: Option<Sourced<Duration>>,
    pub retry: Option<Sourced<RetryPolicy>>,
    pub concurrency: Option<Sourced<ConcurrencyPolicy>>,
    pub allowed_callers: Option<Sourced<Vec<CallerPattern>>>,
}

impl MethodPolicy {
    /// Merges the method's option over its service's, field by field.
    /// Errors name the option and field, e.g. `(protomesh.v1.method).timeout: ...`.
    pub fn from_options(method: Option<&pb::Policy>, service: Option<&pb::Policy>) -> Result<MethodPolicy, String> {
        let layers = [(method, Source::MethodOption), (service, Source::ServiceOption)];
        let layers = layers.iter().filter_map(|(p, s)| p.map(|p| (p, *s)));
        let mut policy = MethodPolicy::default();
        for (option, source) in layers {
            let field = |name: &str, problem: String| format!("{source}.{name}: {problem}");
            let sourced = |value| Some(Sourced { value, source });
            if policy.timeout.is_none() && !option.timeout.is_empty() {
                policy.timeout = sourced(duration::parse(&option.timeout).map_err(|e| field("timeout", e))?);
            }
            if policy.idle_timeout.is_none() && !option.idle_timeout.is_empty() {
                policy.idle_timeout =
                    sourced(duration::parse(&option.idle_timeout).map_err(|e| field("idle_timeout", e))?);
            }
            if policy.stream_timeout.is_none() && !option.stream_timeout.is_empty() {
                policy.stream_timeout =
                    sourced(duration::parse(&option.stream_timeout).map_err(|e| field("stream_timeout", e))?);
            }
            if let (None, Some(retry)) = (&policy.retry, &option.retry) {
                policy.retry = Some(Sourced {
                    value: retry_policy(retry).map_err(|e| field("retry", e))?,
                    source,
                });
            }
            if let (None, Some(concurrency)) = (&policy.concurrency, &option.concurrency) {
                policy.concurrency = Some(Sourced {
                    value: concurrency_policy(concurrency).map_err(|e| field("concurrency", e))?,
                    source,
                });
            }
            if policy.allowed_callers.is_none() && !option.allowed_callers.is_empty() {
                let callers = option
                    .allowed_callers
                    .iter()
                    .map(|c| CallerPattern::try_from(c.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| field("allowed_callers", e))?;
                policy.allowed_callers = Some(Sourced { value: callers, source });
            }
        }
        Ok(policy)
    }
}

fn optional_duration(text: &str, name: &str) -> Result<Option<Duration>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    duration::parse(text).map(Some).map_err(|e| format!("{name}: {e}"))
}

fn retry_policy(retry: &pb::RetryPolicy) -> Result<RetryPolicy, String> {
    if retry.max_attempts < 2 {
        return Err(format!(
            "max_attempts: {} allows no retry; it counts the first attempt too, so set 2 or more",
            retry.max_attempts
        ));
    }
    if retry.retryable_codes.is_empty() {
        return Err("retryable_codes: list at least one status code, e.g. \"UNAVAILABLE\"".into());
    }
    let retryable_codes = retry
        .retryable_codes
        .iter()
        .map(|name| {
            Code::from_name(name).ok_or_else(|| {
                format!(
                    "retryable_codes: `{name}` is not a gRPC status code; use one of {}",
                    Code::names().collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if retry.backoff_multiplier < 0.0 || retry.backoff_multiplier.is_nan() {
        return Err("backoff_multiplier: must be a positive number".into());
    }
    Ok(RetryPolicy {
        max_attempts: retry.max_attempts,
        retryable_codes,
        initial_backoff: optional_duration(&retry.initial_backoff, "initial_backoff")?,
        max_backoff: optional_duration(&retry.max_backoff, "max_backoff")?,
        backoff_multiplier: (retry.backoff_multiplier > 0.0).then_some(retry.backoff_multiplier),
    })
}

fn concurrency_policy(concurrency: &pb::ConcurrencyPolicy) -> Result<ConcurrencyPolicy, String> {
    if concurrency.max_in_flight == 0 {
        return Err("max_in_flight: must be at least 1".into());
    }
    Ok(ConcurrencyPolicy {
        max_in_flight: concurrency.max_in_flight,
        max_queue: concurrency.max_queue,
        queue_timeout: optional_duration(&concurrency.queue_timeout, "queue_timeout")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_options_win_field_by_field_over_service_options() {
        let service = pb::Policy {
            timeout: "2s".into(),
            idle_timeout: "30s".into(),
            allowed_callers: vec!["spiffe://td/*".into()],
            ..Default::default()
        };
        let method = pb::Policy {
            timeout: "250ms".into(),
            ..Default::default()
        };
        let policy = MethodPolicy::from_options(Some(&method), Some(&service)).unwrap();
        assert_eq!(
            policy.timeout,
            Some(Sourced {
                value: Duration::from_millis(250),
                source: Source::MethodOption
            })
        );
        assert_eq!(policy.idle_timeout.unwrap().source, Source::ServiceOption);
        assert_eq!(policy.allowed_callers.unwrap().value.len(), 1);
        assert!(policy.retry.is_none());
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
        let err = MethodPolicy::from_options(Some(&method), None).unwrap_err();
        assert!(
            err.starts_with("(protomesh.v1.method).retry: retryable_codes: `UNAVAIL`"),
            "{err}"
        );
        assert!(err.contains("UNAVAILABLE"), "{err}");

        let service = pb::Policy {
            timeout: "1 sec".into(),
            ..Default::default()
        };
        let err = MethodPolicy::from_options(None, Some(&service)).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.service).timeout:"), "{err}");

        let one_attempt = pb::Policy {
            retry: Some(pb::RetryPolicy {
                max_attempts: 1,
                retryable_codes: vec!["UNAVAILABLE".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            MethodPolicy::from_options(Some(&one_attempt), None)
                .unwrap_err()
                .contains("2 or more")
        );
    }
}
