//! Outbound: the local app's plaintext calls, routed by gRPC service to an
//! upstream and sent over mTLS. The route table, with each method's policy,
//! is built once at start, so a call costs one hash lookup on its `:path`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use tower::Service;

use super::admit::Admission;
use super::body::RequestBody;
use super::error::{CallFuture, Direction, ProxyError, ResponseBody};
use super::upstream::Upstream;
use crate::config::{ContractMode, PolicyConfig};
use crate::contract::Contracts;
use crate::grpc::split_path;
use crate::policy::{CallContext, CallPolicy, Peer};
use crate::telemetry::Metrics;

/// Where a call goes, and the policy of its method.
pub struct OutboundRoute {
    pub policy: Arc<CallPolicy>,
    pub upstream: Arc<Upstream>,
}

pub struct OutboundRoutes {
    by_path: HashMap<Box<str>, Arc<OutboundRoute>>,
    /// Permissive mode's way for methods outside the contracts.
    by_service: HashMap<Box<str>, Arc<Upstream>>,
    contracts: Arc<Contracts>,
    mode: ContractMode,
    policy: Arc<PolicyConfig>,
    metrics: Arc<Metrics>,
}

impl OutboundRoutes {
    pub fn new(
        contracts: Arc<Contracts>,
        mode: ContractMode,
        policy: Arc<PolicyConfig>,
        metrics: Arc<Metrics>,
        upstreams: &[(Vec<String>, Arc<Upstream>)],
    ) -> Self {
        let by_service: HashMap<Box<str>, Arc<Upstream>> = upstreams
            .iter()
            .flat_map(|(services, upstream)| services.iter().map(move |s| (Box::from(s.as_str()), upstream.clone())))
            .collect();
        let by_path = contracts
            .methods()
            .filter_map(|method| {
                let upstream = by_service.get(method.service.as_str())?.clone();
                let (service, name) = (&method.service, &method.method);
                let call = CallPolicy::new(service, name, Some(method), &policy, &metrics, Direction::Outbound);
                Some((
                    method.path.clone().into_boxed_str(),
                    Arc::new(OutboundRoute { policy: Arc::new(call), upstream }),
                ))
            })
            .collect();
        OutboundRoutes { by_path, by_service, contracts, mode, policy, metrics }
    }

    /// Every routed method's policy, for the metrics.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<CallPolicy>> {
        self.by_path.values().map(|route| &route.policy)
    }

    pub fn route(&self, path: &str) -> Result<Arc<OutboundRoute>, ProxyError> {
        if let Some(route) = self.by_path.get(path) {
            return Ok(route.clone());
        }
        let (service, method) = split_path(path).ok_or_else(|| ProxyError::NotGrpc { path: path.to_string() })?;
        let known = self.contracts.method(path).is_some();
        if !known && self.mode == ContractMode::Strict {
            return Err(ProxyError::UnknownMethod { path: path.to_string() });
        }
        match self.by_service.get(service) {
            Some(upstream) if !known => Ok(Arc::new(OutboundRoute {
                policy: Arc::new(CallPolicy::outside_contracts(
                    service,
                    method,
                    &self.policy,
                    &self.metrics,
                    Direction::Outbound,
                )),
                upstream: upstream.clone(),
            })),
            _ => Err(ProxyError::NoRoute { service: service.to_string() }),
        }
    }
}

/// Finds the call's route and hands it, with its policy, to the layers below.
impl Admission for Arc<OutboundRoutes> {
    fn admit(&self, request: &mut Request<Incoming>) -> Result<(), ProxyError> {
        let route = self.route(request.uri().path())?;
        let peer = Peer { identity: Some(route.upstream.identity.clone()), address: Some(route.upstream.name.clone()) };
        let mut context = CallContext::new(route.policy.clone(), route.upstream.bulkhead.clone(), peer);
        context.retry_budget = Some(route.upstream.retry_budget.clone());
        request.extensions_mut().insert(context);
        request.extensions_mut().insert(route);
        Ok(())
    }
}

/// The end of the outbound stack: sends the call to its route's upstream.
#[derive(Clone, Copy, Default)]
pub struct ForwardToUpstream;

impl Service<Request<RequestBody>> for ForwardToUpstream {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let route = request.extensions().get::<Arc<OutboundRoute>>().expect("admission routes the call first");
        let upstream = route.upstream.clone();
        super::forward_remaining_budget(&mut request);
        Box::pin(upstream.send(request))
    }
}
