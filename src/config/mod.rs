//! The sidecar's configuration: parsed once at start from a YAML file and
//! `PROTOMESH_*` environment variables, validated, then read-only.

pub mod duration;
mod load;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::identity::SpiffeId;
use crate::policy::authz::{CallerPattern, MethodPattern};
use crate::policy::method::{ConcurrencyPolicy, PolicyFields};
use crate::policy::outlier::OutlierConfig;

pub use load::{ConfigError, load};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The workload's name in logs and traces.
    #[serde(default)]
    pub service_name: Option<String>,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub contracts: ContractsConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Absent: this sidecar accepts no inbound traffic.
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Log one line per call (target `protomesh::access`): method, status,
    /// duration, peer and trace ID.
    #[serde(default)]
    pub access_log: bool,
    /// Deadlines, retries, bulkheads: defaults, per-method overrides and limits.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// On SIGTERM: how long in-flight calls may finish after GOAWAY.
    #[serde(default = "defaults::drain_timeout", deserialize_with = "duration::deserialize")]
    pub drain_timeout: Duration,
    /// Threads that carry traffic, each an event loop with its own
    /// connections. One suits a sidecar: the proxy stays off the app's cores;
    /// raise it for a pod whose traffic needs more than one core.
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: std::num::NonZeroUsize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM certificate chain, leaf first; the leaf carries the SPIFFE ID.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign peers' certificates.
    pub trust_bundle: PathBuf,
    /// How often the certificate and key files are checked for renewal.
    #[serde(default = "defaults::reload_interval", deserialize_with = "duration::deserialize")]
    pub reload_interval: Duration,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractsConfig {
    /// `.proto` files, found through `include` like protoc's `-I`.
    #[serde(default)]
    pub protos: Vec<PathBuf>,
    #[serde(default)]
    pub include: Vec<PathBuf>,
    /// Binary `FileDescriptorSet`s (`protoc --include_imports -o`).
    #[serde(default)]
    pub descriptor_sets: Vec<PathBuf>,
    #[serde(default)]
    pub mode: ContractMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContractMode {
    /// Calls to methods outside the contracts get UNIMPLEMENTED from the sidecar.
    #[default]
    Strict,
    /// Calls to unknown methods are forwarded by service name.
    Permissive,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default = "defaults::outbound_listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration::deserialize")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            listen: defaults::outbound_listen(),
            connect_timeout: defaults::connect_timeout(),
            upstreams: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Fully qualified gRPC service names routed to this upstream.
    pub services: Vec<String>,
    /// `ip:port` or `dns-name:port` of the peers' inbound sidecars; names are
    /// re-resolved every `resolve_interval` (a headless Service gives one A record per pod).
    pub endpoints: Vec<String>,
    /// The SPIFFE ID every endpoint must present.
    pub identity: SpiffeId,
    #[serde(default = "defaults::resolve_interval", deserialize_with = "duration::deserialize")]
    pub resolve_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "defaults::inbound_listen")]
    pub listen: SocketAddr,
    /// The local application's plaintext HTTP/2 address.
    pub app: SocketAddr,
    #[serde(default)]
    pub authorization: AuthorizationConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// What applies to a method no rule (and no `allowed_callers` option) names.
    #[serde(default)]
    pub default: DefaultAuthorization,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultAuthorization {
    /// Any caller with a certificate from the trust bundle.
    #[default]
    AllAuthenticated,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    pub name: String,
    /// `pkg.Service/Method`, `pkg.Service/*` or `*`.
    pub methods: Vec<MethodPattern>,
    /// SPIFFE IDs: exact, a prefix ending in `/*`, or `*` for any authenticated caller.
    pub callers: Vec<CallerPattern>,
}

/// Span export over OTLP/gRPC. Off unless an endpoint is set here or in
/// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// e.g. `http://jaeger-collector.observability:4317`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// For traces the caller did not start: the share sampled (parent-based).
    #[serde(default = "defaults::sample_ratio")]
    pub sample_ratio: f64,
    /// Sent with every export, e.g. an authorization header.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "defaults::export_timeout", deserialize_with = "duration::deserialize")]
    pub timeout: Duration,
    /// Spans waiting for export; beyond it spans are dropped (and counted).
    #[serde(default = "defaults::span_queue")]
    pub queue_size: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: defaults::sample_ratio(),
            headers: BTreeMap::new(),
            timeout: defaults::export_timeout(),
            queue_size: defaults::span_queue(),
        }
    }
}

