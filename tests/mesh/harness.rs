//! A two-sidecar mesh on 127.0.0.1: an echo backend behind the "server"
//! workload's sidecar, and the "client" workload's sidecar routing
//! `echo.v1.Echo` to it over mTLS. Every piece is real: sockets, certificates,
//! TLS handshakes, HTTP/2.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protomesh::app::{ConfigSource, Options, Sidecar};
use protomesh::identity::certs::{DevCa, write_dev_certs};
use protomesh::identity::{Credentials, ExpectedPeer, Identity, SpiffeId};
use protomesh_samples::echo::{EchoService, EchoStats};
use protomesh_samples::pb::echo::v1::echo_client::EchoClient;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};

pub const TRUST_DOMAIN: &str = "test.protomesh.local";

pub fn id(workload: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/test/sa/{workload}")).unwrap()
}

pub struct MeshOptions {
    /// YAML for the server sidecar's `inbound.authorization`.
    pub authorization: &'static str,
    /// The identity the client sidecar demands of the server (default: the server's).
    pub expected_server: SpiffeId,
    /// YAML for each sidecar's `policy` section.
    pub client_policy: &'static str,
    pub server_policy: &'static str,
    /// YAML for both sidecars' `tracing` section.
    pub tracing: String,
    /// How many server workloads (each an echo backend behind its own sidecar).
    pub servers: usize,
    /// Replaces the echo backend, e.g. with a raw HTTP/2 server.
    pub app: Option<SocketAddr>,
    /// Replaces the server sidecar's address in the client's route: a
    /// comma-separated list where `{server}` stands for its inbound port and
    /// `{every_server}` for every server sidecar's address.
    pub upstream_endpoint: Option<String>,
    /// Each sidecar's `worker_threads`.
    pub worker_threads: usize,
    /// Where both sidecars find their contracts (default: the repository's `proto/`).
    pub proto_dir: Option<String>,
    /// Each sidecar's `reload.watch`: on by default; off for tests that reload by hand.
    pub watch: bool,
    /// Each sidecar's `admin.listen`.
    pub admin_listen: &'static str,
    /// Each sidecar's `reload.interval`; by default `0s`, so that only the
    /// watch on the files' directories reloads.
    pub reload_interval: &'static str,
    /// YAML for each sidecar's `limits` section.
    pub limits: &'static str,
    /// YAML for the server sidecar's `inbound.web`, if any.
    pub web: Option<&'static str>,
    /// Each sidecar's `access_log`.
    pub access_log: bool,
    /// Each sidecar's `contracts.protos` and `contracts.mode`.
    pub protos: &'static str,
    pub contracts_mode: &'static str,
    /// YAML fields added to the client's upstream, e.g. `health_check: {...}`.
    pub upstream_settings: &'static str,
    /// Each echo backend also serves `grpc.health.v1` (see `Mesh::health`).
    pub app_health: bool,
    /// More of the client sidecar's config, e.g. a `kubernetes` section.
    pub client_config: String,
    /// Each server's workload, whose certificate it presents (past the list: `server`).
    pub server_workloads: &'static [&'static str],
    /// Whether the client's upstream names the identity every endpoint presents.
    pub upstream_identity: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            authorization: "{}",
            expected_server: id("server"),
            client_policy: "{}",
            server_policy: "{}",
            servers: 1,
            tracing: "{}".into(),
            app: None,
            upstream_endpoint: None,
            worker_threads: 1,
            proto_dir: None,
            watch: true,
            admin_listen: "127.0.0.1:0",
            reload_interval: "0s",
            limits: "{}",
            web: None,
            access_log: false,
            protos: "[examples/echo.proto, examples/shop.proto]",
            contracts_mode: "strict",
            upstream_settings: "",
            app_health: false,
            client_config: String::new(),
            server_workloads: &["server"],
            upstream_identity: true,
        }
    }
}

