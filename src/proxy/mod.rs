//! The data plane: the listeners and the stacks of layers behind them,
//! composed here so that the path of a call reads top to bottom.
//!
//! outbound: plaintext h2 listener → errors as gRPC status → route by `:path`
//!           → metrics → deadline → retries → bulkheads (method, upstream)
//!           → balancer (P2C, outlier detection) → pooled mTLS h2 connection
//! inbound:  mTLS h2 listener (client cert required) → errors as gRPC status
//!           → caller identity + route → metrics → authorization → deadline
//!           → bulkheads (method, caller) → local app h2 connection

mod admit;
mod balance;
pub mod body;
pub mod discovery;
mod endpoint;
pub mod error;
mod exchange;
pub mod inbound;
pub mod outbound;
mod server;
pub mod upstream;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceBuilder;

use crate::admin::{self, Admin, SetLogLevel};
use crate::config::{Config, PolicyConfig};
use crate::contract::Contracts;
use crate::identity::{Identity, SpiffeId};
use crate::policy::CallContext;
use crate::policy::bulkhead::Bulkheads;
use crate::policy::deadline::Deadlines;
use crate::policy::retry::Retries;
use crate::telemetry::policy_metrics::PolicyCollector;
use crate::telemetry::trace::Tracing;
use crate::telemetry::{Metrics, Observe};
use admit::Admit;
use endpoint::{Endpoint, Transport};
use error::{AnswerErrors, CallService, Direction, Target};
use inbound::{ForwardToApp, InboundRoutes, RouteInbound};
use outbound::{ForwardToUpstream, OutboundRoutes};
pub(crate) use server::stopped;
use server::{PeerInfo, Serving};
use upstream::Upstream;
use workers::Workers;

/// What every call of a sidecar shares.
#[derive(Clone)]
struct Shared {
    policy: Arc<PolicyConfig>,
    metrics: Arc<Metrics>,
    tracing: Option<Arc<Tracing>>,
    access_log: bool,
}

/// A call from the local app, top to bottom.
fn outbound_stack(routes: Arc<OutboundRoutes>, shared: &Shared) -> impl Stack + use<> {
    let direction = Direction::Outbound;
    ServiceBuilder::new()
        .layer_fn(|inner| AnswerErrors::new(direction, inner))
        .layer_fn(|inner| Admit::counted(routes.clone(), shared.metrics.clone(), direction, inner))
        .layer_fn(|inner| Observe::new(direction, shared.tracing.clone(), shared.access_log, inner))
        .layer_fn(|inner| Deadlines::new(shared.policy.min_budget, direction, inner))
        .layer_fn(|inner| Retries::new(shared.policy.max_replay_bytes, shared.tracing.clone(), inner))
        .layer_fn(Bulkheads::new)
        .service(ForwardToUpstream)
}

/// A call from a peer sidecar on one connection, top to bottom.
fn inbound_stack(route: RouteInbound, app: Arc<Endpoint>, shared: &Shared) -> impl Stack + use<> {
    let direction = Direction::Inbound;
    let authorize = route.authorize();
    ServiceBuilder::new()
        .layer_fn(|inner| AnswerErrors::new(direction, inner))
        .layer_fn(|inner| Admit::counted(route.clone(), shared.metrics.clone(), direction, inner))
        .layer_fn(|inner| Observe::new(direction, shared.tracing.clone(), shared.access_log, inner))
        .layer_fn(|inner| Admit::new(authorize.clone(), inner))
        .layer_fn(|inner| Deadlines::new(shared.policy.min_budget, direction, inner))
        .layer_fn(Bulkheads::new)
        .service(ForwardToApp::new(app))
}

/// What a listener serves: a whole stack, answering every call (or resetting
/// it, for a refusal to pass on).
trait Stack: CallService<Incoming> + Clone + Send + 'static {}

impl<S: CallService<Incoming> + Clone + Send + 'static> Stack for S {}

/// Writes the call's remaining deadline budget as `grpc-timeout`, just before
/// the call leaves this sidecar.
fn forward_remaining_budget<B>(request: &mut Request<B>) {
    if let Some(deadline) = CallContext::of(request).deadline {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        request.headers_mut().insert(crate::grpc::GRPC_TIMEOUT, crate::grpc::encode_timeout(remaining));
    }
}

/// What the process around the sidecar lends it.
#[derive(Default)]
pub struct Options {
    /// Lets the admin server change the log filter.
    pub set_log_level: Option<SetLogLevel>,
}

/// A running sidecar. Dropping it stops accepting and ends the added
/// workers' threads without a drain; call [`Sidecar::shutdown`] to drain and stop.
pub struct Sidecar {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub identity: SpiffeId,
    admin: Arc<Admin>,
    tracing: Option<Arc<Tracing>>,
    drain: std::time::Duration,
    shutdown: watch::Sender<bool>,
    listeners: JoinSet<()>,
    /// Serve the connections; their threads end when the sidecar is dropped.
    _workers: Arc<Workers>,
}

