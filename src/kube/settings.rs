//! What a pod asks of its sidecar, read from its template's annotations (all
//! under `protomesh.io/`), with the defaults the README's table lists. A bad
//! value names the annotation and what would be valid.

use serde_json::{Map, Value};

use ipnet::IpNet;

use super::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, SIDECAR_UID, VERSION};
use crate::capture::{CaptureRules, PortRange};

/// The label (or namespace label) that opts a pod in (`enabled`) or out (`disabled`).
pub const INJECT: &str = "protomesh.io/inject";
/// Written on an injected pod: what was added, so that it can be taken out again.
pub const STATUS: &str = "protomesh.io/status";
pub const CREATED_BY: &str = "protomesh.io/created-by";
pub const PROXY_VERSION: &str = "protomesh.io/proxy-version";
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

pub const MODE: &str = "protomesh.io/sidecar-mode";
pub const IMAGE: &str = "protomesh.io/image";
pub const APP_PORT: &str = "protomesh.io/app-port";
pub const CONTRACTS: &str = "protomesh.io/contracts";
pub const CONTRACTS_PROTOS: &str = "protomesh.io/contracts-protos";
pub const CONTRACTS_MODE: &str = "protomesh.io/contracts-mode";
pub const CONFIG: &str = "protomesh.io/config";
pub const IDENTITY: &str = "protomesh.io/identity";
pub const IDENTITY_SECRET: &str = "protomesh.io/identity-secret";
pub const SERVICE_NAME: &str = "protomesh.io/service-name";
pub const OTLP_ENDPOINT: &str = "protomesh.io/otlp-endpoint";
pub const LOG_LEVEL: &str = "protomesh.io/log-level";
pub const CAPTURE: &str = "protomesh.io/capture";
pub const CAPTURE_BY: &str = "protomesh.io/capture-by";
pub const INBOUND_MTLS: &str = "protomesh.io/inbound-mtls";
pub const PERMISSIVE_PORTS: &str = "protomesh.io/permissive-ports";
pub const WEB_PORTS: &str = "protomesh.io/web-ports";
pub const WEB_METHODS: &str = "protomesh.io/web-methods";
pub const WEB_ALLOWED_ORIGINS: &str = "protomesh.io/web-allowed-origins";
pub const INIT_IMAGE: &str = "protomesh.io/init-image";
pub const SKIP_INBOUND_PORTS: &str = "protomesh.io/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "protomesh.io/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "protomesh.io/skip-outbound-cidrs";
pub const CPU_REQUEST: &str = "protomesh.io/proxy-cpu-request";
pub const CPU_LIMIT: &str = "protomesh.io/proxy-cpu-limit";
pub const MEMORY_REQUEST: &str = "protomesh.io/proxy-memory-request";
pub const MEMORY_LIMIT: &str = "protomesh.io/proxy-memory-limit";

/// The image the sidecar runs unless the pod or the injector says otherwise.
pub fn default_image() -> String {
    format!("ghcr.io/protomesh/protomesh:{VERSION}")
}

/// The image `protomesh init` runs from unless the pod says otherwise.
pub fn default_init_image() -> String {
    format!("ghcr.io/protomesh/protomesh-init:{VERSION}")
}

/// Who installs a pod's capture rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureBy {
    /// The `protomesh-init` init container, which needs NET_ADMIN.
    #[default]
    Init,
    /// The node's `protomesh-cni` plugin, as the pod's network is set up:
    /// the pod needs no capability, and an init container that runs as the
    /// app checks that the rules are there.
    Cni,
}

impl CaptureBy {
    /// As `protomesh.io/capture-by` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureBy::Init => "init",
            CaptureBy::Cni => "cni",
        }
    }
}

/// Who installs the capture rules and what they leave alone (read here, so
/// that a bad value fails injection, not the pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub by: CaptureBy,
    pub image: String,
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<IpNet>,
}