/// Whether curl is here to call with; a test without it says it skipped.
pub fn has_curl() -> bool {
    let found = std::process::Command::new("curl").arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: curl is not installed (apt-get install curl)");
    }
    found
}

pub struct Mesh {
    pub dir: TempDir,
    /// The first server's backend.
    pub backend: Arc<EchoStats>,
    /// Every server's backend, when `MeshOptions::servers` is above one.
    pub backends: Vec<Arc<EchoStats>>,
    /// Each backend's `grpc.health.v1` status, with `MeshOptions::app_health`.
    pub health: Vec<tonic_health::server::HealthReporter>,
    pub client_sidecar: Sidecar,
    /// The first server's sidecar.
    pub server_sidecar: Sidecar,
    _other_servers: Vec<Sidecar>,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Mesh::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(options: MeshOptions) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let named = ["client", "server", "other"].map(|w| (w.to_string(), id(w)));
        write_dev_certs(dir.path(), "test CA", &named).unwrap();

        let (mut backends, mut health) = (Vec::new(), Vec::new());
        let mut servers = Vec::new();
        for _ in 0..options.servers.max(1) {
            let echo = EchoService::default();
            backends.push(echo.stats.clone());
            let app = match options.app {
                Some(app) => app,
                None => {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let (reporter, health_service) = tonic_health::server::health_reporter();
                    let router = Server::builder()
                        .add_service(echo.into_server())
                        .add_optional_service(options.app_health.then_some(health_service));
                    health.push(reporter);
                    protomesh_samples::serve(router, listener).await
                }
            };
            let web = options.web.map_or(String::new(), |web| format!(", web: {web}"));
            let inbound =
                format!("{{listen: '127.0.0.1:0', app: '{app}', authorization: {}{web}}}", options.authorization);
            let policy = options.server_policy;
            // Each server's own file: a reload rereads it, so servers sharing one would take the last one's app.
            let file = if servers.is_empty() { "server".to_string() } else { format!("server-{}", servers.len()) };
            let workload = options.server_workloads.get(servers.len()).copied().unwrap_or("server");
            servers.push(sidecar(&dir, (workload, &file), "[]", Some(&inbound), policy, &options).await);
        }
        let every_server = servers.iter().map(|s| s.inbound_addr.unwrap().to_string()).collect::<Vec<_>>().join(",");
        let server_sidecar = servers.remove(0);
        let server_inbound = server_sidecar.inbound_addr.unwrap();
        let endpoint = options
            .upstream_endpoint
            .as_deref()
            .unwrap_or(&every_server)
            .replace("{every_server}", &every_server)
            .replace("{server}", &server_inbound.port().to_string())
            .split(',')
            .map(|e| format!("'{e}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let identity = match options.upstream_identity {
            true => format!("identity: '{}', ", options.expected_server),
            false => String::new(),
        };
        let upstreams =
            format!("[{{services: [echo.v1.Echo], endpoints: [{endpoint}], {identity}{}}}]", options.upstream_settings);
        let client_sidecar =
            sidecar(&dir, ("client", "client"), &upstreams, None, options.client_policy, &options).await;
        let backend = backends[0].clone();
        Mesh { dir, backend, backends, health, client_sidecar, server_sidecar, _other_servers: servers }
    }

    /// Every server sidecar's inbound address, the first server's first.
    pub fn server_inbounds(&self) -> Vec<SocketAddr> {
        let servers = std::iter::once(&self.server_sidecar).chain(&self._other_servers);
        servers.map(|server| server.inbound_addr.unwrap()).collect()
    }

