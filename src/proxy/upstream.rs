//! An upstream: the peers serving a set of gRPC services, all expected to
//! present one SPIFFE ID, with one pooled connection per endpoint and
//! worker, a balancer over them, outlier detection for each, active health
//! checks where configured, and a retry budget for all. It is live state:
//! routes built from a new config find the same upstream, with its
//! connections and its endpoints' health, as long as its endpoints and
//! identity stay the same.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Request, Response};
use tokio::sync::watch;
use tokio::time::Instant;

use super::balance::{self, Member, Report};
use super::endpoint::{ConnectSettings, Endpoint, Transport};
use super::health_check;
use crate::call::{
    Answered, ConnectError, Direction, ENDPOINT_FAILURE, ProxyError, RequestBody, ResponseBody, Spread, Target,
};
use crate::config::UpstreamConfig;
use crate::config::health_checks::HealthCheckConfig;
use crate::discovery::kubernetes::Cluster;
use crate::discovery::{self, EndpointSpec, Found, PodIdentity, Sidecar, Workload};
use crate::grpc::{self, Code};
use crate::identity::{ExpectedPeer, Identity, SpiffeId};
use crate::policy::bulkhead::Bulkhead;
use crate::policy::deadline::Deadline;
use crate::policy::outlier::{AllEjected, Outcome, OutlierConfig, OutlierMetrics, Outliers};
use crate::policy::replay::{RetryBudget, RetryBudgetConfig};
use crate::telemetry::Logged;
use crate::telemetry::trace::CallSpan;

/// Endpoints a call may try when connecting fails, before it gives up.
const CONNECT_TRIES: usize = 3;
/// How long a call waits for an upstream's endpoints to be found the first
/// time, before it fails for want of them.
const FIRST_ENDPOINTS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Endpoints named in the log line of a change; the rest are counted.
const LOGGED_ENDPOINTS: usize = 20;

/// What an endpoint found asks of its member.
struct Wanted<'a> {
    addr: SocketAddr,
    /// The identity it must present, when it is its own rather than the upstream's.
    expected: Option<SpiffeId>,
    transport: Arc<Transport>,
    /// Its Kubernetes pod's name, when known.
    pod: Option<&'a str>,
    /// Topology hints prefer it.
    in_zone: bool,
}

impl Wanted<'_> {
    /// What makes a kept member the same as this one.
    fn key(&self) -> (SocketAddr, Option<&SpiffeId>, Option<&str>) {
        (self.addr, self.expected.as_ref(), self.pod)
    }
}

fn member_key(member: &Member) -> (SocketAddr, Option<&SpiffeId>, Option<&str>) {
    (member.addr(), member.expected.as_ref(), member.pod.as_deref())
}

pub struct Upstream {
    /// A label for messages and metrics: the endpoints as configured.
    pub name: Arc<str>,
    /// The SPIFFE ID every endpoint presents, when one workload serves them all.
    pub identity: Option<SpiffeId>,
    /// The Kubernetes Service its endpoints were found to be, once known
    /// (an original destination's), which traces and access logs name.
    pub service: std::sync::OnceLock<Arc<str>>,
    pub outliers: Arc<Outliers>,
    /// What retries to this upstream may add to its calls, and its config.
    retry_budget: Mutex<(RetryBudgetConfig, RetryBudget)>,
    transport: Arc<Transport>,
    connect: ConnectSettings,
    /// Workers of the sidecar, each with its own connection to every endpoint.
    workers: usize,
    members: ArcSwap<Vec<Arc<Member>>>,
    /// The members topology hints give this pod's zone, when any: calls go
    /// to them while one is admitted, and spill over to the rest otherwise.
    local: ArcSwapOption<Vec<Arc<Member>>>,
    /// The active health checks in force, which the checking task follows.
    health_check: watch::Sender<Option<HealthCheckConfig>>,
    /// When the upstream names no identity for all: each endpoint's, from
    /// its pod's service account.
    accounts: Option<Accounts>,
    /// Whether its endpoints have been found once; until then its calls wait
    /// for them. Its receivers also learn when the upstream is dropped.
    found: watch::Sender<bool>,
    identity_mismatches: prometheus_client::metrics::counter::Counter,
}

/// Each endpoint's expected identity, from its pod's service account in
/// this workload's trust domain, and a TLS config per identity; pods
/// without a sidecar are called in plaintext.
struct Accounts {
    identity: Arc<Identity>,
    transports: Mutex<HashMap<SpiffeId, Arc<Transport>>>,
    plaintext: Arc<Transport>,
}

