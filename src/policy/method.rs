//! A method's policy: the same fields wherever they are written (proto
//! options, config defaults, config overrides), merged field by field in the
//! agreed precedence, each field remembering where its value came from.
//!
//! Precedence: `policy.methods["pkg.Service/Method"]` > `policy.methods["pkg.Service/*"]`
//! > `(protomesh.v1.method)` > `(protomesh.v1.service)` > `policy.defaults`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::duration;
use crate::contract::{CallShape, Idempotency, MethodInfo};
use crate::grpc::Code;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `policy.methods[KEY]` in the config; the key is kept.
    ConfigOverride(Arc<str>),
    MethodOption,
    ServiceOption,
    ConfigDefault,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::ConfigOverride(key) => write!(f, "config policy.methods[\"{key}\"]"),
            Source::MethodOption => f.write_str("(protomesh.v1.method)"),
            Source::ServiceOption => f.write_str("(protomesh.v1.service)"),
            Source::ConfigDefault => f.write_str("config policy.defaults"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: Source,
}

/// Retries, as gRFC A6 describes them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 turns retries off.
    pub max_attempts: u32,
    #[serde(default)]
    pub retryable_codes: Vec<Code>,
    #[serde(default = "defaults::initial_backoff", deserialize_with = "duration::deserialize")]
    pub initial_backoff: Duration,
    #[serde(default = "defaults::max_backoff", deserialize_with = "duration::deserialize")]
    pub max_backoff: Duration,
    #[serde(default = "defaults::backoff_multiplier")]
    pub backoff_multiplier: f64,
}

impl RetryPolicy {
    /// A policy with the default backoff: 25ms initial, ×2, at most 1s.
    pub fn new(max_attempts: u32, retryable_codes: Vec<Code>) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            retryable_codes,
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            backoff_multiplier: defaults::backoff_multiplier(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts: 0 is not a number of attempts; 1 turns retries off".into());
        }
        if self.max_attempts > 1 && self.retryable_codes.is_empty() {
            return Err("retryable_codes: list at least one status code, e.g. \"UNAVAILABLE\"".into());
        }
        if self.backoff_multiplier.is_nan() || self.backoff_multiplier < 1.0 {
            return Err(format!("backoff_multiplier: {} must be 1 or more", self.backoff_multiplier));
        }
        if self.max_backoff < self.initial_backoff {
            return Err("max_backoff: must not be shorter than initial_backoff".into());
        }
        Ok(())
    }

    pub fn retries(&self) -> bool {
        self.max_attempts > 1
    }
}

/// A bulkhead: calls in flight at once, and how many may wait, for how long.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyPolicy {
    pub max_in_flight: u32,
    #[serde(default)]
    pub max_queue: u32,
    #[serde(default = "defaults::queue_timeout", deserialize_with = "duration::deserialize")]
    pub queue_timeout: Duration,
}

impl ConcurrencyPolicy {
    /// No queue by default: a full bulkhead refuses at once.
    pub fn new(max_in_flight: u32) -> ConcurrencyPolicy {
        ConcurrencyPolicy { max_in_flight, max_queue: 0, queue_timeout: defaults::queue_timeout() }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_in_flight == 0 {
            return Err("max_in_flight: must be at least 1".into());
        }
        Ok(())
    }
}

/// The policy fields, as any one source writes them.
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
    #[serde(default)]
    pub concurrency: Option<ConcurrencyPolicy>,
}

impl PolicyFields {
    /// Errors are `field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(retry) = &self.retry {
            retry.validate().map_err(|e| format!("retry.{e}"))?;
        }
        if let Some(concurrency) = &self.concurrency {
            concurrency.validate().map_err(|e| format!("concurrency.{e}"))?;
        }
        Ok(())
    }
}

/// A method's effective policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodPolicy {
    pub timeout: Option<Sourced<Duration>>,
    pub idle_timeout: Option<Sourced<Duration>>,
    pub stream_timeout: Option<Sourced<Duration>>,
    pub retry: Option<Sourced<RetryPolicy>>,
    pub concurrency: Option<Sourced<ConcurrencyPolicy>>,
}

fn first<T: Clone>(
    layers: &[(&PolicyFields, Source)],
    field: impl Fn(&PolicyFields) -> Option<&T>,
) -> Option<Sourced<T>> {
    layers.iter().find_map(|(fields, source)| {
        field(fields).map(|value| Sourced { value: value.clone(), source: source.clone() })
    })
}

