//! Transparent capture, in pods made of network namespaces (`cluster.rs`):
//! the client app dials a Service's virtual IP, or a pod outside the mesh, as
//! it would without a mesh; what reaches the wire is watched on the node.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protomesh_samples::pb::echo::v1::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::cluster::*;
use crate::harness::{id, within};
use crate::pods::{self, Node};
use crate::telemetry::admin;

#[test]
fn an_unmodified_client_calling_a_service_ip_goes_through_both_sidecars_over_mtls() {
    let Some(cluster) = Cluster::start(Setup::default()) else { return };
    let (stop, seen) = sniff(&cluster.node);
    let (service, outside) = (cluster.service, cluster.outside.address);
    cluster.in_client(move || async move {
        let mut client = echo_client(service);
        let reply = within("unary", client.unary(request("secret-unary-canary"))).await.unwrap().into_inner();
        assert_eq!(reply.message, "secret-unary-canary");
        assert_eq!(reply.caller, id("client").as_str(), "the server app sees the verified caller");

        let streamed = EchoRequest { message: "secret-stream-canary".into(), reply_count: 3, ..Default::default() };
        let mut stream = within("server stream", client.server_stream(streamed)).await.unwrap().into_inner();
        let mut sequences = Vec::new();
        while let Some(reply) = within("next reply", stream.message()).await.unwrap() {
            sequences.push(reply.sequence);
        }
        assert_eq!(sequences.len(), 3);

        let requests = tokio_stream::iter((0..4).map(|i| request(&format!("secret-bidi-canary-{i}"))));
        let mut replies = within("bidi", client.bidi_stream(requests)).await.unwrap().into_inner();
        let mut echoed = Vec::new();
        while let Some(reply) = within("next reply", replies.message()).await.unwrap() {
            echoed.push(reply.message);
        }
        assert_eq!(echoed, (0..4).map(|i| format!("secret-bidi-canary-{i}")).collect::<Vec<_>>());

        // Apps that dial the sidecar themselves still can.
        let explicit = echo_client("127.0.0.1:4140".parse().unwrap());
        let reply = within("explicit", explicit.clone().unary(request("secret-explicit-canary"))).await.unwrap();
        assert_eq!(reply.into_inner().caller, id("client").as_str());

        // A control: plaintext the app sends outside the mesh is seen on the wire.
        let mut tcp = TcpStream::connect((outside, TCP_PORT)).await.unwrap();
        tcp.write_all(b"plaintext-control-canary").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut answer = String::new();
        within("control", tcp.read_to_string(&mut answer)).await.unwrap();
    });
    stop.store(true, Ordering::Release);
    let seen = seen.join().unwrap();
    assert!(contains(&seen, b"plaintext-control-canary"), "the capture on the node saw the control");
    for canary in ["secret-unary-canary", "secret-stream-canary", "secret-bidi-canary", "echo.v1.Echo"] {
        assert!(!contains(&seen, canary.as_bytes()), "`{canary}` crossed the node in plaintext");
    }
    // Had the sidecar's own connections to the Service been captured, they
    // would have come back into it: as more calls, or as opaque connections.
    let metrics = cluster.in_client(|| async { admin(ADMIN.parse().unwrap(), "GET", "/metrics", "").await.1 });
    let calls: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("protomesh_requests_total{direction=\"outbound\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(calls, 4.0, "{metrics}");
    cluster.await_metric(&cluster.client, OUTBOUND_OPAQUE, 1.0);
}

#[test]
fn a_client_outside_the_mesh_is_refused_in_strict_mode_and_forwarded_in_permissive_mode() {
    let Some(cluster) = Cluster::start(Setup::default()) else { return };
    let server = cluster.server.address;
    cluster
        .outside
        .run(move || async move {
            let strict = echo_client(SocketAddr::from((server, APP_PORT)));
            assert_refused(within("strict", strict.clone().unary(request("plaintext"))).await.unwrap_err());

            let permissive = echo_client(SocketAddr::from((server, PERMISSIVE_PORT)));
            let reply =
                within("permissive", permissive.clone().unary(request("plaintext"))).await.unwrap().into_inner();
            assert_eq!(reply.message, "plaintext");
            assert_eq!(reply.caller, "", "a plaintext client has no verified identity");
        })
        .join()
        .unwrap_or_else(|_| panic!("failed; {}", cluster.logs()));
    cluster.await_metric(&cluster.server, INBOUND_OPAQUE, 1.0);
    cluster.await_metric(&cluster.server, PLAINTEXT_REFUSED, 1.0);
}

/// An HTTP/1.1 request as any HTTP client makes it: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: shop.test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within("an HTTP answer", tcp.read_to_string(&mut response)).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0), body.to_string())
}

