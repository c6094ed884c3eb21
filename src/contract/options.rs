//! Policy read from the contract: the `(protomesh.v1.method)` and
//! `(protomesh.v1.service)` options. An option's message is turned into JSON
//! (proto field names, unset fields left out) and read by the same serde types
//! as the config file's `policy` section, so both share their defaults,
//! checks and error messages.

use prost_reflect::{DynamicMessage, SerializeOptions};
use serde_json::Value;

use crate::policy::PolicyFields;
use crate::policy::authz::CallerPattern;
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

/// One option, read: its policy fields and its `allowed_callers`.
struct PolicyOption {
    fields: PolicyFields,
    callers: Option<Sourced<Vec<CallerPattern>>>,
}

impl ContractPolicy {
    /// `method` and `service` are `protomesh.v1.Policy` messages. Errors name
    /// the option and field, e.g. `(protomesh.v1.method).retry.max_attempts: ...`.
    pub fn from_options(
        method: Option<&DynamicMessage>,
        service: Option<&DynamicMessage>,
    ) -> Result<ContractPolicy, String> {
        let method = method.map(|m| read_option(m, Source::MethodOption)).transpose()?;
        let service = service.map(|s| read_option(s, Source::ServiceOption)).transpose()?;
        let service_callers = service.as_ref().and_then(|s| s.callers.clone());
        let (method, method_callers) = method.map_or((None, None), |m| (Some(m.fields), m.callers));
        Ok(ContractPolicy {
            method,
            service: service.map(|s| s.fields),
            allowed_callers: method_callers.or_else(|| service_callers.clone()),
            service_callers: service_callers.map(|callers| callers.value),
        })
    }
}

