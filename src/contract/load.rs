//! Compiling `.proto` files with protox (no protoc) or decoding descriptor sets,
//! then walking every service and method once to build the method table.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, MethodDescriptor, Value};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver};

use super::{
    CallShape, ContractMode, ContractPolicy, Contracts, ContractsConfig, HTTP_PROTOS, Idempotency, MethodInfo,
    OPTIONS_PROTO, OPTIONS_PROTO_NAME, VALIDATE_PROTO_NAME,
};
use crate::digest::Digest;
use crate::policy::validate::Validators;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ContractError(String);

/// Keeps the path and text of every file read from disk, for the version of
/// the contracts: exactly what was compiled.
struct Recording<R> {
    inner: R,
    read: RefCell<Vec<(PathBuf, String)>>,
}

impl<R: FileResolver> FileResolver for Recording<R> {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        let file = self.inner.open_file(name)?;
        if let (Some(path), Some(source)) = (file.path(), file.source()) {
            self.read.borrow_mut().push((path.to_path_buf(), source.to_string()));
        }
        Ok(file)
    }
}

/// Resolves the files built into the binary: `protomesh/v1/options.proto`,
/// `google/api/annotations.proto` with `http.proto`, and
/// `buf/validate/validate.proto` as the validator compiled it (its
/// descriptor, options included, since the crate ships no source).
struct BuiltIn;

impl FileResolver for BuiltIn {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match name {
            OPTIONS_PROTO_NAME => File::from_source(name, OPTIONS_PROTO),
            VALIDATE_PROTO_NAME => {
                let pool = &prost_protovalidate::types::DESCRIPTOR_POOL;
                let file = pool.get_file_by_name(name).ok_or_else(|| protox::Error::file_not_found(name))?;
                File::decode_file_descriptor_proto(file.encode_to_vec().as_slice())
                    .map_err(|e| protox::Error::new(std::io::Error::other(format!("built-in {name}: {e}"))))
            }
            _ => match HTTP_PROTOS.iter().find(|(built_in, _)| *built_in == name) {
                Some((_, source)) => File::from_source(name, source),
                None => Err(protox::Error::file_not_found(name)),
            },
        }
    }
}

pub fn load(config: &ContractsConfig) -> Result<Contracts, ContractError> {
    let (pool, read) = descriptor_pool(config)?;
    let methods = build_table(&pool)?;
    let mut version = Digest::default();
    for (path, bytes) in &read {
        version.add(&path.display().to_string(), bytes);
    }
    add_matched(&mut version, config);
    let files = read.into_iter().map(|(path, _)| path).collect();
    let validators = Validators::new(&pool);
    Ok(Contracts { methods, files, version: version.version(), descriptors: pool, config: config.clone(), validators })
}

/// Files read from disk, each with its bytes.
type FilesRead = Vec<(PathBuf, Vec<u8>)>;

/// The pool of every contract, and the files read for it with their bytes.
fn descriptor_pool(config: &ContractsConfig) -> Result<(DescriptorPool, FilesRead), ContractError> {
    let mut chain = ChainFileResolver::new();
    let includes = config.include_dirs();
    for include in &includes {
        chain.add(IncludeFileResolver::new(include.clone()));
    }
    chain.add(BuiltIn);
    chain.add(GoogleFileResolver::new());
    let resolver = Rc::new(Recording { inner: chain, read: RefCell::default() });

    let mut compiler = protox::Compiler::with_file_resolver(SharedResolver(resolver.clone()));
    compiler.include_imports(true);
    compiler.open_file(OPTIONS_PROTO_NAME).map_err(|e| ContractError(format!("built-in {OPTIONS_PROTO_NAME}: {e}")))?;
    for proto in expand(&config.protos, &includes, config.mode)? {
        compiler.open_file(&proto).map_err(|e| compile_error(&proto, &includes, e))?;
    }
    let mut read: FilesRead =
        resolver.read.take().into_iter().map(|(path, source)| (path, source.into_bytes())).collect();
    let mut pool = compiler.descriptor_pool();
    for set in &config.descriptor_sets {
        let bytes = std::fs::read(set)
            .map_err(|e| ContractError(format!("{}: cannot read the descriptor set: {e}", set.display())))?;
        read.push((set.clone(), bytes.clone()));
        pool.decode_file_descriptor_set(bytes.as_slice()).map_err(|e| {
            ContractError(format!(
                "{}: not a valid FileDescriptorSet ({e}); build it with `protoc --include_imports -o FILE`",
                set.display()
            ))
        })?;
    }
    read.sort();
    read.dedup_by(|a, b| a.0 == b.0);
    Ok((pool, read))
}

/// Lets the compiler own a resolver whose recording is read afterwards.
struct SharedResolver<R>(Rc<R>);

