//! The app's kubelet probes, pointed at the sidecar when the pod's traffic is
//! captured. The kubelet probes from the node, in plaintext: on a strict port
//! the sidecar would refuse it, and leaving the port uncaptured instead would
//! open it to any plaintext caller. So each HTTP, gRPC and TCP probe of an
//! app container becomes an HTTP GET on the admin port, at a path the sidecar
//! maps to the original (`admin.app_probes`) and runs against the app on
//! localhost, as Istio does. Probes of uncaptured ports, of another host, over
//! HTTPS, or that run a command are left as they are.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::settings::Capture;
use super::{ADMIN_PORT, INBOUND_PORT, SIDECAR};

const KINDS: [(&str, &str); 3] =
    [("startupProbe", "startup"), ("readinessProbe", "readiness"), ("livenessProbe", "liveness")];

/// A probe as it was before injection, kept in the status so that
/// `uninject` can put it back.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Original {
    pub container: String,
    pub kind: String,
    pub probe: Value,
}

/// Points the app containers' probes in `spec` at the admin server. Returns
/// the originals, and the sidecar's `admin.app_probes` (empty when none moved).
pub fn redirect(spec: &mut Value, capture: &Capture) -> Result<(Vec<Original>, Map<String, Value>), String> {
    let skipped = &capture.skip_inbound_ports;
    let (mut originals, mut app_probes) = (Vec::new(), Map::new());
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else {
        return Ok((originals, app_probes));
    };
    for (index, container) in containers.iter_mut().enumerate() {
        let name = container["name"].as_str().unwrap_or_default().to_string();
        if name == SIDECAR {
            continue;
        }
        for (kind, short) in KINDS {
            let Some(probe) = container.get(kind) else { continue };
            let at = format!("spec.containers[{index}].{kind}");
            let Some(app_probe) = app_probe(probe, container, &at)? else { continue };
            let port = ["http_get", "grpc", "tcp_socket"].iter().find_map(|h| app_probe[h]["port"].as_u64());
            if port.is_some_and(|port| {
                let port = port as u16;
                port == ADMIN_PORT || port == INBOUND_PORT || skipped.iter().any(|range| range.contains(port))
            }) {
                continue;
            }
            let path = format!("/app-probe/{name}/{short}");
            let original = container[kind].clone();
            let mut rewritten = original.clone();
            let fields = rewritten.as_object_mut().expect("a probe is a map");
            for handler in ["httpGet", "grpc", "tcpSocket"] {
                fields.remove(handler);
            }
            fields.insert("httpGet".into(), json!({ "path": path, "port": ADMIN_PORT }));
            container[kind] = rewritten;
            app_probes.insert(path, app_probe);
            originals.push(Original { container: name.clone(), kind: kind.into(), probe: original });
        }
    }
    Ok((originals, app_probes))
}

