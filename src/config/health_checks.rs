//! gRPC health between sidecars: `outbound.upstreams[].health_check`, the
//! active checks a client sidecar makes of an upstream's endpoints, and
//! `inbound.health`, how a server sidecar answers them for its app.

use std::time::Duration;

use serde::Deserialize;

use crate::duration;

/// Checks each endpoint with `grpc.health.v1.Health/Check` over its mTLS
/// connection every `interval`. `unhealthy_threshold` failed checks in a row
/// (NOT_SERVING, any other status, no answer within `timeout`) take it out of
/// balancing; `healthy_threshold` SERVING answers in a row bring it back.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "defaults::interval", deserialize_with = "duration::deserialize")]
    pub interval: Duration,
    #[serde(default = "defaults::timeout", deserialize_with = "duration::deserialize")]
    pub timeout: Duration,
    /// The service asked about; empty (the default) asks about the whole server.
    #[serde(default)]
    pub service: String,
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
}

impl HealthCheckConfig {
    /// Errors are `field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("interval: must be above 0, e.g. 5s".into());
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return Err(format!("timeout: must be above 0 and at most the interval ({:?})", self.interval));
        }
        for (field, value) in
            [("unhealthy_threshold", self.unhealthy_threshold), ("healthy_threshold", self.healthy_threshold)]
        {
            if value == 0 {
                return Err(format!("{field}: at least 1 check in a row"));
            }
        }
        Ok(())
    }
}

/// How the inbound sidecar treats `grpc.health.v1.Health/Check` from peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthAnswer {
    /// The app answers; when it has no health service (UNIMPLEMENTED), the
    /// sidecar does: SERVING while the app takes connections.
    #[default]
    Auto,
    /// The sidecar answers, without asking the app.
    Sidecar,
    /// A call like any other: routed by the contracts, authorized.
    App,
}

impl HealthAnswer {
    /// Who answers, in words.
    pub fn describe(self) -> &'static str {
        match self {
            HealthAnswer::Auto => "the app, or the sidecar when the app has no health service",
            HealthAnswer::Sidecar => "the sidecar",
            HealthAnswer::App => "the app, as any call",
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn unhealthy_threshold() -> u32 {
        2
    }
    pub fn healthy_threshold() -> u32 {
        1
    }
}
