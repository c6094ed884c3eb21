//! Kubernetes discovery, measured: release sidecars (processes of their own,
//! as in a pod) against the test suite's API server (`tests/mesh/apiserver.rs`,
//! run in this process, since no kube-apiserver can be installed here), each
//! sidecar watching Services named by a `k8s://` upstream. Prints a Markdown
//! section for `bench/RESULTS.md` (`bench/bench.py` runs it and adds it):
//! memory per watched Service and per 1,000 endpoints, CPU per API event,
//! time from an API write to the routing change, and the API server's
//! requests and watches for 100 pods calling 10 Services.
//!
//! Usage: discovery PROTOMESH_BINARY REPO

#[allow(dead_code)]
#[path = "../tests/mesh/apiserver.rs"]
mod apiserver;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use protomesh::identity::SpiffeId;
use protomesh::identity::certs::write_dev_certs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE: &str = "bench";
const PORT: u16 = 7070;
/// Endpoints per EndpointSlice, as the EndpointSlice controller fills them.
const PER_SLICE: usize = 100;

struct Setup {
    binary: PathBuf,
    repo: PathBuf,
    work: tempfile::TempDir,
    kubeconfig: PathBuf,
    api: Arc<ApiServer>,
}

/// A sidecar process and its admin address.
struct Sidecar {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// User and system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_secs_f64(ticks as f64 / per_second as f64)
    }

    /// The endpoints its upstream routes to now.
    async fn endpoints(&self) -> Vec<String> {
        let config: serde_json::Value = serde_json::from_str(&get(self.admin, "/config").await).unwrap();
        let upstreams = config["outbound"]["upstreams"].as_array().cloned().unwrap_or_default();
        let endpoints = upstreams.iter().flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default());
        endpoints.map(|e| e["address"].as_str().unwrap().to_string()).collect()
    }

    /// Waits until its upstream routes to `count` endpoints, up to 60 s.
    async fn await_endpoints(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self.endpoints().await.len();
            if found == count {
                return;
            }
            assert!(Instant::now() < deadline, "{found} endpoints of {count} after 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Setup {
    /// Service `name` with `endpoints` ready pods, in slices of [`PER_SLICE`].
    fn service(&self, name: &str, endpoints: usize, first_address: u32) {
        self.api.service(NAMESPACE, name, PORT.into(), "grpc");
        let addresses: Vec<(String, String)> = (0..endpoints)
            .map(|i| {
                let address = std::net::Ipv4Addr::from(first_address + i as u32).to_string();
                let pod = format!("{name}-{i}");
                self.api.pod(NAMESPACE, &pod, name, "server");
                (address, pod)
            })
            .collect();
        for (slice, chunk) in addresses.chunks(PER_SLICE).enumerate() {
            let listed: Vec<(&str, bool, &str)> = chunk.iter().map(|(a, p)| (a.as_str(), true, p.as_str())).collect();
            self.api.slice(NAMESPACE, &format!("{name}-{slice}"), name, ("grpc", PORT), &listed);
        }
    }

    /// A sidecar whose one upstream names `services` (none: no upstream).
    async fn sidecar(&self, services: &[String]) -> Sidecar {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let certs = self.work.path();
        let endpoints: Vec<String> = services.iter().map(|s| format!("'k8s://{s}.{NAMESPACE}:{PORT}'")).collect();
        let upstreams = match endpoints.is_empty() {
            true => "[]".to_string(),
            false => format!("[{{services: [echo.v1.Echo], endpoints: [{}]}}]", endpoints.join(", ")),
        };
        let config = format!(
            "identity: {{cert: '{c}/client.pem', key: '{c}/client-key.pem', trust_bundle: '{c}/ca.pem'}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{proto}']}}\n\
             admin: {{listen: '{admin}'}}\nworker_threads: 1\n\
             kubernetes: {{kubeconfig: '{kubeconfig}'}}\n\
             outbound: {{listen: '127.0.0.1:{port}', upstreams: {upstreams}}}\n",
            c = certs.display(),
            proto = self.repo.join("proto").display(),
            kubeconfig = self.kubeconfig.display(),
            port = free_port(),
        );
        let path = certs.join(format!("sidecar-{}.yaml", admin.port()));
        std::fs::write(&path, config).unwrap();
        let child = Command::new(&self.binary)
            .args(["run", "--config"])
            .arg(&path)
            .env("PROTOMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let sidecar = Sidecar { child, admin };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            assert!(Instant::now() < deadline, "the sidecar's admin server never answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sidecar
    }
}

/// The median of `values`, sorted in place.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(setup: Setup) -> String {
    let mut out = String::from("## Kubernetes discovery\n\n");
    out.push_str(
        "Release sidecars, each a process of its own, against the test suite's API server (`tests/mesh/apiserver.rs`: \
         HTTPS, list and watch as kube-apiserver serves them), in one run. Services have ready endpoints in \
         EndpointSlices of 100, each endpoint's pod listed too (small pods: the sidecar keeps only what it needs \
         of each).\n\n",
    );

    // Memory per watched Service: 100 Services of 3 endpoints against none.
    let services: Vec<String> = (0..100).map(|i| format!("svc-{i}")).collect();
    for (i, service) in services.iter().enumerate() {
        setup.service(service, 3, u32::from(std::net::Ipv4Addr::new(10, 1, i as u8, 1)));
    }
    let idle = setup.sidecar(&[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = idle.rss_kib();
    drop(idle);
    let watching = setup.sidecar(&services).await;
    watching.await_endpoints(300).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_service = (watching.rss_kib() as f64 - idle_rss as f64) / 100.0;
    drop(watching);

    // Memory per 1,000 endpoints: one Service of 10,000 against one of 3.
    setup.service("big", 10_000, u32::from(std::net::Ipv4Addr::new(10, 2, 0, 1)));
    let small = setup.sidecar(&services[..1]).await;
    small.await_endpoints(3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let small_rss = small.rss_kib();
    drop(small);
    let big = setup.sidecar(&["big".to_string()]).await;
    big.await_endpoints(10_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_thousand = (big.rss_kib() as f64 - small_rss as f64) / 10.0;
    drop(big);

    // CPU per API event, and time from an API write to the routing change:
    // a Service of 100 endpoints, one endpoint going not ready and back.
    setup.service("churn", PER_SLICE, u32::from(std::net::Ipv4Addr::new(10, 3, 0, 1)));
    let churned = setup.sidecar(&["churn".to_string()]).await;
    churned.await_endpoints(PER_SLICE).await;
    let addresses: Vec<String> = (0..PER_SLICE)
        .map(|i| std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 3, 0, 1)) + i as u32).to_string())
        .collect();
    let pods: Vec<String> = (0..PER_SLICE).map(|i| format!("churn-{i}")).collect();
    let set = |not_ready: Option<usize>| {
        let listed: Vec<(&str, bool, &str)> =
            (0..PER_SLICE).map(|i| (addresses[i].as_str(), Some(i) != not_ready, pods[i].as_str())).collect();
        setup.api.slice(NAMESPACE, "churn-0", "churn", ("grpc", PORT), &listed);
    };
    let events = 2_000;
    let before = churned.cpu();
    let started = Instant::now();
    for i in 0..events {
        set(if i % 2 == 0 { Some(i % PER_SLICE) } else { None });
        // Apart, so that each event is taken in and routed on its own.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    churned.await_endpoints(PER_SLICE).await;
    let cpu_per_event = (churned.cpu() - before).as_secs_f64() * 1e6 / events as f64;
    let churn_seconds = started.elapsed().as_secs_f64();
    let mut delays = Vec::new();
    for i in 0..100 {
        let gone = format!("{}:{PORT}", addresses[i % PER_SLICE]);
        let written = Instant::now();
        set(Some(i % PER_SLICE));
        // Polled as fast as /config answers, for at most 10 s.
        while churned.endpoints().await.contains(&gone) {
            assert!(written.elapsed() < Duration::from_secs(10), "{gone} still routed to 10 s after it went");
        }
        delays.push(written.elapsed().as_secs_f64() * 1000.0);
        set(None);
        churned.await_endpoints(PER_SLICE).await;
    }
    delays.sort_by(f64::total_cmp);
    drop(churned);

    // The API server's load: 100 pods calling the same 10 Services.
    let before: std::collections::BTreeMap<&str, usize> = setup.api.requests.lock().unwrap().clone();
    let ten = &services[..10];
    let mut pods = Vec::new();
    for _ in 0..100 {
        pods.push(setup.sidecar(ten).await);
    }
    for pod in &pods {
        pod.await_endpoints(30).await;
    }
    let after = setup.api.requests.lock().unwrap().clone();
    let asked = |kind: &str| after.get(kind).copied().unwrap_or(0) - before.get(kind).copied().unwrap_or(0);
    let watches = setup.api.open_watches();
    let mut rss: Vec<f64> = pods.iter().map(|p| p.rss_kib() as f64 / 1024.0).collect();
    let pod_rss = median(&mut rss);
    drop(pods);

    out.push_str(&format!(
        "- memory per watched Service: {per_service:.1} KiB (RSS of a sidecar watching 100 Services of 3 endpoints, \
         less one watching none: {idle_mib:.1} MiB)\n\
         - memory per 1,000 endpoints: {per_thousand:.0} KiB (one Service of 10,000 endpoints, less one of 3)\n\
         - CPU per API event: {cpu_per_event:.0} µs ({events} EndpointSlice changes of a 100-endpoint Service over \
         {churn_seconds:.1} s, the sidecar's user+system time divided by the changes)\n\
         - from an API write to the routing change (the sidecar's `/config`): p50 {p50:.1} ms, p99 {p99:.1} ms, \
         max {max:.1} ms over {n} changes\n\
         - 100 pods calling 10 Services (`k8s://` upstreams): {lists} lists, {gets} gets, {watch_requests} watch \
         requests by the time every pod routes to every endpoint ({per_pair:.1} requests per pod and Service), \
         {watches} watches held; each sidecar's RSS {pod_rss:.1} MiB (median)\n",
        idle_mib = idle_rss as f64 / 1024.0,
        p50 = percentile(&delays, 0.5),
        p99 = percentile(&delays, 0.99),
        max = delays[delays.len() - 1],
        n = delays.len(),
        lists = asked("list"),
        gets = asked("get"),
        watch_requests = asked("watch"),
        per_pair = (asked("list") + asked("get") + asked("watch")) as f64 / 1000.0,
    ));
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, binary, repo] = &args[..] else {
        eprintln!("usage: discovery PROTOMESH_BINARY REPO");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let out = runtime.block_on(async {
        let work = tempfile::tempdir().unwrap();
        let id = SpiffeId::parse(&format!("spiffe://bench.local/ns/{NAMESPACE}/sa/client")).unwrap();
        write_dev_certs(work.path(), "bench CA", &[("client".to_string(), id)]).unwrap();
        let api = ApiServer::start().await;
        let kubeconfig = api.kubeconfig(work.path());
        let setup = Setup { binary: binary.into(), repo: Path::new(repo).into(), work, kubeconfig, api };
        run(setup).await
    });
    print!("{out}");
}
