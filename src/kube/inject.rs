//! The one mutation: a pod template (with what is known of its namespace) in,
//! the injected pod template out. `protomesh inject` and the admission
//! webhook both call it, so their results are the same by construction. It
//! works on the JSON document itself, so fields protomesh does not know (a
//! newer Kubernetes', a CRD's) pass through untouched, and it records what it
//! added in an annotation, so that [`uninject`] gives back the original.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::probes;
use super::settings::{self, Defaults, Mode, Settings};
use super::sidecar::{self, CONFIG_VOLUME, CONTRACTS_VOLUME, IDENTITY_VOLUME};
use super::{INIT, SIDECAR, VERSION};

/// What is known around the pod template.
#[derive(Clone, Debug, Default)]
pub struct Context<'a> {
    /// The namespace the pod will run in, when known.
    pub namespace: Option<&'a str>,
    /// The namespace's `protomesh.io/inject` label, when known.
    pub namespace_injection: Option<&'a str>,
    /// Inject every pod that has not opted out.
    pub inject_all: bool,
    /// The workload's name, for the sidecar's service name when no label gives one.
    pub workload: &'a str,
    pub defaults: Defaults,
    /// Ports that Services of the input expose outside the cluster
    /// ([`super::exposure`]), and the Service: they take plaintext too.
    pub exposed_ports: Vec<(u16, String)>,
}

#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// The injected pod template, and what its annotations asked for.
    Injected(Value, Box<Settings>),
    /// Already injected: nothing to do.
    Unchanged,
    /// Not injected, and why.
    Skipped(String),
}

/// What injection added, kept on the pod in `protomesh.io/status`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Status {
    version: String,
    container: String,
    /// `initContainers` (native) or `containers` (classic).
    list: String,
    /// The capture rules' init container, in `initContainers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init_container: Option<String>,
    /// The app's probes as they were, before they moved to the sidecar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    probes: Vec<probes::Original>,
    volumes: Vec<String>,
    annotations: Vec<String>,
    /// Maps and lists that did not exist before, by path.
    created: Vec<String>,
}

/// Injects the sidecar into `template`, or says why not. Errors name the
/// field (relative to the template) and what it should be.
pub fn inject(template: &Value, context: &Context) -> Result<Verdict, String> {
    check(template)?;
    if annotation(template, settings::STATUS).is_some() {
        return Ok(Verdict::Unchanged);
    }
    if let Some(reason) = skipped(template, context) {
        return Ok(Verdict::Skipped(reason));
    }
    let mut settings = Settings::read(template, context.workload, &context.defaults)?;
    settings.exposed_ports = context.exposed_ports.clone();
    let mut pod = template.clone();
    let mut created = Vec::new();
    let app = pod["spec"]["containers"][0]["name"].as_str().unwrap_or_default().to_string();

    let (originals, app_probes) = match &settings.capture {
        Some(capture) => probes::redirect(&mut pod["spec"], capture)?,
        None => Default::default(),
    };
    let list = match settings.mode {
        Mode::Native => "initContainers",
        Mode::Classic => "containers",
    };
    let containers = ensure(&mut pod, &["spec", list], json!([]), &mut created);
    let sidecar = sidecar::container(&settings, &app_probes);
    containers.as_array_mut().expect("checked to be a list").insert(0, sidecar);
    // The rules go in first of all, before the sidecar and the app start.
    if let Some(capture) = &settings.capture {
        let init = ensure(&mut pod, &["spec", "initContainers"], json!([]), &mut created);
        init.as_array_mut().expect("checked to be a list").insert(0, sidecar::init_container(capture));
    }
    let volumes = ensure(&mut pod, &["spec", "volumes"], json!([]), &mut created);
    let added: Vec<Value> = sidecar::volumes(&settings);
    let names = added.iter().map(|v| v["name"].as_str().unwrap_or_default().to_string()).collect();
    volumes.as_array_mut().expect("checked to be a list").extend(added);

    let annotations = ensure(&mut pod, &["metadata", "annotations"], json!({}), &mut created);
    let annotations = annotations.as_object_mut().expect("checked to be a map");
    let mut added_annotations = Vec::new();
    let mut add = |name: &str, value: String| {
        if !annotations.contains_key(name) {
            annotations.insert(name.to_string(), json!(value));
            added_annotations.push(name.to_string());
        }
    };
    add(settings::DEFAULT_CONTAINER, app);
    add(settings::CREATED_BY, "protomesh".into());
    add(settings::PROXY_VERSION, VERSION.into());
    // Said on the pod, whatever the injector's default: the CNI plugin reads it.
    if let Some(capture) = &settings.capture {
        add(settings::CAPTURE_BY, capture.by.as_str().into());
    }
    let status = Status {
        version: VERSION.into(),
        container: SIDECAR.into(),
        list: list.into(),
        init_container: settings.capture.is_some().then(|| INIT.to_string()),
        probes: originals,
        volumes: names,
        annotations: added_annotations,
        created,
    };
    let record = serde_json::to_string(&status).expect("the status serializes");
    annotations.insert(settings::STATUS.into(), json!(record));
    Ok(Verdict::Injected(pod, Box::new(settings)))
}

