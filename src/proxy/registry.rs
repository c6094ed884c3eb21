//! Live state, kept from one version of the routes to the next: upstreams
//! (their endpoints, connections, outlier state and retry budget), the app's
//! connections, and bulkheads (their places). Routes built from a new config
//! ask for each by what defines it; what they ask for again is handed over,
//! and what no route asks for any more is dropped once the last call that
//! holds it ends.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::endpoint::{ConnectSettings, Endpoint, Transport};
use super::original::{OriginalDestinations, OriginalKey, OriginalPolicy};
use super::upstream::Upstream;
use crate::call::{Direction, Target};
use crate::config::UpstreamConfig;
use crate::identity::{Identity, SpiffeId};
use crate::policy::bulkhead::{Bulkhead, ConcurrencyPolicy};
use crate::policy::circuit_breaker::{Breaker, CircuitBreakerPolicy};
use crate::policy::outlier::OutlierConfig;
use crate::policy::rate_limit::{CallerBuckets, RateLimitPolicy, TokenBucket};
use crate::telemetry::Metrics;

/// Values by key, with the keys the routes being built have asked for.
struct Kept<K, V> {
    values: HashMap<K, V>,
    asked: HashSet<K>,
}

impl<K: Clone + Eq + Hash, V: Clone> Kept<K, V> {
    fn get(&mut self, key: &K) -> Option<V> {
        let value = self.values.get(key)?.clone();
        self.asked.insert(key.clone());
        Some(value)
    }

    fn insert(&mut self, key: K, value: V) -> V {
        self.asked.insert(key.clone());
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
    }
}

impl<K, V> Default for Kept<K, V> {
    fn default() -> Self {
        Kept { values: HashMap::new(), asked: HashSet::new() }
    }
}

/// What defines an upstream's live state; the services routed to it do not.
#[derive(Clone, PartialEq, Eq, Hash)]
struct UpstreamKey {
    endpoints: Vec<String>,
    identity: SpiffeId,
    resolve_interval: Duration,
    connect: ConnectSettings,
}

pub struct Registries {
    pub identity: Arc<Identity>,
    pub metrics: Arc<Metrics>,
    workers: usize,
    upstreams: Kept<UpstreamKey, Arc<Upstream>>,
    apps: Kept<(SocketAddr, ConnectSettings), Arc<Endpoint>>,
    app_ports: Kept<ConnectSettings, Arc<AppPorts>>,
    bulkheads: Kept<(Direction, String, ConcurrencyPolicy), Arc<Bulkhead>>,
    callers: Kept<ConcurrencyPolicy, Arc<CallerBulkheads>>,
    rate_limits: Kept<(String, (u64, u32)), Arc<TokenBucket>>,
    circuit_breakers: Kept<(String, CircuitBreakerPolicy), Arc<Breaker>>,
    caller_rate_limits: Kept<(String, (u64, u32)), Arc<CallerBuckets>>,
    originals: Kept<OriginalKey, Arc<OriginalDestinations>>,
}

impl Registries {
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>, workers: usize) -> Registries {
        Registries {
            identity,
            metrics,
            workers,
            upstreams: Kept::default(),
            apps: Kept::default(),
            app_ports: Kept::default(),
            bulkheads: Kept::default(),
            callers: Kept::default(),
            rate_limits: Kept::default(),
            circuit_breakers: Kept::default(),
            caller_rate_limits: Kept::default(),
            originals: Kept::default(),
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
            upstream.outliers.set_config(outliers.clone());
            upstream.set_health_check(config.health_check.clone());
            return Ok(upstream);
        }
        let metrics = self.metrics.outliers(&Upstream::name_of(config));
        let upstream =
            Upstream::start(config, &self.identity, connect, (outliers.clone(), metrics), self.workers).await?;
        Ok(self.upstreams.insert(key, upstream))
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
            originals.set_policy(policy);
            return Ok(originals);
        }
        let originals =
            OriginalDestinations::new(key.clone(), &self.identity, self.metrics.clone(), self.workers, policy)?;
        Ok(self.originals.insert(key, Arc::new(originals)))
    }

    /// The bulkhead named `name` with `limits` in one direction; one whose
    /// limits changed starts anew.
    pub fn bulkhead(&mut self, direction: Direction, name: String, limits: &ConcurrencyPolicy) -> Arc<Bulkhead> {
        let metrics = &self.metrics;
        self.bulkheads.get_or_insert_with((direction, name.clone(), limits.clone()), || {
            Arc::new(Bulkhead::new(name.clone(), limits, metrics.bulkhead(&name)))
        })
    }

    /// The circuit breaker named `name` with `policy`; one whose policy changed starts closed.
    pub fn circuit_breaker(&mut self, name: String, policy: &CircuitBreakerPolicy) -> Arc<Breaker> {
        let metrics = self.metrics.circuit_breaker(&name);
        self.circuit_breakers
            .get_or_insert_with((name.clone(), policy.clone()), || Arc::new(Breaker::new(name.into(), policy, metrics)))
    }

    /// The token bucket named `name` with `policy`; one whose policy changed starts full.
    pub fn rate_limit(&mut self, name: String, policy: &RateLimitPolicy) -> Arc<TokenBucket> {
        let rejected = self.metrics.rate_limited(&name);
        self.rate_limits.get_or_insert_with((name.clone(), policy.key()), || {
            Arc::new(TokenBucket::new(name.into(), policy, rejected))
        })
    }

    /// The token buckets of each caller of the limit named `name`.
    pub fn caller_rate_limits(&mut self, name: String, policy: &RateLimitPolicy) -> Arc<CallerBuckets> {
        let rejected = self.metrics.rate_limited(&name);
        self.caller_rate_limits.get_or_insert_with((name.clone(), policy.key()), || {
            Arc::new(CallerBuckets::new(name.into(), policy, rejected))
        })
    }

    /// The bulkheads of inbound callers, one per identity, under `limits`.
    pub fn callers(&mut self, limits: &ConcurrencyPolicy) -> Arc<CallerBulkheads> {
        let metrics = self.metrics.clone();
        self.callers.get_or_insert_with(limits.clone(), || {
            Arc::new(CallerBulkheads { limits: limits.clone(), metrics, by_caller: Mutex::default() })
        })
    }

    /// Drops what the routes built since the last prune did not ask for.
    pub fn prune(&mut self) {
        self.upstreams.prune();
        self.apps.prune();
        self.app_ports.prune();
        self.bulkheads.prune();
        self.callers.prune();
        self.rate_limits.prune();
        self.circuit_breakers.prune();
        self.caller_rate_limits.prune();
        self.originals.prune();
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

/// One bulkhead per caller identity, made on the caller's first call.
pub struct CallerBulkheads {
    limits: ConcurrencyPolicy,
    metrics: Arc<Metrics>,
    by_caller: Mutex<HashMap<SpiffeId, Arc<Bulkhead>>>,
}

impl CallerBulkheads {
    pub fn of(&self, caller: &SpiffeId) -> Arc<Bulkhead> {
        let mut bulkheads = self.by_caller.lock().expect("caller bulkheads lock");
        bulkheads
            .entry(caller.clone())
            .or_insert_with(|| {
                let name = format!("caller {caller} (config policy.caller_concurrency)");
                Arc::new(Bulkhead::new(name.clone(), &self.limits, self.metrics.bulkhead(&name)))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