fn read_option(option: &DynamicMessage, source: Source) -> Result<PolicyOption, String> {
    let json = option
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new().use_proto_field_name(true))
        .map_err(|e| format!("{source}: cannot be read: {e}"))?;
    let Value::Object(mut object) = json else {
        return Err(format!("{source}: not a protomesh.v1.Policy message"));
    };
    let callers = match object.remove("allowed_callers") {
        None => None,
        Some(callers) => {
            let value = serde_json::from_value::<Vec<String>>(callers)
                .map_err(|e| e.to_string())
                .and_then(|callers| callers.into_iter().map(CallerPattern::try_from).collect())
                .map_err(|e| format!("{source}.allowed_callers: {e}"))?;
            Some(Sourced { value, source: source.clone() })
        }
    };
    let fields: PolicyFields = serde_path_to_error::deserialize(Value::Object(object))
        .map_err(|e| format!("{source}.{}: {}", e.path(), e.inner()))?;
    fields.validate().map_err(|e| format!("{source}.{e}"))?;
    Ok(PolicyOption { fields, callers })
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;
    use std::time::Duration;

    use bytesize::ByteSize;
    use prost_reflect::DescriptorPool;
    use serde_json::json;

    use super::*;
    use crate::grpc::Code;
    use crate::policy::bulkhead::ConcurrencyPolicy;

    /// A `protomesh.v1.Policy` option written as its proto JSON.
    fn option(json: Value) -> DynamicMessage {
        static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
            let mut compiler = protox::Compiler::new([concat!(env!("CARGO_MANIFEST_DIR"), "/proto")]).unwrap();
            compiler.open_file(crate::contract::OPTIONS_PROTO_NAME).unwrap();
            compiler.descriptor_pool()
        });
        let policy = POOL.get_message_by_name("protomesh.v1.Policy").unwrap();
        DynamicMessage::deserialize(policy, json).unwrap()
    }

    fn method_fields(json: Value) -> Result<PolicyFields, String> {
        ContractPolicy::from_options(Some(&option(json)), None).map(|policy| policy.method.unwrap())
    }

    #[test]
    fn reads_hedging_and_a_bulkhead_with_their_defaults() {
        let hedged = json!({
            "hedging": {"max_attempts": 3, "hedging_delay": "40ms", "non_fatal_codes": ["UNAVAILABLE"]},
            "concurrency": {"max_in_flight": 8},
        });
        let fields = method_fields(hedged.clone()).unwrap();
        let hedging = fields.hedging.unwrap();
        assert_eq!((hedging.max_attempts, hedging.hedging_delay), (3, Duration::from_millis(40)));
        assert_eq!(fields.concurrency.unwrap(), ConcurrencyPolicy::new(8), "no queue, and its timeout's default");

        let mut both = hedged;
        both["retry"] = json!({"max_attempts": 2, "retryable_codes": ["UNAVAILABLE"]});
        let err = method_fields(both).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).hedging: a method retries or hedges, not both"), "{err}");
    }

    #[test]
    fn reads_both_options_and_takes_the_methods_allowed_callers_first() {
        let service = option(json!({"timeout": "2s", "allowed_callers": ["spiffe://td/*"]}));
        let method = option(json!({"timeout": "250ms"}));
        let policy = ContractPolicy::from_options(Some(&method), Some(&service)).unwrap();
        assert_eq!(policy.method.unwrap().timeout, Some(Duration::from_millis(250)));
        assert_eq!(policy.service.unwrap().timeout, Some(Duration::from_secs(2)));
        assert_eq!(policy.allowed_callers.unwrap().source, Source::ServiceOption);
        assert_eq!(policy.service_callers.unwrap().len(), 1);
    }

    #[test]
    fn sizes_are_written_with_units() {
        assert_eq!(
            method_fields(json!({"max_message_size": "4MiB"})).unwrap().max_message_size,
            Some(ByteSize::mib(4))
        );
        let err = method_fields(json!({"max_message_size": "4 lots"})).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).max_message_size: `4 lots` is not a size"), "{err}");
    }

    #[test]
    fn unset_fields_take_the_config_files_defaults() {
        let retry = json!({"retry": {"max_attempts": 3, "retryable_codes": ["UNAVAILABLE"]}});
        let retry = method_fields(retry).unwrap().retry.unwrap();
        assert_eq!((retry.initial_backoff, retry.backoff_multiplier), (Duration::from_millis(25), 2.0));
        let limit = method_fields(json!({"rate_limit": {"per_second": 2.5}})).unwrap().rate_limit.unwrap();
        assert_eq!((limit.burst, limit.burst()), (None, 3), "burst 0 is unset: a second's worth");
        assert_eq!(method_fields(json!({})).unwrap(), PolicyFields::default());
    }

    #[test]
    fn invalid_option_values_name_the_option_and_field() {
        let misspelt = json!({"retry": {"max_attempts": 3, "retryable_codes": ["UNAVAIL"]}});
        let err = method_fields(misspelt).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).retry.retryable_codes[0]: `UNAVAIL`"), "{err}");
        assert!(err.contains("UNAVAILABLE"), "{err}");

        let service = option(json!({"timeout": "1 sec"}));
        let err = ContractPolicy::from_options(None, Some(&service)).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.service).timeout:"), "{err}");

        let err = method_fields(json!({"retry": {"max_attempts": 3}})).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).retry.retryable_codes: list at least one"), "{err}");
        let err = method_fields(json!({"retry": {"retryable_codes": ["UNAVAILABLE"]}})).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).retry: missing field `max_attempts`"), "{err}");
        let err = method_fields(json!({"allowed_callers": ["https://td/x"]})).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).allowed_callers: "), "{err}");
    }

    #[test]
    fn endpoint_failure_codes_are_status_names() {
        let counted = method_fields(json!({"endpoint_failure_codes": ["UNAVAILABLE"]})).unwrap();
        assert_eq!(counted.endpoint_failure_codes, Some(vec![Code::Unavailable]));
        let err = method_fields(json!({"endpoint_failure_codes": ["BROKEN"]})).unwrap_err();
        assert!(err.starts_with("(protomesh.v1.method).endpoint_failure_codes[0]: "), "{err}");
    }
}