impl<R: FileResolver> FileResolver for SharedResolver<R> {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        self.0.open_file(name)
    }
}

/// The `.proto` files named, with patterns (`*.proto`, `shop/*.proto`)
/// expanded against the include paths, so that a ConfigMap of contracts can
/// be loaded whole without listing its keys. Names starting with `.` (a
/// volume's `..data`) are never matched. A pattern that matches nothing is
/// an error when the contracts are strict (every call would be refused), and
/// allowed when they are permissive: a pod whose contracts are not written
/// yet forwards every call by service name.
fn expand(protos: &[PathBuf], includes: &[PathBuf], mode: ContractMode) -> Result<Vec<PathBuf>, ContractError> {
    let mut expanded = Vec::new();
    for proto in protos {
        let pattern = proto.to_string_lossy();
        let Some(mut matched) = matches(proto, includes)? else {
            expanded.push(proto.clone());
            continue;
        };
        if matched.is_empty() {
            let includes = includes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            if mode == ContractMode::Permissive {
                tracing::warn!(%pattern, %includes, "contracts.protos matches no file: with contracts.mode permissive, \
                    every call is forwarded by service name with the default policy");
                continue;
            }
            return Err(ContractError(format!(
                "contracts.protos: `{pattern}` matches no file in contracts.include ({includes}); write the \
                 contracts there, or set contracts.mode: permissive to forward every call by service name"
            )));
        }
        matched.sort();
        expanded.extend(matched);
    }
    expanded.dedup();
    Ok(expanded)
}

/// The files a pattern of `contracts.protos` matches under the include
/// paths, relative to them; `None` when it is a plain name.
fn matches(proto: &Path, includes: &[PathBuf]) -> Result<Option<Vec<PathBuf>>, ContractError> {
    let pattern = proto.to_string_lossy();
    if !pattern.contains(['*', '?', '[']) {
        return Ok(None);
    }
    let options = glob::MatchOptions { require_literal_leading_dot: true, ..Default::default() };
    let mut matched = Vec::new();
    for include in includes {
        let full = include.join(proto);
        let paths = glob::glob_with(&full.to_string_lossy(), options)
            .map_err(|e| ContractError(format!("contracts.protos: `{pattern}` is not a file pattern: {e}")))?;
        matched.extend(paths.flatten().filter_map(|path| path.strip_prefix(include).ok().map(Path::to_path_buf)));
    }
    Ok(Some(matched))
}

/// Adds to `version` the names the patterns of `contracts.protos` match now,
/// so that a file added where a pattern looks (a new key of a ConfigMap)
/// changes the version, and is read.
pub fn add_matched(version: &mut Digest, config: &ContractsConfig) {
    let includes = config.include_dirs();
    for proto in &config.protos {
        if let Ok(Some(mut matched)) = matches(proto, &includes) {
            matched.sort();
            let names: Vec<String> = matched.iter().map(|p| p.display().to_string()).collect();
            version.add(&format!("contracts.protos {}", proto.display()), names.join("\n").as_bytes());
        }
    }
}

fn compile_error(proto: &Path, includes: &[PathBuf], error: protox::Error) -> ContractError {
    let includes = includes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    if error.is_file_not_found() {
        ContractError(format!(
            "{}: {error} (looked in contracts.include: {includes}); list the directory that holds it, or its imports, in contracts.include",
            proto.display()
        ))
    } else {
        let file = error.file().map_or_else(|| proto.display().to_string(), str::to_string);
        ContractError(format!("{file}: {error:?}").replace('\n', " "))
    }
}

fn build_table(pool: &DescriptorPool) -> Result<HashMap<Box<str>, Arc<MethodInfo>>, ContractError> {
    let method_ext = extension(pool, "protomesh.v1.method")?;
    let service_ext = extension(pool, "protomesh.v1.service")?;
    let mut methods = HashMap::new();
    for service in pool.services() {
        let service_policy = policy_option(&service.options(), &service_ext)
            .map_err(|e| ContractError(format!("{}: {}: {e}", service.parent_file().name(), service.full_name())))?;
        for method in service.methods() {
            let info = method_info(&method, &method_ext, service_policy.as_ref())?;
            methods.insert(info.path.clone().into_boxed_str(), Arc::new(info));
        }
    }
    Ok(methods)
}

fn extension(pool: &DescriptorPool, name: &str) -> Result<ExtensionDescriptor, ContractError> {
    pool.get_extension_by_name(name)
        .ok_or_else(|| ContractError(format!("built-in {OPTIONS_PROTO_NAME} lacks the extension {name}")))
}

