//! Inbound: calls from peer sidecars over mTLS, checked against the caller's
//! SPIFFE ID and the authorization rules, then sent to the local app over
//! plaintext HTTP/2. The app learns the authenticated caller from the
//! `protomesh-caller-id` header, which the sidecar always overwrites.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::Service;

use super::admit::Admission;
use super::body::RequestBody;
use super::endpoint::Endpoint;
use super::error::{CallFuture, Direction, ProxyError, ResponseBody};
use super::server::PeerInfo;
use crate::config::{AuthorizationConfig, ContractMode, DefaultAuthorization, PolicyConfig};
use crate::contract::{Contracts, MethodInfo};
use crate::grpc::split_path;
use crate::identity::SpiffeId;
use crate::policy::authz::{MethodAuthz, MethodPattern, Rule};
use crate::policy::bulkhead::Bulkhead;
use crate::policy::method::Source;
use crate::policy::{CallContext, CallPolicy, Peer};
use crate::telemetry::Metrics;

pub const CALLER_ID_HEADER: HeaderName = HeaderName::from_static("protomesh-caller-id");

pub struct InboundRoute {
    pub policy: Arc<CallPolicy>,
    pub authz: MethodAuthz,
}

pub struct InboundRoutes {
    by_path: HashMap<Box<str>, Arc<InboundRoute>>,
    rules: Vec<Arc<Rule>>,
    authorization: DefaultAuthorization,
    mode: ContractMode,
    policy: Arc<PolicyConfig>,
    metrics: Arc<Metrics>,
    /// One bulkhead per caller identity, when `policy.caller_concurrency` is set.
    caller_bulkheads: Mutex<HashMap<SpiffeId, Arc<Bulkhead>>>,
}

/// The contract's `allowed_callers` of a method, as a rule named after its source.
fn contract_rule(method: &MethodInfo) -> Option<Arc<Rule>> {
    let callers = method.contract.allowed_callers.as_ref()?;
    let owner = if callers.source == Source::ServiceOption { &method.service } else { &method.path };
    Some(Arc::new(Rule {
        name: format!("allowed_callers in {} of {owner}", callers.source),
        methods: vec![MethodPattern::Any],
        callers: callers.value.clone(),
    }))
}

impl InboundRoutes {
    pub fn new(
        contracts: &Contracts,
        mode: ContractMode,
        authorization: &AuthorizationConfig,
        policy: Arc<PolicyConfig>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let rules: Vec<Arc<Rule>> = authorization
            .rules
            .iter()
            .map(|r| Arc::new(Rule { name: r.name.clone(), methods: r.methods.clone(), callers: r.callers.clone() }))
            .collect();
        let by_path = contracts
            .methods()
            .map(|method| {
                let (service, name) = (&method.service, &method.method);
                let authz = MethodAuthz::resolve(&rules, authorization.default, service, name, contract_rule(method));
                let call = CallPolicy::new(service, name, Some(method), &policy, &metrics, Direction::Inbound);
                (method.path.clone().into_boxed_str(), Arc::new(InboundRoute { policy: Arc::new(call), authz }))
            })
            .collect();
        InboundRoutes {
            by_path,
            rules,
            authorization: authorization.default,
            mode,
            policy,
            metrics,
            caller_bulkheads: Mutex::default(),
        }
    }

