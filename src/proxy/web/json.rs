//! A JSON call: the request's method and path find a route of the
//! contracts' `google.api.http` options (`crate::transcode`), which makes
//! the request message of the path, the query and the body; the call's
//! answer goes back as JSON, a server stream as a JSON array, and a failed
//! call as a JSON `google.rpc.Status` under the HTTP status gRPC maps it to.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use prost_reflect::DynamicMessage;
use tokio::sync::mpsc;

use super::{Front, WebBody, call_request, plain, send_data, start, whole};
use crate::grpc::{self, Code, GRPC_STATUS, GRPC_STATUS_DETAILS_BIN};
use crate::proxy::routes::Routes;
use crate::transcode::{Found, Route, http_status, request_message, response_json, status_json};

/// Headers a JSON caller sends that are not the call's: the call is sent
/// and answered uncompressed, in protobuf.
const SKIP: [HeaderName; 5] = [
    CONTENT_TYPE,
    ACCEPT,
    http::header::ACCEPT_ENCODING,
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("grpc-accept-encoding"),
];

pub(super) async fn answer(
    request: Request<Incoming>,
    calls: h2::client::SendRequest<Bytes>,
    front: &Front,
    cors_headers: HeaderMap,
) -> Response<WebBody> {
    let routes = front.routes.load_full();
    let Some(json_routes) = routes.inbound.as_ref().and_then(|inbound| inbound.json.as_ref()) else {
        let why = "this port serves gRPC-Web only (inbound.web.json: off): POST with content-type \
                   application/grpc-web or application/grpc-web-text";
        return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, cors_headers, why.into());
    };
    let answer = Answer { routes: &routes, headers: cors_headers };
    let (head, body) = request.into_parts();
    let (route, bindings) = match json_routes.find(&head.method, head.uri.path()) {
        Found::Route(route, bindings) => (route, bindings),
        Found::OtherMethods(methods) => {
            let why = format!("{} {} has routes for {} only", head.method, head.uri.path(), methods.join(", "));
            let mut refused = answer.error(Code::Unimplemented, &why, None);
            *refused.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            if let Ok(allow) = HeaderValue::try_from(methods.join(", ")) {
                refused.headers_mut().insert(http::header::ALLOW, allow);
            }
            return refused;
        }
        Found::Nothing => {
            let why = format!(
                "no JSON route answers {} {}: routes come from the google.api.http options of the methods \
                 inbound.web.methods lists",
                head.method,
                head.uri.path()
            );
            return answer.error(Code::NotFound, &why, None);
        }
    };
    if !route.method.shape.one_request() {
        let why = format!("{} is {}: a JSON call carries one request message", route.method.path, route.method.shape);
        return answer.error(Code::Unimplemented, &why, None);
    }
    let read = Limited::new(body, route.max_body).collect();
    let method = &route.method.path;
    let body = match tokio::time::timeout(front.limits.first_frame_timeout, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            let max = route.max_body;
            let why =
                format!("{method}: the body exceeds {max} bytes, the method's max_message_size (4 MiB when unset)");
            let mut refused = answer.error(Code::ResourceExhausted, &why, None);
            *refused.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return refused;
        }
        Ok(Err(error)) => {
            return answer.error(Code::InvalidArgument, &format!("{method}: the body broke off: {error}"), None);
        }
        Err(_) => {
            let timeout = front.limits.first_frame_timeout;
            let why = format!("{method}: the body did not arrive within limits.first_frame_timeout {timeout:?}");
            return answer.error(Code::DeadlineExceeded, &why, None);
        }
    };
    let message = match request_message(&route, &bindings, head.uri.query(), &body) {
        Ok(message) => message,
        Err(bad) => return answer.error(Code::InvalidArgument, &format!("{}: {bad}", route.method.path), None),
    };
    let call = match call_request(&head, &route.method.path, &SKIP) {
        Ok(call) => call,
        Err(why) => return answer.error(Code::InvalidArgument, &why, None),
    };
    let (response, mut sending) = match start(calls, call).await {
        Ok(started) => started,
        Err(why) => return answer.error(Code::Unavailable, &why, None),
    };
    if send_data(&mut sending, grpc::framed(&message)).await.is_ok() {
        let _ = sending.send_data(Bytes::new(), true);
    }
    let (head, received) = match response.await {
        Ok(response) => response.into_parts(),
        Err(error) => return answer.error(Code::Unavailable, &format!("the call broke off: {error}"), None),
    };
    if head.headers.contains_key(GRPC_STATUS) {
        return answer.status(&head.headers);
    }
    let mut messages = Messages { received, buffered: BytesMut::new(), max: route.max_body };
    let first = match messages.next().await {
        Ok(first) => first,
        Err(ended) => return answer.ended(ended),
    };
    let Some(first) = first else {
        let ended = messages.end().await;
        return match (ended.code, route.method.shape.one_response()) {
            (Code::Ok, true) => answer.error(Code::Internal, "the app answered OK with no response message", None),
            (Code::Ok, false) => json_response(StatusCode::OK, answer.response_headers(&head.headers), whole("[]")),
            _ => answer.ended(ended),
        };
    };
    let headers = answer.response_headers(&head.headers);
    if route.method.shape.one_response() {
        let ended = messages.end().await;
        if ended.code != Code::Ok {
            return answer.ended(ended);
        }
        return match render(&route, &first) {
            Ok(json) => json_response(StatusCode::OK, headers, whole(json)),
            Err(why) => answer.error(Code::Internal, &why, None),
        };
    }
    // A server stream: a JSON array, written as the messages come. Once it
    // has begun its status is sent; a failure after that breaks the body
    // off, so that no caller reads a cut stream as a whole one.
    let (frames, body) = mpsc::channel(4);
    tokio::spawn(stream_array(route, first, messages, frames));
    json_response(StatusCode::OK, headers, StreamBody::new(stream_of(body)).boxed())
}

