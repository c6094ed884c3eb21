//! `protomesh-cni` as a container runtime runs it: a network configuration
//! list chaining Debian's containernetworking-plugins (`bridge`, with
//! `host-local` addresses) and `protomesh-cni`, each plugin executed in the
//! node's namespace with the CNI variables and its configuration on stdin,
//! the previous plugin's result passed on, as libcni does. The plugin reads
//! pods from the suite's API server (`apiserver.rs`: kube-apiserver cannot
//! run here), which authorizes it by the RBAC in `k8s/cni`; the pods are
//! what `protomesh inject` makes of plain ones.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use protomesh::kube::inject::{Context, Verdict, inject};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::apiserver::ApiServer;
use crate::cluster::*;
use crate::harness::{TRUST_DOMAIN, id, within};
use crate::pods::{self, Node, Pod};

/// Where Debian's containernetworking-plugins puts them.
const PLUGINS: &str = "/usr/lib/cni";
const NAMESPACE: &str = "shop";

pub fn unavailable() -> Option<String> {
    pods::unavailable().or_else(|| {
        (!Path::new(PLUGINS).join("bridge").exists())
            .then(|| format!("no CNI plugins in {PLUGINS} (apt-get install containernetworking-plugins)"))
    })
}

/// The container runtime's part: a configuration list, run plugin by plugin.
pub struct Runtime {
    list: Value,
    /// `CNI_PATH`: Debian's plugins, then the directory of `protomesh-cni`.
    path: String,
    /// The namespace of the pods it sets up.
    namespace: String,
}

/// A plugin's failure, as the runtime reads it: its exit status and error document.
#[derive(Debug)]
pub struct Failure {
    plugin: String,
    error: Value,
}

/// The node's network configuration before protomesh-cni: a bridge, its
/// pods' addresses from host-local.
fn bridge_list(node: &Node, files: &Path) -> Value {
    let (subnet, gateway) = node.subnet();
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "br0",
                "isGateway": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet, "rangeStart": subnet.replace(".0/24", ".100"), "gateway": gateway.to_string() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": files.join("ipam").display().to_string(),
                },
            },
        ],
    })
}

impl Runtime {
    pub fn new(node: &Node, files: &Path, kubeconfig: &Path) -> Runtime {
        let mut list = bridge_list(node, files);
        let ours = json!({ "type": "protomesh-cni", "kubeconfig": kubeconfig.display().to_string() });
        list["plugins"].as_array_mut().unwrap().push(ours);
        let ours = Path::new(env!("CARGO_BIN_EXE_protomesh-cni")).parent().unwrap().display().to_string();
        Runtime { list, path: format!("{PLUGINS}:{ours}"), namespace: NAMESPACE.into() }
    }

    /// The runtime of a node where `protomesh-cni install` ran: its list
    /// read from `conf_dir`, plugins from `bin_dir` and Debian's.
    fn installed(conf_dir: &Path, bin_dir: &Path) -> Runtime {
        let list = serde_json::from_slice(&std::fs::read(conf_dir.join("10-bridge.conflist")).unwrap()).unwrap();
        Runtime { list, path: format!("{}:{PLUGINS}", bin_dir.display()), namespace: NAMESPACE.into() }
    }

