//! The sidecar as injection adds it: its container (configured through
//! `PROTOMESH_*` variables, the downward API and mounted files, with probes
//! on the admin port and a restricted security context), the volumes it
//! mounts (identity, contracts, mesh config), and the init container of
//! capture: the one that installs the rules, or with the CNI plugin the one
//! that checks them.

use serde_json::{Map, Value, json};

use super::settings::{Capture, CaptureBy, IdentitySource, Mode, Settings};
use super::{ADMIN_PORT, INBOUND_PORT, INIT, OUTBOUND_PORT, SIDECAR, SIDECAR_UID};

pub const IDENTITY_VOLUME: &str = "protomesh-identity";
pub const CONTRACTS_VOLUME: &str = "protomesh-contracts";
pub const CONFIG_VOLUME: &str = "protomesh-config";
const IDENTITY_DIR: &str = "/var/run/protomesh/identity";
const CONTRACTS_DIR: &str = "/var/run/protomesh/contracts";
const CONFIG_DIR: &str = "/etc/protomesh";
/// A classic sidecar's drain ends this long before the pod's grace period
/// does, so that the sidecar exits on its own rather than being killed.
const DRAIN_MARGIN_SECONDS: u64 = 5;
/// A native sidecar is stopped only once the app's containers have exited,
/// with what is left of the grace period but at least the kubelet's minimum
/// of 2 s: its drain fits in that, and has little left to wait for.
const NATIVE_DRAIN_SECONDS: u64 = 1;
/// The user `protomesh init --validate` runs as: any but the sidecar's.
const VALIDATE_UID: u32 = 2103;

fn env(name: &str, value: impl Into<String>) -> Value {
    json!({ "name": name, "value": value.into() })
}

/// A list as `protomesh init`'s flags take it: comma separated.
fn joined<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn field_env(name: &str, path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } })
}

