//! Transparent capture of a pod's TCP traffic: the netfilter rules that
//! `protomesh init` installs in the pod's network namespace (`rules.rs`,
//! `install.rs`), and how the sidecar learns where a redirected connection
//! was going (`destination.rs`).

mod destination;
mod install;
mod rules;

pub use destination::original_destination;
pub use install::{InitError, install};
pub use rules::{CaptureRules, PortRange};