impl Capture {
    /// The pod's rules: what `protomesh init` reads from its container's
    /// variables, and what the CNI plugin installs.
    pub fn rules(&self) -> CaptureRules {
        CaptureRules {
            proxy_uid: SIDECAR_UID,
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            admin_port: ADMIN_PORT,
            skip_inbound_ports: self.skip_inbound_ports.clone(),
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.clone(),
        }
    }
}

/// How the sidecar joins the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29 and
    /// later): started, and ready, before the app; stopped after it; Jobs complete.
    Native,
    /// The first container, whose postStart hook waits until it is ready.
    Classic,
}

/// Where the workload's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// cert-manager's csi-driver-spiffe: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, renewed in place.
    Csi,
    /// A Secret with `tls.crt`, `tls.key` and `ca.crt` (a cert-manager Certificate's, say).
    Secret(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    pub image: String,
    /// The app's plaintext gRPC port on localhost; `None`: no inbound traffic.
    pub app_port: Option<u16>,
    pub contracts: String,
    pub contracts_protos: String,
    /// `contracts.mode`: `permissive` unless the pod says otherwise, so that
    /// a pod whose contracts are not written yet still starts and forwards.
    pub contracts_mode: String,
    /// The ConfigMap holding `protomesh.yaml`; `None`: the environment alone.
    pub config: Option<String>,
    /// Whether the pod named `config` itself (else it is the default, which
    /// its namespace may not have: then the sidecar starts without it).
    pub config_named: bool,
    pub identity: IdentitySource,
    /// The service account the pod runs as: its identity's.
    pub service_account: String,
    pub service_name: String,
    pub otlp_endpoint: Option<String>,
    pub log_level: String,
    pub cpu_request: String,
    pub cpu_limit: Option<String>,
    pub memory_request: String,
    pub memory_limit: Option<String>,
    /// The pod's grace period, of which the sidecar's drain takes all but a margin.
    pub grace_seconds: u64,
    /// `None`: the app's traffic is not captured; it dials the sidecar itself.
    pub capture: Option<Capture>,
    /// `inbound.mtls.mode` for captured connections, when the pod sets it.
    pub inbound_mtls: Option<String>,
    /// App ports that also take plaintext from outside the mesh (a
    /// LoadBalancer's or NodePort's target), the rest staying strict.
    pub permissive_ports: Vec<u16>,
    /// App ports a LoadBalancer or NodePort Service sends outside traffic
    /// to, with that Service: they take plaintext too.
    pub exposed_ports: Vec<(u16, String)>,
    /// `inbound.web` on captured app ports, when the pod opts in.
    pub web: Option<Web>,
}

/// Captured app ports that also take gRPC-Web and JSON over HTTP/1.1 from
/// callers without a certificate, and what those may call and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Web {
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    pub allowed_origins: Vec<String>,
}

/// What the injector knows beyond the pod template.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    /// The sidecar image, unless the pod names one.
    pub image: Option<String>,
    /// Who installs the capture rules, unless the pod says.
    pub capture_by: CaptureBy,
}

