//! Calls the sidecars refuse themselves, each with the status a gRPC client
//! expects and a message naming the policy or peer that caused it, and none
//! reaching the backend.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use protomesh::identity::certs::DevCa;
use protomesh::identity::{Credentials, ExpectedPeer, Identity};
use protomesh_samples::pb::echo::v1::EchoRequest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Mesh, MeshOptions, id, within};
use crate::telemetry::{admin, sample};

async fn raw_unary(channel: Channel, path: &'static str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoRequest>::default();
    let call =
        grpc.unary(tonic::Request::new(EchoRequest::default()), http::uri::PathAndQuery::from_static(path), codec);
    within(path, call).await.unwrap_err()
}

#[tokio::test]
async fn methods_outside_the_contract_get_unimplemented_from_the_sidecar() {
    let mesh = Mesh::start().await;
    for path in ["/echo.v1.Echo/Shout", "/unknown.v1.Nope/Call"] {
        let status = raw_unary(mesh.channel(), path).await;
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(status.message().starts_with("protomesh outbound:"), "{status:?}");
        assert!(status.message().contains(path) && status.message().contains("contract"), "{status:?}");
    }
    assert_eq!(mesh.calls(), 0);
}

#[tokio::test]
async fn a_contract_service_without_a_route_is_named() {
    let mesh = Mesh::start().await;
    let status = raw_unary(mesh.channel(), "/shop.v1.Checkout/PlaceOrder").await;
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("no route for service shop.v1.Checkout"), "{status:?}");
}

#[tokio::test]
async fn authorization_denies_by_rule_and_names_it() {
    let mesh = Mesh::start_with(MeshOptions {
        authorization: "{default: deny, rules: [
            {name: client-may-stream, methods: ['echo.v1.Echo/ServerStream'], callers: ['spiffe://test.protomesh.local/ns/test/*']},
            {name: only-other-unary, methods: ['echo.v1.Echo/Unary'], callers: ['spiffe://test.protomesh.local/ns/test/sa/other']}]}",
        ..MeshOptions::default()
    })
    .await;
    let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().starts_with("protomesh inbound:"), "{status:?}");
    assert!(
        status.message().contains("\"only-other-unary\"") && status.message().contains(id("client").as_str()),
        "{status:?}"
    );

    let status = within("bidi", mesh.client().bidi_stream(tokio_stream::empty())).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("default is deny"), "{status:?}");
    assert_eq!(mesh.calls(), 0);

    let allowed = EchoRequest { reply_count: 1, ..Default::default() };
    within("stream", mesh.client().server_stream(allowed)).await.expect("a rule allows it");
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused_naming_both() {
    let mesh = Mesh::start_with(MeshOptions { expected_server: id("other"), ..MeshOptions::default() }).await;
    let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let message = status.message();
    assert!(message.contains(&format!("presented identity {}", id("server"))), "{message}");
    assert!(message.contains(&format!("expected {}", id("other"))), "{message}");
    assert_eq!(mesh.calls(), 0);
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable_naming_the_endpoint() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mesh =
        Mesh::start_with(MeshOptions { upstream_endpoint: Some(closed.to_string()), ..MeshOptions::default() }).await;
    let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&format!("endpoint {closed} unreachable")), "{status:?}");
}

#[tokio::test]
async fn plaintext_http2_to_the_inbound_port_is_refused_with_a_status_that_says_why() {
    let mesh = Mesh::start().await;
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();
    let channel = Channel::from_shared(format!("http://{inbound}")).unwrap().connect_lazy();
    for _ in 0..3 {
        let status = raw_unary(channel.clone(), "/echo.v1.Echo/Unary").await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(
            status.message(),
            "protomesh inbound: the inbound listener takes only mTLS from meshed workloads; plaintext refused"
        );
    }
    assert_eq!(mesh.calls(), 0);
    let metrics = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    let refused = "protomesh_tls_handshakes_total{direction=\"inbound\",result=\"plaintext_http2\"}";
    assert_eq!(sample(&metrics, refused), Some(3.0), "one connection per call: the client did not reconnect in a loop");

    // A client that opens no stream is let go within a second.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    within("refusal", tcp.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(answer[3], 0x4, "the server's SETTINGS first: {answer:?}");
}

