//! Outbound: the local app's plaintext calls, routed by gRPC service to an
//! upstream and sent over mTLS. Every method of the contracts whose service
//! has an upstream gets its stack, built once with its policy, so routing a
//! call costs one hash lookup on its `:path`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::ServiceBuilder;

use super::endpoint::ConnectSettings;
use super::original::{OriginalDestinations, OriginalKey, OriginalPolicy};
use super::registry::Registries;
use super::upstream::{Upstream, UpstreamRoute};
use crate::call::{CallFuture, Direction, ProxyError, RequestBody, ResponseBody};
use crate::config::Config;
use crate::contract::{ContractMode, Contracts, MethodInfo};
use crate::grpc::{Code, split_path};
use crate::policy::MethodPolicy;
use crate::policy::PolicyConfig;
use crate::policy::bulkhead::{Bulkhead, Bulkheads};
use crate::policy::circuit_breaker::{Breaker, CircuitBreakers};
use crate::policy::deadline::{DeadlineFamilies, Deadlines, ForwardBudget};
use crate::policy::kept::{Scope, StateKey};
use crate::policy::message_size::MessageSizes;
use crate::policy::replay::RetryFamilies;
use crate::policy::retry::Retries;
use crate::telemetry::{Metrics, Observe, Observed, Peer, Tap, Taps, TraceAttempts, Tracing};

/// A call from the local app, top to bottom: recorded, its messages
/// measured, let through by its method's circuit breaker, given its
/// deadline, retried or hedged, each attempt traced, held to its bulkheads,
/// and sent with the remaining budget to a balanced endpoint of its upstream.
pub type OutboundStack = Observe<
    Tap<MessageSizes<CircuitBreakers<Deadlines<Retries<TraceAttempts<Bulkheads<ForwardBudget<ForwardToUpstream>>>>>>>>,
>;

/// A method's bulkhead and circuit breaker, where it has them: kept per
/// method, not per stack.
type MethodGuards = (Option<Arc<Bulkhead>>, Option<Arc<Breaker>>);

/// What every outbound stack of one version of the routes shares.
struct Shared {
    metrics: Arc<Metrics>,
    taps: Arc<Taps>,
    tracing: Option<Arc<Tracing>>,
    access_log: bool,
    policy: PolicyConfig,
}

pub struct OutboundRoutes {
    by_path: HashMap<Box<str>, OutboundStack>,
    /// Permissive mode's way for methods outside the contracts.
    by_service: HashMap<Box<str>, Arc<UpstreamRoute>>,
    /// Where captured calls go that no upstream routes, unless turned off.
    originals: Option<Arc<OriginalDestinations>>,
    /// The bulkheads and circuit breakers of contract methods that no
    /// upstream routes, for their calls to original destinations.
    unrouted: HashMap<Box<str>, MethodGuards>,
    contracts: Arc<Contracts>,
    mode: ContractMode,
    shared: Shared,
}

impl OutboundRoutes {
    pub async fn build(
        config: &Config,
        contracts: &Arc<Contracts>,
        registries: &mut Registries,
        tracing: Option<Arc<Tracing>>,
    ) -> Result<OutboundRoutes, String> {
        let policy = &config.policy;
        let mut by_service = HashMap::new();
        for (i, upstream_config) in config.outbound.upstreams.iter().enumerate() {
            let upstream = registries
                .upstream(upstream_config, ConnectSettings::of(config), &policy.outlier_detection)
                .await
                .map_err(|e| format!("outbound.upstreams[{i}]: {e}"))?;
            let bulkhead = policy.upstream_concurrency.as_ref().map(|limits| {
                let name = format!("upstream {} (config policy.upstream_concurrency)", upstream.name);
                let key = StateKey::new(Direction::Outbound, Scope::Upstream(upstream.name.clone()), limits);
                registries.kept::<Bulkhead>(key, name)
            });
            let budget = registries.retry_budget(&upstream, &policy.retry_budget);
            let route = Arc::new(UpstreamRoute { upstream, bulkhead, budget });
            for service in &upstream_config.services {
                by_service.insert(Box::from(service.as_str()), route.clone());
            }
        }
        let shared = Shared {
            metrics: registries.metrics.clone(),
            taps: registries.taps.clone(),
            tracing,
            access_log: config.access_log,
            policy: policy.clone(),
        };
        let (mut by_path, mut unrouted) = (HashMap::new(), HashMap::new());
        for method in contracts.methods() {
            let effective = MethodPolicy::resolve(&method.service, &method.method, Some(method), policy);
            let bulkhead = effective.concurrency.as_ref().map(|c| {
                let key = StateKey::method(Direction::Outbound, &method.path, &c.value);
                registries.kept::<Bulkhead>(key, format!("method {} ({})", method.path, c.source))
            });
            let breaker = effective.circuit_breaker.as_ref().map(|b| {
                let key = StateKey::method(Direction::Outbound, &method.path, &b.value);
                registries.kept::<Breaker>(key, format!("method {} ({})", method.path, b.source))
            });
            let path = method.path.clone().into_boxed_str();
            match by_service.get(method.service.as_str()) {
                Some(route) => {
                    let names = (method.service.as_str(), method.method.as_str());
                    by_path.insert(path, shared.stack(route, &effective, Some(method), names, (bulkhead, breaker)));
                }
                None if bulkhead.is_some() || breaker.is_some() => {
                    unrouted.insert(path, (bulkhead, breaker));
                }
                None => {}
            }
        }
        let original = &config.outbound.original_destination;
        let originals = match original.enabled {
            false => None,
            true => {
                let key = OriginalKey { config: original.clone(), connect: ConnectSettings::of(config) };
                let policy = OriginalPolicy {
                    outliers: policy.outlier_detection.clone(),
                    retry_budget: policy.retry_budget.clone(),
                    concurrency: policy.upstream_concurrency.clone(),
                };
                let originals = registries.original_destinations(key, policy);
                Some(originals.map_err(|e| format!("outbound.original_destination: {e}"))?)
            }
        };
        Ok(OutboundRoutes {
            by_path,
            by_service,
            originals,
            unrouted,
            contracts: contracts.clone(),
            mode: config.contracts.mode,
            shared,
        })
    }

