//! `protomesh inject` and `protomesh uninject` over manifests: multi-document
//! YAML or JSON, `kind: List` included, written back in the form they came
//! in. Every object with a pod template (Pod, Deployment, StatefulSet,
//! DaemonSet, ReplicaSet, ReplicationController, Job, CronJob) goes through
//! the one mutation; every other object passes through as it was. `inject`
//! adds the bindings the injected pods' service accounts need ([`rbac`]),
//! `uninject` takes them out. Each object gets a line in the report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::exposure::{self, Exposure};
use super::inject::{self, Context, Verdict};
use super::rbac::{self, Account};
use super::settings::{self, Defaults};

/// How the input was written, and so how the output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// Manifests as read: their format and their documents, in order.
#[derive(Debug)]
pub struct Manifests {
    pub format: Format,
    pub documents: Vec<Value>,
}

/// What `inject` does beyond each pod's own annotations.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Inject every pod that has not opted out.
    pub all: bool,
    /// The namespace of objects that name none (as `kubectl -n`).
    pub namespace: Option<String>,
    /// Namespaces labelled `protomesh.io/inject` outside the input, and their value.
    pub namespace_labels: HashMap<String, String>,
    pub defaults: Defaults,
    /// Add the bindings the injected pods' service accounts need ([`rbac`]).
    pub rbac: bool,
}

/// Reads a file, every `.yaml`, `.yml` and `.json` file under a directory
/// (in name order), or standard input (`-`).
pub fn read(input: &Path) -> Result<Manifests, String> {
    if input == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("standard input: cannot read it: {e}"))?;
        return parse(&text, "standard input");
    }
    let mut files = Vec::new();
    collect(input, &mut files)?;
    let mut read: Option<Manifests> = None;
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: cannot read it: {e}", file.display()))?;
        let manifests = parse(&text, &file.display().to_string())?;
        match &mut read {
            None => read = Some(manifests),
            Some(all) => all.documents.extend(manifests.documents),
        }
    }
    read.ok_or_else(|| format!("{}: holds no .yaml, .yml or .json file", input.display()))
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), String> {
    if !path.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("{}: cannot read the directory: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        let manifest = entry.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
        if entry.is_dir() || manifest {
            collect(&entry, files)?;
        }
    }
    Ok(())
}

/// Parses JSON (one object) or YAML (any number of documents; empty ones dropped).
pub fn parse(text: &str, source: &str) -> Result<Manifests, String> {
    if text.trim_start().starts_with('{') {
        let document = serde_json::from_str(text).map_err(|e| format!("{source}: invalid JSON: {e}"))?;
        return Ok(Manifests { format: Format::Json, documents: vec![document] });
    }
    // As Kubernetes reads YAML (1.1): `0644` is octal, as a file mode is written.
    let mut options = serde_saphyr::Options::default();
    options.legacy_octal_numbers = true;
    let documents: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| format!("{source}: invalid YAML: {e}"))?;
    Ok(Manifests { format: Format::Yaml, documents: documents.into_iter().filter(|d| !d.is_null()).collect() })
}

/// Writes the documents back in their format.
pub fn render(manifests: &Manifests) -> String {
    match manifests.format {
        Format::Json => manifests
            .documents
            .iter()
            .map(|d| serde_json::to_string_pretty(d).expect("JSON values serialize") + "\n")
            .collect(),
        Format::Yaml => manifests
            .documents
            .iter()
            .map(|d| serde_saphyr::to_string(d).expect("JSON values serialize as YAML"))
            .collect::<Vec<_>>()
            .join("---\n"),
    }
}

/// Where each kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// What was done to one object.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// `deployment/checkout`.
    pub object: String,
    pub outcome: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.outcome)
    }
}

