//! The web listener, `inbound.web.listen`, and the captured app ports of
//! `inbound.web.ports`: HTTP/1.1 for browsers and HTTP clients. A gRPC-Web call (`grpc_web.rs`) or a JSON call to a route of
//! the contracts' `google.api.http` options (`json.rs`) becomes an ordinary
//! gRPC call on an in-memory HTTP/2 connection to the inbound edge, as from
//! a peer without a certificate, so it meets every inbound policy
//! (authorization by `inbound.web.methods`, validation, limits, deadlines,
//! metrics, traces, taps) and reaches `inbound.app`. CORS preflights are
//! answered here, from config (`cors.rs`).

pub mod codec;
pub mod cors;
mod grpc_web;
mod json;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::connection;
use super::edge::{EdgeState, InboundEdge};
use super::open::OpenConnections;
use super::routes::CurrentRoutes;
use super::server::{PeerIdentity, PeerInfo, Serving, WebFront, admit, next_connection};
use crate::call::{AnswerErrors, Direction};
use crate::config::{CONNECTION_WINDOW, LimitsConfig};
use codec::Mode;
use cors::{Cors, Origin};

/// A response body; an error breaks the connection off, for an answer
/// that failed after it began.
type WebBody = BoxBody<Bytes, std::io::Error>;

