//! Original destinations: a captured gRPC call for a service that no
//! configured upstream routes goes where the app dialled. Each destination
//! address becomes an upstream of its own, made on its first call and kept
//! while calls use it (up to a bound, beyond which idle ones are let go).
//!
//! Where the Kubernetes API is reachable, a destination that is a Service's
//! cluster IP is looked up once (`Cluster::service_at`), and its calls are
//! balanced per call over the Service's ready pods, each pod expected to
//! present its own service account's identity, rather than sent to the
//! virtual IP, where the node would pin each connection to one pod. Calls
//! wait for the lookup, up to [`LOOKUP_WAIT`]; past it, or when the API does
//! not answer, they go to the address as below until it does. The Service is
//! watched while the pod calls it, and let go after [`IDLE`] without calls.
//! A destination that is a pod's own address (a headless Service's, a
//! StatefulSet peer's) is that pod's (`Cluster::pod_at`): its calls go there,
//! and it must present its service account's identity; once the pod is gone
//! from the address, the destination is forgotten and looked up again.
//!
//! Otherwise only the address is known, so any workload of the expected
//! trust domain may answer over mTLS, and networks outside the mesh are
//! called in plaintext. Each call is counted by which of these answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::endpoint::{ConnectSettings, Transport};
use super::opaque::Target;
use super::upstream::{Upstream, UpstreamRoute};
use crate::config::OriginalDestinationConfig;
use crate::discovery::Found;
use crate::discovery::kubernetes::{Cluster, PodRef, Reconnect, ServiceRef};
use crate::identity::{ExpectedPeer, Identity, SpiffeId};
use crate::policy::bulkhead::{Bulkhead, BulkheadFamilies, ConcurrencyPolicy};
use crate::policy::kept::{KeptState, Labelled, NamedFamilies};
use crate::policy::outlier::{OutlierConfig, OutlierFamilies};
use crate::policy::replay::{RetryBudget, RetryBudgetConfig};
use crate::telemetry::Metrics;

/// Destinations kept at once; past it, those no call holds are let go.
const KEPT: usize = 1024;
/// How long calls to a new destination wait for its Service to be looked
/// up before they go to the address meanwhile.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(1);
/// How long a captured connection that is not gRPC waits for the lookup:
/// as long as a TCP connect may take. It has no deadline to keep, and sent
/// as it is to a meshed pod it would fail, where its sidecar takes mTLS only.
pub const OPAQUE_LOOKUP_WAIT: Duration = Duration::from_secs(10);
/// A Service the pod has not called for this long is no longer watched.
pub const IDLE: Duration = Duration::from_secs(60);

/// What defines the original destinations' live state.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OriginalKey {
    pub config: OriginalDestinationConfig,
    pub connect: ConnectSettings,
}

/// The policy new destinations get, from the config in force.
#[derive(Clone)]
pub struct OriginalPolicy {
    pub outliers: OutlierConfig,
    pub retry_budget: RetryBudgetConfig,
    pub concurrency: Option<ConcurrencyPolicy>,
}

pub struct OriginalDestinations {
    key: OriginalKey,
    identity: Arc<Identity>,
    /// Where captured destinations are looked up, if anywhere.
    cluster: Option<Cluster>,
    mtls: Arc<rustls::ClientConfig>,
    /// For opaque TCP to `opaque_mtls_networks`.
    opaque: Arc<rustls::ClientConfig>,
    /// For opaque TCP to a Service's meshed pods, by the identity they present.
    opaque_by_id: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
    metrics: Arc<Metrics>,
    /// Calls counted by who answers them, by [`Peer`].
    calls: [Counter; 5],
    workers: usize,
    policy: Mutex<OriginalPolicy>,
    by_addr: Arc<Mutex<HashMap<SocketAddr, Destination>>>,
}

/// Who answers a destination's calls; its lookup may change it.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Peer {
    /// Its lookup has not answered yet: calls wait for it.
    Lookup,
    /// The pods of the Service at that address.
    Service,
    /// Whoever answers at the address, in the trust domain.
    Address,
    Plaintext,
    /// The pod whose own address it is (a headless Service's, a StatefulSet peer).
    Pod,
}

