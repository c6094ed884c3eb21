//! Service contracts: the `.proto` files (or descriptor sets) the sidecar
//! loads at start, turned into a table from `/pkg.Service/Method` to what the
//! sidecar needs to know about the method: its shape and its policy.

mod load;
mod options;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

pub use load::ContractError;
pub use options::ContractPolicy;

/// The source of `proto/protomesh/v1/options.proto`, built in so that every
/// contract can import it without shipping a copy.
pub const OPTIONS_PROTO: &str = include_str!("../../proto/protomesh/v1/options.proto");
pub const OPTIONS_PROTO_NAME: &str = "protomesh/v1/options.proto";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallShape {
    Unary,
    ServerStreaming,
    ClientStreaming,
    BidiStreaming,
}

impl fmt::Display for CallShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallShape::Unary => "unary",
            CallShape::ServerStreaming => "server-streaming",
            CallShape::ClientStreaming => "client-streaming",
            CallShape::BidiStreaming => "bidi-streaming",
        })
    }
}

/// The standard `idempotency_level` method option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotency {
    Unknown,
    NoSideEffects,
    Idempotent,
}

#[derive(Debug)]
pub struct MethodInfo {
    pub service: String,
    pub method: String,
    /// `/pkg.Service/Method`.
    pub path: String,
    pub shape: CallShape,
    pub idempotency: Idempotency,
    /// The policy its contract states; see `policy::method` for the effective one.
    pub contract: ContractPolicy,
    /// The contract file that declares the method.
    pub file: String,
}

/// Every method of every loaded contract, keyed by its HTTP/2 `:path`.
#[derive(Debug, Default)]
pub struct Contracts {
    methods: HashMap<Box<str>, Arc<MethodInfo>>,
}

impl Contracts {
    pub fn load(config: &crate::config::ContractsConfig) -> Result<Contracts, ContractError> {
        load::load(config)
    }

    pub fn method(&self, path: &str) -> Option<&Arc<MethodInfo>> {
        self.methods.get(path)
    }

    /// Methods grouped by service, both sorted by name.
    pub fn services(&self) -> BTreeMap<&str, Vec<&Arc<MethodInfo>>> {
        let mut services: BTreeMap<&str, Vec<&Arc<MethodInfo>>> = BTreeMap::new();
        for method in self.methods.values() {
            services.entry(&method.service).or_default().push(method);
        }
        for methods in services.values_mut() {
            methods.sort_by(|a, b| a.method.cmp(&b.method));
        }
        services
    }

    pub fn methods(&self) -> impl Iterator<Item = &Arc<MethodInfo>> {
        self.methods.values()
    }
}