/// Takes out what [`inject`] added; `None` when the template is not injected.
pub fn uninject(template: &Value) -> Result<Option<Value>, String> {
    check(template)?;
    let Some(record) = annotation(template, settings::STATUS) else { return Ok(None) };
    let status: Status = serde_json::from_str(record)
        .map_err(|e| format!("metadata.annotations.\"{}\": not a record protomesh wrote ({e})", settings::STATUS))?;
    let mut pod = template.clone();
    if let Some(list) = pod["spec"][&status.list].as_array_mut() {
        list.retain(|c| c["name"] != status.container.as_str());
    }
    if let Some(init) = &status.init_container
        && let Some(list) = pod["spec"]["initContainers"].as_array_mut()
    {
        list.retain(|c| c["name"] != init.as_str());
    }
    probes::restore(&mut pod["spec"], &status.probes);
    if let Some(volumes) = pod["spec"]["volumes"].as_array_mut() {
        volumes.retain(|v| !status.volumes.iter().any(|name| v["name"] == name.as_str()));
    }
    if let Some(annotations) = pod["metadata"]["annotations"].as_object_mut() {
        for name in status.annotations.iter().map(String::as_str).chain([settings::STATUS]) {
            annotations.shift_remove(name);
        }
    }
    for path in status.created.iter().rev() {
        let (parent, key) = path.rsplit_once('.').unwrap_or(("", path));
        let parent = parent.split('.').filter(|s| !s.is_empty()).try_fold(&mut pod, |v, k| v.get_mut(k));
        if let Some(Value::Object(parent)) = parent
            && parent.get(key).is_some_and(is_empty)
        {
            parent.shift_remove(key);
        }
    }
    Ok(Some(pod))
}

/// Why the pod is not for injection, if it is not.
fn skipped(template: &Value, context: &Context) -> Option<String> {
    let label = template["metadata"]["labels"][settings::INJECT].as_str();
    if label == Some("disabled") {
        return Some(format!("opted out with label {}=disabled", settings::INJECT));
    }
    // As the webhook configuration of k8s/injector never sends them.
    if let Some(namespace @ ("kube-system" | "protomesh-system")) = context.namespace {
        return Some(format!("in namespace {namespace}"));
    }
    if template["spec"]["hostNetwork"] == true {
        return Some("uses the host's network (hostNetwork), which a sidecar cannot take over".into());
    }
    match (label, context.namespace_injection) {
        (Some("enabled"), _) | (_, Some("enabled")) => None,
        (_, Some("disabled")) => Some(format!("its namespace opted out with label {}=disabled", settings::INJECT)),
        _ if context.inject_all => None,
        _ => Some(format!(
            "not opted in: label {}=enabled on the pod template or its namespace (or inject --all)",
            settings::INJECT
        )),
    }
}