fn method_info(
    method: &MethodDescriptor,
    method_ext: &ExtensionDescriptor,
    service_policy: Option<&DynamicMessage>,
) -> Result<MethodInfo, ContractError> {
    let service = method.parent_service();
    let path = format!("/{}/{}", service.full_name(), method.name());
    let file = service.parent_file().name().to_string();
    let at = |problem: String| ContractError(format!("{file}: {}/{}: {problem}", service.full_name(), method.name()));
    let options = method.options();
    let method_policy = policy_option(&options, method_ext).map_err(at)?;
    let contract = ContractPolicy::from_options(method_policy.as_ref(), service_policy).map_err(at)?;
    let idempotency = match options.get_field_by_name("idempotency_level").as_deref() {
        Some(Value::EnumNumber(1)) => Idempotency::NoSideEffects,
        Some(Value::EnumNumber(2)) => Idempotency::Idempotent,
        _ => Idempotency::Unknown,
    };
    let shape = match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => CallShape::Unary,
        (false, true) => CallShape::ServerStreaming,
        (true, false) => CallShape::ClientStreaming,
        (true, true) => CallShape::BidiStreaming,
    };
    Ok(MethodInfo {
        service: service.full_name().to_string(),
        method: method.name().to_string(),
        path,
        shape,
        input: method.input().full_name().to_string(),
        output: method.output().full_name().to_string(),
        idempotency,
        contract,
        file,
    })
}