/// The probe as the sidecar runs it, or `None` if it stays with the kubelet.
fn app_probe(probe: &Value, container: &Value, at: &str) -> Result<Option<Value>, String> {
    let timeout = format!("{}s", probe["timeoutSeconds"].as_u64().unwrap_or(1));
    let handler = if let Some(http) = probe.get("httpGet") {
        let https = http["scheme"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("https"));
        if https || http.get("host").is_some() {
            return Ok(None);
        }
        let headers: Vec<Value> = http["httpHeaders"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| json!({ "name": h["name"], "value": h["value"] }))
            .collect();
        let port = port(&http["port"], container, &format!("{at}.httpGet.port"))?;
        json!({ "http_get": { "port": port, "path": http["path"].as_str().unwrap_or("/"), "headers": headers } })
    } else if let Some(grpc) = probe.get("grpc") {
        let port = port(&grpc["port"], container, &format!("{at}.grpc.port"))?;
        json!({ "grpc": { "port": port, "service": grpc["service"].as_str().unwrap_or_default() } })
    } else if let Some(tcp) = probe.get("tcpSocket") {
        if tcp.get("host").is_some() {
            return Ok(None);
        }
        json!({ "tcp_socket": { "port": port(&tcp["port"], container, &format!("{at}.tcpSocket.port"))? } })
    } else {
        return Ok(None);
    };
    let mut handler = handler;
    handler["timeout"] = json!(timeout);
    Ok(Some(handler))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(port: &Value, container: &Value, at: &str) -> Result<u16, String> {
    let number = match port {
        Value::Number(number) => number.as_u64(),
        Value::String(name) => container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    };
    number
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{at}: `{port}` is neither a port number nor the name of one of the container's ports"))
}

/// Puts back the probes [`redirect`] moved.
pub fn restore(spec: &mut Value, originals: &[Original]) {
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else { return };
    for original in originals {
        if let Some(container) = containers.iter_mut().find(|c| c["name"] == original.container.as_str()) {
            container[&original.kind] = original.probe.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(skip_inbound_ports: Option<&str>) -> Capture {
        Capture {
            by: Default::default(),
            image: "init".into(),
            skip_inbound_ports: skip_inbound_ports
                .iter()
                .flat_map(|p| p.split(','))
                .map(|p| p.parse().unwrap())
                .collect(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }

    fn spec() -> Value {
        json!({ "containers": [{
            "name": "api",
            "ports": [{ "name": "grpc", "containerPort": 7070 }, { "name": "metrics", "containerPort": 9090 }],
            "startupProbe": { "tcpSocket": { "port": "grpc" }, "periodSeconds": 1 },
            "readinessProbe": { "grpc": { "port": 7070, "service": "payments" }, "timeoutSeconds": 3 },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "metrics",
                "httpHeaders": [{ "name": "X-Probe", "value": "1" }] } },
        }] })
    }

    #[test]
    fn probes_move_to_the_admin_port_keeping_their_timing_and_come_back() {
        let mut spec = spec();
        let (originals, app_probes) = redirect(&mut spec, &capture(None)).unwrap();
        assert_eq!(originals.len(), 3);
        let api = &spec["containers"][0];
        assert_eq!(
            api["startupProbe"],
            json!({ "httpGet": { "path": "/app-probe/api/startup", "port": 4191 }, "periodSeconds": 1 })
        );
        assert_eq!(api["readinessProbe"]["timeoutSeconds"], 3);
        assert_eq!(app_probes["/app-probe/api/startup"], json!({ "tcp_socket": { "port": 7070 }, "timeout": "1s" }));
        assert_eq!(
            app_probes["/app-probe/api/readiness"],
            json!({ "grpc": { "port": 7070, "service": "payments" }, "timeout": "3s" })
        );
        assert_eq!(
            app_probes["/app-probe/api/liveness"],
            json!({ "http_get": { "port": 9090, "path": "/healthz", "headers": [{ "name": "X-Probe", "value": "1" }] }, "timeout": "1s" })
        );
        restore(&mut spec, &originals);
        assert_eq!(spec, self::spec());
    }

    #[test]
    fn probes_of_skipped_ports_other_hosts_https_and_commands_stay() {
        let mut spec = json!({ "containers": [{
            "name": "api",
            "startupProbe": { "httpGet": { "port": 9090 } },
            "readinessProbe": { "httpGet": { "port": 8443, "scheme": "HTTPS" } },
            "livenessProbe": { "exec": { "command": ["true"] } },
        }, {
            "name": "other",
            "livenessProbe": { "tcpSocket": { "port": 80, "host": "example.com" } },
        }] });
        let before = spec.clone();
        let (originals, app_probes) = redirect(&mut spec, &capture(Some("9000-9100"))).unwrap();
        assert!(originals.is_empty() && app_probes.is_empty());
        assert_eq!(spec, before);
    }

    #[test]
    fn a_port_name_the_container_lacks_is_named() {
        let mut spec = json!({ "containers": [{ "name": "api", "readinessProbe": { "grpc": { "port": "grpc" } } }] });
        let error = redirect(&mut spec, &capture(None)).unwrap_err();
        assert!(error.starts_with("spec.containers[0].readinessProbe.grpc.port: `\"grpc\"`"), "{error}");
    }
}
