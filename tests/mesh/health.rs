//! Active health checks between sidecars: an endpoint whose app says
//! NOT_SERVING gets no calls until it serves again, and a server sidecar
//! answers health checks for an app that has no health service.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protomesh::grpc_health::{self, ServingStatus};
use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic_health::ServingStatus as AppStatus;

use crate::harness::{Mesh, MeshOptions, within};
use crate::telemetry::{admin, sample};

/// One failed check takes an endpoint out, one SERVING brings it back.
const CHECKED: &str = "health_check: {interval: 100ms, timeout: 100ms, unhealthy_threshold: 1}";

/// Waits until the client sidecar counts `count` endpoints not serving.
async fn not_serving(mesh: &Mesh, count: f64) {
    within("the health checks see it", async {
        loop {
            let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
            if sample(&metrics, "protomesh_endpoints_not_serving{") == Some(count) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Makes `count` calls at once, so that both endpoints would take some.
async fn round(mesh: &Mesh, count: usize) {
    let calls = (0..count).map(|_| {
        let mut client = mesh.client();
        async move { client.unary(EchoRequest::default()).await.expect("every call is answered") }
    });
    within("a round of calls", futures_util::future::join_all(calls)).await;
}

#[tokio::test]
async fn a_not_serving_endpoint_gets_no_calls_until_it_serves_again() {
    let options = MeshOptions { servers: 2, app_health: true, upstream_settings: CHECKED, ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    mesh.health[0].set_service_status("", AppStatus::NotServing).await;
    not_serving(&mesh, 1.0).await;
    let before = mesh.backends[0].calls.load(Ordering::Relaxed);
    for _ in 0..5 {
        round(&mesh, 8).await;
    }
    assert_eq!(mesh.backends[0].calls.load(Ordering::Relaxed), before, "the endpoint not serving took no call");
    assert_eq!(mesh.backends[1].calls.load(Ordering::Relaxed), 40);

    mesh.health[0].set_service_status("", AppStatus::Serving).await;
    not_serving(&mesh, 0.0).await;
    within("it takes calls again", async {
        while mesh.backends[0].calls.load(Ordering::Relaxed) == before {
            round(&mesh, 8).await;
        }
    })
    .await;
}

/// Asks the server sidecar's inbound port about `service`, as a client
/// sidecar's health check does.
async fn check(mesh: &Mesh, service: &str) -> Result<ServingStatus, String> {
    let tls = mesh.connect_inbound("client").await;
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(grpc_health::check_head("server"), false).unwrap();
    send.send_data(grpc_health::check_request(service), true).unwrap();
    let (head, mut body) = within("the answer", response).await.unwrap().into_parts();
    let mut message = BytesMut::new();
    while let Some(data) = body.data().await {
        message.extend_from_slice(&data.unwrap());
    }
    let trailers = body.trailers().await.unwrap();
    grpc_health::read_answer(&head.headers, trailers.as_ref(), Bytes::from(message))
}

#[tokio::test]
async fn the_server_sidecar_answers_for_an_app_without_a_health_service() {
    let mesh = Mesh::start().await;
    assert_eq!(check(&mesh, "").await, Ok(ServingStatus::Serving));
    assert_eq!(check(&mesh, "echo.v1.Echo").await, Ok(ServingStatus::Serving));
    let unknown = check(&mesh, "nope.v1.Nope").await.unwrap_err();
    assert_eq!(unknown, "grpc-status NOT_FOUND");
    assert_eq!(mesh.calls(), 0, "the echo app was never called");
}

#[tokio::test]
async fn an_app_that_answers_health_is_asked_and_one_that_is_gone_is_not_serving() {
    let mesh = Mesh::start_with(MeshOptions { app_health: true, ..Default::default() }).await;
    mesh.health[0].set_service_status("echo.v1.Echo", AppStatus::NotServing).await;
    assert_eq!(check(&mesh, "echo.v1.Echo").await, Ok(ServingStatus::NotServing), "the app's own answer");

    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mesh = Mesh::start_with(MeshOptions { app: Some(gone), ..Default::default() }).await;
    assert_eq!(check(&mesh, "").await, Ok(ServingStatus::NotServing));
}

#[tokio::test]
async fn health_checks_turned_on_by_a_reload_apply_to_the_running_upstream() {
    let options =
        MeshOptions { servers: 2, app_health: true, upstream_settings: "resolve_interval: 30s", ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    mesh.health[0].set_service_status("", AppStatus::NotServing).await;
    round(&mesh, 8).await;
    mesh.edit_config("client", "resolve_interval: 30s", &format!("resolve_interval: 30s, {CHECKED}"));
    not_serving(&mesh, 1.0).await;
    let before = mesh.backends[0].calls.load(Ordering::Relaxed);
    round(&mesh, 8).await;
    assert_eq!(mesh.backends[0].calls.load(Ordering::Relaxed), before, "the endpoint not serving took no call");
}
