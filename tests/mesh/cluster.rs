//! A small cluster of pods made of network namespaces (`pods.rs`) for the
//! capture tests: a server pod and a client pod, both meshed and captured
//! (each pod's rules installed by `protomesh init`, its sidecar a process
//! running as the sidecar's user, its app unmodified), a Service in front of
//! the server pod, a pod outside the mesh, and on request a third meshed pod.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use protomesh::identity::certs::write_dev_certs;
use protomesh_samples::echo::EchoService;
use protomesh_samples::pb::echo::v1::EchoRequest;
use protomesh_samples::pb::echo::v1::echo_client::EchoClient;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Server};

use crate::harness::{TRUST_DOMAIN, id};
use crate::pods::{self, Node, Pod};
use crate::telemetry::{admin, sample};

pub const APP_PORT: u16 = 50051;
/// The server app's second port, permissive for plaintext clients.
pub const PERMISSIVE_PORT: u16 = 50052;
/// Ports of the TCP server outside the mesh: one captured, one skipped.
pub const TCP_PORT: u16 = 7000;
pub const SKIPPED_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 8080;
/// A gRPC server outside the mesh.
pub const OUTSIDE_GRPC_PORT: u16 = 9000;
/// The server app's HTTP health port, for its kubelet probe.
pub const HEALTH_PORT: u16 = 8081;
pub const ADMIN: &str = "127.0.0.1:4191";

/// A node with a server pod and a client pod, both meshed and captured, a
/// Service in front of the server pod, and a pod outside the mesh.
pub struct Cluster {
    pub node: Node,
    pub client: Pod,
    pub server: Pod,
    pub outside: Pod,
    /// A third meshed pod, when the setup asks for one.
    pub peer: Option<Pod>,
    pub service: SocketAddr,
    /// A Service in front of the server pod's TCP echo.
    pub tcp_service: SocketAddr,
    /// The server's, the client's, then the peer's sidecar, and its log.
    pub sidecars: Vec<(Child, PathBuf)>,
    /// The server app's gRPC health, which its readiness probe reads.
    pub health: tonic_health::server::HealthReporter,
    pub files: tempfile::TempDir,
}

/// How a test's cluster differs from the others'.
#[derive(Default)]
pub struct Setup<'a> {
    /// `protomesh init`'s arguments in the client pod.
    pub client_init: &'a [&'a str],
    /// Variables the server's sidecar gets besides its config file.
    pub server_env: Vec<(String, String)>,
    /// The client sidecar's `outbound` section, if not an upstream for the Service.
    pub client_outbound: Option<String>,
    /// Where the client sidecar's outbound listens, if not on `127.0.0.1:4140`.
    pub client_listen: Option<&'a str>,
    /// More of the client sidecar's config (an `inbound` section, `limits`).
    pub client_config: String,
    /// The server sidecar's `inbound` section, if not strict with [`PERMISSIVE_PORT`] permissive.
    pub server_inbound: Option<String>,
    /// More of the server sidecar's config.
    pub server_config: String,
    /// A third meshed pod, `peer`, whose sidecar has this `outbound` section.
    pub peer_outbound: Option<String>,
}