/// The admin server: probes, metrics, effective config, log level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
    /// Accept state changes (`PUT /log-level`) from other hosts than localhost.
    #[serde(default)]
    pub allow_remote_changes: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: defaults::admin_listen(), allow_remote_changes: false }
    }
}

#[derive(Clone, Debug, Deserialize)]
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

/// Retries may add at most `ratio` of the calls, plus `min_per_second`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    #[serde(default = "defaults::retry_ratio")]
    pub ratio: f64,
    #[serde(default = "defaults::min_retries_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig { ratio: defaults::retry_ratio(), min_per_second: defaults::min_retries_per_second() }
    }
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn outbound_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4140))
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn sample_ratio() -> f64 {
        1.0
    }
    pub fn export_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn span_queue() -> usize {
        4096
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 4191))
    }
    pub fn inbound_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 4143))
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn min_budget() -> Duration {
        Duration::from_millis(1)
    }
    pub fn max_replay_bytes() -> usize {
        64 * 1024
    }
    pub fn retry_ratio() -> f64 {
        0.2
    }
    pub fn min_retries_per_second() -> u32 {
        10
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn resolve_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn worker_threads() -> std::num::NonZeroUsize {
        std::num::NonZeroUsize::MIN
    }
}

impl Config {
    /// Checks what serde cannot: cross-field rules. Each error is (field path, problem).
    fn validate(&self) -> Result<(), (String, String)> {
        let mut routed = std::collections::HashMap::new();
        for (i, upstream) in self.outbound.upstreams.iter().enumerate() {
            let at = |field: &str| format!("outbound.upstreams[{i}].{field}");
            if upstream.services.is_empty() {
                return Err((at("services"), "list at least one gRPC service, e.g. shop.v1.Inventory".into()));
            }
            if upstream.endpoints.is_empty() {
                return Err((at("endpoints"), "list at least one host:port".into()));
            }
            for (j, service) in upstream.services.iter().enumerate() {
                if service.is_empty() || service.contains('/') {
                    return Err((
                        format!("outbound.upstreams[{i}].services[{j}]"),
                        format!("`{service}` is not a fully qualified service name such as shop.v1.Inventory"),
                    ));
                }
                if let Some(first) = routed.insert(service.as_str(), i) {
                    return Err((
                        format!("outbound.upstreams[{i}].services[{j}]"),
                        format!(
                            "`{service}` is already routed by outbound.upstreams[{first}]; a service has one upstream"
                        ),
                    ));
                }
            }
            for (j, endpoint) in upstream.endpoints.iter().enumerate() {
                if let Err(problem) = crate::proxy::discovery::parse_endpoint(endpoint) {
                    return Err((format!("outbound.upstreams[{i}].endpoints[{j}]"), problem));
                }
            }
        }
        if let Some(inbound) = &self.inbound {
            if inbound.app == inbound.listen {
                return Err(("inbound.app".into(), "must differ from inbound.listen".into()));
            }
            for (i, rule) in inbound.authorization.rules.iter().enumerate() {
                let at = |field: &str| format!("inbound.authorization.rules[{i}].{field}");
                if rule.methods.is_empty() {
                    return Err((at("methods"), "list at least one pattern, e.g. \"shop.v1.Inventory/*\"".into()));
                }
                if rule.callers.is_empty() {
                    return Err((at("callers"), "list at least one SPIFFE ID pattern, or \"*\"".into()));
                }
            }
        }
        self.policy.validate()?;
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(("tracing.sample_ratio".into(), "a share between 0 and 1, e.g. 0.1 for 10%".into()));
        }
        if self.contracts.protos.is_empty() && self.contracts.descriptor_sets.is_empty() {
            return Err((
                "contracts".into(),
                "name the service contracts: contracts.protos (with contracts.include) or contracts.descriptor_sets"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl PolicyConfig {
    fn validate(&self) -> Result<(), (String, String)> {
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
        if !(0.0..=10.0).contains(&self.retry_budget.ratio) {
            return Err(("policy.retry_budget.ratio".into(), "must be between 0 and 10, e.g. 0.2 for 20%".into()));
        }
        Ok(())
    }
}
