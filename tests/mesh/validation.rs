//! Request validation through sidecar processes: the echo contract with
//! `buf.validate` rules (imported from the built-in copy), turned on for
//! the service by its contract option and off for one method by the config.
//! A tonic client's request that breaks a rule is refused INVALID_ARGUMENT
//! with `google.rpc.BadRequest` in the status details, and never reaches the
//! app; a stream is cut at its first bad message; the metric counts the
//! rule; a rule that does not compile is refused at reload, naming its
//! file, message and field, while the running rules stay.

use std::sync::atomic::Ordering;

use prost::Message;
use protomesh::app::ReloadOutcome;
use protomesh_samples::pb::echo::v1::EchoRequest;

use crate::harness::{Mesh, MeshOptions};
use crate::telemetry::{admin, sample};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The echo contract with rules on its request, validated for the whole service.
fn contracts(dir: &std::path::Path, extra_rule: &str) {
    std::fs::create_dir_all(dir.join("examples")).unwrap();
    let echo = std::fs::read_to_string(format!("{REPO}/proto/examples/echo.proto")).unwrap();
    let echo = echo
        .replacen(
            "import \"protomesh/v1/options.proto\";",
            "import \"protomesh/v1/options.proto\";\nimport \"buf/validate/validate.proto\";",
            1,
        )
        .replacen("{ timeout: \"30s\" }", "{ timeout: \"30s\" validate: true }", 1)
        .replacen("string message = 1;", "string message = 1 [(buf.validate.field).string.max_len = 12];", 1)
        .replacen(
            "uint32 reply_count = 5;",
            &format!("uint32 reply_count = 5 [(buf.validate.field).uint32.lte = 10{extra_rule}];"),
            1,
        );
    std::fs::write(dir.join("examples/echo.proto"), echo).unwrap();
    std::fs::copy(format!("{REPO}/proto/examples/shop.proto"), dir.join("examples/shop.proto")).unwrap();
}

/// `google.rpc.Status` and `google.rpc.BadRequest`, as a client reads them.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

#[derive(Clone, PartialEq, Message)]
struct BadRequest {
    #[prost(message, repeated, tag = "1")]
    field_violations: Vec<FieldViolation>,
}

#[derive(Clone, PartialEq, Message)]
struct FieldViolation {
    #[prost(string, tag = "1")]
    field: String,
    #[prost(string, tag = "2")]
    description: String,
    #[prost(string, tag = "3")]
    reason: String,
}

fn request(message: &str) -> EchoRequest {
    EchoRequest { message: message.into(), ..Default::default() }
}

