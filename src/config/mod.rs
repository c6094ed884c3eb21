//! The sidecar's configuration: a YAML file and `PROTOMESH_*` environment
//! variables, parsed and validated whole. Each concern owns its section's
//! types (identity, contracts, policy, tracing); this module puts them
//! together with the listeners', and says which settings a running sidecar
//! cannot take without a restart.

pub mod health_checks;
mod limits;
mod load;
pub mod probes;
pub mod web;

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::contract::ContractsConfig;
use crate::discovery::kubernetes::KubernetesConfig;
use crate::duration;
use crate::identity::{IdentityConfig, SpiffeId};
use crate::policy::PolicyConfig;
use crate::policy::authz::AuthorizationConfig;
use crate::telemetry::TracingConfig;
use health_checks::{HealthAnswer, HealthCheckConfig};

pub use limits::{CONNECTION_WINDOW, LimitsConfig};
pub use load::{ConfigError, load, load_section, load_versioned, version_on_disk};

#[derive(Clone, Debug, PartialEq, Deserialize)]
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
    /// Bounds on what callers and peers can make the sidecar hold.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How changed files are noticed and taken while the sidecar runs.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// On SIGTERM: how long in-flight calls may finish after GOAWAY.
    #[serde(default = "defaults::drain_timeout", deserialize_with = "duration::deserialize")]
    pub drain_timeout: Duration,
    /// How the Kubernetes API is reached, for `k8s://` endpoints; read at start.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Threads that carry traffic, each an event loop with its own
    /// connections. One suits a sidecar: the proxy stays off the app's cores;
    /// raise it for a pod whose traffic needs more than one core.
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: std::num::NonZeroUsize,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default = "defaults::outbound_listen", deserialize_with = "address::deserialize")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration::deserialize")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Captured connections to these ports are forwarded as opaque TCP at
    /// once: their servers speak first, so the client sends nothing to
    /// detect. The default lists SMTP, MySQL, Galera, PostgreSQL, Redis,
    /// Elasticsearch and memcached.
    #[serde(default = "defaults::opaque_ports")]
    pub opaque_ports: Vec<u16>,
    /// How long a captured connection may take to send its first bytes
    /// before it is taken for opaque TCP.
    #[serde(default = "defaults::detect_timeout", deserialize_with = "duration::deserialize")]
    pub detect_timeout: Duration,
    /// Captured gRPC calls for services that no upstream routes.
    #[serde(default)]
    pub original_destination: OriginalDestinationConfig,
}

/// A captured gRPC call for a service that no upstream routes goes where the
/// app dialled it: over mTLS, which the capture at a meshed destination
/// hands to its sidecar, or in plaintext to networks outside the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginalDestinationConfig {
    /// Off: such calls get UNIMPLEMENTED, as calls made to the sidecar itself do.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// The trust domain whose workloads may answer there (the destination's
    /// workload is not known, only its address); by default this sidecar's own.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Destinations outside the mesh, called in plaintext HTTP/2.
    #[serde(default)]
    pub plaintext_networks: Vec<ipnet::IpNet>,
    /// Networks of meshed pods: captured TCP that is not gRPC goes to them
    /// over mTLS as well, to the sidecar their capture hands it to. Other
    /// destinations get it as it is, since they may have no sidecar to take it.
    #[serde(default)]
    pub opaque_mtls_networks: Vec<ipnet::IpNet>,
}

impl Default for OriginalDestinationConfig {
    fn default() -> Self {
        OriginalDestinationConfig {
            enabled: true,
            trust_domain: None,
            plaintext_networks: Vec::new(),
            opaque_mtls_networks: Vec::new(),
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            listen: defaults::outbound_listen(),
            connect_timeout: defaults::connect_timeout(),
            upstreams: Vec::new(),
            opaque_ports: defaults::opaque_ports(),
            detect_timeout: defaults::detect_timeout(),
            original_destination: OriginalDestinationConfig::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Fully qualified gRPC service names routed to this upstream.
    pub services: Vec<String>,
    /// `ip:port` or `dns-name:port` of the peers' inbound sidecars; names are
    /// re-resolved every `resolve_interval` (a headless Service gives one A record per pod).
    pub endpoints: Vec<String>,
    /// The SPIFFE ID every endpoint must present. Optional when every
    /// endpoint is a `k8s://` Service: each endpoint must then present its
    /// own pod's service account (`spiffe://<trust domain>/ns/<ns>/sa/<account>`).
    #[serde(default)]
    pub identity: Option<SpiffeId>,
    #[serde(default = "defaults::resolve_interval", deserialize_with = "duration::deserialize")]
    pub resolve_interval: Duration,
    /// Active gRPC health checks of the endpoints; off unless set.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "defaults::inbound_listen", deserialize_with = "address::deserialize")]
    pub listen: SocketAddr,
    /// The local application's plaintext HTTP/2 address, for connections
    /// made to `listen` itself. A connection the capture rules redirected
    /// goes to the app on `127.0.0.1` at the port it was made to.
    #[serde(default, deserialize_with = "address::deserialize_option")]
    pub app: Option<SocketAddr>,
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Whether a captured connection must be mTLS from a peer sidecar.
    #[serde(default)]
    pub mtls: MtlsConfig,
    /// Who answers peers' `grpc.health.v1.Health/Check` for the app.
    #[serde(default)]
    pub health: HealthAnswer,
    /// How long a captured connection to a permissive port may take to send
    /// its first byte (a TLS handshake or plaintext); a silent one is closed,
    /// never handed to the app.
    #[serde(default = "defaults::inbound_detect_timeout", deserialize_with = "duration::deserialize")]
    pub detect_timeout: Duration,
    /// App ports whose servers speak first: on a permissive port, a
    /// plaintext client waits for the app's greeting, so its connection is
    /// forwarded at once instead of waiting for its first byte. Such a port
    /// takes no mTLS while permissive. The default is `outbound.opaque_ports`'.
    #[serde(default = "defaults::opaque_ports")]
    pub opaque_ports: Vec<u16>,
    /// A listener for browsers' gRPC-Web calls; none by default.
    #[serde(default)]
    pub web: Option<web::WebConfig>,
}

/// Strict: only mTLS from peer sidecars reaches the app. Permissive: a
/// plaintext client is also forwarded to the app, as opaque TCP, counted and
/// logged, for a migration into the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    #[serde(default)]
    pub mode: MtlsMode,
    /// A mode per app port, overriding `mode`.
    #[serde(default)]
    pub ports: std::collections::BTreeMap<u16, MtlsMode>,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }
}

