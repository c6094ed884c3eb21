//! JSON over HTTP through the server sidecar's `inbound.web` listener, by
//! the routes of `google.api.http` options in `proto/examples/echo.proto`:
//! unary calls by path, query and body, a server stream as a JSON array,
//! failures as JSON `google.rpc.Status` with gRPC's HTTP mapping, the
//! routes following a reload, and the same calls made with curl.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use protomesh::app::ReloadOutcome;

use crate::harness::{Mesh, MeshOptions, has_curl};

const WEB: &str = "{listen: '127.0.0.1:0', json: all, \
                   methods: ['echo.v1.Echo/Unary', 'echo.v1.Echo/ServerStream', 'echo.v1.Echo/ClientStream']}";

async fn mesh() -> Mesh {
    Mesh::start_with(MeshOptions {
        web: Some(WEB),
        server_policy: "{methods: {echo.v1.Echo/ServerStream: {max_message_size: 1KiB}}}",
        ..Default::default()
    })
    .await
}

/// A JSON call: (HTTP status, headers, body as JSON).
async fn call(mesh: &Mesh, method: http::Method, path: &str, body: &str) -> (u16, http::HeaderMap, Value) {
    let headers = [
        ("content-type", "application/json"),
        ("x-echo-note", "by json"),
        // Headers of the HTTP/1.1 connection, which HTTP/2 forbids: not sent on.
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
    ];
    let (status, headers, body) = mesh.web_request(method, path, &headers, body.to_string()).await;
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
    assert_eq!(headers["content-type"], "application/json");
    (status.as_u16(), headers, json)
}

