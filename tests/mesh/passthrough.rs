//! What a gRPC app sends through the pair arrives as sent, and what the
//! server answers comes back as answered: every call shape, metadata,
//! statuses, large and compressed messages, cancellation, flow control.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protomesh_samples::pb::echo::v1::{EchoReply, EchoRequest};
use tokio_stream::StreamExt;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::{Code, Request};

use crate::harness::{Mesh, MeshOptions, id, within};

fn echo(message: &str) -> EchoRequest {
    EchoRequest { message: message.into(), ..Default::default() }
}

#[tokio::test]
async fn unary_call_arrives_with_the_callers_verified_identity() {
    let mesh = Mesh::start().await;
    let reply = within("unary", mesh.client().unary(echo("hello"))).await.unwrap().into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.caller, id("client").as_str());
    assert_eq!(mesh.calls(), 1);
}

#[tokio::test]
async fn the_app_cannot_spoof_its_caller_identity() {
    let mesh = Mesh::start().await;
    let mut request = Request::new(echo("spoof"));
    request.metadata_mut().insert("protomesh-caller-id", MetadataValue::from_static("spiffe://evil/ns/x/sa/admin"));
    let reply = within("unary", mesh.client().unary(request)).await.unwrap().into_inner();
    assert_eq!(reply.caller, id("client").as_str());
}

#[tokio::test]
async fn server_streaming_delivers_every_reply_in_order() {
    let mesh = Mesh::start().await;
    let request = EchoRequest { reply_count: 50, reply_payload_bytes: 100, ..echo("s") };
    let replies: Vec<EchoReply> = within("server stream", async {
        let stream = mesh.client().server_stream(request).await.unwrap().into_inner();
        stream.collect::<Result<Vec<_>, _>>().await
    })
    .await
    .unwrap();
    assert_eq!(replies.iter().map(|r| r.sequence).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
    assert!(replies.iter().all(|r| r.payload.len() == 100));
}

#[tokio::test]
async fn client_streaming_delivers_every_request() {
    let mesh = Mesh::start().await;
    let requests = (0..40).map(|i| EchoRequest { payload: vec![1; i].into(), ..echo("c") });
    let reply = within("client stream", mesh.client().client_stream(tokio_stream::iter(requests))).await.unwrap();
    let reply = reply.into_inner();
    assert_eq!(reply.sequence, 40);
    assert_eq!(reply.received_bytes, (0..40).sum::<usize>() as u64);
}

#[tokio::test]
async fn bidi_streaming_interleaves_requests_and_replies() {
    let mesh = Mesh::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = within("bidi open", mesh.client().bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    // Each reply is awaited before the next request is sent: nothing is batched on the way.
    for i in 0..20u32 {
        tx.send(echo(&format!("m{i}"))).await.unwrap();
        let reply = within("bidi reply", replies.message()).await.unwrap().unwrap();
        assert_eq!((reply.message, reply.sequence), (format!("m{i}"), i));
    }
    drop(tx);
    assert!(within("bidi end", replies.message()).await.unwrap().is_none());
}

#[tokio::test]
async fn metadata_crosses_both_ways_with_binary_and_repeated_keys() {
    let mesh = Mesh::start().await;
    let mut request = Request::new(echo("meta"));
    let metadata = request.metadata_mut();
    metadata.append("x-echo-tag", MetadataValue::from_static("one"));
    metadata.append("x-echo-tag", MetadataValue::from_static("two"));
    metadata.append_bin("x-echo-blob-bin", BinaryMetadataValue::from_bytes(&[0, 159, 146, 150, 255]));
    let response = within("unary", mesh.client().unary(request)).await.unwrap();
    let headers = response.metadata();
    let tags: Vec<_> = headers.get_all("x-echo-tag").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert_eq!(tags, ["one", "two"]);
    assert_eq!(headers.get_bin("x-echo-blob-bin").unwrap().to_bytes().unwrap().as_ref(), &[0, 159, 146, 150, 255]);
}

#[tokio::test]
async fn every_status_code_message_details_and_trailer_metadata_pass_through() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client();
    for code in 1..=16 {
        let mut request = Request::new(EchoRequest {
            status_code: code,
            status_message: format!("failure {code} ünïcode %"),
            ..echo("status")
        });
        request.metadata_mut().insert("x-echo-code", code.to_string().parse().unwrap());
        let status = within("unary", client.unary(request)).await.unwrap_err();
        assert_eq!(status.code(), Code::from_i32(code), "code {code}");
        assert_eq!(status.message(), format!("failure {code} ünïcode %"));
        assert_eq!(status.details(), format!("details of failure {code} ünïcode %").as_bytes());
        assert_eq!(status.metadata().get("x-echo-code").unwrap(), code.to_string().as_str());
    }
}

#[tokio::test]
async fn a_status_after_messages_arrives_in_the_trailers() {
    let mesh = Mesh::start().await;
    let request =
        EchoRequest { reply_count: 3, status_code: Code::Aborted as i32, status_message: "late".into(), ..echo("t") };
    let mut stream = within("open", mesh.client().server_stream(request)).await.unwrap().into_inner();
    for _ in 0..3 {
        assert!(within("reply", stream.message()).await.unwrap().is_some());
    }
    let status = within("trailers", stream.message()).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Aborted, "late"));
}