#[test]
fn web_ports_take_json_and_grpc_web_for_the_app_at_that_port_beside_mtls_and_the_ports_mode() {
    let inbound = format!(
        "{{listen: '0.0.0.0:4143', mtls: {{mode: strict, ports: {{{PERMISSIVE_PORT}: permissive}}}}, \
         web: {{ports: [{APP_PORT}, {PERMISSIVE_PORT}], methods: ['echo.v1.Echo/Unary'], json: all}}}}"
    );
    let Some(cluster) = Cluster::start(Setup { server_inbound: Some(inbound), ..Default::default() }) else { return };
    let (server, service) = (cluster.server.address, cluster.service);
    cluster
        .outside
        .run(move || async move {
            for port in [APP_PORT, PERMISSIVE_PORT] {
                let addr = SocketAddr::from((server, port));
                let (status, body) = http(addr, "POST", "/v1/echo", r#"{"message": "from a browser"}"#).await;
                assert_eq!((status, body.as_str()), (200, r#"{"message":"from a browser"}"#), "port {port}");
                let (status, body) = http(addr, "POST", "/echo.v1.Echo/ServerStream", "{}").await;
                assert_eq!(status, 404, "only the methods listed have routes: {body}");
                let framed = b"\0\0\0\0\x03\x0a\x01w";
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let head = "POST /echo.v1.Echo/Unary HTTP/1.1\r\nhost: shop.test\r\n\
                            content-type: application/grpc-web+proto\r\ncontent-length: 8\r\nconnection: close\r\n\r\n";
                tcp.write_all(head.as_bytes()).await.unwrap();
                tcp.write_all(framed).await.unwrap();
                let mut answer = Vec::new();
                within("a gRPC-Web answer", tcp.read_to_end(&mut answer)).await.unwrap();
                let answer = String::from_utf8_lossy(&answer);
                assert!(answer.contains("grpc-status: 0\r\n") && answer.contains("\x0a\x01w"), "{answer}");
            }
            // Other plaintext is taken as each port's mode says.
            let strict = echo_client(SocketAddr::from((server, APP_PORT)));
            assert_refused(within("strict", strict.clone().unary(request("plaintext"))).await.unwrap_err());
            let permissive = echo_client(SocketAddr::from((server, PERMISSIVE_PORT)));
            within("permissive", permissive.clone().unary(request("plaintext"))).await.unwrap();
        })
        .join()
        .unwrap_or_else(|_| panic!("failed; {}", cluster.logs()));
    cluster.in_client(move || async move {
        let reply = within("meshed", echo_client(service).unary(request("meshed"))).await.unwrap().into_inner();
        assert_eq!(reply.caller, id("client").as_str(), "meshed calls to a web port still go over mTLS");
    });
}

#[test]
fn other_tcp_from_the_app_passes_through_unchanged_with_half_close_and_bounded_memory() {
    let Some(cluster) = Cluster::start(Setup::default()) else { return };
    let outside = cluster.outside.address;
    let sidecar = cluster.sidecars[1].0.id();
    let resident_before = resident_kib(sidecar);
    cluster.in_client(move || async move {
        // HTTP/1.1, through the sidecar's detection and back.
        let tcp = TcpStream::connect((outside, HTTP_PORT)).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(connection);
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"hello over http/1.1"));
        let response =
            within("http/1.1", sender.send_request(http::Request::post("/upload").body(body).unwrap())).await.unwrap();
        use http_body_util::BodyExt;
        let answer = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&answer[..], b"POST /upload hello over http/1.1");

        // 64 MiB of raw TCP each way, the client closing its side first.
        const SIZE: usize = 64 << 20;
        let tcp = TcpStream::connect((outside, TCP_PORT)).await.unwrap();
        let (mut read, mut write) = tcp.into_split();
        let sending = tokio::spawn(async move {
            let chunk: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
            for _ in 0..SIZE / chunk.len() {
                write.write_all(&chunk).await.unwrap();
            }
            write.shutdown().await.unwrap();
        });
        let mut received = Vec::with_capacity(SIZE + 64);
        within("64 MiB echoed", read.read_to_end(&mut received)).await.unwrap();
        sending.await.unwrap();
        assert_eq!(received.len(), SIZE + format!("bytes={SIZE}").len());
        assert!(received[..SIZE].iter().enumerate().all(|(i, b)| *b == i as u8), "the bytes came back in order");
        assert_eq!(&received[SIZE..], format!("bytes={SIZE}").as_bytes(), "the server saw the client's half-close");
    });
    let grown = resident_kib(sidecar).saturating_sub(resident_before);
    assert!(grown < 16 << 10, "the sidecar grew by {grown} KiB carrying 128 MiB");
    cluster.await_metric(&cluster.client, OUTBOUND_OPAQUE, 2.0);
}