    /// The upstreams and the original destinations kept, as `/config` shows them.
    pub fn describe(&self) -> serde_json::Value {
        let mut upstreams: Vec<&Arc<UpstreamRoute>> = self.by_service.values().collect();
        upstreams.sort_by_key(|route| Arc::as_ptr(&route.upstream));
        upstreams.dedup_by_key(|route| Arc::as_ptr(&route.upstream));
        let mut upstreams: Vec<serde_json::Value> = upstreams.iter().map(|route| route.upstream.describe()).collect();
        upstreams.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let originals = self.originals.as_ref().map(|originals| originals.describe());
        serde_json::json!({ "upstreams": upstreams, "original_destinations": originals })
    }

    /// Where captured calls and connections go that no upstream routes, unless turned off.
    pub fn original_destinations(&self) -> Option<Arc<OriginalDestinations>> {
        self.originals.clone()
    }

    /// The stack that carries a call to `path`, made on a connection to
    /// `original` when the capture rules redirected it.
    pub fn route(&self, path: &str, original: Option<SocketAddr>) -> Result<OutboundStack, ProxyError> {
        if let Some(stack) = self.by_path.get(path) {
            return Ok(stack.clone());
        }
        let (service, method) = split_path(path).ok_or_else(|| ProxyError::NotGrpc { path: path.to_string() })?;
        let info = self.contracts.method(path).map(|info| &**info);
        if info.is_none() && self.mode == ContractMode::Strict {
            return Err(ProxyError::UnknownMethod { path: path.to_string() });
        }
        // Outside the contracts, a method's service override and the defaults
        // apply, but no method bulkhead or breaker, as none can be kept for every path
        // an app might send; for the same reason its metrics are counted
        // under service and method `*`.
        let names = if info.is_some() { (service, method) } else { ("*", "*") };
        let effective = || MethodPolicy::resolve(service, method, info, &self.shared.policy);
        match (self.by_service.get(service), original, &self.originals) {
            (Some(route), _, _) if info.is_none() => {
                Ok(self.shared.stack(route, &effective(), None, names, (None, None)))
            }
            (None, Some(addr), Some(originals)) => {
                let guards = self.unrouted.get(path).cloned().unwrap_or_default();
                Ok(self.shared.stack(&originals.route(addr), &effective(), info, names, guards))
            }
            _ => Err(ProxyError::NoRoute { service: service.to_string() }),
        }
    }
}