impl Settings {
    /// Reads the template's annotations. `workload` names the workload when
    /// neither an annotation nor a label does.
    pub fn read(template: &Value, workload: &str, defaults: &Defaults) -> Result<Settings, String> {
        let metadata = template.get("metadata");
        let annotations = metadata.and_then(|m| m.get("annotations")).and_then(Value::as_object);
        let labels = metadata.and_then(|m| m.get("labels")).and_then(Value::as_object);
        let spec = template.get("spec");
        let get = |name: &str| annotations.and_then(|a| a.get(name)).and_then(Value::as_str).map(str::to_string);
        let or = |name: &str, default: &str| get(name).unwrap_or_else(|| default.to_string());

        let mode = match get(MODE).as_deref() {
            None | Some("native") => Mode::Native,
            Some("classic") => Mode::Classic,
            Some(other) => return Err(invalid(MODE, other, "`native` (Kubernetes 1.29 and later) or `classic`")),
        };
        // The sidecar's own ports are never the app's: its inbound would hand
        // peers' calls to a listener that acts with the workload's identity.
        let app_port = match get(APP_PORT).as_deref() {
            Some("none") => None,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 && ![OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT].contains(&port) => Some(port),
                _ => {
                    let valid =
                        "a port number from 1 to 65535 other than the sidecar's own (4140, 4143, 4191), or `none`";
                    return Err(invalid(APP_PORT, port, valid));
                }
            },
            None => declared_ports(spec).first().copied(),
        };
        // `serviceAccount` is the deprecated spelling the API still takes.
        let account = ["serviceAccountName", "serviceAccount"]
            .into_iter()
            .find_map(|field| spec?.get(field)?.as_str().filter(|name| !name.is_empty()));
        let service_account = account.unwrap_or("default").to_string();
        let identity = match get(IDENTITY).as_deref() {
            None | Some("csi") => IdentitySource::Csi,
            Some("secret") => {
                IdentitySource::Secret(or(IDENTITY_SECRET, &format!("{service_account}-protomesh-identity")))
            }
            Some(other) => return Err(invalid(IDENTITY, other, "`csi` (csi-driver-spiffe) or `secret`")),
        };
        let service_name = get(SERVICE_NAME)
            .or_else(|| label(labels, "app.kubernetes.io/name"))
            .or_else(|| label(labels, "app"))
            .unwrap_or_else(|| workload.to_string());
        for (name, value) in [(CPU_REQUEST, get(CPU_REQUEST)), (CPU_LIMIT, get(CPU_LIMIT))]
            .into_iter()
            .chain([(MEMORY_REQUEST, get(MEMORY_REQUEST)), (MEMORY_LIMIT, get(MEMORY_LIMIT))])
        {
            if let Some(value) = value.filter(|v| !is_quantity(v)) {
                return Err(invalid(name, &value, "a Kubernetes quantity, e.g. 100m, 0.5, 64Mi or 1Gi"));
            }
        }
        let grace_seconds = spec
            .and_then(|s| s.get("terminationGracePeriodSeconds"))
            .map(|v| v.as_u64().ok_or("spec.terminationGracePeriodSeconds: expected a whole number of seconds"))
            .transpose()?
            .unwrap_or(30);
        // Captured unless the pod opts out, as Linkerd's and Istio's proxies
        // always capture: an app that is not told of the mesh is still meshed.
        let capture = match get(CAPTURE).as_deref() {
            Some("disabled") => None,
            None | Some("enabled") => {
                let ports = "ports or ranges separated by commas, e.g. 22,9000-9100";
                let by = match get(CAPTURE_BY).as_deref() {
                    None => defaults.capture_by,
                    Some("init") => CaptureBy::Init,
                    Some("cni") => CaptureBy::Cni,
                    Some(other) => {
                        let valid = "`init` (an init container with NET_ADMIN) or `cni` (the node's protomesh-cni)";
                        return Err(invalid(CAPTURE_BY, other, valid));
                    }
                };
                Some(Capture {
                    by,
                    image: get(INIT_IMAGE).unwrap_or_else(default_init_image),
                    skip_inbound_ports: list(get(SKIP_INBOUND_PORTS), SKIP_INBOUND_PORTS, ports)?,
                    skip_outbound_ports: list(get(SKIP_OUTBOUND_PORTS), SKIP_OUTBOUND_PORTS, ports)?,
                    skip_outbound_cidrs: list(
                        get(SKIP_OUTBOUND_CIDRS),
                        SKIP_OUTBOUND_CIDRS,
                        "networks separated by commas, e.g. 10.96.0.0/12,169.254.169.254/32",
                    )?,
                })
            }
            Some(other) => return Err(invalid(CAPTURE, other, "`enabled` or `disabled`")),
        };
        let contracts_mode = match get(CONTRACTS_MODE).as_deref() {
            None => "permissive".to_string(),
            Some(mode @ ("strict" | "permissive")) => mode.to_string(),
            Some(other) => return Err(invalid(CONTRACTS_MODE, other, "`strict` or `permissive`")),
        };
        let inbound_mtls = match get(INBOUND_MTLS).as_deref() {
            None => None,
            Some(mode @ ("strict" | "permissive")) => Some(mode.to_string()),
            Some(other) => return Err(invalid(INBOUND_MTLS, other, "`strict` or `permissive`")),
        };
        let valid = "app ports separated by commas, e.g. 8080,8443";
        let permissive_ports: Vec<u16> = list(get(PERMISSIVE_PORTS), PERMISSIVE_PORTS, valid)?;
        if permissive_ports.contains(&0) {
            return Err(invalid(PERMISSIVE_PORTS, &get(PERMISSIVE_PORTS).unwrap_or_default(), valid));
        }
        let web = match get(WEB_PORTS) {
            None => None,
            Some(_) if capture.is_none() || app_port.is_none() => {
                let why = "it serves captured app ports: the pod needs capture and an app port";
                return Err(format!("annotation {WEB_PORTS}: {why}"));
            }
            Some(ports) => Some(Web::read(ports, get(WEB_METHODS), get(WEB_ALLOWED_ORIGINS))?),
        };
        Ok(Settings {
            mode,
            image: get(IMAGE).or_else(|| defaults.image.clone()).unwrap_or_else(default_image),
            app_port,
            contracts: or(CONTRACTS, "protomesh-contracts"),
            contracts_protos: or(CONTRACTS_PROTOS, "*.proto"),
            contracts_mode,
            config_named: get(CONFIG).is_some(),
            config: match get(CONFIG).as_deref() {
                Some("none") => None,
                Some(name) => Some(name.to_string()),
                None => Some("protomesh-config".to_string()),
            },
            identity,
            service_account,
            service_name,
            otlp_endpoint: get(OTLP_ENDPOINT),
            log_level: or(LOG_LEVEL, "info"),
            cpu_request: or(CPU_REQUEST, "10m"),
            cpu_limit: get(CPU_LIMIT),
            memory_request: or(MEMORY_REQUEST, "32Mi"),
            memory_limit: Some(or(MEMORY_LIMIT, "256Mi")),
            grace_seconds,
            capture,
            inbound_mtls,
            permissive_ports,
            exposed_ports: Vec::new(),
            web,
        })
    }
}

