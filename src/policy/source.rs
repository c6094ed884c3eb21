//! Where a policy value came from: the config file's override for the method
//! or its service, the contract's method or service option, or the config's
//! defaults. Every effective value carries its source, so that refusals,
//! `protomesh check` and `/config` can name it.

use std::fmt;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `policy.methods[KEY]` in the config; the key is kept.
    ConfigOverride(Arc<str>),
    MethodOption,
    ServiceOption,
    ConfigDefault,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::ConfigOverride(key) => write!(f, "config policy.methods[\"{key}\"]"),
            Source::MethodOption => f.write_str("(protomesh.v1.method)"),
            Source::ServiceOption => f.write_str("(protomesh.v1.service)"),
            Source::ConfigDefault => f.write_str("config policy.defaults"),
        }
    }
}

/// A value and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sourced<T> {
    pub value: T,
    pub source: Source,
}