    /// Runs `command` (ADD, CHECK: in order; DEL: in reverse) for the pod
    /// `name` whose namespace is `netns`; the last plugin's result. CHECK
    /// and DEL give each plugin the result ADD ended with, `cached`.
    fn run(
        &self,
        node: &str,
        command: &str,
        netns: &Path,
        name: &str,
        cached: Option<&Value>,
    ) -> Result<Value, Failure> {
        let mut plugins: Vec<Value> = self.list["plugins"].as_array().unwrap().clone();
        if command == "DEL" {
            plugins.reverse();
        }
        let mut previous: Option<Value> = cached.cloned();
        for mut conf in plugins {
            conf["cniVersion"] = self.list["cniVersion"].clone();
            conf["name"] = self.list["name"].clone();
            if let Some(result) = &previous {
                conf["prevResult"] = result.clone();
            }
            let plugin = conf["type"].as_str().unwrap().to_string();
            let binary =
                self.path.split(':').map(|dir| Path::new(dir).join(&plugin)).find(|p| p.exists()).expect("the plugin");
            let mut child = Command::new("ip")
                .args(["netns", "exec", node])
                .arg(&binary)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap())
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", name)
                .env("CNI_NETNS", netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", &self.path)
                .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={name}", self.namespace))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
            let output = child.wait_with_output().unwrap();
            let said: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            if !output.status.success() {
                let stderr = String::from_utf8_lossy(&output.stderr).to_string();
                return Err(Failure { plugin, error: json!({ "said": said, "stderr": stderr }) });
            }
            if command == "ADD" {
                previous = Some(said);
            }
        }
        Ok(previous.unwrap_or(Value::Null))
    }

    /// A pod made by ADD, as the runtime makes a sandbox; its address and
    /// the chain's result.
    pub fn pod(&self, node: &Node, name: &str) -> Result<(Pod, Value), Failure> {
        let mut result = None;
        let pod = node.pod_by(|node, netns| match self.run(node, "ADD", netns, name, None) {
            Ok(added) => {
                let address = added["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();
                result = Some(Ok(added));
                address
            }
            Err(failure) => {
                result = Some(Err(failure));
                Ipv4Addr::UNSPECIFIED
            }
        });
        result.unwrap().map(|added| (pod, added))
    }
}

impl Runtime {
    /// The runtime for pods of `namespace`.
    pub fn in_namespace(self, namespace: &str) -> Runtime {
        Runtime { namespace: namespace.into(), ..self }
    }
}

/// A node with its API server (the plugin's binding granted or not) and a
/// runtime whose list chains the plugin; `None`, said why, where pods cannot be made.
struct Setup {
    node: Node,
    files: tempfile::TempDir,
    api: Arc<ApiServer>,
    runtime: Runtime,
}

impl Setup {
    fn start(granted: bool) -> Option<Setup> {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return None;
        }
        let node = Node::new();
        let files = tempfile::tempdir().unwrap();
        let api = api_server(&node, granted);
        let runtime = Runtime::new(&node, files.path(), &api.kubeconfig(files.path()));
        Some(Setup { node, files, api, runtime })
    }
}

/// The annotations of a pod captured by the CNI plugin.
fn by_cni() -> Value {
    json!({ "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "cni" })
}

/// `name` as `protomesh inject` makes it, with `annotations`, in the API.
fn injected_pod(api: &ApiServer, name: &str, annotations: Value) -> Value {
    let template = json!({
        "metadata": { "name": name, "namespace": NAMESPACE, "labels": { "protomesh.io/inject": "enabled" }, "annotations": annotations },
        "spec": { "serviceAccountName": "client", "containers": [{ "name": "app", "image": "example/app:1", "ports": [{ "containerPort": 50051 }] }] },
    });
    let context = Context { namespace: Some(NAMESPACE), workload: name, ..Default::default() };
    let Verdict::Injected(mut pod, _) = inject(&template, &context).unwrap() else { panic!("not injected") };
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    api.put_pod_object(pod.clone());
    pod
}

/// The node's API server: in the node's namespace, where the plugins run,
/// with the plugin's RBAC from `k8s/cni` (or none of it).
fn api_server(node: &Node, granted: bool) -> Arc<ApiServer> {
    let api = node.api_server(Ipv4Addr::LOCALHOST.into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rbac = protomesh::kube::manifest::read(&root.join("k8s/cni/rbac.yaml")).unwrap().documents;
    let rbac = if granted { rbac } else { rbac.into_iter().filter(|o| o["kind"] != "ClusterRoleBinding").collect() };
    api.authorize(("kube-system", "protomesh-cni"), &rbac);
    api
}

/// A sidecar process, stopped when the test ends however it ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn table(pod: &Pod) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &pod.name, "nft", "list", "table", "inet", "protomesh"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// `protomesh init --validate` in `pod`, as its injected init container runs it.
fn validate(pod: &Pod) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &pod.name, "setpriv", "--reuid", "2103", "--regid", "2103", "--clear-groups"])
        .args([env!("CARGO_BIN_EXE_protomesh"), "init", "--validate"])
        .output()
        .unwrap()
}