impl Web {
    fn read(ports: String, methods: Option<String>, origins: Option<String>) -> Result<Web, String> {
        let valid = "app ports separated by commas, e.g. 8080,8443";
        let ports: Vec<u16> = list(Some(ports.clone()), WEB_PORTS, valid)?;
        if ports.iter().any(|port| [0, OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT].contains(port)) {
            return Err(invalid(
                WEB_PORTS,
                &ports_text(&ports),
                "app ports other than the sidecar's own (4140, 4143, 4191)",
            ));
        }
        let methods: Vec<String> = list(methods.clone(), WEB_METHODS, "")?;
        let pattern = |method: &String| {
            method == "*"
                || method
                    .split_once('/')
                    .is_some_and(|(s, m)| !s.is_empty() && !m.is_empty() && !method.contains(char::is_whitespace))
        };
        if let Some(bad) = methods.iter().find(|method| !pattern(method)) {
            return Err(invalid(WEB_METHODS, bad, "pkg.Service/Method, pkg.Service/* or *, separated by commas"));
        }
        let allowed_origins: Vec<String> = list(origins, WEB_ALLOWED_ORIGINS, "")?;
        let origin = |origin: &String| origin == "*" || (origin.contains("://") && !origin.ends_with('/'));
        if let Some(bad) = allowed_origins.iter().find(|o| !origin(o)) {
            return Err(invalid(
                WEB_ALLOWED_ORIGINS,
                bad,
                "scheme://host[:port] with no path, or *, separated by commas",
            ));
        }
        Ok(Web { ports, methods, allowed_origins })
    }
}

