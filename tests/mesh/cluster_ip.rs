//! Captured calls to a ClusterIP Service, with no upstream written: the
//! client pod's sidecar asks the API server (`apiserver.rs`, reached from
//! the pods at the node's address) which Service the virtual IP is, and
//! balances each call over the Service's ready pods, each expected to
//! present its pod's service account. The node DNATs the virtual IP to one
//! pod per connection, as kube-proxy does, so without the sidecar every call
//! of a connection would land on one pod. Needs network namespaces (root).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use protomesh_samples::echo::{EchoService, EchoStats};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};

use crate::apiserver::{ApiServer, inject_grants};
use crate::cluster::{
    ADMIN, APP_PORT, INBOUND_OPAQUE, TCP_PORT, await_ready, config, request, sidecar_files, start_sidecar, tcp_echo,
};
use crate::pods::{self, Node, Pod};
use crate::telemetry::{admin, sample};

/// Replicas behind the Service; the last one is [`Last`].
const REPLICAS: usize = 4;
const IMPOSTOR: usize = REPLICAS - 1;

enum Outage {
    Stop,
    /// Back on the same address, with its history gone.
    Restart,
}

/// What the last replica is.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    /// Its certificate names another service account than the API says its pod runs as.
    Impostor,
    /// It has no sidecar, and the API says so.
    Unmeshed,
}

struct Replicated {
    node: Node,
    client: Pod,
    replicas: Vec<Pod>,
    /// Each replica's count of calls served.
    served: Vec<Arc<EchoStats>>,
    vip: SocketAddr,
    /// A Service of the same pods' TCP echo.
    tcp_vip: SocketAddr,
    api: Arc<ApiServer>,
    /// Each replica's address and pod name, as its EndpointSlice lists it.
    endpoints: Vec<(String, String)>,
    /// Stops and restarts the API server; dropped, ends its runtime in the node.
    api_control: tokio::sync::mpsc::UnboundedSender<(Outage, std::sync::mpsc::Sender<()>)>,
    sidecars: Vec<(Child, PathBuf)>,
    binary: PathBuf,
    server_config: PathBuf,
    files: tempfile::TempDir,
}

