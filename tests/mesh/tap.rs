//! `protomesh tap` against a running mesh: the binary reads a sidecar's
//! admin stream while tonic and grpcio clients make calls of all four
//! shapes, and must show each call with its messages decoded from the
//! contracts, redacted fields redacted, and what is past its caps counted;
//! a tap that reads nothing loses events, counted, while calls go on; bad
//! input is refused with the reason, disturbing nothing.

use std::process::Stdio;

use protomesh_samples::pb::echo::v1::EchoRequest;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::harness::{Mesh, MeshOptions, id, within};
use crate::telemetry::{admin, sample};

const BIN: &str = env!("CARGO_BIN_EXE_protomesh");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's contracts, with two fields of the echo request marked
/// redacted: `payload` by protomesh's option, `status_message` by `debug_redact`.
fn contracts_with_redactions() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    let echo = std::fs::read_to_string(format!("{REPO}/proto/examples/echo.proto")).unwrap();
    let echo = echo.replacen("bytes payload = 2;", "bytes payload = 2 [(protomesh.v1.redact) = true];", 1).replacen(
        "string status_message = 4;",
        "string status_message = 4 [debug_redact = true];",
        1,
    );
    std::fs::write(dir.path().join("examples/echo.proto"), echo).unwrap();
    std::fs::copy(format!("{REPO}/proto/examples/shop.proto"), dir.path().join("examples/shop.proto")).unwrap();
    dir
}