    /// Every method's policy, for the metrics.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<CallPolicy>> {
        self.by_path.values().map(|route| &route.policy)
    }

    /// The bulkheads of the callers seen so far.
    pub fn caller_bulkheads(&self) -> Vec<Arc<Bulkhead>> {
        self.caller_bulkheads.lock().expect("caller bulkheads lock").values().cloned().collect()
    }

    /// The bulkhead shared by all of one caller's calls, made on its first connection.
    fn caller_bulkhead(&self, caller: &SpiffeId) -> Option<Arc<Bulkhead>> {
        let limits = self.policy.caller_concurrency.as_ref()?;
        let mut bulkheads = self.caller_bulkheads.lock().expect("caller bulkheads lock");
        let bulkhead = bulkheads.entry(caller.clone()).or_insert_with(|| {
            Arc::new(Bulkhead::new(format!("caller {caller} (config policy.caller_concurrency)"), limits))
        });
        Some(bulkhead.clone())
    }

    /// A precomputed route, or in permissive mode one resolved for this call.
    fn route(&self, path: &str) -> Result<Arc<InboundRoute>, ProxyError> {
        if let Some(route) = self.by_path.get(path) {
            return Ok(route.clone());
        }
        let (service, method) = split_path(path).ok_or_else(|| ProxyError::NotGrpc { path: path.to_string() })?;
        match self.mode {
            ContractMode::Strict => Err(ProxyError::UnknownMethod { path: path.to_string() }),
            ContractMode::Permissive => {
                let policy =
                    CallPolicy::outside_contracts(service, method, &self.policy, &self.metrics, Direction::Inbound);
                Ok(Arc::new(InboundRoute {
                    policy: Arc::new(policy),
                    authz: MethodAuthz::resolve(&self.rules, self.authorization, service, method, None),
                }))
            }
        }
    }
}

/// The connection's caller, as its certificate proves it.
#[derive(Clone)]
struct Caller {
    id: SpiffeId,
    header: HeaderValue,
}

/// Per connection: the caller must have an identity and the method must be
/// known; the call gets its route and the caller's header.
#[derive(Clone)]
pub struct RouteInbound {
    routes: Arc<InboundRoutes>,
    caller: Option<Caller>,
    caller_bulkhead: Option<Arc<Bulkhead>>,
    peer: Peer,
}

impl RouteInbound {
    pub fn new(routes: Arc<InboundRoutes>, peer: &PeerInfo) -> Self {
        let caller = peer
            .identity
            .clone()
            .and_then(|id| HeaderValue::from_str(id.as_str()).ok().map(|header| Caller { id, header }));
        let caller_bulkhead = caller.as_ref().and_then(|caller| routes.caller_bulkhead(&caller.id));
        let peer = Peer { identity: peer.identity.clone(), address: Some(peer.addr.to_string().into()) };
        RouteInbound { routes, caller, caller_bulkhead, peer }
    }

    /// The authorization check for this connection's calls.
    pub fn authorize(&self) -> Authorize {
        Authorize { caller: self.caller.as_ref().map(|c| c.id.clone()) }
    }
}

impl Admission for RouteInbound {
    fn admit(&self, request: &mut Request<Incoming>) -> Result<(), ProxyError> {
        let caller = self.caller.as_ref().ok_or(ProxyError::NoCallerIdentity)?;
        let route = self.routes.route(request.uri().path())?;
        request.headers_mut().insert(CALLER_ID_HEADER, caller.header.clone());
        let context = CallContext::new(route.policy.clone(), self.caller_bulkhead.clone(), self.peer.clone());
        request.extensions_mut().insert(context);
        request.extensions_mut().insert(route);
        Ok(())
    }
}

/// Per connection: the method's authorization rules against the caller.
#[derive(Clone)]
pub struct Authorize {
    caller: Option<SpiffeId>,
}

impl Admission for Authorize {
    fn admit(&self, request: &mut Request<Incoming>) -> Result<(), ProxyError> {
        let caller = self.caller.as_ref().ok_or(ProxyError::NoCallerIdentity)?;
        let route = request.extensions().get::<Arc<InboundRoute>>().expect("inbound routing runs first");
        route.authz.check(caller).map_err(|denial| ProxyError::Denied {
            caller: caller.clone(),
            path: request.uri().path().to_string(),
            denial,
        })
    }
}

/// The end of the inbound stack: the local app's connection.
#[derive(Clone)]
pub struct ForwardToApp {
    app: Arc<Endpoint>,
}

impl ForwardToApp {
    pub fn new(app: Arc<Endpoint>) -> Self {
        ForwardToApp { app }
    }
}

impl Service<Request<Incoming>> for ForwardToApp {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let app = self.app.clone();
        super::forward_remaining_budget(&mut request);
        let request = request.map(RequestBody::Streamed);
        Box::pin(async move {
            let mut sender = app.ready().await?;
            let response = app.start(&mut sender, request)?.await?;
            Ok(response.map(ResponseBody::streamed))
        })
    }
}