impl Replicated {
    fn start(last: Last) -> Option<Replicated> {
        if let Some(why) = pods::unavailable() {
            eprintln!("skipped: capture needs network namespaces: {why}");
            return None;
        }
        let node = Node::new();
        let client = node.pod();
        let replicas: Vec<Pod> = (0..REPLICAS).map(|_| node.pod()).collect();
        let vip = node.service(APP_PORT, &replicas.iter().collect::<Vec<_>>());

        let (started, api) = std::sync::mpsc::channel();
        let (control, mut told) = tokio::sync::mpsc::unbounded_channel::<(Outage, std::sync::mpsc::Sender<()>)>();
        let at = SocketAddr::from((node.address(), 0));
        // The API server runs in the node, where its address is, until the cluster is dropped.
        node.run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let api = ApiServer::start_at(at).await;
                started.send(api.clone()).unwrap();
                while let Some((outage, done)) = told.recv().await {
                    match outage {
                        Outage::Stop => api.stop(),
                        Outage::Restart => api.restart().await,
                    }
                    let _ = done.send(());
                }
                api.stop();
            })
        });
        let api = api.recv().unwrap();
        // The client pod's service account holds what `protomesh inject` grants it, no more.
        api.authorize(("test", "client"), &inject_grants(None));
        let tcp_vip = node.service(TCP_PORT, &replicas.iter().collect::<Vec<_>>());
        api.service_at("test", ("echo", "echo"), Some(vip.ip()), APP_PORT.into(), "grpc");
        api.service_at("test", ("echo-tcp", "echo"), Some(tcp_vip.ip()), TCP_PORT.into(), "tcp");
        let mut endpoints = Vec::new();
        for (i, replica) in replicas.iter().enumerate() {
            match (i, last) {
                (IMPOSTOR, Last::Unmeshed) => api.unmeshed_pod("test", &format!("echo-{i}"), "echo", "server"),
                _ => api.pod("test", &format!("echo-{i}"), "echo", "server"),
            }
            api.running_at("test", &format!("echo-{i}"), replica.address.into());
            endpoints.push((replica.address.to_string(), format!("echo-{i}")));
        }

        let files = tempfile::tempdir().unwrap();
        let binary = sidecar_files(files.path(), &["client", "server", "other"]);
        let kubeconfig = api.kubeconfig(files.path());
        crate::cluster::make_readable(files.path());
        let client_config = config(
            files.path(),
            "client",
            &format!(
                "outbound: {{listen: '127.0.0.1:4140'}}\nkubernetes: {{kubeconfig: '{}'}}\naccess_log: true\n",
                kubeconfig.display()
            ),
        );
        let inbound = "inbound: {listen: '0.0.0.0:4143'}\n";
        let (server, other) = (config(files.path(), "server", inbound), config(files.path(), "other", inbound));

        let mut served = Vec::new();
        for replica in &replicas {
            served.push(serve_echo(replica));
        }
        let mut sidecars = Vec::new();
        let meshed: Vec<&Pod> = match last {
            Last::Impostor => replicas.iter().collect(),
            Last::Unmeshed => replicas[..IMPOSTOR].iter().collect(),
        };
        for (i, replica) in meshed.iter().enumerate() {
            let config = if i == IMPOSTOR { &other } else { &server };
            sidecars.push(start_sidecar(replica, &binary, config, &[], &[], files.path()));
        }
        sidecars.push(start_sidecar(&client, &binary, &client_config, &[], &[], files.path()));
        let meshed = meshed.into_iter().chain([&client]);
        for (pod, (_, log)) in meshed.zip(&sidecars) {
            await_ready(pod, log);
        }
        let cluster = Replicated {
            node,
            client,
            replicas,
            served,
            vip,
            tcp_vip,
            api,
            endpoints,
            api_control: control,
            sidecars,
            binary,
            server_config: server,
            files,
        };
        cluster.set_ready(&[true; REPLICAS]);
        Some(cluster)
    }

    /// Sets the Service's EndpointSlice: each replica ready or not, as
    /// `ready` says, and left out past its end.
    fn set_ready(&self, ready: &[bool]) {
        self.list(&ready.iter().copied().enumerate().collect::<Vec<_>>());
    }

    /// Sets the Service's EndpointSlice to the replicas `listed`, each ready or not.
    fn list(&self, listed: &[(usize, bool)]) {
        let endpoints: Vec<(&str, bool, &str)> = listed
            .iter()
            .map(|(replica, ready)| {
                let (address, pod) = &self.endpoints[*replica];
                (address.as_str(), *ready, pod.as_str())
            })
            .collect();
        self.api.slice("test", "echo-a1b2c", "echo", ("grpc", APP_PORT), &endpoints);
        self.api.slice("test", "echo-tcp-d3e4f", "echo-tcp", ("tcp", TCP_PORT), &endpoints);
    }

    /// A new meshed replica, started and ready but not yet listed; its index.
    fn add_replica(&mut self) -> usize {
        let replica = self.node.pod();
        self.served.push(serve_echo(&replica));
        let sidecar = start_sidecar(&replica, &self.binary, &self.server_config, &[], &[], self.files.path());
        await_ready(&replica, &sidecar.1);
        let index = self.endpoints.len();
        let pod = format!("echo-{index}");
        self.api.pod("test", &pod, "echo", "server");
        self.api.running_at("test", &pod, replica.address.into());
        self.endpoints.push((replica.address.to_string(), pod));
        // The client's sidecar stays last.
        self.sidecars.insert(self.sidecars.len() - 1, sidecar);
        self.replicas.push(replica);
        index
    }

    /// Stops a replica's sidecar as the kubelet stops a terminating pod's
    /// (SIGTERM: it drains), and waits for it to exit.
    fn stop_sidecar(&mut self, replica: usize) {
        let (sidecar, _) = &mut self.sidecars[replica];
        // SAFETY: kill on a child process this test started and has not reaped.
        unsafe { libc::kill(sidecar.id() as libc::pid_t, libc::SIGTERM) };
        sidecar.wait().unwrap();
    }

    /// Calls from the client pod's app, four at a time on one connection,
    /// until told to stop; returns the failed calls' statuses.
    fn steady_calls(&self) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<String>>) {
        let (stop, stopped) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (vip, stopping) = (self.vip, stop.clone());
        let calls = self.client.run(move || async move {
            let channel = Channel::from_shared(format!("http://{vip}")).unwrap().connect().await.unwrap();
            let client = protomesh_samples::pb::echo::v1::echo_client::EchoClient::new(channel);
            let mut failed = Vec::new();
            // Bounded: 60 s of calls at most.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !stopping.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
                let four = (0..4).map(|_| {
                    let mut client = client.clone();
                    async move { client.unary(served_in_20ms("steady")).await }
                });
                let results = futures_util::future::join_all(four).await;
                failed.extend(results.into_iter().filter_map(Result::err).map(|status| format!("{status:?}")));
            }
            stopped.store(true, Ordering::Release);
            failed
        });
        (stop, calls)
    }

    /// Waits until `replica` has served another call, up to `bound`; whether it did.
    fn serves_within(&self, replica: usize, bound: Duration) -> bool {
        let (start, before) = (Instant::now(), self.served()[replica]);
        while start.elapsed() < bound {
            if self.served()[replica] > before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stops or restarts the API server, as its outage goes.
    fn api(&self, outage: Outage) {
        let (done, finished) = std::sync::mpsc::channel();
        self.api_control.send((outage, done)).unwrap();
        finished.recv().unwrap();
    }

    /// Waits up to `bound` until the client sidecar's `series` reads `expected`; what it read last.
    fn await_metric(&self, series: &str, expected: f64, bound: Duration) -> f64 {
        let deadline = Instant::now() + bound;
        loop {
            let value = sample(&self.metrics(), series).unwrap_or(0.0);
            if value == expected || Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn served(&self) -> Vec<u64> {
        self.served.iter().map(|stats| stats.calls.load(Ordering::Acquire)).collect()
    }

    /// Makes `calls` calls from the client pod's app on one connection to
    /// the virtual IP, `in_flight` at a time; all must succeed. Returns how
    /// many each replica served.
    fn calls(&self, calls: usize, in_flight: usize) -> Vec<u64> {
        self.calls_to(self.vip, calls, in_flight)
    }

    /// As [`Replicated::calls`], to `addr`.
    fn calls_to(&self, addr: SocketAddr, calls: usize, in_flight: usize) -> Vec<u64> {
        let before = self.served();
        let made = self.client.run(move || async move {
            let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let client = protomesh_samples::pb::echo::v1::echo_client::EchoClient::new(channel);
            let calls = futures_util::stream::iter(0..calls).map(|i| {
                let mut client = client.clone();
                async move { client.unary(served_in_20ms(&format!("call {i}"))).await }
            });
            let results: Vec<_> =
                tokio::time::timeout(Duration::from_secs(30), calls.buffer_unordered(in_flight).collect())
                    .await
                    .expect("calls end within 30 s");
            results.into_iter().filter_map(Result::err).map(|status| format!("{status:?}")).collect::<Vec<_>>()
        });
        let failed = made.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} calls failed: {:?}; {}",
            failed.len(),
            &failed[..failed.len().min(3)],
            self.logs()
        );
        self.served().iter().zip(before).map(|(now, before)| now - before).collect()
    }

    fn metrics(&self) -> String {
        self.client.run(|| async { admin(ADMIN.parse().unwrap(), "GET", "/metrics", "").await.1 }).join().unwrap()
    }

    fn client_log(&self) -> String {
        std::fs::read_to_string(&self.sidecars.last().unwrap().1).unwrap()
    }

    fn logs(&self) -> String {
        let logs = self.sidecars.iter().map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default());
        format!("the sidecars' logs:\n{}", logs.collect::<Vec<_>>().join("\n---\n"))
    }
}