/// Injects every pod template in `manifests`, and adds the bindings their
/// service accounts need that the manifests do not hold yet; one report
/// line per object.
pub fn inject(manifests: &mut Manifests, options: &Options) -> Result<Vec<Line>, String> {
    let mut labels = options.namespace_labels.clone();
    for object in objects(&manifests.documents) {
        if object["kind"] == "Namespace"
            && let (Some(name), Some(label)) =
                (object["metadata"]["name"].as_str(), object["metadata"]["labels"][settings::INJECT].as_str())
        {
            labels.insert(name.to_string(), label.to_string());
        }
    }
    let exposures = Exposure::of(objects(&manifests.documents));
    let (mut accounts, mut unplaced) = (Vec::new(), Vec::new());
    let mut lines = each_template(manifests, |template, object| {
        let namespace = object.namespace.as_deref().or(options.namespace.as_deref());
        let context = Context {
            exposed_ports: exposure::exposed_ports(&exposures, template, namespace, options.namespace.as_deref()),
            namespace,
            namespace_injection: namespace.and_then(|ns| labels.get(ns)).map(String::as_str),
            inject_all: options.all,
            workload: &object.workload,
            defaults: options.defaults.clone(),
        };
        Ok(match inject::inject(template, &context)? {
            Verdict::Injected(injected, settings) => {
                match namespace {
                    Some(namespace) => accounts.push(Account::of(&settings, namespace)),
                    None => unplaced.push(object.label.clone()),
                }
                (Some(injected), format!("injected; {}", settings.plaintext_ports(template)))
            }
            Verdict::Unchanged => (None, "unchanged (already injected)".to_string()),
            Verdict::Skipped(why) => (None, format!("skipped: {why}")),
        })
    })?;
    if options.rbac {
        lines.extend(add_bindings(manifests, accounts, &unplaced));
    }
    Ok(lines)
}

/// Adds the bindings of each account that the manifests do not hold; the
/// report names each one added, and the workloads whose namespace is not known.
fn add_bindings(manifests: &mut Manifests, mut accounts: Vec<Account>, unplaced: &[String]) -> Vec<Line> {
    accounts.sort();
    accounts.dedup();
    let held: Vec<String> = objects(&manifests.documents).map(rbac::described).collect();
    let mut lines = Vec::new();
    let mut added = Vec::new();
    for account in &accounts {
        for binding in rbac::bindings(account) {
            let object = rbac::described(&binding);
            if held.contains(&object) {
                continue;
            }
            let outcome =
                format!("added: grants service account {}/{} what its sidecar needs", account.namespace, account.name);
            lines.push(Line { object, outcome });
            added.push(binding);
        }
    }
    for workload in unplaced {
        let outcome = "no bindings added for its service account: its namespace is not known (give --namespace)";
        lines.push(Line { object: workload.clone(), outcome: outcome.into() });
    }
    // A single List takes them as items, so the output stays one document.
    match &mut manifests.documents[..] {
        [list] if list["kind"] == "List" && list["items"].is_array() => {
            list["items"].as_array_mut().expect("checked to be a list").extend(added)
        }
        _ => manifests.documents.extend(added),
    }
    lines
}

/// Takes the sidecar out of every injected pod template in `manifests`, and
/// the bindings `inject` added.
pub fn uninject(manifests: &mut Manifests) -> Result<Vec<Line>, String> {
    let mut removed = Vec::new();
    let mut keep = |object: &Value| {
        let added = rbac::added(object);
        if added {
            removed.push(Line { object: rbac::described(object), outcome: "removed (added by inject)".into() });
        }
        !added
    };
    manifests.documents.retain(|document| keep(document));
    for document in manifests.documents.iter_mut().filter(|d| d["kind"] == "List") {
        if let Some(items) = document["items"].as_array_mut() {
            items.retain(|item| keep(item));
        }
    }
    let mut lines = each_template(manifests, |template, _| {
        Ok(match inject::uninject(template)? {
            Some(original) => (Some(original), "uninjected".to_string()),
            None => (None, "unchanged (not injected)".to_string()),
        })
    })?;
    lines.extend(removed);
    Ok(lines)
}