/// `protomesh tap` as a user runs it, once it says it is tapping.
async fn tap(admin: std::net::SocketAddr, args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(BIN)
        .args(["tap", "--admin", &admin.to_string(), "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let said = within("the tap starting", stderr.next_line()).await.unwrap().unwrap_or_default();
    assert!(said.starts_with("tapping "), "{said}");
    let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, stdout)
}

async fn next_event(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = within("a tapped call", lines.next_line()).await.unwrap().expect("an event");
    serde_json::from_str(&line).unwrap()
}

fn json_of(messages: &Value) -> Vec<Value> {
    messages.as_array().unwrap().iter().map(|m| m["json"].clone()).collect()
}

#[tokio::test]
async fn a_tap_shows_calls_of_every_shape_decoded_with_redactions_and_caps() {
    let contracts = contracts_with_redactions();
    let proto_dir = Some(contracts.path().display().to_string());
    let mesh = Mesh::start_with(MeshOptions { proto_dir, ..Default::default() }).await;
    let server_admin = mesh.server_sidecar.admin_addr;
    let (_tap, mut events) = tap(server_admin, &["--max-bytes", "128", "--messages", "3"]).await;
    let (_failures, mut failures) = tap(server_admin, &["--status", "NOT_FOUND"]).await;
    let (_outbound, mut outbound) =
        tap(mesh.client_sidecar.admin_addr, &["--method", "echo.v1.Echo/Unary", "--direction", "outbound"]).await;
    let mut client = mesh.client();

    let unary =
        EchoRequest { message: "hello".into(), payload: bytes::Bytes::from_static(b"card 4111"), ..Default::default() };
    client.unary(unary).await.unwrap();
    let event = next_event(&mut events).await;
    assert_eq!((event["direction"].as_str(), event["method"].as_str()), (Some("inbound"), Some("/echo.v1.Echo/Unary")));
    assert_eq!(event["caller"], id("client").as_str());
    assert_eq!(event["status"], "OK");
    assert!(event["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{event}");
    assert!(event["duration_ms"].as_f64().unwrap() >= event["headers_ms"].as_f64().unwrap(), "{event}");
    assert_eq!(json_of(&event["requests"]), [serde_json::json!({"message": "hello", "payload": "[REDACTED]"})]);
    assert_eq!(json_of(&event["responses"])[0]["message"], "hello", "{event}");
    assert_eq!(event["request_metadata"]["content-type"], "application/grpc");
    assert_eq!(event["trailers"]["grpc-status"], "0");

    // The client's sidecar shows its side of the same call: made by its own workload.
    let event = next_event(&mut outbound).await;
    assert_eq!(
        (event["direction"].as_str(), event["caller"].as_str()),
        (Some("outbound"), Some(id("client").as_str()))
    );
    assert!(event["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "the endpoint that answered: {event}");

    // Past --messages, messages are counted; past --max-bytes, shown by their size.
    let streamed = EchoRequest { message: "s".into(), reply_count: 5, reply_payload_bytes: 4, ..Default::default() };
    let mut stream = client.server_stream(streamed).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    let event = next_event(&mut events).await;
    assert_eq!(event["method"], "/echo.v1.Echo/ServerStream");
    assert_eq!((event["responses"].as_array().unwrap().len(), event["responses_skipped"].as_u64()), (3, Some(2)));
    assert_eq!(json_of(&event["responses"])[2]["sequence"], 2);

    let sent = [b"a".to_vec(), vec![7; 200], b"c".to_vec(), b"d".to_vec()].map(|payload| EchoRequest {
        message: "c".into(),
        payload: payload.into(),
        ..Default::default()
    });
    client.client_stream(tokio_stream::iter(sent)).await.unwrap();
    let event = next_event(&mut events).await;
    assert_eq!(event["method"], "/echo.v1.Echo/ClientStream");
    assert_eq!(event["requests"][1], serde_json::json!({"size": 206, "truncated": true}));
    assert_eq!((event["requests"].as_array().unwrap().len(), event["requests_skipped"].as_u64()), (3, Some(1)));

    let said = [
        EchoRequest { message: "b0".into(), ..Default::default() },
        EchoRequest { message: "b1".into(), ..Default::default() },
    ];
    let mut bidi = client.bidi_stream(tokio_stream::iter(said)).await.unwrap().into_inner();
    while bidi.message().await.unwrap().is_some() {}
    let event = next_event(&mut events).await;
    assert_eq!(event["method"], "/echo.v1.Echo/BidiStream");
    assert_eq!(
        json_of(&event["requests"]),
        [serde_json::json!({"message": "b0"}), serde_json::json!({"message": "b1"})]
    );
    assert_eq!(json_of(&event["responses"]).len(), 2);

    let failing = EchoRequest { status_code: 5, status_message: "no such cart".into(), ..Default::default() };
    assert_eq!(client.unary(failing).await.unwrap_err().code(), tonic::Code::NotFound);
    for event in [next_event(&mut events).await, next_event(&mut failures).await] {
        assert_eq!(
            (event["status"].as_str(), event["status_message"].as_str()),
            (Some("NOT_FOUND"), Some("no such cart"))
        );
        assert_eq!(event["requests"][0]["json"]["statusMessage"], "[REDACTED]", "debug_redact: {event}");
    }

    // grpcio, with messages it encodes itself.
    let script = format!("{REPO}/tests/python/tap_calls.py");
    let called = within(
        "grpcio's calls",
        Command::new("python3").args([&script, &mesh.client_sidecar.outbound_addr.to_string()]).output(),
    )
    .await
    .unwrap();
    assert!(called.status.success(), "{}", String::from_utf8_lossy(&called.stderr));
    for (method, first) in
        [("Unary", "py-unary"), ("ServerStream", "py-server"), ("ClientStream", "py-c0"), ("BidiStream", "py-b0")]
    {
        let event = next_event(&mut events).await;
        assert_eq!(event["method"], format!("/echo.v1.Echo/{method}"));
        assert_eq!(event["requests"][0]["json"]["message"], first, "{event}");
        assert!(event["request_metadata"]["user-agent"].as_str().unwrap().contains("grpc-python"), "{event}");
    }
}

#[tokio::test]
async fn a_tap_that_reads_nothing_loses_events_counted_and_calls_go_on() {
    let mesh = Mesh::start().await;
    let server_admin = mesh.server_sidecar.admin_addr;
    // A reader that asks for two events a second, then reads nothing.
    let mut reader = tokio::net::TcpStream::connect(server_admin).await.unwrap();
    reader.write_all(b"GET /tap?rate=2&method=echo.v1.Echo/Unary HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    within("the tap's answer", reader.read_exact(&mut head)).await.unwrap();
    assert_eq!(&head[9..12], b"200");

    let mut client = mesh.client();
    for _ in 0..50 {
        client.unary(EchoRequest::default()).await.expect("a tapped call is served as any other");
    }
    let metrics = admin(server_admin, "GET", "/metrics", "").await.1;
    let lost = sample(&metrics, "protomesh_tap_events_dropped_total{reason=\"rate\"}").unwrap_or(0.0);
    assert!(lost >= 45.0, "two a second, and a burst of two: {metrics}");

    // The next event it reads says how many it lost before it.
    let mut read = String::new();
    let mut buffer = [0u8; 4096];
    while !read.contains("\"lost\"") {
        let n = within("the tap's events", reader.read(&mut buffer)).await.unwrap();
        assert!(n > 0, "{read}");
        read.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    let line = read.lines().find(|line| line.starts_with('{')).unwrap();
    let first: Value = serde_json::from_str(line).unwrap();
    assert_eq!(first["lost"]["rate"], 0, "the first event came before any was lost");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    client.unary(EchoRequest::default()).await.unwrap();
    while read.lines().filter(|line| line.starts_with('{')).count() < 3 {
        let n = within("the tap's events", reader.read(&mut buffer)).await.unwrap();
        assert!(n > 0, "{read}");
        read.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    let third: Value = serde_json::from_str(read.lines().filter(|line| line.starts_with('{')).nth(2).unwrap()).unwrap();
    assert!(third["lost"]["rate"].as_u64().unwrap() >= 45, "{third}");
}

#[tokio::test]
async fn bad_tap_requests_are_refused_with_the_reason_and_running_taps_go_on() {
    let mesh = Mesh::start().await;
    let server_admin = mesh.server_sidecar.admin_addr;
    let (_tap, mut events) = tap(server_admin, &[]).await;
    for (args, said) in [
        (vec!["--method", "shop.v1.Nowhere/Get"], "method=shop.v1.Nowhere/Get: no contract declares it"),
        (vec!["--method", "echo.v1.Echo"], "`echo.v1.Echo` is not a method pattern"),
        (vec!["--status", "SLOW"], "`SLOW` is not a gRPC status code"),
        (vec!["--caller", "web"], "caller=web"),
        (vec!["--rate", "0"], "rate=0: write a number from 1 to 1000"),
    ] {
        let output = within(
            "a refused tap",
            Command::new(BIN).args(["tap", "--admin", &server_admin.to_string()]).args(&args).output(),
        )
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("400 Bad Request") && stderr.contains(said),
            "{args:?}: {stderr}"
        );
    }
    mesh.client().unary(EchoRequest { message: "still".into(), ..Default::default() }).await.unwrap();
    let event = next_event(&mut events).await;
    assert_eq!(event["requests"][0]["json"]["message"], "still");
}