/// Serves the echo service in `pod` (gRPC, and TCP on [`TCP_PORT`]); returns its counts.
fn serve_echo(pod: &Pod) -> Arc<EchoStats> {
    let echo = EchoService::default();
    let stats = echo.stats.clone();
    pod.run(move || async move {
        tokio::spawn(tcp_echo(TcpListener::bind(("0.0.0.0", TCP_PORT)).await.unwrap()));
        let listener = TcpListener::bind(("0.0.0.0", APP_PORT)).await.unwrap();
        protomesh_samples::serve(Server::builder().add_service(echo.into_server()), listener).await;
        std::future::pending::<()>().await
    });
    stats
}

/// A call its server takes 20 ms to answer, as a real one takes some time:
/// the sidecars' own latency (milliseconds here, in debug builds sharing two
/// cores with five sidecars) is then a small part of what the balancer
/// measures, and its noise does not decide where calls go.
fn served_in_20ms(message: &str) -> protomesh_samples::pb::echo::v1::EchoRequest {
    protomesh_samples::pb::echo::v1::EchoRequest { delay_ms: 20, ..request(message) }
}

impl Drop for Replicated {
    fn drop(&mut self) {
        for (sidecar, _) in &mut self.sidecars {
            let _ = sidecar.kill();
            let _ = sidecar.wait();
        }
        let _ = &self.node;
    }
}

