//! Kubernetes injection as users run it: `protomesh inject` and `uninject` on
//! realistic manifests against golden files; the injected manifests and the
//! `k8s/` bases validated against the Kubernetes schemas; and a sidecar
//! started exactly as an injected pod starts it, ready and carrying a call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use protomesh::identity::SpiffeId;
use protomesh::identity::certs::DevCa;
use protomesh::kube::inject::{self, Context, Verdict};
use protomesh::kube::manifest::{self, Format};
use protomesh_samples::echo::EchoService;
use protomesh_samples::pb::echo::v1::EchoRequest;
use protomesh_samples::pb::echo::v1::echo_client::EchoClient;
use serde_json::{Value, json};
use tonic::transport::{Channel, Server};

use crate::harness::within;

const BIN: &str = env!("CARGO_BIN_EXE_protomesh");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn golden() -> PathBuf {
    Path::new(REPO).join("tests/golden/inject")
}

fn protomesh(args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(REPO).output().expect("protomesh runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The manifests the golden files were made from.
fn inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(golden())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.contains(".injected.") && !name.ends_with(".report")
        })
        .collect();
    inputs.sort();
    inputs
}

fn expected(input: &Path, suffix: &str) -> PathBuf {
    let name = input.file_name().unwrap().to_string_lossy();
    let (stem, extension) = name.rsplit_once('.').unwrap();
    golden().join(match suffix {
        "report" => format!("{stem}.report"),
        _ => format!("{stem}.injected.{extension}"),
    })
}

/// Compares with a golden file, or writes it when UPDATE_GOLDEN is set.
fn assert_golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|_| panic!("{} is missing; run the tests with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(actual, expected, "{} differs (UPDATE_GOLDEN=1 rewrites it)", path.display());
}

#[test]
fn inject_matches_the_golden_files_and_is_idempotent_and_undone_by_uninject() {
    let inputs = inputs();
    assert!(inputs.len() >= 5, "{inputs:?}");
    for input in inputs {
        let path = input.to_str().unwrap();
        let output = protomesh(&["inject", path]);
        assert!(output.status.success(), "{path}: {}", text(&output.stderr));
        let injected = text(&output.stdout);
        assert_golden(&expected(&input, "injected"), &injected);
        assert_golden(&expected(&input, "report"), &text(&output.stderr));

        let again = Command::new(BIN)
            .args(["inject", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut again.stdin.as_ref().unwrap(), injected.as_bytes()).unwrap();
        let again = again.wait_with_output().unwrap();
        assert_eq!(text(&again.stdout), injected, "{path}: injecting again changes nothing");
        let report = text(&again.stderr);
        assert!(!report.contains(": injected"), "{path}: {report}");

        let injected_file = expected(&input, "injected");
        let undone = protomesh(&["uninject", injected_file.to_str().unwrap()]);
        assert!(undone.status.success(), "{}", text(&undone.stderr));
        // Uninject of a manifest without sidecars writes it back as read: the original, re-rendered.
        let original = protomesh(&["uninject", path]);
        assert_eq!(text(&undone.stdout), text(&original.stdout), "{path}: uninject gives back the input");
    }
}

#[test]
fn the_namespace_flags_and_all_decide_for_pods_that_say_nothing() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: quiet}\nspec: {containers: [{name: app, image: x}]}\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, pod).unwrap();
    let file = file.to_str().unwrap();
    let skipped = protomesh(&["inject", file]);
    assert!(text(&skipped.stderr).starts_with("pod/quiet: skipped: not opted in"), "{}", text(&skipped.stderr));
    let by_flag = protomesh(&["inject", file, "--namespace", "team", "--enabled-namespace", "team"]);
    let report = text(&by_flag.stderr);
    assert!(
        report.starts_with(
            "pod/quiet: injected; plaintext: none (every captured port takes mTLS only)\nrolebinding/protomesh-identity:default (team): added"
        ),
        "{report}"
    );
    assert!(report.contains("\nclusterrolebinding/protomesh-service-lookup:team:default: added"), "{report}");
    let no_rbac = protomesh(&["inject", file, "--namespace", "team", "--enabled-namespace", "team", "--no-rbac"]);
    assert_eq!(text(&no_rbac.stderr), "pod/quiet: injected; plaintext: none (every captured port takes mTLS only)\n");
    assert!(!text(&no_rbac.stdout).contains("RoleBinding"));
    let all = protomesh(&["inject", file, "--all"]);
    assert_eq!(
        text(&all.stderr),
        "pod/quiet: injected; plaintext: none (every captured port takes mTLS only)\npod/quiet: no bindings added for its service account: its namespace is not known \
         (give --namespace)\n"
    );
    assert!(text(&all.stdout).contains("name: protomesh-proxy"));
    let system = protomesh(&["inject", file, "--all", "--namespace", "kube-system"]);
    assert_eq!(text(&system.stderr), "pod/quiet: skipped: in namespace kube-system\n");
}