impl Sidecar {
    /// Loads identity and contracts and binds every listener before serving
    /// anything: a sidecar either starts whole or not at all.
    pub async fn start(config: &Config, contracts: Arc<Contracts>, options: Options) -> Result<Sidecar, String> {
        let identity = Arc::new(Identity::load(&config.identity)?);
        let metrics = Arc::new(Metrics::default());
        let workers = Arc::new(Workers::start(config.worker_threads)?);
        let mut upstreams = Vec::with_capacity(config.outbound.upstreams.len());
        for (i, upstream) in config.outbound.upstreams.iter().enumerate() {
            let connect_timeout = config.outbound.connect_timeout;
            let started = Upstream::start(upstream, &identity, connect_timeout, &config.policy, workers.count())
                .await
                .map_err(|e| format!("outbound.upstreams[{i}]: {e}"))?;
            upstreams.push((upstream.services.clone(), started));
        }
        let policy = Arc::new(config.policy.clone());
        let outbound_routes = Arc::new(OutboundRoutes::new(
            contracts.clone(),
            config.contracts.mode,
            policy.clone(),
            metrics.clone(),
            &upstreams,
        ));
        let outbound_listener = bind("outbound.listen", config.outbound.listen).await?;
        let inbound = match &config.inbound {
            None => None,
            Some(inbound) => {
                let routes = Arc::new(InboundRoutes::new(
                    &contracts,
                    config.contracts.mode,
                    &inbound.authorization,
                    policy.clone(),
                    metrics.clone(),
                ));
                let app = Arc::new(Endpoint::new(
                    inbound.app,
                    Target::App(inbound.app),
                    Arc::new(Transport::Plaintext),
                    config.outbound.connect_timeout,
                    workers.count(),
                ));
                let tls = identity.server_config()?;
                Some((bind("inbound.listen", inbound.listen).await?, routes, app, tls))
            }
        };
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        metrics.register_collector(Box::new(policy_collector(
            &outbound_routes,
            inbound.as_ref().map(|i| &i.1),
            &upstreams,
        )));
        let admin = Arc::new(Admin::new(config, &contracts, metrics.clone(), options.set_log_level));
        let tracing = Tracing::start(&config.tracing, config.service_name.as_deref())?.map(Arc::new);
        if let Some(tracing) = &tracing {
            metrics.register_collector(Box::new(tracing.counts()));
        }
        let shared =
            Shared { policy, metrics: metrics.clone(), tracing: tracing.clone(), access_log: config.access_log };

        let drain = config.drain_timeout;
        let (shutdown, stop) = watch::channel(false);
        let serving = Serving { workers: workers.clone(), metrics: metrics.clone(), shutdown: stop.clone(), drain };
        let mut listeners = JoinSet::new();
        let outbound_addr = local_addr(&outbound_listener)?;
        let outbound_shared = shared.clone();
        listeners.spawn(server::serve(
            outbound_listener,
            Direction::Outbound,
            None,
            move |_: PeerInfo| outbound_stack(outbound_routes.clone(), &outbound_shared),
            serving.clone(),
        ));
        let inbound_addr = match inbound {
            None => None,
            Some((listener, routes, app, tls)) => {
                let addr = local_addr(&listener)?;
                listeners.spawn(server::serve(
                    listener,
                    Direction::Inbound,
                    Some(tls),
                    move |peer: PeerInfo| inbound_stack(RouteInbound::new(routes.clone(), &peer), app.clone(), &shared),
                    serving,
                ));
                Some(addr)
            }
        };
        let admin_addr = local_addr(&admin_listener)?;
        listeners.spawn(identity.clone().keep_current(config.identity.clone(), stop.clone()));
        listeners.spawn(admin::serve(admin_listener, admin.clone(), stop));
        admin.ready.store(true, Ordering::Release);
        tracing::info!(identity = %identity.id, %outbound_addr, ?inbound_addr, %admin_addr, "sidecar started");
        Ok(Sidecar {
            outbound_addr,
            inbound_addr,
            admin_addr,
            identity: identity.id.clone(),
            admin,
            tracing,
            drain,
            shutdown,
            listeners,
            _workers: workers,
        })
    }

    /// Turns not ready, stops accepting, sends GOAWAY, and waits for calls in
    /// flight up to the drain period.
    pub async fn shutdown(mut self) {
        self.admin.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        while self.listeners.join_next().await.is_some() {}
        if let Some(tracing) = &self.tracing {
            tracing.flush(self.drain).await;
        }
    }
}

fn policy_collector(
    outbound: &OutboundRoutes,
    inbound: Option<&Arc<InboundRoutes>>,
    upstreams: &[(Vec<String>, Arc<Upstream>)],
) -> PolicyCollector {
    let outbound_methods = outbound.policies().map(|p| (Direction::Outbound.as_str(), p.clone()));
    let inbound_methods =
        inbound.into_iter().flat_map(|r| r.policies()).map(|p| (Direction::Inbound.as_str(), p.clone()));
    let upstream_bulkheads: Vec<_> = upstreams.iter().filter_map(|(_, u)| u.bulkhead.clone()).collect();
    let inbound = inbound.cloned();
    PolicyCollector {
        methods: outbound_methods.chain(inbound_methods).collect(),
        shared_bulkheads: Box::new(move || {
            let callers = inbound.iter().flat_map(|routes| routes.caller_bulkheads());
            upstream_bulkheads.iter().cloned().chain(callers).collect()
        }),
        upstreams: upstreams.iter().map(|(_, u)| (u.name.clone(), u.outliers.clone())).collect(),
    }
}

async fn bind(field: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| format!("{field}: cannot listen on {addr}: {e}"))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, String> {
    listener.local_addr().map_err(|e| e.to_string())
}
