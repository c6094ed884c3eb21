//! The `protomesh` binary as users run it: `check`, `run` refusing bad
//! configs whole, reloading on SIGHUP and draining on SIGTERM, and the grpcio
//! suite against sidecar processes.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_protomesh");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn protomesh(args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(REPO).output().expect("protomesh runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_config(dir: &tempfile::TempDir, yaml: &str) -> String {
    let certs = dir.path().join("certs");
    let status = Command::new(BIN)
        .args(["certs", "--out", certs.to_str().unwrap(), "web"])
        .output()
        .expect("protomesh certs runs")
        .status;
    assert!(status.success());
    let path = dir.path().join("protomesh.yaml");
    let c = certs.display();
    let full = format!(
        "identity: {{cert: {c}/web.pem, key: {c}/web-key.pem, trust_bundle: {c}/ca.pem}}\n\
         contracts: {{protos: [examples/echo.proto], include: [{REPO}/proto]}}\n{yaml}"
    );
    std::fs::write(&path, full).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn check_prints_the_method_table_with_policy_sources() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "inbound: {app: '127.0.0.1:8080'}\n");
    let output = protomesh(&["check", "--config", &config]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("identity  spiffe://cluster.local/ns/default/sa/web"), "{stdout}");
    assert!(stdout.contains("runtime   1 worker thread(s)"), "{stdout}");
    assert!(stdout.contains("echo.v1.Echo  [examples/echo.proto]  no outbound route"), "{stdout}");
    assert!(stdout.contains("BidiStream               bidi-streaming"), "{stdout}");
    assert!(stdout.contains("Unary                    unary  no-side-effects"), "{stdout}");
    assert!(stdout.contains("from (protomesh.v1.service)"), "{stdout}");
}

#[test]
fn check_shows_health_checks_hedging_and_breakers() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "outbound: {upstreams: [{services: [echo.v1.Echo], endpoints: ['127.0.0.1:4143'], \
                identity: 'spiffe://cluster.local/ns/default/sa/echo', health_check: {interval: 2s}}]}\n\
                policy: {methods: {echo.v1.Echo/Unary: {hedging: {max_attempts: 2, hedging_delay: 30ms}, \
                circuit_breaker: {consecutive_failures: 4}}}}\n";
    let output = protomesh(&["check", "--config", &write_config(&dir, yaml)]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("health checked every 2s (timeout 1s) for the whole server"), "{stdout}");
    assert!(stdout.contains("hedging          2 attempts 30ms apart"), "{stdout}");
    assert!(stdout.contains("circuit_breaker  4 failures in a row"), "{stdout}");

    let bad = yaml.replace("interval: 2s", "interval: 2s, timeout: 3s");
    let output = protomesh(&["check", "--config", &write_config(&dir, &bad)]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("outbound.upstreams[0].health_check") && stderr.contains("timeout"), "{stderr}");
}

#[test]
fn a_bad_config_names_the_file_and_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "inbound: {app: '127.0.0.1:8080', listen: 'everywhere'}\n");
    for command in ["check", "run"] {
        let output = protomesh(&[command, "--config", &config]);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{command}");
        assert!(stderr.contains(&format!("{config}: field `inbound.listen`")), "{command}: {stderr}");
        assert!(stderr.contains("IP:port"), "{stderr}");
    }
}

#[test]
fn run_never_half_starts() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let config = write_config(
        &dir,
        &format!("outbound: {{listen: '127.0.0.1:0'}}\ninbound: {{app: '127.0.0.1:8080', listen: '{taken_addr}'}}\n"),
    );
    let output = protomesh(&["run", "--config", &config]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("inbound.listen: cannot listen on {taken_addr}")), "{stderr}");
}

#[test]
fn an_independent_grpcio_client_and_server_work_through_sidecar_processes() {
    let probe = Command::new("python3").args(["-c", "import grpc, grpc_tools, grpc_status, pytest, requests"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "the grpcio suite needs Python packages: pip install -r tests/python/requirements.txt"
    );
    let output = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/python"])
        .current_dir(REPO)
        .env("TEST_PROTOMESH_BIN", BIN)
        .output()
        .expect("pytest runs");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains(" passed"), "{stdout}");
}

