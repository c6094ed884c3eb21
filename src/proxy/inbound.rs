//! Inbound: calls from peer sidecars over mTLS, checked against the caller's
//! SPIFFE ID and the authorization rules, then sent to the local app over
//! plaintext HTTP/2. Every method of the contracts gets its stack, built
//! once with its policy and the rules that govern it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::ServiceBuilder;

use super::endpoint::{ConnectSettings, Endpoint};
use super::reflection::{self, Reflection};
use super::registry::{AppPorts, Registries};
use crate::call::{CallFuture, Direction, ENDPOINT_FAILURE, ProxyError, RecvBody, RequestBody, ResponseBody};
use crate::config::health_checks::HealthAnswer;
use crate::config::web::JsonRouting;
use crate::config::{Config, InboundConfig};
use crate::contract::{ContractMode, Contracts, MethodInfo};
use crate::effective;
use crate::grpc::split_path;
use crate::policy::MethodPolicy;
use crate::policy::PolicyConfig;
use crate::policy::authz::{Authorize, MethodAuthz, Rule};
use crate::policy::bulkhead::{Bulkhead, Bulkheads, CallerBulkheads};
use crate::policy::deadline::{DeadlineFamilies, Deadlines, ForwardBudget};
use crate::policy::kept::{Scope, StateKey};
use crate::policy::message_size::MessageSizes;
use crate::policy::rate_limit::{CallerBuckets, MethodLimit, RateLimits};
use crate::policy::validate::{RequestRules, Validate, ValidationFamilies};
use crate::telemetry::{Metrics, Observe, Observed, Tap, Taps, Tracing};
use crate::transcode::JsonRoutes;

/// A call from a peer sidecar, top to bottom: recorded, authorized, held to
/// its rate limits (its caller's and the method's), its messages measured,
/// given its deadline, its request messages checked against their rules,
/// held to its bulkheads (the method's and its caller's), and sent with the
/// remaining budget to the app.
pub type InboundStack =
    Observe<Tap<Authorize<RateLimits<MessageSizes<Deadlines<Validate<Bulkheads<ForwardBudget<ForwardToApp>>>>>>>>>;

/// What every inbound stack of one version of the routes shares.
struct Shared {
    metrics: Arc<Metrics>,
    taps: Arc<Taps>,
    tracing: Option<Arc<Tracing>>,
    access_log: bool,
    policy: PolicyConfig,
    inbound: InboundConfig,
    rules: Vec<Arc<Rule>>,
    contracts: Arc<Contracts>,
}

pub struct InboundRoutes {
    by_path: HashMap<Box<str>, InboundStack>,
    mode: ContractMode,
    /// One bulkhead per caller identity, when `policy.caller_concurrency` is set.
    pub callers: Option<Arc<CallerBulkheads>>,
    /// `inbound.app`, for connections made to the listener itself.
    app: Option<Arc<Endpoint>>,
    /// The app by port, for connections the capture rules redirected.
    app_ports: Arc<AppPorts>,
    /// Reflection, by [`reflection::Version`], behind the authorization of
    /// its method; `None` when the contracts serve none.
    reflection: Option<[Authorize<Reflection>; 2]>,
    /// The JSON routes of `inbound.web`, when it takes JSON.
    pub json: Option<JsonRoutes>,
    shared: Shared,
}