impl MethodPolicy {
    /// Merges the sources for `service/method` (`info` is `None` for a method
    /// outside the contracts). Retries from `policy.defaults` apply only to
    /// methods whose contract marks them idempotent or free of side effects;
    /// a retry policy written for the method or its service makes it eligible.
    /// `timeout` bounds calls with one response (unary, client-streaming);
    /// streams, and calls of unknown shape, get `stream_timeout` instead.
    pub fn resolve(
        service: &str,
        method: &str,
        info: Option<&MethodInfo>,
        config: &crate::config::PolicyConfig,
    ) -> MethodPolicy {
        let method_key = format!("{service}/{method}");
        let service_key = format!("{service}/*");
        let mut layers: Vec<(&PolicyFields, Source)> = Vec::with_capacity(5);
        for key in [method_key, service_key] {
            if let Some((key, fields)) = config.methods.get_key_value(&key) {
                layers.push((fields, Source::ConfigOverride(key.as_str().into())));
            }
        }
        if let Some(info) = info {
            layers.extend(info.contract.method.as_ref().map(|f| (f, Source::MethodOption)));
            layers.extend(info.contract.service.as_ref().map(|f| (f, Source::ServiceOption)));
        }
        layers.push((&config.defaults, Source::ConfigDefault));

        let idempotent = info.is_some_and(|i| i.idempotency != Idempotency::Unknown);
        let retry = first(&layers, |f| f.retry.as_ref())
            .filter(|retry| retry.source != Source::ConfigDefault || idempotent)
            .filter(|retry| retry.value.retries());
        let one_response = info.is_some_and(|i| matches!(i.shape, CallShape::Unary | CallShape::ClientStreaming));
        MethodPolicy {
            timeout: first(&layers, |f| f.timeout.as_ref()).filter(|_| one_response),
            idle_timeout: first(&layers, |f| f.idle_timeout.as_ref()),
            stream_timeout: first(&layers, |f| f.stream_timeout.as_ref()),
            retry,
            concurrency: first(&layers, |f| f.concurrency.as_ref()),
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn initial_backoff() -> Duration {
        Duration::from_millis(25)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(1)
    }
    pub fn backoff_multiplier() -> f64 {
        2.0
    }
    pub fn queue_timeout() -> Duration {
        Duration::from_millis(100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use crate::contract::{CallShape, ContractPolicy};

    fn info(idempotency: Idempotency, method: Option<PolicyFields>, service: Option<PolicyFields>) -> MethodInfo {
        MethodInfo {
            service: "s.S".into(),
            method: "M".into(),
            path: "/s.S/M".into(),
            shape: CallShape::Unary,
            idempotency,
            contract: ContractPolicy { method, service, allowed_callers: None },
            file: "s.proto".into(),
        }
    }

    fn retry(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: attempts,
            retryable_codes: vec![Code::Unavailable],
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            backoff_multiplier: 2.0,
        }
    }

    fn timeout(ms: u64) -> PolicyFields {
        PolicyFields { timeout: Some(Duration::from_millis(ms)), ..Default::default() }
    }

    #[test]
    fn precedence_is_override_then_method_then_service_then_defaults() {
        let mut config = PolicyConfig { defaults: timeout(5000), ..Default::default() };
        let method = info(Idempotency::Unknown, Some(timeout(300)), Some(timeout(2000)));
        let resolve = |config: &PolicyConfig| MethodPolicy::resolve("s.S", "M", Some(&method), config).timeout.unwrap();
        assert_eq!(resolve(&config).source, Source::MethodOption);
        config.methods.insert("s.S/*".into(), timeout(100));
        assert_eq!(resolve(&config).source, Source::ConfigOverride("s.S/*".into()));
        config.methods.insert("s.S/M".into(), timeout(50));
        let chosen = resolve(&config);
        assert_eq!((chosen.value, chosen.source), (Duration::from_millis(50), Source::ConfigOverride("s.S/M".into())));

        let bare = info(Idempotency::Unknown, None, Some(timeout(2000)));
        let chosen = MethodPolicy::resolve("s.S", "M", Some(&bare), &PolicyConfig::default()).timeout.unwrap();
        assert_eq!(chosen.source, Source::ServiceOption);
        let defaults = PolicyConfig { defaults: timeout(5000), ..Default::default() };
        let plain = info(Idempotency::Unknown, None, None);
        let chosen = MethodPolicy::resolve("s.S", "M", Some(&plain), &defaults).timeout.unwrap();
        assert_eq!(chosen.source, Source::ConfigDefault);
        let mut stream = info(Idempotency::Unknown, None, None);
        stream.shape = CallShape::ServerStreaming;
        assert!(MethodPolicy::resolve("s.S", "M", Some(&stream), &defaults).timeout.is_none());
        assert!(MethodPolicy::resolve("x.X", "Y", None, &defaults).timeout.is_none());
    }

    #[test]
    fn default_retries_apply_only_to_idempotent_methods() {
        let config = PolicyConfig {
            defaults: PolicyFields { retry: Some(retry(3)), ..Default::default() },
            ..Default::default()
        };
        let plain = info(Idempotency::Unknown, None, None);
        assert!(MethodPolicy::resolve("s.S", "M", Some(&plain), &config).retry.is_none());
        let safe = info(Idempotency::NoSideEffects, None, None);
        assert_eq!(MethodPolicy::resolve("s.S", "M", Some(&safe), &config).retry.unwrap().value.max_attempts, 3);
        let explicit =
            info(Idempotency::Unknown, Some(PolicyFields { retry: Some(retry(2)), ..Default::default() }), None);
        assert_eq!(
            MethodPolicy::resolve("s.S", "M", Some(&explicit), &config).retry.unwrap().source,
            Source::MethodOption
        );
        let opted_out =
            info(Idempotency::Idempotent, Some(PolicyFields { retry: Some(retry(1)), ..Default::default() }), None);
        assert!(MethodPolicy::resolve("s.S", "M", Some(&opted_out), &config).retry.is_none());
    }

    #[test]
    fn validation_names_the_field() {
        assert!(retry(0).validate().unwrap_err().starts_with("max_attempts"));
        let no_codes = RetryPolicy { retryable_codes: vec![], ..retry(3) };
        assert!(no_codes.validate().unwrap_err().starts_with("retryable_codes"));
        assert!(RetryPolicy { retryable_codes: vec![], ..retry(1) }.validate().is_ok());
        let fields = PolicyFields {
            concurrency: Some(ConcurrencyPolicy { max_in_flight: 0, max_queue: 0, queue_timeout: Duration::ZERO }),
            ..Default::default()
        };
        assert!(fields.validate().unwrap_err().starts_with("concurrency.max_in_flight"));
    }
}