impl Shared {
    fn stack(
        &self,
        route: &UpstreamRoute,
        effective: &MethodPolicy,
        method: Option<&MethodInfo>,
        (service, name): (&str, &str),
        (bulkhead, breaker): MethodGuards,
    ) -> OutboundStack {
        let direction = Direction::Outbound;
        let metrics = &self.metrics;
        let upstream = &route.upstream;
        let peer_name = upstream.service.get().unwrap_or(&upstream.name);
        let peer = Peer { identity: upstream.identity.clone(), address: Some(peer_name.clone()) };
        let observed = Arc::new(Observed {
            direction,
            metrics: metrics.calls(direction, service, name),
            upstream: Some(peer),
            tracing: self.tracing.clone(),
            access_log: self.access_log,
        });
        let deadline = Arc::new(effective.deadline(self.policy.min_budget));
        let retries = Arc::new(effective.retries(method.map(|m| m.shape), self.policy.max_replay_bytes));
        ServiceBuilder::new()
            .layer_fn(|inner| Observe::new(observed.clone(), inner))
            .layer_fn(|inner| Tap::new(self.taps.clone(), direction, inner))
            .layer_fn(|inner| MessageSizes::new(effective.max_message_size.clone(), inner))
            .layer_fn(|inner| CircuitBreakers::new(breaker.clone(), inner))
            .layer_fn(|inner| {
                let exceeded = metrics.families::<DeadlineFamilies>().of(direction, service, name);
                Deadlines::new(deadline.clone(), exceeded, inner)
            })
            .layer_fn(|inner| {
                let counts = metrics.families::<RetryFamilies>().of(direction, service, name);
                Retries::new(retries.clone(), Some(route.budget.clone()), counts, inner)
            })
            .layer_fn(|inner| TraceAttempts::new(self.tracing.clone(), inner))
            .layer_fn(|inner| Bulkheads::new(bulkhead.clone(), route.bulkhead.clone(), inner))
            .layer_fn(ForwardBudget::new)
            .service(ForwardToUpstream {
                upstream: upstream.clone(),
                failure_codes: effective.endpoint_failure_codes.as_ref().map(|codes| codes.value.as_slice().into()),
            })
    }
}

/// The end of the outbound stack: sends the call to its upstream.
#[derive(Clone)]
pub struct ForwardToUpstream {
    upstream: Arc<Upstream>,
    /// The statuses the method counts against endpoints, if it chose.
    failure_codes: Option<Arc<[Code]>>,
}

impl tower::Service<Request<RequestBody>> for ForwardToUpstream {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        Box::pin(self.upstream.clone().send(request, self.failure_codes.clone()))
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::call::testing::{message, received};
    use crate::identity::certs::write_dev_certs;
    use crate::identity::{Credentials, Identity, SpiffeId};
    use crate::policy::replay::RetryFamilies;

    #[tokio::test]
    async fn a_methods_breaker_sees_each_call_once_its_retries_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let client = SpiffeId::parse("spiffe://td/ns/t/sa/client").unwrap();
        write_dev_certs(dir.path(), "test CA", &[("client".into(), client)]).unwrap();
        // Nothing listens at the endpoint: every attempt fails UNAVAILABLE.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (certs, proto) = (dir.path().display(), concat!(env!("CARGO_MANIFEST_DIR"), "/proto"));
        let yaml = format!(
            "identity: {{cert: {certs}/client.pem, key: {certs}/client-key.pem, trust_bundle: {certs}/ca.pem}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{proto}']}}\n\
             outbound: {{upstreams: [{{services: [echo.v1.Echo], endpoints: ['{closed}'], \
               identity: 'spiffe://td/ns/t/sa/server'}}]}}\n\
             policy: {{outlier_detection: {{consecutive_failures: 100}}, methods: {{echo.v1.Echo/Unary: {{\
               retry: {{max_attempts: 3, retryable_codes: [UNAVAILABLE], initial_backoff: 1ms, max_backoff: 1ms}}, \
               circuit_breaker: {{consecutive_failures: 2, open_for: 1m, max_open_for: 1m}}}}}}}}\n"
        );
        std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
        let config = crate::config::load(Some(&dir.path().join("config.yaml")), Vec::new()).unwrap();
        let contracts = Arc::new(Contracts::load(&config.contracts).unwrap());
        let identity = Arc::new(Identity::new(Credentials::read(&config.identity).unwrap()).unwrap());
        let metrics = Arc::new(Metrics::default());
        let mut registries = Registries::new(identity, metrics.clone(), 1, None);
        let routes = OutboundRoutes::build(&config, &contracts, &mut registries, None).await.unwrap();
        registries.commit();

        let path = "/echo.v1.Echo/Unary";
        let call = || async {
            let (request, _peer) = received(path, message(3)).await;
            routes.route(path, None).unwrap().oneshot(request).await.map(|_| ()).unwrap_err()
        };
        for _ in 0..2 {
            let failed = call().await;
            assert_eq!((failed.code(), failed.reason()), (Code::Unavailable, "connect"), "{failed}");
        }
        let retries = metrics.families::<RetryFamilies>().of(Direction::Outbound, "echo.v1.Echo", "Unary");
        assert_eq!(retries.retries.get(), 4, "each call retried twice, below the breaker");
        let refused = call().await;
        assert_eq!((refused.code(), refused.reason()), (Code::Unavailable, "circuit_breaker_open"), "{refused}");
        assert_eq!(retries.retries.get(), 4, "a call the breaker refused is not retried");
    }
}
