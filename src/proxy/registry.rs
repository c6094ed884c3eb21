//! Live state, kept from one version of the routes to the next: upstreams
//! (their endpoints, connections, outlier state and retry budget), the app's
//! connections, and the state policies keep (bulkheads' places, breakers,
//! token buckets: any [`KeptState`], by its typed key). Routes built from a
//! new config ask for each by what defines it; what they ask for again is
//! handed over, and what no route asks for any more is dropped once the last
//! call that holds it ends.
//!
//! Building routes changes nothing running: new settings for what is kept,
//! and the background tasks of new upstreams, are staged, and applied by
//! [`Registries::commit`] once the version is accepted. A refused version is
//! undone by [`Registries::abort`], as if it had never been built.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::endpoint::{ConnectSettings, Endpoint, Transport};
use super::original::{OriginalDestinations, OriginalKey, OriginalPolicy};
use super::upstream::Upstream;
use crate::call::Target;
use crate::config::UpstreamConfig;
use crate::discovery::kubernetes::Cluster;
use crate::identity::{Identity, SpiffeId};
use crate::policy::kept::{KeptState, Labelled, NamedFamilies, StateKey};
use crate::policy::outlier::{OutlierConfig, OutlierFamilies};
use crate::policy::replay::{RetryBudget, RetryBudgetConfig};
use crate::telemetry::{Metrics, Taps};

/// Values by key, with the keys the routes being built have asked for and
/// those they added.
struct Kept<K, V> {
    values: HashMap<K, V>,
    asked: HashSet<K>,
    added: HashSet<K>,
}

impl<K: Clone + Eq + Hash, V: Clone> Kept<K, V> {
    fn get(&mut self, key: &K) -> Option<V> {
        let value = self.values.get(key)?.clone();
        self.asked.insert(key.clone());
        Some(value)
    }

    fn insert(&mut self, key: K, value: V) -> V {
        self.asked.insert(key.clone());
        self.added.insert(key.clone());
        self.values.insert(key, value.clone());
        value
    }

    fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> V {
        match self.get(&key) {
            Some(value) => value,
            None => self.insert(key, make()),
        }
    }

    /// Forgets what was not asked for since the last time.
    fn prune(&mut self) {
        let asked = std::mem::take(&mut self.asked);
        self.values.retain(|key, _| asked.contains(key));
        self.added.clear();
    }

    /// Forgets what was added and asked for since the last time, keeping the rest as it was.
    fn abort(&mut self) {
        for key in self.added.drain() {
            self.values.remove(&key);
        }
        self.asked.clear();
    }
}

impl<K, V> Default for Kept<K, V> {
    fn default() -> Self {
        Kept { values: HashMap::new(), asked: HashSet::new(), added: HashSet::new() }
    }
}

/// Kept values of one type, whatever the type: what a reload's end asks of them.
trait AnyKept: Send {
    fn prune(&mut self);
    fn abort(&mut self);
    fn as_any(&mut self) -> &mut dyn Any;
}

impl<K: Clone + Eq + Hash + Send + 'static, V: Clone + Send + 'static> AnyKept for Kept<K, V> {
    fn prune(&mut self) {
        Kept::prune(self);
    }

