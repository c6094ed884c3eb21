//! Reading the config: the YAML file, then `PROTOMESH_*` environment variables on
//! top, then typed parsing and validation. Every error names where the bad value
//! came from (the file or the variable), the field, and what would be valid.

use std::path::Path;

use serde_json::{Map, Value};

use super::Config;
use crate::digest::Digest;

/// Environment variables read for something other than a config field.
const RESERVED_ENV: &[&str] =
    &["PROTOMESH_CONFIG", "PROTOMESH_CONFIG_OPTIONAL", "PROTOMESH_LOG", "PROTOMESH_LOG_FORMAT"];
const ENV_PREFIX: &str = "PROTOMESH_";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Loads the config from `file` (if any) and the given environment.
///
/// An environment variable `PROTOMESH_A__B` sets field `a.b` (`__` separates
/// levels; names are lowercased). Its value is taken as a string, or parsed as
/// YAML when it starts with `[` or `{`, which sets whole lists such as
/// `PROTOMESH_OUTBOUND__UPSTREAMS`. A value of digits only is a number.
pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
    load_versioned(file, env).map(|(config, _)| config)
}

/// Loads as [`load`] does, with a digest of what was read: the file's bytes
/// and the `PROTOMESH_*` variables.
pub fn load_versioned(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Config, String), ConfigError> {
    let merged = Merged::read(file, env)?;
    let config: Config = merged.typed(merged.tree.clone(), "")?;
    config
        .validate()
        .map_err(|(field, problem)| ConfigError(format!("{}: field `{field}`: {problem}", merged.source_of(&field))))?;
    Ok((config, merged.version))
}

/// One section of the config, read as [`load`] reads it (the file, then the
/// variables), without the rest: `check --breaking` needs only `contracts`.
pub fn load_section<T: serde::de::DeserializeOwned + Default>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    section: &str,
) -> Result<T, ConfigError> {
    let merged = Merged::read(file, env)?;
    match merged.tree.get(section) {
        Some(value) => merged.typed(value.clone(), section),
        None => Ok(T::default()),
    }
}

/// The file's YAML with the variables set on top, and what set each field.
struct Merged {
    tree: Value,
    /// (field path, variable), in the order set.
    overrides: Vec<(String, String)>,
    file_name: String,
    version: String,
}

impl Merged {
    fn read(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Merged, ConfigError> {
        let file_name = file.map_or_else(|| "<no config file>".to_string(), |p| p.display().to_string());
        let bytes = match file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| ConfigError(format!("{}: cannot read the config file: {e}", path.display())))?,
            ),
            None => None,
        };
        let env = ours(env);
        let version = version(bytes.as_deref(), &env);
        let mut tree = match (file, &bytes) {
            (Some(path), Some(bytes)) => parse_yaml(path, bytes)?,
            _ => Value::Object(Map::new()),
        };
        let mut overrides: Vec<(String, String)> = Vec::new();
        for (name, raw) in env {
            let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            // A variable naming no section is not ours: Kubernetes sets `<SERVICE>_SERVICE_HOST`,
            // `<SERVICE>_PORT` and the like for every Service, including any named `protomesh-...`.
            if !serde_aux::serde_introspection::serde_introspect::<Config>().contains(&path[0].as_str()) {
                tracing::warn!(variable = %name, "ignoring an environment variable that names no config field");
                continue;
            }
            if path.iter().any(String::is_empty) {
                return Err(ConfigError(format!(
                    "environment variable {name}: empty field name; separate levels with `__`, e.g. PROTOMESH_INBOUND__APP"
                )));
            }
            let value = if raw.trim_start().starts_with(['[', '{']) {
                serde_saphyr::from_str::<Value>(&raw)
                    .map_err(|e| ConfigError(format!("environment variable {name}: invalid YAML value: {e}")))?
            } else if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
                raw.parse::<u64>().map_or(Value::String(raw), Value::from)
            } else {
                Value::String(raw)
            };
            set_path(&mut tree, &path, value).map_err(|parent| {
                ConfigError(format!(
                    "environment variable {name}: field `{parent}` is not a mapping, so it has no field `{}`",
                    path.join(".")
                ))
            })?;
            overrides.push((path.join("."), name));
        }
        Ok(Merged { tree, overrides, file_name, version })
    }

    /// Where `field` was set: the last variable that set it or a field above it, else the file.
    fn source_of(&self, field: &str) -> String {
        self.overrides
            .iter()
            .rev()
            .find(|(path, _)| {
                field == path || field.starts_with(&format!("{path}.")) || field.starts_with(&format!("{path}["))
            })
            .map_or_else(|| self.file_name.clone(), |(_, var)| format!("environment variable {var}"))
    }

    /// `value` as a `T`, found at `section` of the tree (`""`: the whole of it).
    fn typed<T: serde::de::DeserializeOwned>(&self, value: Value, section: &str) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let inner = e.path().to_string();
            let field = match (section, inner.as_str()) {
                ("", _) => inner.clone(),
                (_, ".") => section.to_string(),
                _ => format!("{section}.{inner}"),
            };
            let problem = e.into_inner().to_string();
            if field == "." {
                ConfigError(format!("{}: {problem}", self.file_name))
            } else {
                ConfigError(format!("{}: field `{field}`: {problem}", self.source_of(&field)))
            }
        })
    }
}

