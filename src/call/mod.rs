//! The ground floor: what every layer of both stacks shares. A call is a
//! tower service from an HTTP/2 request to a response whose body is a
//! [`ResponseBody`], or a [`ProxyError`] that the edge turns into a gRPC
//! status. Nothing here knows a particular policy or the telemetry: policies
//! bring their own errors ([`PolicyError`]) and hang their end-of-call work on
//! the body ([`EndOfCall`]).

mod body;
mod check;
mod cut;
mod error;
mod limit;
#[cfg(test)]
pub mod testing;

use std::net::SocketAddr;

use http::{HeaderName, Request, Response};
use tower::Service;

use crate::identity::SpiffeId;
pub use body::{CallEnd, EndOfCall, Expiry, RecvBody, RequestBody, ResponseBody, Watcher};
pub use check::{Checking, MessageCheck};
pub use cut::Cut;
pub use error::{AnswerErrors, ConnectError, PolicyError, ProxyError, Target, h2_reason};
pub use limit::{Carrier, Framing, MessageLimit, TooLarge};

/// The header in which the inbound sidecar tells its app who called. The
/// sidecar always overwrites it, so an app can trust it.
pub const CALLER_ID_HEADER: HeaderName = HeaderName::from_static("protomesh-caller-id");
/// On a status an inbound sidecar answers because it could not reach its app:
/// the calling sidecar counts it against the endpoint, as it would a reset.
/// The inbound sidecar removes it from the app's own answers.
pub const ENDPOINT_FAILURE: HeaderName = HeaderName::from_static("protomesh-endpoint-failure");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every layer of a stack is to the layer above it: a service taking a
/// request and answering with a response or the sidecar's own error.
pub trait CallService<B>:
    Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError, Future: Send + 'static>
{
}

impl<S, B> CallService<B> for S where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError, Future: Send + 'static>
{
}

/// What a layer's call returns when it has work to do around the layers below.
pub type CallFuture = futures_util::future::BoxFuture<'static, Result<Response<ResponseBody>, ProxyError>>;

/// An inbound call's caller, as its certificate proves it (`None` for a
/// gRPC-Web caller, which has none): put on the request by the inbound edge
/// for the layers that decide or record by caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: Option<SpiffeId>,
    pub address: SocketAddr,
}

/// Which attempt of a call a request is (1 for the first), set by the layer
/// that sends calls again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

/// The endpoint that answered, and its Kubernetes pod when known, among a
/// response's extensions (traced and logged calls only).
#[derive(Clone, Debug)]
pub struct Answered {
    pub addr: SocketAddr,
    pub pod: Option<std::sync::Arc<str>>,
}

/// The endpoints a hedged call's attempts went to, shared among them, so that
/// each attempt goes to an endpoint the others have not used while there is one.
#[derive(Clone, Debug, Default)]
pub struct Spread(std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>);

impl Spread {
    pub fn used(&self) -> Vec<SocketAddr> {
        self.0.lock().expect("spread lock").clone()
    }

    pub fn use_one(&self, addr: SocketAddr) {
        self.0.lock().expect("spread lock").push(addr);
    }
}
