//! Every `limits` setting: just under it a caller is served, just over it
//! the caller gets the documented refusal, and the sidecar goes on serving
//! everyone else.

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client::SendRequest;
use http::Request;
use protomesh_samples::pb::echo::v1::EchoRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, within};
use crate::telemetry::{admin, sample};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// An HTTP/2 client connection on `io`, or why the sidecar would not have it.
async fn http2<IO>(io: IO) -> Result<SendRequest<Bytes>, h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::handshake(io).await?;
    tokio::spawn(connection);
    sender.ready().await
}

/// Whether a connection on `io` carries a call: the sidecar closes one
/// past a limit at once, which the client learns on its first call.
async fn refused<IO>(io: IO) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match http2(io).await {
        Ok(sender) => unary(&sender).await.is_err(),
        Err(_) => true,
    }
}

/// One empty unary echo on `sender`: its gRPC status, or why it failed.
async fn unary(sender: &SendRequest<Bytes>) -> Result<Code, h2::Error> {
    let request = Request::post("http://mesh/echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut sender = sender.clone().ready().await?;
    let (response, mut body) = sender.send_request(request, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let mut body = within("a unary call", response).await?.into_body();
    while let Some(data) = body.data().await {
        let _ = body.flow_control().release_capacity(data?.len());
    }
    let trailers = body.trailers().await?.expect("trailers");
    Ok(Code::from_i32(trailers["grpc-status"].to_str().unwrap().parse().unwrap()))
}

/// Whether the sidecar has closed `io`: it reads to the end (or an error) within the bound.
async fn closed(mut io: impl AsyncRead + Unpin) {
    let mut sink = Vec::new();
    let _ = within("the sidecar closing the connection", io.read_to_end(&mut sink)).await;
}

async fn metric(addr: SocketAddr, series: &str) -> f64 {
    sample(&admin(addr, "GET", "/metrics", "").await.1, series).unwrap_or(0.0)
}

#[tokio::test]
async fn connections_past_the_listeners_limits_are_closed_and_the_others_served() {
    // A long handshake timeout: a connection held in its handshake is not closed by it during the test.
    let limits = "{max_connections: 3, max_connections_per_source: 2, tls_handshake_timeout: 60s}";
    let mesh = Mesh::start_with(MeshOptions { limits, ..Default::default() }).await;
    let outbound = mesh.client_sidecar.outbound_addr;

    // Inbound, one source holds two at most; other sources are served.
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();
    let _held = [connect_from("127.0.0.2", inbound).await, connect_from("127.0.0.2", inbound).await];
    closed(connect_from("127.0.0.2", inbound).await).await;
    let reply = mesh.client().unary(EchoRequest::default()).await.expect("another source is served");
    assert_eq!(reply.into_inner().caller, crate::harness::id("client").as_str());
    let client_admin = mesh.client_sidecar.admin_addr;
    within("the app's connection closed", async {
        while metric(client_admin, "protomesh_open_connections{direction=\"outbound\"}").await > 0.0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;

    // Outbound, every connection comes from the pod itself: no limit per source.
    let first = http2(connect_from("127.0.0.1", outbound).await).await.unwrap();
    let second = http2(connect_from("127.0.0.1", outbound).await).await.unwrap();
    let third = http2(connect_from("127.0.0.1", outbound).await).await.unwrap();
    assert!(refused(connect_from("127.0.0.2", outbound).await).await, "a fourth connection to the listener is closed");
    for sender in [&first, &second, &third] {
        assert_eq!(unary(sender).await.unwrap(), Code::Ok);
    }

    let series = |direction, limit| {
        format!("protomesh_connections_closed_at_limit_total{{direction=\"{direction}\",limit=\"{limit}\"}}")
    };
    let server_admin = mesh.server_sidecar.admin_addr;
    assert_eq!(metric(client_admin, &series("outbound", "max_connections")).await, 1.0);
    assert_eq!(metric(client_admin, &series("outbound", "max_connections_per_source")).await, 0.0);
    assert_eq!(metric(server_admin, &series("inbound", "max_connections_per_source")).await, 1.0);

    // A closed connection gives its place back.
    drop(first);
    within("a place given back", async {
        loop {
            if !refused(connect_from("127.0.0.1", outbound).await).await {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn connections_that_do_not_finish_tls_or_send_the_preface_in_time_are_closed() {
    let limits = "{tls_handshake_timeout: 300ms, first_frame_timeout: 300ms}";
    let mesh = Mesh::start_with(MeshOptions { limits, ..Default::default() }).await;
    let inbound = mesh.server_sidecar.inbound_addr.unwrap();

    // One byte of a TLS record, then nothing.
    let mut tcp = TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(&[0x16]).await.unwrap();
    closed(tcp).await;
    // A finished handshake, then no HTTP/2 preface.
    closed(mesh.connect_inbound("other").await).await;
    // Outbound, half a preface.
    let mut tcp = TcpStream::connect(mesh.client_sidecar.outbound_addr).await.unwrap();
    tcp.write_all(&PREFACE[..10]).await.unwrap();
    closed(tcp).await;

    // Callers that do not dawdle are served, through both listeners.
    let reply = mesh.client().unary(EchoRequest::default()).await.expect("a prompt caller is served");
    assert_eq!(reply.into_inner().caller, crate::harness::id("client").as_str());

    let (client_admin, server_admin) = (mesh.client_sidecar.admin_addr, mesh.server_sidecar.admin_addr);
    let handshakes = "protomesh_tls_handshakes_total{direction=\"inbound\",result=\"timeout\"}";
    assert_eq!(metric(server_admin, handshakes).await, 1.0);
    let no_preface = |direction| {
        format!(
            "protomesh_connections_closed_at_limit_total{{direction=\"{direction}\",limit=\"first_frame_timeout\"}}"
        )
    };
    assert_eq!(metric(server_admin, &no_preface("inbound")).await, 1.0);
    assert_eq!(metric(client_admin, &no_preface("outbound")).await, 1.0);
}

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A request head, each field an HPACK literal without indexing, so that it
/// can be written without an encoder.
fn request_head(stream: u32, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    let fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "mesh")];
    let fields = fields.into_iter().chain([("content-type", "application/grpc"), ("te", "trailers")]);
    for (name, value) in fields {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    const END_HEADERS: u8 = 0x4;
    frame(0x1, END_HEADERS, stream, &block)
}

/// Reads frames until one of `kind` on `stream` arrives; returns its payload.
async fn next_frame(tcp: &mut TcpStream, kind: u8, stream: u32) -> Vec<u8> {
    within("an HTTP/2 frame", async {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.unwrap();
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            tcp.read_exact(&mut payload).await.unwrap();
            let id = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
            if head[3] == kind && id == stream {
                return payload;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_stream_past_max_concurrent_streams_is_refused_and_the_others_are_served() {
    let mesh = Mesh::start_with(MeshOptions { limits: "{max_concurrent_streams: 2}", ..Default::default() }).await;
    let mut tcp = TcpStream::connect(mesh.client_sidecar.outbound_addr).await.unwrap();
    const SETTINGS: u8 = 0x4;
    const ACK: u8 = 0x1;
    let mut opening = PREFACE.to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    // The sidecar's SETTINGS come first on the connection, so acknowledging
    // them before reading is in order; its stream limit holds from then on.
    opening.extend(frame(SETTINGS, ACK, 0, &[]));
    tcp.write_all(&opening).await.unwrap();
    next_frame(&mut tcp, SETTINGS, 0).await;
    // Three request heads at once, ignoring the advertised limit of two.
    for stream in [1, 3, 5] {
        tcp.write_all(&request_head(stream, "/echo.v1.Echo/Unary")).await.unwrap();
    }
    const RST_STREAM: u8 = 0x3;
    let reset = next_frame(&mut tcp, RST_STREAM, 5).await;
    assert_eq!(u32::from_be_bytes(reset[..4].try_into().unwrap()), 0x7, "REFUSED_STREAM");
    // The two streams within the limit are answered.
    const DATA: u8 = 0x0;
    const END_STREAM: u8 = 0x1;
    const HEADERS: u8 = 0x1;
    for stream in [1, 3] {
        tcp.write_all(&frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0])).await.unwrap();
        next_frame(&mut tcp, HEADERS, stream).await;
    }
    mesh.client().unary(EchoRequest::default()).await.expect("other callers are served");
}

#[tokio::test]
async fn a_request_head_past_max_header_list_size_is_refused_and_the_others_are_served() {
    let mesh = Mesh::start_with(MeshOptions { limits: "{max_header_list_size: 2KiB}", ..Default::default() }).await;
    let with_metadata = |bytes: usize| {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.metadata_mut().insert("x-echo-big", "x".repeat(bytes).parse().unwrap());
        request
    };
    mesh.client().unary(with_metadata(1000)).await.expect("a head under the limit is taken");
    let refused = mesh.client().unary(with_metadata(4000)).await.unwrap_err();
    assert!(refused.message().contains("431"), "HTTP 431 Request Header Fields Too Large: {refused:?}");
    assert_eq!(mesh.calls(), 1);
    mesh.client().unary(EchoRequest::default()).await.expect("other callers are served");
}

#[tokio::test]
async fn a_connection_that_answers_no_ping_is_closed_and_one_that_does_is_kept() {
    let limits = "{keepalive_interval: 100ms, keepalive_timeout: 200ms}";
    let mesh = Mesh::start_with(MeshOptions { limits, ..Default::default() }).await;
    let outbound = mesh.client_sidecar.outbound_addr;
    // h2 answers pings by itself.
    let answering = http2(TcpStream::connect(outbound).await.unwrap()).await.unwrap();
    let mut silent = TcpStream::connect(outbound).await.unwrap();
    let mut opening = PREFACE.to_vec();
    opening.extend(frame(0x4, 0, 0, &[]));
    silent.write_all(&opening).await.unwrap();
    closed(silent).await;
    assert_eq!(unary(&answering).await.expect("the answering connection is open"), Code::Ok);
    let series = "protomesh_connections_closed_at_limit_total{direction=\"outbound\",limit=\"keepalive_timeout\"}";
    assert_eq!(metric(mesh.client_sidecar.admin_addr, series).await, 1.0);
}

#[tokio::test]
async fn a_connection_without_calls_is_closed_after_idle_timeout_but_not_during_a_call() {
    let mesh = Mesh::start_with(MeshOptions { limits: "{idle_timeout: 300ms}", ..Default::default() }).await;
    let tcp = TcpStream::connect(mesh.client_sidecar.outbound_addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    // A stream that lasts longer than the idle timeout keeps the connection.
    let request = Request::post("http://mesh/echo.v1.Echo/ServerStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let message = prost::Message::encode_to_vec(&EchoRequest { reply_count: 2, delay_ms: 400, ..Default::default() });
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend(message);
    let mut sender = sender.ready().await.unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    body.send_data(framed.into(), true).unwrap();
    let mut body = within("the long call's head", response).await.unwrap().into_body();
    while let Some(data) = body.data().await {
        let _ = body.flow_control().release_capacity(data.unwrap().len());
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0", "the call outlived the idle timeout: {trailers:?}");
    // The caller keeps the connection (its `sender`) open; the sidecar closes it once idle.
    within("the idle connection closed", connection).await.unwrap().expect("closed with GOAWAY");
    drop(sender);
    let series = "protomesh_connections_closed_at_limit_total{direction=\"outbound\",limit=\"idle_timeout\"}";
    assert_eq!(metric(mesh.client_sidecar.admin_addr, series).await, 1.0);
}

#[tokio::test]
async fn a_message_past_max_message_size_ends_its_call_with_resource_exhausted() {
    let options = MeshOptions {
        client_policy: "{methods: {'echo.v1.Echo/Unary': {max_message_size: 1KiB}}}",
        server_policy: "{methods: {'echo.v1.Echo/ServerStream': {max_message_size: 1KiB}}}",
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    let mut client = mesh.client();
    let sized = |bytes: usize| EchoRequest { payload: vec![7; bytes].into(), ..Default::default() };

    // Outbound, a request: just under the limit is carried, just over is refused before the app sees it.
    let reply = client.unary(sized(900)).await.expect("messages under the limit are carried");
    assert_eq!(reply.into_inner().payload.len(), 900);
    let refused = client.unary(sized(1100)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().starts_with("protomesh outbound: a request message of 1103 bytes exceeds max_message_size"),
        "{refused:?}"
    );
    assert!(refused.message().contains("policy.methods[\"echo.v1.Echo/Unary\"]"), "{refused:?}");
    assert_eq!(mesh.calls(), 1, "the app never saw the large message");

    // Inbound, a response stream: messages under the limit go through, the first over it ends the stream.
    let stream = |bytes: u32| EchoRequest { reply_count: 3, reply_payload_bytes: bytes, ..Default::default() };
    let mut replies = client.server_stream(stream(900)).await.unwrap().into_inner();
    let mut received = 0;
    while replies.message().await.expect("messages under the limit are carried").is_some() {
        received += 1;
    }
    assert_eq!(received, 3);
    let mut replies = client.server_stream(stream(1100)).await.unwrap().into_inner();
    let ended = loop {
        match replies.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended well past the limit"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().starts_with("protomesh inbound: a response message of"), "{ended:?}");

    client.unary(sized(10)).await.expect("other calls are served");
}

#[tokio::test]
async fn over_the_memory_budget_new_calls_are_shed_until_the_budget_is_raised() {
    let mesh = Mesh::start_with(MeshOptions { limits: "{memory_budget: 1MiB}", ..Default::default() }).await;
    let mut client = mesh.client();
    // Memory is sampled in the background: the first sample may follow the first call.
    let shed = within("calls shed", async {
        loop {
            match client.unary(EchoRequest::default()).await {
                Err(status) if status.code() == Code::ResourceExhausted => return status,
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    // Both sidecars run in this test's process, so either may shed first.
    let (direction, admin_addr) = match shed.message().split(':').next() {
        Some("protomesh outbound") => ("outbound", mesh.client_sidecar.admin_addr),
        _ => ("inbound", mesh.server_sidecar.admin_addr),
    };
    assert!(shed.message().contains(": sidecar memory "), "{shed:?}");
    assert!(shed.message().contains("is over limits.memory_budget 1.0 MiB"), "{shed:?}");
    let series = format!("protomesh_refused_total{{direction=\"{direction}\",reason=\"memory_budget\"}}");
    assert!(metric(admin_addr, &series).await >= 1.0);

    for workload in ["client", "server"] {
        mesh.edit_config(workload, "memory_budget: 1MiB", "memory_budget: 4GiB");
    }
    within("calls served again", async {
        while client.unary(EchoRequest::default()).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}