impl Peer {
    const ALL: [Peer; 5] = [Peer::Lookup, Peer::Service, Peer::Address, Peer::Plaintext, Peer::Pod];

    fn label(self) -> &'static str {
        match self {
            Peer::Lookup => "lookup",
            Peer::Service => "service",
            Peer::Address => "address",
            Peer::Plaintext => "plaintext",
            Peer::Pod => "pod",
        }
    }
}

struct Destination {
    route: Arc<UpstreamRoute>,
    peer: Arc<AtomicU8>,
    /// True once the lookup has answered: the Service or pod and its
    /// endpoints, or nothing there.
    settled: tokio::sync::watch::Receiver<bool>,
    used: Instant,
}

impl Destination {
    /// Whether a call still holds its upstream.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.route.upstream) > 1
    }
}

impl OriginalDestinations {
    pub fn new(
        key: OriginalKey,
        identity: &Arc<Identity>,
        cluster: Option<Cluster>,
        metrics: Arc<Metrics>,
        workers: usize,
        policy: OriginalPolicy,
    ) -> Result<OriginalDestinations, String> {
        let domain = key.config.trust_domain.clone().unwrap_or_else(|| identity.id.trust_domain().to_string());
        let expected = ExpectedPeer::TrustDomain(domain.into());
        let mtls = identity.client_config(expected.clone())?;
        let opaque = identity.opaque_client_config(expected)?;
        let calls = Peer::ALL.map(|peer| metrics.original_destination_calls(peer.label()));
        let (policy, by_addr) = (Mutex::new(policy), Arc::default());
        let identity = identity.clone();
        Ok(OriginalDestinations {
            key,
            identity,
            cluster,
            mtls,
            opaque,
            opaque_by_id: Mutex::default(),
            metrics,
            calls,
            workers,
            policy,
            by_addr,
        })
    }

    /// Applies the policy of a new config: to the destinations kept, and to those to come.
    pub fn set_policy(&self, policy: OriginalPolicy) {
        for destination in self.by_addr.lock().expect("original destinations lock").values() {
            destination.route.upstream.outliers.set_config(policy.outliers.clone());
        }
        *self.policy.lock().expect("original destinations policy lock") = policy;
    }

    /// How to reach `addr` with opaque TCP over mTLS, if its network is meshed.
    fn opaque_tls(&self, addr: SocketAddr) -> Option<Arc<rustls::ClientConfig>> {
        let meshed = self.key.config.opaque_mtls_networks.iter().any(|net| net.contains(&addr.ip()));
        meshed.then(|| self.opaque.clone())
    }

    /// The route to `addr`, made on its first call; the call is counted by who answers it.
    pub fn route(&self, addr: SocketAddr) -> Arc<UpstreamRoute> {
        let mut by_addr = self.by_addr.lock().expect("original destinations lock");
        let destination = self.used(&mut by_addr, addr);
        self.calls[usize::from(destination.peer.load(Ordering::Acquire))].inc();
        destination.route.clone()
    }

