//! gRPC-Web through the server sidecar's `inbound.web` listener, as a
//! browser's client sends it over HTTP/1.1: binary and text, unary and
//! server streaming, trailers in the body; only the methods opened to
//! callers without a certificate; CORS preflights; and the same calls made
//! with curl.

use base64::Engine;
use bytes::Bytes;
use prost::Message;
use protomesh_samples::pb::echo::v1::{EchoReply, EchoRequest};

use crate::harness::{Mesh, MeshOptions, has_curl, within};

const WEB: &str = "{listen: '127.0.0.1:0', methods: ['echo.v1.Echo/Unary', 'echo.v1.Echo/ServerStream'], \
                   allowed_origins: ['http://shop.test']}";

async fn mesh() -> Mesh {
    Mesh::start_with(MeshOptions { web: Some(WEB), ..Default::default() }).await
}

fn framed(message: &impl Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed
}

/// The frames of a gRPC-Web body: messages, and the trailers as text.
fn frames(mut body: &[u8]) -> (Vec<Bytes>, Option<String>) {
    let (mut messages, mut trailers) = (Vec::new(), None);
    while body.len() >= 5 {
        let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let payload = Bytes::copy_from_slice(&body[5..5 + length]);
        if body[0] & 0x80 != 0 {
            trailers = Some(String::from_utf8(payload.to_vec()).unwrap());
        } else {
            messages.push(payload);
        }
        body = &body[5 + length..];
    }
    assert!(body.is_empty(), "nothing after the last frame");
    (messages, trailers)
}

#[tokio::test]
async fn unary_and_streaming_calls_in_binary_and_text_with_trailers_in_the_body() {
    let mesh = mesh().await;
    let grpc_web = [("content-type", "application/grpc-web+proto"), ("x-grpc-web", "1")];
    let hello = framed(&EchoRequest { message: "hello".into(), ..Default::default() });
    // The caller header it names itself with never reaches the app.
    let spoofing = [grpc_web[0], grpc_web[1], ("protomesh-caller-id", "spiffe://cluster.local/ns/shop/sa/admin")];
    let (status, headers, body) =
        mesh.web_request(http::Method::POST, "/echo.v1.Echo/Unary", &spoofing, hello.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/grpc-web+proto");
    let (messages, trailers) = frames(&body);
    assert!(!messages.is_empty(), "{headers:?} {trailers:?}");
    let reply = EchoReply::decode(&messages[0][..]).unwrap();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.caller, "", "no caller identity reaches the app for a caller without a certificate");
    assert!(trailers.unwrap().contains("grpc-status: 0\r\n"));

    let text = [("content-type", "application/grpc-web-text"), ("accept", "application/grpc-web-text")];
    let encoded = base64::engine::general_purpose::STANDARD.encode(&hello).into_bytes();
    let (status, headers, body) = mesh.web_request(http::Method::POST, "/echo.v1.Echo/Unary", &text, encoded).await;
    assert_eq!(
        (status, headers["content-type"].to_str().unwrap()),
        (http::StatusCode::OK, "application/grpc-web-text+proto")
    );
    let body = base64::engine::general_purpose::STANDARD.decode(body).expect("one base64 run");
    let (messages, trailers) = frames(&body);
    assert_eq!(EchoReply::decode(&messages[0][..]).unwrap().message, "hello");
    assert!(trailers.unwrap().contains("grpc-status: 0\r\n"));

    // Text that is not base64 is refused saying so, not as a call that broke off.
    let calls = mesh.backend.calls.load(std::sync::atomic::Ordering::Relaxed);
    for bad in [&b"AAAA!!!!"[..], b"AAAAAAc"] {
        let (_, headers, _) = mesh.web_request(http::Method::POST, "/echo.v1.Echo/Unary", &text, bad.to_vec()).await;
        assert_eq!(headers["grpc-status"], "3", "INVALID_ARGUMENT: {headers:?}");
        assert!(protomesh::grpc::message_in(&headers).contains("the gRPC-Web text body is not base64"), "{headers:?}");
    }
    assert_eq!(mesh.backend.calls.load(std::sync::atomic::Ordering::Relaxed), calls, "the app answered none of them");

    let streamed = framed(&EchoRequest { message: "s".into(), reply_count: 3, ..Default::default() });
    let (_, _, body) = mesh.web_request(http::Method::POST, "/echo.v1.Echo/ServerStream", &grpc_web, streamed).await;
    let (messages, trailers) = frames(&body);
    let sequence: Vec<u32> = messages.iter().map(|m| EchoReply::decode(&m[..]).unwrap().sequence).collect();
    assert_eq!(sequence, [0, 1, 2]);
    assert!(trailers.unwrap().contains("grpc-status: 0\r\n"));

    let failing = framed(&EchoRequest { status_code: 5, status_message: "no such cart".into(), ..Default::default() });
    let (_, headers, body) = mesh.web_request(http::Method::POST, "/echo.v1.Echo/Unary", &grpc_web, failing).await;
    let status = headers.get("grpc-status").map(|s| s.to_str().unwrap().to_string());
    let trailers = frames(&body).1.unwrap_or_default();
    assert!(status.as_deref() == Some("5") || trailers.contains("grpc-status: 5\r\n"), "{headers:?} {trailers}");
}