/// How a JSON call is answered: with the CORS headers, and errors written
/// with the details' types the contracts know.
struct Answer<'a> {
    routes: &'a Routes,
    headers: HeaderMap,
}

impl Answer<'_> {
    /// A refusal of the sidecar's own.
    fn error(&self, code: Code, why: &str, details: Option<&[u8]>) -> Response<WebBody> {
        self.status_of(code, &format!("protomesh inbound: {why}"), details)
    }

    fn status_of(&self, code: Code, message: &str, details: Option<&[u8]>) -> Response<WebBody> {
        let body = status_json(code, message, details, &[self.routes.contracts.descriptors()]);
        json_response(http_status(code), self.headers.clone(), whole(body))
    }

    /// A call that ended with `trailers` (or a trailers-only answer).
    fn status(&self, trailers: &HeaderMap) -> Response<WebBody> {
        self.ended(Ended::of(trailers))
    }

    fn ended(&self, ended: Ended) -> Response<WebBody> {
        self.status_of(ended.code, &ended.message, ended.details.as_ref().map(HeaderValue::as_bytes))
    }

    /// The app's response headers, as HTTP headers, but gRPC's own.
    fn response_headers(&self, call: &HeaderMap) -> HeaderMap {
        let mut headers = self.headers.clone();
        for (name, value) in call {
            if name != CONTENT_TYPE && !name.as_str().starts_with("grpc-") {
                headers.append(name, value.clone());
            }
        }
        headers
    }
}