impl MtlsConfig {
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

/// The admin server: probes and metrics for the kubelet and Prometheus;
/// the effective config, the log level and reloads for localhost only.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_listen", deserialize_with = "address::deserialize")]
    pub listen: SocketAddr,
    /// Serve `/config`, `PUT /log-level` and `POST /reload` to other hosts than localhost too.
    #[serde(default)]
    pub allow_remote: bool,
    /// Connections open at once; more are closed at once, so that the admin
    /// server never takes the file descriptors the data plane needs.
    #[serde(default = "defaults::admin_connections")]
    pub max_connections: usize,
    /// Connections open at once from one address, so that a flood from one
    /// address leaves room for the kubelet's probes and Prometheus.
    #[serde(default = "defaults::admin_connections_per_source")]
    pub max_connections_per_source: usize,
    /// How long a client may take to send a request's head.
    #[serde(default = "defaults::header_read_timeout", deserialize_with = "duration::deserialize")]
    pub header_read_timeout: Duration,
    /// The app's probes that the admin server performs for the kubelet, by
    /// path; the injector sets them when it captures the pod's traffic.
    #[serde(default)]
    pub app_probes: probes::AppProbes,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: defaults::admin_listen(),
            allow_remote: false,
            max_connections: defaults::admin_connections(),
            max_connections_per_source: defaults::admin_connections_per_source(),
            header_read_timeout: defaults::header_read_timeout(),
            app_probes: probes::AppProbes::new(),
        }
    }
}

/// The config file, the contracts and the identity files are read again when
/// a watch on their directories sees a change (Kubernetes swaps a volume's
/// `..data` link), after `debounce` without further change; and every
/// `interval` in any case.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    #[serde(default = "defaults::yes")]
    pub watch: bool,
    #[serde(default = "defaults::debounce", deserialize_with = "duration::deserialize")]
    pub debounce: Duration,
    /// `0s` turns the periodic re-read off.
    #[serde(default = "defaults::reload_interval", deserialize_with = "duration::deserialize")]
    pub interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { watch: defaults::yes(), debounce: defaults::debounce(), interval: defaults::reload_interval() }
    }
}

