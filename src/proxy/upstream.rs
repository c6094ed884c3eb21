//! An upstream: the peers serving a set of gRPC services, all expected to
//! present one SPIFFE ID, with one pooled connection per endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;

use super::body::RequestBody;
use super::discovery::{self, EndpointSpec};
use super::endpoint::{Endpoint, Transport};
use super::error::{ProxyError, Target};
use crate::config::PolicyConfig;
use crate::config::UpstreamConfig;
use crate::identity::{Identity, SpiffeId};
use crate::policy::bulkhead::Bulkhead;
use crate::policy::retry::{self, RetryBudget};

pub struct Upstream {
    /// A label for messages: the endpoints as configured.
    pub name: Arc<str>,
    pub identity: SpiffeId,
    /// Across all the upstream's methods, when `policy.upstream_concurrency` is set.
    pub bulkhead: Option<Arc<Bulkhead>>,
    /// What retries to this upstream may add to its calls.
    pub retry_budget: RetryBudget,
    transport: Arc<Transport>,
    connect_timeout: Duration,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    next: AtomicUsize,
}

impl Upstream {
    /// Resolves the endpoints once and keeps DNS names re-resolving in the background.
    pub async fn start(
        config: &UpstreamConfig,
        identity: &Identity,
        connect_timeout: Duration,
        policy: &PolicyConfig,
    ) -> Result<Arc<Upstream>, String> {
        let specs: Vec<EndpointSpec> = config
            .endpoints
            .iter()
            .map(|e| discovery::parse_endpoint(e))
            .collect::<Result<_, _>>()?;
        let name: Arc<str> = config.endpoints.join(",").into();
        let bulkhead = policy.upstream_concurrency.as_ref().map(|limits| {
            Arc::new(Bulkhead::new(
                format!("upstream {name} (config policy.upstream_concurrency)"),
                limits,
            ))
        });
        let budget = &policy.retry_budget;
        let retry_budget = RetryBudget(Arc::new(retry::budget(budget.ratio, budget.min_per_second)));
        let upstream = Arc::new(Upstream {
            name,
            identity: config.identity.clone(),
            bulkhead,
            retry_budget,
            transport: Arc::new(Transport::Mtls(identity.client_config(config.identity.clone())?)),
            connect_timeout,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
        });
        upstream.set_endpoints(&discovery::resolve(&specs).await);
        discovery::spawn_refresh(Arc::downgrade(&upstream), specs, config.resolve_interval);
        Ok(upstream)
    }

    /// Replaces the endpoint set, keeping the connections of addresses that stay.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let current = self.endpoints.load();
        if current.len() == addrs.len() && current.iter().zip(addrs).all(|(e, a)| e.addr == *a) {
            return;
        }
        let endpoints = addrs
            .iter()
            .map(|&addr| {
                current.iter().find(|e| e.addr == addr).cloned().unwrap_or_else(|| {
                    let target = Target::Upstream {
                        name: self.name.clone(),
                        addr,
                    };
                    Arc::new(Endpoint::new(
                        addr,
                        target,
                        self.transport.clone(),
                        self.connect_timeout,
                    ))
                })
            })
            .collect();
        tracing::info!(upstream = %self.name, endpoints = ?addrs, "endpoints updated");
        self.endpoints.store(Arc::new(endpoints));
    }

    /// Round-robin over the current endpoints. An endpoint that cannot be
    /// connected to is passed over for the next, up to three: the request has
    /// not left the sidecar, so any call may go elsewhere.
    pub async fn send(&self, request: Request<RequestBody>) -> Result<Response<Incoming>, ProxyError> {
        let endpoints = self.endpoints.load_full();
        if endpoints.is_empty() {
            return Err(ProxyError::NoEndpoints {
                upstream: self.name.clone(),
            });
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut refused = None;
        for endpoint in endpoints
            .iter()
            .cycle()
            .skip(first % endpoints.len())
            .take(endpoints.len().min(3))
        {
            match endpoint.connection().await {
                Ok(connection) => return endpoint.send_on(connection, request).await,
                Err(error) => refused = Some(error),
            }
        }
        Err(refused.expect("at least one endpoint was tried"))
    }
}