#[tokio::test]
async fn messages_of_several_mebibytes_cross_both_ways() {
    let mesh = Mesh::start().await;
    let payload: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let request = EchoRequest { payload: payload.clone().into(), ..echo("big") };
    let reply = within("big unary", mesh.client().unary(request)).await.unwrap().into_inner();
    assert_eq!(reply.payload.as_ref(), payload.as_slice());

    let request = EchoRequest { reply_count: 3, reply_payload_bytes: 4 * 1024 * 1024 + 1, ..echo("big") };
    let replies = within("big stream", async {
        let stream = mesh.client().server_stream(request).await.unwrap().into_inner();
        stream.collect::<Result<Vec<_>, _>>().await
    })
    .await
    .unwrap();
    assert_eq!(replies.len(), 3);
    assert!(replies.iter().all(|r| r.payload.len() == 4 * 1024 * 1024 + 1));
}

#[tokio::test]
async fn compressed_messages_pass_through() {
    let mesh = Mesh::start().await;
    let mut client =
        mesh.client().send_compressed(CompressionEncoding::Gzip).accept_compressed(CompressionEncoding::Gzip);
    let request = EchoRequest { payload: vec![b'z'; 256 * 1024].into(), ..echo("gzip") };
    let response = within("gzip unary", client.unary(request)).await.unwrap();
    assert_eq!(response.metadata().get("grpc-encoding").unwrap(), "gzip");
    assert_eq!(response.into_inner().payload.len(), 256 * 1024);
}

#[tokio::test]
async fn grpc_timeout_reaches_the_server() {
    let mesh = Mesh::start().await;
    let mut request = Request::new(echo("deadline"));
    request.set_timeout(Duration::from_secs(7));
    within("unary", mesh.client().unary(request)).await.unwrap();
    let seen = mesh.backend.last_header("grpc-timeout");
    assert!(
        seen.is_some_and(|t| t.ends_with('m') || t.ends_with('u') || t.ends_with('S')),
        "grpc-timeout not forwarded"
    );
}

