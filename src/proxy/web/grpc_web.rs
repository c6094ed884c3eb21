//! A gRPC-Web call: the browser's body decoded into the call as it comes
//! (`codec.rs`), and the call's messages and trailers encoded back into the
//! response body, as the protocol's PROTOCOL-WEB.md says.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::codec::{self, Mode, TextDecoder, TextEncoder, trailers_frame};
use super::{WebBody, call_request, plain, send_data, start, whole};
use crate::grpc::{self, Code, GRPC_STATUS};

/// A gRPC-Web status with no message, as headers (trailers-only).
fn status(code: Code, message: &str, mode: Mode, mut headers: HeaderMap) -> Response<WebBody> {
    headers.extend(grpc::status_headers(code, &format!("protomesh inbound: {message}")));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(mode.content_type()));
    let mut response = Response::new(whole(Bytes::new()));
    *response.headers_mut() = headers;
    response
}

pub(super) async fn answer(
    request: Request<Incoming>,
    calls: h2::client::SendRequest<Bytes>,
    mode: Mode,
    cors_headers: HeaderMap,
) -> Response<WebBody> {
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, cors_headers, "gRPC-Web calls are POST".into());
    }
    let (head, body) = request.into_parts();
    let call = match call_request(&head, head.uri.path(), &[CONTENT_TYPE]) {
        Ok(call) => call,
        Err(why) => return plain(StatusCode::BAD_REQUEST, cors_headers, why),
    };
    let (response, sending) = match start(calls, call).await {
        Ok(started) => started,
        Err(why) => return status(Code::Unavailable, &why, mode, cors_headers),
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
        let mut response = Response::new(whole(Bytes::new()));
        *response.headers_mut() = headers;
        return response;
    }
    let (frames, body) = mpsc::channel(4);
    tokio::spawn(receive_body(received, frames, mode, unreadable));
    let mut response = Response::new(StreamBody::new(stream_of(body)).boxed());
    *response.headers_mut() = headers;
    response
}

/// The receiver as a stream of frames.
fn stream_of(
    mut body: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
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
