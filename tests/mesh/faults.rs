//! Faults between pods: two server pods (an echo backend behind its
//! sidecar each, one identity) and a client pod whose sidecar balances over
//! them, each pod a network namespace (see `pods.rs`). An upstream pod is
//! killed mid-stream and restarted, partitioned, or slowed. Retry-eligible
//! calls succeed, the others fail fast with the right status, no call
//! outlives its deadline, and outlier detection ejects the bad pod and lets
//! it back once it recovers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protomesh::app::{ConfigSource, Options, Sidecar};
use protomesh::identity::certs::write_dev_certs;
use protomesh_samples::echo::{EchoService, EchoStats};
use protomesh_samples::pb::echo::v1::EchoRequest;
use protomesh_samples::pb::echo::v1::echo_client::EchoClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request};

use crate::harness::{TRUST_DOMAIN, id, within};
use crate::pods::{self, Node, Pod};
use crate::telemetry::{admin, sample};

const INBOUND_PORT: u16 = 4143;

/// The certificates and contracts every pod reads.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let named = ["client", "server"].map(|w| (w.to_string(), id(w)));
        write_dev_certs(dir.path(), "fault CA", &named).unwrap();
        Files { dir }
    }

    /// A sidecar config for `workload`, with `rest` (YAML) appended.
    fn config(&self, workload: &str, rest: &str) -> PathBuf {
        let certs = self.dir.path().display();
        let yaml = format!(
            "service_name: {workload}\n\
             identity: {{cert: {certs}/{workload}.pem, key: {certs}/{workload}-key.pem, trust_bundle: {certs}/ca.pem}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{}/proto']}}\n\
             admin: {{listen: '127.0.0.1:0'}}\n\
             reload: {{watch: false, interval: 0s}}\n\
             drain_timeout: 1s\n\
             {rest}",
            env!("CARGO_MANIFEST_DIR"),
        );
        let path = self.dir.path().join(format!("{workload}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

/// A server pod's backend and sidecar, running until killed.
struct Running {
    stats: Arc<EchoStats>,
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    /// Starts the pod's backend and sidecar; blocks until they serve.
    fn start(pod: &Pod, config: &Path) -> Running {
        let (started, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let config = config.to_path_buf();
        let thread = pod.run(move || async move {
            let echo = EchoService::default();
            let stats = echo.stats.clone();
            let listener = TcpListener::bind("127.0.0.1:50051").await.unwrap();
            protomesh_samples::serve(Server::builder().add_service(echo.into_server()), listener).await;
            let sidecar = Sidecar::start(ConfigSource::file(config), Options::default()).await.unwrap();
            started.send(stats).unwrap();
            let _ = stopped.await;
            // Returning drops the runtime, and with it every socket of the pod, as a kill does.
            drop(sidecar);
        });
        let stats = ready.recv_timeout(Duration::from_secs(20)).expect("the server pod starts");
        Running { stats, stop, thread }
    }

    fn kill(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }

    fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::Relaxed)
    }
}

/// Runs blocking pod work (starting, killing) off the client pod's runtime,
/// which also runs the client sidecar.
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

/// Two server pods and a client pod on one node.
struct Cluster {
    files: Files,
    client: Pod,
    servers: [Pod; 2],
    _node: Node,
}

impl Cluster {
    fn new() -> Option<Cluster> {
        if let Some(why) = pods::unavailable() {
            eprintln!("skipped: faults between pods need network namespaces: {why}");
            return None;
        }
        let node = Node::new();
        let (client, servers) = (node.pod(), [node.pod(), node.pod()]);
        Some(Cluster { files: Files::new(), client, servers, _node: node })
    }

    /// Runs `test` in the client pod, with the client sidecar started, a
    /// client for it, its admin address, and the server pods (started).
    fn run<F>(self, test: impl FnOnce(Context) -> F + Send + 'static)
    where
        F: Future<Output = ()>,
    {
        let server_config = self.files.config(
            "server",
            &format!(
                "inbound: {{listen: '0.0.0.0:{INBOUND_PORT}', app: '127.0.0.1:50051'}}\n\
                 outbound: {{listen: '127.0.0.1:4140'}}\n"
            ),
        );
        // Unary calls retried on UNAVAILABLE, an endpoint ejected at its first
        // failure for a second (the balancer may well avoid a bad pod before a
        // second failure), dead connections found by keepalive within 600 ms.
        let endpoints: Vec<String> =
            self.servers.iter().map(|pod| format!("'{}:{INBOUND_PORT}'", pod.address)).collect();
        let client_config = self.files.config(
            "client",
            &format!(
                "outbound: {{listen: '127.0.0.1:4140', connect_timeout: 300ms, upstreams: [{{services: [echo.v1.Echo], \
                 endpoints: [{}], identity: 'spiffe://{TRUST_DOMAIN}/ns/test/sa/server'}}]}}\n\
                 policy: {{defaults: {{retry: {{max_attempts: 3, retryable_codes: [UNAVAILABLE]}}}}, \
                 outlier_detection: {{consecutive_failures: 1, base_ejection: 1s}}}}\n\
                 limits: {{keepalive_interval: 200ms, keepalive_timeout: 400ms}}\n",
                endpoints.join(", ")
            ),
        );
        let servers = self.servers.clone();
        let finished = self.client.run(move || async move {
            let running = servers.iter().map(|pod| Some(Running::start(pod, &server_config))).collect();
            let sidecar = Sidecar::start(ConfigSource::file(client_config), Options::default()).await.unwrap();
            let channel = Channel::from_shared(format!("http://{}", sidecar.outbound_addr)).unwrap().connect_lazy();
            let context = Context {
                client: EchoClient::new(channel),
                admin: sidecar.admin_addr,
                servers,
                server_config,
                running,
            };
            test(context).await;
        });
        let outcome = finished.join();
        drop(self);
        outcome.expect("the test in the client pod passes");
    }
}

/// What a test in the client pod has at hand.
struct Context {
    client: EchoClient<Channel>,
    admin: SocketAddr,
    servers: [Pod; 2],
    server_config: PathBuf,
    running: Vec<Option<Running>>,
}

impl Context {
    async fn kill(&mut self, server: usize) {
        let running = self.running[server].take().expect("running");
        off_runtime(move || running.kill()).await;
    }

    async fn restart(&mut self, server: usize) {
        let (pod, config) = (self.servers[server].clone(), self.server_config.clone());
        self.running[server] = Some(off_runtime(move || Running::start(&pod, &config)).await);
    }

    fn stats(&self, server: usize) -> Arc<EchoStats> {
        self.running[server].as_ref().expect("running").stats.clone()
    }

    fn calls(&self, server: usize) -> u64 {
        self.running[server].as_ref().map_or(0, Running::calls)
    }

    /// A unary call with `deadline`: how it ended and how long it took.
    async fn unary(&mut self, deadline: Duration, payload: usize) -> (Code, Duration) {
        let mut request = Request::new(EchoRequest { payload: vec![1; payload].into(), ..Default::default() });
        request.set_timeout(deadline);
        let started = Instant::now();
        let code = match self.client.unary(request).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        (code, started.elapsed())
    }

    /// Calls until the backend of `server` has served one, within the bound.
    async fn until_served_by(&mut self, server: usize) {
        let stats = self.stats(server);
        let before = stats.calls.load(Ordering::Relaxed);
        within("calls reaching the recovered pod", async {
            while stats.calls.load(Ordering::Relaxed) == before {
                let _ = self.unary(Duration::from_secs(2), 10).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    async fn ejections(&self) -> f64 {
        let metrics = admin(self.admin, "GET", "/metrics", "").await.1;
        metrics.lines().filter_map(|line| sample(line, "protomesh_endpoint_ejections_total")).sum()
    }

    /// The deadline is kept: every call ends by it, with a little slack for the machine.
    fn within_deadline(took: Duration, deadline: Duration) {
        assert!(took < deadline + Duration::from_millis(500), "a call with a {deadline:?} deadline took {took:?}");
    }
}

#[test]
fn a_pod_killed_mid_stream_fails_its_stream_fast_and_calls_go_elsewhere_until_it_is_back() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.run(|mut pods| async move {
        let mut request = Request::new(EchoRequest { reply_count: 1000, delay_ms: 20, ..Default::default() });
        request.set_timeout(Duration::from_secs(30));
        let mut stream = pods.client.server_stream(request).await.unwrap().into_inner();
        stream.message().await.unwrap().expect("the stream is under way");
        let carrier = (0..2).find(|&s| pods.calls(s) == 1).expect("one pod carries the stream");
        pods.kill(carrier).await;

        // Not retry-eligible (its response had begun): it fails at once, UNAVAILABLE.
        let started = Instant::now();
        let ended = loop {
            match within("the broken stream's end", stream.message()).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a stream cut by a dead pod ended as if complete"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "failed fast, not at its deadline");

        // Retry-eligible unary calls all succeed, on the pod that lives.
        for _ in 0..30 {
            let (code, took) = pods.unary(Duration::from_secs(2), 10).await;
            assert_eq!(code, Code::Ok);
            Context::within_deadline(took, Duration::from_secs(2));
        }
        assert!(pods.ejections().await >= 1.0, "the dead pod's endpoint was ejected");

        pods.restart(carrier).await;
        pods.until_served_by(carrier).await;
    });
}

#[test]
fn a_partitioned_pod_holds_no_call_past_its_deadline_and_is_ejected_until_healed() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.run(|mut pods| async move {
        for _ in 0..10 {
            assert_eq!(pods.unary(Duration::from_secs(2), 10).await.0, Code::Ok);
        }
        pods.servers[0].partition();
        // Calls eight at a time, so that the balancer sends some to the cut
        // pod: those on its connection wait for their deadline until keepalive
        // finds the connection dead, and new connections to it time out, so
        // the call goes to the other pod. The cut pod is ejected meanwhile.
        let deadline = Duration::from_secs(1);
        let mut rounds = Vec::new();
        for _ in 0..4 {
            let calls = (0..8).map(|_| {
                let mut pods = pods.client.clone();
                async move {
                    let mut request = Request::new(EchoRequest::default());
                    request.set_timeout(deadline);
                    let started = Instant::now();
                    let code = pods.unary(request).await.map_or_else(|status| status.code(), |_| Code::Ok);
                    Context::within_deadline(started.elapsed(), deadline);
                    code
                }
            });
            rounds.push(futures_util::future::join_all(calls).await);
        }
        let codes = rounds.concat();
        assert!(codes.iter().all(|code| matches!(code, Code::Ok | Code::DeadlineExceeded)), "{rounds:?}");
        assert!(rounds[3].iter().all(|code| *code == Code::Ok), "{rounds:?}");
        assert!(pods.ejections().await >= 1.0, "the partitioned pod's endpoint was ejected: {rounds:?}");

        pods.servers[0].heal();
        pods.until_served_by(0).await;
    });
}

#[test]
fn a_slow_lossy_pod_gets_fewer_calls_and_none_past_its_deadline() {
    let Some(cluster) = Cluster::new() else { return };
    cluster.run(|mut pods| async move {
        for _ in 0..10 {
            assert_eq!(pods.unary(Duration::from_secs(2), 10).await.0, Code::Ok);
        }
        pods.servers[0].slow("64kbit", 10);
        let (slow_before, fast_before) = (pods.calls(0), pods.calls(1));
        let deadline = Duration::from_secs(2);
        for _ in 0..40 {
            let (code, took) = pods.unary(deadline, 4096).await;
            Context::within_deadline(took, deadline);
            assert!(matches!(code, Code::Ok | Code::DeadlineExceeded), "{code:?}");
        }
        let (slow, fast) = (pods.calls(0) - slow_before, pods.calls(1) - fast_before);
        assert!(fast > slow, "the balancer prefers the fast pod: {fast} calls there, {slow} to the slow one");
        pods.servers[0].heal();
    });
}
