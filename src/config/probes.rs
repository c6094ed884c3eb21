//! The app's kubelet probes, performed by the sidecar: with capture, a
//! kubelet probe of a strict app port would be refused (the kubelet has no
//! certificate), so the injector points it at the admin server instead, which
//! runs it against the app on localhost. Each probe is one handler, as in a
//! Kubernetes probe, with its port resolved to a number.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::duration;

/// Where the admin server answers the app's probes: `/app-probe/<container>/<kind>`.
pub const APP_PROBE_PREFIX: &str = "/app-probe/";

/// The app's probes by admin path.
pub type AppProbes = BTreeMap<String, AppProbe>;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    /// An HTTP GET to the app; a status from 200 to 399 passes.
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    /// `grpc.health.v1.Health/Check`; SERVING passes.
    #[serde(default)]
    pub grpc: Option<GrpcCheck>,
    /// A TCP connection that opens passes.
    #[serde(default)]
    pub tcp_socket: Option<TcpSocket>,
    /// The kubelet's `timeoutSeconds`.
    #[serde(default = "default_timeout", deserialize_with = "duration::deserialize")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGet {
    pub port: u16,
    #[serde(default = "root")]
    pub path: String,
    #[serde(default)]
    pub headers: Vec<HttpHeader>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheck {
    pub port: u16,
    /// The service asked about; empty asks about the server as a whole.
    #[serde(default)]
    pub service: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
}

impl AppProbe {
    /// The app port the probe reaches (0 for a probe with no handler, which `validate` refuses).
    pub fn port(&self) -> u16 {
        let http = self.http_get.as_ref().map(|h| h.port);
        let grpc = self.grpc.as_ref().map(|g| g.port);
        http.or(grpc).or(self.tcp_socket.as_ref().map(|t| t.port)).unwrap_or(0)
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn root() -> String {
    "/".into()
}

/// Checks each probe has one handler and a path under [`APP_PROBE_PREFIX`].
pub fn validate(probes: &AppProbes) -> Result<(), (String, String)> {
    for (path, probe) in probes {
        let field = format!("admin.app_probes.{path}");
        if !path.starts_with(APP_PROBE_PREFIX) {
            return Err((field, format!("an app probe's path starts with {APP_PROBE_PREFIX}")));
        }
        let handlers = [probe.http_get.is_some(), probe.grpc.is_some(), probe.tcp_socket.is_some()];
        if handlers.iter().filter(|set| **set).count() != 1 {
            return Err((field, "set exactly one of http_get, grpc and tcp_socket".into()));
        }
    }
    Ok(())
}