impl Accounts {
    fn new(identity: Arc<Identity>) -> Accounts {
        Accounts { identity, transports: Mutex::default(), plaintext: Arc::new(Transport::Plaintext) }
    }

    /// What an endpoint must present, and the transport that checks it.
    fn transport(&self, identity: &PodIdentity) -> Result<(SpiffeId, Arc<Transport>), String> {
        let id = match identity {
            PodIdentity::Account(account) => {
                let (domain, namespace, name) = (self.identity.id.trust_domain(), &account.namespace, &account.name);
                SpiffeId::parse(&format!("spiffe://{domain}/ns/{namespace}/sa/{name}"))?
            }
            PodIdentity::Named(id) => SpiffeId::parse(id)?,
        };
        let mut transports = self.transports.lock().expect("transports lock");
        if let Some(transport) = transports.get(&id) {
            return Ok((id, transport.clone()));
        }
        let transport = Arc::new(Transport::Mtls(self.identity.client_config(ExpectedPeer::Id(id.clone()))?));
        transports.insert(id.clone(), transport.clone());
        Ok((id, transport))
    }
}

/// An upstream as routes use it: with its bulkhead and the retry budget of
/// the config in force.
pub struct UpstreamRoute {
    pub upstream: Arc<Upstream>,
    pub bulkhead: Option<Arc<Bulkhead>>,
    pub budget: RetryBudget,
}

impl Upstream {
    /// Resolves the endpoints once; the returned start, once run, keeps DNS
    /// names re-resolving and the health checks running in the background
    /// while the upstream lives.
    pub async fn build(
        config: &UpstreamConfig,
        identity: &Arc<Identity>,
        connect: ConnectSettings,
        outliers: (OutlierConfig, OutlierMetrics),
        workers: usize,
        cluster: Option<&Cluster>,
    ) -> Result<(Arc<Upstream>, Box<dyn FnOnce() + Send>), String> {
        let specs: Vec<EndpointSpec> =
            config.endpoints.iter().map(|e| discovery::parse_endpoint(e)).collect::<Result<_, _>>()?;
        if cluster.is_none()
            && let Some(EndpointSpec::Kubernetes(service)) =
                specs.iter().find(|spec| matches!(spec, EndpointSpec::Kubernetes(_)))
        {
            return Err(format!(
                "{service}: no Kubernetes API server was found (the pod's service account, KUBECONFIG or \
                 kubernetes.kubeconfig), or kubernetes.discovery is off"
            ));
        }
        // Without an identity for all, each endpoint must present its own
        // pod's service account (validation allows that for k8s:// only).
        let expected = match &config.identity {
            Some(id) => ExpectedPeer::Id(id.clone()),
            None => ExpectedPeer::TrustDomain(identity.id.trust_domain().to_string().into()),
        };
        let transport = Transport::Mtls(identity.client_config(expected)?);
        let accounts = config.identity.is_none().then(|| Accounts::new(identity.clone()));
        let name = Upstream::name_of(config);
        let upstream =
            Upstream::with_accounts(name, config.identity.clone(), transport, connect, outliers, workers, accounts);
        let known = discovery::resolve(&specs).await;
        let watched = specs.iter().any(|spec| matches!(spec, EndpointSpec::Kubernetes(_)));
        match known.is_empty() && watched {
            // Its Services' watches start with its version: calls wait for their first lists.
            true => upstream.await_discovery(),
            false => upstream.set_endpoints(&known),
        }
        upstream.set_health_check(config.health_check.clone());
        let (weak, resolve_interval, cluster) = (Arc::downgrade(&upstream), config.resolve_interval, cluster.cloned());
        let start = move || {
            let Some(upstream) = weak.upgrade() else { return };
            let checked = weak.clone();
            let members: health_check::Members = Box::new(move || {
                let upstream = checked.upgrade()?;
                Some((upstream.members.load_full(), upstream.outliers.clone()))
            });
            tokio::spawn(health_check::run(upstream.name.clone(), members, upstream.health_check.subscribe()));
            let dropped = upstream.dropped();
            discovery::spawn_refresh(specs, resolve_interval, cluster, dropped, move |addrs| {
                if let Some(upstream) = weak.upgrade() {
                    upstream.set_endpoints(addrs);
                }
            });
        };
        Ok((upstream, Box::new(start)))
    }