fn annotation<'a>(template: &'a Value, name: &str) -> Option<&'a str> {
    template["metadata"]["annotations"][name].as_str()
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.is_empty(),
        Value::Array(list) => list.is_empty(),
        _ => false,
    }
}

/// The value at `path`, made `empty` first (and recorded in `created`) if absent.
fn ensure<'a>(pod: &'a mut Value, path: &[&str], empty: Value, created: &mut Vec<String>) -> &'a mut Value {
    let mut node = pod;
    for (depth, key) in path.iter().enumerate() {
        let map = node.as_object_mut().expect("checked to be a map");
        if !map.contains_key(*key) {
            let value = if depth + 1 == path.len() { empty.clone() } else { json!({}) };
            map.insert(key.to_string(), value);
            created.push(path[..=depth].join("."));
        }
        node = map.get_mut(*key).expect("just made sure");
    }
    node
}

/// What injection reads and writes must have the shape Kubernetes gives it.
fn check(template: &Value) -> Result<(), String> {
    let map = |value: &Value, field: &str| -> Result<(), String> {
        match value {
            Value::Object(_) | Value::Null => Ok(()),
            other => Err(format!("{field}: expected a map, found {}", kind(other))),
        }
    };
    if !template.is_object() {
        return Err(format!("expected a pod template (a map with metadata and spec), found {}", kind(template)));
    }
    map(&template["metadata"], "metadata")?;
    for field in ["labels", "annotations"] {
        let value = &template["metadata"][field];
        map(value, &format!("metadata.{field}"))?;
        if let Some((key, other)) = value.as_object().and_then(|m| m.iter().find(|(_, v)| !v.is_string())) {
            return Err(format!("metadata.{field}.\"{key}\": expected a string, found {}", kind(other)));
        }
    }
    let spec = &template["spec"];
    if !spec.is_object() {
        return Err(format!("spec: expected the pod's spec (a map), found {}", kind(spec)));
    }
    let mut names = Vec::new();
    for list in ["initContainers", "containers"] {
        let containers = match &spec[list] {
            Value::Null if list == "initContainers" => continue,
            Value::Array(containers) if containers.is_empty() && list == "containers" => {
                return Err("spec.containers: a pod needs at least one container".into());
            }
            Value::Array(containers) => containers,
            other => return Err(format!("spec.{list}: expected a list of containers, found {}", kind(other))),
        };
        for (i, container) in containers.iter().enumerate() {
            let Some(name) = container["name"].as_str() else {
                return Err(format!(
                    "spec.{list}[{i}].name: expected the container's name, found {}",
                    kind(&container["name"])
                ));
            };
            names.push(name.to_string());
        }
    }
    let volumes: Vec<&str> = match &spec["volumes"] {
        Value::Null => Vec::new(),
        Value::Array(volumes) => volumes.iter().filter_map(|v| v["name"].as_str()).collect(),
        other => return Err(format!("spec.volumes: expected a list of volumes, found {}", kind(other))),
    };
    if annotation(template, settings::STATUS).is_none() {
        if names.iter().any(|n| n == SIDECAR) {
            return Err(format!("spec: a container is already named {SIDECAR}, the sidecar's name"));
        }
        if let Some(taken) = volumes.iter().find(|v| [IDENTITY_VOLUME, CONTRACTS_VOLUME, CONFIG_VOLUME].contains(v)) {
            return Err(format!("spec.volumes: a volume is already named {taken}, which the sidecar uses"));
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// The workload a pod belongs to, from what the pod itself says: a Deployment's
/// pod is `<deployment>-<pod-template-hash>-<random>`.
pub fn workload_of_pod(pod: &Value) -> String {
    let metadata = &pod["metadata"];
    if let Some(name) = metadata["name"].as_str().filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    let generated = metadata["generateName"].as_str().unwrap_or_default().trim_end_matches('-');
    match metadata["labels"]["pod-template-hash"].as_str() {
        Some(hash) => generated.strip_suffix(hash).map_or(generated, |w| w.trim_end_matches('-')).to_string(),
        None => generated.to_string(),
    }
}
