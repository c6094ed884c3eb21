//! The edge of each connection: where a call meets the routes in force. It
//! reads the routing snapshot once, finds the call's stack, and hands the
//! call to it; a call with no route is refused here and counted by reason.
//! While memory is over its budget, the edge sheds new calls (`shed.rs`).
//! Inbound, the edge also vouches for the caller: its certificate's SPIFFE ID
//! goes to the app in `protomesh-caller-id` (always overwritten, so it cannot
//! be spoofed) and to the layers below as the call's [`Caller`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{HeaderValue, Request, Response};
use tower::Service;

use super::health_answer;
use super::reflection;
use super::routes::CurrentRoutes;
use super::server::{PeerIdentity, PeerInfo};
use super::shed::MemoryBudget;
use crate::call::{CALLER_ID_HEADER, CallFuture, Caller, Direction, ProxyError, RecvBody, ResponseBody};
use crate::grpc_health;
use crate::policy::bulkhead::CallerBulkhead;
use crate::telemetry::Metrics;

type EdgeFuture = Either<Ready<Result<Response<ResponseBody>, ProxyError>>, CallFuture>;

fn refuse(metrics: &Metrics, direction: Direction, error: ProxyError) -> EdgeFuture {
    metrics.refused(direction, error.reason());
    Either::Left(ready(Err(error)))
}

/// What the edges of both directions read.
#[derive(Clone)]
pub struct EdgeState {
    pub routes: CurrentRoutes,
    pub metrics: Arc<Metrics>,
    pub memory: Arc<MemoryBudget>,
}

/// A connection from the local app.
#[derive(Clone)]
pub struct OutboundEdge {
    state: EdgeState,
    /// Where the app dialled, when the capture rules redirected the connection.
    original_destination: Option<SocketAddr>,
}

impl OutboundEdge {
    pub fn new(state: EdgeState, peer: &PeerInfo) -> Self {
        OutboundEdge { state, original_destination: peer.original_destination }
    }
}

impl Service<Request<RecvBody>> for OutboundEdge {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = EdgeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RecvBody>) -> EdgeFuture {
        let EdgeState { routes, metrics, memory } = &self.state;
        if let Err(over) = memory.admit() {
            return refuse(metrics, Direction::Outbound, over.into());
        }
        let routes = routes.load();
        // Reflection on the outbound listener itself is the mesh's; a
        // captured call for it goes where the app sent it.
        if self.original_destination.is_none()
            && reflection::asked(request.uri().path()).is_some()
            && let Some(reflection) = &routes.reflection
        {
            return Either::Right(reflection.clone().call(request));
        }
        let routed = routes.outbound.route(request.uri().path(), self.original_destination);
        match routed {
            Ok(mut stack) => Either::Right(stack.call(request)),
            Err(error) => refuse(metrics, Direction::Outbound, error),
        }
    }
}

/// A connection from a peer sidecar, with the identity its certificate proved.
#[derive(Clone)]
pub struct InboundEdge {
    state: EdgeState,
    /// `Err`: why the certificate proves no SPIFFE ID.
    /// The caller, and the header that names it to the app (none without a certificate).
    caller: Result<(Caller, Option<HeaderValue>), Arc<str>>,
    /// The app port the connection was made to, when capture redirected it.
    captured_port: Option<u16>,
}

impl InboundEdge {
    pub fn new(state: EdgeState, peer: PeerInfo) -> Self {
        let PeerInfo { addr: address, identity, original_destination } = peer;
        let caller = match identity {
            PeerIdentity::Proven(id) => match HeaderValue::from_str(id.as_str()) {
                Ok(header) => Ok((Caller { id: Some(id), address }, Some(header))),
                Err(error) => Err(Arc::from(error.to_string())),
            },
            PeerIdentity::Missing(why) => Err(Arc::from(why)),
            PeerIdentity::Unauthenticated => Ok((Caller { id: None, address }, None)),
        };
        InboundEdge { state, caller, captured_port: original_destination.map(|original| original.port()) }
    }
}

impl Service<Request<RecvBody>> for InboundEdge {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = EdgeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RecvBody>) -> EdgeFuture {
        let EdgeState { routes, metrics, memory } = &self.state;
        let (caller, header) = match &self.caller {
            Ok(caller) => caller,
            Err(why) => {
                let error = ProxyError::NoCallerIdentity { why: why.clone() };
                return refuse(metrics, Direction::Inbound, error);
            }
        };
        if let Err(over) = memory.admit() {
            return refuse(metrics, Direction::Inbound, over.into());
        }
        let routes = routes.load();
        let Some(inbound) = &routes.inbound else {
            let error = ProxyError::UnknownMethod { path: request.uri().path().to_string() };
            return refuse(metrics, Direction::Inbound, error);
        };
        // Peers' health checks are answered whatever the rules; a caller
        // without a certificate gets only what it was opened to.
        if request.uri().path() == grpc_health::CHECK_PATH
            && caller.id.is_some()
            && let Some(mode) = inbound.health_answer()
        {
            return match inbound.app_for(self.captured_port) {
                Ok(app) => {
                    Either::Right(Box::pin(health_answer::answer(request, app, mode, inbound.contracts().clone())))
                }
                Err(error) => refuse(metrics, Direction::Inbound, error),
            };
        }
        if let Some(mut reflection) = inbound.reflection(request.uri().path()) {
            request.extensions_mut().insert(caller.clone());
            return Either::Right(Box::pin(reflection.call(request)));
        }
        let routed =
            inbound.route(request.uri().path()).and_then(|stack| Ok((stack, inbound.app_for(self.captured_port)?)));
        let (mut stack, app) = match routed {
            Ok(routed) => routed,
            Err(error) => return refuse(metrics, Direction::Inbound, error),
        };
        request.extensions_mut().insert(app);
        // The app can trust the header: set by the sidecar, or never sent.
        match header {
            Some(header) => request.headers_mut().insert(CALLER_ID_HEADER, header.clone()),
            None => request.headers_mut().remove(CALLER_ID_HEADER),
        };
        if let (Some(callers), Some(id)) = (&inbound.callers, &caller.id) {
            request.extensions_mut().insert(CallerBulkhead(callers.of(id)));
        }
        request.extensions_mut().insert(caller.clone());
        Either::Right(stack.call(request))
    }
}