/// Request headers that belong to the HTTP/1.1 hop or to the browser, not
/// the call (HTTP/2 forbids those of the connection).
const HOP: [HeaderName; 9] = [
    HOST,
    ORIGIN,
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::CONTENT_LENGTH,
    http::header::TE,
    http::header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Serves `listener` until the drain starts.
pub async fn serve(listener: TcpListener, edges: EdgeState, serving: Serving) {
    let open = OpenConnections::default();
    let draining = serving.drain.clone().signaled();
    tokio::pin!(draining);
    while let Some((tcp, addr)) = next_connection(&listener, &mut draining, &serving.warnings, "web").await {
        let config = serving.routes.load().config.clone();
        let limits = (config.limits.max_connections, config.limits.max_connections_per_source);
        let Some(admitted) = admit(&open, addr, limits, Direction::Inbound, &serving.metrics) else { continue };
        let Some(web) = config.inbound.as_ref().and_then(|inbound| inbound.web.as_ref()) else { continue };
        let cors = Arc::new(Cors { allowed_origins: web.allowed_origins.clone(), max_age: web.max_age });
        let (edges, serving, limits) = (edges.clone(), serving.clone(), config.limits);
        let workers = serving.workers.clone();
        workers.spawn(async move {
            let _admitted = admitted;
            let _ = tcp.set_nodelay(true);
            serve_connection(tcp, (addr, None), (cors, limits), edges, serving).await;
        });
    }
}

/// The front for captured plaintext HTTP/1.1 connections to
/// `inbound.web.ports`: served as on the listener, for the app at the port
/// they were made to. Which ports follows reloads.
pub fn for_captured_ports(edges: EdgeState, serving: Serving) -> WebFront {
    Arc::new(move |tcp, peer: PeerInfo| {
        let (edges, serving) = (edges.clone(), serving.clone());
        Box::pin(async move {
            let config = serving.routes.load().config.clone();
            let Some(web) = config.inbound.as_ref().and_then(|inbound| inbound.web.as_ref()) else { return };
            let cors = Arc::new(Cors { allowed_origins: web.allowed_origins.clone(), max_age: web.max_age });
            let _ = tcp.set_nodelay(true);
            serve_connection(tcp, (peer.addr, peer.original_destination), (cors, config.limits), edges, serving).await;
        })
    })
}

/// What every call on one connection shares.
struct Front {
    cors: Arc<Cors>,
    routes: CurrentRoutes,
    limits: LimitsConfig,
}

/// One browser connection from `addr`: HTTP/1.1 in front, an in-memory
/// HTTP/2 connection to the inbound edge behind, whose calls go to the app
/// at the port of `original_destination` when the capture rules brought
/// it, and to `inbound.app` otherwise.
async fn serve_connection(
    tcp: TcpStream,
    (addr, original_destination): (SocketAddr, Option<SocketAddr>),
    (cors, limits): (Arc<Cors>, LimitsConfig),
    edges: EdgeState,
    serving: Serving,
) {
    let (front, back) = tokio::io::duplex(CONNECTION_WINDOW as usize);
    let peer = PeerInfo { addr, identity: PeerIdentity::Unauthenticated, original_destination };
    let edge = AnswerErrors::new(Direction::Inbound, InboundEdge::new(edges, peer));
    let drain = serving.drain.clone();
    tokio::spawn(async move { connection::serve(back, edge, &limits, drain).await });
    let Ok((calls, connection)) = h2::client::handshake(front).await else { return };
    tokio::spawn(connection);
    let shared = Arc::new(Front { cors, routes: serving.routes.clone(), limits });
    let service = hyper::service::service_fn(move |request| {
        let (calls, shared) = (calls.clone(), shared.clone());
        async move { Ok::<_, Infallible>(answer(request, calls, &shared).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.first_frame_timeout)
        .serve_connection(TokioIo::new(tcp), service);
    let _ = connection.await;
}

async fn answer(request: Request<Incoming>, calls: h2::client::SendRequest<Bytes>, front: &Front) -> Response<WebBody> {
    let cors_headers = match front.cors.origin(request.headers()) {
        Origin::None => HeaderMap::new(),
        Origin::Allowed(origin) if request.method() == Method::OPTIONS => {
            return plain(StatusCode::NO_CONTENT, front.cors.preflight(origin, request.headers()), String::new());
        }
        Origin::Allowed(origin) => front.cors.response(origin),
        Origin::Refused(origin) => {
            let why = format!("origin {origin} is not in inbound.web.allowed_origins");
            return plain(StatusCode::FORBIDDEN, HeaderMap::new(), why);
        }
    };
    let content_type = request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if let Some(mode) = Mode::of(content_type) {
        return grpc_web::answer(request, calls, mode, cors_headers).await;
    }
    if content_type.trim_start().to_ascii_lowercase().starts_with("application/grpc") {
        let why = format!(
            "`{content_type}` is not served here: gRPC-Web calls are application/grpc-web or application/grpc-web-text \
             (protobuf messages), and JSON calls application/json"
        );
        return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, cors_headers, why);
    }
    json::answer(request, calls, front, cors_headers).await
}

/// A body of one piece.
fn whole(bytes: impl Into<Bytes>) -> WebBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A plain HTTP answer, for what is not a call.
fn plain(status: StatusCode, headers: HeaderMap, text: String) -> Response<WebBody> {
    let mut response = Response::new(whole(text));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The gRPC call an HTTP request makes to `path`: its headers but those
/// of the hop, those `skip` names and `x-grpc-web`, with gRPC's own. The
/// call's :authority is the request's Host, as an HTTP/2 client's would be.
fn call_request(head: &http::request::Parts, path: &str, skip: &[HeaderName]) -> Result<Request<()>, String> {
    let host = head.headers.get(HOST).and_then(|host| host.to_str().ok()).unwrap_or("localhost");
    let uri = http::Uri::builder().scheme("http").authority(host).path_and_query(path).build();
    let uri = uri.map_err(|_| format!("`{host}` is not a host, or `{path}` not a path"))?;
    let mut call = Request::post(uri).body(()).expect("a URI and a method make a request");
    let headers = call.headers_mut();
    for (name, value) in &head.headers {
        if !HOP.contains(name) && !skip.contains(name) && !name.as_str().starts_with("x-grpc-web") {
            headers.append(name, value.clone());
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    Ok(call)
}

/// Starts `call` on the connection to the inbound edge.
async fn start(
    calls: h2::client::SendRequest<Bytes>,
    call: Request<()>,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), String> {
    let mut calls = calls.ready().await.map_err(|e| format!("the call could not start: {e}"))?;
    calls.send_request(call, false).map_err(|e| format!("the call could not start: {e}"))
}

/// Sends `data` as the stream's window opens, so that a slow app holds the
/// caller back rather than this sidecar's memory.
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
