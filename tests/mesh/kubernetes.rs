//! Upstreams that name a Kubernetes Service (`k8s://service.namespace:port`):
//! the sidecar's kube-rs client against the suite's own API server
//! (`apiserver.rs`), which stands in for kube-apiserver. Calls follow the
//! Service's ready endpoints as its EndpointSlices change, keep flowing while
//! the API server is down (which `/ready`'s body says), and converge once it
//! is back without its history. Under RBAC, what `protomesh inject` grants
//! is enough, and a denial names what to grant.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protomesh_samples::pb::echo::v1::EchoRequest;

use crate::apiserver::{ApiServer, inject_grants};
use crate::harness::{Mesh, MeshOptions, within};
use crate::telemetry::admin;

/// Calls, ten at a time, until `served` holds of the backends' counts of
/// the last ten, or 10 s pass.
/// Calls may fail only while the first endpoints are on their way.
async fn calls_until(mesh: &Mesh, what: &str, served: impl Fn(&[u64]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(status) = within("a call", mesh.client().unary(EchoRequest::default())).await {
        assert!(status.message().contains("has no resolved endpoints"), "{status:?}");
        assert!(tokio::time::Instant::now() < deadline, "{what}: no endpoint known");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let before: Vec<u64> =
            mesh.backends.iter().map(|b| b.calls.load(std::sync::atomic::Ordering::Acquire)).collect();
        // Ten at once, so that the balancer's count of calls in flight spreads them.
        let calls = (0..10).map(|_| async { mesh.client().unary(EchoRequest::default()).await });
        for result in within("ten calls", futures_util::future::join_all(calls)).await {
            result.expect("calls keep succeeding");
        }
        let during: Vec<u64> = mesh
            .backends
            .iter()
            .zip(&before)
            .map(|(b, before)| b.calls.load(std::sync::atomic::Ordering::Acquire) - before)
            .collect();
        if served(&during) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: the last 10 calls went {during:?}");
    }
}

/// The client sidecar's `/ready` body once `wanted` holds of it (the status
/// always 200: the sidecar stays ready), or the last one after 5 s.
async fn ready_until(mesh: &Mesh, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = admin(mesh.client_sidecar.admin_addr, "GET", "/ready", "").await;
        assert_eq!(status, 200, "{body}");
        if wanted(&body) || tokio::time::Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn what_inject_grants_is_enough_and_a_denial_on_ready_names_what_to_grant() {
    let api = ApiServer::start().await;
    api.authorize(("test", "client"), &inject_grants(None));
    api.service("test", "echo", 50051, "grpc");
    let (granted, _dir) = mesh(&api, "k8s://echo.test:50051").await;
    slices(&api, &granted.server_inbounds(), &[true, true]);
    calls_until(&granted, "granted, both endpoints take calls", |d| d.iter().all(|n| *n > 0)).await;
    assert_eq!(ready_until(&granted, |body| body == "ready\n").await, "ready\n");

    let api = ApiServer::start().await;
    api.authorize(("test", "client"), &inject_grants(Some("protomesh-discovery")));
    api.service("test", "echo", 50051, "grpc");
    let (refused, _dir) = mesh(&api, "k8s://echo.test:50051").await;
    let denied = ready_until(&refused, |body| body.contains("forbidden")).await;
    assert!(denied.contains("\n  k8s://echo.test:50051, for "), "{denied}");
    assert!(
        denied.contains(
            ": k8s://echo.test:50051: reading the Service: forbidden by RBAC: services \"echo\" is forbidden: User \
             \"system:serviceaccount:test:client\" cannot get resource \"services\" in API group \"\" in the namespace \
             \"test\" (bind the ClusterRole protomesh-discovery of k8s/discovery to the pod's service account in that \
             namespace)"
        ),
        "{denied}"
    );
}

/// EndpointSlices of Service `echo` in namespace `test`, one per server sidecar.
fn slices(api: &ApiServer, servers: &[SocketAddr], ready: &[bool]) {
    for (i, (server, ready)) in servers.iter().zip(ready).enumerate() {
        let address = server.ip().to_string();
        let pod = format!("pod-{i}");
        api.slice("test", &format!("echo-{i}"), "echo", ("grpc", server.port()), &[(&address, *ready, &pod)]);
    }
}

async fn mesh(api: &Arc<ApiServer>, endpoint: &str) -> (Mesh, tempfile::TempDir) {
    mesh_with(api, endpoint, MeshOptions::default()).await
}

async fn mesh_with(api: &Arc<ApiServer>, endpoint: &str, options: MeshOptions) -> (Mesh, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let options = MeshOptions {
        servers: 2,
        upstream_endpoint: Some(endpoint.into()),
        client_config: format!("kubernetes: {{kubeconfig: '{}'}}\n", kubeconfig.display()),
        ..options
    };
    (Mesh::start_with(options).await, dir)
}

/// Two servers behind Service `echo` with no identity for all: both pods
/// run as `server`, and the second server's certificate names `other`.
async fn server_and_other(api: &Arc<ApiServer>) -> (Mesh, tempfile::TempDir) {
    let options =
        MeshOptions { server_workloads: &["server", "other"], upstream_identity: false, ..Default::default() };
    let (mesh, dir) = mesh_with(api, "k8s://echo.test:50051", options).await;
    let servers = mesh.server_inbounds();
    api.pod("test", "pod-0", "echo", "server");
    api.pod("test", "pod-1", "echo", "server");
    slices(api, &servers, &[true, true]);
    (mesh, dir)
}

#[tokio::test]
async fn a_service_may_name_the_identity_its_endpoints_present_instead_of_their_accounts() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    let other = "spiffe://test.protomesh.local/ns/test/sa/other";
    api.annotate_service("test", "echo", "protomesh.io/expected-identity", other);
    // Both pods run as `server`; only the second server's certificate names `other`.
    let (mesh, _dir) = server_and_other(&api).await;
    calls_until(&mesh, "only the endpoint presenting the named identity takes calls", |d| d[0] == 0 && d[1] == 10)
        .await;
}

#[tokio::test]
async fn endpoints_hinted_for_this_pods_zone_take_its_calls_and_the_rest_take_them_when_those_are_out() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let options = MeshOptions {
        servers: 2,
        upstream_endpoint: Some("k8s://echo.test:50051".into()),
        client_config: format!("kubernetes: {{kubeconfig: '{}', zone: zone-a}}\n", kubeconfig.display()),
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let servers = mesh.server_inbounds();
    api.pod("test", "pod-0", "echo", "server");
    api.pod("test", "pod-1", "echo", "server");
    slices(&api, &servers, &[true, true]);
    calls_until(&mesh, "without hints, both take calls", |d| d[0] > 0 && d[1] > 0).await;
    // Hints on one slice only: kube-proxy ignores them unless every endpoint has them.
    api.hint("test", "echo-1", &["zone-a"]);
    calls_until(&mesh, "hints on some endpoints only are not followed", |d| d[0] > 0 && d[1] > 0).await;
    api.hint("test", "echo-0", &["zone-b"]);
    calls_until(&mesh, "the endpoint hinted for this zone takes every call", |d| d[0] == 0 && d[1] == 10).await;
    // The zone's only endpoint cannot be reached: calls spill over to the others.
    api.pod("test", "pod-2", "echo", "server");
    api.slice("test", "echo-2", "echo", ("grpc", 1), &[("127.0.0.1", true, "pod-2")]);
    api.hint("test", "echo-2", &["zone-a"]);
    api.hint("test", "echo-1", &["zone-b"]);
    calls_until(&mesh, "the other zone takes the calls while this one's are out", |d| d[0] > 0 && d[1] > 0).await;
}

#[tokio::test]
async fn without_an_identity_for_all_each_endpoint_must_present_its_pods_service_account() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    // The second server's certificate names another service account than its pod runs as.
    let (mesh, _dir) = server_and_other(&api).await;
    calls_until(&mesh, "the endpoint presenting the wrong identity takes no call", |d| d[0] == 10 && d[1] == 0).await;
    for _ in 0..3 {
        calls_until(&mesh, "it never does", |d| d[1] == 0).await;
    }
    // Its pod runs as the account it presents: now it is who it must be.
    api.pod("test", "pod-1", "echo", "other");
    calls_until(&mesh, "the same endpoint, expected as its pod's account", |d| d[1] > 0).await;
}