#[tokio::test]
async fn a_client_cancel_resets_the_stream_at_the_server() {
    let mesh = Mesh::start().await;
    let request = EchoRequest { reply_count: 10_000, delay_ms: 5, ..echo("cancel me") };
    let cancelled = mesh.backend.cancelled_signal.notified();
    tokio::pin!(cancelled);
    cancelled.as_mut().enable();
    let mut stream = within("open", mesh.client().server_stream(request)).await.unwrap().into_inner();
    within("first reply", stream.message()).await.unwrap().unwrap();
    drop(stream);
    within("the server sees the cancel", cancelled).await;
    assert_eq!(mesh.backend.cancelled.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish_and_takes_no_new_ones() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client();
    let backend = mesh.backend.clone();
    let in_flight = tokio::spawn(async move { client.unary(EchoRequest { delay_ms: 300, ..echo("drain") }).await });
    within("the call reaches the app", async {
        while backend.calls.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut client = mesh.client();
    // GOAWAY to the client sidecar, then a wait for the call in flight.
    within("the server sidecar drains", mesh.server_sidecar.shutdown()).await;
    let reply = within("the call in flight", in_flight).await.unwrap().unwrap().into_inner();
    assert_eq!(reply.message, "drain");
    let status = within("a call after shutdown", client.unary(echo("late"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_slow_reader_slows_the_writer() {
    let mesh = Mesh::start().await;
    const REPLIES: u64 = 64;
    let request = EchoRequest { reply_count: REPLIES as u32, reply_payload_bytes: 1024 * 1024, ..echo("flow") };
    let mut stream = within("open", mesh.client().server_stream(request)).await.unwrap().into_inner();
    within("first reply", stream.message()).await.unwrap().unwrap();
    // The client reads nothing more; the backend must stall once the windows
    // and socket buffers on the way are full, far short of the whole stream.
    let stalled_at = where_it_stalls(&mesh.backend.sent).await;
    assert!(stalled_at < REPLIES / 2, "backend sent {stalled_at} of {REPLIES} MiB to a reader that stopped");
    let mut received = 1;
    while within("rest", stream.message()).await.unwrap().is_some() {
        received += 1;
    }
    assert_eq!(received, REPLIES);
}

/// Reads samples of `counter` until it stops moving; returns where it stopped.
async fn where_it_stalls(counter: &AtomicU64) -> u64 {
    within("the writer stalls", async {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = counter.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
}

/// A raw HTTP/2 app that answers each call's headers and never reads what the
/// caller sends, so the flow-control window of each stream stays shut.
async fn app_that_never_reads() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(tcp).await.unwrap();
                let mut unread = Vec::new();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let head = http::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
                    unread.push((request, respond.send_response(head, false).unwrap()));
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_slow_app_slows_the_callers_stream() {
    let mesh =
        Mesh::start_with(MeshOptions { app: Some(app_that_never_reads().await), ..MeshOptions::default() }).await;
    const MESSAGES: u64 = 64;
    let taken = Arc::new(AtomicU64::new(0));
    let counted = taken.clone();
    let requests = tokio_stream::iter(0..MESSAGES).map(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
        EchoRequest { payload: vec![7; 1024 * 1024].into(), ..echo("flow") }
    });
    let mut client = mesh.client();
    let call = tokio::spawn(async move { client.client_stream(requests).await });
    // The windows and buffers on the way fill, then the caller must wait, far
    // short of the whole stream.
    let stalled_at = where_it_stalls(&taken).await;
    assert!(stalled_at < MESSAGES / 2, "the caller sent {stalled_at} of {MESSAGES} MiB to an app that reads nothing");
    call.abort();
}

#[tokio::test]
async fn an_upstream_named_by_dns_is_resolved() {
    let resolved: Vec<_> = tokio::net::lookup_host(("localhost", 1)).await.unwrap().collect();
    assert!(
        resolved.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()),
        "this test needs localhost to resolve to 127.0.0.1 only, got {resolved:?}"
    );
    let mesh =
        Mesh::start_with(MeshOptions { upstream_endpoint: Some("localhost:{server}".into()), ..Default::default() })
            .await;
    let reply = within("unary via a DNS name", mesh.client().unary(echo("dns"))).await.unwrap().into_inner();
    assert_eq!(reply.caller, id("client").as_str());
}