impl Cluster {
    pub fn start(setup: Setup) -> Option<Cluster> {
        if let Some(why) = pods::unavailable() {
            eprintln!("skipped: capture needs network namespaces: {why}");
            return None;
        }
        let node = Node::new();
        let (client, server, outside) = (node.pod(), node.pod(), node.pod());
        let peer = setup.peer_outbound.as_ref().map(|_| node.pod());
        let service = node.service(APP_PORT, &[&server]);
        let tcp_service = node.service(TCP_PORT, &[&server]);
        let files = tempfile::tempdir().unwrap();
        let sidecar = sidecar_files(files.path(), &["client", "server", "peer"]);
        let (health, reported) = std::sync::mpsc::channel();
        server.run(move || async move {
            let (reporter, health_service) = tonic_health::server::health_reporter();
            health.send(reporter).unwrap();
            for port in [APP_PORT, PERMISSIVE_PORT] {
                let listener = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
                let router = Server::builder()
                    .add_service(EchoService::default().into_server())
                    .add_service(health_service.clone());
                protomesh_samples::serve(router, listener).await;
            }
            tokio::spawn(tcp_echo(TcpListener::bind(("0.0.0.0", TCP_PORT)).await.unwrap()));
            http1_echo(TcpListener::bind(("0.0.0.0", HEALTH_PORT)).await.unwrap()).await
        });
        let health = reported.recv().unwrap();
        outside.run(|| async {
            for port in [TCP_PORT, SKIPPED_PORT] {
                tokio::spawn(tcp_echo(TcpListener::bind(("0.0.0.0", port)).await.unwrap()));
            }
            let listener = TcpListener::bind(("0.0.0.0", OUTSIDE_GRPC_PORT)).await.unwrap();
            protomesh_samples::serve(Server::builder().add_service(EchoService::default().into_server()), listener)
                .await;
            http1_echo(TcpListener::bind(("0.0.0.0", HTTP_PORT)).await.unwrap()).await
        });

        let server_inbound = setup.server_inbound.unwrap_or_else(|| {
            format!("{{listen: '0.0.0.0:4143', mtls: {{mode: strict, ports: {{{PERMISSIVE_PORT}: permissive}}}}}}")
        });
        let server_config =
            config(files.path(), "server", &format!("inbound: {server_inbound}\n{}", setup.server_config));
        let outbound = setup.client_outbound.unwrap_or_else(|| {
            format!(
                "{{listen: '{}', upstreams: [{{services: [echo.v1.Echo], endpoints: ['{service}'], \
                 identity: 'spiffe://{TRUST_DOMAIN}/ns/test/sa/server'}}]}}",
                setup.client_listen.unwrap_or("127.0.0.1:4140")
            )
        });
        let client_config = config(files.path(), "client", &format!("outbound: {outbound}\n{}", setup.client_config));
        let peer_config =
            setup.peer_outbound.map(|outbound| config(files.path(), "peer", &format!("outbound: {outbound}\n")));
        let mut sidecars = Vec::new();
        let no_env = Vec::new();
        let mut meshed = vec![
            (&server, &server_config, &[][..], &setup.server_env),
            (&client, &client_config, setup.client_init, &no_env),
        ];
        if let (Some(peer), Some(config)) = (&peer, &peer_config) {
            meshed.push((peer, config, &[][..], &no_env));
        }
        for (pod, config, init, env) in meshed {
            sidecars.push(start_sidecar(pod, &sidecar, config, init, env, files.path()));
        }
        let cluster = Cluster { node, client, server, outside, peer, service, tcp_service, sidecars, health, files };
        let meshed = [Some(&cluster.server), Some(&cluster.client), cluster.peer.as_ref()];
        for (pod, (_, log)) in meshed.into_iter().flatten().zip(&cluster.sidecars) {
            await_ready(pod, log);
        }
        Some(cluster)
    }

    /// Runs `test` in the client pod, as its app.
    pub fn in_client<F, T>(&self, test: impl FnOnce() -> F + Send + 'static) -> T
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        self.client.run(test).join().unwrap_or_else(|_| panic!("failed; {}", self.logs()))
    }

