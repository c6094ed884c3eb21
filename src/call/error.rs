//! What can go wrong on a call, typed, and the one place that turns it into
//! the gRPC status the caller sees. The data plane's own failures (routing,
//! connecting, the peer's resets) are variants here; a policy that refuses
//! or ends a call brings its own error type, which says its status and names
//! the policy.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tower::Service;

use super::{CallService, Direction, RecvBody, ResponseBody};
use crate::grpc::{self, Code};
use crate::identity::IdentityMismatch;

/// A policy's refusal of a call, or its end of one: the status it answers
/// with, a short reason for metrics and spans, and as its `Display` a
/// message naming the policy and its setting.
pub trait PolicyError: std::error::Error + Any + Send + Sync {
    fn code(&self) -> Code;
    /// A short name for metric labels and span events, e.g. `overloaded`.
    fn reason(&self) -> &'static str;
    /// When the caller may try again, sent as `grpc-retry-pushback-ms`.
    fn pushback(&self) -> Option<Duration> {
        None
    }
    /// Details for the caller to read, sent in `grpc-status-details-bin`.
    fn details(&self) -> Vec<prost_types::Any> {
        Vec::new()
    }
}

#[derive(Debug)]
pub enum ProxyError {
    /// `:path` is not `/pkg.Service/Method`.
    NotGrpc {
        path: String,
    },
    /// Strict contracts: the method is in no loaded contract.
    UnknownMethod {
        path: String,
    },
    NoRoute {
        service: String,
    },
    NoEndpoints {
        upstream: Arc<str>,
    },
    /// Inbound: the connection came to the listener itself, not redirected
    /// from an app port, and `inbound.app` names no app to call.
    NoApp,
    Connect {
        target: Target,
        error: Arc<ConnectError>,
    },
    /// The peer failed the stream or connection before it answered.
    Upstream {
        target: Target,
        error: h2::Error,
    },
    /// The caller's certificate is valid but proves no SPIFFE ID, and why.
    NoCallerIdentity {
        why: Arc<str>,
    },
    /// A policy refused or ended the call; shared, as a [`super::Cut`] keeps it.
    Policy(Arc<dyn PolicyError>),
}

impl<E: PolicyError> From<E> for ProxyError {
    fn from(error: E) -> ProxyError {
        ProxyError::Policy(Arc::new(error))
    }
}

#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    IdentityMismatch(IdentityMismatch),
    Tls(std::io::Error),
    NoH2Alpn,
    Http2(h2::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::IdentityMismatch(e) => write!(f, "{e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            ConnectError::NoH2Alpn => f.write_str("TLS peer did not negotiate ALPN h2"),
            ConnectError::Http2(e) => write!(f, "HTTP/2 handshake failed: {e}"),
        }
    }
}

/// Who the sidecar was talking to when a call failed.
#[derive(Clone, Debug)]
pub enum Target {
    Upstream { name: Arc<str>, addr: SocketAddr },
    App(SocketAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Upstream { name, addr } => write!(f, "upstream {name} endpoint {addr}"),
            Target::App(addr) => write!(f, "local app at {addr}"),
        }
    }
}

impl ProxyError {
    pub fn code(&self) -> Code {
        match self {
            ProxyError::NotGrpc { .. } | ProxyError::UnknownMethod { .. } | ProxyError::NoRoute { .. } => {
                Code::Unimplemented
            }
            ProxyError::NoEndpoints { .. } | ProxyError::NoApp | ProxyError::Connect { .. } => Code::Unavailable,
            ProxyError::Upstream { error, .. } => match error.reason() {
                Some(reason) => grpc::code_for_reset(reason),
                None => Code::Unavailable,
            },
            ProxyError::NoCallerIdentity { .. } => Code::Unauthenticated,
            ProxyError::Policy(error) => error.code(),
        }
    }