fn json_response(status: StatusCode, mut headers: HeaderMap, body: WebBody) -> Response<WebBody> {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// How a call ended: its status, message and details.
struct Ended {
    code: Code,
    message: String,
    details: Option<HeaderValue>,
}

impl Ended {
    fn of(trailers: &HeaderMap) -> Ended {
        Ended {
            code: grpc::status_in(trailers).unwrap_or(Code::Unknown),
            message: grpc::message_in(trailers),
            details: trailers.get(GRPC_STATUS_DETAILS_BIN).cloned(),
        }
    }

    fn sidecar(code: Code, why: String) -> Ended {
        Ended { code, message: format!("protomesh inbound: {why}"), details: None }
    }
}

/// The response's messages, one whole message at a time.
struct Messages {
    received: h2::RecvStream,
    buffered: BytesMut,
    max: usize,
}

impl Messages {
    /// The next message; `None` once the data ends.
    async fn next(&mut self) -> Result<Option<Bytes>, Ended> {
        loop {
            if self.buffered.len() >= 5 {
                let (compressed, length) = (self.buffered[0] & 1 == 1, (&self.buffered[1..5]).get_u32() as usize);
                if compressed {
                    return Err(Ended::sidecar(
                        Code::Internal,
                        "the app compressed its response, which the call did not accept".into(),
                    ));
                }
                if length > self.max {
                    let why = format!("a response message of {length} bytes exceeds {} bytes", self.max);
                    return Err(Ended::sidecar(Code::ResourceExhausted, why));
                }
                if self.buffered.len() >= 5 + length {
                    self.buffered.advance(5);
                    return Ok(Some(self.buffered.split_to(length).freeze()));
                }
            }
            match self.received.data().await {
                Some(Ok(data)) => {
                    let _ = self.received.flow_control().release_capacity(data.len());
                    self.buffered.extend_from_slice(&data);
                }
                Some(Err(error)) => {
                    return Err(Ended::sidecar(Code::Unavailable, format!("the call broke off: {error}")));
                }
                None if self.buffered.is_empty() => return Ok(None),
                None => return Err(Ended::sidecar(Code::Internal, "the response ended inside a message".into())),
            }
        }
    }

    /// How the call ended, once its messages are read.
    async fn end(mut self) -> Ended {
        match self.next().await {
            Ok(Some(_)) => {
                let why = "the app answered a call of one response with more than one message".into();
                return Ended::sidecar(Code::Internal, why);
            }
            Ok(None) => {}
            Err(ended) => return ended,
        }
        match self.received.trailers().await {
            Ok(Some(trailers)) => Ended::of(&trailers),
            Ok(None) => Ended::sidecar(Code::Internal, "the call ended without trailers".into()),
            Err(error) => Ended::sidecar(Code::Unavailable, format!("the call broke off: {error}")),
        }
    }
}

/// A response message as the route's JSON.
fn render(route: &Route, message: &[u8]) -> Result<Vec<u8>, String> {
    let decoded = DynamicMessage::decode(route.response.clone(), message)
        .map_err(|e| format!("the app's response is not a {}: {e}", route.response.full_name()))?;
    response_json(route, &decoded)
}

type Chunk = Result<Bytes, std::io::Error>;

/// A server stream's messages as one JSON array.
async fn stream_array(route: Arc<Route>, first: Bytes, mut messages: Messages, frames: mpsc::Sender<Chunk>) {
    let broken = |why: String| Err(std::io::Error::other(why));
    let mut next = Some(first);
    let mut separator = b'[';
    while let Some(message) = next {
        let json = match render(&route, &message) {
            Ok(json) => json,
            Err(why) => {
                let _ = frames.send(broken(why)).await;
                return;
            }
        };
        let mut chunk = Vec::with_capacity(json.len() + 1);
        chunk.push(separator);
        chunk.extend_from_slice(&json);
        separator = b',';
        if frames.send(Ok(chunk.into())).await.is_err() {
            return;
        }
        next = match messages.next().await {
            Ok(next) => next,
            Err(ended) => {
                let _ = frames.send(broken(ended.message)).await;
                return;
            }
        };
    }
    let ended = messages.end().await;
    let last = match ended.code {
        Code::Ok => Ok(Bytes::from_static(b"]")),
        code => broken(format!("{}: {}", code.name(), ended.message)),
    };
    let _ = frames.send(last).await;
}

fn stream_of(
    mut body: mpsc::Receiver<Chunk>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
    futures_util::stream::poll_fn(move |cx| body.poll_recv(cx).map(|chunk| chunk.map(|chunk| chunk.map(Frame::data))))
}
