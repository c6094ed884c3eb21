//! Live configuration: config, contracts and identity files changed under a
//! running pair, as Kubernetes changes them (ConfigMap and Secret volumes
//! swap a `..data` link), are taken within the debounce without failing a
//! call; what does not load leaves the running version in service and says
//! which file and field; live state (bulkhead places, connections) outlasts
//! a reload that does not touch it.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protomesh::app::ReloadOutcome;
use protomesh::identity::{Credentials, ExpectedPeer, Identity};
use protomesh_samples::pb::echo::v1::EchoRequest;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, id, within};
use crate::refusals::call_inbound_over_tls;
use crate::telemetry::{admin, sample};

const ECHO_PROTO: &str = include_str!("../../proto/examples/echo.proto");
const SHOP_PROTO: &str = include_str!("../../proto/examples/shop.proto");

/// A directory laid out as the kubelet lays out a ConfigMap volume: the files
/// in a timestamped directory behind the `..data` link, which an update
/// swaps in one rename.
struct ConfigMapDir {
    root: PathBuf,
    generation: u32,
}

impl ConfigMapDir {
    /// Each file's first path segment is a link into `..data`, as `items[].path` makes it.
    fn new(root: &Path, files: &[(&str, &str)]) -> ConfigMapDir {
        std::fs::create_dir_all(root).unwrap();
        let mut dir = ConfigMapDir { root: root.to_path_buf(), generation: 0 };
        dir.update(files);
        let tops: std::collections::BTreeSet<&str> = files.iter().map(|(p, _)| p.split('/').next().unwrap()).collect();
        for top in tops {
            symlink(format!("..data/{top}"), root.join(top)).unwrap();
        }
        dir
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let name = format!("..2026_11_30_{:02}", self.generation);
        for (path, text) in files {
            let file = self.root.join(&name).join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        let staged = self.root.join("..data_tmp");
        symlink(&name, &staged).unwrap();
        std::fs::rename(&staged, self.root.join("..data")).unwrap();
        if self.generation > 1 {
            std::fs::remove_dir_all(self.root.join(format!("..2026_11_30_{:02}", self.generation - 1))).unwrap();
        }
    }

    fn path(&self) -> String {
        self.root.display().to_string()
    }
}

fn contracts(echo: &str) -> [(&'static str, String); 2] {
    [("examples/echo.proto", echo.to_string()), ("examples/shop.proto", SHOP_PROTO.to_string())]
}

fn as_refs<'a>(files: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    files.iter().map(|(p, t)| (*p, t.as_str())).collect()
}

/// Calls of every shape from several tasks, and one bidi stream open
/// throughout, until stopped; every failure is kept.
struct Traffic {
    stop: watch::Sender<bool>,
    tasks: JoinSet<Vec<String>>,
    calls: Arc<AtomicU64>,
}

impl Traffic {
    fn start(mesh: &Mesh) -> Traffic {
        let (stop, stopped) = watch::channel(false);
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for shape in 0..4 {
            let (mut client, stopped, calls) = (mesh.client(), stopped.clone(), calls.clone());
            tasks.spawn(async move {
                let mut failures = Vec::new();
                while !*stopped.borrow() {
                    let result = match shape {
                        0 => client
                            .unary(EchoRequest { message: "traffic".into(), ..Default::default() })
                            .await
                            .map(drop),
                        1 => {
                            async {
                                let request = EchoRequest { reply_count: 5, ..Default::default() };
                                let mut stream = client.server_stream(request).await?.into_inner();
                                while stream.message().await?.is_some() {}
                                Ok(())
                            }
                            .await
                        }
                        2 => {
                            let requests = (0..5).map(|_| EchoRequest::default());
                            client.client_stream(tokio_stream::iter(requests)).await.map(drop)
                        }
                        _ => {
                            async {
                                let requests =
                                    (0..3).map(|i| EchoRequest { message: i.to_string(), ..Default::default() });
                                let mut replies = client.bidi_stream(tokio_stream::iter(requests)).await?.into_inner();
                                while replies.message().await?.is_some() {}
                                Ok(())
                            }
                            .await
                        }
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(status) = result {
                        failures.push(format!("shape {shape}: {status:?}"));
                    }
                }
                failures
            });
        }
        let (mut client, mut stopped, counted) = (mesh.client(), stopped, calls.clone());
        tasks.spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut replies = match client.bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                Ok(replies) => replies.into_inner(),
                Err(status) => return vec![format!("long stream: {status:?}")],
            };
            let mut sequence = 0;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                }
                tx.send(EchoRequest { message: sequence.to_string(), ..Default::default() }).await.unwrap();
                match replies.message().await {
                    Ok(Some(reply)) if reply.sequence == sequence => sequence += 1,
                    other => return vec![format!("long stream at {sequence}: {other:?}")],
                }
            }
            drop(tx);
            counted.fetch_add(1, Ordering::Relaxed);
            match replies.message().await {
                Ok(None) => Vec::new(),
                other => vec![format!("long stream end: {other:?}")],
            }
        });
        Traffic { stop, tasks, calls }
    }

    /// Stops the traffic; the calls made and the failures seen.
    async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.send(true).unwrap();
        let mut failures = Vec::new();
        while let Some(task) = within("traffic stops", self.tasks.join_next()).await {
            failures.extend(task.unwrap());
        }
        (self.calls.load(Ordering::Relaxed), failures)
    }
}