    /// A short name of the failure, for metric labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NotGrpc { .. } => "not_grpc",
            ProxyError::UnknownMethod { .. } => "unknown_method",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::NoEndpoints { .. } => "no_endpoints",
            ProxyError::NoApp => "no_app",
            ProxyError::Connect { .. } => "connect",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::NoCallerIdentity { .. } => "no_caller_identity",
            ProxyError::Policy(error) => error.reason(),
        }
    }

    /// The policy error behind this one, if it is of type `E`.
    pub fn policy<E: PolicyError>(&self) -> Option<&E> {
        match self {
            ProxyError::Policy(error) => (&**error as &dyn Any).downcast_ref(),
            _ => None,
        }
    }

    /// The inbound sidecar could not get the call to its app: the pod is unwell.
    fn app_unreachable(&self) -> bool {
        matches!(self, ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::NoApp)
    }

    /// The peer refused the stream without processing it (REFUSED_STREAM,
    /// as for streams beyond a GOAWAY): sending it again is safe.
    pub fn refused_unprocessed(&self) -> bool {
        matches!(self, ProxyError::Upstream { error, .. } if error.reason() == Some(h2::Reason::REFUSED_STREAM))
    }

    /// The message a caller reads: prefixed with the sidecar's direction, so
    /// that it can tell which sidecar acted.
    pub fn message(&self, direction: Direction) -> String {
        format!("protomesh {direction}: {self}")
    }

    /// The status as headers or trailers: code, message, and the policy's
    /// details if it has any.
    pub fn status_headers(&self, direction: Direction) -> http::HeaderMap {
        let (code, message) = (self.code(), self.message(direction));
        let mut headers = grpc::status_headers(code, &message);
        if let ProxyError::Policy(error) = self {
            let details = error.details();
            if !details.is_empty() {
                headers.insert(grpc::GRPC_STATUS_DETAILS_BIN, grpc::status_details(code, &message, details));
            }
        }
        headers
    }

    /// The trailers-only status answered to the caller.
    pub fn into_response(self, direction: Direction) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::empty());
        *response.headers_mut() = self.status_headers(direction);
        if direction == Direction::Inbound && self.app_unreachable() {
            response.headers_mut().insert(super::ENDPOINT_FAILURE, HeaderValue::from_static(self.reason()));
        }
        if let ProxyError::Policy(error) = &self
            && let Some(pushback) = error.pushback()
        {
            let millis = u64::try_from(pushback.as_millis()).unwrap_or(u64::MAX);
            response.headers_mut().insert(grpc::GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(millis));
        }
        response
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Upstream { error, .. } => Some(error),
            ProxyError::Policy(error) => Some(&**error),
            _ => None,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotGrpc { path } => write!(f, "`{path}` is not a gRPC path /package.Service/Method"),
            ProxyError::UnknownMethod { path } => {
                write!(f, "method {path} is not in the loaded contracts (contracts.mode is strict)")
            }
            ProxyError::NoRoute { service } => {
                write!(f, "no route for service {service}; add it to outbound.upstreams[].services")
            }
            ProxyError::NoEndpoints { upstream } => write!(f, "upstream {upstream} has no resolved endpoints"),
            ProxyError::NoApp => f.write_str(
                "no app to call: the connection was made to inbound.listen itself, not captured from an app port, and inbound.app is not set",
            ),
            ProxyError::Connect { target, error } => write!(f, "{target} unreachable: {error}"),
            ProxyError::Upstream { target, error } => match error.reason() {
                Some(reason) if error.is_go_away() => write!(f, "{target} closed the connection ({reason:?})"),
                Some(reason) => write!(f, "{target} reset the stream ({reason:?})"),
                None => write!(f, "{target} failed: {error}"),
            },
            ProxyError::NoCallerIdentity { why } => write!(f, "the client certificate proves no identity: {why}"),
            ProxyError::Policy(error) => write!(f, "{error}"),
        }
    }
}

/// The HTTP/2 reason behind an error of h2 or another layer, if any.
pub fn h2_reason(error: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        source = e.source();
    }
    None
}

/// The edge of every stack: the sidecar's own failures become gRPC statuses,
/// except a refusal the peer made without processing the call, which goes on
/// as the same reset (REFUSED_STREAM) so that a hop that kept the request can
/// send it again.
#[derive(Clone)]
pub struct AnswerErrors<S> {
    direction: Direction,
    inner: S,
}

impl<S> AnswerErrors<S> {
    pub fn new(direction: Direction, inner: S) -> Self {
        AnswerErrors { direction, inner }
    }
}

impl<S> Service<Request<RecvBody>> for AnswerErrors<S>
where
    S: CallService<RecvBody>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // Layers below are always ready or answer a call with an error: none fails here.
        self.inner.poll_ready(cx).map(|_| Ok(()))
    }

    fn call(&mut self, request: Request<RecvBody>) -> Self::Future {
        Answer { inner: self.inner.call(request), direction: self.direction }
    }
}