#[test]
fn the_plugin_installs_the_rules_of_pods_injected_for_it_and_passes_every_other_pod_through() {
    let Some(Setup { node, files, api, runtime }) = Setup::start(true) else { return };

    injected_pod(
        &api,
        "captured",
        json!({ "protomesh.io/capture": "enabled", "protomesh.io/capture-by": "cni", "protomesh.io/skip-outbound-ports": "5432" }),
    );
    injected_pod(&api, "by-init", json!({ "protomesh.io/capture": "enabled" }));
    injected_pod(&api, "uncaptured", json!({}));

    let (captured, added) = runtime.pod(&node, "captured").unwrap();
    let rules = table(&captured);
    assert!(rules.contains("meta skuid 2102 return") && rules.contains("tcp dport 5432 return"), "{rules}");
    assert!(rules.contains("redirect to :4140") && rules.contains("redirect to :4143"), "{rules}");
    assert_eq!(added["cniVersion"], "1.0.0");
    assert_eq!(added["interfaces"].as_array().map(Vec::len), Some(3), "the bridge's result, passed on: {added}");
    assert!(validate(&captured).status.success(), "{}", String::from_utf8_lossy(&validate(&captured).stderr));

    // CHECK finds the rules, and says so when they are gone.
    let netns = Path::new("/run/netns").join(&captured.name);
    let check = |runtime: &Runtime| runtime.run(node.name(), "CHECK", &netns, "captured", Some(&added));
    check(&runtime).map(drop).unwrap_or_else(|f| panic!("{f:?}"));
    // `protomesh uninit` takes them out, and again finds nothing to do.
    for _ in 0..2 {
        let uninit = Command::new("ip")
            .args(["netns", "exec", &captured.name, env!("CARGO_BIN_EXE_protomesh"), "uninit"])
            .output()
            .unwrap();
        assert!(uninit.status.success(), "{}", String::from_utf8_lossy(&uninit.stderr));
        assert_eq!(table(&captured), "");
    }
    let missing = check(&runtime).unwrap_err();
    assert_eq!(
        (missing.plugin.as_str(), &missing.error["said"]["code"]),
        ("protomesh-cni", &json!(100)),
        "{missing:?}"
    );
    assert!(missing.error["said"]["msg"].as_str().unwrap().contains("capture rules are missing"), "{missing:?}");
    runtime.run(node.name(), "DEL", &netns, "captured", Some(&added)).map(drop).unwrap_or_else(|f| panic!("{f:?}"));

    let passed = ["by-init", "uncaptured"].map(|name| {
        let (pod, _) = runtime.pod(&node, name).unwrap();
        assert_eq!(table(&pod), "", "{name}: the plugin installed rules");
        pod
    });
    // Its init container has not run: a validation there finds no rules.
    let refused = validate(&passed[0]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a pod without rules passed the validation");
    assert!(
        said.contains("the pod's capture rules are not in place") && said.contains("protomesh-cni DaemonSet"),
        "{said}"
    );

    // A pod the API does not know yet: try again later, nothing installed.
    let unknown = runtime.pod(&node, "not-yet").map(drop).unwrap_err();
    assert_eq!(unknown.error["said"]["code"], 11, "{unknown:?}");
    assert!(unknown.error["said"]["msg"].as_str().unwrap().contains("pods \"not-yet\" not found"), "{unknown:?}");

    // Alone, with no previous result, it refuses: it is a chained plugin.
    let mut alone = Runtime::new(&node, files.path(), &api.kubeconfig(files.path()));
    alone.list["plugins"] = json!([alone.list["plugins"][1].clone()]);
    let unchained = alone.pod(&node, "captured").map(drop).unwrap_err();
    assert_eq!(unchained.error["said"]["code"], 7, "{unchained:?}");
}

#[test]
fn without_its_binding_the_plugin_says_which_cluster_role_it_lacks_and_the_pod_waits() {
    let Some(Setup { node, files: _files, api, runtime }) = Setup::start(false) else { return };
    injected_pod(&api, "captured", by_cni());
    let denied = runtime.pod(&node, "captured").map(drop).unwrap_err();
    assert_eq!(denied.error["said"]["code"], 11, "{denied:?}");
    let said = denied.error["said"]["msg"].as_str().unwrap();
    assert!(said.contains("forbidden") && said.contains("bind the ClusterRole protomesh-cni"), "{said}");
}

#[test]
fn a_pod_captured_by_the_plugin_calls_a_service_over_mtls_with_no_init_container() {
    let Some(Setup { node, files, api, runtime }) = Setup::start(true) else { return };
    let sidecar = sidecar_files(files.path(), &["client", "server"]);

    // The server: a pod as the other capture tests make them.
    let server = node.pod();
    let service = node.service(APP_PORT, &[&server]);
    server.run(|| async {
        let listener = TcpListener::bind(("0.0.0.0", APP_PORT)).await.unwrap();
        let router = Server::builder().add_service(protomesh_samples::echo::EchoService::default().into_server());
        protomesh_samples::serve(router, listener).await;
        std::future::pending::<()>().await
    });
    let server_config = config(files.path(), "server", "inbound: {listen: '0.0.0.0:4143'}\n");
    let (server_sidecar, server_log) = start_sidecar(&server, &sidecar, &server_config, &[], &[], files.path());
    let _server_sidecar = Stopped(server_sidecar);
    await_ready(&server, &server_log);

    // The client: its network and rules from the CNI chain, then its sidecar; no `protomesh init`.
    injected_pod(&api, "client", by_cni());
    let (client, _) = runtime.pod(&node, "client").unwrap();
    assert!(validate(&client).status.success(), "{}", String::from_utf8_lossy(&validate(&client).stderr));
    let outbound = format!(
        "outbound: {{listen: '127.0.0.1:4140', upstreams: [{{services: [echo.v1.Echo], endpoints: ['{service}'], \
         identity: 'spiffe://{TRUST_DOMAIN}/ns/test/sa/server'}}]}}\n"
    );
    let client_config = config(files.path(), "client", &outbound);
    let log = files.path().join("client.log");
    let _client_sidecar = Stopped(client.sidecar(&sidecar, &client_config, &[], &log));
    await_ready(&client, &log);

    let (stop, seen) = sniff(&node);
    let reply = client
        .run(move || async move {
            let mut echo = echo_client(service);
            within("unary", echo.unary(request("secret-cni-canary"))).await.unwrap().into_inner()
        })
        .join()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!((reply.message.as_str(), reply.caller.as_str()), ("secret-cni-canary", id("client").as_str()));
    assert!(!contains(&seen.join().unwrap(), b"secret-cni-canary"), "the call crossed the node in plaintext");
}

/// Waits up to 10 s for `done`.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_daemonsets_installer_chains_the_plugin_keeps_it_chained_and_takes_it_out_when_stopped() {
    let Some(Setup { node, files, api, .. }) = Setup::start(true) else { return };
    let [conf_dir, bin_dir, account] = ["net.d", "bin", "account"].map(|dir| files.path().join(dir));
    for dir in [&conf_dir, &bin_dir, &account] {
        std::fs::create_dir(dir).unwrap();
    }
    let list_file = conf_dir.join("10-bridge.conflist");
    let primary = bridge_list(&node, files.path());
    std::fs::write(&list_file, primary.to_string()).unwrap();
    std::fs::write(account.join("token"), crate::apiserver::TOKEN).unwrap();
    std::fs::write(account.join("ca.crt"), api.ca_pem()).unwrap();

    // As the DaemonSet runs it, with the node's directories where its hostPath volumes put them.
    let log = files.path().join("install.log");
    let mut installer = Stopped(
        // In the node's namespace, where the API server is, as the DaemonSet's pod runs.
        Command::new("ip")
            .args(["netns", "exec", node.name(), env!("CARGO_BIN_EXE_protomesh-cni"), "install"])
            .args(["--conf-dir".as_ref(), conf_dir.as_os_str(), "--node-conf-dir".as_ref(), conf_dir.as_os_str()])
            .args(["--bin-dir".as_ref(), bin_dir.as_os_str(), "--account-dir".as_ref(), account.as_os_str()])
            .args(["--api-server", &format!("https://{}", api.addr), "--node-name", node.name()])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let list = || serde_json::from_slice::<Value>(&std::fs::read(&list_file).unwrap()).unwrap_or(Value::Null);
    let chained = || list()["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["type"] == "protomesh-cni"));
    eventually("the plugin chained", chained);
    assert!(bin_dir.join("protomesh-cni").exists());
    assert_eq!(list()["plugins"][0], primary["plugins"][0], "the primary plugin's entry is as it was");

    // A pod the node sets up with the installed list and plugin gets its rules.
    injected_pod(&api, "captured", by_cni());
    let (pod, _) = Runtime::installed(&conf_dir, &bin_dir).pod(&node, "captured").unwrap_or_else(|f| panic!("{f:?}"));
    assert!(table(&pod).contains("redirect to :4140"), "{}", table(&pod));

    // Pods of this node that started without their rules (their check exited
    // 77) are deleted for their controllers to make again; no other is.
    let check_failed = |name: &str, node: &str, by: &str, code: i32, owned: bool| {
        let owners = if owned {
            json!([{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs", "controller": true }])
        } else {
            json!([])
        };
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                "annotations": { "protomesh.io/capture-by": by }, "ownerReferences": owners },
            "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "example/app:1" }] },
            "status": { "phase": "Pending", "initContainerStatuses": [{ "name": "protomesh-init", "ready": false,
                "restartCount": 2, "image": "i", "imageID": "", "state": { "waiting": { "reason": "CrashLoopBackOff" } },
                "lastState": { "terminated": { "exitCode": code } } }] },
        })
    };
    let kept = [
        check_failed("elsewhere", "another-node", "cni", 77, true),
        check_failed("other-failure", node.name(), "cni", 1, true),
        check_failed("by-init", node.name(), "init", 77, true),
        check_failed("bare", node.name(), "cni", 77, false),
    ];
    for pod in kept.iter().cloned() {
        api.put_pod_object(pod);
    }
    api.put_pod_object(check_failed("uncaptured", node.name(), "cni", 77, true));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while api.has_pod(NAMESPACE, "uncaptured") {
        let said = || std::fs::read_to_string(&log).unwrap();
        assert!(std::time::Instant::now() < deadline, "the pod without its rules is not deleted:\n{}", said());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for pod in &kept {
        let name = pod["metadata"]["name"].as_str().unwrap();
        assert!(api.has_pod(NAMESPACE, name), "{name} was deleted");
    }

    // The kubelet rotates the token: the plugin's kubeconfig follows.
    let kubeconfig = conf_dir.join("protomesh-cni.kubeconfig");
    assert!(std::fs::read_to_string(&kubeconfig).unwrap().contains(crate::apiserver::TOKEN));
    std::fs::write(account.join("token"), "rotated-token").unwrap();
    eventually("the kubeconfig holds the new token", || {
        std::fs::read_to_string(&kubeconfig).is_ok_and(|text| text.contains("rotated-token"))
    });

    // The primary plugin writes its list anew: chained again.
    std::fs::write(&list_file, primary.to_string()).unwrap();
    eventually("chained again after a rewrite", chained);

    // The DaemonSet's pod deleted: the plugin is taken out, the rest left.
    let pid = installer.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    eventually("the installer exits", || installer.0.try_wait().unwrap().is_some());
    assert!(installer.0.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(list()["plugins"], primary["plugins"]);
    assert!(!conf_dir.join("protomesh-cni.kubeconfig").exists());
}