#[tokio::test]
async fn an_upstream_naming_a_service_follows_its_ready_endpoints() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    let (mesh, _dir) = mesh(&api, "k8s://echo.test:50051").await;
    let servers = mesh.server_inbounds();

    slices(&api, &servers, &[true, true]);
    calls_until(&mesh, "both ready endpoints take calls", |d| d.iter().all(|n| *n > 0)).await;
    // The watches start once their lists are in, so they may not be open yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while api.open_watches() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(api.open_watches(), 2, "the Service's EndpointSlices and its pods, one watch each");
    slices(&api, &servers, &[true, false]);
    calls_until(&mesh, "a not-ready endpoint takes none", |d| d[1] == 0).await;
    api.delete_slice("test", "echo-0");
    slices(&api, &servers[1..], &[true]);
    calls_until(&mesh, "a deleted slice's endpoint takes none", |d| d[0] == 0 && d[1] > 0).await;

    // The API server goes down: the last endpoints stay, and /ready says so, still ready.
    api.stop();
    calls_until(&mesh, "calls go on without the API server", |d| d[1] == 10).await;
    let down = ready_until(&mesh, |body| body.contains("k8s://echo.test:50051, for ")).await;
    assert!(down.starts_with("ready; the Kubernetes API server is failing"), "{down}");
    // Back, with its history gone: the client's watch is refused (410 Gone),
    // and it lists again and converges.
    let listed = api.requests("list");
    api.restart().await;
    slices(&api, &servers, &[true, true]);
    calls_until(&mesh, "after the restart, both again", |d| d.iter().all(|n| *n > 0)).await;
    assert_eq!(ready_until(&mesh, |body| body == "ready\n").await, "ready\n");
    assert!(api.requests("list") > listed, "listed again: {:?}", api.requests.lock().unwrap());
    assert!(api.requests("get") >= 1, "the Service was read for its port's name");
}

