//! `protomesh-cni`, a chained CNI plugin (spec 1.0 and 1.1): as the runtime
//! sets up a pod's network, it installs the pod's capture rules, the same
//! ones `protomesh init` would, so that the pod itself needs no NET_ADMIN.
//! It acts only for pods injected with `protomesh.io/capture-by: cni`
//! (read from the Kubernetes API); every other pod, and every other
//! command, passes through untouched. The previous plugin's result goes on
//! as it came, byte for byte in meaning: it is kept as JSON, never parsed
//! into types that could drop a field a later plugin needs.
//!
//! `install.rs` is the DaemonSet's part: it puts the plugin on the node.
//!
//! Hand-written rather than on a CNI crate: the protocol is a few variables,
//! a JSON document in and one out, and the Rust crates for it are young and
//! parse the previous result into types of their own.

pub mod install;
mod netns;
pub mod repair;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::capture::CaptureRules;
use crate::discovery::kubernetes::read_kubeconfig;
use crate::kube::settings::{self, CaptureBy, Defaults, Settings};

/// The spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long a pod's lookup may take before the runtime is told to try again.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The command the runtime asks for (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// One invocation, as the runtime describes it in `CNI_*` variables.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub command: Command,
    /// `CNI_NETNS`: the pod's network namespace, by path.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`, `K=V;K=V`: Kubernetes runtimes name the pod there.
    pub args: HashMap<String, String>,
}

impl Invocation {
    /// Reads the invocation from `vars` (the process's environment).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Invocation, Error> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        let command = match vars.get("CNI_COMMAND").map(String::as_str) {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            other => {
                return Err(Error::new(INVALID_ENVIRONMENT, format!("CNI_COMMAND is {other:?}: not a CNI command")));
            }
        };
        let netns = vars.get("CNI_NETNS").filter(|path| !path.is_empty()).map(PathBuf::from);
        let args = vars
            .get("CNI_ARGS")
            .into_iter()
            .flat_map(|args| args.split(';'))
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        Ok(Invocation { command, netns, args })
    }

    /// The Kubernetes pod, `(namespace, name)`, where the runtime named one.
    fn pod(&self) -> Option<(&str, &str)> {
        Some((self.args.get("K8S_POD_NAMESPACE")?, self.args.get("K8S_POD_NAME")?))
    }
}

/// The plugin's entry in the network configuration list (stdin).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The kubeconfig the plugin reads pods with (the DaemonSet writes it).
    #[serde(default = "defaults::kubeconfig")]
    pub kubeconfig: PathBuf,
    /// The nft program on the node.
    #[serde(default = "defaults::nft")]
    pub nft: PathBuf,
    /// Namespaces whose pods pass without a question to the API server, so
    /// that the cluster's own pods start even while it does not answer.
    #[serde(default = "defaults::exclude_namespaces")]
    pub exclude_namespaces: Vec<String>,
}

mod defaults {
    use std::path::PathBuf;

    pub fn kubeconfig() -> PathBuf {
        "/etc/cni/net.d/protomesh-cni.kubeconfig".into()
    }

    pub fn nft() -> PathBuf {
        "nft".into()
    }

    pub fn exclude_namespaces() -> Vec<String> {
        vec!["kube-system".into()]
    }
}

/// A failure, as the runtime is told it: a CNI error code (1-99 the
/// spec's, 100 and up the plugin's) and a message naming the fix.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    pub code: u32,
    pub msg: String,
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Error {
        Error::new(IO_FAILURE, error.to_string())
    }
}

impl Error {
    fn new(code: u32, msg: impl Into<String>) -> Error {
        Error { code, msg: msg.into() }
    }

    /// The error document the runtime reads on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg })
    }
}

/// The spec's codes used here.
const INVALID_ENVIRONMENT: u32 = 4;
const IO_FAILURE: u32 = 5;
const INVALID_CONFIG: u32 = 7;
const DECODING_FAILED: u32 = 6;
const TRY_AGAIN_LATER: u32 = 11;
/// The plugin's own: the rules could not be installed, or are missing.
const RULES_FAILED: u32 = 100;