    /// The destination at `addr`, made on first use, marked used now.
    fn used<'a>(&self, by_addr: &'a mut HashMap<SocketAddr, Destination>, addr: SocketAddr) -> &'a mut Destination {
        if by_addr.len() >= KEPT && !by_addr.contains_key(&addr) {
            by_addr.retain(|_, destination| destination.in_use());
        }
        let destination = by_addr.entry(addr).or_insert_with(|| self.make(addr));
        destination.used = Instant::now();
        destination
    }

    /// The destinations kept, as `/config` shows them: each address, who
    /// answers there (and the Service, when it is one), and its endpoints.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        let by_addr = self.by_addr.lock().expect("original destinations lock");
        let mut described: Vec<(SocketAddr, serde_json::Value)> = by_addr
            .iter()
            .map(|(addr, destination)| {
                let mut described = destination.route.upstream.describe();
                described["address"] = serde_json::json!(addr.to_string());
                let peer = Peer::ALL[usize::from(destination.peer.load(Ordering::Acquire))];
                described["peer"] = serde_json::json!(peer.label());
                described["service"] = serde_json::json!(destination.route.upstream.service.get().map(|s| &**s));
                described["idle_seconds"] = serde_json::json!(destination.used.elapsed().as_secs());
                (*addr, described)
            })
            .collect();
        described.sort_by_key(|(addr, _)| *addr);
        described.into_iter().map(|(_, described)| described).collect()
    }

    /// The TLS config of opaque TCP to a pod that must present `id`, made once per identity.
    fn opaque_to(&self, id: SpiffeId) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut by_id = self.opaque_by_id.lock().expect("opaque configs lock");
        if let Some(tls) = by_id.get(&id) {
            return Ok(tls.clone());
        }
        let tls = self.identity.opaque_client_config(ExpectedPeer::Id(id.clone()))?;
        by_id.insert(id, tls.clone());
        Ok(tls)
    }

    /// Where opaque TCP the app sent to `addr` goes, in the order to try: a
    /// Service's ready pods in random order, one per connection as the node
    /// would pick, each over mTLS checking its pod's identity when it has a
    /// sidecar; else the address, over mTLS if its network is meshed.
    pub async fn opaque_targets(&self, addr: SocketAddr) -> Vec<Target> {
        let as_addressed = || vec![Target { addr, tls: self.opaque_tls(addr) }];
        let plaintext = self.key.config.plaintext_networks.iter().any(|net| net.contains(&addr.ip()));
        if self.cluster.is_none() || plaintext {
            return as_addressed();
        }
        let (upstream, peer, mut settled) = {
            let mut by_addr = self.by_addr.lock().expect("original destinations lock");
            let destination = self.used(&mut by_addr, addr);
            (destination.route.upstream.clone(), destination.peer.clone(), destination.settled.clone())
        };
        let _ = tokio::time::timeout(OPAQUE_LOOKUP_WAIT, settled.wait_for(|settled| *settled)).await;
        upstream.await_endpoints().await;
        // Read before the endpoints: once it says Service or pod, they are its.
        let peer = peer.load(Ordering::Acquire);
        if peer != Peer::Service as u8 && peer != Peer::Pod as u8 {
            return as_addressed();
        }
        let mut targets: Vec<Target> = upstream
            .endpoints()
            .into_iter()
            .filter_map(|(addr, expected)| match expected {
                None => Some(Target { addr, tls: None }),
                Some(id) => match self.opaque_to(id) {
                    Ok(tls) => Some(Target { addr, tls: Some(tls) }),
                    Err(error) => {
                        tracing::warn!(%addr, %error, "opaque TCP cannot go to this endpoint");
                        None
                    }
                },
            })
            .collect();
        fastrand::shuffle(&mut targets);
        targets
    }

    fn make(&self, addr: SocketAddr) -> Destination {
        let policy = self.policy.lock().expect("original destinations policy lock").clone();
        let plaintext = self.key.config.plaintext_networks.iter().any(|net| net.contains(&addr.ip()));
        let name: Arc<str> = match plaintext {
            true => format!("original destination {addr} (plaintext)").into(),
            false => format!("original destination {addr}").into(),
        };
        let outliers = (policy.outliers, self.metrics.families::<OutlierFamilies>().handles("original destinations"));
        let (connect, workers) = (self.key.connect, self.workers);
        let (upstream, peer) = match (plaintext, &self.cluster) {
            (true, _) => {
                (Upstream::new(name.clone(), None, Transport::Plaintext, connect, outliers, workers), Peer::Plaintext)
            }
            (false, None) => {
                let transport = Transport::Mtls(self.mtls.clone());
                (Upstream::new(name.clone(), None, transport, connect, outliers, workers), Peer::Address)
            }
            (false, Some(_)) => {
                let transport = Transport::Mtls(self.mtls.clone());
                let identity = &self.identity;
                (Upstream::of_pods(name.clone(), transport, identity, connect, outliers, workers), Peer::Lookup)
            }
        };
        let peer = Arc::new(AtomicU8::new(peer as u8));
        let (settle, settled) = tokio::sync::watch::channel(false);
        match &self.cluster {
            Some(cluster) if !plaintext => {
                let lookup = Lookup {
                    cluster: cluster.clone(),
                    addr,
                    upstream: Arc::downgrade(&upstream),
                    peer: peer.clone(),
                    settle,
                    metrics: self.metrics.clone(),
                    destinations: Arc::downgrade(&self.by_addr),
                };
                tokio::spawn(lookup.run());
            }
            _ => {
                upstream.set_endpoints(&[Found::from(addr)]);
                let _ = settle.send(true);
            }
        }
        // Each destination has its own places, and all count under one label:
        // a label per address would grow without bound as destinations come and go.
        let bulkhead = policy.concurrency.as_ref().map(|limits| {
            let name = format!("{name} (config policy.upstream_concurrency)");
            let label = "original destinations (config policy.upstream_concurrency)";
            let families = self.metrics.families::<BulkheadFamilies>();
            Arc::new(Bulkhead::new(limits, Labelled::counted_as(families, name.into(), label)))
        });
        let budget = RetryBudget::new(&policy.retry_budget);
        upstream.keep_retry_budget(policy.retry_budget, budget.clone());
        let route = Arc::new(UpstreamRoute { upstream, bulkhead, budget });
        Destination { route, peer, settled, used: Instant::now() }
    }
}