#[test]
fn calls_on_one_connection_to_a_cluster_ip_spread_over_its_ready_pods_and_none_reaches_an_impostor() {
    let Some(cluster) = Replicated::start(Last::Impostor) else { return };
    let served = cluster.calls(300, 8);
    let total: u64 = served.iter().sum();
    assert_eq!(total, 300, "{served:?}");
    assert_eq!(served[IMPOSTOR], 0, "the pod whose certificate names another account served calls: {served:?}");
    for (replica, calls) in served[..IMPOSTOR].iter().enumerate() {
        let share = *calls as f64 * 100.0 / total as f64;
        assert!(
            (share - 100.0 / 3.0).abs() <= 12.0,
            "replica {replica} served {share:.0}% of calls: {served:?}; {}",
            cluster.logs()
        );
    }
    let metrics = cluster.metrics();
    let lookups = sample(&metrics, "protomesh_kubernetes_service_lookups_total{result=\"service\"}");
    assert_eq!(lookups, Some(1.0), "one lookup for the destination; {}", cluster.logs());
    let to_address = sample(&metrics, "protomesh_original_destination_calls_total{peer=\"address\"}");
    assert_eq!(to_address.unwrap_or(0.0), 0.0, "no call went to the virtual IP");
    let to_pods = sample(&metrics, "protomesh_original_destination_calls_total{peer=\"service\"}").unwrap_or(0.0);
    let waited = sample(&metrics, "protomesh_original_destination_calls_total{peer=\"lookup\"}").unwrap_or(0.0);
    assert_eq!(to_pods + waited, 300.0, "every call counted by who answered it");
    // /config shows the destination as the Service, with each pod's identity and state.
    let config = cluster.client.run(|| async { admin(ADMIN.parse().unwrap(), "GET", "/config", "").await.1 });
    let config: serde_json::Value = serde_json::from_str(&config.join().unwrap()).unwrap();
    let destination = &config["outbound"]["original_destinations"][0];
    assert_eq!(destination["address"], cluster.vip.to_string(), "{config:#}");
    assert_eq!(destination["peer"], "service");
    assert_eq!(destination["service"], "k8s://echo.test:50051");
    let endpoints = destination["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), REPLICAS, "{destination:#}");
    assert!(
        endpoints
            .iter()
            .all(|e| e["identity"] == "spiffe://test.protomesh.local/ns/test/sa/server" && e["mtls"] == true)
    );
    let impostor = format!("{}:{APP_PORT}", cluster.endpoints[IMPOSTOR].0);
    let impostor = endpoints.iter().find(|e| e["address"] == impostor.as_str()).unwrap();
    assert_eq!(impostor["outlier"], "ejected", "{destination:#}");
    assert_eq!(impostor["pod"], cluster.endpoints[IMPOSTOR].1.as_str(), "{destination:#}");
    // Access log lines name the Service and the pod that answered.
    let client_log = cluster.client_log();
    let logged: Vec<&str> = client_log.lines().filter(|l| l.contains("protomesh::access")).collect();
    let by_pod = logged.iter().filter(|l| l.contains("peer=\"k8s://echo.test:50051\"")).count();
    assert!(by_pod >= 290, "{by_pod} of {} lines name the Service: {:?}", logged.len(), logged.last());
    for (i, (address, pod)) in cluster.endpoints.iter().enumerate().take(IMPOSTOR) {
        let endpoint = format!("endpoint=\"{address}:{APP_PORT}\" endpoint_pod=\"{pod}\"");
        assert!(logged.iter().any(|l| l.contains(&endpoint)), "no line names replica {i}: {:?}", logged.last());
    }
    let mismatches = "protomesh_endpoint_identity_mismatches_total{upstream=\"original destinations\"}";
    assert!(sample(&metrics, mismatches).unwrap_or(0.0) >= 1.0, "the impostor's handshakes are counted");
    let client_log = cluster.client_log();
    let told = client_log.lines().filter(|l| l.contains("endpoint presented another identity")).collect::<Vec<_>>();
    assert_eq!(told.len(), 1, "the impostor is logged once: {told:?}");
    assert!(told[0].contains("/sa/other") && told[0].contains("/sa/server"), "{}", told[0]);
}

#[test]
fn a_pod_taken_out_gets_no_new_call_within_a_second_one_put_back_gets_calls_and_no_call_fails() {
    let Some(cluster) = Replicated::start(Last::Impostor) else { return };
    let (stop, calls) = cluster.steady_calls();
    let bound = Duration::from_secs(1);
    assert!(cluster.serves_within(1, Duration::from_secs(10)), "replica 1 serves calls; {}", cluster.logs());
    // Not ready (a failing readiness probe, or terminating).
    cluster.set_ready(&[true, false, true, true]);
    std::thread::sleep(bound);
    assert!(!cluster.serves_within(1, bound), "a pod not ready still got calls a second on; {}", cluster.logs());
    let metrics = cluster.metrics();
    let endpoints = |state: &str| {
        sample(&metrics, &format!("protomesh_kubernetes_endpoints{{service=\"test/echo\",state=\"{state}\"}}"))
    };
    assert_eq!((endpoints("ready"), endpoints("not_ready")), (Some(3.0), Some(1.0)), "{metrics}");
    let changes = sample(&metrics, "protomesh_kubernetes_endpoints_change_seconds_count").unwrap_or(0.0);
    assert!(changes >= 1.0, "the change to not ready had its delay measured: {changes}");
    let events = "protomesh_kubernetes_watch_events_total{service=\"test/echo\",kind=\"endpointslices\"}";
    assert!(sample(&metrics, events).unwrap_or(0.0) >= 2.0, "{metrics}");
    // Ready again, then gone from the Service.
    cluster.set_ready(&[true, true, true, true]);
    assert!(cluster.serves_within(1, bound), "a pod ready again got no call within a second; {}", cluster.logs());
    cluster.set_ready(&[true, true]);
    std::thread::sleep(bound);
    assert!(!cluster.serves_within(2, bound), "a pod gone from the Service still got calls; {}", cluster.logs());
    let before = cluster.served();
    let rest = cluster.serves_within(0, bound) && cluster.serves_within(1, bound);
    assert!(rest, "the rest still serve: {before:?} then {:?}; {}", cluster.served(), cluster.logs());
    stop.store(true, Ordering::Release);
    let failed = calls.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} calls failed through the changes: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

#[test]
fn a_pod_of_the_service_without_a_sidecar_is_called_in_plaintext_with_the_rest() {
    let Some(cluster) = Replicated::start(Last::Unmeshed) else { return };
    let served = cluster.calls(200, 8);
    assert!(served.iter().all(|calls| *calls > 0), "every replica served calls: {served:?}; {}", cluster.logs());
    let unmeshed = cluster.endpoints[IMPOSTOR].0.clone();
    let updated = cluster.client_log().lines().rev().find(|l| l.contains("endpoints updated")).unwrap().to_string();
    assert!(updated.contains(&format!("\"{unmeshed}:{APP_PORT}\"")), "called with no identity expected: {updated}");
}

#[test]
fn opaque_tcp_to_a_cluster_ip_goes_to_one_ready_pod_per_connection_over_mtls() {
    let Some(cluster) = Replicated::start(Last::Impostor) else { return };
    let tcp_vip = cluster.tcp_vip;
    let connections = 12;
    let answers = cluster.client.run(move || async move {
        let mut answers = Vec::new();
        for i in 0..connections {
            let mut tcp = tokio::net::TcpStream::connect(tcp_vip).await.unwrap();
            let sent = format!("connection {i}");
            tokio::io::AsyncWriteExt::write_all(&mut tcp, sent.as_bytes()).await.unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut tcp).await.unwrap();
            let mut answer = String::new();
            let read = tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut answer);
            tokio::time::timeout(Duration::from_secs(10), read).await.expect("an answer within 10 s").unwrap();
            answers.push((sent, answer));
        }
        answers
    });
    for (sent, answer) in answers.join().unwrap() {
        assert_eq!(answer, format!("{sent}bytes={}", sent.len()), "{}", cluster.logs());
    }
    // Each connection reached a replica's sidecar over mTLS, none the impostor's.
    let carried = |replica: &Pod| {
        replica
            .run(|| async { sample(&admin(ADMIN.parse().unwrap(), "GET", "/metrics", "").await.1, INBOUND_OPAQUE) })
            .join()
            .unwrap()
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let by_replica = loop {
        let by_replica: Vec<f64> = cluster.replicas.iter().map(carried).collect();
        if by_replica.iter().sum::<f64>() == connections as f64 || Instant::now() > deadline {
            break by_replica;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(by_replica.iter().sum::<f64>(), connections as f64, "{by_replica:?}; {}", cluster.logs());
    assert_eq!(by_replica[IMPOSTOR], 0.0, "{by_replica:?}");
    assert!(by_replica.iter().filter(|n| **n > 0.0).count() >= 2, "connections spread over pods: {by_replica:?}");
}

#[test]
fn with_the_api_server_down_calls_go_to_the_cluster_ip_and_to_the_pods_once_it_is_back() {
    let Some(cluster) = Replicated::start(Last::Impostor) else { return };
    cluster.api(Outage::Stop);
    // Down from the start: the lookup fails, and the calls go to the address.
    cluster.calls(20, 4);
    let metrics = cluster.metrics();
    let calls = |peer: &str| {
        sample(&metrics, &format!("protomesh_original_destination_calls_total{{peer=\"{peer}\"}}")).unwrap_or(0.0)
    };
    // The first calls, made at once, waited for the lookup.
    assert_eq!(calls("address") + calls("lookup"), 20.0, "{}", cluster.logs());
    assert!(calls("address") >= 1.0 && calls("service") == 0.0, "{}", cluster.logs());
    let failed = sample(&cluster.metrics(), "protomesh_kubernetes_service_lookups_total{result=\"failed\"}");
    assert!(failed.unwrap_or(0.0) >= 1.0, "the failed lookup is counted");
    // Back, its history gone: the lookup is tried again within its backoff (at most 3 s).
    cluster.api(Outage::Restart);
    let found = "protomesh_kubernetes_service_lookups_total{result=\"service\"}";
    assert_eq!(cluster.await_metric(found, 1.0, Duration::from_secs(5)), 1.0, "{}", cluster.logs());
    let served = cluster.calls(90, 8);
    assert_eq!(served[IMPOSTOR], 0, "{served:?}");
    assert!(served.iter().filter(|n| **n > 0).count() >= 2, "calls spread over the pods again: {served:?}");
}

#[test]
fn a_rolling_update_of_every_replica_under_steady_calls_fails_no_call() {
    let Some(mut cluster) = Replicated::start(Last::Impostor) else { return };
    let (stop, calls) = cluster.steady_calls();
    assert!(cluster.serves_within(0, Duration::from_secs(10)), "{}", cluster.logs());
    // As a Deployment rolls: a new pod becomes ready, then an old one
    // terminates (not ready at once; its sidecar drains on SIGTERM), one at a time.
    let mut listed: Vec<usize> = (0..REPLICAS).collect();
    for old in 0..IMPOSTOR {
        let new = cluster.add_replica();
        listed.push(new);
        cluster.list(&listed.iter().map(|i| (*i, true)).collect::<Vec<_>>());
        assert!(
            cluster.serves_within(new, Duration::from_secs(1)),
            "new replica {new} got no call; {}",
            cluster.logs()
        );
        cluster.list(&listed.iter().map(|i| (*i, *i != old)).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_secs(1));
        cluster.stop_sidecar(old);
        listed.retain(|i| *i != old);
        cluster.list(&listed.iter().map(|i| (*i, true)).collect::<Vec<_>>());
    }
    let after = cluster.served();
    assert!(cluster.serves_within(REPLICAS + 2, Duration::from_secs(1)), "the last new replica serves");
    assert_eq!(cluster.served()[..IMPOSTOR], after[..IMPOSTOR], "the old replicas serve nothing once gone");
    stop.store(true, Ordering::Release);
    let failed = calls.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} calls failed in the rollout: {:?}; {}",
        failed.len(),
        &failed[..failed.len().min(3)],
        cluster.logs()
    );
    assert_eq!(cluster.served()[IMPOSTOR], 0);
}

#[test]
fn a_call_to_a_pods_own_address_goes_to_that_pod_which_must_present_its_service_account() {
    let Some(cluster) = Replicated::start(Last::Impostor) else { return };
    // As a headless Service's DNS answers, or a StatefulSet peer is named: one pod's address.
    let first = SocketAddr::from((cluster.replicas[0].address, APP_PORT));
    let served = cluster.calls_to(first, 40, 4);
    assert_eq!(served, [40, 0, 0, 0], "every call went to the pod dialled; {}", cluster.logs());
    let metrics = cluster.metrics();
    let found = sample(&metrics, "protomesh_kubernetes_service_lookups_total{result=\"pod\"}");
    assert_eq!(found, Some(1.0), "{}", cluster.logs());
    let calls = |metrics: &str, peer: &str| {
        sample(metrics, &format!("protomesh_original_destination_calls_total{{peer=\"{peer}\"}}")).unwrap_or(0.0)
    };
    assert_eq!(calls(&metrics, "pod") + calls(&metrics, "lookup"), 40.0, "{}", cluster.logs());
    let config = cluster.client.run(|| async { admin(ADMIN.parse().unwrap(), "GET", "/config", "").await.1 });
    let config: serde_json::Value = serde_json::from_str(&config.join().unwrap()).unwrap();
    let destination = &config["outbound"]["original_destinations"][0];
    assert_eq!((&destination["address"], &destination["peer"]), (&first.to_string().into(), &"pod".into()));
    assert_eq!(destination["endpoints"][0]["identity"], "spiffe://test.protomesh.local/ns/test/sa/server");

    // The impostor's own address: its certificate names another account than its pod runs as.
    let impostor = SocketAddr::from((cluster.replicas[IMPOSTOR].address, APP_PORT));
    let refused = cluster.client.run(move || async move {
        let channel = Channel::from_shared(format!("http://{impostor}")).unwrap().connect().await.unwrap();
        let mut client = protomesh_samples::pb::echo::v1::echo_client::EchoClient::new(channel);
        client.unary(request("to the impostor")).await.unwrap_err()
    });
    let refused = refused.join().unwrap();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(cluster.served()[IMPOSTOR], 0);
    let log = cluster.client_log();
    assert!(log.contains("endpoint presented another identity") && log.contains("/sa/other"), "{log}");

    // Gone from the API: its watch ends, and the next call looks the address up again.
    cluster.api.delete_pod("test", "echo-0");
    let none = "protomesh_kubernetes_service_lookups_total{result=\"no_service\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(&cluster.metrics(), none).unwrap_or(0.0) == 0.0 && Instant::now() < deadline {
        // Calls fail while the pod is forgotten and looked up again: only what follows counts.
        let _ = cluster.client.run(move || async move {
            let channel = Channel::from_shared(format!("http://{first}")).unwrap().connect().await.unwrap();
            let mut client = protomesh_samples::pb::echo::v1::echo_client::EchoClient::new(channel);
            client.unary(request("after")).await
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sample(&cluster.metrics(), none), Some(1.0), "looked up again once gone; {}", cluster.logs());
    // Not in its own namespace, and not granted protomesh-pod-lookup (inject does not add it): said once.
    let log = cluster.client_log();
    let refused = log.lines().filter(|l| l.contains("pod addresses outside this pod's namespace are not looked up"));
    let refused: Vec<&str> = refused.collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains("protomesh-pod-lookup") && refused[0].contains("cannot list resource"),
        "{}",
        refused[0]
    );
    // Unknown to the API now: any workload of the trust domain may answer, and it is counted.
    cluster.calls_to(first, 5, 1);
    assert!(calls(&cluster.metrics(), "address") >= 5.0, "{}", cluster.logs());
}