/// Runs one invocation with `stdin`'s configuration; what to print on stdout, if anything.
pub async fn run(invocation: &Invocation, stdin: &[u8]) -> Result<Option<Value>, Error> {
    if invocation.command == Command::Version {
        let asked = serde_json::from_slice::<Value>(stdin).ok();
        let version = asked.as_ref().and_then(|v| v["cniVersion"].as_str()).unwrap_or("1.1.0");
        return Ok(Some(json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })));
    }
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| Error::new(DECODING_FAILED, format!("the network configuration is not valid: {e}")))?;
    match invocation.command {
        Command::Add => {
            let Some(prev) = &conf.prev_result else {
                return Err(Error::new(
                    INVALID_CONFIG,
                    "protomesh-cni is a chained plugin: list it after the plugin that sets up the pod's interface",
                ));
            };
            if let Some(rules) = capture_rules(invocation, &conf).await? {
                let netns = netns_of(invocation)?;
                netns::install(&netns, &rules, &conf.nft)
                    .map_err(|e| Error::new(RULES_FAILED, format!("protomesh-cni: {e}")))?;
            }
            let mut result = prev.clone();
            result["cniVersion"] = json!(conf.cni_version);
            Ok(Some(result))
        }
        Command::Check => {
            if conf.prev_result.is_none() {
                return Err(Error::new(INVALID_CONFIG, "CHECK needs the previous plugin's result (prevResult)"));
            }
            if capture_rules(invocation, &conf).await?.is_some() {
                let netns = netns_of(invocation)?;
                netns::check(&netns, &conf.nft).map_err(|e| Error::new(RULES_FAILED, format!("protomesh-cni: {e}")))?;
            }
            Ok(None)
        }
        // The rules live in the pod's network namespace and go with it.
        Command::Del | Command::Status | Command::Gc | Command::Version => Ok(None),
    }
}

fn netns_of(invocation: &Invocation) -> Result<PathBuf, Error> {
    invocation
        .netns
        .clone()
        .ok_or_else(|| Error::new(INVALID_ENVIRONMENT, "CNI_NETNS is not set: the pod's network namespace is needed"))
}

/// The pod's capture rules, if the plugin installs them: a Kubernetes pod
/// injected with capture by the CNI. A pod the runtime does not name is no
/// Kubernetes pod, and passes.
async fn capture_rules(invocation: &Invocation, conf: &NetConf) -> Result<Option<CaptureRules>, Error> {
    let Some((namespace, name)) = invocation.pod() else { return Ok(None) };
    if conf.exclude_namespaces.iter().any(|excluded| excluded == namespace) {
        return Ok(None);
    }
    let pod = tokio::time::timeout(LOOKUP_TIMEOUT, read_pod(conf, namespace, name)).await.map_err(|_| {
        Error::new(TRY_AGAIN_LATER, format!("reading pod {namespace}/{name}: no answer within {LOOKUP_TIMEOUT:?}"))
    })??;
    rules_for(&pod, name).map_err(|e| Error::new(INVALID_CONFIG, format!("pod {namespace}/{name}: {e}")))
}

async fn read_pod(conf: &NetConf, namespace: &str, name: &str) -> Result<Value, Error> {
    let unusable = |e: String| Error::new(INVALID_CONFIG, format!("kubeconfig {e}"));
    let config = read_kubeconfig(&conf.kubeconfig).await.map_err(unusable)?;
    let client = kube::Client::try_from(config)
        .map_err(|e| unusable(format!("{}: cannot make a client: {e}", conf.kubeconfig.display())))?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, namespace);
    // Until the pod's rules are in, it must not start: a failure asks the runtime to try again.
    let pod = pods.get(name).await.map_err(|e| {
        let fix = match &e {
            kube::Error::Api(status) if status.code == 403 => {
                " (bind the ClusterRole protomesh-cni to the plugin's service account)"
            }
            _ => "",
        };
        Error::new(TRY_AGAIN_LATER, format!("reading pod {namespace}/{name}: {e}{fix}"))
    })?;
    serde_json::to_value(pod).map_err(|e| Error::new(DECODING_FAILED, e.to_string()))
}

