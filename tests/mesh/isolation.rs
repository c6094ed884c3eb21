//! Callers cannot stall each other: a caller that stops reading (its HTTP/2
//! receive windows at zero) while the peer sends it large responses holds
//! only its own streams. Other callers' large calls, which share the
//! sidecars' connections to each other and to the app, still complete, and
//! the stalled calls end at their deadline, freeing their bulkhead places
//! and cancelling the backend's streams.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::FutureExt;
use h2::client::SendRequest;
use http::Request;
use prost::Message;
use protomesh_samples::pb::echo::v1::EchoRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, within};

const LARGE: usize = 2 * 1024 * 1024;

/// A caller that reads nothing: every stream's receive window is zero.
async fn reader_that_never_reads<IO>(io: IO) -> SendRequest<Bytes>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new().initial_window_size(0).handshake(io).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// Opens a server-streaming call for 16 replies of 2 MiB each, more than
/// the hops between it and the backend can hold, with
/// `timeout` as its `grpc-timeout`, and returns the response once its head
/// has arrived; its body is left unread.
async fn open_large_stream(sender: &mut SendRequest<Bytes>, timeout: &str) -> http::Response<h2::RecvStream> {
    let request = Request::post("http://mesh/echo.v1.Echo/ServerStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let message = EchoRequest { reply_count: 16, reply_payload_bytes: LARGE as u32, ..Default::default() };
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
    message.encode(&mut frame).unwrap();
    let mut sender = sender.clone().ready().await.unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    body.send_data(frame.into(), true).unwrap();
    within("the stalled call's response head", response).await.unwrap()
}

/// Large unary calls from other callers, each on a connection of its own,
/// all at once: each needs far more than one stream window of the
/// connections the sidecars share.
async fn others_complete_large_calls(mesh: &Mesh) {
    let calls = (0..4).map(|i| {
        let mut client = mesh.client();
        async move {
            let request = protomesh_samples::pb::echo::v1::EchoRequest {
                message: format!("other {i}"),
                payload: vec![1u8; LARGE].into(),
                ..Default::default()
            };
            client.unary(request).await.map(|reply| reply.into_inner().payload.len())
        }
    });
    let replies = within("other callers' large calls", futures_util::future::join_all(calls)).await;
    for reply in replies {
        assert_eq!(reply.expect("another caller's call succeeds"), LARGE);
    }
}

/// Waits for a stalled call's end as its caller sees it: the status in its trailers.
async fn status_at_end(response: http::Response<h2::RecvStream>) -> Code {
    let mut body = response.into_body();
    let trailers = within("the stalled call's end", body.trailers()).await.expect("trailers, not a reset");
    let trailers = trailers.expect("trailers with a status");
    Code::from_i32(trailers["grpc-status"].to_str().unwrap().parse().unwrap())
}

/// Waits until the backend has seen `count` of its streams cancelled.
async fn backend_cancelled(mesh: &Mesh, count: u64) {
    within("the backend's streams cancelled", async {
        loop {
            let notified = mesh.backend.cancelled_signal.notified();
            if mesh.backend.cancelled.load(Ordering::Relaxed) >= count {
                return;
            }
            notified.await;
        }
    })
    .await;
}

fn options() -> MeshOptions {
    // Three places for the streaming method: stalled calls that kept theirs
    // would leave none for the calls that follow.
    let policy = "{methods: {'echo.v1.Echo/ServerStream': {concurrency: {max_in_flight: 3}}}}";
    MeshOptions { client_policy: policy, server_policy: policy, ..Default::default() }
}

/// The scenario, with stalled callers connected by `connect`: while three
/// of their large calls are held, other callers' large calls complete; once
/// the stalled caller is gone and three more of its calls expire, the
/// backend has seen all six cancelled and the method's three places are free.
async fn only_the_stalled_callers_calls_stall<F, Fut>(mesh: &Mesh, connect: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = SendRequest<Bytes>>,
{
    let mut stalled = connect().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_large_stream(&mut stalled, "60S").await);
    }
    others_complete_large_calls(mesh).await;
    for response in &mut held {
        assert!(response.body_mut().trailers().now_or_never().is_none(), "the stalled calls are still open");
    }
    // The caller goes away: its calls end, and their places with them.
    drop((held, stalled));

    let mut stalled = connect().await;
    let mut expiring = Vec::new();
    for _ in 0..3 {
        expiring.push(open_large_stream(&mut stalled, "500m").await);
    }
    for response in expiring {
        assert_eq!(status_at_end(response).await, Code::DeadlineExceeded);
    }
    backend_cancelled(mesh, 6).await;
    let mut client = mesh.client();
    for _ in 0..3 {
        let request = EchoRequest { reply_count: 1, ..Default::default() };
        let mut replies = client.server_stream(request).await.expect("a place is free").into_inner();
        while replies.message().await.expect("the stream ends well").is_some() {}
    }
}

#[tokio::test]
async fn an_app_that_stops_reading_stalls_only_its_own_calls() {
    let mesh = Mesh::start_with(options()).await;
    let outbound = mesh.client_sidecar.outbound_addr;
    only_the_stalled_callers_calls_stall(&mesh, || async {
        reader_that_never_reads(TcpStream::connect(outbound).await.unwrap()).await
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_stops_reading_stalls_only_its_own_calls() {
    let mesh = Mesh::start_with(options()).await;
    only_the_stalled_callers_calls_stall(&mesh, || async {
        reader_that_never_reads(mesh.connect_inbound("other").await).await
    })
    .await;
}
