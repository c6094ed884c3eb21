//! Deadlines across the pair: the shorter of the caller's and the policy's,
//! forwarded as the remaining budget, and DEADLINE_EXCEEDED at expiry,
//! before or during the response.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic::{Code, Request};

use crate::harness::{Mesh, MeshOptions, within};

const UNARY_300MS: &str = "{methods: {echo.v1.Echo/Unary: {timeout: 300ms}}}";

fn timed(request: EchoRequest, timeout: Duration) -> Request<EchoRequest> {
    let mut request = Request::new(request);
    request.set_timeout(timeout);
    request
}

#[tokio::test]
async fn the_server_sees_the_policys_shorter_deadline() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: UNARY_300MS, ..Default::default() }).await;
    within("unary", mesh.client().unary(timed(EchoRequest::default(), Duration::from_secs(10)))).await.unwrap();
    let seen = mesh.backend.last_header("grpc-timeout").expect("grpc-timeout forwarded");
    let seen = protomesh::grpc::parse_timeout(seen.as_bytes()).unwrap();
    assert!(seen <= Duration::from_millis(300) && seen > Duration::from_millis(100), "server saw {seen:?}");
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded_naming_its_source() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: UNARY_300MS, ..Default::default() }).await;
    let started = Instant::now();
    let slow = EchoRequest { delay_ms: 10_000, ..Default::default() };
    let status = within("unary", mesh.client().unary(timed(slow, Duration::from_secs(30)))).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().starts_with("protomesh outbound: deadline of 300ms (timeout from config policy.methods"),
        "{status:?}"
    );
    // Bounded far above 300 ms: the call ends at its deadline, not at the backend's 10 s.
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_method_outside_the_contracts_gets_the_default_timeout_in_permissive_mode() {
    // Contracts without the echo service: its methods are forwarded, undeclared.
    let options = MeshOptions {
        protos: "[examples/shop.proto]",
        contracts_mode: "permissive",
        client_policy: "{defaults: {timeout: 300ms}}",
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    mesh.client().unary(EchoRequest::default()).await.expect("an undeclared method is forwarded");
    let slow = EchoRequest { delay_ms: 10_000, ..Default::default() };
    let status = within("unary", mesh.client().unary(slow)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().starts_with("protomesh outbound: deadline of 300ms (timeout from config policy.defaults"),
        "{status:?}"
    );
}

#[tokio::test]
async fn the_inbound_side_enforces_its_own_policy_too() {
    let mesh = Mesh::start_with(MeshOptions { server_policy: UNARY_300MS, ..Default::default() }).await;
    let slow = EchoRequest { delay_ms: 10_000, ..Default::default() };
    let status = within("unary", mesh.client().unary(slow)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().starts_with("protomesh inbound: deadline of 300ms"), "{status:?}");
}

#[tokio::test]
async fn a_deadline_during_a_stream_ends_it_and_cancels_the_server() {
    let mesh = Mesh::start().await;
    let cancelled = mesh.backend.cancelled_signal.notified();
    tokio::pin!(cancelled);
    cancelled.as_mut().enable();
    let request = EchoRequest { reply_count: 1000, delay_ms: 20, ..Default::default() };
    let mut stream = within("open", mesh.client().server_stream(timed(request, Duration::from_millis(400))))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let status = loop {
        match within("stream", stream.message()).await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert!(received > 0, "messages before the deadline arrive");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    within("the server sees the cancel", cancelled).await;
    assert_eq!(mesh.backend.cancelled.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_idle_stream_ends_after_its_idle_timeout() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{methods: {echo.v1.Echo/ServerStream: {idle_timeout: 200ms}}}",
        ..Default::default()
    })
    .await;
    // Replies every 50 ms keep the stream alive; then the backend goes quiet for 5 s.
    let request = EchoRequest { reply_count: 3, delay_ms: 50, ..Default::default() };
    let replies = within("lively stream", async {
        let stream = mesh.client().server_stream(request).await.unwrap().into_inner();
        tokio_stream::StreamExt::collect::<Vec<_>>(stream).await
    })
    .await;
    assert!(replies.iter().all(Result::is_ok) && replies.len() == 3, "{replies:?}");

    let quiet = EchoRequest { reply_count: 2, delay_ms: 5_000, ..Default::default() };
    let mut stream = within("open", mesh.client().server_stream(quiet)).await.unwrap().into_inner();
    let status = within("idle", stream.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("idle_timeout"), "{status:?}");
}

#[tokio::test]
async fn a_malformed_grpc_timeout_is_internal_naming_the_header() {
    let mesh = Mesh::start().await;
    let mut request = Request::new(EchoRequest::default());
    request.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
    let status = within("unary", mesh.client().unary(request)).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("malformed grpc-timeout header `soon`"), "{status:?}");
    assert_eq!(mesh.calls(), 0);
}

#[tokio::test]
async fn a_budget_below_the_floor_fails_before_any_network_io() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: "{min_budget: 50ms}", ..Default::default() }).await;
    let status = within("unary", mesh.client().unary(timed(EchoRequest::default(), Duration::from_millis(20))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("below policy.min_budget 50ms"), "{status:?}");
    assert_eq!(mesh.calls(), 0);
}