    /// Waits until `series` of `pod`'s sidecar reads `expected`: a
    /// connection is counted once both its sides have closed, just after the
    /// client has seen its end.
    pub fn await_metric(&self, pod: &Pod, series: &str, expected: f64) {
        let wanted = series.to_string();
        let read = pod.run(move || async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let (_, metrics) = admin(ADMIN.parse().unwrap(), "GET", "/metrics", "").await;
                let value = sample(&metrics, &wanted).unwrap_or(0.0);
                if value == expected || Instant::now() > deadline {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        assert_eq!(read.join().unwrap(), expected, "{series}; {}", self.logs());
    }

    pub fn logs(&self) -> String {
        let logs = self.sidecars.iter().map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default());
        format!("the sidecars' logs:\n{}", logs.collect::<Vec<_>>().join("\n---\n"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (sidecar, _) in &mut self.sidecars {
            let _ = sidecar.kill();
            let _ = sidecar.wait();
        }
    }
}

/// Writes into `dir` what meshed pods' sidecars read (the `workloads`'
/// certificates, the protos), readable by the sidecar's user; returns the
/// binary that user can run.
pub fn sidecar_files(dir: &Path, workloads: &[&str]) -> PathBuf {
    let named: Vec<_> = workloads.iter().map(|w| (w.to_string(), id(w))).collect();
    write_dev_certs(dir, "capture CA", &named).unwrap();
    // The sidecars run as their own user, which must read these, and
    // may not reach into the checkout.
    for proto in ["examples/echo.proto", "protomesh/v1/options.proto"] {
        let to = dir.join("proto").join(proto);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("proto").join(proto), to).unwrap();
    }
    let sidecar = dir.join("protomesh");
    if !pods::proxy_user_can_run(Path::new(env!("CARGO_BIN_EXE_protomesh"))) {
        std::fs::hard_link(env!("CARGO_BIN_EXE_protomesh"), &sidecar)
            .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_protomesh"), &sidecar).map(drop))
            .unwrap();
    }
    make_readable(dir);
    if sidecar.exists() { sidecar } else { PathBuf::from(env!("CARGO_BIN_EXE_protomesh")) }
}

/// Installs `protomesh init`'s rules (with `init`) in `pod` and starts its
/// sidecar with `config` and `env`; returns it and its log, in `dir`.
pub fn start_sidecar(
    pod: &Pod,
    binary: &Path,
    config: &Path,
    init: &[&str],
    env: &[(String, String)],
    dir: &Path,
) -> (Child, PathBuf) {
    let output = pod.init(init);
    assert!(output.status.success(), "protomesh init: {}", String::from_utf8_lossy(&output.stderr));
    let log = dir.join(format!("{}.log", pod.name));
    (pod.sidecar(binary, config, env, &log), log)
}

/// Waits until the sidecar of `pod` answers ready, failing with its log if it does not start.
pub fn await_ready(pod: &Pod, log: &Path) {
    let log = log.to_path_buf();
    let ready = pod.run(|| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(ADMIN).await.is_err() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(Instant::now() < deadline, "the sidecar did not start; its log:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(admin(ADMIN.parse().unwrap(), "GET", "/ready", "").await.0, 200);
    });
    ready.join().expect("the sidecar becomes ready");
}

pub fn config(dir: &Path, workload: &str, rest: &str) -> PathBuf {
    let certs = dir.display();
    let yaml = format!(
        "service_name: {workload}\n\
         identity: {{cert: {certs}/{workload}.pem, key: {certs}/{workload}-key.pem, trust_bundle: {certs}/ca.pem}}\n\
         contracts: {{protos: [examples/echo.proto], include: ['{certs}/proto']}}\n\
         admin: {{listen: '0.0.0.0:4191'}}\n\
         reload: {{watch: false, interval: 0s}}\n\
         drain_timeout: 1s\n\
         {rest}"
    );
    let path = dir.join(format!("{workload}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// Lets every user read `dir` and what is in it.
pub fn make_readable(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            make_readable(&path);
        } else if !path.ends_with("protomesh") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Echoes each connection's bytes as they come; once the client has finished
/// sending, adds `bytes=N` and closes. So a lost half-close hangs the client.
pub async fn tcp_echo(listener: TcpListener) {
    loop {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let (mut read, mut write) = tcp.split();
            let echoed = tokio::io::copy(&mut read, &mut write).await.unwrap();
            write.write_all(format!("bytes={echoed}").as_bytes()).await.unwrap();
            write.shutdown().await.unwrap();
        });
    }
}

/// An HTTP/1.1 server that answers each request with its method, path and body.
pub async fn http1_echo(listener: TcpListener) {
    use http_body_util::{BodyExt, Full};
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
            let head = format!("{} {} ", request.method(), request.uri().path());
            let body = request.into_body().collect().await?.to_bytes();
            let answer = [head.as_bytes(), &body].concat();
            Ok::<_, hyper::Error>(http::Response::new(Full::new(bytes::Bytes::from(answer))))
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
        );
    }
}

pub fn echo_client(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
}

pub fn request(message: &str) -> EchoRequest {
    EchoRequest { message: message.into(), ..Default::default() }
}

/// Watches every frame in the node's namespace from when it returns until
/// stopped, and what is still queued then; returns the bytes seen.
pub fn sniff(node: &Node) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<u8>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let (listening, ready) = std::sync::mpsc::channel();
    let seen = node.run(move || {
        // SAFETY: plain socket calls on a descriptor this thread owns and closes.
        unsafe {
            let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol);
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size);
            // Room for a burst of frames while this thread is not scheduled.
            let buffer: libc::c_int = 16 << 20;
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&raw const buffer).cast(), size);
            listening.send(()).unwrap();
            let mut seen = Vec::new();
            let mut frame = vec![0u8; 65536];
            while seen.len() < 256 << 20 {
                let n = libc::recv(fd, frame.as_mut_ptr().cast(), frame.len(), 0);
                if n > 0 {
                    seen.extend_from_slice(&frame[..n as usize]);
                } else if stopped.load(Ordering::Acquire) {
                    // Stopped, and nothing more queued.
                    break;
                }
            }
            libc::close(fd);
            seen
        }
    });
    ready.recv().unwrap();
    (stop, seen)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

pub const OUTBOUND_OPAQUE: &str = "protomesh_opaque_connections_total{direction=\"outbound\",result=\"done\"}";
pub const INBOUND_OPAQUE: &str = "protomesh_opaque_connections_total{direction=\"inbound\",result=\"done\"}";

pub const PLAINTEXT_REFUSED: &str = "protomesh_tls_handshakes_total{direction=\"inbound\",result=\"plaintext_http2\"}";

/// A plaintext client refused by a strict sidecar, which answers its call
/// with PERMISSION_DENIED naming the port's mode.
pub fn assert_refused(status: tonic::Status) {
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("takes only mTLS from meshed workloads (inbound.mtls: strict)"), "{status:?}");
}
