//! Inbound: calls from peer sidecars over mTLS, checked against the caller's
//! SPIFFE ID and the authorization rules, then sent to the local app over
//! plaintext HTTP/2. The app learns the authenticated caller from the
//! `protomesh-caller-id` header, which the sidecar always overwrites.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tower::Service;

use super::admit::Admission;
use super::endpoint::Endpoint;
use super::error::{ProxyError, ResponseBody};
use super::server::PeerInfo;
use crate::config::{AuthorizationConfig, ContractMode};
use crate::contract::{Contracts, MethodInfo};
use crate::grpc::split_path;
use crate::policy::authz::{MethodAuthz, MethodPattern, Rule};
use crate::policy::method::Source;

pub const CALLER_ID_HEADER: HeaderName = HeaderName::from_static("protomesh-caller-id");

pub struct InboundRoute {
    pub method: Option<Arc<MethodInfo>>,
    pub authz: MethodAuthz,
}

pub struct InboundRoutes {
    by_path: HashMap<Box<str>, Arc<InboundRoute>>,
    rules: Vec<Arc<Rule>>,
    authorization: crate::config::DefaultAuthorization,
    mode: ContractMode,
}

impl InboundRoutes {
    pub fn new(contracts: &Contracts, mode: ContractMode, authorization: &AuthorizationConfig) -> Self {
        let rules: Vec<Arc<Rule>> = authorization
            .rules
            .iter()
            .map(|r| {
                Arc::new(Rule {
                    name: r.name.clone(),
                    methods: r.methods.clone(),
                    callers: r.callers.clone(),
                })
            })
            .collect();
        let by_path = contracts
            .methods()
            .map(|method| {
                let contract_rule = method.contract.allowed_callers.as_ref().map(|callers| {
                    let owner = if callers.source == Source::ServiceOption {
                        &method.service
                    } else {
                        &method.path
                    };
                    Arc::new(Rule {
                        name: format!("allowed_callers in {} of {owner}", callers.source),
                        methods: vec![MethodPattern::Any],
                        callers: callers.value.clone(),
                    })
                });
                let authz = MethodAuthz::resolve(
                    &rules,
                    authorization.default,
                    &method.service,
                    &method.method,
                    contract_rule,
                );
                (
                    method.path.clone().into_boxed_str(),
                    Arc::new(InboundRoute {
                        method: Some(method.clone()),
                        authz,
                    }),
                )
            })
            .collect();
        InboundRoutes {
            by_path,
            rules,
            authorization: authorization.default,
            mode,
        }
    }

    /// A precomputed route, or in permissive mode one resolved for this call.
    fn route(&self, path: &str) -> Result<Arc<InboundRoute>, ProxyError> {
        if let Some(route) = self.by_path.get(path) {
            return Ok(route.clone());
        }
        let (service, method) = split_path(path).ok_or_else(|| ProxyError::NotGrpc { path: path.to_string() })?;
        match self.mode {
            ContractMode::Strict => Err(ProxyError::UnknownMethod { path: path.to_string() }),
            ContractMode::Permissive => Ok(Arc::new(InboundRoute {
                method: None,
                authz: MethodAuthz::resolve(&self.rules, self.authorization, service, method, None),
            })),
        }
    }
}

/// Per connection: the caller's identity, checked on each call against the
/// method's authorization.
#[derive(Clone)]
pub struct AuthorizeInbound {
    routes: Arc<InboundRoutes>,
    caller: Option<(crate::identity::SpiffeId, HeaderValue)>,
}

impl AuthorizeInbound {
    pub fn new(routes: Arc<InboundRoutes>, peer: &PeerInfo) -> Self {
        let caller = peer
            .identity
            .clone()
            .and_then(|id| HeaderValue::from_str(id.as_str()).ok().map(|header| (id, header)));
        AuthorizeInbound { routes, caller }
    }
}

impl Admission for AuthorizeInbound {
    fn admit(&self, request: &mut Request<Incoming>) -> Result<(), ProxyError> {
        let (caller, header) = self.caller.as_ref().ok_or(ProxyError::NoCallerIdentity)?;
        let path = request.uri().path();
        let route = self.routes.route(path)?;
        route.authz.check(caller).map_err(|denial| ProxyError::Denied {
            caller: caller.clone(),
            path: path.to_string(),
            denial,
        })?;
        request.headers_mut().insert(CALLER_ID_HEADER, header.clone());
        request.extensions_mut().insert(route);
        Ok(())
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
    type Future = BoxFuture<'static, Result<Self::Response, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let app = self.app.clone();
        Box::pin(async move { Ok(app.send(request).await?.map(Either::Left)) })
    }
}
