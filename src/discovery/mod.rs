//! Where an upstream's endpoints come from: `ip:port` entries as written,
//! `name:port` entries from DNS, re-resolved periodically (a headless
//! Kubernetes Service answers with one A record per ready pod), and
//! `k8s://service.namespace:port` entries from the Kubernetes API, watched
//! ([`kubernetes`]).

pub mod kubernetes;

use std::net::SocketAddr;
use std::time::Duration;

use kubernetes::{Cluster, ServiceAccount, ServiceRef};

/// An endpoint found, and what is known of the workload behind it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Found {
    pub addr: SocketAddr,
    pub workload: Workload,
    /// Topology hints name this pod's zone: calls prefer it.
    pub in_zone: bool,
}

/// Who must answer at an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    /// Whoever the upstream expects of all its endpoints: an address or a
    /// name as written, or a destination the Kubernetes API does not know.
    AsConfigured,
    /// A Kubernetes pod (`name` in its namespace), which must present `identity`.
    Pod { name: String, identity: PodIdentity, sidecar: Sidecar },
    /// A Kubernetes endpoint whose pod is not known yet: where each endpoint
    /// must present its own pod's identity, it gets no call until it is.
    PodNotKnown,
}

/// The identity a pod must present.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodIdentity {
    /// Its service account's SPIFFE ID, in this workload's trust domain.
    Account(ServiceAccount),
    /// The SPIFFE ID its Service names (`protomesh.io/expected-identity`).
    Named(String),
}

/// How a pod takes calls from the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sidecar {
    /// Its capture hands connections made to its app ports to its sidecar.
    Captured,
    /// Its sidecar takes mTLS for its app on this port only.
    Listening(u16),
    /// It has no sidecar: calls go to its app as they are, in plaintext.
    None,
}

impl From<SocketAddr> for Found {
    fn from(addr: SocketAddr) -> Found {
        Found { addr, workload: Workload::AsConfigured, in_zone: false }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSpec {
    Static(SocketAddr),
    Dns { host: String, port: u16 },
    Kubernetes(ServiceRef),
}

pub fn parse_endpoint(text: &str) -> Result<EndpointSpec, String> {
    if text.starts_with(kubernetes::SCHEME) {
        return ServiceRef::parse(text).map(EndpointSpec::Kubernetes);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(EndpointSpec::Static(addr));
    }
    let invalid = || {
        format!(
            "`{text}` is not host:port, e.g. 10.0.0.7:4143 or inventory.shop.svc.cluster.local:4143, \
             nor k8s://<service>.<namespace>:<port>"
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    let valid_host = !host.is_empty()
        && host
            .split('.')
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid_host || port == 0 {
        return Err(invalid());
    }
    Ok(EndpointSpec::Dns { host: host.to_string(), port })
}

/// Resolves the addresses and DNS names once; Kubernetes Services are left
/// to their watches, whose first lists give their endpoints. What fails to
/// resolve is reported and skipped.
pub async fn resolve(specs: &[EndpointSpec]) -> Vec<Found> {
    let mut addrs = Vec::new();
    for spec in specs {
        match spec {
            EndpointSpec::Static(addr) => addrs.push(Found::from(*addr)),
            EndpointSpec::Dns { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(found) => addrs.extend(found.map(Found::from)),
                Err(error) => tracing::warn!(%host, %error, "endpoint name did not resolve"),
            },
            EndpointSpec::Kubernetes(_) => {}
        }
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Keeps the specs' addresses current, handing them to `update` at each
/// change until `dropped` resolves (their owner is gone): DNS names resolved
/// again every `every`, Kubernetes Services watched, their first endpoints
/// sent once their watches have listed them. Nothing to do when every spec
/// is a static address.
pub fn spawn_refresh(
    specs: Vec<EndpointSpec>,
    every: Duration,
    cluster: Option<Cluster>,
    dropped: impl Future<Output = ()> + Send + 'static,
    mut update: impl FnMut(&[Found]) + Send + 'static,
) {
    if specs.iter().all(|s| matches!(s, EndpointSpec::Static(_))) {
        return;
    }
    let services = specs.iter().filter_map(|spec| match spec {
        EndpointSpec::Kubernetes(service) => Some(service.clone()),
        _ => None,
    });
    let mut watched: Vec<_> = match &cluster {
        Some(cluster) => services.map(|service| cluster.watch(service)).collect(),
        None => Vec::new(),
    };
    // Addresses and DNS names, kept apart from the watched Services' endpoints.
    let resolvable: Vec<EndpointSpec> =
        specs.into_iter().filter(|s| !matches!(s, EndpointSpec::Kubernetes(_))).collect();
    let polled = resolvable.iter().any(|s| matches!(s, EndpointSpec::Dns { .. }));
    tokio::spawn(async move {
        tokio::pin!(dropped);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut resolved = resolve(&resolvable).await;
        let watching = !watched.is_empty();
        loop {
            let changed = async {
                match watching {
                    true => futures_util::future::select_all(watched.iter_mut().map(|w| Box::pin(w.changed()))).await.0,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut dropped => return,
                _ = ticks.tick(), if polled => resolved = resolve(&resolvable).await,
                watched_changed = changed => {
                    if watched_changed.is_err() {
                        return;
                    }
                }
            }
            let mut addrs = resolved.clone();
            addrs.extend(watched.iter().flat_map(|w| w.borrow().clone()));
            addrs.sort();
            addrs.dedup();
            update(&addrs);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_names() {
        assert_eq!(parse_endpoint("127.0.0.1:4143"), Ok(EndpointSpec::Static("127.0.0.1:4143".parse().unwrap())));
        assert_eq!(parse_endpoint("[::1]:4143"), Ok(EndpointSpec::Static("[::1]:4143".parse().unwrap())));
        assert_eq!(
            parse_endpoint("inventory.shop.svc.cluster.local:4143"),
            Ok(EndpointSpec::Dns { host: "inventory.shop.svc.cluster.local".into(), port: 4143 })
        );
        for bad in ["inventory", "inventory:", "inventory:http", ":4143", "a..b:1", "a b:1", "x:0", "x:70000"] {
            assert!(parse_endpoint(bad).unwrap_err().contains("host:port"), "{bad}");
        }
    }

    #[tokio::test]
    async fn resolves_localhost_and_keeps_static_addresses() {
        let specs = [parse_endpoint("localhost:4143").unwrap(), parse_endpoint("10.0.0.1:1").unwrap()];
        let addrs = resolve(&specs).await;
        assert!(addrs.contains(&Found::from("10.0.0.1:1".parse::<SocketAddr>().unwrap())));
        assert!(addrs.iter().any(|a| a.addr.ip().is_loopback() && a.addr.port() == 4143), "{addrs:?}");
    }
}
