//! A kubelet of the test suite's own, for running manifests as a node runs
//! them, since no kubelet can run here. It does what injection depends on,
//! as the kubelet does it:
//!
//! - a pod is a network namespace on the node's bridge (`pods.rs`), its
//!   object in the suite's API server (`apiserver.rs`) with its address;
//! - volumes: ConfigMap and Secret (missing and required: the pod stays in
//!   ContainerCreating), emptyDir, projected (service account token, ConfigMap,
//!   downward API), csi-driver-spiffe's CSI volume (the pod's service account
//!   must be allowed to create CertificateRequests, checked by the API
//!   server's RBAC as csi-driver-spiffe's request is; then `tls.crt`,
//!   `tls.key` and `ca.crt` for `spiffe://<trust domain>/ns/<ns>/sa/<sa>`,
//!   readable by the volume's fs-group), and the service account's
//!   `kube-api-access` volume the API server's admission adds;
//! - containers of a protomesh image are processes of the binary, each in a
//!   root of its own (`chroot`) where its volumes are bind-mounted at their
//!   paths, as `runAsUser`/`runAsGroup`, with its `command`, `args` and `env`
//!   (downward API fields and resources, ConfigMap keys, `$(VAR)` expansion)
//!   and `KUBERNETES_SERVICE_HOST`/`_PORT`; other images are apps of the
//!   test, run on a thread in the pod's namespace with the same environment;
//! - init containers in order, each run to completion; native sidecars
//!   (`restartPolicy: Always`) started and their startup probe awaited before
//!   the next; then the app containers;
//! - probes (HTTP GET and TCP) sent from the node to the pod's address, as
//!   the kubelet sends them; a pod is ready when every readiness probe passes;
//! - Services: a cluster IP each (and an external address for a
//!   LoadBalancer), cluster DNS names, EndpointSlices of their ready pods, and
//!   kube-proxy's per-connection DNAT on the node (prerouting and the node's
//!   own output), target ports by number or by name;
//! - a Job's pod completes once its app containers have exited: its native
//!   sidecars are then stopped (SIGTERM) and must exit 0.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protomesh::identity::SpiffeId;
use protomesh::identity::certs::DevCa;
use serde_json::{Value, json};

use crate::apiserver::{ApiServer, account_token};
use crate::pods::{self, Node, Pod};

/// The cluster's trust domain, as csi-driver-spiffe is configured with it.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// How long a pod may take to become ready, or a Job to complete.
const START_WITHIN: Duration = Duration::from_secs(30);

/// What an app container gets: its resolved environment and the cluster's DNS.
pub struct Started {
    pub env: BTreeMap<String, String>,
    pub dns: Dns,
}

/// An app image's program, run in the pod's namespace until it returns.
pub type App = Arc<dyn Fn(Started) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// Cluster DNS: Service names to cluster IPs.
#[derive(Clone, Default)]
pub struct Dns(Arc<Mutex<BTreeMap<String, IpAddr>>>);

impl Dns {
    /// `host:port`, the host a Service's name as a pod of `namespace` would
    /// write it (`cart`, `cart.shop`, `cart.shop.svc.cluster.local`).
    pub fn resolve(&self, address: &str, namespace: &str) -> SocketAddr {
        let (host, port) = address.rsplit_once(':').expect("host:port");
        let names = self.0.lock().unwrap();
        let searched = [
            format!("{host}.{namespace}.svc.cluster.local"),
            format!("{host}.svc.cluster.local"),
            format!("{host}.cluster.local"),
            host.to_string(),
        ];
        let ip = searched.iter().find_map(|name| names.get(name)).unwrap_or_else(|| panic!("no DNS name {host}"));
        SocketAddr::new(*ip, port.parse().unwrap())
    }
}

/// A Service as the node serves it.
struct Service {
    namespace: String,
    name: String,
    object: Value,
    cluster_ip: Ipv4Addr,
    external_ip: Option<Ipv4Addr>,
}

/// A pod the kubelet runs.
pub struct Running {
    pub namespace: String,
    pub name: String,
    pub pod: Pod,
    object: Value,
    /// Processes of its containers, by container name.
    processes: Vec<(String, Child)>,
    /// Apps of the test still running, by container name.
    apps: Vec<(String, std::thread::JoinHandle<()>)>,
    pub ready: bool,
    logs: PathBuf,
}