/// The objects of the documents, with the items of `kind: List` in place of the list.
fn objects(documents: &[Value]) -> impl Iterator<Item = &Value> {
    documents.iter().flat_map(|document| match document["items"].as_array() {
        Some(items) if document["kind"] == "List" => items.iter().collect::<Vec<_>>(),
        _ => vec![document],
    })
}

/// What is known of the object whose pod template is being changed.
struct Object {
    namespace: Option<String>,
    workload: String,
    /// `deployment/checkout`, as the report names it.
    label: String,
}

type Change = (Option<Value>, String);

/// Applies `change` to each pod template, replacing it where a new one comes
/// back; other objects pass through. Errors name the document and the field.
fn each_template(
    manifests: &mut Manifests,
    mut change: impl FnMut(&Value, &Object) -> Result<Change, String>,
) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    for (index, document) in manifests.documents.iter_mut().enumerate() {
        let at = format!("document {}", index + 1);
        let is_list = document["kind"] == "List";
        let items: Vec<&mut Value> = match document {
            Value::Object(_) if is_list => match document.get_mut("items") {
                Some(Value::Array(items)) => items.iter_mut().collect(),
                _ => return Err(format!("{at} (List): items: expected a list of objects")),
            },
            Value::Object(_) => vec![document],
            _ => return Err(format!("{at}: expected a Kubernetes object (a map with apiVersion and kind)")),
        };
        for (item_index, object) in items.into_iter().enumerate() {
            let at = if is_list { format!("{at} (List), items[{item_index}]") } else { at.clone() };
            let Some(kind) = object["kind"].as_str().map(str::to_string) else {
                return Err(format!("{at}: kind: missing; every object needs apiVersion and kind"));
            };
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let label = format!("{}/{}", kind.to_lowercase(), if name.is_empty() { "(unnamed)" } else { &name });
            let Some(path) = template_path(&kind) else {
                lines.push(Line { object: label, outcome: "skipped: not a workload, passed through".into() });
                continue;
            };
            let workload = if kind == "Pod" { inject::workload_of_pod(object) } else { name.clone() };
            let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
            let field = path.join(".");
            let template = path
                .iter()
                .try_fold(&mut *object, |node, key| node.get_mut(*key))
                .ok_or_else(|| format!("{at} ({label}): {field}: missing; a {kind} needs a pod template there"))?;
            let prefix = if field.is_empty() { String::new() } else { format!("{field}.") };
            let object = Object { namespace, workload, label: label.clone() };
            let (replacement, outcome) =
                change(template, &object).map_err(|e| format!("{at} ({label}): {prefix}{e}"))?;
            if let Some(replacement) = replacement {
                *template = replacement;
            }
            lines.push(Line { object: label, outcome });
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_reads_numbers_as_kubernetes_does_and_drops_empty_documents() {
        let manifests = parse("---\na: 0644\nb: yes\n---\n---\nc: '0644'\n", "test").unwrap();
        assert_eq!(manifests.format, Format::Yaml);
        assert_eq!(manifests.documents.len(), 2);
        assert_eq!(manifests.documents[0]["a"], 420);
        assert_eq!(manifests.documents[1]["c"], "0644");
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let mut manifests =
            parse("kind: Service\n---\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n", "t").unwrap();
        let err = inject(&mut manifests, &Options::default()).unwrap_err();
        assert_eq!(err, "document 2 (deployment/web): spec.template: missing; a Deployment needs a pod template there");
        let mut manifests = parse("- a\n", "t").unwrap();
        let err = inject(&mut manifests, &Options::default()).unwrap_err();
        assert!(err.starts_with("document 1: expected a Kubernetes object"), "{err}");
        let mut manifests = parse("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{image: x}]}\n", "t").unwrap();
        let err = inject(&mut manifests, &Options { all: true, ..Default::default() }).unwrap_err();
        assert_eq!(err, "document 1 (pod/p): spec.containers[0].name: expected the container's name, found nothing");
    }
}