/// The `PROTOMESH_*` variables that are config, sorted.
fn ours(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<_> =
        env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && !RESERVED_ENV.contains(&k.as_str())).collect();
    env.sort();
    env
}

fn version(file: Option<&[u8]>, env: &[(String, String)]) -> String {
    let mut digest = Digest::default();
    digest.add("file", file.unwrap_or_default());
    for (name, value) in env {
        digest.add(name, value.as_bytes());
    }
    digest.version()
}

/// The version the config has now, without parsing it: it differs from the
/// one [`load_versioned`] gave once the file or the variables changed.
pub fn version_on_disk(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> String {
    let bytes = file.map(|path| std::fs::read(path).unwrap_or_default());
    version(bytes.as_deref(), &ours(env))
}

fn parse_yaml(path: &Path, bytes: &[u8]) -> Result<Value, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ConfigError(format!("{}: cannot read the config file: not UTF-8 text ({e})", path.display())))?;
    let value: Value =
        serde_saphyr::from_str(text).map_err(|e| ConfigError(format!("{}: invalid YAML: {e}", path.display())))?;
    match value {
        Value::Null => Ok(Value::Object(Map::new())),
        Value::Object(_) => Ok(value),
        _ => Err(ConfigError(format!(
            "{}: the top level must be a mapping of fields (identity:, contracts:, outbound:, inbound:)",
            path.display()
        ))),
    }
}