impl Running {
    /// The log of container `name`, for a failure's message.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Why a pod did not start, as `kubectl get pods` and its events say.
#[derive(Debug)]
pub struct NotStarted {
    pub pod: String,
    pub status: &'static str,
    pub message: String,
}

pub struct Kubelet {
    pub node: Node,
    pub api: Arc<ApiServer>,
    pub dns: Dns,
    files: tempfile::TempDir,
    ca: DevCa,
    objects: Vec<Value>,
    apps: BTreeMap<String, App>,
    services: Vec<Service>,
    pub pods: Vec<Running>,
    /// The container runtime's CNI chain, `protomesh-cni` last; without
    /// it, pods get their network from the node directly.
    cni: Option<crate::cni::Runtime>,
}

impl Kubelet {
    /// A node, its API server (authorizing by `k8s/`'s ClusterRoles and the
    /// bindings of the manifests applied), and the apps of the test by image.
    pub fn start(apps: BTreeMap<String, App>) -> Kubelet {
        let node = Node::new();
        // In the node's namespace at the node's address, which pods reach.
        let api = node.api_server(node.address().into());
        let files = tempfile::tempdir().unwrap();
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let kube_proxy = "add table ip kube-proxy\n\
             add chain ip kube-proxy prerouting { type nat hook prerouting priority dstnat - 1; }\n\
             add chain ip kube-proxy output { type nat hook output priority -101; }\n";
        pods::nft(node.name(), kube_proxy);
        // Routes for the node's own connections to Services, which its output chain DNATs.
        let subnet = node.subnet().1.octets()[2];
        for range in [format!("10.96.{subnet}.0/24"), format!("10.97.{subnet}.0/24")] {
            let routed = Command::new("ip").args(["-n", node.name(), "route", "add", &range, "dev", "br0"]).status();
            assert!(routed.unwrap().success(), "ip route add {range}");
        }
        Kubelet {
            node,
            api,
            dns: Dns::default(),
            files,
            ca: DevCa::generate("cluster CA").unwrap(),
            objects: Vec::new(),
            apps,
            services: Vec::new(),
            pods: Vec::new(),
            cni: None,
        }
    }

    /// As [`Kubelet::start`], on a node whose container runtime sets pods'
    /// networks up with a CNI chain of Debian's `bridge` and `host-local`
    /// and `protomesh-cni` (its kubeconfig an administrator's); pods of `namespace`.
    pub fn with_cni(apps: BTreeMap<String, App>, namespace: &str) -> Kubelet {
        let mut kubelet = Kubelet::start(apps);
        let kubeconfig = kubelet.api.kubeconfig(kubelet.files.path());
        let runtime = crate::cni::Runtime::new(&kubelet.node, kubelet.files.path(), &kubeconfig);
        kubelet.cni = Some(runtime.in_namespace(namespace));
        kubelet
    }

    /// Applies `objects` as `kubectl apply -n <namespace>` and the controllers would: the
    /// Services get addresses, the RBAC is in force, and every workload's
    /// pod (one per workload) is started in order, Jobs last; the first that does not
    /// become ready, or Job that does not complete, is the error.
    pub fn apply(&mut self, namespace: &str, mut objects: Vec<Value>) -> Result<(), NotStarted> {
        for object in &mut objects {
            let cluster_scoped =
                matches!(object["kind"].as_str(), Some("Namespace" | "ClusterRole" | "ClusterRoleBinding"));
            if !cluster_scoped && object["metadata"]["namespace"].is_null() {
                object["metadata"]["namespace"] = json!(namespace);
            }
        }
        self.objects.extend(objects.iter().cloned());
        let mut rbac = crate::apiserver::k8s_rbac(&crate::apiserver::SIDECAR_ROLES);
        rbac.extend(self.objects.iter().filter(|o| o["kind"].as_str().unwrap_or("").ends_with("Binding")).cloned());
        self.api.authorize_accounts(&rbac);
        for service in objects.iter().filter(|o| o["kind"] == "Service") {
            self.add_service(service.clone());
        }
        // Jobs last, once what they call is up.
        let (jobs, others): (Vec<&Value>, Vec<&Value>) = objects.iter().partition(|o| o["kind"] == "Job");
        for object in others.into_iter().chain(jobs) {
            let (template, job) = match object["kind"].as_str() {
                Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => (&object["spec"]["template"], false),
                Some("Job") => (&object["spec"]["template"], true),
                Some("Pod") => (object, false),
                _ => continue,
            };
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
            let name = match object["kind"].as_str() {
                Some("Pod") => object["metadata"]["name"].as_str().unwrap().to_string(),
                _ => format!("{}-0", object["metadata"]["name"].as_str().unwrap()),
            };
            self.run_pod(&namespace, &name, template, job)?;
        }
        Ok(())
    }

    /// The Service `name`'s cluster IP, and its external address if it is a LoadBalancer.
    pub fn service(&self, namespace: &str, name: &str) -> (Ipv4Addr, Option<Ipv4Addr>) {
        let service = self.services.iter().find(|s| s.namespace == namespace && s.name == name).expect("the Service");
        (service.cluster_ip, service.external_ip)
    }