#[test]
fn skipped_ports_and_networks_bypass_the_sidecar() {
    let client_init = &["--skip-outbound-ports=7001", "--skip-outbound-cidrs=10.96.0.0/12"];
    let Some(cluster) = Cluster::start(Setup { client_init, ..Setup::default() }) else { return };
    let (outside, service) = (cluster.outside.address, cluster.service);
    let exchange = move |port: u16| async move {
        let mut tcp = TcpStream::connect((outside, port)).await.unwrap();
        tcp.write_all(b"ping").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut answer = String::new();
        within("exchange", tcp.read_to_string(&mut answer)).await.unwrap();
        assert_eq!(answer, "pingbytes=4");
    };
    cluster.in_client(move || async move {
        exchange(SKIPPED_PORT).await;
        // The Service's network is skipped: the call goes straight to the
        // server pod, whose capture takes it to its sidecar, which refuses
        // plaintext on a strict port.
        assert_refused(within("skipped network", echo_client(service).unary(request("direct"))).await.unwrap_err());
    });
    // The skipped network's call was refused at the server's sidecar, past the client's.
    cluster.await_metric(&cluster.server, PLAINTEXT_REFUSED, 1.0);
    cluster.await_metric(&cluster.client, OUTBOUND_OPAQUE, 0.0);
    // A port not skipped goes through it.
    cluster.in_client(move || exchange(TCP_PORT));
    cluster.await_metric(&cluster.client, OUTBOUND_OPAQUE, 1.0);
}

/// The resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn kubelet_probes_of_a_captured_pod_are_run_by_its_sidecar() {
    // The server pod as injected with capture: its probes moved to the admin port.
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "server-0",
            "namespace": "test",
            "labels": { "protomesh.io/inject": "enabled" },
            "annotations": { "protomesh.io/capture": "enabled" },
        },
        "spec": { "containers": [{
            "name": "app",
            "image": "echo",
            "ports": [{ "name": "grpc", "containerPort": APP_PORT }, { "name": "health", "containerPort": HEALTH_PORT }],
            "startupProbe": { "tcpSocket": { "port": "grpc" } },
            "readinessProbe": { "grpc": { "port": APP_PORT } },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "health" }, "timeoutSeconds": 2 },
        }] },
    });
    let context =
        protomesh::kube::inject::Context { namespace: Some("test"), workload: "server", ..Default::default() };
    let protomesh::kube::inject::Verdict::Injected(injected, _) =
        protomesh::kube::inject::inject(&pod, &context).unwrap()
    else {
        panic!("injected")
    };
    let sidecar =
        injected["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "protomesh-proxy");
    let probes =
        sidecar.unwrap()["env"].as_array().unwrap().iter().find(|v| v["name"] == "PROTOMESH_ADMIN__APP_PROBES");
    let probes = probes.expect("the sidecar is told the app's probes")["value"].as_str().unwrap().to_string();
    let kubelet_paths: Vec<String> = ["startupProbe", "readinessProbe", "livenessProbe"]
        .iter()
        .map(|kind| {
            let probe = &injected["spec"]["containers"][0][kind];
            assert_eq!(probe["httpGet"]["port"], 4191, "{kind} goes to the admin port");
            probe["httpGet"]["path"].as_str().unwrap().to_string()
        })
        .collect();

    let setup = Setup { server_env: vec![("PROTOMESH_ADMIN__APP_PROBES".into(), probes)], ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let server = cluster.server.address;
    // The kubelet probes from the node.
    let kubelet = |path: String| {
        cluster
            .node
            .run(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(admin(SocketAddr::from((server, 4191)), "GET", &path, ""))
            })
            .join()
            .unwrap()
    };
    for path in &kubelet_paths {
        let (status, body) = kubelet(path.clone());
        assert_eq!(status, 200, "{path}: {body}; {}", cluster.logs());
    }
    assert_eq!(kubelet(kubelet_paths[1].clone()).1, "SERVING\n");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let health = cluster.health.clone();
    runtime.block_on(health.set_service_status("", tonic_health::ServingStatus::NotServing));
    assert_eq!(kubelet(kubelet_paths[1].clone()), (503, "NOT_SERVING\n".into()), "readiness follows the app");
    runtime.block_on(health.set_service_status("", tonic_health::ServingStatus::Serving));
    assert_eq!(kubelet(kubelet_paths[1].clone()).0, 200);
    assert_eq!(kubelet("/app-probe/app/nothing".into()).0, 404);

    // The probe the kubelet would have sent without the sidecar, refused.
    let direct = cluster.node.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let channel = Channel::from_shared(format!("http://{server}:{APP_PORT}")).unwrap().connect_lazy();
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            within("direct probe", health.check(tonic_health::pb::HealthCheckRequest::default())).await
        })
    });
    assert_refused(direct.join().unwrap().unwrap_err());
}

