//! Service contracts: the `.proto` files (or descriptor sets) the sidecar
//! loads, turned into a table from `/pkg.Service/Method` to what the sidecar
//! needs to know about the method: its shape, its types and its policy.

pub mod breaking;
mod load;
mod options;
pub mod tightening;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::digest::Digest;
use crate::policy::validate::Validators;
pub use load::ContractError;
pub use options::ContractPolicy;

/// The source of `proto/protomesh/v1/options.proto`, built in so that every
/// contract can import it without shipping a copy.
pub const OPTIONS_PROTO: &str = include_str!("../../proto/protomesh/v1/options.proto");
pub const OPTIONS_PROTO_NAME: &str = "protomesh/v1/options.proto";
/// protovalidate's rules, built in from the validator's own copy, so that
/// the rules a contract writes are the ones the sidecar enforces.
pub const VALIDATE_PROTO_NAME: &str = "buf/validate/validate.proto";
/// `google.api.http`, for JSON routes: the option and its messages.
pub const HTTP_PROTOS: [(&str, &str); 2] = [
    ("google/api/annotations.proto", include_str!("../../proto/google/api/annotations.proto")),
    ("google/api/http.proto", include_str!("../../proto/google/api/http.proto")),
];

/// The files built into protomesh, which a contract imports without a copy
/// (a copy in `contracts.include` wins).
pub fn is_built_in(file: &str) -> bool {
    file == OPTIONS_PROTO_NAME
        || file == VALIDATE_PROTO_NAME
        || HTTP_PROTOS.iter().any(|(name, _)| *name == file)
        || file.starts_with("google/protobuf/")
}

/// The `contracts` section of the config.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractsConfig {
    /// `.proto` files, found through `include` like protoc's `-I`.
    #[serde(default)]
    pub protos: Vec<PathBuf>,
    #[serde(default)]
    pub include: Vec<PathBuf>,
    /// Binary `FileDescriptorSet`s (`protoc --include_imports -o`).
    #[serde(default)]
    pub descriptor_sets: Vec<PathBuf>,
    #[serde(default)]
    pub mode: ContractMode,
    /// What a reload does with contracts that break the running ones.
    #[serde(default)]
    pub breaking_changes: BreakingChanges,
}

impl ContractsConfig {
    /// Each error is (field path, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.protos.is_empty() && self.descriptor_sets.is_empty() {
            return Err((
                "contracts".into(),
                "name the service contracts: contracts.protos (with contracts.include) or contracts.descriptor_sets"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Where `.proto` files are looked up: `include`, or the working directory.
    pub fn include_dirs(&self) -> Vec<PathBuf> {
        if self.include.is_empty() { vec![PathBuf::from(".")] } else { self.include.clone() }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContractMode {
    /// Calls to methods outside the contracts get UNIMPLEMENTED from the sidecar.
    #[default]
    Strict,
    /// Calls to unknown methods are forwarded by service name.
    Permissive,
}

impl ContractMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ContractMode::Strict => "strict",
            ContractMode::Permissive => "permissive",
        }
    }
}

/// Breaking changes are logged either way; `refuse` also keeps the running
/// contracts in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BreakingChanges {
    #[default]
    Allow,
    Refuse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallShape {
    Unary,
    ServerStreaming,
    ClientStreaming,
    BidiStreaming,
}

impl CallShape {
    /// The caller sends one request message, which can be kept and sent again.
    pub fn one_request(self) -> bool {
        matches!(self, CallShape::Unary | CallShape::ServerStreaming)
    }

    /// The peer answers with one response message, so a whole-call timeout applies.
    pub fn one_response(self) -> bool {
        matches!(self, CallShape::Unary | CallShape::ClientStreaming)
    }
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

impl Idempotency {
    pub fn as_str(self) -> &'static str {
        match self {
            Idempotency::Unknown => "unknown",
            Idempotency::NoSideEffects => "no-side-effects",
            Idempotency::Idempotent => "idempotent",
        }
    }
}

#[derive(Debug)]
pub struct MethodInfo {
    pub service: String,
    pub method: String,
    /// `/pkg.Service/Method`.
    pub path: String,
    pub shape: CallShape,
    /// The request and response message types, fully qualified.
    pub input: String,
    pub output: String,
    pub idempotency: Idempotency,
    /// The policy its contract states; see `effective` for the policy that applies.
    pub contract: ContractPolicy,
    /// The contract file that declares the method.
    pub file: String,
}

/// Every method of every loaded contract, keyed by its HTTP/2 `:path`.
#[derive(Debug, Default)]
pub struct Contracts {
    methods: HashMap<Box<str>, Arc<MethodInfo>>,
    /// The files read to build them: sources, their imports, descriptor sets.
    files: Vec<PathBuf>,
    /// The version of what was read from those files.
    version: String,
    /// Every file's descriptors, imports included: what reflection serves.
    descriptors: prost_reflect::DescriptorPool,
    /// What they were loaded from, for what its patterns match now.
    config: ContractsConfig,
    /// Their request rules, compiled on first use and kept for this version,
    /// so that the check at load and the routes built after it share them.
    validators: Validators,
}

impl Contracts {
    pub fn load(config: &ContractsConfig) -> Result<Contracts, ContractError> {
        load::load(config)
    }

    pub fn validators(&self) -> &Validators {
        &self.validators
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

    /// The request and response messages of the method at `path`
    /// (`/pkg.Service/Method`), if a contract declares it.
    pub fn method_types(
        &self,
        path: &str,
    ) -> Option<(prost_reflect::MessageDescriptor, prost_reflect::MessageDescriptor)> {
        let method = self.methods.get(path)?;
        let service = self.descriptors.get_service_by_name(&method.service)?;
        let method = service.methods().find(|m| m.name() == method.method)?;
        Some((method.input(), method.output()))
    }

    /// Every file of the contracts as descriptors, with their imports.
    pub fn descriptors(&self) -> &prost_reflect::DescriptorPool {
        &self.descriptors
    }

    /// The files these contracts were built from, for telling when they change.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// A digest of those files' bytes: equal for the same contracts read again.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The version the files the contracts were built from have now, without
    /// compiling them; it differs from [`Contracts::version`] once one changed,
    /// or a pattern of `contracts.protos` matches other files.
    pub fn version_on_disk(&self) -> String {
        let mut version = Digest::default();
        for path in &self.files {
            version.add(&path.display().to_string(), &std::fs::read(path).unwrap_or_default());
        }
        load::add_matched(&mut version, &self.config);
        version.version()
    }
}