/// Sets `path` in the tree, creating mappings on the way. Fails with the dotted
/// path of a value on the way that is not a mapping.
fn set_path(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let mut node = tree;
    for (depth, key) in path.iter().enumerate() {
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(map) = node else {
            return Err(path[..depth].join("."));
        };
        if depth + 1 == path.len() {
            map.insert(key.clone(), value);
            return Ok(());
        }
        node = map.entry(key.clone()).or_insert(Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const VALID: &str = "
identity:
  cert: a.pem
  key: a-key.pem
  trust_bundle: ca.pem
contracts:
  protos: [examples/echo.proto]
  include: [proto]
outbound:
  upstreams:
    - services: [echo.v1.Echo]
      endpoints: ['127.0.0.1:4143', 'echo.default.svc.cluster.local:4143']
      identity: spiffe://td/ns/default/sa/echo
inbound:
  app: 127.0.0.1:8080
";

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn loads_a_valid_file_with_defaults() {
        let file = file_with(VALID);
        let config = load(Some(file.path()), env(&[])).unwrap();
        assert_eq!(config.outbound.listen.to_string(), "127.0.0.1:4140");
        assert_eq!(config.outbound.upstreams[0].endpoints.len(), 2);
        let inbound = config.inbound.unwrap();
        assert_eq!(inbound.listen.to_string(), "0.0.0.0:4143");
        assert_eq!(inbound.app.unwrap().to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = file_with(VALID);
        let config = load(
            Some(file.path()),
            env(&[
                ("PROTOMESH_INBOUND__APP", "127.0.0.1:9090"),
                ("PROTOMESH_SERVICE_NAME", "checkout"),
                ("PROTOMESH_OUTBOUND__CONNECT_TIMEOUT", "250ms"),
                ("PROTOMESH_LOG", "debug"),
                ("PROTOMESH_POLICY__MAX_REPLAY_BYTES", "1024"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.inbound.unwrap().app.unwrap().to_string(), "127.0.0.1:9090");
        assert_eq!(config.service_name.as_deref(), Some("checkout"));
        assert_eq!(config.outbound.connect_timeout.as_millis(), 250);
        assert_eq!(config.policy.max_replay_bytes, 1024);
    }

    #[test]
    fn policy_overrides_are_checked_by_key_and_field() {
        let with = |policy: &str| file_with(&format!("{VALID}policy:\n{policy}"));
        let config = load(
            Some(with("  defaults: {timeout: 5s}\n  methods:\n    echo.v1.Echo/Unary: {retry: {max_attempts: 3, retryable_codes: [UNAVAILABLE]}}\n").path()),
            env(&[]),
        )
        .unwrap();
        assert_eq!(config.policy.methods["echo.v1.Echo/Unary"].retry.as_ref().unwrap().max_attempts, 3);

        let err = load(Some(with("  methods:\n    Unary: {timeout: 1s}\n").path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("field `policy.methods[\"Unary\"]`") && err.contains("pkg.Service/*"), "{err}");
        let err = load(Some(with("  methods:\n    echo.v1.Echo/*: {retry: {max_attempts: 3}}\n").path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `policy.methods[\"echo.v1.Echo/*\"]`: retry.retryable_codes"), "{err}");
        let err =
            load(Some(with("  defaults: {retry: {max_attempts: 2, retryable_codes: [UNAVAIL]}}\n").path()), env(&[]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("`UNAVAIL` is not a gRPC status code"), "{err}");
    }

    #[test]
    fn environment_alone_is_a_whole_config() {
        let config = load(
            None,
            env(&[
                ("PROTOMESH_IDENTITY__CERT", "/certs/tls.crt"),
                ("PROTOMESH_IDENTITY__KEY", "/certs/tls.key"),
                ("PROTOMESH_IDENTITY__TRUST_BUNDLE", "/certs/ca.crt"),
                ("PROTOMESH_CONTRACTS__PROTOS", "[shop.proto]"),
                (
                    "PROTOMESH_OUTBOUND__UPSTREAMS",
                    "[{services: [shop.v1.Pricing], endpoints: ['pricing:4143'], identity: 'spiffe://td/pricing'}]",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(config.outbound.upstreams[0].services, ["shop.v1.Pricing"]);
        assert!(config.inbound.is_none());
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_fix() {
        let file = file_with(&VALID.replace("app: 127.0.0.1:8080", "app: localhost"));
        let err = load(Some(file.path()), env(&[])).unwrap_err().to_string();
        assert!(err.starts_with(&file.path().display().to_string()), "{err}");
        assert!(err.contains("field `inbound.app`"), "{err}");
        assert!(err.contains("`localhost` is not an IP:port socket address; write e.g. 127.0.0.1:8080"), "{err}");

        let file = file_with(&VALID.replace("identity: spiffe://td/ns/default/sa/echo", "identity: echo"));
        let err = load(Some(file.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("field `outbound.upstreams[0].identity`"), "{err}");
        assert!(err.contains("spiffe://<trust-domain>/<path>"), "{err}");

        let file = file_with(&VALID.replace("  app:", "  ap:"));
        let err = load(Some(file.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("unknown field `ap`") && err.contains("`app`"), "{err}");
    }

    #[test]
    fn the_readme_config_example_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```yaml\n").expect("README has a YAML example") + "```yaml\n".len();
        let example = &readme[start..start + readme[start..].find("```").expect("the example ends")];
        let config = load(Some(file_with(example).path()), env(&[])).unwrap();
        assert_eq!(config.policy.methods.len(), 8);
        assert_eq!(config.policy.methods["shop.v1.Cart/*"].validate, Some(true));
        assert_eq!(
            config.policy.outlier_detection,
            crate::policy::outlier::OutlierConfig {
                failure_rate: config.policy.outlier_detection.failure_rate.clone(),
                ..Default::default()
            },
            "the README shows outlier detection's defaults"
        );
        assert_eq!(config.limits, super::super::LimitsConfig::default(), "the README shows the limits' defaults");
    }

    #[test]
    fn kubernetes_service_variables_are_not_config() {
        let file = file_with(VALID);
        let config = load(
            Some(file.path()),
            env(&[
                ("PROTOMESH_SERVICE_HOST", "10.0.0.1"),
                ("PROTOMESH_PORT", "tcp://10.0.0.1:4143"),
                ("PROTOMESH_INBOUND_PORT_4143_TCP_ADDR", "10.0.0.2"),
            ]),
        );
        assert!(config.is_ok(), "{config:?}");
        let err = load(Some(file.path()), env(&[("PROTOMESH_INBOUND__LISEN", "0.0.0.0:1")])).unwrap_err().to_string();
        assert!(err.starts_with("environment variable PROTOMESH_INBOUND__LISEN"), "{err}");
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn errors_from_the_environment_name_the_variable() {
        let file = file_with(VALID);
        let err =
            load(Some(file.path()), env(&[("PROTOMESH_OUTBOUND__CONNECT_TIMEOUT", "soon")])).unwrap_err().to_string();
        assert!(err.starts_with("environment variable PROTOMESH_OUTBOUND__CONNECT_TIMEOUT"), "{err}");
        assert!(err.contains("250ms"), "{err}");
    }

    #[test]
    fn cross_field_problems_are_reported_by_field() {
        let twice = VALID.replace("[echo.v1.Echo]", "[echo.v1.Echo, echo.v1.Echo]");
        let err = load(Some(file_with(&twice).path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("outbound.upstreams[0].services[1]") && err.contains("already routed"), "{err}");

        let no_identity = VALID.replace("      identity: spiffe://td/ns/default/sa/echo\n", "");
        let err = load(Some(file_with(&no_identity).path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("outbound.upstreams[0].identity") && err.contains("not a k8s:// Service"), "{err}");
        let services = no_identity
            .replace("['127.0.0.1:4143', 'echo.default.svc.cluster.local:4143']", "['k8s://echo.default:4143']");
        load(Some(file_with(&services).path()), env(&[])).expect("k8s:// endpoints need no identity for all");

        let no_port = VALID.replace("'127.0.0.1:4143'", "'127.0.0.1'");
        let err = load(Some(file_with(&no_port).path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("outbound.upstreams[0].endpoints[0]") && err.contains("port"), "{err}");
    }

    #[test]
    fn nothing_is_sent_to_the_sidecars_own_listeners_as_if_it_were_the_app() {
        let app_is_outbound = VALID.replace("app: 127.0.0.1:8080", "app: 127.0.0.1:4140");
        let err = load(Some(file_with(&app_is_outbound).path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("inbound.app") && err.contains("sidecar's own outbound.listen"), "{err}");

        let probe = r#"{"/app-probe/app/readiness": {"grpc": {"port": 4191}}}"#;
        let err = load(Some(file_with(VALID).path()), env(&[("PROTOMESH_ADMIN__APP_PROBES", probe)]));
        let err = err.unwrap_err().to_string();
        assert!(err.contains("admin.app_probes./app-probe/app/readiness") && err.contains("admin.listen"), "{err}");
    }

    #[test]
    fn unreadable_or_non_mapping_files_are_named() {
        let err = load(Some(Path::new("/nonexistent/protomesh.yaml")), env(&[])).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/protomesh.yaml: cannot read"), "{err}");
        let err = load(Some(file_with("- a\n- b\n").path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("top level must be a mapping"), "{err}");
    }
}