#[test]
fn a_call_no_upstream_routes_goes_to_where_the_app_dialled() {
    let setup = Setup {
        client_outbound: Some(
            "{listen: '127.0.0.1:4140', original_destination: {plaintext_networks: ['10.213.0.0/16']}}".into(),
        ),
        ..Setup::default()
    };
    let Some(cluster) = Cluster::start(setup) else { return };
    let (stop, seen) = sniff(&cluster.node);
    let (service, outside) = (cluster.service, cluster.outside.address);
    cluster.in_client(move || async move {
        // A meshed Service: over mTLS, to the sidecar the server pod's capture hands it to.
        let reply = within("meshed", echo_client(service).unary(request("secret-original-canary"))).await.unwrap();
        assert_eq!(reply.into_inner().caller, id("client").as_str(), "the server's sidecar verified the client");
        // A server outside the mesh, on a plaintext network.
        let outside = SocketAddr::from((outside, OUTSIDE_GRPC_PORT));
        let reply = within("outside", echo_client(outside).unary(request("plaintext-outside-canary"))).await.unwrap();
        assert_eq!(reply.into_inner().caller, "", "no sidecar answered");
    });
    stop.store(true, Ordering::Release);
    let seen = seen.join().unwrap();
    assert!(contains(&seen, b"plaintext-outside-canary"), "the call outside the mesh went in plaintext");
    assert!(!contains(&seen, b"secret-original-canary"), "the call to the meshed Service went over mTLS");

    // A peer of another trust domain is refused, the reason named.
    let config = cluster.files.path().join("client.yaml");
    let yaml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("original_destination: {", "original_destination: {trust_domain: other.example, ");
    std::fs::write(&config, yaml).unwrap();
    let pid = cluster.sidecars[1].0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let refused = cluster.in_client(move || async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match within("refused", echo_client(service).unary(request("other domain"))).await {
                Err(status) => return status,
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(_) => panic!("the reload never took the new trust domain"),
            }
        }
    });
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("expected an identity in trust domain other.example"), "{refused:?}");
    assert!(refused.message().contains(&format!("original destination {service}")), "{refused:?}");
}

