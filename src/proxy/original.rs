//! Original destinations: a captured gRPC call for a service that no
//! configured upstream routes goes where the app dialled. Each destination
//! address becomes an upstream of its own, made on its first call and kept
//! while calls use it (up to a bound, beyond which idle ones are let go).
//! Over mTLS the destination's workload is not known, only its address, so
//! any workload of the expected trust domain may answer; networks outside
//! the mesh are called in plaintext.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::endpoint::{ConnectSettings, Transport};
use super::upstream::{Upstream, UpstreamRoute};
use crate::config::OriginalDestinationConfig;
use crate::discovery::Found;
use crate::identity::{ExpectedPeer, Identity};
use crate::policy::bulkhead::{Bulkhead, ConcurrencyPolicy};
use crate::policy::outlier::OutlierConfig;
use crate::policy::replay::{RetryBudget, RetryBudgetConfig};
use crate::telemetry::Metrics;

/// Destinations kept at once; past it, those no call holds are let go.
const KEPT: usize = 1024;

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
    mtls: Arc<rustls::ClientConfig>,
    /// For opaque TCP to `opaque_mtls_networks`.
    opaque: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
    workers: usize,
    policy: Mutex<OriginalPolicy>,
    by_addr: Mutex<HashMap<SocketAddr, Arc<UpstreamRoute>>>,
}

impl OriginalDestinations {
    pub fn new(
        key: OriginalKey,
        identity: &Identity,
        metrics: Arc<Metrics>,
        workers: usize,
        policy: OriginalPolicy,
    ) -> Result<OriginalDestinations, String> {
        let domain = key.config.trust_domain.clone().unwrap_or_else(|| identity.id.trust_domain().to_string());
        let expected = ExpectedPeer::TrustDomain(domain.into());
        let mtls = identity.client_config(expected.clone())?;
        let opaque = identity.opaque_client_config(expected)?;
        let (policy, by_addr) = (Mutex::new(policy), Mutex::default());
        Ok(OriginalDestinations { key, mtls, opaque, metrics, workers, policy, by_addr })
    }

    /// Applies the policy of a new config: to the destinations kept, and to those to come.
    pub fn set_policy(&self, policy: OriginalPolicy) {
        for route in self.by_addr.lock().expect("original destinations lock").values() {
            route.upstream.outliers.set_config(policy.outliers.clone());
        }
        *self.policy.lock().expect("original destinations policy lock") = policy;
    }

    /// How to reach `addr` with opaque TCP over mTLS, if its network is meshed.
    pub fn opaque_tls(&self, addr: SocketAddr) -> Option<Arc<rustls::ClientConfig>> {
        let meshed = self.key.config.opaque_mtls_networks.iter().any(|net| net.contains(&addr.ip()));
        meshed.then(|| self.opaque.clone())
    }

    /// The route to `addr`, made on its first call.
    pub fn route(&self, addr: SocketAddr) -> Arc<UpstreamRoute> {
        let mut by_addr = self.by_addr.lock().expect("original destinations lock");
        if let Some(route) = by_addr.get(&addr) {
            return route.clone();
        }
        if by_addr.len() >= KEPT {
            by_addr.retain(|_, route| Arc::strong_count(route) > 1);
        }
        let route = Arc::new(self.make(addr));
        by_addr.insert(addr, route.clone());
        route
    }

    fn make(&self, addr: SocketAddr) -> UpstreamRoute {
        let policy = self.policy.lock().expect("original destinations policy lock").clone();
        let plaintext = self.key.config.plaintext_networks.iter().any(|net| net.contains(&addr.ip()));
        let (transport, name) = if plaintext {
            (Transport::Plaintext, format!("original destination {addr} (plaintext)"))
        } else {
            (Transport::Mtls(self.mtls.clone()), format!("original destination {addr}"))
        };
        let name: Arc<str> = name.into();
        let outliers = (policy.outliers, self.metrics.outliers("original destinations"));
        let upstream = Upstream::new(name.clone(), None, transport, self.key.connect, outliers, self.workers);
        upstream.set_endpoints(&[Found::from(addr)]);
        // Each destination has its own places, and all count under one label:
        // a label per address would grow without bound as destinations come and go.
        let bulkhead = policy.concurrency.as_ref().map(|limits| {
            let label = "original destinations (config policy.upstream_concurrency)";
            Arc::new(Bulkhead::new(
                format!("{name} (config policy.upstream_concurrency)"),
                limits,
                self.metrics.bulkhead(label),
            ))
        });
        let budget = RetryBudget::new(&policy.retry_budget);
        upstream.keep_retry_budget(policy.retry_budget, budget.clone());
        UpstreamRoute { upstream, bulkhead, budget }
    }
}