impl InboundRoutes {
    pub fn build(
        config: &Config,
        inbound: &InboundConfig,
        contracts: &Arc<Contracts>,
        registries: &mut Registries,
        tracing: Option<Arc<Tracing>>,
        reflection: Option<&Reflection>,
    ) -> Result<InboundRoutes, String> {
        let policy = &config.policy;
        let shared = Shared {
            metrics: registries.metrics.clone(),
            taps: registries.taps.clone(),
            tracing,
            access_log: config.access_log,
            policy: policy.clone(),
            inbound: inbound.clone(),
            rules: inbound.authorization.rules(),
            contracts: contracts.clone(),
        };
        let connect = ConnectSettings::of(config);
        let app = inbound.app.map(|addr| registries.app(addr, connect));
        let app_ports = registries.app_ports(connect);
        let validation = shared.metrics.families::<ValidationFamilies>();
        let by_path = contracts
            .methods()
            .map(|method| {
                let effective = MethodPolicy::resolve(&method.service, &method.method, Some(method), policy);
                let bulkhead = effective.concurrency.as_ref().map(|c| {
                    registries.kept::<Bulkhead>(
                        StateKey::method(Direction::Inbound, &method.path, &c.value),
                        format!("method {} ({})", method.path, c.source),
                    )
                });
                let rate = effective.rate_limit.as_ref().map(|limit| {
                    let name = format!("method {} ({})", method.path, limit.source);
                    let key = StateKey::method(Direction::Inbound, &method.path, &limit.value);
                    registries.kept::<MethodLimit>(key, name)
                });
                let caller_rate = effective.caller_rate_limit.as_ref().map(|limit| {
                    let name = format!("method {} per caller ({})", method.path, limit.source);
                    let key = StateKey::method(Direction::Inbound, &method.path, &limit.value);
                    registries.kept::<CallerBuckets>(key, name)
                });
                let names = (method.service.as_str(), method.method.as_str());
                let rules = effective.request_rules(contracts, method, &validation)?;
                let validation = (rules, method.shape.one_request());
                let stack = shared.stack(&effective, names, names, bulkhead, (rate, caller_rate), validation);
                Ok((method.path.clone().into_boxed_str(), stack))
            })
            .collect::<Result<_, String>>()?;
        let callers = policy.caller_concurrency.as_ref().map(|limits| {
            let key = StateKey::new(Direction::Inbound, Scope::Callers, limits);
            registries.kept::<CallerBulkheads>(key, "callers (config policy.caller_concurrency)".into())
        });
        let reflection = reflection.map(|reflection| {
            reflection::SERVICES.map(|(_, service)| {
                Authorize::new(Arc::new(shared.authorization(service, reflection::METHOD)), reflection.clone())
            })
        });
        let json = InboundRoutes::json_routes(inbound, policy, contracts)?;
        Ok(InboundRoutes { by_path, mode: config.contracts.mode, callers, app, app_ports, reflection, json, shared })
    }

    /// The routes JSON callers reach on `inbound.web`: those of the methods
    /// it lists, each reading a body of up to its `max_message_size`.
    /// Errors name the contract, the method and the binding, for `check` and
    /// a refused reload.
    pub fn json_routes(
        inbound: &InboundConfig,
        policy: &PolicyConfig,
        contracts: &Contracts,
    ) -> Result<Option<JsonRoutes>, String> {
        let Some(web) = inbound.web.as_ref().filter(|web| web.json != JsonRouting::Off) else { return Ok(None) };
        let max_body = |method: &MethodInfo| {
            let effective = MethodPolicy::resolve(&method.service, &method.method, Some(method), policy);
            usize::try_from(effective.message_hold()).unwrap_or(usize::MAX)
        };
        let opened = |method: &MethodInfo| web.opens(&method.service, &method.method);
        JsonRoutes::build(contracts, opened, web.json == JsonRouting::All, max_body).map(Some)
    }

    /// The app a connection's calls go to: on `127.0.0.1` at the port it was
    /// made to when the capture rules redirected it, `inbound.app` otherwise.
    pub fn app_for(&self, captured_port: Option<u16>) -> Result<AppTarget, ProxyError> {
        let app = match (captured_port, &self.app) {
            (Some(port), Some(app)) if app.addr == SocketAddr::from(([127, 0, 0, 1], port)) => app.clone(),
            (Some(port), _) => self.app_ports.get(port),
            (None, Some(app)) => app.clone(),
            (None, None) => return Err(ProxyError::NoApp),
        };
        Ok(AppTarget(app))
    }

    /// How the sidecar answers peers' health checks, unless they are calls like any other.
    pub fn health_answer(&self) -> Option<HealthAnswer> {
        Some(self.shared.inbound.health).filter(|answer| *answer != HealthAnswer::App)
    }

    /// Reflection asked at `path`, authorized as its method, when the contracts serve it.
    pub fn reflection(&self, path: &str) -> Option<Authorize<Reflection>> {
        let version = reflection::asked(path)?;
        Some(self.reflection.as_ref()?[version as usize].clone())
    }

