//! gRPC-Web for browsers: `inbound.grpc_web.listen` serves
//! `application/grpc-web` and `-text` over HTTP/1.1. Each call becomes an
//! ordinary gRPC call on an in-memory HTTP/2 connection to the inbound edge,
//! as from a peer without a certificate, so it meets every inbound policy
//! (authorization by `inbound.grpc_web.methods`, validation, limits,
//! deadlines, metrics, traces, taps) and reaches `inbound.app`. CORS
//! preflights are answered here, from config; `codec.rs` is the protocol's
//! encoding, `cors.rs` the browsers' cross-origin checks.

pub mod codec;
pub mod cors;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::connection;
use super::edge::{EdgeState, InboundEdge};
use super::open::OpenConnections;
use super::server::{PeerIdentity, PeerInfo, Serving, admit, next_connection};
use crate::call::{AnswerErrors, Direction};
use crate::config::{CONNECTION_WINDOW, LimitsConfig};
use crate::grpc::{self, Code, GRPC_STATUS};
use codec::{Mode, TextDecoder, TextEncoder, trailers_frame};
use cors::{Cors, Origin};

type WebBody = BoxBody<Bytes, Infallible>;

/// Request headers that belong to the HTTP/1.1 hop or to the browser, not the call.
const HOP: [HeaderName; 5] =
    [HOST, http::header::CONNECTION, http::header::TRANSFER_ENCODING, http::header::CONTENT_LENGTH, http::header::TE];

/// Serves `listener` until the drain starts.
pub async fn serve(listener: TcpListener, edges: EdgeState, serving: Serving) {
    let open = OpenConnections::default();
    let draining = serving.drain.clone().signaled();
    tokio::pin!(draining);
    while let Some((tcp, addr)) = next_connection(&listener, &mut draining, &serving.warnings, "gRPC-Web").await {
        let config = serving.routes.load().config.clone();
        let limits = (config.limits.max_connections, config.limits.max_connections_per_source);
        let Some(admitted) = admit(&open, addr, limits, Direction::Inbound, &serving.metrics) else { continue };
        let Some(web) = config.inbound.as_ref().and_then(|inbound| inbound.grpc_web.as_ref()) else { continue };
        let cors = Arc::new(Cors { allowed_origins: web.allowed_origins.clone(), max_age: web.max_age });
        let (edges, serving, limits) = (edges.clone(), serving.clone(), config.limits);
        let workers = serving.workers.clone();
        workers.spawn(async move {
            let _admitted = admitted;
            serve_connection(tcp, addr, (cors, limits), edges, serving).await;
        });
    }
}