#[tokio::test]
async fn only_the_opened_methods_and_origins_are_served() {
    let mesh = mesh().await;
    let grpc_web = [("content-type", "application/grpc-web+proto")];
    let said = framed(&EchoRequest { message: "b".into(), ..Default::default() });
    let (status, headers, _) = mesh.web_request(http::Method::POST, "/echo.v1.Echo/BidiStream", &grpc_web, said).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "7", "PERMISSION_DENIED: {headers:?}");
    let message = protomesh::grpc::message_in(&headers);
    assert!(message.contains("a caller without a certificate may not call /echo.v1.Echo/BidiStream"), "{message}");
    assert!(message.contains("inbound.web.methods does not list it"), "{message}");

    // Peers' health checks are answered whatever the rules; a browser's are not.
    let (_, headers, _) =
        mesh.web_request(http::Method::POST, "/grpc.health.v1.Health/Check", &grpc_web, vec![0; 5]).await;
    assert_eq!(headers["grpc-status"], "12", "UNIMPLEMENTED, as any method outside the contracts: {headers:?}");

    let preflight = [
        ("origin", "http://shop.test"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type,x-grpc-web,x-user-agent"),
    ];
    let (status, headers, _) =
        mesh.web_request(http::Method::OPTIONS, "/echo.v1.Echo/Unary", &preflight, Vec::new()).await;
    assert_eq!(status, 204);
    assert_eq!(headers["access-control-allow-origin"], "http://shop.test");
    assert_eq!(headers["access-control-allow-headers"], "content-type,x-grpc-web,x-user-agent");

    let elsewhere = [("origin", "http://evil.test"), ("content-type", "application/grpc-web+proto")];
    let hello = framed(&EchoRequest { message: "hello".into(), ..Default::default() });
    let calls = mesh.backend.calls.load(std::sync::atomic::Ordering::Relaxed);
    let (status, _, body) = mesh.web_request(http::Method::POST, "/echo.v1.Echo/Unary", &elsewhere, hello).await;
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("origin http://evil.test is not in inbound.web.allowed_origins"));
    assert_eq!(mesh.backend.calls.load(std::sync::atomic::Ordering::Relaxed), calls, "refused before the app");

    let json_messages = [("content-type", "application/grpc-web+json")];
    let (status, _, body) =
        mesh.web_request(http::Method::POST, "/echo.v1.Echo/Unary", &json_messages, Vec::new()).await;
    assert_eq!(status, 415);
    assert!(String::from_utf8_lossy(&body).contains("`application/grpc-web+json` is not served here"));
}

#[tokio::test]
async fn curl_makes_a_grpc_web_call() {
    if !has_curl() {
        return;
    }
    let mesh = mesh().await;
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request.bin");
    std::fs::write(&request, framed(&EchoRequest { message: "from curl".into(), ..Default::default() })).unwrap();
    let addr = mesh.server_sidecar.web_addr.unwrap();
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "-H", "content-type: application/grpc-web+proto", "--data-binary"])
        .arg(format!("@{}", request.display()))
        .arg(format!("http://{addr}/echo.v1.Echo/Unary"))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (messages, trailers) = frames(&output.stdout);
    assert_eq!(EchoReply::decode(&messages[0][..]).unwrap().message, "from curl");
    assert!(trailers.unwrap().contains("grpc-status: 0\r\n"));
}

#[tokio::test]
async fn a_connect_web_client_calls_through_the_listener() {
    let node_tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        node_tests.join("node_modules/@connectrpc/connect-web").exists(),
        "the gRPC-Web client needs its packages: npm ci --prefix tests/node"
    );
    let mesh = mesh().await;
    let dir = tempfile::tempdir().unwrap();
    let descriptors = dir.path().join("echo.binpb");
    let protos = ["examples/echo.proto", "examples/shop.proto"];
    let set = protox::compile(protos, [concat!(env!("CARGO_MANIFEST_DIR"), "/proto")]).unwrap();
    std::fs::write(&descriptors, set.encode_to_vec()).unwrap();
    let base_url = format!("http://{}", mesh.server_sidecar.web_addr.unwrap());
    let called = tokio::process::Command::new("node")
        .arg(node_tests.join("grpc_web_calls.mjs"))
        .arg(&base_url)
        .arg(&descriptors)
        .output();
    let output = within("the connect-web calls", called).await.expect("node runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    let seen: serde_json::Value = serde_json::from_str(printed.trim())
        .unwrap_or_else(|e| panic!("{e}: {printed}{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(seen["unary"], "from a browser", "{seen}");
    assert_eq!(seen["caller"], "", "{seen}");
    assert_eq!(seen["streamed"], serde_json::json!([0, 1, 2]), "{seen}");
    assert_eq!(seen["denied"]["code"], 7, "PERMISSION_DENIED: {seen}");
    let denied = seen["denied"]["message"].as_str().unwrap();
    assert!(denied.contains("may not call /shop.v1.Inventory/GetStock: inbound.web.methods does not list it"));
}