#[tokio::test]
async fn json_calls_reach_the_app_by_the_contracts_routes() {
    let mesh = mesh().await;
    let (status, _, reply) =
        call(&mesh, http::Method::POST, "/v1/echo", r#"{"message": "hi", "payload": "AQID"}"#).await;
    assert_eq!((status, &reply), (200, &json!({"message": "hi", "payload": "AQID", "receivedBytes": "3"})));
    assert_eq!(mesh.backend.last_header("x-echo-note").as_deref(), Some("by json"), "headers go on as metadata");
    assert_eq!(mesh.backend.last_header("content-type").as_deref(), Some("application/grpc"));

    let (status, _, reply) = call(&mesh, http::Method::GET, "/v1/echo/hello%20there", "").await;
    assert_eq!((status, &reply), (200, &json!({"message": "hello there"})), "a path variable, decoded");

    let (status, _, reply) = call(&mesh, http::Method::GET, "/v1/echo/x/payload?payload=BwcH", "").await;
    assert_eq!((status, &reply), (200, &json!("BwcH")), "response_body: the field alone");

    let (status, _, reply) = call(&mesh, http::Method::POST, "/echo.v1.Echo/Unary", r#"{"message": "plain"}"#).await;
    assert_eq!((status, &reply["message"]), (200, &json!("plain")), "json: all adds POST /pkg.Service/Method");
}

#[tokio::test]
async fn a_server_stream_is_a_json_array() {
    let mesh = mesh().await;
    let (status, _, replies) = call(&mesh, http::Method::GET, "/v1/echo/s:stream?replyCount=3", "").await;
    assert_eq!(status, 200);
    assert_eq!(replies, json!([{"message": "s"}, {"message": "s", "sequence": 1}, {"message": "s", "sequence": 2}]));
    let (status, _, replies) = call(&mesh, http::Method::GET, "/v1/echo/none:stream", "").await;
    assert_eq!((status, replies), (200, json!([])), "no messages: an empty array");

    let (status, _, error) =
        call(&mesh, http::Method::GET, "/v1/echo/s:stream?statusCode=5&statusMessage=gone", "").await;
    assert_eq!((status, &error), (404, &json!({"code": 5, "message": "gone"})), "failing before a message: its status");

    // Failing after the first message: the body breaks off, never a whole array.
    let addr = mesh.server_sidecar.web_addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("/v1/echo/s:stream?replyCount=2&statusCode=14&failFirst=0")
        .header("host", "shop.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let read = http_body_util::BodyExt::collect(response.into_body()).await;
    assert!(read.is_err(), "a stream that failed after it began is cut: {:?}", read.map(|b| b.to_bytes()));
}

#[tokio::test]
async fn failures_are_json_statuses_under_the_http_status_grpc_maps_them_to() {
    let mesh = mesh().await;
    let failing = r#"{"message": "x", "statusCode": 9, "statusMessage": "not now"}"#;
    let (status, _, error) = call(&mesh, http::Method::POST, "/v1/echo", failing).await;
    assert_eq!((status, &error), (400, &json!({"code": 9, "message": "not now"})), "FAILED_PRECONDITION");

    let calls = mesh.backend.calls.load(Ordering::Relaxed);
    let (status, _, error) = call(&mesh, http::Method::POST, "/v1/echo", r#"{"message": "#).await;
    assert_eq!((status, &error["code"]), (400, &json!(3)));
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "protomesh inbound: /echo.v1.Echo/Unary: the body is not the JSON of echo.v1.EchoRequest: EOF while parsing"
        ),
        "{message}"
    );
    let (status, _, error) = call(&mesh, http::Method::GET, "/v1/echo/x?replyCount=many", "").await;
    assert_eq!((status, &error["code"]), (400, &json!(3)), "{error}");
    let (status, _, error) = call(&mesh, http::Method::GET, "/v1/echo/x?nope=1", "").await;
    assert!(status == 400 && error["message"].as_str().unwrap().contains("query parameter `nope`"), "{error}");

    let (status, _, error) = call(&mesh, http::Method::GET, "/v2/nothing", "").await;
    assert_eq!((status, &error["code"]), (404, &json!(5)));
    assert!(error["message"].as_str().unwrap().contains("no JSON route answers GET /v2/nothing"), "{error}");
    let (status, headers, error) = call(&mesh, http::Method::DELETE, "/v1/echo", "").await;
    assert_eq!((status, &headers["allow"], &error["code"]), (405, &"POST".parse().unwrap(), &json!(12)), "{error}");
    let (status, _, error) = call(&mesh, http::Method::POST, "/v1/echo:collect", "{}").await;
    assert_eq!((status, &error["code"]), (501, &json!(12)), "client-streaming: {error}");
    let (status, _, error) = call(&mesh, http::Method::GET, "/v1/stock/abc", "").await;
    assert_eq!(status, 404, "a route of a method inbound.web.methods does not list: {error}");

    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(2048));
    let (status, _, error) = call(&mesh, http::Method::POST, "/echo.v1.Echo/ServerStream", &big).await;
    assert_eq!((status, &error["code"]), (413, &json!(8)), "over max_message_size: {error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("/echo.v1.Echo/ServerStream: the body exceeds 1024 bytes, the method's max_message_size"));
    assert_eq!(mesh.backend.calls.load(Ordering::Relaxed), calls, "the app saw none of them");
}

#[tokio::test]
async fn routes_follow_a_reload_and_a_binding_that_does_not_fit_keeps_the_running_ones() {
    let protos = tempfile::tempdir().unwrap();
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/examples");
    std::fs::create_dir(protos.path().join("examples")).unwrap();
    let echo = std::fs::read_to_string(format!("{repo}/echo.proto")).unwrap();
    let write = |echo: &str| std::fs::write(protos.path().join("examples/echo.proto"), echo).unwrap();
    write(&echo);
    std::fs::copy(format!("{repo}/shop.proto"), protos.path().join("examples/shop.proto")).unwrap();
    let mesh = Mesh::start_with(MeshOptions {
        web: Some(WEB),
        proto_dir: Some(protos.path().display().to_string()),
        watch: false,
        ..Default::default()
    })
    .await;
    assert_eq!(call(&mesh, http::Method::GET, "/v1/echo/a", "").await.0, 200);

    write(&echo.replace(r#"get: "/v1/echo/{message}" }"#, r#"get: "/v2/echo/{message}" }"#));
    assert_eq!(mesh.server_sidecar.reload().await, ReloadOutcome::Applied);
    assert_eq!(call(&mesh, http::Method::GET, "/v2/echo/b", "").await.2["message"], "b");
    assert_eq!(call(&mesh, http::Method::GET, "/v1/echo/a", "").await.0, 404, "the old route is gone");

    write(&echo.replace(r#"get: "/v1/echo/{message}" }"#, r#"get: "/v1/echo/{nope}" }"#));
    let ReloadOutcome::Failed(error) = mesh.server_sidecar.reload().await else { panic!("the reload must fail") };
    assert!(
        error.contains(
            "examples/echo.proto: method /echo.v1.Echo/Unary: google.api.http `GET /v1/echo/{nope}`: \
             echo.v1.EchoRequest has no field `nope`"
        ),
        "{error}"
    );
    assert_eq!(call(&mesh, http::Method::GET, "/v2/echo/c", "").await.2["message"], "c", "the running routes stay");
}

#[tokio::test]
async fn curl_makes_json_calls() {
    if !has_curl() {
        return;
    }
    let mesh = mesh().await;
    let base = format!("http://{}", mesh.server_sidecar.web_addr.unwrap());
    let curl = |args: Vec<String>| async move {
        let output = tokio::process::Command::new("curl").args(["-sS"]).args(args).output().await.unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let posted = curl(vec![
        "-H".into(),
        "content-type: application/json".into(),
        "-d".into(),
        r#"{"message": "from curl"}"#.into(),
        format!("{base}/v1/echo"),
    ])
    .await;
    assert_eq!(posted["message"], "from curl");
    let streamed = curl(vec![format!("{base}/v1/echo/s:stream?replyCount=2")]).await;
    assert_eq!(streamed.as_array().map(Vec::len), Some(2));
    let refused = curl(vec!["-X".into(), "POST".into(), "-d".into(), "{".into(), format!("{base}/v1/echo")]).await;
    assert_eq!(refused["code"], 3);
}