    pub fn pod(&self, name: &str) -> &Running {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn add_service(&mut self, mut object: Value) {
        let index = self.services.len() as u8 + 10;
        let (_, gateway) = self.node.subnet();
        let subnet = gateway.octets()[2];
        let cluster_ip = Ipv4Addr::new(10, 96, subnet, index);
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!("1");
        object["spec"]["clusterIP"] = json!(cluster_ip.to_string());
        object["spec"]["clusterIPs"] = json!([cluster_ip.to_string()]);
        let external_ip = (object["spec"]["type"] == "LoadBalancer").then(|| Ipv4Addr::new(10, 97, subnet, index));
        if let Some(ip) = external_ip {
            object["status"] = json!({ "loadBalancer": { "ingress": [{ "ip": ip.to_string() }] } });
        }
        self.api.put_service_object(object.clone());
        let mut names = self.dns.0.lock().unwrap();
        names.insert(format!("{name}.{namespace}.svc.cluster.local"), cluster_ip.into());
        drop(names);
        self.services.push(Service { namespace, name, object, cluster_ip, external_ip });
    }

    /// Runs a pod of `template` as the kubelet would, through to ready (or, for a Job, completed).
    fn run_pod(&mut self, namespace: &str, name: &str, template: &Value, job: bool) -> Result<(), NotStarted> {
        let failed = |status: &'static str, message: String| NotStarted { pod: name.to_string(), status, message };
        let enforced = self.objects.iter().find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == namespace);
        let level = enforced.and_then(|ns| ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str());
        if level == Some("restricted") {
            let violations = restricted_violations(&template["spec"]);
            if !violations.is_empty() {
                let message = format!(
                    "pods \"{name}\" is forbidden: violates PodSecurity \"restricted:latest\": {}",
                    violations.join(", ")
                );
                return Err(failed("Forbidden", message));
            }
        }
        let mut object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": template["metadata"].clone(),
            "spec": template["spec"].clone(),
        });
        object["metadata"]["name"] = json!(name);
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["uid"] = json!(format!("{namespace}-{name}"));
        object["spec"]["nodeName"] = json!(self.node.name());
        if object["spec"]["serviceAccountName"].is_null() {
            object["spec"]["serviceAccountName"] = json!("default");
        }
        if object["spec"]["automountServiceAccountToken"] != false {
            service_account_admission(&mut object["spec"]);
        }
        object["status"] = json!({ "phase": "Pending", "hostIP": self.node.address().to_string() });
        self.api.put_pod_object(object.clone());
        // The sandbox: its network namespace, set up as the runtime does.
        let pod = match &self.cni {
            None => self.node.pod(),
            Some(runtime) => runtime
                .pod(&self.node, name)
                .map(|(pod, _)| pod)
                .map_err(|failure| failed("ContainerCreating", format!("Failed to create pod sandbox: {failure:?}")))?,
        };
        let ip = pod.address.to_string();
        object["status"] = json!({ "phase": "Pending", "podIP": ip, "podIPs": [{ "ip": ip }], "hostIP": self.node.address().to_string() });
        self.api.running_at(namespace, name, pod.address.into());
        let logs = self.files.path().join(name);
        std::fs::create_dir_all(&logs).unwrap();
        let mut running = Running {
            namespace: namespace.into(),
            name: name.into(),
            pod,
            object,
            processes: Vec::new(),
            apps: Vec::new(),
            ready: false,
            logs,
        };
        let volumes = self.volumes(&running).map_err(|message| failed("ContainerCreating", message))?;