#[test]
fn bad_manifests_are_named_by_document_and_field_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "kind: Service\nmetadata: {name: s}\n---\nkind: Deployment\nmetadata: {name: web}\nspec: {template: {spec: {containers: {}}}}\n",
            "document 2 (deployment/web): spec.template.spec.containers: expected a list of containers, found a map",
        ),
        (
            "kind: Pod\nmetadata: {name: p, labels: {protomesh.io/inject: enabled}, annotations: {protomesh.io/app-port: http}}\nspec: {containers: [{name: a}]}\n",
            "document 1 (pod/p): annotation protomesh.io/app-port: `http` is not valid",
        ),
        ("metadata: {name: x}\n", "document 1: kind: missing; every object needs apiVersion and kind"),
        ("kind: [unclosed\n", "invalid YAML"),
    ];
    for (i, (manifest, error)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, manifest).unwrap();
        let output = protomesh(&["inject", file.to_str().unwrap()]);
        assert!(!output.status.success(), "{manifest}");
        let stderr = text(&output.stderr);
        assert!(stderr.starts_with("error: ") && stderr.contains(error), "{stderr}");
        assert!(output.stdout.is_empty(), "nothing is written when the input is bad");
    }
}

/// The objects a kustomization renders: its resources (files and other
/// kustomizations) and the ConfigMaps of its configMapGenerator, which is
/// all `k8s/` uses. Anything else is refused, so that this stays true.
fn kustomize(dir: &Path) -> Vec<Value> {
    let file = dir.join("kustomization.yaml");
    let kustomization = &manifest::parse(&std::fs::read_to_string(&file).unwrap(), "k").unwrap().documents[0];
    for key in kustomization.as_object().unwrap().keys() {
        let known = ["apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions"];
        assert!(known.contains(&key.as_str()), "{}: `{key}` is not rendered by this test", file.display());
    }
    if !kustomization["configMapGenerator"].is_null() {
        let stable = &kustomization["generatorOptions"]["disableNameSuffixHash"];
        assert_eq!(*stable, true, "{}: pods name the generated ConfigMaps, so their names stay", file.display());
    }
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_array().into_iter().flatten() {
        let path = dir.join(resource.as_str().unwrap());
        if path.is_dir() {
            objects.extend(kustomize(&path));
        } else {
            objects.extend(manifest::read(&path).unwrap().documents);
        }
    }
    for generator in kustomization["configMapGenerator"].as_array().into_iter().flatten() {
        let data: serde_json::Map<String, Value> = generator["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let name = f.as_str().unwrap();
                (name.to_string(), json!(std::fs::read_to_string(dir.join(name)).unwrap()))
            })
            .collect();
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": generator["name"], "namespace": generator["namespace"] },
            "data": data,
        }));
    }
    objects
}

/// Checks what kubernetes-validate cannot, having no schema for them: the
/// fields cert-manager requires of its resources.
fn check_cert_manager(object: &Value) {
    let name = format!("{}/{}", object["kind"].as_str().unwrap(), object["metadata"]["name"]);
    let spec = &object["spec"];
    match object["kind"].as_str().unwrap() {
        "Certificate" => {
            assert!(spec["secretName"].is_string(), "{name}: spec.secretName");
            assert!(spec["issuerRef"]["name"].is_string(), "{name}: spec.issuerRef.name");
            let subject = ["commonName", "dnsNames", "uris", "ipAddresses"].iter().any(|f| !spec[f].is_null());
            assert!(subject, "{name}: a certificate names its subject");
            assert!(object["metadata"]["namespace"].is_string(), "{name}: a Certificate is namespaced");
        }
        "Issuer" | "ClusterIssuer" => {
            let kinds = ["selfSigned", "ca", "acme", "vault", "venafi"];
            assert_eq!(kinds.iter().filter(|k| !spec[**k].is_null()).count(), 1, "{name}: one issuer type");
            if !spec["ca"].is_null() {
                assert!(spec["ca"]["secretName"].is_string(), "{name}: spec.ca.secretName");
            }
            assert_eq!(object["metadata"]["namespace"].is_string(), object["kind"] == "Issuer", "{name}: scope");
        }
        other => panic!("{name}: no check for cert-manager kind {other}"),
    }
}

