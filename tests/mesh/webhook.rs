//! The admission webhook over real HTTPS with real AdmissionReview JSON: the
//! patch it answers with, applied to the request's pod, is what `inject`
//! makes of that pod; a reinvocation changes nothing; what is not a review
//! gets a plain refusal, and what cannot be injected an allowed answer with
//! a warning; a renewed serving certificate is used without a restart.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use protomesh::kube::inject::{self, Context, Verdict};
use protomesh::kube::manifest;
use protomesh::kube::settings::Defaults;
use protomesh::kube::webhook::{self, WebhookConfig};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};

use crate::apiserver::{ApiServer, SIDECAR_ROLES, account_token};
use crate::harness::within;

/// A serving certificate for 127.0.0.1, and a client that trusts it alone.
struct Tls {
    cert_pem: String,
    key_pem: String,
}

impl Tls {
    fn new() -> Tls {
        let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        Tls { cert_pem: issued.cert.pem(), key_pem: issued.signing_key.serialize_pem() }
    }

    fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// The certificate files in a Secret-style volume, swapped through `..data`.
fn write_secret(dir: &Path, generation: u32, tls: &Tls) {
    let data = dir.join(format!("..{generation}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), &tls.cert_pem).unwrap();
    std::fs::write(data.join("tls.key"), &tls.key_pem).unwrap();
    symlink(format!("..{generation}"), dir.join("..tmp")).unwrap();
    std::fs::rename(dir.join("..tmp"), dir.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        if !dir.join(file).exists() {
            symlink(format!("..data/{file}"), dir.join(file)).unwrap();
        }
    }
}

struct Webhook {
    addr: std::net::SocketAddr,
    secret: tempfile::TempDir,
}

async fn start(tls: &Tls) -> Webhook {
    let secret = tempfile::tempdir().unwrap();
    write_secret(secret.path(), 1, tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = WebhookConfig {
        listen: addr,
        cert: secret.path().join("tls.crt"),
        key: secret.path().join("tls.key"),
        defaults: Defaults { image: Some("registry.example/protomesh:test".into()), ..Default::default() },
        reload_interval: Duration::from_secs(60),
        grant_namespaces: false,
    };
    tokio::spawn(webhook::serve(listener, config));
    Webhook { addr, secret }
}

/// One HTTPS request: the status and the body.
async fn request(webhook: &Webhook, tls: &Tls, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
    within("a webhook request", async {
        let tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
        let server = ServerName::IpAddress(webhook.addr.ip().into());
        let stream = tls.client().connect(server, tcp).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

/// A pod as a ReplicaSet controller creates it: only generateName, no
/// namespace of its own, the service account's projected token volume.
fn controller_pod() -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "checkout-5d8f7b9c4-",
            "labels": { "app.kubernetes.io/name": "checkout", "pod-template-hash": "5d8f7b9c4" },
            "annotations": { "kubectl.kubernetes.io/restartedAt": "2026-11-30T04:00:00Z" },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-5d8f7b9c4",
                "uid": "8c7a3f3e-1d2b-4a6e-9f0c-2b1e6f3d9a77", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": "checkout",
            "containers": [{
                "name": "checkout", "image": "registry.example/checkout:1", "ports": [{ "containerPort": 8080, "protocol": "TCP" }],
                "volumeMounts": [{ "name": "kube-api-access-x2k9d", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount" }]
            }],
            "volumes": [{ "name": "kube-api-access-x2k9d", "projected": { "sources": [{ "serviceAccountToken": { "path": "token", "expirationSeconds": 3607 } }] } }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler"
        },
        "status": {}
    })
}

fn review(uid: &str, kind: &str, object: Value) -> Vec<u8> {
    review_in("shop", uid, kind, object)
}

fn review_in(namespace: &str, uid: &str, kind: &str, object: Value) -> Vec<u8> {
    let group = if kind == "Pod" || kind == "ConfigMap" { "" } else { "apps" };
    let resource = format!("{}s", kind.to_lowercase());
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": group, "version": "v1", "kind": kind },
            "resource": { "group": group, "version": "v1", "resource": resource },
            "requestKind": { "group": group, "version": "v1", "kind": kind },
            "requestResource": { "group": group, "version": "v1", "resource": resource },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"] },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
        }
    }))
    .unwrap()
}

fn response(body: &str) -> Value {
    let review: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (review["apiVersion"].as_str(), review["kind"].as_str()),
        (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
    );
    review["response"].clone()
}

#[tokio::test]
async fn the_patch_applied_to_the_pod_is_what_inject_makes_of_it_and_a_reinvocation_changes_nothing() {
    let tls = Tls::new();
    let webhook = start(&tls).await;
    let pod = controller_pod();
    let (status, body) = request(&webhook, &tls, "POST", "/inject-namespace", review("a1", "Pod", pod.clone())).await;
    assert_eq!(status, 200, "{body}");
    let answer = response(&body);
    assert_eq!(answer["uid"], "a1");
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD.decode(answer["patch"].as_str().unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch array");
    let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
    assert!(paths.iter().all(|p| p.starts_with("/metadata/annotations/") || p.starts_with("/spec/")), "{paths:?}");
    assert!(paths.contains(&"/metadata/annotations/protomesh.io~1status".to_string()), "keys are escaped: {paths:?}");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();

    let context = Context {
        namespace: Some("shop"),
        namespace_injection: Some("enabled"),
        workload: &inject::workload_of_pod(&pod),
        defaults: Defaults { image: Some("registry.example/protomesh:test".into()), ..Default::default() },
        ..Default::default()
    };
    let Verdict::Injected(injected, _) = inject::inject(&pod, &context).unwrap() else { panic!("injected") };
    assert_eq!(patched, injected, "the webhook and inject make the same pod");
    let sidecar = patched["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "protomesh-proxy");
    let env = sidecar.unwrap()["env"].as_array().unwrap();
    assert!(env.iter().any(|v| v["name"] == "PROTOMESH_SERVICE_NAME" && v["value"] == "checkout"), "{env:?}");

    // A second webhook changed the pod; this one is called again: nothing more to do.
    let (status, body) = request(&webhook, &tls, "POST", "/inject-namespace", review("a2", "Pod", patched)).await;
    assert_eq!(status, 200);
    let answer = response(&body);
    assert_eq!((answer["uid"].as_str(), answer["allowed"].as_bool()), (Some("a2"), Some(true)));
    assert!(answer["patch"].is_null(), "{answer}");

    // On the pod-label path, a pod that did not opt in is let through untouched.
    let (_, body) = request(&webhook, &tls, "POST", "/inject", review("a3", "Pod", controller_pod())).await;
    assert!(response(&body)["patch"].is_null());
}

#[tokio::test]
async fn what_is_not_a_review_is_refused_and_what_cannot_be_injected_is_allowed_with_a_warning() {
    let tls = Tls::new();
    let webhook = start(&tls).await;
    let refused = [
        (b"not json".to_vec(), "not JSON"),
        (br#"{"kind": "Pod"}"#.to_vec(), "not an AdmissionReview of admission.k8s.io/v1"),
        (
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}"#.to_vec(),
            "request.uid: missing",
        ),
        (vec![b' '; 5 * 1024 * 1024], "cannot read the review"),
    ];
    for (body, why) in refused {
        let (status, text) = request(&webhook, &tls, "POST", "/inject", body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(why), "{text}");
    }

    let config_map = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" } });
    let (status, body) = request(&webhook, &tls, "POST", "/inject", review("b1", "ConfigMap", config_map)).await;
    assert_eq!(status, 200);
    let answer = response(&body);
    assert_eq!((answer["allowed"].as_bool(), answer["patch"].is_null()), (Some(true), true));
    assert_eq!(answer["warnings"][0], "protomesh: only pods are injected, not ConfigMap");

    let mut broken = controller_pod();
    broken["spec"]["containers"] = json!({ "name": "x" });
    let (status, body) = request(&webhook, &tls, "POST", "/inject-namespace", review("b2", "Pod", broken)).await;
    assert_eq!(status, 200);
    let answer = response(&body);
    assert_eq!(answer["allowed"], true, "the webhook never blocks a pod");
    let warning = answer["warnings"][0].as_str().unwrap();
    assert!(warning.contains("spec.containers: expected a list of containers"), "{warning}");

    assert_eq!(request(&webhook, &tls, "GET", "/healthz", Vec::new()).await, (200, "ok\n".into()));
    assert_eq!(request(&webhook, &tls, "GET", "/readyz", Vec::new()).await.0, 200);
    assert_eq!(request(&webhook, &tls, "POST", "/mutate", Vec::new()).await.0, 404);
    assert_eq!(request(&webhook, &tls, "GET", "/inject", Vec::new()).await.0, 405);
}

#[tokio::test]
async fn a_renewed_serving_certificate_is_used_without_a_restart() {
    let first = Tls::new();
    let webhook = start(&first).await;
    assert_eq!(request(&webhook, &first, "GET", "/healthz", Vec::new()).await.0, 200);
    let renewed = Tls::new();
    write_secret(webhook.secret.path(), 2, &renewed);
    within("the renewed certificate is served", async {
        loop {
            let tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
            let server = ServerName::IpAddress(webhook.addr.ip().into());
            if renewed.client().connect(server, tcp).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(request(&webhook, &renewed, "GET", "/readyz", Vec::new()).await.0, 200);
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects `labels`.
fn selects(selector: &Value, labels: &BTreeMap<&str, &str>) -> bool {
    let matched = selector["matchLabels"].as_object().into_iter().flatten();
    let matched = matched.clone().all(|(key, value)| labels.get(key.as_str()).is_some_and(|v| value == v));
    let expressions = selector["matchExpressions"].as_array().into_iter().flatten();
    matched
        && expressions.clone().all(|expression| {
            let value = labels.get(expression["key"].as_str().unwrap());
            let listed = |v: &&str| expression["values"].as_array().unwrap().iter().any(|listed| listed == *v);
            match expression["operator"].as_str().unwrap() {
                "In" => value.is_some_and(listed),
                "NotIn" => !value.is_some_and(listed),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other}"),
            }
        })
}

#[tokio::test]
async fn the_webhook_configuration_and_inject_decide_every_combination_of_labels_alike() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let configuration = manifest::read(&root.join("k8s/injector/webhook.yaml")).unwrap().documents.remove(0);
    let webhooks = configuration["webhooks"].as_array().unwrap();
    let tls = Tls::new();
    let webhook = start(&tls).await;
    let mut uid = 0;
    for namespace in ["shop", "kube-system", "protomesh-system"] {
        for namespace_label in [None, Some("enabled"), Some("disabled")] {
            for pod_label in [None, Some("enabled"), Some("disabled"), Some("yes")] {
                let case = format!("namespace {namespace} labelled {namespace_label:?}, pod labelled {pod_label:?}");
                let mut namespace_labels = BTreeMap::from([("kubernetes.io/metadata.name", namespace)]);
                namespace_labels.extend(namespace_label.map(|label| ("protomesh.io/inject", label)));
                let pod_labels: BTreeMap<&str, &str> =
                    pod_label.map(|l| ("protomesh.io/inject", l)).into_iter().collect();
                // As the API server calls them: each webhook whose selectors match.
                let called: Vec<&str> = webhooks
                    .iter()
                    .filter(|w| selects(&w["namespaceSelector"], &namespace_labels))
                    .filter(|w| selects(&w["objectSelector"], &pod_labels))
                    .map(|w| w["clientConfig"]["service"]["path"].as_str().unwrap())
                    .collect();
                assert!(called.len() <= 1, "{case}: both webhooks called");
                let mut pod = controller_pod();
                pod["metadata"]["labels"]["protomesh.io/inject"] = json!(pod_label);
                if pod_label.is_none() {
                    pod["metadata"]["labels"].as_object_mut().unwrap().remove("protomesh.io/inject");
                }
                let by_webhook = match called.first() {
                    None => false,
                    Some(path) => {
                        uid += 1;
                        let review = review_in(namespace, &uid.to_string(), "Pod", pod.clone());
                        let (status, body) = request(&webhook, &tls, "POST", path, review).await;
                        assert_eq!(status, 200, "{case}: {body}");
                        !response(&body)["patch"].is_null()
                    }
                };
                let mut manifests = manifest::Manifests { format: manifest::Format::Json, documents: vec![pod] };
                let options = manifest::Options {
                    namespace: Some(namespace.into()),
                    namespace_labels: namespace_label
                        .map(|l| (namespace.to_string(), l.to_string()))
                        .into_iter()
                        .collect(),
                    ..Default::default()
                };
                let report = manifest::inject(&mut manifests, &options).unwrap();
                let by_inject = report[0].outcome.starts_with("injected;");
                assert_eq!(by_webhook, by_inject, "{case}: the webhook says {by_webhook}, inject says {}", report[0]);
            }
        }
    }
}

/// The ClusterRoles sidecars are bound to, and the injector's own RBAC.
fn injector_rbac() -> Vec<Value> {
    crate::apiserver::k8s_rbac(&[SIDECAR_ROLES[0], SIDECAR_ROLES[1], "k8s/injector/rbac.yaml"])
}

/// The injector's namespace bindings, as k8s/injector runs them: with its
/// own service account's token and RBAC; and the directory of its kubeconfig.
async fn injector(api: &ApiServer) -> (tokio::task::JoinHandle<()>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig_with(dir.path(), &account_token("protomesh-system", "protomesh-injector"));
    let config = protomesh::discovery::kubernetes::read_kubeconfig(&kubeconfig).await.unwrap();
    (tokio::spawn(protomesh::kube::grants::run(kube::Client::try_from(config).unwrap())), dir)
}

/// Waits up to 10 s for `done`, checking as the API server changes.
async fn until(what: &str, done: impl Fn() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn the_injector_keeps_the_bindings_of_labelled_namespaces_and_takes_them_out_when_the_label_goes() {
    let api = ApiServer::start().await;
    let rbac = injector_rbac();
    api.authorize_accounts(&rbac);
    api.put_namespace("shop", json!({ "protomesh.io/inject": "enabled" }));
    api.put_namespace("plain", json!({}));
    api.put_namespace("gone", json!({ "protomesh.io/inject": "enabled" }));

    let (injector, _kubeconfig) = injector(&api).await;

    let may = |namespace: &str, what| api.may((namespace, "any-account"), what, namespace);
    let endpoints = ("list", "discovery.k8s.io", "endpointslices");
    let certificates = ("create", "cert-manager.io", "certificaterequests");
    let lookups = || api.bindings("clusterrolebindings");
    let both = ["protomesh-service-lookup:gone".to_string(), "protomesh-service-lookup:shop".to_string()];
    until("the labelled namespaces' bindings", || lookups() == both).await;
    assert!(may("shop", endpoints).is_ok() && may("gone", endpoints).is_ok());
    assert!(may("shop", certificates).is_ok(), "every account of the namespace may request its certificate");
    let denied = may("plain", endpoints).unwrap_err();
    assert!(denied.contains("system:serviceaccount:plain:any-account"), "{denied}");

    // Labelled later: granted; the label taken off: taken out; deleted: its cluster binding goes.
    api.put_namespace("plain", json!({ "protomesh.io/inject": "enabled" }));
    until("bindings for a namespace labelled later", || may("plain", endpoints).is_ok()).await;
    api.put_namespace("shop", json!({ "protomesh.io/inject": "disabled" }));
    until("the bindings of an unlabelled namespace gone", || may("shop", endpoints).is_err()).await;
    api.delete_namespace("gone");
    until("the cluster binding of a deleted namespace gone", || {
        lookups() == vec!["protomesh-service-lookup:plain".to_string()]
    })
    .await;
    injector.abort();
}

#[tokio::test]
async fn bindings_the_api_server_refused_are_applied_once_it_allows_them() {
    let api = ApiServer::start().await;
    let rbac = injector_rbac();
    // The injector may watch namespaces but not yet write bindings.
    let mut read_only = rbac.clone();
    for object in
        read_only.iter_mut().filter(|o| o["metadata"]["name"] == "protomesh-injector" && o["kind"] == "ClusterRole")
    {
        object["rules"].as_array_mut().unwrap().retain(|rule| rule["resources"][0] == "namespaces");
    }
    api.authorize_accounts(&read_only);
    api.put_namespace("shop", json!({ "protomesh.io/inject": "enabled" }));
    let (injector, _kubeconfig) = injector(&api).await;
    let requests = || api.requests("list");
    until("the namespaces listed", || requests() >= 1).await;
    assert!(api.bindings("rolebindings").is_empty(), "refused");

    api.authorize_accounts(&rbac);
    tokio::time::timeout(Duration::from_secs(25), async {
        while api.bindings("rolebindings").len() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the refused bindings applied on a retry");
    injector.abort();
}