/// One browser connection: HTTP/1.1 in front, an in-memory HTTP/2
/// connection to the inbound edge behind.
async fn serve_connection(
    tcp: TcpStream,
    addr: SocketAddr,
    (cors, limits): (Arc<Cors>, LimitsConfig),
    edges: EdgeState,
    serving: Serving,
) {
    let _ = tcp.set_nodelay(true);
    let (front, back) = tokio::io::duplex(CONNECTION_WINDOW as usize);
    let peer = PeerInfo { addr, identity: PeerIdentity::Unauthenticated, original_destination: None };
    let edge = AnswerErrors::new(Direction::Inbound, InboundEdge::new(edges, peer));
    let drain = serving.drain.clone();
    tokio::spawn(async move { connection::serve(back, edge, &limits, drain).await });
    let Ok((calls, connection)) = h2::client::handshake(front).await else { return };
    tokio::spawn(connection);
    let service = hyper::service::service_fn(move |request| {
        let (calls, cors) = (calls.clone(), cors.clone());
        async move { Ok::<_, Infallible>(answer(request, calls, &cors).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.first_frame_timeout)
        .serve_connection(TokioIo::new(tcp), service);
    let _ = connection.await;
}

/// A plain HTTP answer, for what is not a gRPC-Web call.
fn plain(status: StatusCode, headers: HeaderMap, text: String) -> Response<WebBody> {
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A gRPC-Web status with no message, as headers (trailers-only).
fn status(code: Code, message: &str, mode: Mode, mut headers: HeaderMap) -> Response<WebBody> {
    headers.extend(grpc::status_headers(code, &format!("protomesh inbound: {message}")));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(mode.content_type()));
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.headers_mut() = headers;
    response
}

async fn answer(request: Request<Incoming>, calls: h2::client::SendRequest<Bytes>, cors: &Cors) -> Response<WebBody> {
    let cors_headers = match cors.origin(request.headers()) {
        Origin::None => HeaderMap::new(),
        Origin::Allowed(origin) if request.method() == Method::OPTIONS => {
            return plain(StatusCode::NO_CONTENT, cors.preflight(origin, request.headers()), String::new());
        }
        Origin::Allowed(origin) => cors.response(origin),
        Origin::Refused(origin) => {
            let why = format!("origin {origin} is not in inbound.grpc_web.allowed_origins");
            return plain(StatusCode::FORBIDDEN, HeaderMap::new(), why);
        }
    };
    let content_type = request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let Some(mode) = Mode::of(content_type) else {
        let why = format!(
            "this port serves gRPC-Web: POST with content-type application/grpc-web or application/grpc-web-text, not `{content_type}`"
        );
        return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, cors_headers, why);
    };
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, cors_headers, "gRPC-Web calls are POST".into());
    }
    let (head, body) = request.into_parts();
    // The call's :authority is the browser's Host, as an HTTP/2 client's would be.
    let host = head.headers.get(HOST).and_then(|host| host.to_str().ok()).unwrap_or("localhost");
    let uri = http::Uri::builder().scheme("http").authority(host).path_and_query(head.uri.path()).build();
    let Ok(uri) = uri else {
        return plain(StatusCode::BAD_REQUEST, cors_headers, format!("`{host}` is not a host, or the path not a path"));
    };
    let mut call = Request::post(uri).body(()).expect("a URI and a method make a request");
    let headers = call.headers_mut();
    for (name, value) in &head.headers {
        if !HOP.contains(name) && name != ORIGIN && name != CONTENT_TYPE && !name.as_str().starts_with("x-grpc-web") {
            headers.append(name, value.clone());
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    let mut calls = match calls.ready().await {
        Ok(calls) => calls,
        Err(error) => {
            return status(Code::Unavailable, &format!("the call could not start: {error}"), mode, cors_headers);
        }
    };
    let (response, sending) = match calls.send_request(call, false) {
        Ok(started) => started,
        Err(error) => {
            return status(Code::Unavailable, &format!("the call could not start: {error}"), mode, cors_headers);
        }
    };
    let unreadable = Unreadable::default();
    tokio::spawn(send_body(body, sending, mode, unreadable.clone()));
    let response = response.await;
    // A body that is not base64 reset the call: say so rather than how it ended.
    if let Some(why) = unreadable.get() {
        return status(Code::InvalidArgument, why, mode, cors_headers);
    }
    let response = match response {
        Ok(response) => response,
        Err(error) => return status(Code::Unavailable, &format!("the call broke off: {error}"), mode, cors_headers),
    };
    let (head, received) = response.into_parts();
    let mut headers = cors_headers;
    for (name, value) in &head.headers {
        if name != CONTENT_TYPE {
            headers.append(name, value.clone());
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(mode.content_type()));
    // A trailers-only answer: its status is in the headers, as gRPC-Web allows.
    if head.headers.contains_key(GRPC_STATUS) {
        let mut response = Response::new(Full::new(Bytes::new()).boxed());
        *response.headers_mut() = headers;
        return response;
    }
    let (frames, body) = mpsc::channel(4);
    tokio::spawn(receive_body(received, frames, mode, unreadable));
    let mut response = Response::new(StreamBody::new(tokio_stream_of(body)).boxed());
    *response.headers_mut() = headers;
    response
}

/// The receiver as a stream of frames.
fn tokio_stream_of(
    mut body: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    futures_util::stream::poll_fn(move |cx| body.poll_recv(cx).map(|data| data.map(|data| Ok(Frame::data(data)))))
}

/// The browser's body to the call, decoded, as the call's window allows.
/// Why a text request could not be read, once it could not: the call was
/// reset, and the browser is told this rather than how the call ended.
type Unreadable = Arc<OnceLock<String>>;

async fn send_body(mut body: Incoming, mut sending: h2::SendStream<Bytes>, mode: Mode, unreadable: Unreadable) {
    let refuse = |sending: &mut h2::SendStream<Bytes>, error: codec::NotBase64| {
        let _ = unreadable.set(error.to_string());
        sending.send_reset(h2::Reason::CANCEL);
    };
    let mut text = TextDecoder::default();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            sending.send_reset(h2::Reason::CANCEL);
            return;
        };
        let Ok(data) = frame.into_data() else { continue };
        let data = match mode {
            Mode::Binary => data,
            Mode::Text => match text.decode(&data) {
                Ok(data) => data,
                Err(error) => return refuse(&mut sending, error),
            },
        };
        if send_data(&mut sending, data).await.is_err() {
            return;
        }
    }
    if mode == Mode::Text
        && let Err(error) = text.finish()
    {
        return refuse(&mut sending, error);
    }
    let _ = sending.send_data(Bytes::new(), true);
}

/// Sends `data` as the stream's window opens, so that a slow app holds the
/// browser back rather than this sidecar's memory.
async fn send_data(sending: &mut h2::SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        sending.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| sending.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        let chunk = data.split_to(granted.min(data.len()));
        sending.send_data(chunk, false)?;
    }
    Ok(())
}

/// The call's response to the browser: its messages, then its trailers as
/// gRPC-Web's last frame; in text mode, all of it one base64 run.
async fn receive_body(mut received: h2::RecvStream, frames: mpsc::Sender<Bytes>, mode: Mode, unreadable: Unreadable) {
    let mut text = TextEncoder::default();
    // Binary goes on as it came; text is one base64 run.
    let encode = |text: &mut TextEncoder, data: Bytes| match mode {
        Mode::Binary => data,
        Mode::Text => text.encode(&data),
    };
    while let Some(data) = received.data().await {
        let Ok(data) = data else { break };
        let _ = received.flow_control().release_capacity(data.len());
        let out = encode(&mut text, data);
        if !out.is_empty() && frames.send(out).await.is_err() {
            return;
        }
    }
    // Broken off: the browser learns it from a status, as a gRPC client would.
    let broken = |code, why: &str| grpc::status_headers(code, &format!("protomesh inbound: {why}"));
    let trailers = match (unreadable.get(), received.trailers().await) {
        (Some(why), _) => broken(Code::InvalidArgument, why),
        (None, Ok(Some(trailers))) => trailers,
        (None, Ok(None)) => broken(Code::Internal, "the call ended without trailers"),
        (None, Err(error)) => broken(Code::Unavailable, &format!("the call broke off: {error}")),
    };
    let mut trailers = trailers;
    trailers.remove(CONTENT_TYPE);
    let mut last = encode(&mut text, trailers_frame(&trailers)).to_vec();
    if mode == Mode::Text {
        last.extend_from_slice(&text.finish());
    }
    let _ = frames.send(last.into()).await;
}