/// Validates against one version's schemas; `--strict` rejects unknown fields.
fn kubernetes_validate(version: &str, strict: bool, files: &[PathBuf]) {
    let probe = Command::new("kubernetes-validate").arg("--version").output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "validating manifests needs kubernetes-validate: pip install -r tests/python/requirements.txt"
    );
    let strict = if strict { &["--strict"][..] } else { &[] };
    let output =
        Command::new("kubernetes-validate").args(strict).args(["--quiet", "-k", version]).args(files).output().unwrap();
    assert!(output.status.success(), "Kubernetes {version}:\n{}{}", text(&output.stdout), text(&output.stderr));
}

#[test]
fn injected_manifests_and_the_kubernetes_bases_validate_against_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let (mut files, mut lenient, mut classic) = (Vec::new(), Vec::new(), Vec::new());
    // Written as a plain stream: the validator has no schema for `kind: List`, so its items go apart.
    let write = |name: String, objects: &[Value]| {
        let file = dir.path().join(name);
        let objects = objects.iter().flat_map(|o| match o["items"].as_array() {
            Some(items) if o["kind"] == "List" => items.clone(),
            _ => vec![o.clone()],
        });
        let rendered = manifest::render(&manifest::Manifests { format: Format::Yaml, documents: objects.collect() });
        std::fs::write(&file, rendered).unwrap();
        file
    };
    for base in ["injector", "identity", "identity/every-service-account", "discovery", "cni", "sample", "jaeger"] {
        let objects = kustomize(&Path::new(REPO).join("k8s").join(base));
        let (crds, core): (Vec<Value>, Vec<Value>) =
            objects.into_iter().partition(|o| o["apiVersion"].as_str().unwrap().starts_with("cert-manager.io/"));
        crds.iter().for_each(check_cert_manager);
        files.push(write(format!("{}.yaml", base.replace('/', "-")), &core));
        // The sample as the webhook will run it: every pod injected.
        if base == "sample" {
            let mut manifests = manifest::Manifests { format: Format::Yaml, documents: core };
            let report = manifest::inject(&mut manifests, &manifest::Options::default()).unwrap();
            assert_eq!(report.iter().filter(|l| l.outcome.starts_with("injected;")).count(), 4, "{report:?}");
            files.push(write("sample-injected.yaml".into(), &manifests.documents));
        }
    }
    assert_eq!(
        std::fs::read_to_string(Path::new(REPO).join("k8s/sample/shop.proto")).unwrap(),
        std::fs::read_to_string(Path::new(REPO).join("proto/examples/shop.proto"))
            .unwrap()
            .replace("spiffe://demo.protomesh.local/", "spiffe://cluster.local/")
            .replace(
                "// The demo mesh: checkout calls inventory and pricing.",
                "// The sample mesh: checkout calls inventory and pricing (the demo's contract, in trust domain cluster.local)."
            ),
        "k8s/sample/shop.proto is the demo's contract, in the sample's trust domain"
    );
    for input in inputs() {
        let injected = expected(&input, "injected");
        let name = injected.file_name().unwrap().to_string_lossy().replace(".json", ".yaml");
        let file = write(name, &manifest::read(&injected).unwrap().documents);
        let text = std::fs::read_to_string(&file).unwrap();
        if text.contains("protomesh.io/sidecar-mode: classic") {
            classic.push(file.clone());
        }
        // Fields no schema knows stay there on purpose, and only the strict check minds them.
        if text.contains("future") { lenient.push(file) } else { files.push(file) }
    }
    // The oldest and newest Kubernetes with native sidecars, and a classic sidecar before them.
    for version in ["1.29.0", "1.37.0"] {
        kubernetes_validate(version, true, &files);
        kubernetes_validate(version, false, &lenient);
    }
    assert!(!classic.is_empty());
    kubernetes_validate("1.27.0", false, &classic);
}