    /// An upstream whose endpoints are set by its owner.
    pub fn new(
        name: Arc<str>,
        identity: Option<SpiffeId>,
        transport: Transport,
        connect: ConnectSettings,
        outliers: (OutlierConfig, OutlierMetrics),
        workers: usize,
    ) -> Arc<Upstream> {
        Upstream::with_accounts(name, identity, transport, connect, outliers, workers, None)
    }

    /// An upstream whose endpoints its owner finds later, each expected to
    /// present its own pod's service account (`Workload::Pod`; a pod without
    /// a sidecar is called in plaintext), others what
    /// `transport` checks. Until the first are found, its calls wait.
    pub fn of_pods(
        name: Arc<str>,
        transport: Transport,
        identity: &Arc<Identity>,
        connect: ConnectSettings,
        outliers: (OutlierConfig, OutlierMetrics),
        workers: usize,
    ) -> Arc<Upstream> {
        let accounts = Some(Accounts::new(identity.clone()));
        let upstream = Upstream::with_accounts(name, None, transport, connect, outliers, workers, accounts);
        upstream.await_discovery();
        upstream
    }

    /// Marks its endpoints as not found yet: calls wait for the first set.
    fn await_discovery(&self) {
        self.found.send_replace(false);
    }

    /// Waits until its endpoints have been found once, up to [`FIRST_ENDPOINTS_WAIT`].
    pub async fn await_endpoints(&self) {
        let mut found = self.found.subscribe();
        let _ = tokio::time::timeout(FIRST_ENDPOINTS_WAIT, found.wait_for(|found| *found)).await;
    }

    /// Its endpoints now, each with the identity it must present when it has one of its own.
    pub fn endpoints(&self) -> Vec<(SocketAddr, Option<SpiffeId>)> {
        self.members.load().iter().map(|member| (member.addr(), member.expected.clone())).collect()
    }

    /// The upstream as `/config` shows it: its endpoints, each with the
    /// identity it must present, whether outlier detection admits it, and
    /// what its health checks say.
    pub fn describe(&self) -> serde_json::Value {
        use crate::policy::outlier::State;
        let local = self.local.load_full();
        let endpoints: Vec<serde_json::Value> = self
            .members
            .load()
            .iter()
            .map(|member| {
                let outlier = match member.ejection.state() {
                    State::Admitted => "admitted",
                    State::Ejected { .. } => "ejected",
                    State::HalfOpen { .. } => "probing",
                };
                serde_json::json!({
                    "address": member.addr().to_string(),
                    "pod": member.pod.as_deref(),
                    "identity": member.expected.as_ref().or(self.identity.as_ref()).map(|id| id.as_str()),
                    "mtls": member.endpoint.is_mtls(),
                    "outlier": outlier,
                    "serving": member.serving(),
                    "in_zone": local.as_ref().is_some_and(|local| local.iter().any(|m| Arc::ptr_eq(m, member))),
                })
            })
            .collect();
        serde_json::json!({ "name": &*self.name, "endpoints": endpoints })
    }

    /// Resolves once the upstream is dropped: what finds its endpoints ends with it.
    pub fn dropped(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut found = self.found.subscribe();
        async move { while found.changed().await.is_ok() {} }
    }

    fn with_accounts(
        name: Arc<str>,
        identity: Option<SpiffeId>,
        transport: Transport,
        connect: ConnectSettings,
        outliers: (OutlierConfig, OutlierMetrics),
        workers: usize,
        accounts: Option<Accounts>,
    ) -> Arc<Upstream> {
        let budget = RetryBudgetConfig::default();
        let identity_mismatches = outliers.1.identity_mismatches.clone();
        Arc::new(Upstream {
            name,
            identity,
            service: std::sync::OnceLock::new(),
            outliers: Arc::new(Outliers::new(outliers.0, outliers.1)),
            retry_budget: Mutex::new((budget.clone(), RetryBudget::new(&budget))),
            transport: Arc::new(transport),
            connect,
            workers,
            members: ArcSwap::from_pointee(Vec::new()),
            local: ArcSwapOption::empty(),
            health_check: watch::Sender::new(None),
            accounts,
            found: watch::Sender::new(true),
            identity_mismatches,
        })
    }

    /// Applies `config` to the health checks from their next round.
    pub fn set_health_check(&self, config: Option<HealthCheckConfig>) {
        self.health_check.send_if_modified(|current| {
            let changed = *current != config;
            *current = config;
            changed
        });
    }

    /// How an upstream is named in messages and metrics.
    pub fn name_of(config: &UpstreamConfig) -> Arc<str> {
        config.endpoints.join(",").into()
    }

