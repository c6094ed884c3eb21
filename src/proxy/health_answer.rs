//! The inbound sidecar's answer to peers' `grpc.health.v1.Health/Check`
//! (`inbound.health`). By default the app answers, and when it has no health
//! service (UNIMPLEMENTED) the sidecar does for it: SERVING while the app
//! takes connections, NOT_SERVING when it does not, NOT_FOUND for a service
//! the contracts do not name. Any authenticated peer may ask: the answer says
//! only whether the app serves, as a kubelet probe would learn, and client
//! sidecars check before they are authorized for any method.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};

use super::inbound::AppTarget;
use crate::call::{ProxyError, RecvBody, RequestBody, ResponseBody};
use crate::config::health_checks::HealthAnswer;
use crate::contract::Contracts;
use crate::grpc::{self, Code};
use crate::grpc_health::{self, ServingStatus};

/// The longest a peer has to send its request, and the app to answer it,
/// whatever the checker's deadline.
const MAX_WAIT: Duration = Duration::from_secs(5);

pub async fn answer(
    request: Request<RecvBody>,
    app: AppTarget,
    mode: HealthAnswer,
    contracts: Arc<Contracts>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let body: Bytes = match tokio::time::timeout(MAX_WAIT, Limited::new(body, grpc_health::MAX_MESSAGE).collect()).await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) => {
            return Ok(status(Code::InvalidArgument, &format!("the request could not be read: {error}")));
        }
        Err(_) => {
            return Ok(status(Code::DeadlineExceeded, &format!("the request did not arrive within {MAX_WAIT:?}")));
        }
    };
    let service = match grpc_health::service_asked(body.clone()) {
        Ok(service) => service,
        Err(why) => return Ok(status(Code::InvalidArgument, &why)),
    };
    if mode == HealthAnswer::Auto {
        let limit = parts.headers.get(grpc::GRPC_TIMEOUT).and_then(|value| grpc::parse_timeout(value.as_bytes()));
        let asked = app.send(Request::from_parts(parts, RequestBody::Replayed(Some(body))));
        match tokio::time::timeout(limit.unwrap_or(MAX_WAIT).min(MAX_WAIT), asked).await {
            Ok(Ok(response)) if grpc::status_in(response.headers()) != Some(Code::Unimplemented) => {
                return Ok(response);
            }
            // The app has no health service: answered below.
            Ok(Ok(_)) => {}
            // Unreachable, or not answering in time.
            Ok(Err(_)) | Err(_) => return Ok(serving(ServingStatus::NotServing)),
        }
    }
    let known = service.is_empty() || contracts.methods().any(|method| method.service == service);
    if !known {
        return Ok(status(Code::NotFound, &format!("no service {service} in this sidecar's contracts")));
    }
    Ok(serving(if app.reachable().await { ServingStatus::Serving } else { ServingStatus::NotServing }))
}

fn serving(status: ServingStatus) -> Response<ResponseBody> {
    let mut response =
        Response::new(ResponseBody::answer(grpc_health::check_answer(status), grpc::status_headers(Code::Ok, "")));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

fn status(code: Code, message: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    *response.headers_mut() = grpc::status_headers(code, &format!("protomesh inbound: health check: {message}"));
    response
}
