//! A Kubernetes API server of the test suite's own, for the sidecar's real
//! client code (kube-rs), since no kube-apiserver can be installed here. It
//! behaves as the real one does for what the sidecar asks: HTTPS with a
//! bearer token, Services read by name or listed across namespaces,
//! EndpointSlices and Pods listed (Pods in a namespace or in all) by label
//! and field selector (`spec.clusterIP` of Services, `status.podIP` and
//! `metadata.name` of Pods; fields it does not know refused as the real one
//! refuses them: 400, naming those it knows) with `limit`/`continue` pages
//! and a `resourceVersion`, and watched from a `resourceVersion` with
//! bookmarks and `timeoutSeconds`. A
//! watch from a version older than its history is answered as the real one
//! answers it: HTTP 200 and an ERROR event carrying a 410 Status. Once told
//! the roles and bindings in force, it authorizes as RBAC does, and a denial
//! is its 403 with the real server's message. Objects are k8s-openapi's
//! types, serialized as the API serves them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ObjectReference, Pod, PodSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub const TOKEN: &str = "test-service-account-token";

/// The token of service account `name` of `namespace`: what the kubelet
/// projects into its pods (a real one is a JWT naming the account).
pub fn account_token(namespace: &str, name: &str) -> String {
    format!("account:{namespace}:{name}")
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// The resources listed and watched: EndpointSlices and Pods; and
/// Namespaces and RBAC bindings, which the injector keeps.
const SLICES: &str = "endpointslices";
const PODS: &str = "pods";
const NAMESPACES: &str = "namespaces";
const ROLE_BINDINGS: &str = "rolebindings";
const CLUSTER_ROLE_BINDINGS: &str = "clusterrolebindings";

/// One change, as a watch reports it.
#[derive(Clone)]
struct Change {
    version: u64,
    resource: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    version: u64,
    services: BTreeMap<(String, String), Value>,
    /// EndpointSlices and Pods, by resource, namespace and name.
    objects: BTreeMap<(&'static str, String, String), Value>,
    /// Changes still known, oldest first; a watch from before the first is too old.
    history: Vec<Change>,
    /// The version before which the history is gone.
    compacted: u64,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Change>,
    /// Requests served, by kind: `list`, `watch`, `get`.
    pub requests: Arc<Mutex<BTreeMap<&'static str, usize>>>,
    ca_pem: String,
    /// The accepting task and each connection's, aborted by `stop`.
    server: Mutex<Vec<tokio::task::AbortHandle>>,
    tls: tokio_rustls::TlsAcceptor,
    watches: Arc<AtomicUsize>,
    /// RBAC, once [`ApiServer::authorize`] turns it on: until then every request is allowed.
    rbac: Mutex<Option<Rbac>>,
}

impl ApiServer {
    pub async fn start() -> Arc<ApiServer> {
        ApiServer::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// A server listening at `addr`, its certificate naming that address.
    pub async fn start_at(addr: SocketAddr) -> Arc<ApiServer> {
        let (tls, ca_pem) = tls(addr.ip());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let api = Arc::new(ApiServer {
            addr: listener.local_addr().unwrap(),
            store: Arc::default(),
            changes: broadcast::channel(1024).0,
            requests: Arc::default(),
            ca_pem,
            server: Mutex::default(),
            tls,
            watches: Arc::default(),
            rbac: Mutex::default(),
        });
        api.serve(listener);
        api
    }

    fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) {
        let api = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let served = api.clone();
                let connection = tokio::spawn(async move {
                    let api = served;
                    let Ok(tls) = api.tls.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let api = api.clone();
                        async move {
                            let (request, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(api.answer(request, body))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
                api.server.lock().unwrap().push(connection.abort_handle());
            }
        });
        self.server.lock().unwrap().push(task.abort_handle());
    }

    /// Stops answering, as a server that went down: open connections and
    /// their watches end.
    pub fn stop(&self) {
        for task in self.server.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Answers again on the same address, with its history gone: a watch
    /// from before now gets 410 Gone and must list again.
    pub async fn restart(self: &Arc<Self>) {
        {
            let mut store = self.store.lock().unwrap();
            store.history.clear();
            store.version += 100;
            store.compacted = store.version;
        }
        // The old listener closes as its task is aborted: a few tries at most.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if tries == 100 => panic!("the API server's address stays taken: {error}"),
                Err(_) => tries += 1,
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        self.serve(listener);
    }

    /// The CA certificate the server's is signed by, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig for this server, written into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.kubeconfig_with(dir, TOKEN)
    }

    /// As [`ApiServer::kubeconfig`], with `token`, an account's say.
    pub fn kubeconfig_with(&self, dir: &Path, token: &str) -> PathBuf {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: 'https://{}', certificate-authority-data: {ca}}}}}]\n\
             users: [{{name: test, user: {{token: '{token}'}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test, namespace: test}}}}]\n",
            self.addr
        );
        let path = dir.join("kubeconfig");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Creates or replaces the Service `name` in `namespace` with one TCP
    /// port, selecting the pods labelled `app: <name>`.
    pub fn service(&self, namespace: &str, name: &str, port: i32, port_name: &str) {
        self.service_at(namespace, (name, name), None, port, port_name)
    }

    /// As [`ApiServer::service`], with `cluster_ip`, selecting the pods labelled `app: <app>`.
    pub fn service_at(
        &self,
        namespace: &str,
        (name, app): (&str, &str),
        cluster_ip: Option<IpAddr>,
        port: i32,
        port_name: &str,
    ) {
        let service = Service {
            metadata: meta(namespace, name, 0),
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ip.map(|ip| ip.to_string()),
                cluster_ips: cluster_ip.map(|ip| vec![ip.to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some(port_name.into()),
                    port,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                selector: Some([("app".to_string(), app.to_string())].into()),
                type_: Some("ClusterIP".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut value = serde_json::to_value(service).unwrap();
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("Service");
        self.store.lock().unwrap().services.insert((namespace.into(), name.into()), value);
    }

    /// Creates or replaces a Service given whole (one of a manifest, its cluster IP set).
    pub fn put_service_object(&self, service: Value) {
        let (namespace, name) =
            (service["metadata"]["namespace"].as_str().unwrap(), service["metadata"]["name"].as_str().unwrap());
        let key = (namespace.to_string(), name.to_string());
        self.store.lock().unwrap().services.insert(key, service);
    }

    /// Sets an annotation of the Service `name`.
    pub fn annotate_service(&self, namespace: &str, name: &str, key: &str, value: &str) {
        let mut store = self.store.lock().unwrap();
        let service = store.services.get_mut(&(namespace.into(), name.into())).expect("the Service exists");
        service["metadata"]["annotations"][key] = json!(value);
    }

    /// Creates or replaces the pod `name`, labelled `app: <app>`, running as
    /// `account`, injected with capture: its app, the sidecar and the
    /// capture rules' init container, as `protomesh inject` makes them.
    pub fn pod(&self, namespace: &str, name: &str, app: &str, account: &str) {
        let sidecar = Container {
            name: "protomesh-proxy".into(),
            ports: Some(vec![ContainerPort {
                name: Some("protomesh-in".into()),
                container_port: 4143,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let init = Container { name: "protomesh-init".into(), ..Default::default() };
        self.put_pod(namespace, name, app, account, vec![sidecar], vec![init]);
    }

    /// Creates or replaces a pod given whole, as the API returns it (an
    /// injected pod as `protomesh inject` made it, say).
    pub fn put_pod_object(&self, pod: Value) {
        let (namespace, name) =
            (pod["metadata"]["namespace"].as_str().unwrap(), pod["metadata"]["name"].as_str().unwrap());
        let (namespace, name) = (namespace.to_string(), name.to_string());
        self.put(PODS, &namespace, &name, pod);
    }

    /// As [`ApiServer::pod`], not injected: no sidecar.
    pub fn unmeshed_pod(&self, namespace: &str, name: &str, app: &str, account: &str) {
        self.put_pod(namespace, name, app, account, Vec::new(), Vec::new());
    }

    fn put_pod(
        &self,
        namespace: &str,
        name: &str,
        app: &str,
        account: &str,
        added: Vec<Container>,
        init_containers: Vec<Container>,
    ) {
        let mut metadata = meta(namespace, name, 0);
        metadata.labels = Some([("app".to_string(), app.to_string())].into());
        let app = Container { name: "app".into(), image: Some("example/app:1".into()), ..Default::default() };
        let pod = Pod {
            metadata,
            spec: Some(PodSpec {
                service_account_name: Some(account.into()),
                containers: [vec![app], added].concat(),
                init_containers: (!init_containers.is_empty()).then_some(init_containers),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut value = serde_json::to_value(pod).unwrap();
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("Pod");
        self.put(PODS, namespace, name, value);
    }

    /// Creates or replaces an EndpointSlice of Service `service`: its
    /// endpoints (address, ready, pod) at `port_name` = `port`.
    pub fn slice(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
        (port_name, port): (&str, u16),
        endpoints: &[(&str, bool, &str)],
    ) {
        let mut metadata = meta(namespace, name, 0);
        metadata.labels = Some([("kubernetes.io/service-name".to_string(), service.to_string())].into());
        // As the EndpointSlice controller marks when the change was triggered.
        use k8s_openapi::jiff::{RoundMode, Timestamp, TimestampRound, Unit};
        let now = Timestamp::now().round(TimestampRound::new().smallest(Unit::Second).mode(RoundMode::Trunc)).unwrap();
        metadata.annotations =
            Some([("endpoints.kubernetes.io/last-change-trigger-time".to_string(), now.to_string())].into());
        let slice = EndpointSlice {
            metadata,
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(port_name.into()),
                port: Some(port.into()),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            endpoints: endpoints
                .iter()
                .map(|(address, ready, pod)| Endpoint {
                    addresses: vec![address.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*ready),
                        terminating: Some(false),
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.to_string()),
                        namespace: Some(namespace.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        };
        let mut value = serde_json::to_value(slice).unwrap();
        value["apiVersion"] = json!("discovery.k8s.io/v1");
        value["kind"] = json!("EndpointSlice");
        self.put(SLICES, namespace, name, value);
    }

    /// Stores `value` under a new resource version, as an ADDED or MODIFIED change.
    fn put(&self, resource: &'static str, namespace: &str, name: &str, mut value: Value) {
        let mut store = self.store.lock().unwrap();
        store.version += 1;
        let version = store.version;
        value["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = (resource, namespace.to_string(), name.to_string());
        let kind = if store.objects.insert(key, value.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut store, Change { version, resource, kind, object: value });
    }

    /// Gives every endpoint of an EndpointSlice the topology hint `for_zones`.
    pub fn hint(&self, namespace: &str, name: &str, for_zones: &[&str]) {
        let key = (SLICES, namespace.to_string(), name.to_string());
        let mut slice = self.store.lock().unwrap().objects.get(&key).cloned().expect("the EndpointSlice exists");
        let zones: Vec<Value> = for_zones.iter().map(|zone| json!({ "name": zone })).collect();
        for endpoint in slice["endpoints"].as_array_mut().unwrap() {
            endpoint["hints"] = json!({ "forZones": zones });
        }
        self.put(SLICES, namespace, name, slice);
    }

    /// Deletes an EndpointSlice.
    pub fn delete_slice(&self, namespace: &str, name: &str) {
        self.delete(SLICES, namespace, name);
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete(PODS, namespace, name);
    }

    fn delete(&self, resource: &'static str, namespace: &str, name: &str) {
        let mut store = self.store.lock().unwrap();
        let Some(mut value) = store.objects.remove(&(resource, namespace.to_string(), name.to_string())) else {
            return;
        };
        store.version += 1;
        let version = store.version;
        value["metadata"]["resourceVersion"] = json!(version.to_string());
        self.record(&mut store, Change { version, resource, kind: "DELETED", object: value });
    }

    /// Reports the pod running at `ip`, as its kubelet does once its sandbox is up.
    pub fn running_at(&self, namespace: &str, name: &str, ip: IpAddr) {
        let key = (PODS, namespace.to_string(), name.to_string());
        let mut pod = self.store.lock().unwrap().objects.get(&key).cloned().expect("the pod exists");
        pod["status"] = json!({ "phase": "Running", "podIP": ip.to_string(), "podIPs": [{ "ip": ip.to_string() }] });
        self.put(PODS, namespace, name, pod);
    }

    fn record(&self, store: &mut Store, change: Change) {
        store.history.push(change.clone());
        let _ = self.changes.send(change);
    }

    /// Authorizes as the real server's RBAC does, the token being
    /// `account`'s (`namespace`, `name`): by the ClusterRoles, RoleBindings
    /// and ClusterRoleBindings among `objects` (others are ignored).
    pub fn authorize(&self, (namespace, name): (&str, &str), objects: &[Value]) {
        let of = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).cloned().collect::<Vec<_>>();
        let roles = of("ClusterRole").into_iter().map(|r| (r["metadata"]["name"].as_str().unwrap().to_string(), r));
        let rbac = Rbac {
            account: Some((namespace.into(), name.into())),
            roles: roles.collect(),
            bindings: [of("RoleBinding"), of("ClusterRoleBinding")].concat(),
        };
        *self.rbac.lock().unwrap() = Some(rbac);
    }

    /// Authorizes every request as RBAC does, by the ClusterRoles and
    /// bindings among `objects`, for the account its token names
    /// ([`account_token`]); [`TOKEN`] is then a cluster admin's.
    pub fn authorize_accounts(&self, objects: &[Value]) {
        self.authorize(("", ""), objects);
        self.rbac.lock().unwrap().as_mut().expect("just set").account = None;
    }

    /// Whether `account` may `verb` `resource` of `group` in `namespace`,
    /// as a request with its token would be authorized; else the denial.
    pub fn may(
        &self,
        account: (&str, &str),
        (verb, group, resource): (&'static str, &'static str, &'static str),
        namespace: &str,
    ) -> Result<(), String> {
        let Some(rbac) = &*self.rbac.lock().unwrap() else { return Ok(()) };
        let asked = Asked { verb, group, resource, namespace: Some(namespace), name: None };
        rbac.allows((account.0.to_string(), account.1.to_string()), &asked, &self.stored_bindings())
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.watches.load(Ordering::Acquire)
    }

    pub fn requests(&self, kind: &'static str) -> usize {
        self.requests.lock().unwrap().get(kind).copied().unwrap_or(0)
    }

    fn answer(self: &Arc<Self>, request: http::request::Parts, body: Bytes) -> Response<Body> {
        let bearer = request.headers.get("authorization").and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "));
        let requester = match bearer {
            Some(TOKEN) => None,
            Some(token) => match token.strip_prefix("account:").and_then(|account| account.split_once(':')) {
                Some((namespace, name)) => Some((namespace.to_string(), name.to_string())),
                None => return status(StatusCode::UNAUTHORIZED, "Unauthorized", "no valid bearer token"),
            },
            None => return status(StatusCode::UNAUTHORIZED, "Unauthorized", "no valid bearer token"),
        };
        let path = request.uri.path().to_string();
        let query = query(request.uri.query().unwrap_or(""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        if let Some(rbac) = &*self.rbac.lock().unwrap()
            && let Some(account) = requester.or_else(|| rbac.account.clone())
            && let Some(asked) = Asked::of(&segments, watching, &request.method)
            && let Err(denied) = rbac.allows(account, &asked, &self.stored_bindings())
        {
            return status(StatusCode::FORBIDDEN, "Forbidden", &denied);
        }
        let rbac_group = ["apis", "rbac.authorization.k8s.io", "v1"];
        match segments[..] {
            [a, b, c, "namespaces", namespace, ROLE_BINDINGS, name] if [a, b, c] == rbac_group => {
                self.object(&request.method, ROLE_BINDINGS, namespace, name, &body)
            }
            [a, b, c, CLUSTER_ROLE_BINDINGS, name] if [a, b, c] == rbac_group => {
                self.object(&request.method, CLUSTER_ROLE_BINDINGS, "", name, &body)
            }
            [a, b, c, CLUSTER_ROLE_BINDINGS] if [a, b, c] == rbac_group => {
                self.count("list");
                let selector = Selector {
                    namespace: None,
                    labels: query.get("labelSelector").cloned(),
                    fields: Fields(Vec::new()),
                };
                self.list(CLUSTER_ROLE_BINDINGS, &selector, &query)
            }
            ["api", "v1", "services"] => {
                self.count("list");
                match Fields::parse("services", query.get("fieldSelector")) {
                    Ok(fields) => self.list_services(&fields),
                    Err(message) => status(StatusCode::BAD_REQUEST, "BadRequest", &message),
                }
            }
            ["api", "v1", "namespaces", namespace, "services", name] => {
                self.count("get");
                let store = self.store.lock().unwrap();
                match store.services.get(&(namespace.to_string(), name.to_string())) {
                    Some(service) => json_response(service),
                    None => status(StatusCode::NOT_FOUND, "NotFound", &format!("services \"{name}\" not found")),
                }
            }
            ["api", "v1", "namespaces", namespace, "pods", name] if request.method == http::Method::DELETE => {
                let held =
                    self.store.lock().unwrap().objects.get(&(PODS, namespace.to_string(), name.to_string())).cloned();
                let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let uid = &asked["preconditions"]["uid"];
                match held {
                    Some(pod) if !uid.is_null() && &pod["metadata"]["uid"] != uid => {
                        let message = format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                            pod["metadata"]["uid"]
                        );
                        status(StatusCode::CONFLICT, "Conflict", &message)
                    }
                    _ => self.object(&request.method, PODS, namespace, name, &body),
                }
            }
            ["api", "v1", "namespaces", namespace, "pods", name] => {
                self.count("get");
                let store = self.store.lock().unwrap();
                match store.objects.get(&(PODS, namespace.to_string(), name.to_string())) {
                    Some(pod) => json_response(pod),
                    None => status(StatusCode::NOT_FOUND, "NotFound", &format!("pods \"{name}\" not found")),
                }
            }
            ["apis", "discovery.k8s.io", "v1", "namespaces", _, "endpointslices"]
            | ["api", "v1", "namespaces", _, "pods"]
            | ["api", "v1", "pods"]
            | ["api", "v1", "namespaces"] => {
                let resource = match segments[..] {
                    ["api", "v1", "namespaces"] => NAMESPACES,
                    ["api", ..] => PODS,
                    _ => SLICES,
                };
                // Namespaced: `namespaces/<namespace>/<resource>`; else every namespace.
                let namespaced = segments.len() > 3 && resource != NAMESPACES;
                let namespace = segments.len().checked_sub(2).filter(|_| namespaced).map(|i| segments[i]);
                let namespace = namespace.map(str::to_string);
                let fields = match Fields::parse(resource, query.get("fieldSelector")) {
                    Ok(fields) => fields,
                    Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
                };
                let selector = Selector { namespace, labels: query.get("labelSelector").cloned(), fields };
                if watching {
                    self.count("watch");
                    self.watch(resource, selector, &query)
                } else {
                    self.count("list");
                    self.list(resource, &selector, &query)
                }
            }
            _ => status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {path}")),
        }
    }

    /// One object read, applied (server-side apply: the patch is the object) or deleted.
    fn object(
        &self,
        method: &http::Method,
        resource: &'static str,
        namespace: &str,
        name: &str,
        body: &Bytes,
    ) -> Response<Body> {
        let key = (resource, namespace.to_string(), name.to_string());
        let found = self.store.lock().unwrap().objects.get(&key).cloned();
        let (_, kind) = type_of(resource);
        let group = if resource == PODS { "" } else { ".rbac.authorization.k8s.io" };
        let not_found =
            || status(StatusCode::NOT_FOUND, "NotFound", &format!("{resource}{group} \"{name}\" not found"));
        match *method {
            http::Method::GET => found.map_or_else(not_found, |object| json_response(&object)),
            http::Method::PATCH => {
                let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "the patch is not JSON");
                };
                assert_eq!(object["kind"], kind, "an apply of the resource's own kind");
                object["metadata"]["uid"] = json!(format!("{namespace}-{name}"));
                self.put(resource, namespace, name, object);
                json_response(&self.store.lock().unwrap().objects[&key])
            }
            http::Method::DELETE => match found {
                Some(object) => {
                    self.delete(resource, namespace, name);
                    json_response(&object)
                }
                None => not_found(),
            },
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not supported here"),
        }
    }

    /// The bindings stored through the API, which RBAC honours besides those it was told.
    fn stored_bindings(&self) -> Vec<Value> {
        let store = self.store.lock().unwrap();
        let bindings = store
            .objects
            .iter()
            .filter(|((resource, _, _), _)| [ROLE_BINDINGS, CLUSTER_ROLE_BINDINGS].contains(resource));
        bindings.map(|(_, object)| object.clone()).collect()
    }

    /// Creates or replaces a Namespace, with its labels.
    pub fn put_namespace(&self, name: &str, labels: Value) {
        let namespace = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "uid": name, "labels": labels } });
        self.put(NAMESPACES, "", name, namespace);
    }

    /// Deletes a Namespace, and what was in it, as the namespace controller does.
    pub fn delete_namespace(&self, name: &str) {
        let inside: Vec<(&'static str, String)> = {
            let store = self.store.lock().unwrap();
            store.objects.keys().filter(|(_, ns, _)| ns == name).map(|(r, _, n)| (*r, n.clone())).collect()
        };
        for (resource, object) in inside {
            self.delete(resource, name, &object);
        }
        self.delete(NAMESPACES, "", name);
    }

    /// Whether the pod `name` is there.
    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.store.lock().unwrap().objects.contains_key(&(PODS, namespace.to_string(), name.to_string()))
    }

    /// The names of the bindings of `resource` (`rolebindings`, `clusterrolebindings`) stored through the API.
    pub fn bindings(&self, resource: &str) -> Vec<String> {
        let store = self.store.lock().unwrap();
        let found = store.objects.iter().filter(|((r, _, _), _)| *r == resource);
        found.map(|(_, object)| object["metadata"]["name"].as_str().unwrap().to_string()).collect()
    }

    /// Services of every namespace, selected by their fields.
    fn list_services(&self, fields: &Fields) -> Response<Body> {
        let store = self.store.lock().unwrap();
        let items: Vec<&Value> = store.services.values().filter(|service| fields.select(service)).collect();
        json_response(&json!({
            "apiVersion": "v1",
            "kind": "ServiceList",
            "metadata": { "resourceVersion": store.version.to_string() },
            "items": items,
        }))
    }

    fn count(&self, kind: &'static str) {
        *self.requests.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn list(&self, resource: &'static str, selector: &Selector, query: &BTreeMap<String, String>) -> Response<Body> {
        let store = self.store.lock().unwrap();
        let selected: Vec<&Value> = store
            .objects
            .iter()
            .filter(|((kind, _, _), object)| *kind == resource && selector.select(object))
            .map(|(_, object)| object)
            .collect();
        let start: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit = query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let page: Vec<Value> = selected.iter().skip(start).take(limit).map(|slice| (*slice).clone()).collect();
        let mut metadata = json!({ "resourceVersion": store.version.to_string() });
        if start + page.len() < selected.len() {
            metadata["continue"] = json!((start + page.len()).to_string());
        }
        let (api_version, kind) = type_of(resource);
        json_response(&json!({
            "apiVersion": api_version,
            "kind": format!("{kind}List"),
            "metadata": metadata,
            "items": page,
        }))
    }

    fn watch(&self, resource: &'static str, selector: Selector, query: &BTreeMap<String, String>) -> Response<Body> {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(300u64);
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let (backlog, mut changes, gone, version) = {
            let store = self.store.lock().unwrap();
            let gone = from < store.compacted;
            let backlog: Vec<Change> = store.history.iter().filter(|c| c.version > from).cloned().collect();
            (backlog, self.changes.subscribe(), gone, store.version)
        };
        let watches = self.watches.clone();
        tokio::spawn(async move {
            watches.fetch_add(1, Ordering::AcqRel);
            let send = |event: Value| {
                let mut line = serde_json::to_vec(&event).unwrap();
                line.push(b'\n');
                sender.try_send(Bytes::from(line)).is_ok()
            };
            let selected = |change: &Change| change.resource == resource && selector.select(&change.object);
            if gone {
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({version})"), "reason": "Expired", "code": 410,
                });
                send(json!({ "type": "ERROR", "object": status }));
                return watches.fetch_sub(1, Ordering::AcqRel);
            }
            for change in backlog.iter().filter(|c| selected(c)) {
                send(json!({ "type": change.kind, "object": change.object }));
            }
            let ends = tokio::time::sleep(std::time::Duration::from_secs(timeout));
            tokio::pin!(ends);
            let mut ticks = tokio::time::interval(std::time::Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = &mut ends => break,
                    _ = sender.closed() => break,
                    _ = ticks.tick(), if bookmarks => {
                        let (api_version, kind) = type_of(resource);
                        let bookmark = json!({ "kind": kind, "apiVersion": api_version,
                            "metadata": { "resourceVersion": version.to_string() } });
                        send(json!({ "type": "BOOKMARK", "object": bookmark }));
                    }
                    change = changes.recv() => match change {
                        Ok(change) if selected(&change) => {
                            if !send(json!({ "type": change.kind, "object": change.object })) {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    },
                }
            }
            watches.fetch_sub(1, Ordering::AcqRel)
        });
        let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let bytes = receiver.recv().await?;
            Some((Ok(Frame::data(bytes)), receiver))
        });
        let mut response = Response::new(StreamBody::new(frames).boxed());
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        response
    }
}

fn meta(namespace: &str, name: &str, version: u64) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        resource_version: Some(version.to_string()),
        uid: Some(format!("{namespace}-{name}")),
        ..Default::default()
    }
}

/// The RBAC objects of `k8s/`'s files `files`: those that sidecars'
/// service accounts are bound to are in [`SIDECAR_ROLES`].
pub fn k8s_rbac(files: &[&str]) -> Vec<Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    files.iter().flat_map(|file| protomesh::kube::manifest::read(&root.join(file)).unwrap().documents).collect()
}

/// The ClusterRoles that injected pods' service accounts are bound to.
pub const SIDECAR_ROLES: [&str; 2] = ["k8s/discovery/clusterrole.yaml", "k8s/identity/clusterrole.yaml"];

/// The ClusterRoles of `k8s/`, and the bindings `protomesh inject` adds for
/// a Deployment in namespace `test` running as `client`, but `left_out`.
pub fn inject_grants(left_out: Option<&str>) -> Vec<Value> {
    let mut objects = k8s_rbac(&SIDECAR_ROLES);
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client, namespace: test}\n\
        spec: {template: {metadata: {labels: {protomesh.io/inject: enabled}},\n\
        spec: {serviceAccountName: client, containers: [{name: app, image: example/app:1}]}}}\n";
    let mut manifests = protomesh::kube::manifest::parse(deployment, "deployment").unwrap();
    protomesh::kube::manifest::inject(
        &mut manifests,
        &protomesh::kube::manifest::Options { rbac: true, ..Default::default() },
    )
    .unwrap();
    let bindings = manifests.documents.into_iter().filter(|o| o["kind"].as_str().unwrap().ends_with("Binding"));
    objects.extend(bindings.filter(|b| Some(b["roleRef"]["name"].as_str().unwrap()) != left_out));
    objects
}

/// What a request asks to do, as RBAC sees it.
struct Asked<'a> {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

impl<'a> Asked<'a> {
    fn of(segments: &[&'a str], watching: bool, method: &http::Method) -> Option<Asked<'a>> {
        let collection = if watching { "watch" } else { "list" };
        let one = match *method {
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "get",
        };
        let rbac = "rbac.authorization.k8s.io";
        let (verb, group, resource, namespace, name) = match *segments {
            ["api", "v1", "namespaces"] => (collection, "", NAMESPACES, None, None),
            ["apis", _, "v1", "namespaces", ns, ROLE_BINDINGS, name] => {
                (one, rbac, ROLE_BINDINGS, Some(ns), Some(name))
            }
            ["apis", _, "v1", CLUSTER_ROLE_BINDINGS, name] => (one, rbac, CLUSTER_ROLE_BINDINGS, None, Some(name)),
            ["apis", _, "v1", CLUSTER_ROLE_BINDINGS] => (collection, rbac, CLUSTER_ROLE_BINDINGS, None, None),
            ["api", "v1", "services"] => (collection, "", "services", None, None),
            ["api", "v1", "pods"] => (collection, "", "pods", None, None),
            ["api", "v1", "nodes", name] => ("get", "", "nodes", None, Some(name)),
            ["api", "v1", "namespaces", ns, "services", name] => ("get", "", "services", Some(ns), Some(name)),
            ["api", "v1", "namespaces", ns, "pods"] => (collection, "", "pods", Some(ns), None),
            ["api", "v1", "namespaces", ns, "pods", name] => (one, "", "pods", Some(ns), Some(name)),
            ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => {
                (collection, "discovery.k8s.io", "endpointslices", Some(ns), None)
            }
            _ => return None,
        };
        Some(Asked { verb, group, resource, namespace, name })
    }
}

/// The RBAC authorizer.
struct Rbac {
    /// The account of [`TOKEN`]; `None`: a cluster admin's.
    account: Option<(String, String)>,
    roles: BTreeMap<String, Value>,
    bindings: Vec<Value>,
}

impl Rbac {
    /// Allowed, or the real server's message for the denial.
    fn allows(&self, (namespace, name): (String, String), asked: &Asked, stored: &[Value]) -> Result<(), String> {
        let groups = ["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{namespace}")];
        let names_us = |subject: &Value| match subject["kind"].as_str() {
            Some("ServiceAccount") => subject["namespace"] == namespace.as_str() && subject["name"] == name.as_str(),
            Some("Group") => groups.iter().any(|g| subject["name"] == g.as_str()),
            _ => false,
        };
        let listed =
            |list: &Value, value: &str| list.as_array().is_some_and(|l| l.iter().any(|v| v == value || v == "*"));
        let granted = self.bindings.iter().chain(stored).any(|binding| {
            let in_scope = binding["kind"] == "ClusterRoleBinding"
                || asked.namespace.is_some_and(|ns| binding["metadata"]["namespace"] == ns);
            let ours = binding["subjects"].as_array().is_some_and(|s| s.iter().any(names_us));
            let role = binding["roleRef"]["name"].as_str().and_then(|r| self.roles.get(r));
            in_scope
                && ours
                && role.is_some_and(|role| {
                    role["rules"].as_array().into_iter().flatten().any(|rule| {
                        listed(&rule["apiGroups"], asked.group)
                            && listed(&rule["resources"], asked.resource)
                            && listed(&rule["verbs"], asked.verb)
                    })
                })
        });
        if granted {
            return Ok(());
        }
        let resource = match asked.group {
            "" => asked.resource.to_string(),
            group => format!("{}.{group}", asked.resource),
        };
        let object = match asked.name {
            Some(object) => format!("{resource} \"{object}\""),
            None => resource,
        };
        let scope = match asked.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        Err(format!(
            "{object} is forbidden: User \"system:serviceaccount:{namespace}:{name}\" cannot {} resource \"{}\" in API \
             group \"{}\" {scope}",
            asked.verb, asked.resource, asked.group
        ))
    }
}

/// Which objects a list or watch asks for.
struct Selector {
    /// `None`: every namespace.
    namespace: Option<String>,
    /// `key=value` terms on labels.
    labels: Option<String>,
    fields: Fields,
}

impl Selector {
    fn select(&self, object: &Value) -> bool {
        let in_namespace = self.namespace.as_ref().is_none_or(|ns| object["metadata"]["namespace"] == ns.as_str());
        let mut terms = self.labels.iter().flat_map(|s| s.split(',')).filter(|t| !t.is_empty());
        let labelled = terms.all(|term| match term.split_once('=') {
            Some((key, value)) => object["metadata"]["labels"][key] == value,
            None => false,
        });
        in_namespace && labelled && self.fields.select(object)
    }
}

/// A field selector's `field=value` terms, each a path into the object.
struct Fields(Vec<(Vec<String>, String)>);

impl Fields {
    /// The terms, if the real API server knows each field for `resource`;
    /// else its message, naming the fields it knows (answered with a 400).
    fn parse(resource: &str, selector: Option<&String>) -> Result<Fields, String> {
        let known: &[&str] = match resource {
            "services" => &["metadata.name", "metadata.namespace", "spec.clusterIP", "spec.type"],
            PODS => &["metadata.name", "metadata.namespace", "spec.nodeName", "status.phase", "status.podIP"],
            _ => &["metadata.name", "metadata.namespace"],
        };
        let mut terms = Vec::new();
        for term in selector.into_iter().flat_map(|f| f.split(',')).filter(|t| !t.is_empty()) {
            match term.split_once('=') {
                Some((field, value)) if known.contains(&field) => {
                    terms.push((field.split('.').map(str::to_string).collect(), value.to_string()))
                }
                _ => {
                    let field = term.split(['=', '!']).next().unwrap_or(term);
                    let known = known.iter().map(|f| format!("\"{f}\"")).collect::<Vec<_>>().join(", ");
                    let message = format!(
                        "Unable to find \"{resource}\" that match label selector \"\", field selector \"{term}\": \
                         \"{field}\" is not a known field selector: only {known}"
                    );
                    return Err(message);
                }
            }
        }
        Ok(Fields(terms))
    }

    fn select(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, value)| path.iter().fold(object, |node, key| &node[key]) == value.as_str())
    }
}

fn type_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        PODS => ("v1", "Pod"),
        NAMESPACES => ("v1", "Namespace"),
        ROLE_BINDINGS => ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        CLUSTER_ROLE_BINDINGS => ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
        _ => ("discovery.k8s.io/v1", "EndpointSlice"),
    }
}

fn json_response(value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed());
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut response = json_response(&status);
    *response.status_mut() = code;
    response
}

/// A query string's parameters, percent-decoded.
fn query(text: &str) -> BTreeMap<String, String> {
    text.split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

fn decode(part: &str) -> String {
    let bytes = part.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(bytes.len()), 0);
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A CA, and a server certificate for `ip` it signed.
fn tls(ip: IpAddr) -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![ip.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let chain = vec![leaf.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}