fn ports_text(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

impl Settings {
    /// The app ports that take plaintext besides mTLS: those the pod names,
    /// then those Services expose outside the cluster.
    pub fn plaintext_app_ports(&self) -> Vec<u16> {
        let mut ports = self.permissive_ports.clone();
        for (port, _) in &self.exposed_ports {
            if !ports.contains(port) {
                ports.push(*port);
            }
        }
        ports
    }

    /// Which of the pod's declared ports other pods can still reach in
    /// plaintext once it is injected, as `inject`'s report tells per workload.
    pub fn plaintext_ports(&self, template: &Value) -> String {
        let ports = declared_ports(template.get("spec"));
        let list = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let Some(capture) = &self.capture else {
            return match ports.is_empty() {
                true => "plaintext: no port declared".into(),
                false => format!(
                    "plaintext: {} (not captured: protomesh.io/capture: disabled leaves the app's own ports \
                     open to any client)",
                    list(&ports)
                ),
            };
        };
        let pod_permissive = self.inbound_mtls.as_deref() == Some("permissive");
        let why = |port: u16| {
            if capture.skip_inbound_ports.iter().any(|range| range.contains(port)) {
                Some("protomesh.io/skip-inbound-ports")
            } else if pod_permissive {
                Some("protomesh.io/inbound-mtls: permissive")
            } else if self.permissive_ports.contains(&port) {
                Some(PERMISSIVE_PORTS)
            } else if let Some((_, service)) = self.exposed_ports.iter().find(|(exposed, _)| *exposed == port) {
                Some(service.as_str())
            } else {
                let web = self.web.as_ref().is_some_and(|web| web.ports.contains(&port));
                web.then_some(
                    "HTTP/1.1 only: gRPC-Web and JSON for protomesh.io/web-methods, by protomesh.io/web-ports",
                )
            }
        };
        // Ports by why they take plaintext, each reason once, in the order of the ports.
        let mut open: Vec<(&str, Vec<u16>)> = Vec::new();
        for port in ports {
            let Some(reason) = why(port) else { continue };
            match open.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, ports)) => ports.push(port),
                None => open.push((reason, vec![port])),
            }
        }
        if open.is_empty() {
            return "plaintext: none (every captured port takes mTLS only)".into();
        }
        let groups: Vec<String> = open.iter().map(|(reason, ports)| format!("{} ({reason})", list(ports))).collect();
        format!("plaintext: {}", groups.join("; "))
    }
}

/// The TCP ports the pod's containers declare, in their order.
fn declared_ports(spec: Option<&Value>) -> Vec<u16> {
    let containers = spec.and_then(|spec| spec.get("containers")?.as_array()).into_iter().flatten();
    let ports = containers.filter_map(|c| c.get("ports")?.as_array()).flatten();
    let tcp = ports.filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP");
    let mut declared: Vec<u16> = tcp.filter_map(|p| u16::try_from(p.get("containerPort")?.as_u64()?).ok()).collect();
    declared.dedup();
    declared
}

fn label(labels: Option<&Map<String, Value>>, name: &str) -> Option<String> {
    labels?.get(name)?.as_str().map(str::to_string)
}

/// A comma-separated annotation's items, each parsed; an empty list when it is not set.
fn list<T: std::str::FromStr>(value: Option<String>, name: &str, valid: &str) -> Result<Vec<T>, String> {
    let Some(value) = value else { return Ok(Vec::new()) };
    value.split(',').map(|item| item.trim().parse().map_err(|_| invalid(name, &value, valid))).collect()
}

fn invalid(annotation: &str, value: &str, valid: &str) -> String {
    format!("annotation {annotation}: `{value}` is not valid; write {valid}")
}

