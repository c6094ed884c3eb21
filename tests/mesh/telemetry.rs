//! The admin server and the metrics, scraped after known traffic.

use std::net::SocketAddr;

use protomesh_samples::pb::echo::v1::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, within};

/// One HTTP/1.0 request to an admin server: its status code and body.
pub async fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    within("admin request", async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("{method} {path} HTTP/1.0\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    })
    .await
}

/// The status an admin server answers a GET with, or `None` while it does not answer.
pub async fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The value of the sample whose line starts with `series` (name and labels).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
}

#[tokio::test]
async fn probes_answer_and_unknown_paths_are_named() {
    let mesh = Mesh::start().await;
    let admin_addr = mesh.client_sidecar.admin_addr;
    assert_eq!(admin(admin_addr, "GET", "/live", "").await, (200, "live\n".into()));
    assert_eq!(admin(admin_addr, "GET", "/ready", "").await, (200, "ready\n".into()));
    assert_eq!(admin(admin_addr, "POST", "/metrics", "").await.0, 405);
    let (status, body) = admin(admin_addr, "GET", "/nope", "").await;
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    let (status, _) = admin(admin_addr, "PUT", "/log-level", "debug").await;
    assert_eq!(status, 501, "a sidecar started without a log handle says so");
}

#[tokio::test]
async fn requests_are_counted_by_direction_method_and_status() {
    let mesh = Mesh::start().await;
    for _ in 0..3 {
        within("ok", mesh.client().unary(EchoRequest::default())).await.unwrap();
    }
    for _ in 0..2 {
        let failing = EchoRequest { status_code: Code::NotFound as i32, ..Default::default() };
        within("not found", mesh.client().unary(failing)).await.unwrap_err();
    }
    let streamed = EchoRequest { reply_count: 2, status_code: Code::Aborted as i32, ..Default::default() };
    let mut stream = within("stream", mesh.client().server_stream(streamed)).await.unwrap().into_inner();
    while within("stream", stream.message()).await.is_ok_and(|m| m.is_some()) {}

    let (_, client) = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await;
    let outbound = r#"protomesh_requests_total{direction="outbound",service="echo.v1.Echo",method="Unary""#;
    assert_eq!(sample(&client, &format!(r#"{outbound},grpc_status="OK"}}"#)), Some(3.0), "{client}");
    assert_eq!(sample(&client, &format!(r#"{outbound},grpc_status="NOT_FOUND"}}"#)), Some(2.0), "{client}");
    let stream_aborted = r#"protomesh_requests_total{direction="outbound",service="echo.v1.Echo",method="ServerStream",grpc_status="ABORTED"}"#;
    assert_eq!(sample(&client, stream_aborted), Some(1.0), "the status in the trailers counts: {client}");
    let latency = r#"protomesh_request_duration_seconds_count{direction="outbound",service="echo.v1.Echo",method="Unary",grpc_status="OK"}"#;
    assert_eq!(sample(&client, latency), Some(3.0), "{client}");
    assert!(sample(&client, "process_resident_memory_bytes").is_some_and(|bytes| bytes > 0.0), "{client}");

    let (_, server) = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await;
    let inbound =
        r#"protomesh_requests_total{direction="inbound",service="echo.v1.Echo",method="Unary",grpc_status="OK"}"#;
    assert_eq!(sample(&server, inbound), Some(3.0), "{server}");
    assert!(
        sample(&server, r#"protomesh_tls_handshakes_total{direction="inbound",result="ok"}"#).is_some_and(|n| n >= 1.0)
    );
    assert_eq!(sample(&server, r#"protomesh_open_connections{direction="inbound"}"#), Some(1.0), "{server}");
}

#[tokio::test]
async fn refusals_and_policy_actions_are_counted() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{defaults: {retry: {max_attempts: 3, retryable_codes: [UNAVAILABLE], initial_backoff: 1ms}},
                         methods: {echo.v1.Echo/ServerStream: {concurrency: {max_in_flight: 1}}}}",
        authorization: "{rules: [{name: nobody-streams, methods: ['echo.v1.Echo/BidiStream'], callers: ['spiffe://x/y']}]}",
        ..Default::default()
    })
    .await;
    let flaky =
        EchoRequest { message: "m".into(), fail_first: 2, status_code: Code::Unavailable as i32, ..Default::default() };
    within("retried", mesh.client().unary(flaky)).await.unwrap();
    let held = EchoRequest { reply_count: 1, delay_ms: 30_000, ..Default::default() };
    let _held = within("held", mesh.client().server_stream(held)).await.unwrap();
    within("refused", mesh.client().server_stream(EchoRequest::default())).await.unwrap_err();
    let mut raw = tonic::client::Grpc::new(mesh.channel());
    raw.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoRequest>::default();
    let path = http::uri::PathAndQuery::from_static("/echo.v1.Echo/Shout");
    within("unknown", raw.unary(tonic::Request::new(EchoRequest::default()), path, codec)).await.unwrap_err();
    within("denied", mesh.client().bidi_stream(tokio_stream::empty())).await.unwrap_err();

    let (_, client) = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await;
    let retries = r#"protomesh_retries_total{direction="outbound",service="echo.v1.Echo",method="Unary"}"#;
    assert_eq!(sample(&client, retries), Some(2.0), "{client}");
    let rejections = r#"protomesh_bulkhead_rejections_total{bulkhead="method /echo.v1.Echo/ServerStream"#;
    assert_eq!(sample(&client, rejections), Some(1.0), "{client}");
    assert_eq!(sample(&client, r#"protomesh_refused_total{direction="outbound",reason="unknown_method"}"#), Some(1.0));

    let (_, server) = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await;
    let denied = r#"protomesh_requests_total{direction="inbound",service="echo.v1.Echo",method="BidiStream",grpc_status="PERMISSION_DENIED"}"#;
    assert_eq!(sample(&server, denied), Some(1.0), "{server}");
}

#[tokio::test]
async fn config_shows_each_methods_effective_policy_and_its_source() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{methods: {echo.v1.Echo/Unary: {timeout: 300ms}}}",
        ..Default::default()
    })
    .await;
    let (status, body) = admin(mesh.client_sidecar.admin_addr, "GET", "/config", "").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let unary = config["methods"].as_array().unwrap().iter().find(|m| m["path"] == "/echo.v1.Echo/Unary").unwrap();
    assert_eq!(unary["timeout"]["value"], "300ms");
    assert_eq!(unary["timeout"]["source"], "config policy.methods[\"echo.v1.Echo/Unary\"]");
    assert_eq!(unary["idempotency"], "no-side-effects");
}

/// An address of this machine other than loopback, if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.255:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[tokio::test]
async fn what_reveals_or_changes_state_is_answered_on_localhost_only() {
    let Some(outside) = outside_address() else {
        eprintln!("skipped: this machine has no address but loopback to call from");
        return;
    };
    let mesh = Mesh::start_with(MeshOptions { admin_listen: "0.0.0.0:0", ..Default::default() }).await;
    let port = mesh.client_sidecar.admin_addr.port();
    let remote = SocketAddr::new(outside, port);
    for (method, path) in [("GET", "/config"), ("PUT", "/log-level"), ("POST", "/reload")] {
        let (status, body) = admin(remote, method, path, "debug").await;
        assert_eq!(status, 403, "{method} {path} from {outside}: {body}");
        assert!(body.contains("only from localhost (set admin.allow_remote"), "{body}");
    }
    assert_eq!(admin(remote, "GET", "/ready", "").await.0, 200, "the kubelet's probes are answered");
    assert_eq!(admin(remote, "GET", "/metrics", "").await.0, 200, "and Prometheus' scrapes");
    let local = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
    assert_eq!(admin(local, "GET", "/config", "").await.0, 200);
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_dropped() {
    use tokio::io::AsyncReadExt;
    let mesh = Mesh::start_with(MeshOptions { watch: false, ..Default::default() }).await;
    mesh.edit_config(
        "client",
        "admin: {listen: '127.0.0.1:0'}",
        "admin: {listen: '127.0.0.1:0', header_read_timeout: 200ms}",
    );
    assert_eq!(mesh.client_sidecar.reload().await, protomesh::app::ReloadOutcome::Applied);
    let mut tcp = tokio::net::TcpStream::connect(mesh.client_sidecar.admin_addr).await.unwrap();
    tcp.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut answer = Vec::new();
    within("the slow request is dropped", tcp.read_to_end(&mut answer)).await.unwrap();
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn a_request_id_is_kept_when_the_app_sends_one_and_made_when_it_does_not() {
    let mesh = Mesh::start_with(MeshOptions { access_log: true, ..Default::default() }).await;
    let mut request = tonic::Request::new(EchoRequest { message: "with".into(), ..Default::default() });
    request.metadata_mut().insert("x-request-id", "order-42".parse().unwrap());
    within("with an ID", mesh.client().unary(request)).await.unwrap();
    assert_eq!(mesh.backend.header_of("with", "x-request-id").as_deref(), Some("order-42"));

    let request = EchoRequest { message: "without".into(), ..Default::default() };
    within("without an ID", mesh.client().unary(request)).await.unwrap();
    let made = mesh.backend.header_of("without", "x-request-id").expect("one was made and passed on");
    assert_eq!(made.len(), 36, "a UUID: {made}");
}

#[tokio::test]
async fn without_an_access_log_or_traces_no_request_id_is_made_but_one_sent_goes_through() {
    let mesh = Mesh::start().await;
    within("without an ID", mesh.client().unary(EchoRequest { message: "none".into(), ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(mesh.backend.header_of("none", "x-request-id"), None);
    let mut request = tonic::Request::new(EchoRequest { message: "sent".into(), ..Default::default() });
    request.metadata_mut().insert("x-request-id", "order-43".parse().unwrap());
    within("with an ID", mesh.client().unary(request)).await.unwrap();
    assert_eq!(mesh.backend.header_of("sent", "x-request-id").as_deref(), Some("order-43"));
}