/// Waits until `check` holds, at most a few seconds, and says how long it took.
async fn until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let bound = Duration::from_secs(5);
    while !check().await {
        assert!(started.elapsed() < bound, "not within {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

async fn config_json(addr: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&admin(addr, "GET", "/config", "").await.1).unwrap()
}

/// The grpc-timeout the backend saw on a fresh unary call.
async fn forwarded_timeout(mesh: &Mesh, probe: &str) -> Duration {
    within("probe", mesh.client().unary(EchoRequest { message: probe.into(), ..Default::default() })).await.unwrap();
    let seen = mesh.backend.header_of(probe, "grpc-timeout").expect("grpc-timeout forwarded");
    protomesh::grpc::parse_timeout(seen.as_bytes()).unwrap()
}

/// A call to `echo.v1.Echo/Shout`, which the echo backend does not implement.
async fn shout(mesh: &Mesh) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(mesh.channel());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoRequest>::default();
    let path = http::uri::PathAndQuery::from_static("/echo.v1.Echo/Shout");
    within("shout", grpc.unary(tonic::Request::new(EchoRequest::default()), path, codec)).await.unwrap_err()
}

/// The certificate the server sidecar presents to a new TLS connection.
async fn presented(mesh: &Mesh) -> Vec<u8> {
    let dir = mesh.dir.path();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let credentials = Credentials::from_pem(&read("client.pem"), &read("client-key.pem"), &read("ca.pem")).unwrap();
    let config = Identity::new(credentials).unwrap().client_config(ExpectedPeer::Id(id("server"))).unwrap();
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(ServerName::IpAddress(inbound.ip().into()), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// A direct call to the server sidecar's inbound port presenting `cert`, trusting `ca`.
async fn handshake_with(mesh: &Mesh, cert: &protomesh::identity::certs::IssuedCert, ca: &str) -> Result<(), String> {
    let credentials = Credentials::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), ca.as_bytes()).unwrap();
    let config = Arc::unwrap_or_clone(
        Identity::new(credentials).unwrap().client_config(ExpectedPeer::Id(id("server"))).unwrap(),
    );
    call_inbound_over_tls(mesh, config).await.map(drop)
}