#[tokio::test]
async fn the_sidecar_process_runs_its_workers_changes_log_level_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // No watch and no interval: only SIGHUP and POST /reload reload.
    let config = write_config(
        &dir,
        &format!(
            "outbound: {{listen: '127.0.0.1:0'}}\nadmin: {{listen: '127.0.0.1:{admin_port}'}}\n\
             reload: {{watch: false, interval: 0s}}\npolicy: {{}}\n"
        ),
    );
    let mut sidecar = tokio::process::Command::new(BIN)
        .args(["run", "--config", &config])
        .env("PROTOMESH_WORKER_THREADS", "2")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin_addr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    crate::harness::within("the sidecar is ready", async {
        while tokio::net::TcpStream::connect(admin_addr).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    use crate::telemetry::admin;
    assert_eq!(admin(admin_addr, "GET", "/ready", "").await.0, 200);
    let pid = sidecar.id().unwrap();
    assert_eq!(worker_threads(pid), 2, "PROTOMESH_WORKER_THREADS=2 runs two workers");
    assert_eq!(admin(admin_addr, "PUT", "/log-level", "debug").await, (200, "log filter is now debug\n".into()));
    let (status, body) = admin(admin_addr, "PUT", "/log-level", "a=b=c").await;
    assert_eq!(status, 400);
    assert!(body.contains("is not a log filter"), "{body}");

    let timeout_of_unary = || async {
        let config: serde_json::Value = serde_json::from_str(&admin(admin_addr, "GET", "/config", "").await.1).unwrap();
        let methods = config["methods"].as_array().unwrap().clone();
        methods.into_iter().find(|m| m["path"] == "/echo.v1.Echo/Unary").unwrap()["timeout"]["value"].clone()
    };
    assert_eq!(timeout_of_unary().await, "30s");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("policy: {}", "policy: {methods: {echo.v1.Echo/Unary: {timeout: 2s}}}"))
        .unwrap();
    let pid = pid.to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    crate::harness::within("SIGHUP reloads", async {
        while timeout_of_unary().await != "2s" {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(admin(admin_addr, "POST", "/reload", "").await, (200, "unchanged\n".into()));

    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = crate::harness::within("exit after SIGTERM", sidecar.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Threads of the process that carry traffic: the main one and the added workers.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|task| {
            let comm = std::fs::read_to_string(task.as_ref().unwrap().path().join("comm")).unwrap_or_default();
            comm.starts_with("protomesh")
        })
        .count()
}

#[tokio::test]
async fn half_sent_admin_requests_take_neither_the_data_planes_descriptors_nor_the_kubelets_place() {
    let dir = tempfile::tempdir().unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (outbound, admin_addr) = (free(), free());
    // Requests that never finish their head, and are not timed out during the test.
    let config = write_config(
        &dir,
        &format!("outbound: {{listen: '{outbound}'}}\nadmin: {{listen: '{admin_addr}', header_read_timeout: 60s}}\n"),
    );
    // Few descriptors, as in a pod with a low limit: every one the admin server kept would be the data plane's.
    let mut sidecar = tokio::process::Command::new("prlimit")
        .args(["--nofile=64", "--", BIN, "run", "--config", &config])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::harness::within("the sidecar is ready", async {
        while crate::telemetry::status_of(admin_addr, "/ready").await != Some(200) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;

    use tokio::io::AsyncWriteExt;
    let mut held = Vec::new();
    for i in 0..200 {
        // From two addresses, neither the kubelet's.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("127.0.0.{}:0", 2 + i % 2).parse().unwrap()).unwrap();
        if let Ok(mut tcp) = socket.connect(admin_addr).await {
            let _ = tcp.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\n").await;
            held.push(tcp);
        }
    }
    // The kubelet, from its own address, is still answered.
    assert_eq!(crate::telemetry::status_of(admin_addr, "/ready").await, Some(200), "/ready under the flood");
    // The admin server keeps admin.max_connections of them at most.
    let open = std::fs::read_dir(format!("/proc/{}/fd", sidecar.id().unwrap())).unwrap().count();
    assert!(open < 64 - 8, "{open} descriptors open of 64");
    // The data plane still accepts and answers: here, a method no contract declares.
    let channel = tonic::transport::Channel::from_shared(format!("http://{outbound}")).unwrap().connect_lazy();
    let mut grpc = tonic::client::Grpc::new(channel);
    let status = crate::harness::within("a call beside the flood", async {
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let path = http::uri::PathAndQuery::from_static("/echo.v1.Echo/Shout");
        grpc.unary(tonic::Request::new(()), path, codec).await.unwrap_err()
    })
    .await;
    assert!(status.message().starts_with("protomesh outbound: method /echo.v1.Echo/Shout"), "{status:?}");
    drop(held);
    sidecar.kill().await.unwrap();
}

/// A sidecar process with its admin server on a port of its own; its address.
async fn sidecar_process(dir: &tempfile::TempDir) -> (tokio::process::Child, std::net::SocketAddr) {
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = write_config(
        dir,
        &format!("outbound: {{listen: '127.0.0.1:0'}}\nadmin: {{listen: '127.0.0.1:{admin_port}'}}\n"),
    );
    let sidecar = tokio::process::Command::new(BIN)
        .args(["run", "--config", &config])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (sidecar, format!("127.0.0.1:{admin_port}").parse().unwrap())
}

#[tokio::test]
async fn await_runs_the_app_once_the_sidecar_is_ready_passes_it_signals_and_with_shutdown_stops_the_sidecar_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sidecar, admin) = sidecar_process(&dir).await;
    let admin = admin.to_string();
    // As a classic sidecar's app runs it: the app's command after `--`, its exit code await's own.
    let app = ["await", "--admin", &admin, "--shutdown", "--", "sh", "-c", "echo ready then ran; exit 3"];
    let ran =
        crate::harness::within("the app runs", tokio::process::Command::new(BIN).args(app).output()).await.unwrap();
    assert_eq!(ran.status.code(), Some(3), "{}", text(&ran.stderr));
    assert_eq!(text(&ran.stdout), "ready then ran\n");
    let exit = crate::harness::within("the sidecar exits after the app", sidecar.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");

    // SIGTERM to await (the container's first process) reaches the app.
    let (sidecar, admin) = sidecar_process(&dir).await;
    let admin = admin.to_string();
    let trapping = "trap 'echo told; exit 7' TERM; echo started; while :; do sleep 0.05; done";
    let mut app = tokio::process::Command::new(BIN)
        .args(["await", "--admin", &admin, "--", "sh", "-c", trapping])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(app.stdout.take().unwrap());
    let mut line = String::new();
    crate::harness::within("the app starts", tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line))
        .await
        .unwrap();
    assert_eq!(line, "started\n");
    assert!(Command::new("kill").args(["-TERM", &app.id().unwrap().to_string()]).status().unwrap().success());
    let exit = crate::harness::within("the app exits on SIGTERM", app.wait()).await.unwrap();
    assert_eq!(exit.code(), Some(7), "the app's trap ran: {exit:?}");
    // Without --shutdown, the sidecar stays.
    assert_eq!(crate::telemetry::admin(admin.parse().unwrap(), "GET", "/ready", "").await.0, 200);
    drop(sidecar);
}

#[test]
fn check_shows_the_web_listener_with_its_json_routes_and_a_clash_with_the_app_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "inbound: {app: '127.0.0.1:8080', \
                web: {listen: '127.0.0.1:8081', ports: [8080], methods: ['echo.v1.Echo/Unary']}}\n";
    let output = protomesh(&["check", "--config", &write_config(&dir, yaml)]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        stdout.contains(
            "web listen 127.0.0.1:8081, captured ports [8080] (gRPC-Web, JSON annotated): callers without a \
             certificate may call [echo.v1.Echo/Unary]; origins: same origin only\n    \
             JSON POST /v1/echo -> /echo.v1.Echo/Unary\n    \
             JSON GET /v1/echo/{message} -> /echo.v1.Echo/Unary\n    \
             JSON GET /v1/echo/{message}/payload -> /echo.v1.Echo/Unary\n"
        ),
        "{stdout}"
    );
    let unbound = yaml.replace("methods:", "json: all, methods:").replace("Echo/Unary", "Echo/BidiStream");
    let output = protomesh(&["check", "--config", &write_config(&dir, &unbound)]);
    assert!(
        text(&output.stdout).contains("JSON POST /echo.v1.Echo/BidiStream -> /echo.v1.Echo/BidiStream"),
        "json: all routes a method without options"
    );
    let clash = yaml.replace("app: '127.0.0.1:8080'", "app: '127.0.0.1:8081'");
    let output = protomesh(&["check", "--config", &write_config(&dir, &clash)]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("127.0.0.1:8081 is the sidecar's own inbound.web.listen"), "{stderr}");
}
