//! Bulkheads across the pair: a full one refuses at once with
//! RESOURCE_EXHAUSTED and pushback, and only its own method suffers.

use std::time::Duration;

use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, within};

/// Opens `count` streams that stay open (one slow reply each) and returns them.
async fn hold_streams(mesh: &Mesh, count: usize) -> Vec<tonic::Streaming<protomesh_samples::pb::echo::v1::EchoReply>> {
    let mut held = Vec::new();
    for _ in 0..count {
        let request = EchoRequest { reply_count: 1, delay_ms: 30_000, ..Default::default() };
        held.push(within("hold", mesh.client().server_stream(request)).await.unwrap().into_inner());
    }
    held
}

#[tokio::test]
async fn a_full_method_bulkhead_refuses_at_once_with_pushback() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{methods: {echo.v1.Echo/ServerStream: {concurrency: {max_in_flight: 2, queue_timeout: 250ms}}}}",
        ..Default::default()
    })
    .await;
    let _held = hold_streams(&mesh, 2).await;
    let calls_before = mesh.calls();
    let status = within("refused", mesh.client().server_stream(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("bulkhead method /echo.v1.Echo/ServerStream"), "{status:?}");
    assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "250");
    assert_eq!(mesh.calls(), calls_before);
}

#[tokio::test]
async fn a_saturated_method_leaves_the_others_unaffected() {
    let mesh = Mesh::start_with(MeshOptions {
        server_policy: "{methods: {echo.v1.Echo/ServerStream: {concurrency: {max_in_flight: 3}}}}",
        ..Default::default()
    })
    .await;
    let _held = hold_streams(&mesh, 3).await;
    let refused = within("refused", mesh.client().server_stream(EchoRequest::default())).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().starts_with("protomesh inbound: bulkhead method"), "{refused:?}");
    // Meanwhile every unary call goes through.
    for _ in 0..20 {
        within("unary beside a saturated method", mesh.client().unary(EchoRequest::default())).await.unwrap();
    }
}

#[tokio::test]
async fn a_place_is_held_until_the_stream_ends() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{methods: {echo.v1.Echo/ServerStream: {concurrency: {max_in_flight: 1}}}}",
        ..Default::default()
    })
    .await;
    let held = hold_streams(&mesh, 1).await;
    let status = within("refused", mesh.client().server_stream(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    drop(held);
    within("admitted once the stream ended", async {
        loop {
            match mesh.client().server_stream(EchoRequest::default()).await {
                Ok(_) => return,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
}
