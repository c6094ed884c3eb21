//! An upstream: the peers serving a set of gRPC services, all expected to
//! present one SPIFFE ID, with one pooled connection per endpoint and worker, a balancer
//! over them, outlier detection for each, and a retry budget for all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tokio::time::Instant;

use super::balance::{self, Report};
use super::body::{RequestBody, ResponseBody};
use super::discovery::{self, EndpointSpec};
use super::endpoint::{Endpoint, Transport};
use super::error::{ProxyError, Target};
use crate::config::{PolicyConfig, UpstreamConfig};
use crate::grpc;
use crate::identity::{Identity, SpiffeId};
use crate::policy::CallContext;
use crate::policy::bulkhead::Bulkhead;
use crate::policy::outlier::{Outcome, Outliers};
use crate::policy::retry::{self, RetryBudget};

/// The endpoint that answered a traced call, in its response's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Answered(pub SocketAddr);

/// Endpoints a call may try when connecting fails, before it gives up.
const CONNECT_TRIES: usize = 3;

pub struct Upstream {
    /// A label for messages: the endpoints as configured.
    pub name: Arc<str>,
    pub identity: SpiffeId,
    /// Across all the upstream's methods, when `policy.upstream_concurrency` is set.
    pub bulkhead: Option<Arc<Bulkhead>>,
    /// What retries to this upstream may add to its calls.
    pub retry_budget: RetryBudget,
    pub outliers: Arc<Outliers>,
    transport: Arc<Transport>,
    connect_timeout: Duration,
    /// Workers of the sidecar, each with its own connection to every endpoint.
    workers: usize,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
}

impl Upstream {
    /// Resolves the endpoints once and keeps DNS names re-resolving in the background.
    pub async fn start(
        config: &UpstreamConfig,
        identity: &Identity,
        connect_timeout: Duration,
        policy: &PolicyConfig,
        workers: usize,
    ) -> Result<Arc<Upstream>, String> {
        let specs: Vec<EndpointSpec> =
            config.endpoints.iter().map(|e| discovery::parse_endpoint(e)).collect::<Result<_, _>>()?;
        let name: Arc<str> = config.endpoints.join(",").into();
        let bulkhead = policy.upstream_concurrency.as_ref().map(|limits| {
            Arc::new(Bulkhead::new(format!("upstream {name} (config policy.upstream_concurrency)"), limits))
        });
        let budget = &policy.retry_budget;
        let upstream = Arc::new(Upstream {
            name,
            identity: config.identity.clone(),
            bulkhead,
            retry_budget: RetryBudget(Arc::new(retry::budget(budget.ratio, budget.min_per_second))),
            outliers: Arc::new(Outliers::new(policy.outlier_detection.clone())),
            transport: Arc::new(Transport::Mtls(identity.client_config(config.identity.clone())?)),
            connect_timeout,
            workers,
            endpoints: ArcSwap::from_pointee(Vec::new()),
        });
        upstream.set_endpoints(&discovery::resolve(&specs).await);
        discovery::spawn_refresh(Arc::downgrade(&upstream), specs, config.resolve_interval);
        Ok(upstream)
    }

    /// Replaces the endpoint set, keeping the connections (and health) of
    /// addresses that stay.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let current = self.endpoints.load();
        if current.len() == addrs.len() && current.iter().zip(addrs).all(|(e, a)| e.addr == *a) {
            return;
        }
        let endpoints = addrs
            .iter()
            .map(|&addr| {
                current.iter().find(|e| e.addr == addr).cloned().unwrap_or_else(|| {
                    let target = Target::Upstream { name: self.name.clone(), addr };
                    Arc::new(Endpoint::new(addr, target, self.transport.clone(), self.connect_timeout, self.workers))
                })
            })
            .collect();
        tracing::info!(upstream = %self.name, endpoints = ?addrs, "endpoints updated");
        self.outliers.set_endpoint_count(addrs.len());
        self.endpoints.store(Arc::new(endpoints));
    }

    /// Sends a call to the endpoint the balancer chooses. One that cannot be
    /// connected to is passed over for another: the request has not left the
    /// sidecar, so any call may go elsewhere.
    pub async fn send(self: Arc<Self>, request: Request<RequestBody>) -> Result<Response<ResponseBody>, ProxyError> {
        let endpoints = self.endpoints.load_full();
        if endpoints.is_empty() {
            return Err(ProxyError::NoEndpoints { upstream: self.name.clone() });
        }
        // Only a call's span reads which endpoint answered.
        let traced = CallContext::of(&request).span.is_some();
        let mut refused = None;
        // Endpoints that could not be connected to; empty (and unallocated) on the usual path.
        let mut unreachable = Vec::new();
        for _ in 0..endpoints.len().min(CONNECT_TRIES) {
            let Some((endpoint, admission)) = balance::choose(&endpoints, &unreachable, Instant::now()) else { break };
            let report = Report::start(endpoint.clone(), self.outliers.clone(), admission);
            let mut sender = match endpoint.ready().await {
                Ok(sender) => sender,
                Err(error) => {
                    report.finish(Outcome::Failure);
                    unreachable.push(endpoint.addr);
                    refused = Some(error);
                    continue;
                }
            };
            let result = match endpoint.start(&mut sender, request) {
                Ok(exchange) => exchange.await,
                Err(error) => Err(error),
            };
            return match result {
                // A refusal says nothing of the endpoint's health.
                Err(error) if error.refused_unprocessed() => Err(error),
                Err(error) => {
                    report.finish(Outcome::Failure);
                    Err(error)
                }
                Ok(response) => {
                    report.responded();
                    let trailers_only = grpc::status_in(response.headers());
                    let mut response = response.map(ResponseBody::streamed);
                    if traced {
                        response.extensions_mut().insert(Answered(endpoint.addr));
                    }
                    match trailers_only {
                        Some(code) => report.finish_with_status(code),
                        None => response.body_mut().report_to(report),
                    }
                    Ok(response)
                }
            };
        }
        Err(refused
            .unwrap_or_else(|| ProxyError::AllEjected { upstream: self.name.clone(), endpoints: endpoints.len() }))
    }
}