        let spec = running.object["spec"].clone();
        for init in spec["initContainers"].as_array().into_iter().flatten() {
            let container = init["name"].as_str().unwrap().to_string();
            if init["restartPolicy"] == "Always" {
                self.start_container(&mut running, init, &volumes);
                if let Some(probe) = init.get("startupProbe") {
                    self.await_probe(&mut running, init, probe)
                        .map_err(|why| failed("Init:0/1", format!("{container}: startup probe: {why}")))?;
                }
            } else {
                let mut child = self.start_process(&running, init, &volumes);
                let status = child.wait().unwrap();
                if !status.success() {
                    let log = running.logs.join(format!("{container}.log"));
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    return Err(failed("Init:Error", format!("{container} exited with {status}: {log}")));
                }
            }
        }
        for container in spec["containers"].as_array().into_iter().flatten() {
            self.start_container(&mut running, container, &volumes);
        }
        if job {
            self.complete(&mut running).map_err(|why| failed("Error", why))?;
        } else {
            let containers = spec["initContainers"].as_array().into_iter().flatten();
            let containers = containers
                .filter(|c| c["restartPolicy"] == "Always")
                .chain(spec["containers"].as_array().into_iter().flatten());
            for container in containers {
                if let Some(probe) = container.get("readinessProbe") {
                    let name = container["name"].as_str().unwrap();
                    self.await_probe(&mut running, container, probe)
                        .map_err(|why| failed("Running (not ready)", format!("{name}: readiness probe: {why}")))?;
                }
            }
            running.ready = true;
        }
        self.pods.push(running);
        self.sync_endpoints();
        Ok(())
    }

    /// Each volume of the pod made on the node: its directory, by name.
    fn volumes(&self, running: &Running) -> Result<BTreeMap<String, PathBuf>, String> {
        let spec = &running.object["spec"];
        let account = spec["serviceAccountName"].as_str().unwrap();
        let namespace = running.namespace.as_str();
        let mut made = BTreeMap::new();
        let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        for volume in &volumes {
            let name = volume["name"].as_str().unwrap();
            let dir = running.logs.join("volumes").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let fail = |why: String| format!("MountVolume.SetUp failed for volume \"{name}\": {why}");
            if let Some(config_map) = volume.get("configMap") {
                self.write_keys(&dir, "ConfigMap", config_map, namespace).map_err(fail)?;
            } else if let Some(secret) = volume.get("secret") {
                let source =
                    json!({ "name": secret["secretName"], "items": secret["items"], "optional": secret["optional"] });
                self.write_keys(&dir, "Secret", &source, namespace).map_err(fail)?;
            } else if volume.get("emptyDir").is_some() {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            } else if let Some(projected) = volume.get("projected") {
                for source in projected["sources"].as_array().into_iter().flatten() {
                    if let Some(token) = source.get("serviceAccountToken") {
                        write(&dir.join(token["path"].as_str().unwrap()), &account_token(namespace, account), 0o644);
                    } else if let Some(config_map) = source.get("configMap") {
                        self.write_keys(&dir, "ConfigMap", config_map, namespace).map_err(fail)?;
                    } else if let Some(downward) = source.get("downwardAPI") {
                        for item in downward["items"].as_array().into_iter().flatten() {
                            let value = field(&running.object, item["fieldRef"]["fieldPath"].as_str().unwrap());
                            write(&dir.join(item["path"].as_str().unwrap()), &value, 0o644);
                        }
                    }
                }
            } else if let Some(csi) = volume.get("csi") {
                assert_eq!(csi["driver"], "spiffe.csi.cert-manager.io", "the only CSI driver here");
                // csi-driver-spiffe creates the CertificateRequest as the pod's service account.
                self.api
                    .may((namespace, account), ("create", "cert-manager.io", "certificaterequests"), namespace)
                    .map_err(|denied| fail(format!("rpc error: code = Unknown desc = {denied}")))?;
                let id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}")).unwrap();
                let issued = self.ca.issue(&id).unwrap();
                let group: u32 = csi["volumeAttributes"]["spiffe.csi.cert-manager.io/fs-group"]
                    .as_str()
                    .map_or(0, |g| g.parse().unwrap());
                for (file, pem, mode) in [
                    ("tls.crt", issued.cert_pem.as_str(), 0o644),
                    ("tls.key", issued.key_pem.as_str(), 0o640),
                    ("ca.crt", self.ca.cert_pem(), 0o644),
                ] {
                    let path = dir.join(file);
                    write(&path, pem, mode);
                    std::os::unix::fs::chown(&path, Some(0), Some(group)).unwrap();
                }
            } else {
                panic!("volume {name}: a kind this kubelet does not make: {volume}");
            }
            make_traversable(&dir);
            made.insert(name.to_string(), dir);
        }
        Ok(made)
    }

    /// Writes the keys of the ConfigMap or Secret `source` names (its
    /// `items`, or all) into `dir`; an error when it is missing and not optional.
    fn write_keys(&self, dir: &Path, kind: &str, source: &Value, namespace: &str) -> Result<(), String> {
        let name = source["name"].as_str().unwrap();
        let found = self.objects.iter().find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"].as_str().unwrap_or("default") == namespace
        });
        let mut data: BTreeMap<String, String> = match (found, name) {
            (Some(object), _) => {
                let mut data: BTreeMap<String, String> =
                    serde_json::from_value(object["data"].clone()).unwrap_or_default();
                if kind == "Secret" {
                    use base64::Engine;
                    let decode = |v: String| {
                        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(v).unwrap()).unwrap()
                    };
                    data = data.into_iter().map(|(k, v)| (k, decode(v))).collect();
                    let strings: BTreeMap<String, String> =
                        serde_json::from_value(object["stringData"].clone()).unwrap_or_default();
                    data.extend(strings);
                }
                data
            }
            (None, "kube-root-ca.crt") => [("ca.crt".to_string(), self.api.ca_pem().to_string())].into(),
            (None, _) if source["optional"] == true => BTreeMap::new(),
            (None, _) => {
                let resource = kind.to_lowercase();
                return Err(format!("{resource} \"{name}\" not found"));
            }
        };
        if let Some(items) = source["items"].as_array() {
            let picked: BTreeMap<String, String> = items
                .iter()
                .filter_map(|item| {
                    let value = data.get(item["key"].as_str()?)?;
                    Some((item["path"].as_str()?.to_string(), value.clone()))
                })
                .collect();
            data = picked;
        }
        for (file, text) in data {
            write(&dir.join(file), &text, 0o644);
        }
        Ok(())
    }

    /// Starts `container`: a process for a protomesh image, else the test's app.
    fn start_container(&self, running: &mut Running, container: &Value, volumes: &BTreeMap<String, PathBuf>) {
        let name = container["name"].as_str().unwrap().to_string();
        let image = container["image"].as_str().unwrap();
        if entrypoint(image).is_some() {
            let child = self.start_process(running, container, volumes);
            running.processes.push((name, child));
            return;
        }
        let repository = image.split(':').next().unwrap();
        let app = self.apps.get(repository).unwrap_or_else(|| panic!("no app for image {image}")).clone();
        let env = environment(&running.object, container, &self.objects, &self.api);
        let started = Started { env: env.into_iter().collect(), dns: self.dns.clone() };
        let handle = running.pod.run(move || app(started));
        running.apps.push((name, handle));
    }

    /// A container of a protomesh image as a process: in a root of its own,
    /// its volumes bind-mounted, as its user, with its environment.
    fn start_process(&self, running: &Running, container: &Value, volumes: &BTreeMap<String, PathBuf>) -> Child {
        let name = container["name"].as_str().unwrap();
        let image = container["image"].as_str().unwrap();
        let (binary, mut argv) = entrypoint(image).expect("a protomesh image");
        let env = environment(&running.object, container, &self.objects, &self.api);
        let vars: BTreeMap<String, String> = env.iter().cloned().collect();
        if let Some(command) = container["command"].as_array() {
            argv = command.iter().map(|c| expand(c.as_str().unwrap(), &vars)).collect();
        }
        argv.extend(container["args"].as_array().into_iter().flatten().map(|a| expand(a.as_str().unwrap(), &vars)));

        let root = running.logs.join("roots").join(name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut script = String::from("set -e\n");
        for dir in ["usr", "etc", "dev", "proc", "sys", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for dir in ["usr", "dev", "proc"] {
            script += &format!("mount --rbind /{dir} {}\n", quote(&root.join(dir)));
        }
        // The image's own /etc: what a base image has, not the node's whole /etc.
        for file in ["passwd", "group", "nsswitch.conf", "hosts", "resolv.conf", "ld.so.cache", "ssl"] {
            let host = Path::new("/etc").join(file);
            let target = root.join("etc").join(file);
            match std::fs::metadata(&host) {
                Ok(meta) if meta.is_dir() => std::fs::create_dir_all(&target).unwrap(),
                Ok(_) => write(&target, "", 0o644),
                Err(_) => continue,
            }
            script += &format!("mount --rbind {} {}\n", quote(&host), quote(&target));
        }
        script += &format!("mount -t tmpfs -o mode=1777 tmpfs {}\n", quote(&root.join("tmp")));
        for link in ["bin", "sbin", "lib", "lib64"] {
            match std::fs::read_link(Path::new("/").join(link)) {
                Ok(target) => {
                    let _ = std::os::unix::fs::symlink(target, root.join(link));
                }
                Err(_) if Path::new("/").join(link).is_dir() => {
                    std::fs::create_dir_all(root.join(link)).unwrap();
                    script += &format!("mount --rbind /{link} {}\n", quote(&root.join(link)));
                }
                Err(_) => {}
            }
        }
        // The image's binary, at the path its entrypoint names.
        let at = root.join(binary.trim_start_matches('/'));
        write(&at, "", 0o755);
        script += &format!("mount --bind {} {}\n", quote(Path::new(env!("CARGO_BIN_EXE_protomesh"))), quote(&at));
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = &volumes[mount["name"].as_str().unwrap()];
            let target = root.join(mount["mountPath"].as_str().unwrap().trim_start_matches('/'));
            std::fs::create_dir_all(&target).unwrap();
            script += &format!("mount --bind {} {}\n", quote(volume), quote(&target));
            if mount["readOnly"] == true {
                script += &format!("mount -o remount,bind,ro {}\n", quote(&target));
            }
        }
        let context = |field: &str| {
            container["securityContext"][field].as_u64().or(running.object["spec"]["securityContext"][field].as_u64())
        };
        let user = context("runAsUser").unwrap_or(0);
        let group = context("runAsGroup").unwrap_or(user);
        let argv: Vec<String> = argv.iter().map(|a| quote(Path::new(a))).collect();
        script += &format!("exec chroot --userspec={user}:{group} {} {}\n", quote(&root), argv.join(" "));

        let log = std::fs::File::create(running.logs.join(format!("{name}.log"))).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &running.pod.name, "sh", "-c", &script])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Probes until `probe` passes, within [`START_WITHIN`], while the
    /// container runs; else what the last probe found, and its log.
    fn await_probe(&self, running: &mut Running, container: &Value, probe: &Value) -> Result<(), String> {
        let name = container["name"].as_str().unwrap();
        let deadline = Instant::now() + START_WITHIN;
        loop {
            let found = self.probe(running, container, probe);
            let process = running.processes.iter_mut().find(|(container, _)| container == name);
            let exited = process.and_then(|(_, child)| child.try_wait().unwrap());
            match found {
                Ok(()) => return Ok(()),
                Err(why) if exited.is_some() || Instant::now() > deadline => {
                    let exited = exited.map(|status| format!(" (exited: {status})")).unwrap_or_default();
                    return Err(format!("{why}{exited}; its log:\n{}", running.log(name)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// One probe, from the node to the pod's address, as the kubelet sends it.
    fn probe(&self, running: &Running, container: &Value, probe: &Value) -> Result<(), String> {
        let port = |port: &Value| -> u16 {
            match port {
                Value::String(name) => {
                    let ports = container["ports"].as_array().into_iter().flatten();
                    ports.clone().find(|p| p["name"] == name.as_str()).expect("a named port")["containerPort"]
                        .as_u64()
                        .unwrap() as u16
                }
                number => number.as_u64().unwrap() as u16,
            }
        };
        let address = running.pod.address;
        if let Some(get) = probe.get("httpGet") {
            let target = SocketAddr::new(address.into(), port(&get["port"]));
            let path = get["path"].as_str().unwrap_or("/").to_string();
            let answer = self.node.run(move || http_get(target, &path)).join().unwrap()?;
            return match answer.0 {
                200..=399 => Ok(()),
                status => Err(format!("HTTP probe failed with statuscode: {status} ({})", answer.1.trim())),
            };
        }
        if let Some(tcp) = probe.get("tcpSocket") {
            let target = SocketAddr::new(address.into(), port(&tcp["port"]));
            let connected =
                self.node.run(move || TcpStream::connect_timeout(&target, Duration::from_secs(1))).join().unwrap();
            return connected.map(drop).map_err(|e| format!("dial tcp {target}: {e}"));
        }
        panic!("a probe this kubelet does not send: {probe}")
    }

    /// A Job's pod: waits for its app containers to exit 0, then stops its
    /// native sidecars, which must exit 0 too.
    fn complete(&self, running: &mut Running) -> Result<(), String> {
        for (name, app) in running.apps.drain(..) {
            app.join().map_err(|_| format!("{name} failed"))?;
        }
        let deadline = Instant::now() + START_WITHIN;
        for (name, child) in running.processes.iter_mut().rev() {
            // `ip netns exec`, `sh` and `chroot` each exec the next: the pid is the container's.
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if Instant::now() > deadline {
                    return Err(format!("{name} did not exit after SIGTERM"));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !status.success() {
                let log = std::fs::read_to_string(running.logs.join(format!("{name}.log"))).unwrap_or_default();
                return Err(format!("{name} exited with {status}: {log}"));
            }
        }
        Ok(())
    }

    /// The EndpointSlice controller's and kube-proxy's part: each Service's
    /// slice of its ready pods, and the node's DNAT to them.
    fn sync_endpoints(&self) {
        let mut script = String::from("flush chain ip kube-proxy prerouting\nflush chain ip kube-proxy output\n");
        for service in &self.services {
            let selector = service.object["spec"]["selector"].as_object();
            let Some(selector) = selector.filter(|s| !s.is_empty()) else { continue };
            let pods: Vec<&Running> = self
                .pods
                .iter()
                .filter(|p| p.ready && p.namespace == service.namespace)
                .filter(|p| selector.iter().all(|(k, v)| &p.object["metadata"]["labels"][k] == v))
                .collect();
            for port in service.object["spec"]["ports"].as_array().into_iter().flatten() {
                let target = |pod: &Running| target_port(&pod.object, port);
                let port_name = port["name"].as_str().unwrap_or("");
                let endpoints: Vec<(String, bool, String)> =
                    pods.iter().map(|p| (p.pod.address.to_string(), true, p.name.clone())).collect();
                let endpoints: Vec<(&str, bool, &str)> =
                    endpoints.iter().map(|(a, r, n)| (a.as_str(), *r, n.as_str())).collect();
                if let Some(first) = pods.first() {
                    let slice = format!("{}-{}", service.name, port_name);
                    let (namespace, name) = (&service.namespace, &service.name);
                    self.api.slice(namespace, &slice, name, (port_name, target(first)), &endpoints);
                }
                if pods.is_empty() {
                    continue;
                }
                let targets: Vec<String> = pods
                    .iter()
                    .enumerate()
                    .map(|(i, pod)| format!("{i} : {} . {}", pod.pod.address, target(pod)))
                    .collect();
                let map = format!("numgen inc mod {} map {{ {} }}", targets.len(), targets.join(", "));
                let number = port["port"].as_u64().unwrap();
                let addresses = [Some(service.cluster_ip), service.external_ip];
                for ip in addresses.into_iter().flatten() {
                    for chain in ["prerouting", "output"] {
                        script += &format!(
                            "add rule ip kube-proxy {chain} ip daddr {ip} tcp dport {number} dnat ip to {map}\n"
                        );
                    }
                }
            }
        }
        pods::nft(self.node.name(), &script);
    }
}

/// What Pod Security admission's `restricted` level finds wrong with a pod,
/// in its words: privilege, escalation, capabilities, root, seccomp, volumes.
fn restricted_violations(spec: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let pod = &spec["securityContext"];
    let containers =
        ["initContainers", "containers"].iter().flat_map(|list| spec[*list].as_array().into_iter().flatten());
    for container in containers {
        let name = container["name"].as_str().unwrap_or_default();
        let context = &container["securityContext"];
        if context["privileged"] == true {
            found.push(format!("privileged (container \"{name}\" must not set securityContext.privileged=true)"));
        }
        if context["allowPrivilegeEscalation"] != false {
            found.push(format!(
                "allowPrivilegeEscalation != false (container \"{name}\" must set securityContext.allowPrivilegeEscalation=false)"
            ));
        }
        let drops = context["capabilities"]["drop"].as_array().is_some_and(|d| d.iter().any(|c| c == "ALL"));
        if !drops {
            found.push(format!(
                "unrestricted capabilities (container \"{name}\" must set securityContext.capabilities.drop=[\"ALL\"])"
            ));
        }
        let added = context["capabilities"]["add"].as_array().into_iter().flatten();
        let added: Vec<&str> = added.filter_map(Value::as_str).filter(|c| *c != "NET_BIND_SERVICE").collect();
        if !added.is_empty() {
            found.push(format!(
                "unrestricted capabilities (container \"{name}\" must not include {:?} in securityContext.capabilities.add)",
                added
            ));
        }
        let non_root = context["runAsNonRoot"].as_bool().or(pod["runAsNonRoot"].as_bool()) == Some(true);
        if !non_root {
            found.push(format!(
                "runAsNonRoot != true (container \"{name}\" must not set securityContext.runAsNonRoot=false)"
            ));
        }
        if context["runAsUser"] == 0 {
            found.push(format!("runAsUser=0 (container \"{name}\" must not set runAsUser=0)"));
        }
        let seccomp = context["seccompProfile"]["type"].as_str().or(pod["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            found.push(format!(
                "seccompProfile (container \"{name}\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")"
            ));
        }
    }
    let allowed =
        ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let kinds = volume.as_object().into_iter().flat_map(|v| v.keys()).filter(|k| *k != "name");
        for kind in kinds.filter(|k| !allowed.contains(&k.as_str())) {
            found.push(format!(
                "restricted volume types (volume \"{}\" uses restricted volume type \"{kind}\")",
                volume["name"]
            ));
        }
    }
    found
}

/// What the API server's ServiceAccount admission adds to a pod: the
/// account's token, the cluster's CA and the namespace, in a projected
/// volume mounted into every container.
fn service_account_admission(spec: &mut Value) {
    const VOLUME: &str = "kube-api-access";
    let volume = json!({ "name": VOLUME, "projected": { "sources": [
        { "serviceAccountToken": { "path": "token" } },
        { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } },
        { "downwardAPI": { "items": [{ "path": "namespace", "fieldRef": { "fieldPath": "metadata.namespace" } }] } },
    ] } });
    match spec["volumes"].as_array_mut() {
        Some(volumes) => volumes.push(volume),
        None => spec["volumes"] = json!([volume]),
    }
    let mount =
        json!({ "name": VOLUME, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true });
    for list in ["initContainers", "containers"] {
        for container in spec[list].as_array_mut().into_iter().flatten() {
            match container["volumeMounts"].as_array_mut() {
                Some(mounts) => mounts.push(mount.clone()),
                None => container["volumeMounts"] = json!([mount]),
            }
        }
    }
}

/// The image's binary and entrypoint, for the protomesh images.
fn entrypoint(image: &str) -> Option<(&'static str, Vec<String>)> {
    let repository = image.rsplit_once(':').map_or(image, |(repository, _)| repository);
    match repository.rsplit('/').next()? {
        "protomesh" => Some(("/protomesh", vec!["/protomesh".into()])),
        "protomesh-init" => Some(("/protomesh", vec!["/protomesh".into(), "init".into()])),
        _ => None,
    }
}

/// The pod port a Service port sends to: its `targetPort` by number or by
/// the name of a container port, else its `port`.
fn target_port(pod: &Value, port: &Value) -> u16 {
    let target = port.get("targetPort").unwrap_or(&port["port"]);
    match target {
        Value::String(name) => {
            let containers = pod["spec"]["containers"].as_array().into_iter().flatten();
            let mut ports = containers.filter_map(|c| c["ports"].as_array()).flatten();
            ports.find(|p| p["name"] == name.as_str()).expect("the named port")["containerPort"].as_u64().unwrap()
                as u16
        }
        number => number.as_u64().unwrap() as u16,
    }
}

/// A container's environment as the kubelet gives it: its `env` in order,
/// each value's `$(VAR)` expanded over those before it, values from the
/// downward API, resources and ConfigMaps; and the API server's address.
fn environment(pod: &Value, container: &Value, objects: &[Value], api: &ApiServer) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = vec![
        ("HOSTNAME".into(), pod["metadata"]["name"].as_str().unwrap().into()),
        ("KUBERNETES_SERVICE_HOST".into(), api.addr.ip().to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), api.addr.port().to_string()),
    ];
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let known: BTreeMap<String, String> = vars.iter().cloned().collect();
        let value = if let Some(value) = var["value"].as_str() {
            expand(value, &known)
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(pod, path)
        } else if let Some(resource) = var["valueFrom"]["resourceFieldRef"].as_object() {
            let limit = container["resources"]["limits"]["cpu"].as_str().unwrap_or("2");
            assert_eq!(resource["resource"], "limits.cpu", "the resource this kubelet knows");
            let millis: f64 = match limit.strip_suffix('m') {
                Some(m) => m.parse::<f64>().unwrap(),
                None => limit.parse::<f64>().unwrap() * 1000.0,
            };
            ((millis / 1000.0).ceil() as u64).to_string()
        } else if let Some(key) = var["valueFrom"]["configMapKeyRef"].as_object() {
            let namespace = pod["metadata"]["namespace"].as_str().unwrap();
            let map = objects.iter().find(|o| {
                o["kind"] == "ConfigMap"
                    && o["metadata"]["name"] == key["name"]
                    && o["metadata"]["namespace"] == namespace
            });
            map.and_then(|m| m["data"][key["key"].as_str().unwrap()].as_str()).unwrap_or_default().to_string()
        } else {
            panic!("an env source this kubelet does not know: {var}");
        };
        vars.retain(|(known, _)| *known != name);
        vars.push((name, value));
    }
    vars
}