/// The sidecar's container; `app_probes` are the app's probes it runs for
/// the kubelet (see `probes.rs`).
pub fn container(settings: &Settings, app_probes: &Map<String, Value>) -> Value {
    let drain = match settings.mode {
        Mode::Native => NATIVE_DRAIN_SECONDS,
        Mode::Classic => settings.grace_seconds.saturating_sub(DRAIN_MARGIN_SECONDS).max(1),
    };
    let mut vars = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_NAME", "spec.nodeName"),
        env("PROTOMESH_SERVICE_NAME", settings.service_name.clone()),
        env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME)",
        ),
        env("PROTOMESH_LOG", settings.log_level.clone()),
        env("PROTOMESH_IDENTITY__CERT", format!("{IDENTITY_DIR}/tls.crt")),
        env("PROTOMESH_IDENTITY__KEY", format!("{IDENTITY_DIR}/tls.key")),
        env("PROTOMESH_IDENTITY__TRUST_BUNDLE", format!("{IDENTITY_DIR}/ca.crt")),
        env("PROTOMESH_CONTRACTS__INCLUDE", format!("[{CONTRACTS_DIR}]")),
        env("PROTOMESH_CONTRACTS__PROTOS", format!("['{}']", settings.contracts_protos)),
        env("PROTOMESH_CONTRACTS__MODE", settings.contracts_mode.clone()),
        env("PROTOMESH_OUTBOUND__LISTEN", format!("127.0.0.1:{OUTBOUND_PORT}")),
        env("PROTOMESH_ADMIN__LISTEN", format!("0.0.0.0:{ADMIN_PORT}")),
        env("PROTOMESH_DRAIN_TIMEOUT", format!("{drain}s")),
    ];
    if settings.config.is_some() {
        vars.push(env("PROTOMESH_CONFIG", format!("{CONFIG_DIR}/protomesh.yaml")));
        if !settings.config_named {
            vars.push(env("PROTOMESH_CONFIG_OPTIONAL", "true"));
        }
    }
    if let Some(port) = settings.app_port {
        vars.push(env("PROTOMESH_INBOUND__LISTEN", format!("0.0.0.0:{INBOUND_PORT}")));
        vars.push(env("PROTOMESH_INBOUND__APP", format!("127.0.0.1:{port}")));
        if let Some(mode) = &settings.inbound_mtls {
            vars.push(env("PROTOMESH_INBOUND__MTLS__MODE", mode.clone()));
        }
        let plaintext = settings.plaintext_app_ports();
        if !plaintext.is_empty() {
            let ports: Vec<String> = plaintext.iter().map(|port| format!("{port}: permissive")).collect();
            vars.push(env("PROTOMESH_INBOUND__MTLS__PORTS", format!("{{{}}}", ports.join(", "))));
        }
        if let Some(web) = &settings.web {
            let list = |items: &[String]| {
                format!("[{}]", items.iter().map(|item| format!("'{item}'")).collect::<Vec<_>>().join(", "))
            };
            let ports: Vec<String> = web.ports.iter().map(u16::to_string).collect();
            vars.push(env("PROTOMESH_INBOUND__WEB__PORTS", format!("[{}]", ports.join(", "))));
            vars.push(env("PROTOMESH_INBOUND__WEB__METHODS", list(&web.methods)));
            vars.push(env("PROTOMESH_INBOUND__WEB__ALLOWED_ORIGINS", list(&web.allowed_origins)));
        }
    }
    if !app_probes.is_empty() {
        let probes = serde_json::to_string(app_probes).expect("JSON values serialize");
        vars.push(env("PROTOMESH_ADMIN__APP_PROBES", probes));
    }
    if let Some(endpoint) = &settings.otlp_endpoint {
        vars.push(env("PROTOMESH_TRACING__OTLP_ENDPOINT", endpoint.clone()));
    }
    if settings.cpu_limit.is_some() {
        // One worker per core of the limit, rounded up.
        let cores = json!({ "containerName": SIDECAR, "resource": "limits.cpu", "divisor": "1" });
        vars.push(json!({ "name": "PROTOMESH_WORKER_THREADS", "valueFrom": { "resourceFieldRef": cores } }));
    }

    let mut ports = vec![json!({ "name": "protomesh-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" })];
    if settings.app_port.is_some() {
        ports.insert(0, json!({ "name": "protomesh-in", "containerPort": INBOUND_PORT, "protocol": "TCP" }));
    }
    let mut mounts = vec![
        json!({ "name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": true }),
        json!({ "name": CONTRACTS_VOLUME, "mountPath": CONTRACTS_DIR, "readOnly": true }),
    ];
    if settings.config.is_some() {
        mounts.push(json!({ "name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": true }));
    }
    let requests = json!({ "cpu": settings.cpu_request, "memory": settings.memory_request });
    let mut limits = serde_json::Map::new();
    if let Some(cpu) = &settings.cpu_limit {
        limits.insert("cpu".into(), json!(cpu));
    }
    if let Some(memory) = &settings.memory_limit {
        limits.insert("memory".into(), json!(memory));
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": ADMIN_PORT },
            "periodSeconds": period,
            "failureThreshold": failures,
        })
    };

    let mut container = json!({
        "name": SIDECAR,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["run"],
        "env": vars,
        "ports": ports,
        "resources": { "requests": requests, "limits": limits },
        // The app starts once this passes, and not before.
        "startupProbe": probe("/ready", 1, 120),
        "readinessProbe": probe("/ready", 5, 3),
        "livenessProbe": probe("/live", 10, 3),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    match settings.mode {
        Mode::Native => container["restartPolicy"] = json!("Always"),
        Mode::Classic => {
            // The kubelet starts the next container only once this hook returns.
            let wait = ["/protomesh", "await", "--admin", &format!("127.0.0.1:{ADMIN_PORT}"), "--timeout", "120s"];
            container["lifecycle"] = json!({ "postStart": { "exec": { "command": wait } } });
        }
    }
    container
}

/// The init container of capture. With `protomesh init` installing the rules:
/// root with NET_ADMIN alone, which changing the pod's netfilter rules takes,
/// and nothing else. With the CNI plugin having installed them:
/// `protomesh init --validate`, with no privilege at all (and as a user other
/// than the sidecar's, whose connections the rules leave alone), so that a
/// pod on a node without the plugin fails to start rather than run uncaptured.
pub fn init_container(capture: &Capture) -> Value {
    let mut vars = vec![
        env("PROTOMESH_PROXY_UID", SIDECAR_UID.to_string()),
        env("PROTOMESH_OUTBOUND_PORT", OUTBOUND_PORT.to_string()),
        env("PROTOMESH_INBOUND_PORT", INBOUND_PORT.to_string()),
        env("PROTOMESH_ADMIN_PORT", ADMIN_PORT.to_string()),
    ];
    for (name, value) in [
        ("PROTOMESH_SKIP_INBOUND_PORTS", joined(&capture.skip_inbound_ports)),
        ("PROTOMESH_SKIP_OUTBOUND_PORTS", joined(&capture.skip_outbound_ports)),
        ("PROTOMESH_SKIP_OUTBOUND_CIDRS", joined(&capture.skip_outbound_cidrs)),
    ] {
        if !value.is_empty() {
            vars.push(env(name, value));
        }
    }
    let (command, security) = match capture.by {
        CaptureBy::Init => (
            json!(["/protomesh", "init"]),
            json!({
                "runAsNonRoot": false,
                "runAsUser": 0,
                "runAsGroup": 0,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "privileged": false,
                "capabilities": { "add": ["NET_ADMIN"], "drop": ["ALL"] },
                "seccompProfile": { "type": "RuntimeDefault" },
            }),
        ),
        CaptureBy::Cni => (
            json!(["/protomesh", "init", "--validate"]),
            json!({
                "runAsNonRoot": true,
                "runAsUser": VALIDATE_UID,
                "runAsGroup": VALIDATE_UID,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "privileged": false,
                "capabilities": { "drop": ["ALL"] },
                "seccompProfile": { "type": "RuntimeDefault" },
            }),
        ),
    };
    json!({
        "name": INIT,
        "image": capture.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": vars,
        "resources": { "requests": { "cpu": "10m", "memory": "16Mi" }, "limits": { "memory": "64Mi" } },
        "securityContext": security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

/// The volumes the sidecar mounts, by name.
pub fn volumes(settings: &Settings) -> Vec<Value> {
    let identity = match &settings.identity {
        IdentitySource::Csi => json!({
            "name": IDENTITY_VOLUME,
            "csi": {
                "driver": "spiffe.csi.cert-manager.io",
                "readOnly": true,
                // Group-readable by the sidecar, which runs as this group.
                "volumeAttributes": { "spiffe.csi.cert-manager.io/fs-group": SIDECAR_UID.to_string() },
            },
        }),
        // Readable by the sidecar's user: only its container mounts the volume.
        IdentitySource::Secret(name) => json!({
            "name": IDENTITY_VOLUME,
            "secret": { "secretName": name, "defaultMode": 0o444 },
        }),
    };
    // A namespace without the contracts' ConfigMap does not keep its pods
    // from starting: with permissive contracts, the sidecar forwards every
    // call. Nor without the default config's; one the pod names must be there.
    let contracts = json!({ "name": CONTRACTS_VOLUME, "configMap": { "name": settings.contracts, "optional": true } });
    let mut volumes = vec![identity, contracts];
    if let Some(config) = &settings.config {
        let optional = !settings.config_named;
        volumes.push(json!({ "name": CONFIG_VOLUME, "configMap": { "name": config, "optional": optional } }));
    }
    volumes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::settings::Defaults;

    fn drain_of(annotations: Value) -> Value {
        let template = json!({
            "metadata": { "annotations": annotations },
            "spec": { "terminationGracePeriodSeconds": 60, "containers": [{ "name": "app", "ports": [{ "containerPort": 8080 }] }] },
        });
        let settings = Settings::read(&template, "web", &Defaults::default()).unwrap();
        let sidecar = container(&settings, &Map::new());
        let vars = sidecar["env"].as_array().unwrap();
        vars.iter().find(|v| v["name"] == "PROTOMESH_DRAIN_TIMEOUT").unwrap()["value"].clone()
    }

    #[test]
    fn a_native_sidecar_drains_within_what_the_kubelet_leaves_it_after_the_app_and_a_classic_one_with_the_app() {
        assert_eq!(drain_of(json!({})), "1s");
        assert_eq!(drain_of(json!({ "protomesh.io/sidecar-mode": "classic" })), "55s");
    }

    fn capture_container(annotations: Value, defaults: &Defaults) -> Value {
        let template =
            json!({ "metadata": { "annotations": annotations }, "spec": { "containers": [{ "name": "app" }] } });
        let settings = Settings::read(&template, "web", defaults).unwrap();
        init_container(settings.capture.as_ref().unwrap())
    }

    #[test]
    fn with_the_cni_plugin_the_capture_container_only_checks_and_holds_no_privilege() {
        let by_cni = capture_container(
            json!({ "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "cni" }),
            &Defaults::default(),
        );
        assert_eq!(by_cni["command"], json!(["/protomesh", "init", "--validate"]));
        let security = &by_cni["securityContext"];
        assert_eq!((&security["runAsNonRoot"], &security["capabilities"]), (&json!(true), &json!({ "drop": ["ALL"] })));
        assert_ne!(security["runAsUser"], json!(SIDECAR_UID), "the rules leave the sidecar's user alone");

        let by_init = capture_container(json!({ "protomesh.io/capture": "enabled" }), &Defaults::default());
        assert_eq!(by_init["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN"]));
        // The injector's default, unless the pod says otherwise.
        let cni_default = Defaults { capture_by: CaptureBy::Cni, ..Default::default() };
        let defaulted = capture_container(json!({ "protomesh.io/capture": "enabled" }), &cni_default);
        assert_eq!(defaulted["command"], by_cni["command"]);
        let overridden = capture_container(
            json!({ "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "init" }),
            &cni_default,
        );
        assert_eq!(overridden["command"], json!(["/protomesh", "init"]));
    }

    /// The config a sidecar injected with `annotations` reads from its
    /// container's variables at start.
    fn injected_config(annotations: Value) -> crate::config::Config {
        let template = json!({ "metadata": { "annotations": annotations }, "spec": { "containers": [{ "name": "app", "ports": [{ "containerPort": 7070 }] }] } });
        let settings = Settings::read(&template, "web", &Defaults::default()).unwrap();
        let sidecar = container(&settings, &Map::new());
        let vars = sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|var| Some((var["name"].as_str()?.to_string(), var["value"].as_str()?.to_string())));
        crate::config::load(None, vars).unwrap()
    }

    #[test]
    fn web_ports_reach_the_sidecars_config_with_their_methods_and_origins() {
        let config = injected_config(json!({
            "protomesh.io/web-ports": "7070",
            "protomesh.io/web-methods": "shop.v1.Catalog/*, shop.v1.Cart/Get",
            "protomesh.io/web-allowed-origins": "https://shop.example.com",
        }));
        let web = config.inbound.unwrap().web.unwrap();
        assert_eq!((web.listen, &web.ports), (None, &vec![7070]));
        assert!(
            web.opens("shop.v1.Catalog", "List")
                && web.opens("shop.v1.Cart", "Get")
                && !web.opens("shop.v1.Cart", "Pay")
        );
        assert_eq!(web.allowed_origins, ["https://shop.example.com"]);
    }

    #[test]
    fn permissive_ports_reach_the_sidecars_config_and_the_others_stay_strict() {
        use crate::config::MtlsMode;
        let config =
            injected_config(json!({ "protomesh.io/capture": "enabled", "protomesh.io/permissive-ports": "8080,8443" }));
        let mtls = &config.inbound.unwrap().mtls;
        assert_eq!(
            [8080, 8443, 7070].map(|port| mtls.mode_for(port)),
            [MtlsMode::Permissive, MtlsMode::Permissive, MtlsMode::Strict]
        );
    }
}