    /// The retry budget for `config`: the one in use while the config stays
    /// the same (`false`), or a new one (`true`), not in use until kept.
    pub fn retry_budget(&self, config: &RetryBudgetConfig) -> (RetryBudget, bool) {
        let current = self.retry_budget.lock().expect("retry budget lock");
        match current.0 == *config {
            true => (current.1.clone(), false),
            false => (RetryBudget::new(config), true),
        }
    }

    /// Puts `budget`, made for `config`, in use.
    pub fn keep_retry_budget(&self, config: RetryBudgetConfig, budget: RetryBudget) {
        *self.retry_budget.lock().expect("retry budget lock") = (config, budget);
    }

    /// Replaces the endpoint set, keeping the connections (and health) of
    /// endpoints that stay: the same address, expected to be the same workload.
    /// An endpoint whose identity cannot be known yet is left out.
    pub fn set_endpoints(&self, found: &[Found]) {
        self.found.send_if_modified(|once| !std::mem::replace(once, true));
        let wanted: Vec<Wanted> = found.iter().filter_map(|found| self.member_for(found)).collect();
        let in_zone: HashSet<SocketAddr> = wanted.iter().filter(|wanted| wanted.in_zone).map(|w| w.addr).collect();
        let current = self.members.load();
        let local_now: HashSet<SocketAddr> =
            self.local.load().iter().flat_map(|local| local.iter().map(|m| m.addr())).collect();
        if current.len() == wanted.len()
            && current.iter().zip(&wanted).all(|(member, wanted)| wanted.key() == member_key(member))
            && local_now == in_zone
        {
            return;
        }
        // By key: a Service may have thousands of endpoints.
        let kept: HashMap<_, &Arc<Member>> = current.iter().map(|m| (member_key(m), m)).collect();
        let members = wanted
            .into_iter()
            .map(|wanted| match kept.get(&wanted.key()) {
                Some(member) => Arc::clone(member),
                None => {
                    let Wanted { addr, expected, transport, pod, .. } = wanted;
                    let target = Target::Upstream { name: self.name.clone(), addr };
                    let endpoint = Endpoint::new(addr, target, transport, self.connect, self.workers);
                    Arc::new(Member::expecting(endpoint, expected, pod.map(Arc::from)))
                }
            })
            .collect::<Vec<_>>();
        if tracing::enabled!(tracing::Level::INFO) {
            // The first endpoints by name; a line per change must stay a line.
            let mut addrs: Vec<String> = members
                .iter()
                .take(LOGGED_ENDPOINTS)
                .map(|m| match &m.expected {
                    Some(id) => format!("{} ({id})", m.addr()),
                    None => m.addr().to_string(),
                })
                .collect();
            if members.len() > LOGGED_ENDPOINTS {
                addrs.push(format!("and {} more", members.len() - LOGGED_ENDPOINTS));
            }
            let in_zone = in_zone.len();
            tracing::info!(upstream = %self.name, count = members.len(), endpoints = ?addrs, in_zone, "endpoints updated");
        }
        self.outliers.set_endpoint_count(members.len());
        let local: Vec<Arc<Member>> = members.iter().filter(|m| in_zone.contains(&m.addr())).cloned().collect();
        self.local.store((!local.is_empty()).then(|| Arc::new(local)));
        self.members.store(Arc::new(members));
    }

