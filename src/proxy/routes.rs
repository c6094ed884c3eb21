//! The routing snapshot: everything derived from one version of the config
//! and contracts (each method's stack with its resolved policy and
//! authorization, the routes to upstreams) as one immutable value. The
//! running sidecar swaps it whole; a call reads it once, when it arrives,
//! and keeps what it took from it until it ends.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::inbound::InboundRoutes;
use super::outbound::OutboundRoutes;
use super::reflection::Reflection;
use super::registry::Registries;
use crate::config::Config;
use crate::contract::Contracts;
use crate::telemetry::Tracing;

/// The routes in force, swapped whole on reload.
pub type CurrentRoutes = Arc<ArcSwap<Routes>>;

pub struct Routes {
    pub config: Arc<Config>,
    pub contracts: Arc<Contracts>,
    pub outbound: OutboundRoutes,
    /// `None` when the sidecar takes no inbound traffic.
    pub inbound: Option<InboundRoutes>,
    /// Server reflection from the contracts, when they declare a service.
    pub reflection: Option<Reflection>,
}

impl Routes {
    /// Builds the routes, taking live state from `registries`; what they no
    /// longer use is let go once these routes are in service
    /// ([`Registries::prune`]).
    pub async fn build(
        config: Arc<Config>,
        contracts: Arc<Contracts>,
        registries: &mut Registries,
        tracing: Option<Arc<Tracing>>,
    ) -> Result<Routes, String> {
        let outbound = OutboundRoutes::build(&config, &contracts, registries, tracing.clone()).await?;
        let reflection = Reflection::of(&contracts);
        let inbound = config
            .inbound
            .as_ref()
            .map(|inbound| {
                InboundRoutes::build(&config, inbound, &contracts, registries, tracing.clone(), reflection.as_ref())
            })
            .transpose()?;
        Ok(Routes { config, contracts, outbound, inbound, reflection })
    }
}
