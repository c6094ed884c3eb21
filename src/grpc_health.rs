//! The `grpc.health.v1.Health/Check` call on the wire, both ways: the
//! request the sidecar sends (probing its app for the kubelet, checking a
//! peer's endpoints), the answer it reads, and the answer it gives for its
//! app when the app has no health service.

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request};
use prost::Message;

use crate::grpc::{self, Code};
pub use crate::pb::grpc::health::v1::health_check_response::ServingStatus;
use crate::pb::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse};

pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// A health message is a few bytes; a peer sending more is not answering one.
pub const MAX_MESSAGE: usize = 64 << 10;

/// The head of a Check call to `authority`.
pub fn check_head(authority: &str) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() =
        format!("http://{authority}{CHECK_PATH}").parse().unwrap_or_else(|_| CHECK_PATH.parse().expect("a path"));
    request.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    request.headers_mut().insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    request
}

/// The Check request for `service` ("" for the whole server), framed.
pub fn check_request(service: &str) -> Bytes {
    grpc::framed(&HealthCheckRequest { service: service.to_string() })
}

/// The service a framed Check request asks about.
pub fn service_asked(mut body: Bytes) -> Result<String, String> {
    let message = unframed(&mut body)?;
    HealthCheckRequest::decode(message).map(|request| request.service).map_err(|e| format!("a malformed request: {e}"))
}

/// A Check answer's message, framed.
pub fn check_answer(status: ServingStatus) -> Bytes {
    grpc::framed(&HealthCheckResponse { status: status.into() })
}

/// What a Check call answered: the serving status, or why there is none
/// (a status other than OK, a malformed answer).
pub fn read_answer(head: &HeaderMap, trailers: Option<&HeaderMap>, mut body: Bytes) -> Result<ServingStatus, String> {
    // A trailers-only answer carries its status in the head.
    match grpc::status_in(trailers.unwrap_or(head)) {
        Some(Code::Ok) => {}
        Some(code) => return Err(format!("grpc-status {}", code.name())),
        None => return Err("no grpc-status".into()),
    }
    let message = unframed(&mut body)?;
    let answer = HealthCheckResponse::decode(message).map_err(|e| format!("a malformed response: {e}"))?;
    ServingStatus::try_from(answer.status).map_err(|_| format!("an unknown serving status {}", answer.status))
}

/// The one uncompressed message of a body.
fn unframed(body: &mut Bytes) -> Result<Bytes, String> {
    if body.len() < 5 {
        return Err("no message".into());
    }
    let compressed = body.get_u8() != 0;
    let length = body.get_u32() as usize;
    if compressed {
        return Err("a compressed message".into());
    }
    if body.len() < length {
        return Err("a message cut short".into());
    }
    Ok(body.split_to(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_an_answer_read_back() {
        assert_eq!(service_asked(check_request("echo.v1.Echo")).unwrap(), "echo.v1.Echo");
        let ok = grpc::status_headers(Code::Ok, "");
        let answer = read_answer(&HeaderMap::new(), Some(&ok), check_answer(ServingStatus::NotServing));
        assert_eq!(answer, Ok(ServingStatus::NotServing));
    }

    #[test]
    fn a_failed_or_malformed_answer_says_why() {
        let unimplemented = grpc::status_headers(Code::Unimplemented, "no");
        let answer = read_answer(&unimplemented, None, Bytes::new());
        assert_eq!(answer, Err("grpc-status UNIMPLEMENTED".into()));
        let ok = grpc::status_headers(Code::Ok, "");
        assert_eq!(read_answer(&HeaderMap::new(), Some(&ok), Bytes::from_static(b"\0\0\0")), Err("no message".into()));
        let cut = Bytes::from_static(b"\0\0\0\0\x09\x08");
        assert_eq!(read_answer(&HeaderMap::new(), Some(&ok), cut), Err("a message cut short".into()));
        assert!(service_asked(Bytes::from_static(b"\x01\0\0\0\0")).unwrap_err().contains("compressed"));
    }
}
