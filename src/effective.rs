//! A method's effective policy: the fields of every source (config override
//! for the method, for its service, the contract's method option, service
//! option, config defaults) merged field by field in that order, each field
//! remembering where it came from. The routes are built from it, and it is
//! rendered once, the same way, for `protomesh check` and for `/config`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::contract::{CallShape, Contracts, Idempotency, MethodInfo};
use crate::policy::authz::{AuthorizationConfig, MethodAuthz, MethodPattern, Rule};
use crate::policy::deadline::DeadlinePolicy;
use crate::policy::fields::FieldView;
use crate::policy::retry::RetrySettings;
use crate::policy::source::Source;
use crate::policy::validate::{self, RequestRules, ValidationFamilies};
use crate::policy::{MethodPolicy, PolicyConfig, PolicyFields};

/// Compiles the request rules of every method that validates, so that a
/// rule that does not compile fails the load before anything is built; the
/// contracts keep what was compiled for the routes.
pub fn check_request_rules(contracts: &Contracts, policy: &PolicyConfig) -> Result<(), String> {
    for method in contracts.methods() {
        let effective = MethodPolicy::resolve(&method.service, &method.method, Some(method), policy);
        effective.request_rules(contracts, method, &ValidationFamilies::default())?;
    }
    Ok(())
}

impl MethodPolicy {
    /// Merges the sources for `service/method` (`info` is `None` for a method
    /// outside the contracts). Retries from `policy.defaults` apply only to
    /// methods whose contract marks them idempotent or free of side effects;
    /// a retry policy written for the method or its service makes it eligible.
    /// `timeout` bounds calls with one response (unary, client-streaming);
    /// streams get `stream_timeout` instead. A method outside the contracts
    /// may be either: it gets `stream_timeout`, or `timeout` when no
    /// `stream_timeout` is set, so that no call goes unbounded for want of a
    /// contract.
    pub fn resolve(service: &str, method: &str, info: Option<&MethodInfo>, config: &PolicyConfig) -> MethodPolicy {
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
        let mut policy = MethodPolicy::merge(&layers);
        policy.retry = policy
            .retry
            .filter(|retry| retry.source != Source::ConfigDefault || idempotent)
            .filter(|retry| retry.value.retries());
        // Only a call that may run twice at once is hedged; the more specific
        // of `retry` and `hedging` wins.
        let precedence = |source: &Source| layers.iter().position(|(_, s)| s == source);
        policy.hedging = policy.hedging.filter(|_| idempotent).filter(|hedging| {
            policy.retry.as_ref().is_none_or(|retry| precedence(&hedging.source) <= precedence(&retry.source))
        });
        if policy.hedging.is_some() {
            policy.retry = None;
        }
        let timeout_applies = match info {
            Some(info) => info.shape.one_response(),
            None => policy.stream_timeout.is_none(),
        };
        if !timeout_applies {
            policy.timeout = None;
        }
        policy
    }

    /// `method`'s request rules, compiled, when it validates and its request
    /// type carries rules; a rule that does not compile is an error naming
    /// its file, message and field.
    pub fn request_rules(
        &self,
        contracts: &Contracts,
        method: &MethodInfo,
        failures: &ValidationFamilies,
    ) -> Result<Option<Arc<RequestRules>>, String> {
        let Some(turned_on) = self.validate.as_ref().filter(|validate| validate.value) else { return Ok(None) };
        let Some((input, _)) = contracts.method_types(&method.path) else { return Ok(None) };
        // Validation holds a message whole: no more than the method lets through.
        let max = u32::try_from(self.message_hold()).unwrap_or(u32::MAX);
        contracts.validators().rules(&method.path, &input, turned_on, max, failures)
    }

    /// The most of one message the sidecar holds whole (to check it, or a
    /// JSON body to transcode): `max_message_size`, else 4 MiB.
    pub fn message_hold(&self) -> u64 {
        self.max_message_size.as_ref().map_or(u64::from(validate::DEFAULT_HOLD), |size| size.value.as_u64())
    }

    /// What the deadline layer enforces: `timeout`, else `stream_timeout`.
    pub fn deadline(&self, min_budget: Duration) -> DeadlinePolicy {
        let limit = [("timeout", &self.timeout), ("stream_timeout", &self.stream_timeout)]
            .into_iter()
            .find_map(|(field, value)| value.clone().map(|value| (field, value)));
        DeadlinePolicy { limit, idle: self.idle_timeout.clone(), min_budget }
    }

    /// What the retry layer does for a method of `shape` (`None`: outside the contracts).
    pub fn retries(&self, shape: Option<CallShape>, max_replay_bytes: usize) -> RetrySettings {
        RetrySettings {
            policy: self.retry.as_ref().map(|r| r.value.clone()),
            hedging: self.hedging.as_ref().map(|h| h.value.clone()),
            replayable: shape.is_some_and(CallShape::one_request),
            max_replay_bytes,
        }
    }
}