#[tokio::test]
async fn under_continuous_calls_every_kind_of_change_is_taken_within_the_debounce_and_no_call_fails() {
    let scratch = tempfile::tempdir().unwrap();
    let mut configmap = ConfigMapDir::new(&scratch.path().join("contracts"), &as_refs(&contracts(ECHO_PROTO)));
    let mesh = Mesh::start_with(MeshOptions { proto_dir: Some(configmap.path()), ..Default::default() }).await;
    let traffic = Traffic::start(&mesh);
    let mut taken = Vec::new();

    // A method's timeout: the contract's 30s, then 5s from an override.
    assert!(forwarded_timeout(&mesh, "before").await > Duration::from_secs(20));
    mesh.edit_config("client", "policy: {}", "policy: {methods: {echo.v1.Echo/Unary: {timeout: 5s}}}");
    let mut probes = 0;
    taken.push(
        until("the new timeout", || {
            probes += 1;
            let probe = format!("probe {probes}");
            let mesh = &mesh;
            async move { forwarded_timeout(mesh, &probe).await <= Duration::from_secs(5) }
        })
        .await,
    );

    // A method added to the contract, as a ConfigMap update delivers it.
    let refused = shout(&mesh).await;
    assert!(refused.message().starts_with("protomesh outbound: method /echo.v1.Echo/Shout is not in"), "{refused:?}");
    let with_shout =
        ECHO_PROTO.replace("  rpc ServerStream(", "  rpc Shout(EchoRequest) returns (EchoReply);\n  rpc ServerStream(");
    configmap.update(&as_refs(&contracts(&with_shout)));
    taken.push(
        until("the new method reaches the app", || async {
            let status = shout(&mesh).await;
            status.code() == Code::Unimplemented && !status.message().starts_with("protomesh")
        })
        .await,
    );

    // Authorization: a rule for the new method that the client does not match.
    mesh.edit_config(
        "server",
        "authorization: {}",
        "authorization: {rules: [{name: nobody-shouts, methods: ['echo.v1.Echo/Shout'], callers: ['spiffe://x/y']}]}",
    );
    taken.push(
        until("the new rule", || async {
            let status = shout(&mesh).await;
            status.code() == Code::PermissionDenied && status.message().contains("\"nobody-shouts\"")
        })
        .await,
    );

    // The trust bundle and certificates rotated to a new CA: the new root is
    // trusted next to the old one, then the certificates are renewed from it,
    // then the old root goes.
    let old_ca = std::fs::read_to_string(mesh.dir.path().join("ca.pem")).unwrap();
    let new_ca = protomesh::identity::certs::DevCa::generate("the next CA").unwrap();
    let both = format!("{old_ca}{}", new_ca.cert_pem());
    std::fs::write(mesh.dir.path().join("ca.pem"), &both).unwrap();
    let old_client = mesh.ca().issue(&id("client")).unwrap();
    let new_client = new_ca.issue(&id("client")).unwrap();
    taken.push(
        until("the new root is trusted", || async { handshake_with(&mesh, &new_client, &both).await.is_ok() }).await,
    );
    for workload in ["client", "server"] {
        let renewed = new_ca.issue(&id(workload)).unwrap();
        std::fs::write(mesh.dir.path().join(format!("{workload}-key.pem")), &renewed.key_pem).unwrap();
        std::fs::write(mesh.dir.path().join(format!("{workload}.pem")), &renewed.cert_pem).unwrap();
    }
    let server_cert = der_of(&std::fs::read_to_string(mesh.dir.path().join("server.pem")).unwrap());
    taken.push(until("the renewed certificate is presented", || async { presented(&mesh).await == server_cert }).await);
    std::fs::write(mesh.dir.path().join("ca.pem"), new_ca.cert_pem()).unwrap();
    taken.push(
        until("the old root is no longer trusted", || async {
            handshake_with(&mesh, &old_client, &both).await.is_err()
        })
        .await,
    );
    handshake_with(&mesh, &new_client, new_ca.cert_pem()).await.expect("the new root still is");

    let (calls, failures) = traffic.stop().await;
    assert!(failures.is_empty(), "{} of {calls} calls failed: {failures:#?}", failures.len());
    assert!(calls > 20, "traffic flowed throughout: {calls} calls");
    let (_, metrics) = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await;
    assert!(sample(&metrics, r#"protomesh_config_reloads_total{result="applied"}"#).is_some_and(|n| n >= 3.0));
    println!("changes taken after {taken:?}");
}

#[tokio::test]
async fn an_invalid_config_or_contract_keeps_the_running_version_and_names_the_file_and_field() {
    let scratch = tempfile::tempdir().unwrap();
    let mut configmap = ConfigMapDir::new(&scratch.path().join("contracts"), &as_refs(&contracts(ECHO_PROTO)));
    let mesh = Mesh::start_with(MeshOptions {
        proto_dir: Some(configmap.path()),
        client_policy: "{methods: {echo.v1.Echo/Unary: {timeout: 3s}}}",
        watch: false,
        ..Default::default()
    })
    .await;
    let admin_addr = mesh.client_sidecar.admin_addr;
    let version = config_json(admin_addr).await["config"]["version"].clone();

    mesh.edit_config("client", "timeout: 3s", "timeout: soon");
    let path = mesh.config_path("client").display().to_string();
    let ReloadOutcome::Failed(error) = mesh.client_sidecar.reload().await else { panic!("the reload must fail") };
    assert!(error.starts_with(&format!("{path}: field `policy.methods")), "{error}");
    assert!(error.contains("`soon` is not a duration"), "{error}");
    assert!(forwarded_timeout(&mesh, "kept").await <= Duration::from_secs(3), "the running policy stays");
    let config = config_json(admin_addr).await;
    assert_eq!(config["config"]["version"], version);
    assert_eq!(config["reload"]["failures"], 1);
    assert!(config["reload"]["last_failure"]["error"].as_str().unwrap().contains("policy.methods"), "{config}");
    assert_eq!(admin(admin_addr, "GET", "/ready", "").await.0, 200, "a bad reload does not make the sidecar unready");
    let (status, body) = admin(admin_addr, "POST", "/reload", "").await;
    assert_eq!(status, 422);
    assert!(body.starts_with("the running version stays in service:") && body.contains(&path), "{body}");
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", "").await;
    assert_eq!(sample(&metrics, r#"protomesh_config_reloads_total{result="failed"}"#), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "protomesh_config_reload_failing "), Some(1.0), "{metrics}");

    mesh.edit_config("client", "timeout: soon", "timeout: 3s");
    assert_eq!(mesh.client_sidecar.reload().await, ReloadOutcome::Unchanged, "back to the running version");

    // A contract that does not compile: both sidecars keep the one they run.
    configmap.update(&as_refs(&contracts(&ECHO_PROTO.replace("message EchoReply {", "message EchoReply {{"))));
    let ReloadOutcome::Failed(error) = mesh.server_sidecar.reload().await else { panic!("the reload must fail") };
    assert!(error.starts_with("contracts: ") && error.contains("examples/echo.proto"), "{error}");
    within("calls go on", mesh.client().unary(EchoRequest::default())).await.unwrap();
    configmap.update(&as_refs(&contracts(ECHO_PROTO)));
    assert_eq!(mesh.server_sidecar.reload().await, ReloadOutcome::Unchanged, "the same contracts as before");
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", "").await;
    assert_eq!(
        sample(&metrics, "protomesh_config_reload_failing "),
        Some(0.0),
        "the files read as the running ones: {metrics}"
    );
    assert_eq!(config_json(admin_addr).await["reload"]["last_failure"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_bulkhead_keeps_its_places_across_a_reload_that_leaves_it_alone() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{methods: {echo.v1.Echo/ServerStream: {concurrency: {max_in_flight: 2}}}}",
        watch: false,
        ..Default::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let request = EchoRequest { reply_count: 1, delay_ms: 30_000, ..Default::default() };
        held.push(within("hold", mesh.client().server_stream(request)).await.unwrap().into_inner());
    }
    mesh.edit_config("client", "{methods: {", "{defaults: {timeout: 20s}, methods: {");
    assert_eq!(mesh.client_sidecar.reload().await, ReloadOutcome::Applied);
    let refused = within("refused", mesh.client().server_stream(EchoRequest::default())).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "the places stay taken: {refused:?}");

    // New limits make a new bulkhead; the calls in the old one keep their places there.
    mesh.edit_config("client", "max_in_flight: 2", "max_in_flight: 3");
    assert_eq!(mesh.client_sidecar.reload().await, ReloadOutcome::Applied);
    within("admitted", mesh.client().server_stream(EchoRequest::default())).await.expect("a new bulkhead has room");
    drop(held);
}

#[tokio::test]
async fn listeners_stay_until_a_restart_and_say_so() {
    let mesh = Mesh::start_with(MeshOptions { watch: false, ..Default::default() }).await;
    mesh.edit_config("client", "outbound: {listen: '127.0.0.1:0'", "outbound: {listen: '127.0.0.1:1'");
    assert_eq!(mesh.client_sidecar.reload().await, ReloadOutcome::Applied);
    let config = config_json(mesh.client_sidecar.admin_addr).await;
    let needed = config["reload"]["restart_needed"].as_array().unwrap();
    assert_eq!(needed.len(), 1, "{config}");
    assert!(needed[0].as_str().unwrap().starts_with("outbound.listen: 127.0.0.1:0 → 127.0.0.1:1"), "{config}");
    within("calls go on", mesh.client().unary(EchoRequest::default())).await.unwrap();
}

#[tokio::test]
async fn breaking_contract_changes_are_named_and_refused_when_the_config_says_so() {
    let scratch = tempfile::tempdir().unwrap();
    let mut configmap = ConfigMapDir::new(&scratch.path().join("contracts"), &as_refs(&contracts(ECHO_PROTO)));
    let mesh =
        Mesh::start_with(MeshOptions { proto_dir: Some(configmap.path()), watch: false, ..Default::default() }).await;
    mesh.edit_config("server", "contracts: {", "contracts: {breaking_changes: refuse, ");
    let without_bidi = ECHO_PROTO.replace("  rpc BidiStream(stream EchoRequest) returns (stream EchoReply);\n", "");
    configmap.update(&as_refs(&contracts(&without_bidi)));
    let ReloadOutcome::Failed(error) = mesh.server_sidecar.reload().await else { panic!("refused") };
    assert!(error.contains("echo.proto:10:1: method /echo.v1.Echo/BidiStream was deleted (RPC_NO_DELETE)"), "{error}");
    assert!(error.contains("contracts.breaking_changes: refuse"), "{error}");
    within("bidi still served", mesh.client().bidi_stream(tokio_stream::empty())).await.unwrap();

    // Allowed (the default), the change is taken and shown.
    assert_eq!(mesh.client_sidecar.reload().await, ReloadOutcome::Applied);
    let config = config_json(mesh.client_sidecar.admin_addr).await;
    let change = config["reload"]["breaking_changes"][0].as_str().unwrap();
    assert!(
        change.ends_with("echo.proto:10:1: method /echo.v1.Echo/BidiStream was deleted (RPC_NO_DELETE)"),
        "{config}"
    );
    let status = within("bidi gone", mesh.client().bidi_stream(tokio_stream::empty())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn without_a_watch_the_interval_rereads_everything() {
    let mesh = Mesh::start_with(MeshOptions { watch: false, reload_interval: "100ms", ..Default::default() }).await;
    mesh.edit_config("client", "policy: {}", "policy: {methods: {echo.v1.Echo/Unary: {timeout: 4s}}}");
    until("the interval takes the new timeout", || async {
        forwarded_timeout(&mesh, "interval").await <= Duration::from_secs(4)
    })
    .await;
}

#[tokio::test]
async fn a_renewed_certificate_for_another_identity_is_refused() {
    let mesh = Mesh::start_with(MeshOptions { watch: false, ..Default::default() }).await;
    let original = std::fs::read_to_string(mesh.dir.path().join("server.pem")).unwrap();
    let other = mesh.ca().issue(&id("other")).unwrap();
    std::fs::write(mesh.dir.path().join("server-key.pem"), &other.key_pem).unwrap();
    std::fs::write(mesh.dir.path().join("server.pem"), &other.cert_pem).unwrap();
    let ReloadOutcome::Failed(error) = mesh.server_sidecar.reload().await else { panic!("refused") };
    assert!(error.contains(&format!("the certificate is for {}", id("other"))), "{error}");
    assert_eq!(presented(&mesh).await, der_of(&original));
    within("calls go on", mesh.client().unary(EchoRequest::default())).await.unwrap();
}