    pub fn contracts(&self) -> &Arc<Contracts> {
        &self.shared.contracts
    }

    /// The stack for a call to `path`: precomputed, or in permissive mode
    /// built for this call.
    pub fn route(&self, path: &str) -> Result<InboundStack, ProxyError> {
        if let Some(stack) = self.by_path.get(path) {
            return Ok(stack.clone());
        }
        let (service, method) = split_path(path).ok_or_else(|| ProxyError::NotGrpc { path: path.to_string() })?;
        match self.mode {
            ContractMode::Strict => Err(ProxyError::UnknownMethod { path: path.to_string() }),
            // Outside the contracts: counted under `*`, and with no method
            // bulkhead or rate limit, as none can be kept for every path a peer might send.
            ContractMode::Permissive => {
                let effective = MethodPolicy::resolve(service, method, None, &self.shared.policy);
                let validation = (None, false);
                Ok(self.shared.stack(&effective, (service, method), ("*", "*"), None, (None, None), validation))
            }
        }
    }
}

impl Shared {
    /// Who may call `service/method`: the rules and the contract's
    /// `allowed_callers` for peers, and callers without a certificate where
    /// `inbound.web` opens it to them.
    fn authorization(&self, service: &str, method: &str) -> MethodAuthz {
        let opened = self.inbound.web.as_ref().is_some_and(|web| web.opens(service, method));
        effective::authorization(&self.inbound.authorization, &self.rules, &self.contracts, service, method)
            .open_to_unauthenticated(opened)
    }

    fn stack(
        &self,
        effective: &MethodPolicy,
        (service, method): (&str, &str),
        labels: (&str, &str),
        bulkhead: Option<Arc<Bulkhead>>,
        (rate, caller_rate): (Option<Arc<MethodLimit>>, Option<Arc<CallerBuckets>>),
        (rules, one_request): (Option<Arc<RequestRules>>, bool),
    ) -> InboundStack {
        let direction = Direction::Inbound;
        let metrics = &self.metrics;
        let observed = Arc::new(Observed {
            direction,
            metrics: metrics.calls(direction, labels.0, labels.1),
            upstream: None,
            tracing: self.tracing.clone(),
            access_log: self.access_log,
        });
        let authz: Arc<MethodAuthz> = Arc::new(self.authorization(service, method));
        let deadline = Arc::new(effective.deadline(self.policy.min_budget));
        ServiceBuilder::new()
            .layer_fn(|inner| Observe::new(observed.clone(), inner))
            .layer_fn(|inner| Tap::new(self.taps.clone(), direction, inner))
            .layer_fn(|inner| Authorize::new(authz.clone(), inner))
            .layer_fn(|inner| RateLimits::new(rate.clone(), caller_rate.clone(), inner))
            .layer_fn(|inner| MessageSizes::new(effective.max_message_size.clone(), inner))
            .layer_fn(|inner| {
                let exceeded = metrics.families::<DeadlineFamilies>().of(direction, labels.0, labels.1);
                Deadlines::new(deadline.clone(), exceeded, inner)
            })
            .layer_fn(|inner| Validate::new(rules.clone(), one_request, inner))
            .layer_fn(|inner| Bulkheads::new(bulkhead.clone(), None, inner))
            .layer_fn(ForwardBudget::new)
            .service(ForwardToApp)
    }
}

/// The app a call goes to, put on the request by the edge.
#[derive(Clone)]
pub struct AppTarget(Arc<Endpoint>);

impl AppTarget {
    /// Sends `request` to the app over its pooled connection.
    pub async fn send(&self, request: Request<RequestBody>) -> Result<Response<ResponseBody>, ProxyError> {
        let app = &self.0;
        let mut sender = app.ready().await?;
        let response = app.start(&mut sender, request)?.await?;
        let mut response = response.map(|body| ResponseBody::streamed(body, Direction::Inbound));
        // Only this sidecar says its app is unreachable.
        response.headers_mut().remove(ENDPOINT_FAILURE);
        Ok(response)
    }

    /// Whether the app takes connections.
    pub async fn reachable(&self) -> bool {
        self.0.ready().await.is_ok()
    }
}

/// The end of the inbound stack: a connection to the app the edge chose.
#[derive(Clone)]
pub struct ForwardToApp;

