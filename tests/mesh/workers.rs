//! Worker threads: each serves the app connections it is handed and keeps its
//! own connections to peers, so that no call crosses threads.

use protomesh_samples::pb::echo::v1::EchoRequest;
use protomesh_samples::pb::echo::v1::echo_client::EchoClient;

use crate::harness::{Mesh, MeshOptions, within};
use crate::telemetry::{admin, sample};

#[tokio::test]
async fn each_worker_carries_its_share_of_app_connections_over_its_own_peer_connection() {
    let mesh = Mesh::start_with(MeshOptions { worker_threads: 2, ..Default::default() }).await;
    // Four app connections, handed to the client sidecar's two workers in turn.
    let mut apps: Vec<_> = (0..4).map(|_| EchoClient::new(mesh.channel())).collect();
    for (i, app) in apps.iter_mut().enumerate() {
        let request = EchoRequest { message: format!("call {i}"), ..Default::default() };
        let reply = within("call", app.unary(request)).await.unwrap().into_inner();
        assert_eq!(reply.message, format!("call {i}"));
    }
    assert_eq!(mesh.calls(), 4);

    let (_, client) = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(sample(&client, r#"protomesh_open_connections{direction="outbound"}"#), Some(4.0), "{client}");
    let (_, server) = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(
        sample(&server, r#"protomesh_open_connections{direction="inbound"}"#),
        Some(2.0),
        "each of the client sidecar's workers connects to the server on its own: {server}"
    );
}