#[tokio::test]
async fn a_service_named_twice_is_read_listed_and_watched_once() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    let (mesh, _dir) = mesh(&api, "k8s://echo.test:50051,k8s://echo.test:50051").await;
    slices(&api, &mesh.server_inbounds(), &[true, true]);
    calls_until(&mesh, "both ready endpoints take calls", |d| d.iter().all(|n| *n > 0)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while api.open_watches() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = (api.requests("get"), api.requests("list"), api.requests("watch"), api.open_watches());
    assert_eq!(asked, (1, 2, 2, 2), "one read, two lists and two watches, shared: {:?}", api.requests.lock().unwrap());
}

#[tokio::test]
async fn a_service_port_may_be_named_and_only_its_endpoints_are_taken() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    let (mesh, _dir) = mesh(&api, "k8s://echo.test:grpc").await;
    let servers = mesh.server_inbounds();
    // The second server's slice is of another port of the Service: not ours.
    api.slice("test", "echo-0", "echo", ("grpc", servers[0].port()), &[(&servers[0].ip().to_string(), true, "pod-0")]);
    api.slice(
        "test",
        "echo-1",
        "echo",
        ("metrics", servers[1].port()),
        &[(&servers[1].ip().to_string(), true, "pod-1")],
    );
    api.slice(
        "test",
        "other-0",
        "other",
        ("grpc", servers[1].port()),
        &[(&servers[1].ip().to_string(), true, "pod-1")],
    );
    calls_until(&mesh, "only the named port's endpoints", |d| d[0] == 10 && d[1] == 0).await;
}

#[test]
fn a_k8s_endpoint_without_an_api_server_is_refused_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let names = [("client".to_string(), crate::harness::id("client"))];
    protomesh::identity::certs::write_dev_certs(dir.path(), "test CA", &names).unwrap();
    let certs = dir.path().display();
    let config = dir.path().join("client.yaml");
    std::fs::write(
        &config,
        format!(
            "identity: {{cert: {certs}/client.pem, key: {certs}/client-key.pem, trust_bundle: {certs}/ca.pem}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{}/proto']}}\n\
             outbound: {{listen: '127.0.0.1:0', upstreams: [{{services: [echo.v1.Echo], \
             endpoints: ['k8s://echo.test:50051'], identity: 'spiffe://td/ns/test/sa/echo'}}]}}\n\
             admin: {{listen: '127.0.0.1:0'}}\nkubernetes: {{discovery: false}}\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_protomesh"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("outbound.upstreams[0]: k8s://echo.test:50051: no Kubernetes API server"), "{stderr}");
    assert!(stderr.contains("kubernetes.discovery is off"), "{stderr}");
}

#[tokio::test]
async fn a_service_and_an_address_in_one_upstream_are_both_kept_as_the_service_changes() {
    let api = ApiServer::start().await;
    api.service("test", "echo", 50051, "grpc");
    // The first server by its address, the second through the Service.
    let (mesh, _dir) = mesh(&api, "127.0.0.1:{server},k8s://echo.test:grpc").await;
    let servers = mesh.server_inbounds();
    let second = servers[1].ip().to_string();
    api.slice("test", "echo-1", "echo", ("grpc", servers[1].port()), &[(&second, true, "pod-1")]);
    calls_until(&mesh, "both, the address and the Service's endpoint", |d| d.iter().all(|n| *n > 0)).await;
    api.slice("test", "echo-1", "echo", ("grpc", servers[1].port()), &[(&second, false, "pod-1")]);
    calls_until(&mesh, "the address stays when the Service changes", |d| d[0] == 10).await;
}