/// The `protomesh.v1.Policy` message an option holds, if it is set.
fn policy_option(options: &DynamicMessage, ext: &ExtensionDescriptor) -> Result<Option<DynamicMessage>, String> {
    if !options.has_extension(ext) {
        return Ok(None);
    }
    match options.get_extension(ext).as_ref() {
        Value::Message(message) => Ok(Some(message.clone())),
        other => Err(format!("option ({}) holds {other:?}, not a Policy message", ext.full_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{BreakingChanges, ContractMode};
    use crate::policy::source::Source;
    use std::time::Duration;

    fn config(protos: &[&str], include: &[&Path]) -> ContractsConfig {
        ContractsConfig {
            protos: protos.iter().map(PathBuf::from).collect(),
            include: include.iter().map(|p| p.to_path_buf()).collect(),
            descriptor_sets: vec![],
            mode: ContractMode::Strict,
            breaking_changes: BreakingChanges::Allow,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn loads_the_example_contracts_with_shapes_and_options() {
        let contracts = load(&config(&["examples/shop.proto", "examples/echo.proto"], &[Path::new("proto")])).unwrap();
        let get = contracts.method("/shop.v1.Inventory/GetStock").unwrap();
        assert_eq!(get.shape, CallShape::Unary);
        assert_eq!(get.idempotency, Idempotency::NoSideEffects);
        let method = get.contract.method.as_ref().unwrap();
        assert_eq!(method.timeout, Some(Duration::from_millis(250)));
        assert_eq!(method.retry.as_ref().unwrap().max_attempts, 3);
        assert_eq!(get.contract.allowed_callers.as_ref().unwrap().source, Source::ServiceOption);
        assert_eq!(contracts.method("/shop.v1.Inventory/WatchStock").unwrap().shape, CallShape::ServerStreaming);
        assert_eq!(contracts.method("/shop.v1.Inventory/Reserve").unwrap().shape, CallShape::ClientStreaming);
        assert_eq!(contracts.method("/shop.v1.Pricing/Quote").unwrap().shape, CallShape::BidiStreaming);
        let unary = contracts.method("/echo.v1.Echo/Unary").unwrap();
        assert!(unary.contract.method.is_none());
        assert_eq!(unary.contract.service.as_ref().unwrap().timeout, Some(Duration::from_secs(30)));
        assert!(contracts.method("/shop.v1.Inventory/Nope").is_none());
        assert_eq!(contracts.services()["shop.v1.Checkout"].len(), 1);
        assert_eq!((get.input.as_str(), get.output.as_str()), ("shop.v1.StockRequest", "shop.v1.Stock"));
        let mut files: Vec<_> = contracts.files().iter().map(|f| f.display().to_string()).collect();
        files.sort();
        // The include path holds copies of the options and google.api, so those are read; google.protobuf is built in.
        assert_eq!(
            files,
            [
                "proto/examples/echo.proto",
                "proto/examples/shop.proto",
                "proto/google/api/annotations.proto",
                "proto/google/api/http.proto",
                "proto/protomesh/v1/options.proto"
            ]
        );
    }

    #[test]
    fn well_known_imports_and_the_built_in_options_resolve_without_copies() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "clock.proto",
            r#"syntax = "proto3";
            package clock.v1;
            import "google/protobuf/timestamp.proto";
            import "protomesh/v1/options.proto";
            service Clock {
              rpc Now(google.protobuf.Timestamp) returns (google.protobuf.Timestamp) {
                option idempotency_level = IDEMPOTENT;
                option (protomesh.v1.method) = { concurrency: { max_in_flight: 4 } };
              }
            }"#,
        );
        let contracts = load(&config(&["clock.proto"], &[dir.path()])).unwrap();
        let now = contracts.method("/clock.v1.Clock/Now").unwrap();
        assert_eq!(now.idempotency, Idempotency::Idempotent);
        assert_eq!(now.contract.method.as_ref().unwrap().concurrency.as_ref().unwrap().max_in_flight, 4);
    }

    #[test]
    fn patterns_load_every_matching_contract_but_not_a_volumes_hidden_copies() {
        let dir = tempfile::tempdir().unwrap();
        let message = |package: &str| {
            format!("syntax = \"proto3\"; package {package}; message M {{}} service S {{ rpc M(M) returns (M); }}")
        };
        write(dir.path(), "a.proto", &message("a"));
        write(dir.path(), "b.proto", &message("b"));
        std::fs::create_dir(dir.path().join("..2026_11_30")).unwrap();
        write(&dir.path().join("..2026_11_30"), "c.proto", &message("c"));
        let contracts = load(&config(&["*.proto"], &[dir.path()])).unwrap();
        assert!(contracts.method("/a.S/M").is_some() && contracts.method("/b.S/M").is_some());
        assert!(contracts.method("/c.S/M").is_none());
        let err = load(&config(&["*.protobuf"], &[dir.path()])).unwrap_err().to_string();
        assert!(err.starts_with("contracts.protos: `*.protobuf` matches no file in contracts.include"), "{err}");
        assert!(err.ends_with("or set contracts.mode: permissive to forward every call by service name"), "{err}");
    }

    #[test]
    fn a_file_added_where_a_pattern_looks_changes_the_version_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let message = |package: &str| format!("syntax = \"proto3\"; package {package}; message M {{}}");
        write(dir.path(), "a.proto", &message("a"));
        let contracts = load(&config(&["*.proto"], &[dir.path()])).unwrap();
        assert_eq!(contracts.version_on_disk(), contracts.version(), "unchanged: nothing to reload");
        write(dir.path(), "b.proto", &message("b"));
        assert_ne!(contracts.version_on_disk(), contracts.version(), "a new file to read");
        let again = load(&config(&["*.proto"], &[dir.path()])).unwrap();
        assert_eq!(again.version_on_disk(), again.version());
    }

    #[test]
    fn permissive_contracts_may_be_none_yet() {
        let empty = tempfile::tempdir().unwrap();
        let config = ContractsConfig { mode: ContractMode::Permissive, ..config(&["*.proto"], &[empty.path()]) };
        let contracts = load(&config).expect("no contracts: every call forwarded by service name");
        assert!(contracts.method("/a.S/M").is_none());
    }

    #[test]
    fn descriptor_sets_keep_their_custom_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut compiler = protox::Compiler::new(["proto"]).unwrap();
        compiler.include_imports(true);
        compiler.open_file("examples/shop.proto").unwrap();
        let set = dir.path().join("shop.binpb");
        std::fs::write(&set, compiler.encode_file_descriptor_set()).unwrap();
        let mut from_set = config(&[], &[]);
        from_set.descriptor_sets = vec![set];
        let contracts = load(&from_set).unwrap();
        let get = contracts.method("/shop.v1.Inventory/GetStock").unwrap();
        assert_eq!(get.contract.method.as_ref().unwrap().timeout, Some(Duration::from_millis(250)));
    }

    #[test]
    fn errors_name_the_file_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&config(&["missing.proto"], &[dir.path()])).unwrap_err().to_string();
        assert!(err.starts_with("missing.proto:") && err.contains("contracts.include"), "{err}");

        write(dir.path(), "broken.proto", "syntax = \"proto3\"; service S { rpc M(Nope) returns (Nope); }");
        let err = load(&config(&["broken.proto"], &[dir.path()])).unwrap_err().to_string();
        assert!(err.starts_with("broken.proto:") && err.contains("Nope"), "{err}");

        write(
            dir.path(),
            "badopt.proto",
            r#"syntax = "proto3"; package p; import "protomesh/v1/options.proto";
            message E {}
            service S { rpc M(E) returns (E) { option (protomesh.v1.method) = { timeout: "soon" }; } }"#,
        );
        let err = load(&config(&["badopt.proto"], &[dir.path()])).unwrap_err().to_string();
        assert!(err.starts_with("badopt.proto: p.S/M: (protomesh.v1.method).timeout:"), "{err}");

        let bad_set = dir.path().join("bad.binpb");
        std::fs::write(&bad_set, b"not a descriptor set").unwrap();
        let mut from_set = config(&[], &[]);
        from_set.descriptor_sets = vec![bad_set];
        let err = load(&from_set).unwrap_err().to_string();
        assert!(err.contains("bad.binpb: not a valid FileDescriptorSet"), "{err}");
    }
}