/// What the Kubernetes API says is at a captured destination.
enum Owner {
    Service(ServiceRef),
    Pod(PodRef),
}

/// Finds the Service or pod at a captured destination and keeps its
/// upstream's endpoints its own, until the upstream is gone or idle.
struct Lookup {
    cluster: Cluster,
    addr: SocketAddr,
    upstream: Weak<Upstream>,
    peer: Arc<AtomicU8>,
    /// Told once the API has answered what is at the address.
    settle: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
    destinations: Weak<Mutex<HashMap<SocketAddr, Destination>>>,
}

impl Lookup {
    async fn run(self) {
        let Some(dropped) = self.upstream.upgrade().map(|upstream| upstream.dropped()) else { return };
        tokio::pin!(dropped);
        tokio::select! {
            _ = &mut dropped => {}
            _ = self.follow() => {}
        }
    }

    async fn follow(&self) {
        let addr = self.addr;
        let trouble = self.metrics.discovery.trouble.slot(format!("the lookup of captured destination {addr}"));
        let mut retries = Reconnect::default();
        // Calls wait this long in all for the Service and its first endpoints.
        let waited = tokio::time::sleep(LOOKUP_WAIT);
        tokio::pin!(waited);
        let owner = loop {
            let found = self.owner();
            tokio::pin!(found);
            let found = tokio::select! {
                found = &mut found => found,
                _ = &mut waited, if self.looking() => {
                    self.waited_long_enough();
                    found.await
                }
            };
            match found {
                Ok(Some(owner)) => {
                    trouble.answered();
                    break owner;
                }
                Ok(None) => {
                    self.metrics.service_lookup("no_service");
                    tracing::info!(%addr, "no Kubernetes Service or pod the sidecar may read has this address: \
                        calls go to the address");
                    self.to_address();
                    let _ = self.settle.send(true);
                    return;
                }
                Err(error) => {
                    trouble.failed(&error);
                    self.metrics.service_lookup("failed");
                    tracing::warn!(%addr, %error, "Kubernetes lookup failed: calls go to the address until it answers");
                    self.to_address();
                    tokio::time::sleep(retries.next().unwrap_or(IDLE)).await;
                }
            }
        };
        // The watch's first lists give the first endpoints: nothing is read twice.
        let (mut watched, peer) = match &owner {
            Owner::Service(service) => {
                self.metrics.service_lookup("service");
                tracing::info!(%addr, %service, "captured destination is a Kubernetes Service: its calls are \
                    balanced over its ready pods");
                (self.cluster.watch(service.clone()), Peer::Service)
            }
            Owner::Pod(pod) => {
                self.metrics.service_lookup("pod");
                tracing::info!(%addr, %pod, "captured destination is a pod's address: its calls go to that pod, \
                    which must present its service account's identity");
                (self.cluster.watch_pod(pod.clone(), addr), Peer::Pod)
            }
        };
        loop {
            tokio::select! {
                changed = watched.changed() => match changed {
                    Ok(()) => break,
                    Err(_) => return self.forget(),
                },
                _ = &mut waited, if self.looking() => self.waited_long_enough(),
            }
        }
        let Some(upstream) = self.upstream.upgrade() else { return };
        upstream.set_endpoints(&watched.borrow_and_update());
        if let Owner::Service(service) = &owner {
            let _ = upstream.service.set(service.to_string().into());
        }
        self.peer.store(peer as u8, Ordering::Release);
        let _ = self.settle.send(true);
        drop(upstream);
        let mut idle_check = tokio::time::interval(IDLE / 2);
        loop {
            tokio::select! {
                changed = watched.changed() => {
                    let Some(upstream) = self.upstream.upgrade() else { return };
                    if changed.is_err() {
                        // The pod is gone: the next call looks the address up again.
                        return self.forget();
                    }
                    upstream.set_endpoints(&watched.borrow_and_update());
                }
                _ = idle_check.tick() => {
                    if self.let_go_if_idle() {
                        return;
                    }
                }
            }
        }
    }