/// `$(VAR)` replaced by the value of `VAR` where it is known; `$$` is a `$`.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out += &rest[..at];
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
            && let Some(value) = vars.get(name)
        {
            out += value;
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out + rest
}

/// A downward API field of the pod.
fn field(pod: &Value, path: &str) -> String {
    let value = match path {
        "metadata.name" => &pod["metadata"]["name"],
        "metadata.namespace" => &pod["metadata"]["namespace"],
        "metadata.uid" => &pod["metadata"]["uid"],
        "spec.nodeName" => &pod["spec"]["nodeName"],
        "spec.serviceAccountName" => &pod["spec"]["serviceAccountName"],
        "status.podIP" => &pod["status"]["podIP"],
        "status.hostIP" => &pod["status"]["hostIP"],
        other => panic!("a downward API field this kubelet does not know: {other}"),
    };
    value.as_str().unwrap_or_default().to_string()
}

/// A plain HTTP/1.1 GET, as a probe or a simple client sends it: the status and the body.
pub fn http_get(target: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(1)).map_err(|e| format!("{target}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).map_err(|e| format!("{target}: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).map_err(|e| format!("{target}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(format!("{target}: no HTTP answer"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    Ok((status, body))
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Lets every user reach `dir` and the directories under it (the files keep their modes).
fn make_traversable(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            make_traversable(&path);
        }
    }
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}
