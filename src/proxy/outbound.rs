//! Outbound: the local app's plaintext calls, routed by gRPC service to an
//! upstream and sent over mTLS. The route table is built once at start, so a
//! call costs one hash lookup on its `:path`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tower::Service;

use super::admit::Admission;
use super::error::{ProxyError, ResponseBody};
use super::upstream::Upstream;
use crate::config::ContractMode;
use crate::contract::{Contracts, MethodInfo};
use crate::grpc::split_path;

/// Where a call goes, and what the contract says of its method (`None` for
/// methods outside the contracts in permissive mode).
pub struct OutboundRoute {
    pub method: Option<Arc<MethodInfo>>,
    pub upstream: Arc<Upstream>,
}

pub struct OutboundRoutes {
    by_path: HashMap<Box<str>, Arc<OutboundRoute>>,
    /// Permissive mode's fallback for methods outside the contracts.
    by_service: HashMap<Box<str>, Arc<OutboundRoute>>,
    contracts: Arc<Contracts>,
    mode: ContractMode,
}

impl OutboundRoutes {
    pub fn new(contracts: Arc<Contracts>, mode: ContractMode, upstreams: &[(Vec<String>, Arc<Upstream>)]) -> Self {
        let upstream_of: HashMap<&str, &Arc<Upstream>> = upstreams
            .iter()
            .flat_map(|(services, upstream)| services.iter().map(move |s| (s.as_str(), upstream)))
            .collect();
        let by_path = contracts
            .methods()
            .filter_map(|method| {
                let upstream = upstream_of.get(method.service.as_str())?;
                let route = OutboundRoute {
                    method: Some(method.clone()),
                    upstream: (*upstream).clone(),
                };
                Some((method.path.clone().into_boxed_str(), Arc::new(route)))
            })
            .collect();
        let by_service = upstream_of
            .iter()
            .map(|(service, upstream)| {
                (
                    Box::from(*service),
                    Arc::new(OutboundRoute {
                        method: None,
                        upstream: (*upstream).clone(),
                    }),
                )
            })
            .collect();
        OutboundRoutes {
            by_path,
            by_service,
            contracts,
            mode,
        }
    }

    pub fn route(&self, path: &str) -> Result<&Arc<OutboundRoute>, ProxyError> {
        if let Some(route) = self.by_path.get(path) {
            return Ok(route);
        }
        let (service, _) = split_path(path).ok_or_else(|| ProxyError::NotGrpc { path: path.to_string() })?;
        let known = self.contracts.method(path).is_some();
        if !known && self.mode == ContractMode::Strict {
            return Err(ProxyError::UnknownMethod { path: path.to_string() });
        }
        match self.by_service.get(service) {
            Some(route) if !known => Ok(route),
            _ => Err(ProxyError::NoRoute {
                service: service.to_string(),
            }),
        }
    }
}

/// Finds the call's route and hands it to the layers below in the request's extensions.
impl Admission for Arc<OutboundRoutes> {
    fn admit(&self, request: &mut Request<Incoming>) -> Result<(), ProxyError> {
        let route = self.route(request.uri().path())?.clone();
        request.extensions_mut().insert(route);
        Ok(())
    }
}

/// The end of the outbound stack: sends the call to its route's upstream.
#[derive(Clone, Copy, Default)]
pub struct ForwardToUpstream;

impl Service<Request<Incoming>> for ForwardToUpstream {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Self::Response, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let route = request.extensions().get::<Arc<OutboundRoute>>().cloned();
        Box::pin(async move {
            let route = route.expect("outbound routing runs before ForwardToUpstream");
            let response = route.upstream.send(request).await?;
            Ok(response.map(Either::Left))
        })
    }
}