impl tower::Service<Request<RecvBody>> for ForwardToApp {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RecvBody>) -> Self::Future {
        let target = request.extensions_mut().remove::<AppTarget>();
        let request = request.map(RequestBody::Streamed);
        Box::pin(async move { target.ok_or(ProxyError::NoApp)?.send(request).await })
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::call::Caller;
    use crate::call::testing::{message, received};
    use crate::grpc::{self, Code};
    use crate::identity::certs::write_dev_certs;
    use crate::identity::{Credentials, Identity, SpiffeId};

    /// An app on loopback answering every call OK.
    async fn app() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((_, mut respond))) = connection.accept().await {
                        let mut answer = Response::new(());
                        *answer.headers_mut() = grpc::status_headers(Code::Ok, "");
                        respond.send_response(answer, true).ok();
                    }
                });
            }
        });
        addr
    }

    /// The stack of `path` built from `policy` (YAML) for an app at `app`.
    async fn routes(dir: &std::path::Path, app: SocketAddr, policy: &str) -> InboundRoutes {
        let server = SpiffeId::parse("spiffe://td/ns/t/sa/server").unwrap();
        write_dev_certs(dir, "test CA", &[("server".into(), server)]).unwrap();
        let (certs, proto) = (dir.display(), concat!(env!("CARGO_MANIFEST_DIR"), "/proto"));
        let yaml = format!(
            "identity: {{cert: {certs}/server.pem, key: {certs}/server-key.pem, trust_bundle: {certs}/ca.pem}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{proto}']}}\n{policy}\n\
             inbound: {{listen: '127.0.0.1:0', app: '{app}', authorization: {{default: deny, rules: [\
               {{name: readers, methods: ['echo.v1.Echo/*'], callers: ['spiffe://td/ns/t/sa/reader']}}]}}}}\n"
        );
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        let config = crate::config::load(Some(&dir.join("config.yaml")), Vec::new()).unwrap();
        let contracts = Arc::new(Contracts::load(&config.contracts).unwrap());
        let identity = Arc::new(Identity::new(Credentials::read(&config.identity).unwrap()).unwrap());
        let mut registries = Registries::new(identity, Arc::new(Metrics::default()), 1, None);
        let inbound = config.inbound.clone().unwrap();
        let routes = InboundRoutes::build(&config, &inbound, &contracts, &mut registries, None, None).unwrap();
        registries.commit();
        routes
    }

    async fn call(routes: &InboundRoutes, path: &str, caller: &str) -> Result<Code, Code> {
        let (mut request, _peer) = received(path, message(3)).await;
        let id = SpiffeId::parse(&format!("spiffe://td/ns/t/sa/{caller}")).unwrap();
        request.extensions_mut().insert(Caller { id: Some(id), address: "127.0.0.1:1".parse().unwrap() });
        request.extensions_mut().insert(routes.app_for(None).unwrap());
        let stack = routes.route(path).map_err(|e| e.code())?;
        match stack.oneshot(request).await {
            Ok(response) => Ok(grpc::status_in(response.headers()).unwrap_or(Code::Ok)),
            Err(error) => Err(error.code()),
        }
    }

    #[tokio::test]
    async fn a_methods_stack_authorizes_before_it_counts_against_the_rate_limit() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "policy: {methods: {echo.v1.Echo/Unary: {rate_limit: {per_second: 0.001, burst: 1}}}}";
        let routes = routes(dir.path(), app().await, policy).await;
        let unary = "/echo.v1.Echo/Unary";
        for _ in 0..3 {
            assert_eq!(call(&routes, unary, "stranger").await, Err(Code::PermissionDenied));
        }
        assert_eq!(call(&routes, unary, "reader").await, Ok(Code::Ok), "refused calls took no token");
        assert_eq!(call(&routes, unary, "reader").await, Err(Code::ResourceExhausted), "the one token is spent");
        let other = "/echo.v1.Echo/ServerStream";
        assert_eq!(call(&routes, other, "reader").await, Ok(Code::Ok), "another method has no limit");
        assert_eq!(call(&routes, "/echo.v1.Echo/Nope", "reader").await, Err(Code::Unimplemented));
    }
}