/// The contract's `allowed_callers` of a method, as a rule named after its source.
pub fn contract_rule(method: &MethodInfo) -> Option<Arc<Rule>> {
    let callers = method.contract.allowed_callers.as_ref()?;
    let owner = if callers.source == Source::ServiceOption { &method.service } else { &method.path };
    Some(Arc::new(Rule {
        name: format!("allowed_callers in {} of {owner}", callers.source),
        methods: vec![MethodPattern::Any],
        callers: callers.value.clone(),
    }))
}

/// The rules governing `service/method` inbound: the config's, and its
/// contract's `allowed_callers` (for a method the contract does not
/// declare, its service's).
pub fn authorization(
    authz: &AuthorizationConfig,
    rules: &[Arc<Rule>],
    contracts: &Contracts,
    service: &str,
    method: &str,
) -> MethodAuthz {
    let path = format!("/{service}/{method}");
    let contract = match contracts.method(&path) {
        Some(info) => contract_rule(info),
        None => service_rule(contracts, service),
    };
    MethodAuthz::resolve(rules, authz.default, service, method, contract)
}

/// The service's own `allowed_callers`, for methods its contract does not declare.
fn service_rule(contracts: &Contracts, service: &str) -> Option<Arc<Rule>> {
    let method = contracts.methods().find(|m| m.service == service)?;
    Some(Arc::new(Rule {
        name: format!("allowed_callers in {} of {service}", Source::ServiceOption),
        methods: vec![MethodPattern::Any],
        callers: method.contract.service_callers.clone()?,
    }))
}

/// A method with its effective policy, field by field.
pub struct MethodView {
    pub path: String,
    pub method: String,
    pub file: String,
    pub shape: CallShape,
    pub idempotency: Idempotency,
    pub fields: Vec<FieldView>,
}

impl MethodView {
    pub fn new(method: &MethodInfo, policy: &PolicyConfig) -> MethodView {
        let effective = MethodPolicy::resolve(&method.service, &method.method, Some(method), policy);
        let mut fields = effective.views();
        let callers = method.contract.allowed_callers.as_ref().map(|callers| {
            let names: Vec<String> = callers.value.iter().map(ToString::to_string).collect();
            (json!(names), names.join(", "), callers.source.to_string())
        });
        fields.push(FieldView { name: "allowed_callers", value: callers });
        MethodView {
            path: method.path.clone(),
            method: method.method.clone(),
            file: method.file.clone(),
            shape: method.shape,
            idempotency: method.idempotency,
            fields,
        }
    }

    /// As `/config` shows it: each field `{value, source}`, or null.
    pub fn to_json(&self) -> Value {
        let mut view = json!({
            "path": self.path,
            "shape": self.shape.to_string(),
            "idempotency": self.idempotency.as_str(),
        });
        for field in &self.fields {
            view[field.name] = match &field.value {
                Some((value, _, source)) => json!({ "value": value, "source": source }),
                None => Value::Null,
            };
        }
        view
    }

    /// As `protomesh check` prints it: the method, then each field set, with its source.
    pub fn to_text(&self) -> String {
        let idempotency = match self.idempotency {
            Idempotency::Unknown => String::new(),
            other => format!("  {}", other.as_str()),
        };
        let mut text = format!("  {:<24} {}{idempotency}\n", self.method, self.shape);
        for field in &self.fields {
            if let Some((_, value, source)) = &field.value {
                text.push_str(&format!("      {:<16} {value:<40} from {source}\n", field.name));
            }
        }
        text
    }
}