pin_project_lite::pin_project! {
    pub struct Answer<F> {
        #[pin]
        inner: F,
        direction: Direction,
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    type Output = Result<Response<ResponseBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let direction = *this.direction;
        this.inner.poll(cx).map(|result| match result {
            Err(error) if error.refused_unprocessed() => Err(error),
            result => Ok(result.unwrap_or_else(|error| error.into_response(direction))),
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use bytes::Bytes;

    use crate::call::testing::received;
    use crate::call::{CallFuture, ENDPOINT_FAILURE};

    fn app() -> Target {
        Target::App("127.0.0.1:8080".parse().unwrap())
    }

    fn reset(reason: h2::Reason) -> ProxyError {
        ProxyError::Upstream { target: app(), error: h2::Error::from(reason) }
    }

    #[test]
    fn each_failure_has_its_status_and_reason() {
        let connect = ProxyError::Connect { target: app(), error: Arc::new(ConnectError::Timeout) };
        let cases = [
            (ProxyError::NotGrpc { path: "/x".into() }, Code::Unimplemented, "not_grpc"),
            (ProxyError::UnknownMethod { path: "/p.S/M".into() }, Code::Unimplemented, "unknown_method"),
            (ProxyError::NoRoute { service: "p.S".into() }, Code::Unimplemented, "no_route"),
            (ProxyError::NoEndpoints { upstream: "u".into() }, Code::Unavailable, "no_endpoints"),
            (ProxyError::NoApp, Code::Unavailable, "no_app"),
            (connect, Code::Unavailable, "connect"),
            (reset(h2::Reason::REFUSED_STREAM), Code::Unavailable, "upstream"),
            (reset(h2::Reason::CANCEL), Code::Cancelled, "upstream"),
            (reset(h2::Reason::ENHANCE_YOUR_CALM), Code::ResourceExhausted, "upstream"),
            (reset(h2::Reason::INADEQUATE_SECURITY), Code::PermissionDenied, "upstream"),
            (reset(h2::Reason::PROTOCOL_ERROR), Code::Internal, "upstream"),
            (ProxyError::NoCallerIdentity { why: "no URI SAN".into() }, Code::Unauthenticated, "no_caller_identity"),
            (ProxyError::from(Limited), Code::ResourceExhausted, "limited"),
        ];
        for (error, code, reason) in cases {
            assert_eq!((error.code(), error.reason()), (code, reason), "{error}");
        }
        assert!(reset(h2::Reason::REFUSED_STREAM).refused_unprocessed());
        assert!(!reset(h2::Reason::CANCEL).refused_unprocessed());
    }

    #[derive(Debug)]
    struct Limited;

    impl fmt::Display for Limited {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("rate limit test exceeded")
        }
    }

    impl std::error::Error for Limited {}

    impl PolicyError for Limited {
        fn code(&self) -> Code {
            Code::ResourceExhausted
        }
        fn reason(&self) -> &'static str {
            "limited"
        }
        fn pushback(&self) -> Option<Duration> {
            Some(Duration::from_millis(250))
        }
    }

    #[test]
    fn the_answer_is_trailers_only_naming_the_sidecar_with_pushback_and_failure_marks() {
        let answer = ProxyError::from(Limited).into_response(Direction::Outbound);
        assert_eq!(grpc::status_in(answer.headers()), Some(Code::ResourceExhausted));
        assert_eq!(answer.headers()[grpc::GRPC_MESSAGE], "protomesh outbound: rate limit test exceeded");
        assert_eq!(answer.headers()[grpc::GRPC_RETRY_PUSHBACK_MS], "250");
        assert!(ProxyError::from(Limited).policy::<Limited>().is_some());
        assert!(ProxyError::NoApp.policy::<Limited>().is_none());

        // Only the inbound sidecar says its app could not be reached.
        let inbound = ProxyError::NoApp.into_response(Direction::Inbound);
        assert_eq!(inbound.headers()[ENDPOINT_FAILURE], "no_app");
        assert!(!ProxyError::NoApp.into_response(Direction::Outbound).headers().contains_key(ENDPOINT_FAILURE));
        let refused = ProxyError::NoRoute { service: "p.S".into() }.into_response(Direction::Inbound);
        assert!(!refused.headers().contains_key(ENDPOINT_FAILURE), "a refusal is not the app's failure");
    }

    fn failing(error: fn() -> ProxyError) -> impl CallService<RecvBody> {
        tower::service_fn(move |_: Request<RecvBody>| -> CallFuture { Box::pin(async move { Err(error()) }) })
    }

    #[tokio::test]
    async fn the_edge_answers_errors_as_statuses_but_passes_an_unprocessed_refusal_on() {
        let (request, _peer) = received("/p.S/M", Bytes::new()).await;
        let no_route = || ProxyError::NoRoute { service: "p.S".into() };
        let answer = AnswerErrors::new(Direction::Outbound, failing(no_route)).oneshot(request).await.unwrap();
        assert_eq!(grpc::status_in(answer.headers()), Some(Code::Unimplemented));

        let (request, _peer) = received("/p.S/M", Bytes::new()).await;
        let refused = AnswerErrors::new(Direction::Outbound, failing(|| reset(h2::Reason::REFUSED_STREAM)));
        let error = refused.oneshot(request).await.unwrap_err();
        assert!(error.refused_unprocessed(), "goes on as REFUSED_STREAM, so that a hop that kept the call resends it");
    }
}