#[tokio::test]
async fn requests_that_break_their_rules_are_refused_with_field_violations_before_the_app_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    contracts(dir.path(), "");
    let mesh = Mesh::start_with(MeshOptions {
        proto_dir: Some(dir.path().display().to_string()),
        server_policy: "{methods: {echo.v1.Echo/ServerStream: {validate: false}}}",
        watch: false,
        ..Default::default()
    })
    .await;
    let mut client = mesh.client();
    let calls = || mesh.backend.calls.load(Ordering::Relaxed);

    assert_eq!(client.unary(request("hello")).await.unwrap().into_inner().message, "hello");
    let seen = calls();
    let broken = EchoRequest { reply_count: 11, ..request("far too long a message") };
    let status = client.unary(broken).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(calls(), seen, "the app never saw the call");
    assert!(
        status.message().starts_with(
            "protomesh inbound: request message 1 to /echo.v1.Echo/Unary breaks the buf.validate rules of \
             echo.v1.EchoRequest: message: value length must be at most 12 characters [string.max_len]"
        ),
        "{}",
        status.message()
    );
    assert!(status.message().ends_with("(validate: true, (protomesh.v1.service))"), "{}", status.message());
    let details = RpcStatus::decode(status.details()).unwrap();
    assert_eq!(details.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(details.details[0].type_url, "type.googleapis.com/google.rpc.BadRequest");
    let bad_request = BadRequest::decode(&details.details[0].value[..]).unwrap();
    let violations: Vec<_> =
        bad_request.field_violations.iter().map(|v| (v.field.as_str(), v.reason.as_str())).collect();
    assert_eq!(violations, [("message", "string.max_len"), ("reply_count", "uint32.lte")]);

    // A stream is checked message by message: the app answers the good ones
    // as they come, and the call ends at the first bad one.
    let (say, said) = tokio::sync::mpsc::channel(4);
    let mut bidi = client.bidi_stream(tokio_stream::wrappers::ReceiverStream::new(said)).await.unwrap().into_inner();
    for message in ["one", "two"] {
        say.send(request(message)).await.unwrap();
        assert_eq!(bidi.message().await.unwrap().unwrap().message, message);
    }
    say.send(request("a message too long")).await.unwrap();
    say.send(request("four")).await.ok();
    let end = bidi.message().await.expect_err("the stream ends with the refusal");
    assert_eq!(end.code(), tonic::Code::InvalidArgument);
    assert!(end.message().contains("request message 3 to /echo.v1.Echo/BidiStream breaks"), "{}", end.message());

    // The config turns it off for one method: its requests go on as they are.
    let unchecked = EchoRequest { reply_count: 11, ..request("long enough to break it") };
    let mut stream = client.server_stream(unchecked).await.unwrap().into_inner();
    let mut replies = 0;
    while stream.message().await.unwrap().is_some() {
        replies += 1;
    }
    assert_eq!(replies, 11);

    let metrics = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    let counted = |method: &str, rule: &str| {
        let series = format!(
            "protomesh_request_validation_failures_total{{service=\"echo.v1.Echo\",method=\"{method}\",rule=\"{rule}\"}}"
        );
        sample(&metrics, &series)
    };
    assert_eq!(counted("Unary", "string.max_len"), Some(1.0), "{metrics}");
    assert_eq!(counted("Unary", "uint32.lte"), Some(1.0));
    assert_eq!(counted("BidiStream", "string.max_len"), Some(1.0));
}

#[tokio::test]
async fn a_rule_that_does_not_compile_is_refused_at_reload_and_the_running_rules_stay() {
    let dir = tempfile::tempdir().unwrap();
    contracts(dir.path(), "");
    let mesh = Mesh::start_with(MeshOptions {
        proto_dir: Some(dir.path().display().to_string()),
        watch: false,
        ..Default::default()
    })
    .await;
    contracts(dir.path(), ", (buf.validate.field).cel = { id: \"odd\", expression: \"this % 2 ==\" }");
    let ReloadOutcome::Failed(error) = mesh.server_sidecar.reload().await else { panic!("the reload must fail") };
    assert!(
        error.contains(
            "examples/echo.proto: message echo.v1.EchoRequest, field reply_count: its buf.validate rules do not compile"
        ),
        "{error}"
    );
    let status = mesh.client().unary(request("still far too long")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "the running rules stay");
}

#[test]
fn check_shows_where_validation_is_on_and_names_a_rule_that_does_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let protomesh =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_protomesh")).args(args).output().unwrap();
    assert!(protomesh(&["certs", "--out", certs.to_str().unwrap(), "web"]).status.success());
    contracts(dir.path(), "");
    let c = certs.display();
    let config = dir.path().join("protomesh.yaml");
    std::fs::write(
        &config,
        format!(
            "identity: {{cert: {c}/web.pem, key: {c}/web-key.pem, trust_bundle: {c}/ca.pem}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{}']}}\n\
             inbound: {{app: '127.0.0.1:8080'}}\n\
             policy: {{methods: {{echo.v1.Echo/ServerStream: {{validate: false}}}}}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let output = protomesh(&["check", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("Unary unary no-side-effects timeout 30s from (protomesh.v1.service) validate true from (protomesh.v1.service)"), "{stdout}");
    assert!(
        stdout.contains(
            "ServerStream server-streaming validate false from config policy.methods[\"echo.v1.Echo/ServerStream\"]"
        ),
        "{stdout}"
    );

    contracts(dir.path(), ", (buf.validate.field).string.min_len = 1");
    let output = protomesh(&["check", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(
            "examples/echo.proto: message echo.v1.EchoRequest, field reply_count: its buf.validate rules do not compile"
        ),
        "{stderr}"
    );
}