/// A Kubernetes resource quantity: a decimal number and a suffix (binary,
/// decimal SI, or a decimal exponent), as `resource.Quantity` parses it.
fn is_quantity(text: &str) -> bool {
    let number_end =
        text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let number = number.strip_prefix(['+', '-']).unwrap_or(number);
    let digits_ok = !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.matches('.').count() <= 1
        && number != ".";
    let suffix_ok = match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())),
    };
    digits_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template(annotations: Value) -> Value {
        json!({
            "metadata": {"annotations": annotations, "labels": {"app": "shop"}},
            "spec": {"serviceAccountName": "checkout", "containers": [{"name": "app", "ports": [{"containerPort": 9090}]}]}
        })
    }

    #[test]
    fn web_annotations_are_checked_and_need_capture() {
        let read = |annotations: Value| Settings::read(&template(annotations), "w", &Defaults::default());
        let web =
            read(json!({"protomesh.io/web-ports": "8080", "protomesh.io/web-methods": "*"})).unwrap().web.unwrap();
        assert_eq!((web.ports, web.methods, web.allowed_origins), (vec![8080], vec!["*".to_string()], vec![]));
        let error = read(json!({"protomesh.io/web-ports": "4143"})).unwrap_err();
        assert!(
            error.starts_with("annotation protomesh.io/web-ports: `4143` is not valid; write app ports other than")
        );
        let error = read(json!({"protomesh.io/web-ports": "8080", "protomesh.io/web-methods": "Catalog"})).unwrap_err();
        assert!(error.contains("`Catalog` is not valid; write pkg.Service/Method, pkg.Service/* or *"), "{error}");
        let origins = json!({"protomesh.io/web-ports": "8080", "protomesh.io/web-allowed-origins": "https://a.test/"});
        assert!(read(origins).unwrap_err().contains("`https://a.test/` is not valid; write scheme://host[:port]"));
        let uncaptured = json!({"protomesh.io/web-ports": "8080", "protomesh.io/capture": "disabled"});
        assert!(read(uncaptured).unwrap_err().contains("it serves captured app ports: the pod needs capture"));
    }

    #[test]
    fn defaults_come_from_the_pod_where_it_says_something() {
        let settings = Settings::read(&template(json!({})), "checkout", &Defaults::default()).unwrap();
        assert_eq!(settings.mode, Mode::Native);
        assert_eq!(settings.app_port, Some(9090), "the first port of the containers");
        assert_eq!(settings.service_name, "shop", "the app label, before the workload's name");
        assert_eq!(settings.image, default_image());
        assert_eq!(settings.config.as_deref(), Some("protomesh-config"));
        assert!(!settings.config_named, "the default ConfigMap, which the namespace may not have");
        assert_eq!(settings.contracts_mode, "permissive", "a pod with no contracts yet still forwards");
        assert_eq!(settings.grace_seconds, 30);
        let secret = json!({"protomesh.io/identity": "secret", "protomesh.io/config": "none"});
        let settings = Settings::read(&template(secret), "checkout", &Defaults::default()).unwrap();
        assert_eq!(settings.identity, IdentitySource::Secret("checkout-protomesh-identity".into()));
        assert_eq!(settings.config, None);
    }

    #[test]
    fn bad_values_name_the_annotation_and_what_is_valid() {
        let err = Settings::read(&template(json!({"protomesh.io/app-port": "http"})), "w", &Defaults::default());
        assert_eq!(
            err.unwrap_err(),
            "annotation protomesh.io/app-port: `http` is not valid; write a port number from 1 to 65535 other than \
             the sidecar's own (4140, 4143, 4191), or `none`"
        );
        for own in ["4140", "4143", "4191"] {
            let err = Settings::read(&template(json!({"protomesh.io/app-port": own})), "w", &Defaults::default());
            assert!(err.unwrap_err().contains("other than the sidecar's own"), "{own}");
        }
        let none = Settings::read(&template(json!({"protomesh.io/app-port": "none"})), "w", &Defaults::default());
        assert_eq!(none.unwrap().app_port, None, "`none`, as the README says: no inbound listener");
        let err =
            Settings::read(&template(json!({"protomesh.io/proxy-memory-limit": "lots"})), "w", &Defaults::default());
        assert!(err.unwrap_err().starts_with("annotation protomesh.io/proxy-memory-limit: `lots`"));
        let err = Settings::read(&template(json!({"protomesh.io/sidecar-mode": "sidecar"})), "w", &Defaults::default());
        assert!(err.unwrap_err().contains("`native` (Kubernetes 1.29 and later) or `classic`"));
        let read = |annotations| Settings::read(&template(annotations), "w", &Defaults::default()).unwrap_err();
        let err = read(json!({"protomesh.io/capture": "enabled", "protomesh.io/skip-outbound-ports": "5432,pg"}));
        assert_eq!(
            err,
            "annotation protomesh.io/skip-outbound-ports: `5432,pg` is not valid; write ports or ranges separated by commas, e.g. 22,9000-9100"
        );
        let err = read(json!({"protomesh.io/capture": "enabled", "protomesh.io/skip-outbound-cidrs": "10.0.0.0/33"}));
        assert!(err.starts_with("annotation protomesh.io/skip-outbound-cidrs: `10.0.0.0/33`"), "{err}");
        assert!(read(json!({"protomesh.io/capture": "yes"})).contains("`enabled` or `disabled`"));
        assert!(read(json!({"protomesh.io/inbound-mtls": "loose"})).contains("`strict` or `permissive`"));
        for bad in ["http", "0", "8080-8090"] {
            let err = read(json!({"protomesh.io/permissive-ports": bad}));
            assert!(err.starts_with("annotation protomesh.io/permissive-ports:"), "{err}");
        }
        assert!(read(json!({"protomesh.io/contracts-mode": "open"})).contains("`strict` or `permissive`"));
    }

    #[test]
    fn the_report_says_which_ports_still_take_plaintext() {
        let said = |annotations: Value| {
            let mut pod = template(annotations);
            pod["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9090}, {"containerPort": 9100}]);
            Settings::read(&pod, "w", &Defaults::default()).unwrap().plaintext_ports(&pod)
        };
        let disabled = json!({"protomesh.io/capture": "disabled"});
        assert!(said(disabled).starts_with("plaintext: 9090, 9100 (not captured"));
        assert_eq!(said(json!({})), "plaintext: none (every captured port takes mTLS only)", "captured by default");
        let skipped = json!({"protomesh.io/capture": "enabled", "protomesh.io/skip-inbound-ports": "9100-9200"});
        assert_eq!(said(skipped), "plaintext: 9100 (protomesh.io/skip-inbound-ports)");
        let permissive = json!({"protomesh.io/capture": "enabled", "protomesh.io/inbound-mtls": "permissive"});
        assert_eq!(said(permissive), "plaintext: 9090, 9100 (protomesh.io/inbound-mtls: permissive)");
        let one = json!({"protomesh.io/capture": "enabled", "protomesh.io/permissive-ports": "9090", "protomesh.io/skip-inbound-ports": "9100"});
        assert_eq!(
            said(one),
            "plaintext: 9090 (protomesh.io/permissive-ports); 9100 (protomesh.io/skip-inbound-ports)"
        );
        let web = json!({"protomesh.io/web-ports": "9100", "protomesh.io/web-methods": "*"});
        assert_eq!(
            said(web),
            "plaintext: 9100 (HTTP/1.1 only: gRPC-Web and JSON for protomesh.io/web-methods, by protomesh.io/web-ports)"
        );
    }

    #[test]
    fn quantities_parse_as_kubernetes_parses_them() {
        for good in ["100m", "0.5", "1", "64Mi", "1Gi", "2e3", "1.5G", "+1"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "lots", "1mi", "Mi", "1.2.3", "1e", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