    /// A channel to the client workload's outbound sidecar, as its app would open it.
    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.client_sidecar.outbound_addr)).unwrap().connect_lazy()
    }

    pub fn client(&self) -> EchoClient<Channel> {
        EchoClient::new(self.channel()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
    }

    /// An HTTP/1.1 request to the server sidecar's `inbound.web` listener,
    /// with Host `shop.test`: (status, headers, body).
    pub async fn web_request(
        &self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<bytes::Bytes>,
    ) -> (http::StatusCode, http::HeaderMap, Vec<u8>) {
        use http_body_util::{BodyExt, Full};
        let addr = self.server_sidecar.web_addr.expect("the web listener");
        within("a call to the web listener", async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(tcp);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            let mut request = http::Request::builder().method(method).uri(path).header("host", "shop.test");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = sender.send_request(request.body(Full::new(body.into())).unwrap()).await.unwrap();
            let (head, body) = response.into_parts();
            (head.status, head.headers, body.collect().await.unwrap().to_bytes().to_vec())
        })
        .await
    }

    pub fn ca(&self) -> DevCa {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap();
        DevCa::read(read("ca.pem"), read("ca-key.pem")).unwrap()
    }

    /// An mTLS connection straight to the server sidecar's inbound port, as
    /// the sidecar of `workload` would open it.
    pub async fn connect_inbound(&self, workload: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let read = |name: String| std::fs::read(self.dir.path().join(name)).unwrap();
        let credentials = Credentials::from_pem(
            &read(format!("{workload}.pem")),
            &read(format!("{workload}-key.pem")),
            &read("ca.pem".into()),
        )
        .unwrap();
        let tls = Identity::new(credentials).unwrap().client_config(ExpectedPeer::Id(id("server"))).unwrap();
        let inbound = self.server_sidecar.inbound_addr.unwrap();
        let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(inbound.ip().into());
        within("a TLS handshake with the inbound port", tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
            .await
            .unwrap()
    }

    pub fn calls(&self) -> u64 {
        self.backend.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The config file a workload's sidecar runs from.
    pub fn config_path(&self, workload: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{workload}.yaml"))
    }

    /// Rewrites a workload's config file, replacing `from` with `to`.
    pub fn edit_config(&self, workload: &str, from: &str, to: &str) {
        let path = self.config_path(workload);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{workload}.yaml has no `{from}`:\n{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
}

/// Starts one sidecar from a YAML config in `<file>.yaml`, through the same loader `protomesh run` uses.
async fn sidecar(
    dir: &TempDir,
    (workload, file): (&str, &str),
    upstreams: &str,
    inbound: Option<&str>,
    policy: &str,
    options: &MeshOptions,
) -> Sidecar {
    let certs = dir.path().display();
    let mut yaml = format!(
        "service_name: {workload}\n\
         identity: {{cert: {certs}/{workload}.pem, key: {certs}/{workload}-key.pem, trust_bundle: {certs}/ca.pem}}\n\
         contracts: {{protos: {}, include: ['{}'], mode: {}}}\n\
         outbound: {{listen: '127.0.0.1:0', upstreams: {upstreams}}}\n\
         admin: {{listen: '{}'}}\n\
         policy: {policy}\n\
         tracing: {}\n\
         worker_threads: {}\n\
         reload: {{watch: {}, debounce: 20ms, interval: {}}}\n\
         limits: {}\n\
         drain_timeout: 1s\n",
        options.protos,
        options.proto_dir.clone().unwrap_or_else(|| format!("{}/proto", env!("CARGO_MANIFEST_DIR"))),
        options.contracts_mode,
        options.admin_listen,
        options.tracing,
        options.worker_threads,
        options.watch,
        options.reload_interval,
        options.limits,
    );
    yaml.push_str(&format!("access_log: {}\n", options.access_log));
    if let Some(inbound) = inbound {
        yaml.push_str(&format!("inbound: {inbound}\n"));
    }
    if workload == "client" {
        yaml.push_str(&options.client_config);
    }
    let path = dir.path().join(format!("{file}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    Sidecar::start(ConfigSource::file(path), Options::default()).await.unwrap()
}

/// Bounds every wait in a test: a hang fails instead of stalling the suite.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), future).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}