#[test]
fn opaque_tcp_between_meshed_pods_goes_over_mtls_and_takes_the_servers_default_authorization() {
    let outbound =
        "{listen: '127.0.0.1:4140', original_destination: {opaque_mtls_networks: ['10.96.0.0/12']}}".to_string();
    let exchange = |service: SocketAddr| async move {
        let tcp = TcpStream::connect(service).await.unwrap();
        let (mut read, mut write) = tcp.into_split();
        // A refused connection is reset while it sends: only what comes back counts.
        tokio::spawn(async move {
            for _ in 0..64 {
                write.write_all(&[b'x'; 16 << 10]).await?;
            }
            write.write_all(b"secret-opaque-canary").await?;
            write.shutdown().await
        });
        let mut received = Vec::new();
        within("opaque exchange", read.read_to_end(&mut received)).await.map(|_| received)
    };

    let setup = Setup { client_outbound: Some(outbound.clone()), ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let (stop, seen) = sniff(&cluster.node);
    let service = cluster.tcp_service;
    let received = cluster.in_client(move || exchange(service)).unwrap();
    stop.store(true, Ordering::Release);
    let sent = 64 * (16 << 10) + "secret-opaque-canary".len();
    assert!(received.ends_with(format!("secret-opaque-canarybytes={sent}").as_bytes()), "{} bytes", received.len());
    assert_eq!(received.len(), sent + format!("bytes={sent}").len());
    assert!(!contains(&seen.join().unwrap(), b"secret-opaque-canary"), "opaque TCP crossed the node in plaintext");
    cluster.await_metric(&cluster.client, OUTBOUND_OPAQUE, 1.0);
    cluster.await_metric(&cluster.server, INBOUND_OPAQUE, 1.0);
    drop(cluster);

    let deny = vec![("PROTOMESH_INBOUND__AUTHORIZATION__DEFAULT".to_string(), "deny".to_string())];
    let setup = Setup { client_outbound: Some(outbound), server_env: deny, ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let service = cluster.tcp_service;
    let received = cluster.in_client(move || exchange(service));
    assert!(received.is_err() || received.unwrap().is_empty(), "a server whose default is deny takes no opaque TCP");
    cluster.await_metric(&cluster.server, INBOUND_OPAQUE, 0.0);
}

#[test]
fn protomesh_init_is_idempotent_and_names_what_it_lacks() {
    if let Some(why) = pods::unavailable() {
        return eprintln!("skipped: protomesh init needs a network namespace: {why}");
    }
    let node = Node::new();
    let pod = node.pod();
    let args = ["--skip-inbound-ports=22,9000-9100", "--skip-outbound-cidrs=169.254.169.254/32,fd00::/8"];
    let first = pod.init(&args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let installed = pod.ruleset();
    assert!(installed.contains("tcp dport { 22, 4140, 4143, 4191, 9000-9100 } return"), "{installed}");
    assert!(pod.init(&args).status.success());
    assert_eq!(pod.ruleset(), installed, "a second run leaves the same rules");

    let no_nft = pod.init(&["--nft", "/nonexistent/nft"]);
    assert!(!no_nft.status.success());
    let said = String::from_utf8_lossy(&no_nft.stderr);
    assert!(said.contains("`/nonexistent/nft` was not found") && said.contains("nftables"), "{said}");

    let without_net_admin = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.name, "setpriv", "--bounding-set=-net_admin", env!("CARGO_BIN_EXE_protomesh")])
        .arg("init")
        .output()
        .unwrap();
    assert!(!without_net_admin.status.success());
    let said = String::from_utf8_lossy(&without_net_admin.stderr);
    assert!(said.contains("needs the NET_ADMIN capability"), "{said}");
    assert_eq!(pod.ruleset(), installed, "a failed run changes nothing");
}

#[test]
fn ipv6_connections_are_captured_both_ways() {
    if !pods::ipv6() {
        return eprintln!("skipped: the kernel has no IPv6");
    }
    // No upstream: the call goes to its original destination, an IPv6 Service.
    let setup = Setup { client_outbound: Some("{listen: '127.0.0.1:4140'}".into()), ..Setup::default() };
    let Some(cluster) = Cluster::start(setup) else { return };
    let service = cluster.node.service6(APP_PORT, &[&cluster.server]);
    let (stop, seen) = sniff(&cluster.node);
    cluster.in_client(move || async move {
        let reply = within("over IPv6", echo_client(service).unary(request("secret-ipv6-canary"))).await.unwrap();
        assert_eq!(reply.into_inner().caller, id("client").as_str(), "through both sidecars");
    });
    stop.store(true, Ordering::Release);
    assert!(!contains(&seen.join().unwrap(), b"secret-ipv6-canary"), "the IPv6 call crossed the node in plaintext");
}

#[test]
fn the_capture_check_passes_in_an_ipv6_only_pod_and_fails_without_rules() {
    if let Some(why) = pods::unavailable().or_else(|| (!pods::ipv6()).then(|| "the kernel has no IPv6".into())) {
        return eprintln!("skipped: {why}");
    }
    let node = Node::new();
    let pod = node.pod();
    // Its IPv4 address and routes gone: only IPv6 leaves the pod.
    for args in [["-4", "addr", "flush", "scope", "global"], ["-4", "route", "flush", "table", "main"]] {
        let flushed = std::process::Command::new("ip").args(["-n", &pod.name]).args(args).status().unwrap();
        assert!(flushed.success(), "ip {args:?}");
    }
    let validate = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &pod.name, "setpriv", "--reuid", "2103", "--regid", "2103", "--clear-groups"])
            .args([env!("CARGO_BIN_EXE_protomesh"), "init", "--validate"])
            .output()
            .unwrap()
    };
    let uncaptured = validate();
    assert_eq!(uncaptured.status.code(), Some(77), "{}", String::from_utf8_lossy(&uncaptured.stderr));
    assert!(String::from_utf8_lossy(&uncaptured.stderr).contains("[2001:db8::1]:80"), "dialled over IPv6");
    let installed = pod.init(&[]);
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));
    let checked = validate();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
}
