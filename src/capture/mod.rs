//! Transparent capture of a pod's TCP traffic: the netfilter rules that
//! `protomesh init` (or the node's CNI plugin) installs in the pod's network
//! namespace (`rules.rs`, `install.rs`), the check that they are in place
//! (`validate.rs`), and how the sidecar learns where a redirected connection
//! was going (`destination.rs`).

mod destination;
mod install;
mod rules;
mod validate;

pub use destination::original_destination;
pub use install::{InitError, install, uninstall};
pub use rules::{CaptureRules, PortRange, TABLE};
pub use validate::{NOT_CAPTURED_EXIT_CODE, ValidateError, validate};