    /// What the API says is at the address: a Service's cluster IP, else a pod's own address.
    async fn owner(&self) -> Result<Option<Owner>, String> {
        if let Some(service) = self.cluster.service_at(self.addr).await? {
            return Ok(Some(Owner::Service(service)));
        }
        Ok(self.cluster.pod_at(self.addr).await?.map(Owner::Pod))
    }

    /// Whether calls still wait for the lookup.
    fn looking(&self) -> bool {
        self.peer.load(Ordering::Acquire) == Peer::Lookup as u8
    }

    fn waited_long_enough(&self) {
        let (addr, wait) = (self.addr, LOOKUP_WAIT);
        tracing::warn!(%addr, ?wait, "the Kubernetes API has not said what is at this captured destination yet: its \
            calls go to the address meanwhile");
        self.to_address();
    }

    /// Sends calls to the address itself, if they do not go to a Service's pods already.
    fn to_address(&self) {
        let Some(upstream) = self.upstream.upgrade() else { return };
        let looking = Peer::Lookup as u8;
        if self.peer.compare_exchange(looking, Peer::Address as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            upstream.set_endpoints(&[Found::from(self.addr)]);
        }
    }

    /// Drops the destination, and so its watch, once no call has used it for [`IDLE`].
    fn let_go_if_idle(&self) -> bool {
        let idle = |destination: &Destination| destination.used.elapsed() >= IDLE && !destination.in_use();
        let let_go = self.remove_if(idle);
        if let_go {
            tracing::debug!(addr = %self.addr, "no calls for {IDLE:?}: its Service or pod is no longer watched");
        }
        let_go
    }

    /// Drops the destination, whose pod is gone: calls that hold it get no
    /// endpoint, and the next call makes a new one, looked up afresh.
    fn forget(&self) {
        if let Some(upstream) = self.upstream.upgrade() {
            upstream.set_endpoints(&[]);
        }
        self.remove_if(|_| true);
    }

    /// Removes this lookup's destination if `now` says so; whether it is gone.
    fn remove_if(&self, now: impl FnOnce(&Destination) -> bool) -> bool {
        let Some(destinations) = self.destinations.upgrade() else { return true };
        let mut destinations = destinations.lock().expect("original destinations lock");
        let ours = |d: &Destination| std::ptr::eq(Arc::as_ptr(&d.route.upstream), self.upstream.as_ptr());
        let Some(destination) = destinations.get(&self.addr).filter(|d| ours(d)) else { return true };
        let gone = now(destination);
        if gone {
            destinations.remove(&self.addr);
        }
        gone
    }
}