    fn abort(&mut self) {
        Kept::abort(self);
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

/// A change to live state that waits for its version to be accepted.
type Staged = Box<dyn FnOnce() + Send>;

/// What defines an upstream's live state; the services routed to it do not.
#[derive(Clone, PartialEq, Eq, Hash)]
struct UpstreamKey {
    endpoints: Vec<String>,
    identity: Option<SpiffeId>,
    resolve_interval: Duration,
    connect: ConnectSettings,
}

pub struct Registries {
    pub identity: Arc<Identity>,
    pub metrics: Arc<Metrics>,
    /// The taps running, which every stack offers its calls to.
    pub taps: Arc<Taps>,
    /// The Kubernetes API server, where one was found at start.
    pub cluster: Option<Cluster>,
    workers: usize,
    upstreams: Kept<UpstreamKey, Arc<Upstream>>,
    apps: Kept<(SocketAddr, ConnectSettings), Arc<Endpoint>>,
    app_ports: Kept<ConnectSettings, Arc<AppPorts>>,
    /// The state of each policy, by its type.
    policies: HashMap<TypeId, Box<dyn AnyKept>>,
    originals: Kept<OriginalKey, Arc<OriginalDestinations>>,
    staged: Vec<Staged>,
}

impl Registries {
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>, workers: usize, cluster: Option<Cluster>) -> Registries {
        Registries {
            taps: Taps::new(identity.id.clone(), &metrics),
            identity,
            metrics,
            cluster,
            workers,
            upstreams: Kept::default(),
            apps: Kept::default(),
            app_ports: Kept::default(),
            policies: HashMap::new(),
            originals: Kept::default(),
            staged: Vec::new(),
        }
    }

    /// The upstream for `config`, with `outliers` as its outlier detection from now on.
    pub async fn upstream(
        &mut self,
        config: &UpstreamConfig,
        connect: ConnectSettings,
        outliers: &OutlierConfig,
    ) -> Result<Arc<Upstream>, String> {
        let key = UpstreamKey {
            endpoints: config.endpoints.clone(),
            identity: config.identity.clone(),
            resolve_interval: config.resolve_interval,
            connect,
        };
        if let Some(upstream) = self.upstreams.get(&key) {
            let (kept, outliers, health_check) = (upstream.clone(), outliers.clone(), config.health_check.clone());
            self.staged.push(Box::new(move || {
                kept.outliers.set_config(outliers);
                kept.set_health_check(health_check);
            }));
            return Ok(upstream);
        }
        let metrics = self.metrics.families::<OutlierFamilies>().handles(&Upstream::name_of(config));
        let outliers = (outliers.clone(), metrics);
        let cluster = self.cluster.as_ref();
        let (upstream, start) =
            Upstream::build(config, &self.identity, connect, outliers, self.workers, cluster).await?;
        self.staged.push(start);
        Ok(self.upstreams.insert(key, upstream))
    }

    /// `upstream`'s retry budget under `config`: the one in use while the
    /// config stays the same, or a new one, in use once the version is accepted.
    pub fn retry_budget(&mut self, upstream: &Arc<Upstream>, config: &RetryBudgetConfig) -> RetryBudget {
        let (budget, changed) = upstream.retry_budget(config);
        if changed {
            let (upstream, config, kept) = (upstream.clone(), config.clone(), budget.clone());
            self.staged.push(Box::new(move || upstream.keep_retry_budget(config, kept)));
        }
        budget
    }

    /// The pooled connections to the local app at `addr`.
    pub fn app(&mut self, addr: SocketAddr, connect: ConnectSettings) -> Arc<Endpoint> {
        let workers = self.workers;
        self.apps.get_or_insert_with((addr, connect), || app_endpoint(addr, connect, workers))
    }

    /// The pooled connections to the local app by port, for captured connections.
    pub fn app_ports(&mut self, connect: ConnectSettings) -> Arc<AppPorts> {
        let workers = self.workers;
        self.app_ports
            .get_or_insert_with(connect, || Arc::new(AppPorts { connect, workers, by_port: Mutex::default() }))
    }

    /// The original destinations of captured calls, under `policy` from now on.
    pub fn original_destinations(
        &mut self,
        key: OriginalKey,
        policy: OriginalPolicy,
    ) -> Result<Arc<OriginalDestinations>, String> {
        if let Some(originals) = self.originals.get(&key) {
            let kept = originals.clone();
            self.staged.push(Box::new(move || kept.set_policy(policy)));
            return Ok(originals);
        }
        let (identity, cluster, metrics) = (&self.identity, self.cluster.clone(), self.metrics.clone());
        let originals = OriginalDestinations::new(key.clone(), identity, cluster, metrics, self.workers, policy)?;
        Ok(self.originals.insert(key, Arc::new(originals)))
    }

    /// The state a policy keeps for `key`, named `name` (in refusals and
    /// as its metrics' label) once this version is accepted; new when no
    /// version in service has that key.
    pub fn kept<T: KeptState>(&mut self, key: StateKey<T::Settings>, name: String) -> Arc<T> {
        let kept = self
            .policies
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(Kept::<StateKey<T::Settings>, Arc<T>>::default()));
        let kept: &mut Kept<StateKey<T::Settings>, Arc<T>> =
            kept.as_any().downcast_mut().expect("policy state is kept by its type");
        let name: Arc<str> = name.into();
        if let Some(state) = kept.get(&key) {
            if *state.label().get().name != *name {
                let renamed = state.clone();
                self.staged.push(Box::new(move || {
                    if renamed.label().rename(name) {
                        renamed.renamed();
                    }
                }));
            }
            return state;
        }
        let label = Labelled::new(self.metrics.families::<T::Families>(), name);
        kept.insert(key.clone(), Arc::new(T::new(&key.settings, label)))
    }