/// The environment the kubelet gives a container: downward API fields
/// filled in and `$(VAR)` references expanded, in order.
fn container_env(container: &Value, pod: &BTreeMap<&str, &str>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(value), _) => {
                let mut value = value.clone();
                for (known, resolved) in &env {
                    value = value.replace(&format!("$({known})"), resolved);
                }
                value
            }
            (_, Value::String(path)) => pod[path.as_str()].to_string(),
            other => panic!("{name}: unexpected {other:?}"),
        };
        env.push((name, value));
    }
    env
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn a_sidecar_started_as_the_injected_container_becomes_ready_and_carries_a_call() {
    injected_sidecar_carries_a_call(true).await;
}

#[tokio::test]
async fn without_its_contracts_and_config_maps_an_injected_sidecar_still_starts_and_forwards_by_service_name() {
    injected_sidecar_carries_a_call(false).await;
}

/// Starts a sidecar as the injected container (its volumes, with or without
/// the contracts' and config's ConfigMaps, as the kubelet mounts them) and
/// calls the app through it and back in over mTLS.
async fn injected_sidecar_carries_a_call(config_maps: bool) {
    let echo = EchoService::default();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    protomesh_samples::serve(Server::builder().add_service(echo.into_server()), app).await;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "echo-0", "namespace": "shop", "labels": { "protomesh.io/inject": "enabled" } },
        "spec": {
            "serviceAccountName": "echo",
            "containers": [{ "name": "echo", "image": "echo", "ports": [{ "containerPort": app_port }] }],
        },
    });
    let context = Context { namespace: Some("shop"), workload: "echo", ..Default::default() };
    let Verdict::Injected(injected, _) = inject::inject(&pod, &context).unwrap() else { panic!("injected") };
    let init_containers = injected["spec"]["initContainers"].as_array().unwrap();
    let sidecar = init_containers.iter().find(|c| c["name"] == "protomesh-proxy").unwrap();

    // The volumes as the kubelet mounts them, under a scratch root.
    let root = tempfile::tempdir().unwrap();
    let mount = |name: &str| -> PathBuf {
        let mounted = sidecar["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap();
        let dir = root.path().join(mounted["mountPath"].as_str().unwrap().trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/echo").unwrap();
    let ca = DevCa::generate("cluster CA").unwrap();
    let issued = ca.issue(&id).unwrap();
    let identity = mount("protomesh-identity");
    for (file, pem) in
        [("tls.crt", &issued.cert_pem), ("tls.key", &issued.key_pem), ("ca.crt", &ca.cert_pem().to_string())]
    {
        std::fs::write(identity.join(file), pem).unwrap();
    }
    // An optional ConfigMap that does not exist is mounted as an empty directory.
    let contracts = mount("protomesh-contracts");
    if config_maps {
        std::fs::create_dir(contracts.join("..2026_11_30")).unwrap();
        std::fs::copy(Path::new(REPO).join("proto/examples/echo.proto"), contracts.join("..2026_11_30/echo.proto"))
            .unwrap();
        std::os::unix::fs::symlink("..2026_11_30", contracts.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/echo.proto", contracts.join("echo.proto")).unwrap();
    }
    // The sidecar's own ports, free on this machine; everything else is as
    // injected. Another test may take a port between its pick and the
    // sidecar's bind: then the sidecar says so, and new ports are picked.
    let config = mount("protomesh-config");
    let downward =
        BTreeMap::from([("metadata.name", "echo-0"), ("metadata.namespace", "shop"), ("spec.nodeName", "node-1")]);
    let mut attempts = 0;
    let (ports, _process) = loop {
        attempts += 1;
        let ports: BTreeMap<u16, u16> = [4140, 4143, 4191].into_iter().map(|p| (p, free_port())).collect();
        let upstreams =
            format!("[{{services: [echo.v1.Echo], endpoints: ['127.0.0.1:{}'], identity: '{id}'}}]", ports[&4143]);
        let mut env = container_env(sidecar, &downward);
        match config_maps {
            true => std::fs::write(config.join("protomesh.yaml"), format!("outbound: {{upstreams: {upstreams}}}\n"))
                .unwrap(),
            // With no config file, the route is the environment's.
            false => env.push(("PROTOMESH_OUTBOUND__UPSTREAMS".into(), upstreams)),
        }
        for (_, value) in &mut env {
            if value.starts_with('/') || value.starts_with("[/") {
                *value = value.replace("/var/run/", &format!("{}/var/run/", root.path().display()));
                *value = value.replace("/etc/", &format!("{}/etc/", root.path().display()));
            }
            for (injected, free) in &ports {
                *value = value.replace(&format!(":{injected}"), &format!(":{free}"));
            }
        }
        let args: Vec<&str> = sidecar["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let mut process = tokio::process::Command::new(BIN)
            .args(&args)
            .env_clear()
            .envs(env)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        let probe = &sidecar["startupProbe"]["httpGet"];
        let admin = format!("127.0.0.1:{}", ports[&(probe["port"].as_u64().unwrap() as u16)]).parse().unwrap();
        let path = probe["path"].as_str().unwrap();
        let ready = within("the startup probe passes", async {
            loop {
                if crate::telemetry::status_of(admin, path).await == Some(200) {
                    return true;
                }
                if process.try_wait().unwrap().is_some() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if ready {
            break (ports, process);
        }
        let output = process.wait_with_output().await.unwrap();
        let said = text(&output.stderr);
        assert!(said.contains("cannot listen on") && attempts < 3, "the sidecar exited: {said}");
    };
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", ports[&4140])).unwrap().connect_lazy();
    let request = EchoRequest { message: "through the injected sidecar".into(), ..Default::default() };
    let reply = within("a call", EchoClient::new(channel).unary(request)).await.unwrap().into_inner();
    assert_eq!(reply.message, "through the injected sidecar");
    assert_eq!(reply.caller, id.as_str(), "over mTLS, as the workload's own identity");
    let admin = format!("127.0.0.1:{}", ports[&4191]).parse().unwrap();
    let config: Value = serde_json::from_str(&crate::telemetry::admin(admin, "GET", "/config", "").await.1).unwrap();
    assert_eq!(config["contracts"]["mode"], "permissive");
    assert_eq!(config["config"]["file_present"], config_maps, "{:#}", config["config"]);
    if !config_maps {
        let metrics = crate::telemetry::admin(admin, "GET", "/metrics", "").await.1;
        let outside = metrics.lines().find(|l| l.starts_with("protomesh_requests_total") && l.contains("method=\"*\""));
        assert!(
            outside.is_some_and(|l| l.ends_with(" 1")),
            "calls outside the contracts are counted under `*`: {metrics}"
        );
    }
}

#[test]
fn the_injected_init_container_installs_the_rules_its_annotations_ask_for() {
    if let Some(why) = crate::pods::unavailable() {
        return eprintln!("skipped: protomesh init needs a network namespace: {why}");
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "orders-0",
            "namespace": "shop",
            "labels": { "protomesh.io/inject": "enabled" },
            "annotations": {
                "protomesh.io/capture": "enabled",
                "protomesh.io/skip-outbound-ports": "5432,6000-6010",
                "protomesh.io/skip-outbound-cidrs": "169.254.169.254/32",
            },
        },
        "spec": { "containers": [{ "name": "orders", "image": "orders", "ports": [{ "containerPort": 50051 }] }] },
    });
    let context = Context { namespace: Some("shop"), workload: "orders", ..Default::default() };
    let Verdict::Injected(injected, _) = inject::inject(&pod, &context).unwrap() else { panic!("injected") };
    let init = &injected["spec"]["initContainers"][0];
    assert_eq!(init["name"], "protomesh-init", "the rules go in before the sidecar starts");
    assert_eq!(init["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN"]));
    let command: Vec<&str> = init["command"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(command, ["/protomesh", "init"]);

    let node = crate::pods::Node::new();
    let pod = node.pod();
    let output = pod.init_with_env(&container_env(init, &BTreeMap::new()));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rules = pod.ruleset();
    assert!(rules.contains("meta skuid 2102 return"), "{rules}");
    assert!(rules.contains("tcp dport { 5432, 6000-6010 } return"), "{rules}");
    assert!(rules.contains("ip daddr 169.254.169.254 return"), "{rules}");
    assert!(rules.contains("redirect to :4143") && rules.contains("redirect to :4140"), "{rules}");
}
