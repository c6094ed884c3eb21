//! Kubernetes: adding the sidecar to pods. One mutation ([`inject`]) turns a
//! pod template into the injected one; `protomesh inject` applies it to
//! manifests ([`manifest`]) and `protomesh webhook` to pods as they are
//! created ([`webhook`]). [`settings`] reads what a pod's annotations ask
//! for, [`sidecar`] is what gets added, [`probes`] moves the app's probes
//! to the sidecar when its traffic is captured, [`rbac`] is what the pods'
//! service accounts must be granted (and [`grants`] keeps them for labelled
//! namespaces in the injector), and [`exposure`] which ports Services open
//! to clients outside the cluster.

pub mod exposure;
pub mod grants;
pub mod inject;
pub mod manifest;
pub mod probes;
pub mod rbac;
pub mod settings;
pub mod sidecar;
pub mod webhook;

/// The version injected sidecars and the injector report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The sidecar container's and the capture rules' init container's names,
/// which discovery reads back from the pods it finds.
pub use crate::discovery::kubernetes::{INIT, SIDECAR};
/// The user and group the sidecar runs as.
pub const SIDECAR_UID: u32 = 2102;
pub const OUTBOUND_PORT: u16 = 4140;
pub const INBOUND_PORT: u16 = 4143;
pub const ADMIN_PORT: u16 = 4191;