/// Listen and app addresses, `IP:port`: a mistake is told with the fix.
mod address {
    use std::net::SocketAddr;

    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "`{text}` is not an IP:port socket address; write e.g. 127.0.0.1:8080 or 0.0.0.0:4143"
            ))
        })
    }

    pub fn deserialize_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        deserialize(d).map(Some)
    }
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn outbound_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4140))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 4191))
    }
    pub fn admin_connections() -> usize {
        32
    }
    pub fn admin_connections_per_source() -> usize {
        8
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn inbound_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 4143))
    }
    pub fn opaque_ports() -> Vec<u16> {
        vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211]
    }
    pub fn detect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    /// A client speaks at once after connecting; 3 s leaves room for its
    /// first segment to be lost and sent again.
    pub fn inbound_detect_timeout() -> Duration {
        Duration::from_secs(3)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
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
    pub fn yes() -> bool {
        true
    }
    pub fn debounce() -> Duration {
        Duration::from_millis(200)
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(10)
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
                match crate::discovery::parse_endpoint(endpoint) {
                    Err(problem) => return Err((format!("outbound.upstreams[{i}].endpoints[{j}]"), problem)),
                    Ok(crate::discovery::EndpointSpec::Kubernetes(_)) => {}
                    Ok(_) if upstream.identity.is_none() => {
                        let problem = format!(
                            "name the SPIFFE ID its endpoints present: `{endpoint}` is not a k8s:// Service, whose pods' \
                             service accounts would say"
                        );
                        return Err((at("identity"), problem));
                    }
                    Ok(_) => {}
                }
            }
            if let Some(check) = &upstream.health_check {
                check.validate().map_err(|problem| (at("health_check"), problem))?;
            }
        }
        if let Some(inbound) = &self.inbound {
            if let Some(app) = inbound.app
                && let Some(listener) = self.own_listener_at(app)
            {
                let problem = format!("{app} is the sidecar's own {listener}; name the app's address");
                return Err(("inbound.app".into(), problem));
            }
            inbound.authorization.validate()?;
            if let Some(web) = &inbound.web {
                web.validate().map_err(|e| ("inbound.web".to_string(), e))?;
            }
        }
        for (field, value) in [
            ("max_connections", self.admin.max_connections),
            ("max_connections_per_source", self.admin.max_connections_per_source),
        ] {
            if value == 0 {
                return Err((format!("admin.{field}"), "must be at least 1: the kubelet probes here".into()));
            }
        }
        probes::validate(&self.admin.app_probes)?;
        for (path, probe) in &self.admin.app_probes {
            if let Some(listener) = self.own_listener_at(SocketAddr::from(([127, 0, 0, 1], probe.port()))) {
                let problem = format!("port {} is the sidecar's own {listener}, not the app's", probe.port());
                return Err((format!("admin.app_probes.{path}"), problem));
            }
        }
        self.policy.validate()?;
        self.limits.validate()?;
        self.tracing.validate()?;
        self.contracts.validate()
    }

    /// Which of the sidecar's listeners takes connections made to `addr`, if
    /// one does. They act with the sidecar's identity, so nothing a peer sends
    /// is ever handed to one of them.
    pub fn own_listener_at(&self, addr: SocketAddr) -> Option<&'static str> {
        let inbound = self.inbound.as_ref().map(|inbound| ("inbound.listen", inbound.listen));
        let web = self.inbound.as_ref().and_then(|inbound| inbound.web.as_ref());
        let web = web.and_then(|web| web.listen).map(|listen| ("inbound.web.listen", listen));
        let listeners = [("outbound.listen", self.outbound.listen), ("admin.listen", self.admin.listen)];
        let takes = |listen: SocketAddr| {
            let ip = listen.ip().to_canonical();
            listen.port() == addr.port()
                && (ip.is_unspecified()
                    || ip == addr.ip().to_canonical()
                    || ip.is_loopback() && addr.ip().is_loopback())
        };
        listeners.into_iter().chain(inbound).chain(web).find(|(_, listen)| takes(*listen)).map(|(field, _)| field)
    }

    /// Puts back into `new` the settings a running sidecar keeps until it
    /// restarts (listeners, workers, tracing), and says which differed, each
    /// as `field: running → new`.
    pub fn keep_running(&self, new: &mut Config) -> Vec<String> {
        let mut kept = Vec::new();
        let mut keep = |field: &str, running: String, wanted: String| {
            if running != wanted {
                kept.push(format!("{field}: {running} → {wanted}"));
            }
        };
        keep("outbound.listen", self.outbound.listen.to_string(), new.outbound.listen.to_string());
        new.outbound.listen = self.outbound.listen;
        match (&self.inbound, &mut new.inbound) {
            (Some(running), Some(wanted)) => {
                keep("inbound.listen", running.listen.to_string(), wanted.listen.to_string());
                wanted.listen = running.listen;
                // Its listener stays; what it opens, to whom, follows reloads.
                let listen = |web: &Option<web::WebConfig>| web.as_ref().and_then(|web| web.listen);
                let shown = |listen: Option<SocketAddr>| listen.map_or("off".into(), |listen| listen.to_string());
                if listen(&running.web) != listen(&wanted.web) {
                    keep("inbound.web.listen", shown(listen(&running.web)), shown(listen(&wanted.web)));
                    match (&running.web, &mut wanted.web) {
                        (running, Some(wanted)) => wanted.listen = running.as_ref().and_then(|web| web.listen),
                        (running, wanted) => *wanted = running.clone(),
                    }
                }
            }
            (None, None) => {}
            (running, wanted) => {
                let state = |inbound: &Option<InboundConfig>| if inbound.is_some() { "on" } else { "off" }.to_string();
                keep("inbound", state(running), state(wanted));
                *wanted = running.clone();
            }
        }
        keep("admin.listen", self.admin.listen.to_string(), new.admin.listen.to_string());
        new.admin.listen = self.admin.listen;
        if self.kubernetes != new.kubernetes {
            keep("kubernetes", "the running settings".into(), "changed settings".into());
            new.kubernetes = self.kubernetes.clone();
        }
        keep("worker_threads", self.worker_threads.to_string(), new.worker_threads.to_string());
        new.worker_threads = self.worker_threads;
        let name = |c: &Config| c.service_name.clone().unwrap_or_default();
        keep("service_name", name(self), name(new));
        new.service_name = self.service_name.clone();
        if self.tracing != new.tracing {
            keep("tracing", "the running settings".into(), "changed settings".into());
            new.tracing = self.tracing.clone();
        }
        kept
    }
}