    /// The member an endpoint found makes: its address, the identity it must
    /// present, and how to reach it; `None` when it cannot be called yet.
    fn member_for<'a>(&self, found: &'a Found) -> Option<Wanted<'a>> {
        let pod = match &found.workload {
            Workload::Pod { name, .. } => Some(name.as_str()),
            _ => None,
        };
        let in_zone = found.in_zone;
        let wanted = |addr, expected, transport| Some(Wanted { addr, expected, transport, pod, in_zone });
        match (&self.accounts, &found.workload) {
            (Some(accounts), Workload::Pod { sidecar: Sidecar::None, .. }) => {
                wanted(found.addr, None, accounts.plaintext.clone())
            }
            (Some(accounts), Workload::Pod { identity, sidecar, .. }) => match accounts.transport(identity) {
                Ok((id, transport)) => {
                    let addr = match sidecar {
                        Sidecar::Listening(port) => SocketAddr::new(found.addr.ip(), *port),
                        _ => found.addr,
                    };
                    wanted(addr, Some(id), transport)
                }
                Err(error) => {
                    tracing::warn!(upstream = %self.name, addr = %found.addr, %error, "endpoint left out");
                    None
                }
            },
            (Some(_), Workload::PodNotKnown) => {
                let addr = found.addr;
                tracing::debug!(upstream = %self.name, %addr, "endpoint left out until its pod is known");
                None
            }
            _ => wanted(found.addr, None, self.transport.clone()),
        }
    }

    /// Counts an endpoint that presented another identity than it must, and
    /// logs it once per endpoint: a wrong workload, or a certificate that
    /// follows another naming scheme.
    fn note_mismatch(&self, member: &Member, error: &ProxyError) {
        let ProxyError::Connect { error, .. } = error else { return };
        let ConnectError::IdentityMismatch(mismatch) = &**error else { return };
        self.identity_mismatches.inc();
        if !member.mismatch_logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(upstream = %self.name, addr = %member.addr(), %mismatch, "endpoint presented another identity: it gets no call");
        }
    }

    /// Sends a call to the endpoint the balancer chooses. One that cannot be
    /// connected to is passed over for another: the request has not left the
    /// sidecar, so any call may go elsewhere.
    /// `failure_codes` are the statuses the call's method counts against the
    /// endpoint that answers them, if it chose any.
    pub async fn send(
        self: Arc<Self>,
        request: Request<RequestBody>,
        failure_codes: Option<Arc<[Code]>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let mut members = self.members.load_full();
        if members.is_empty() && !*self.found.borrow() {
            self.await_endpoints().await;
            members = self.members.load_full();
        }
        if members.is_empty() {
            return Err(ProxyError::NoEndpoints { upstream: self.name.clone() });
        }
        let local = self.local.load_full();
        // Only a call's span and access log line read which endpoint answered.
        let traced = request.extensions().get::<CallSpan>().is_some() || request.extensions().get::<Logged>().is_some();
        let deadline = request.extensions().get::<Deadline>().map(|deadline| deadline.0);
        let spread = request.extensions().get::<Spread>().cloned();
        let mut refused = None;
        // Endpoints that could not be connected to; empty (and unallocated) on the usual path.
        let mut unreachable = Vec::new();
        for _ in 0..members.len().min(CONNECT_TRIES) {
            let now = Instant::now();
            let choose = |passed_over: &[SocketAddr]| {
                let pick = |set: &[Arc<Member>]| balance::choose(set, passed_over, now, &self.outliers);
                let local = local.as_deref().filter(|local| balance::any_admitted(local, passed_over, now));
                local.and_then(|local| pick(local)).or_else(|| pick(&members))
            };
            // A hedge goes to an endpoint its call has not used yet, if one is left.
            let chosen = match &spread {
                None => choose(&unreachable),
                Some(spread) => choose(&[&unreachable[..], &spread.used()].concat()).or_else(|| choose(&unreachable)),
            };
            let Some((member, admission)) = chosen else {
                break;
            };
            if let Some(spread) = &spread {
                spread.use_one(member.addr());
            }
            let outliers = (self.outliers.clone(), failure_codes.clone());
            let mut report = Report::start(member.clone(), outliers, admission, deadline);
            let endpoint = &member.endpoint;
            let mut sender = match endpoint.ready().await {
                Ok(sender) => {
                    report.connected();
                    sender
                }
                Err(error) => {
                    report.finish(Outcome::Unreachable);
                    unreachable.push(endpoint.addr);
                    self.note_mismatch(&member, &error);
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
                    report.finish(Outcome::Unreachable);
                    Err(error)
                }
                Ok(response) => {
                    report.responded();
                    let trailers_only = grpc::status_in(response.headers());
                    let mut response = response.map(|body| ResponseBody::streamed(body, Direction::Outbound));
                    if traced {
                        response.extensions_mut().insert(Answered { addr: endpoint.addr, pod: member.pod.clone() });
                    }
                    if trailers_only.is_some()
                        && let Some(Some(wait)) = grpc::retry_pushback(response.headers())
                    {
                        member.push_back(wait);
                    }
                    match trailers_only {
                        // The peer's sidecar could not reach its app.
                        Some(_) if response.headers().contains_key(ENDPOINT_FAILURE) => {
                            report.finish(Outcome::Unreachable)
                        }
                        Some(code) => report.finish_with_status(code),
                        None => response.body_mut().on_end(Box::new(report)),
                    }
                    Ok(response)
                }
            };
        }
        Err(refused.unwrap_or_else(|| AllEjected { upstream: self.name.clone(), endpoints: members.len() }.into()))
    }
}