/// The capture rules of an injected pod that asks the CNI for them.
pub fn rules_for(pod: &Value, name: &str) -> Result<Option<CaptureRules>, String> {
    let injected = pod["metadata"]["annotations"].get(settings::STATUS).is_some();
    if !injected {
        return Ok(None);
    }
    let settings = Settings::read(pod, name, &Defaults::default())?;
    Ok(settings.capture.filter(|capture| capture.by == CaptureBy::Cni).map(|capture| capture.rules()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(command: &str, args: &str) -> Vec<(String, String)> {
        [("CNI_COMMAND", command), ("CNI_NETNS", "/run/netns/p"), ("CNI_ARGS", args)]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .to_vec()
    }

    #[test]
    fn the_runtimes_variables_name_the_command_and_the_pod() {
        let invocation =
            Invocation::from_vars(vars("ADD", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0")).unwrap();
        assert_eq!((invocation.command, invocation.pod()), (Command::Add, Some(("shop", "cart-0"))));
        assert_eq!(Invocation::from_vars(vars("DEL", "")).unwrap().pod(), None, "not a Kubernetes pod");
        let wrong = Invocation::from_vars(vars("ATTACH", "")).unwrap_err();
        assert_eq!(wrong.code, INVALID_ENVIRONMENT);
    }

    #[tokio::test]
    async fn version_lists_what_it_speaks_and_other_pods_pass_through_unchanged() {
        let version = run(&Invocation::from_vars(vars("VERSION", "")).unwrap(), br#"{"cniVersion":"1.0.0"}"#).await;
        assert_eq!(version.unwrap().unwrap()["supportedVersions"], json!(SUPPORTED_VERSIONS));
        // No pod named: nothing is read, and the previous result goes on, unknown fields and all.
        let previous = json!({ "cniVersion": "1.0.0", "ips": [{ "address": "10.1.0.5/24" }], "vendor": { "x": 1 } });
        let conf = json!({ "cniVersion": "1.1.0", "name": "net", "type": "protomesh-cni", "prevResult": previous });
        let added = run(&Invocation::from_vars(vars("ADD", "")).unwrap(), conf.to_string().as_bytes()).await;
        let added = added.unwrap().unwrap();
        assert_eq!(
            (&added["vendor"], &added["ips"], &added["cniVersion"]),
            (&previous["vendor"], &previous["ips"], &json!("1.1.0"))
        );
        // A pod of an excluded namespace passes without a question to the API (whose kubeconfig is missing here).
        let system =
            Invocation::from_vars(vars("ADD", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1")).unwrap();
        assert!(run(&system, conf.to_string().as_bytes()).await.unwrap().is_some());
        let shop = Invocation::from_vars(vars("ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0")).unwrap();
        assert_eq!(run(&shop, conf.to_string().as_bytes()).await.unwrap_err().code, INVALID_CONFIG, "no kubeconfig");
        let garbled = run(&Invocation::from_vars(vars("ADD", "")).unwrap(), b"{").await.unwrap_err();
        assert_eq!(garbled.code, DECODING_FAILED);
    }

    #[test]
    fn only_a_pod_injected_for_the_cni_gets_rules() {
        let pod = |annotations: Value| json!({ "metadata": { "annotations": annotations }, "spec": { "containers": [{ "name": "app" }] } });
        let status = settings::STATUS;
        let cni = pod(
            json!({ status: "{}", "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "cni", "protomesh.io/skip-inbound-ports": "9090" }),
        );
        let rules = rules_for(&cni, "p").unwrap().unwrap();
        assert_eq!(rules.skip_inbound_ports.len(), 1);
        assert_eq!(
            rules.ruleset(),
            Settings::read(&cni, "p", &Defaults::default()).unwrap().capture.unwrap().rules().ruleset()
        );
        assert!(rules_for(&pod(json!({ status: "{}", "protomesh.io/capture": "enabled" })), "p").unwrap().is_none());
        assert!(
            rules_for(&pod(json!({ "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "cni" })), "p")
                .unwrap()
                .is_none(),
            "not injected"
        );
        let bad = pod(
            json!({ status: "{}", "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "cni", "protomesh.io/skip-inbound-ports": "http" }),
        );
        assert!(rules_for(&bad, "p").unwrap_err().contains("protomesh.io/skip-inbound-ports"));
    }
}
