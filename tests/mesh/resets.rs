//! A backend that resets streams (RST_STREAM), before or after answering:
//! the client sees the status gRPC maps that reset to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use prost::Message;
use protomesh_samples::pb::echo::v1::{EchoReply, EchoRequest};
use tonic::{Code, Request};

use crate::harness::{Mesh, MeshOptions, within};

/// A raw HTTP/2 app that resets each stream as the `x-reset` header says:
/// `before-<reason>` resets without answering, `after-<reason>` sends
/// response headers and one message first, then resets when `go` is notified,
/// and `first-refused` refuses the app's first stream and answers the others.
async fn resetting_app(go: Arc<tokio::sync::Notify>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let go = go.clone();
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(tcp).await.unwrap();
                while let Some(Ok((request, respond))) = connection.accept().await {
                    // Each stream in its own task: the connection loop must keep polling to flush frames.
                    tokio::spawn(answer_then_reset(request, respond, go.clone()));
                }
            });
        }
    });
    addr
}

async fn answer_then_reset(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    go: Arc<tokio::sync::Notify>,
) {
    let plan = request.headers()["x-reset"].to_str().unwrap().to_string();
    if plan == "first-refused" {
        if STREAMS_SEEN.fetch_add(1, Ordering::SeqCst) == 0 {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        } else {
            answer_ok(respond);
        }
        return;
    }
    let (when, reason) = plan.split_once('-').unwrap();
    let reason = match reason {
        "cancel" => h2::Reason::CANCEL,
        "refused" => h2::Reason::REFUSED_STREAM,
        _ => h2::Reason::INTERNAL_ERROR,
    };
    if when == "before" {
        respond.send_reset(reason);
        return;
    }
    let head = http::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
    let mut body = respond.send_response(head, false).unwrap();
    let reply = EchoReply { message: "partial".into(), ..Default::default() }.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(reply.len() as u32).to_be_bytes());
    frame.extend_from_slice(&reply);
    body.send_data(Bytes::from(frame), false).unwrap();
    go.notified().await;
    body.send_reset(reason);
}

/// Streams seen under the `first-refused` plan (one test uses it).
static STREAMS_SEEN: AtomicU32 = AtomicU32::new(0);

fn answer_ok(mut respond: h2::server::SendResponse<Bytes>) {
    let head = http::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
    let mut body = respond.send_response(head, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    body.send_trailers(trailers).unwrap();
}

fn planned(plan: &'static str) -> Request<EchoRequest> {
    let mut request = Request::new(EchoRequest::default());
    request.metadata_mut().insert("x-reset", plan.parse().unwrap());
    request
}

#[tokio::test]
async fn resets_before_the_response_map_to_the_grpc_status() {
    let app = resetting_app(Arc::default()).await;
    let mesh = Mesh::start_with(MeshOptions { app: Some(app), ..MeshOptions::default() }).await;
    for (plan, code) in
        [("before-cancel", Code::Cancelled), ("before-refused", Code::Unavailable), ("before-internal", Code::Internal)]
    {
        let status = within(plan, mesh.client().unary(planned(plan))).await.unwrap_err();
        assert_eq!(status.code(), code, "{plan}: {status:?}");
    }
}

#[tokio::test]
async fn a_reset_after_a_message_reaches_the_client_mid_stream() {
    let go = Arc::new(tokio::sync::Notify::new());
    let mesh =
        Mesh::start_with(MeshOptions { app: Some(resetting_app(go.clone()).await), ..MeshOptions::default() }).await;
    let mut stream = within("open", mesh.client().server_stream(planned("after-cancel"))).await.unwrap().into_inner();
    let first = within("first", stream.message()).await.unwrap().unwrap();
    assert_eq!(first.message, "partial");
    go.notify_one();
    let status = within("reset", stream.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
}

#[tokio::test]
async fn a_stream_the_peer_refused_unprocessed_is_sent_again_whatever_the_method() {
    let app = resetting_app(Arc::default()).await;
    let mesh = Mesh::start_with(MeshOptions { app: Some(app), ..MeshOptions::default() }).await;
    // ServerStream is not idempotent, and no retry policy applies to it.
    let mut stream = within("open", mesh.client().server_stream(planned("first-refused"))).await.unwrap().into_inner();
    assert!(within("reply", stream.message()).await.unwrap().is_some());
    assert_eq!(STREAMS_SEEN.load(Ordering::SeqCst), 2);
}