    /// The routes built since the last commit are in service: applies what
    /// they staged, and drops what they did not ask for.
    pub fn commit(&mut self) {
        for change in self.staged.drain(..) {
            change();
        }
        self.upstreams.prune();
        self.apps.prune();
        self.app_ports.prune();
        self.policies.values_mut().for_each(|kept| kept.prune());
        self.originals.prune();
    }

    /// The routes built since the last commit were refused: live state stays
    /// as it was, and what they added is dropped.
    pub fn abort(&mut self) {
        self.staged.clear();
        self.upstreams.abort();
        self.apps.abort();
        self.app_ports.abort();
        self.policies.values_mut().for_each(|kept| kept.abort());
        self.originals.abort();
    }
}

fn app_endpoint(addr: SocketAddr, connect: ConnectSettings, workers: usize) -> Arc<Endpoint> {
    Arc::new(Endpoint::new(addr, Target::App(addr), Arc::new(Transport::Plaintext), connect, workers))
}

/// The local app on `127.0.0.1` by port, each port's connections made on the
/// first call that a capture rule brought to it.
pub struct AppPorts {
    connect: ConnectSettings,
    workers: usize,
    by_port: Mutex<HashMap<u16, Arc<Endpoint>>>,
}

impl AppPorts {
    pub fn get(&self, port: u16) -> Arc<Endpoint> {
        let mut by_port = self.by_port.lock().expect("app ports lock");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        by_port.entry(port).or_insert_with(|| app_endpoint(addr, self.connect, self.workers)).clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Config;
    use crate::contract::Contracts;
    use crate::identity::Credentials;
    use crate::identity::certs::write_dev_certs;
    use crate::policy::kept::KeptState;
    use crate::proxy::endpoint::ConnectSettings;
    use crate::proxy::routes::Routes;

    /// A listener that counts the connections made to it.
    async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, accepted) = (listener.local_addr().unwrap(), Arc::new(AtomicUsize::new(0)));
        let counted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::AcqRel);
                held.push(tcp);
            }
        });
        (addr, accepted)
    }

    fn config(dir: &std::path::Path, rest: &str) -> Config {
        let certs = dir.display();
        let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
        let yaml = format!(
            "identity: {{cert: {certs}/client.pem, key: {certs}/client-key.pem, trust_bundle: {certs}/ca.pem}}\n\
             contracts: {{protos: [examples/echo.proto], include: ['{}']}}\n{rest}",
            proto.display()
        );
        let file = dir.join("config.yaml");
        std::fs::write(&file, yaml).unwrap();
        crate::config::load(Some(&file), Vec::new()).unwrap()
    }

    async fn build(config: &Config, contracts: &Arc<Contracts>, registries: &mut Registries) -> Routes {
        Routes::build(Arc::new(config.clone()), contracts.clone(), registries, None).await.unwrap()
    }

    #[tokio::test]
    async fn a_refused_version_changes_nothing_running_and_an_accepted_one_applies_whole() {
        let dir = tempfile::tempdir().unwrap();
        let client = SpiffeId::parse("spiffe://td/ns/t/sa/client").unwrap();
        write_dev_certs(dir.path(), "test CA", &[("client".into(), client)]).unwrap();
        let ((kept_addr, kept_accepted), (new_addr, new_accepted)) =
            (counting_listener().await, counting_listener().await);
        let upstream = |addr, rest: &str| {
            format!("{{services: [echo.v1.Echo], endpoints: ['{addr}'], identity: 'spiffe://td/ns/t/sa/server'{rest}}}")
        };
        let running = config(dir.path(), &format!("outbound: {{upstreams: [{}]}}\n", upstream(kept_addr, "")));
        let checks = ", health_check: {interval: 20ms, timeout: 20ms}";
        let changed = config(
            dir.path(),
            &format!(
                "outbound: {{upstreams: [{}, {}]}}\n\
                 policy: {{outlier_detection: {{consecutive_failures: 9}}, retry_budget: {{ratio: 0.5}}}}\n",
                upstream(kept_addr, checks),
                upstream(new_addr, checks).replace("echo.v1.Echo", "other.v1.Other"),
            ),
        );
        let contracts = Arc::new(Contracts::load(&running.contracts).unwrap());
        let identity = Arc::new(Identity::new(Credentials::read(&running.identity).unwrap()).unwrap());
        let mut registries = Registries::new(identity, Arc::new(Metrics::default()), 1, None);
        let _in_service = build(&running, &contracts, &mut registries).await;
        registries.commit();
        let kept = |registries: &mut Registries, config: &Config| {
            let upstream = &config.outbound.upstreams[0];
            let key = UpstreamKey {
                endpoints: upstream.endpoints.clone(),
                identity: upstream.identity.clone(),
                resolve_interval: upstream.resolve_interval,
                connect: ConnectSettings::of(config),
            };
            registries.upstreams.values.get(&key).cloned().expect("the running upstream is kept")
        };
        let before = kept(&mut registries, &running);

        // Built, then refused: nothing applies, nothing starts, nothing stays.
        drop(build(&changed, &contracts, &mut registries).await);
        registries.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(kept_accepted.load(Ordering::Acquire), 0, "the kept upstream's health checks turned on");
        assert_eq!(new_accepted.load(Ordering::Acquire), 0, "the new upstream's health checks started");
        assert_eq!(
            before.outliers.config().consecutive_failures,
            running.policy.outlier_detection.consecutive_failures
        );
        assert!(!before.retry_budget(&running.policy.retry_budget).1, "the retry budget changed");
        assert_eq!(registries.upstreams.values.len(), 1, "the new upstream is kept");
        assert!(Arc::ptr_eq(&before, &kept(&mut registries, &running)));

        // Built, then accepted: all of it applies.
        let _in_service = build(&changed, &contracts, &mut registries).await;
        registries.commit();
        assert_eq!(before.outliers.config().consecutive_failures, 9);
        assert!(!before.retry_budget(&changed.policy.retry_budget).1, "the new retry budget is in use");
        let checked = async {
            while kept_accepted.load(Ordering::Acquire) == 0 || new_accepted.load(Ordering::Acquire) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), checked).await.expect("both upstreams are health-checked");
        assert_eq!(registries.upstreams.values.len(), 2);
    }

    #[tokio::test]
    async fn policy_state_is_kept_by_its_key_and_renamed_only_once_its_version_is_accepted() {
        use crate::call::Direction;
        use crate::policy::bulkhead::{Bulkhead, ConcurrencyPolicy};

        let dir = tempfile::tempdir().unwrap();
        let id = SpiffeId::parse("spiffe://td/ns/t/sa/client").unwrap();
        write_dev_certs(dir.path(), "test CA", &[("client".into(), id)]).unwrap();
        let config = config(dir.path(), "");
        let identity = Arc::new(Identity::new(Credentials::read(&config.identity).unwrap()).unwrap());
        let mut registries = Registries::new(identity, Arc::new(Metrics::default()), 1, None);
        let policy = ConcurrencyPolicy::new(4);
        let key = || StateKey::method(Direction::Outbound, "/echo.v1.Echo/Unary", &policy);
        let from_config = "method /echo.v1.Echo/Unary (config policy.defaults)";
        let first: Arc<Bulkhead> = registries.kept(key(), from_config.into());
        registries.commit();

        // The same settings, now from the contract: the same bulkhead, under its old name until accepted.
        let from_contract = "method /echo.v1.Echo/Unary ((protomesh.v1.method))";
        let again: Arc<Bulkhead> = registries.kept(key(), from_contract.into());
        assert!(Arc::ptr_eq(&first, &again), "a policy whose source moved keeps its state");
        drop(again);
        registries.abort();
        assert_eq!(&*first.label().get().name, from_config, "a refused version renames nothing");
        let _: Arc<Bulkhead> = registries.kept(key(), from_contract.into());
        registries.commit();
        assert_eq!(&*first.label().get().name, from_contract);

        // Other settings: a new bulkhead, and the old one is let go.
        let stricter = ConcurrencyPolicy::new(2);
        let key = StateKey::method(Direction::Outbound, "/echo.v1.Echo/Unary", &stricter);
        let other: Arc<Bulkhead> = registries.kept(key, from_contract.into());
        assert!(!Arc::ptr_eq(&first, &other));
        registries.commit();
        assert_eq!(Arc::strong_count(&first), 1, "pruned");
    }

    #[test]
    fn what_is_asked_for_again_is_kept_and_the_rest_pruned() {
        let mut kept: Kept<&str, Arc<u32>> = Kept::default();
        let first = kept.get_or_insert_with("a", || Arc::new(1));
        kept.get_or_insert_with("b", || Arc::new(2));
        kept.prune();
        let again = kept.get_or_insert_with("a", || Arc::new(3));
        assert!(Arc::ptr_eq(&first, &again));
        kept.prune();
        assert!(kept.get(&"b").is_none(), "not asked for in the last round");
        assert!(kept.get(&"a").is_some());
    }
}
