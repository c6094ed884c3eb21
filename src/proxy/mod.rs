//! The data plane: both listeners and the stacks of layers behind them,
//! composed here so that the path of a call reads top to bottom.
//!
//! outbound: plaintext h2 listener → errors as gRPC status → route by `:path`
//!           → deadline → bulkheads (method, upstream)
//!           → upstream (round-robin endpoint) → pooled mTLS h2 connection
//! inbound:  mTLS h2 listener (client cert required) → errors as gRPC status
//!           → caller identity + authorization → deadline
//!           → bulkheads (method, caller) → local app h2 connection

mod admit;
mod balance;
pub mod body;
pub mod discovery;
mod endpoint;
pub mod error;
pub mod inbound;
pub mod outbound;
mod server;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder};

use crate::config::Config;
use crate::config::PolicyConfig;
use crate::contract::Contracts;
use crate::identity::Identity;
use crate::policy::CallContext;
use crate::policy::bulkhead::Bulkheads;
use crate::policy::deadline::Deadlines;
use crate::policy::retry::Retries;
use admit::Admit;
use endpoint::{Endpoint, Transport};
use error::{AnswerErrors, Direction, ProxyError, ResponseBody, Target};
use inbound::{AuthorizeInbound, ForwardToApp, InboundRoutes};
use outbound::{ForwardToUpstream, OutboundRoutes};
use server::PeerInfo;
use upstream::Upstream;

/// A call from the local app, top to bottom.
fn outbound_stack(routes: Arc<OutboundRoutes>, policy: &PolicyConfig) -> impl Stack + use<> {
    ServiceBuilder::new()
        .layer_fn(|inner| AnswerErrors::new(Direction::Outbound, inner))
        .layer_fn(|inner| Admit::new(routes.clone(), inner))
        .layer_fn(|inner| Deadlines::new(policy.min_budget, Direction::Outbound, inner))
        .layer_fn(|inner| Retries::new(policy.max_replay_bytes, inner))
        .layer_fn(Bulkheads::new)
        .service(ForwardToUpstream)
}

/// A call from a peer sidecar on one connection, top to bottom.
fn inbound_stack(authorize: AuthorizeInbound, app: Arc<Endpoint>, min_budget: Duration) -> impl Stack {
    ServiceBuilder::new()
        .layer_fn(|inner| AnswerErrors::new(Direction::Inbound, inner))
        .layer_fn(|inner| Admit::new(authorize.clone(), inner))
        .layer_fn(|inner| Deadlines::new(min_budget, Direction::Inbound, inner))
        .layer_fn(Bulkheads::new)
        .service(ForwardToApp::new(app))
}

/// What a listener serves: a whole stack, answering every call (or resetting
/// it, for a refusal to pass on).
trait Stack:
    Service<Request<Incoming>, Response = Response<ResponseBody>, Error = ProxyError, Future: Send> + Clone + Send + 'static
{
}

impl<S> Stack for S where
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = ProxyError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// Writes the call's remaining deadline budget as `grpc-timeout`, just before
/// the call leaves this sidecar.
fn forward_remaining_budget<B>(request: &mut Request<B>) {
    if let Some(deadline) = CallContext::of(request).deadline {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        request.headers_mut().insert("grpc-timeout", crate::grpc::encode_timeout(remaining));
    }
}

/// A running sidecar. Dropping it leaves the listeners running; call
/// [`Sidecar::shutdown`] to drain and stop.
pub struct Sidecar {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    pub identity: crate::identity::SpiffeId,
    shutdown: watch::Sender<bool>,
    listeners: JoinSet<()>,
}

impl Sidecar {
    /// Loads identity and contracts and binds every listener before serving
    /// anything: a sidecar either starts whole or not at all.
    pub async fn start(config: &Config, contracts: Arc<Contracts>, drain: Duration) -> Result<Sidecar, String> {
        let identity = Identity::load(&config.identity)?;
        let mut upstreams = Vec::with_capacity(config.outbound.upstreams.len());
        for (i, upstream) in config.outbound.upstreams.iter().enumerate() {
            let started = Upstream::start(upstream, &identity, config.outbound.connect_timeout, &config.policy)
                .await
                .map_err(|e| format!("outbound.upstreams[{i}]: {e}"))?;
            upstreams.push((upstream.services.clone(), started));
        }
        let policy = Arc::new(config.policy.clone());
        let outbound_routes =
            Arc::new(OutboundRoutes::new(contracts.clone(), config.contracts.mode, policy.clone(), &upstreams));
        let outbound_listener = bind("outbound.listen", config.outbound.listen).await?;
        let inbound = match &config.inbound {
            None => None,
            Some(inbound) => {
                let routes = Arc::new(InboundRoutes::new(
                    &contracts,
                    config.contracts.mode,
                    &inbound.authorization,
                    policy.clone(),
                ));
                let app = Arc::new(Endpoint::new(
                    inbound.app,
                    Target::App(inbound.app),
                    Arc::new(Transport::Plaintext),
                    config.outbound.connect_timeout,
                ));
                let tls = identity.server_config()?;
                Some((bind("inbound.listen", inbound.listen).await?, routes, app, tls))
            }
        };

        let min_budget = config.policy.min_budget;
        let (shutdown, stop) = watch::channel(false);
        let mut listeners = JoinSet::new();
        let outbound_addr = local_addr(&outbound_listener)?;
        listeners.spawn(server::serve(
            outbound_listener,
            Direction::Outbound,
            None,
            move |_: PeerInfo| outbound_stack(outbound_routes.clone(), &policy),
            stop.clone(),
            drain,
        ));
        let inbound_addr = match inbound {
            None => None,
            Some((listener, routes, app, tls)) => {
                let addr = local_addr(&listener)?;
                listeners.spawn(server::serve(
                    listener,
                    Direction::Inbound,
                    Some(tls),
                    move |peer: PeerInfo| {
                        inbound_stack(AuthorizeInbound::new(routes.clone(), &peer), app.clone(), min_budget)
                    },
                    stop,
                    drain,
                ));
                Some(addr)
            }
        };
        tracing::info!(identity = %identity.id, %outbound_addr, ?inbound_addr, "sidecar started");
        Ok(Sidecar { outbound_addr, inbound_addr, identity: identity.id.clone(), shutdown, listeners })
    }

    /// Stops accepting, sends GOAWAY, and waits for in-flight calls up to the drain period.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.listeners.join_next().await.is_some() {}
    }
}

async fn bind(field: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| format!("{field}: cannot listen on {addr}: {e}"))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, String> {
    listener.local_addr().map_err(|e| e.to_string())
}