/// Every method of the contracts, by service, with its effective policy.
pub fn describe(contracts: &Contracts, policy: &PolicyConfig) -> Vec<(String, Vec<MethodView>)> {
    contracts
        .services()
        .into_iter()
        .map(|(service, methods)| (service.to_string(), methods.iter().map(|m| MethodView::new(m, policy)).collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ContractPolicy;
    use crate::grpc::Code;
    use crate::policy::hedge::HedgingPolicy;
    use crate::policy::retry::RetryPolicy;
    use crate::policy::source::Sourced;

    fn info(idempotency: Idempotency, method: Option<PolicyFields>, service: Option<PolicyFields>) -> MethodInfo {
        MethodInfo {
            service: "s.S".into(),
            method: "M".into(),
            path: "/s.S/M".into(),
            shape: CallShape::Unary,
            input: "s.A".into(),
            output: "s.B".into(),
            idempotency,
            contract: ContractPolicy { method, service, ..Default::default() },
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
        // Outside the contracts: `timeout` unless a `stream_timeout` is set.
        assert_eq!(MethodPolicy::resolve("x.X", "Y", None, &defaults).timeout.unwrap().value, Duration::from_secs(5));
        let mut with_streams = defaults.clone();
        with_streams.defaults.stream_timeout = Some(Duration::from_secs(60));
        let undeclared = MethodPolicy::resolve("x.X", "Y", None, &with_streams);
        assert!(undeclared.timeout.is_none());
        assert_eq!(undeclared.deadline(Duration::ZERO).limit.unwrap().1.value, Duration::from_secs(60));
    }

    #[test]
    fn hedging_applies_to_idempotent_methods_and_the_more_specific_of_it_and_retry_wins() {
        let hedging =
            HedgingPolicy { max_attempts: 2, hedging_delay: Duration::from_millis(20), non_fatal_codes: vec![] };
        let hedged = PolicyFields { hedging: Some(hedging), ..Default::default() };
        let retried = PolicyFields { retry: Some(retry(3)), ..Default::default() };
        let config = PolicyConfig { defaults: retried.clone(), ..Default::default() };
        let resolve = |method: &MethodInfo| MethodPolicy::resolve("s.S", "M", Some(method), &config);

        let plain = info(Idempotency::Unknown, Some(hedged.clone()), None);
        assert!(resolve(&plain).hedging.is_none(), "a method not marked idempotent is never hedged");
        let safe = info(Idempotency::Idempotent, Some(hedged.clone()), None);
        let policy = resolve(&safe);
        assert_eq!(policy.hedging.unwrap().source, Source::MethodOption);
        assert!(policy.retry.is_none(), "the method's hedging wins over the default retry");
        let retried_method = info(Idempotency::Idempotent, Some(retried), Some(hedged));
        let policy = resolve(&retried_method);
        assert!(
            policy.hedging.is_none() && policy.retry.is_some(),
            "the method's retry wins over its service's hedging"
        );
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
    fn the_deadline_layer_takes_timeout_else_stream_timeout() {
        let stream = Some(Sourced { value: Duration::from_secs(60), source: Source::ConfigDefault });
        let mut policy = MethodPolicy { stream_timeout: stream, ..Default::default() };
        assert_eq!(policy.deadline(Duration::ZERO).limit.unwrap().0, "stream_timeout");
        policy.timeout = Some(Sourced { value: Duration::from_secs(1), source: Source::MethodOption });
        let (field, limit) = policy.deadline(Duration::ZERO).limit.unwrap();
        assert_eq!((field, limit.value), ("timeout", Duration::from_secs(1)));
    }

    #[test]
    fn a_services_allowed_callers_govern_the_methods_its_contract_does_not_declare() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("g.proto"),
            r#"syntax = "proto3"; package pkg; import "protomesh/v1/options.proto";
            message M {}
            service Guarded {
              option (protomesh.v1.service) = { allowed_callers: ["spiffe://td/reader"] };
              rpc Get(M) returns (M) { option (protomesh.v1.method) = { allowed_callers: ["*"] }; }
            }"#,
        )
        .unwrap();
        let config = crate::contract::ContractsConfig {
            protos: vec!["g.proto".into()],
            include: vec![dir.path().into()],
            ..Default::default()
        };
        let contracts = Contracts::load(&config).unwrap();
        let authz = AuthorizationConfig::default();
        let caller = crate::identity::SpiffeId::parse("spiffe://td/writer").unwrap();
        let declared = authorization(&authz, &[], &contracts, "pkg.Guarded", "Get");
        assert!(declared.check(Some(&caller)).is_ok(), "the method's own option allows anyone");
        let undeclared = authorization(&authz, &[], &contracts, "pkg.Guarded", "Undeclared");
        let denial = undeclared.check(Some(&caller)).unwrap_err();
        assert_eq!(
            denial.to_string(),
            "not allowed by authorization rule \"allowed_callers in (protomesh.v1.service) of pkg.Guarded\""
        );
        let other = authorization(&authz, &[], &contracts, "pkg.Other", "Any");
        assert!(other.check(Some(&caller)).is_ok(), "a service without a contract falls to the default");
    }

    #[test]
    fn check_and_config_render_the_same_fields() {
        let method = info(Idempotency::NoSideEffects, Some(timeout(300)), None);
        let view = MethodView::new(&method, &PolicyConfig::default());
        let json = view.to_json();
        assert_eq!(json["timeout"]["value"], "300ms");
        assert_eq!(json["timeout"]["source"], "(protomesh.v1.method)");
        assert_eq!(json["retry"], Value::Null);
        assert_eq!(json["idempotency"], "no-side-effects");
        let text = view.to_text();
        assert!(text.starts_with("  M                        unary  no-side-effects\n"), "{text}");
        assert!(text.contains("timeout          300ms") && text.contains("from (protomesh.v1.method)"), "{text}");
        assert!(!text.contains("retry"), "unset fields are not printed: {text}");
    }
}