#[tokio::test]
async fn a_grpc_js_client_in_plaintext_is_told_why_on_its_first_connection() {
    let node_tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        node_tests.join("node_modules/@grpc/grpc-js").exists(),
        "the grpc-js client needs its package: npm ci --prefix tests/node"
    );
    let mesh = Mesh::start().await;
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();
    let called = tokio::process::Command::new("node")
        .arg(node_tests.join("plaintext_call.js"))
        .args([inbound.to_string().as_str(), "/echo.v1.Echo/Unary"])
        .output();
    let output = within("the grpc-js call", called).await.expect("node runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    let status: serde_json::Value = serde_json::from_str(printed.trim())
        .unwrap_or_else(|e| panic!("{e}: {printed}{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(status["code"], 7, "PERMISSION_DENIED, not a retry until the deadline: {status}");
    assert!(status["details"].as_str().unwrap().contains("takes only mTLS from meshed workloads"), "{status}");
    let metrics = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    let refused = "protomesh_tls_handshakes_total{direction=\"inbound\",result=\"plaintext_http2\"}";
    assert_eq!(sample(&metrics, refused), Some(1.0), "one connection");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let mesh = Mesh::start().await;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
    let result = call_inbound_over_tls(&mesh, config).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(mesh.calls(), 0);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let mesh = Mesh::start().await;
    let foreign = DevCa::generate("another CA").unwrap().issue(&id("client")).unwrap();
    let trusted_ca = std::fs::read(mesh.dir.path().join("ca.pem")).unwrap();
    // Trusts the mesh's CA to verify the server, but presents a foreign certificate.
    let identity = Identity::new(
        Credentials::from_pem(foreign.cert_pem.as_bytes(), foreign.key_pem.as_bytes(), &trusted_ca).unwrap(),
    )
    .unwrap();
    let config = Arc::unwrap_or_clone(identity.client_config(ExpectedPeer::Id(id("server"))).unwrap());
    let result = call_inbound_over_tls(&mesh, config).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(mesh.calls(), 0);

    // The same client with a certificate from the mesh CA gets through.
    let own = mesh.ca().issue(&id("client")).unwrap();
    let identity =
        Identity::new(Credentials::from_pem(own.cert_pem.as_bytes(), own.key_pem.as_bytes(), &trusted_ca).unwrap())
            .unwrap();
    let config = Arc::unwrap_or_clone(identity.client_config(ExpectedPeer::Id(id("server"))).unwrap());
    let response = call_inbound_over_tls(&mesh, config).await.expect("a mesh certificate is accepted");
    assert_eq!(response.headers().get("grpc-status").map(|v| v.as_bytes()), None, "{response:?}");
}

#[tokio::test]
async fn a_client_certificate_with_two_uri_sans_proves_no_identity() {
    let mesh = Mesh::start().await;
    let read = |name: &str| std::fs::read_to_string(mesh.dir.path().join(name)).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let admin = "spiffe://test.protomesh.local/ns/test/sa/admin";
    params.subject_alt_names = vec![
        rcgen::SanType::URI(id("client").as_str().try_into().unwrap()),
        rcgen::SanType::URI(admin.try_into().unwrap()),
    ];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let refused =
        Credentials::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), read("ca.pem").as_bytes());
    assert!(refused.unwrap_err().1.contains("2 URI SANs"), "nor is it taken as a sidecar's own");

    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(vec![cert.der().clone()], key)
        .unwrap();
    let response = call_inbound_over_tls(&mesh, config).await.expect("the handshake succeeds: the chain is valid");
    assert_eq!(response.headers()["grpc-status"], "16", "{response:?}");
    let message = response.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("2 URI SANs; an X.509-SVID has exactly one"), "{message}");
    assert_eq!(mesh.calls(), 0);
}

/// One gRPC call straight to the server sidecar's inbound port over TLS.
pub async fn call_inbound_over_tls(
    mesh: &Mesh,
    mut config: rustls::ClientConfig,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();
    within("direct TLS call", async {
        let tcp = tokio::net::TcpStream::connect(inbound).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(inbound.ip().into()), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(connection);
        let request = http::Request::post(format!("https://{inbound}/echo.v1.Echo/Unary"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        sender.send_request(request).await.map_err(|e| format!("request: {e}"))
    })
    .await
}

/// Accepts any server certificate: these tests are about what the server refuses.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}
