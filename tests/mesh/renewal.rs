//! Certificate renewal: new certificate files are picked up for new
//! handshakes without a restart, while calls go on; files that do not load
//! leave the current certificate in place.

use std::sync::Arc;

use protomesh::identity::Identity;
use protomesh::pb::echo::v1::EchoRequest;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use crate::harness::{Mesh, id, within};

/// The certificate the server sidecar presents to a new TLS connection.
async fn presented(mesh: &Mesh) -> Vec<u8> {
    let dir = mesh.dir.path();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let client = Identity::from_pem(&read("client.pem"), &read("client-key.pem"), &read("ca.pem")).unwrap();
    let config = client.client_config(id("server")).unwrap();
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(ServerName::IpAddress(inbound.ip().into()), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

#[tokio::test]
async fn a_renewed_certificate_is_used_for_new_handshakes_without_a_restart() {
    let mesh = Mesh::start().await;
    let original = std::fs::read_to_string(mesh.dir.path().join("server.pem")).unwrap();
    assert_eq!(presented(&mesh).await, der_of(&original));
    within("a call before", mesh.client().unary(EchoRequest::default())).await.unwrap();

    let renewed = mesh.ca().issue(&id("server")).unwrap();
    std::fs::write(mesh.dir.path().join("server-key.pem"), &renewed.key_pem).unwrap();
    std::fs::write(mesh.dir.path().join("server.pem"), &renewed.cert_pem).unwrap();
    within("the renewed certificate is presented", async {
        while presented(&mesh).await != der_of(&renewed.cert_pem) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    // The client sidecar's pooled connection, made before the renewal, still carries calls.
    within("a call after", mesh.client().unary(EchoRequest::default())).await.unwrap();
}

#[tokio::test]
async fn files_that_do_not_load_leave_the_current_certificate() {
    let mesh = Mesh::start().await;
    let original = std::fs::read_to_string(mesh.dir.path().join("server.pem")).unwrap();
    std::fs::write(mesh.dir.path().join("server.pem"), "not a certificate").unwrap();
    // Several reload intervals pass; there is no event for a renewal refused.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(presented(&mesh).await, der_of(&original));
    within("calls go on", mesh.client().unary(EchoRequest::default())).await.unwrap();

    let other = mesh.ca().issue(&id("other")).unwrap();
    std::fs::write(mesh.dir.path().join("server-key.pem"), &other.key_pem).unwrap();
    std::fs::write(mesh.dir.path().join("server.pem"), &other.cert_pem).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(presented(&mesh).await, der_of(&original), "a certificate for another identity is refused");
}
