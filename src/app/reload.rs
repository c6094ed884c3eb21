//! Reloading: the config file, the contracts and the identity files are read
//! and checked whole, the routes are built from them with the live state
//! kept, and only then swapped in. Anything invalid leaves the running
//! version in service and is reported: logged with its file and field,
//! counted in `protomesh_config_reloads_total{result="failed"}`, and shown
//! on `/config` until a good version replaces it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::config::{self, Config};
use crate::contract::breaking::breaking_changes;
use crate::contract::{BreakingChanges, Contracts};
use crate::effective;
use crate::identity::{Credentials, Identity};
use crate::proxy::inbound::InboundRoutes;
use crate::proxy::registry::Registries;
use crate::proxy::routes::CurrentRoutes;
use crate::proxy::routes::Routes;
use crate::telemetry::Tracing;

/// Where the config comes from: a file (optional) and the environment.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    /// A missing `file` reads as empty, and is read once it appears (the
    /// injector's default ConfigMap, which a namespace may not have).
    pub file_optional: bool,
    /// The process's environment, of which the `PROTOMESH_*` variables count.
    pub env: Vec<(String, String)>,
}

impl ConfigSource {
    /// A config file and no variables.
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource { file: Some(path.into()), file_optional: false, env: Vec::new() }
    }

    /// As `protomesh run` reads it: the file, if any, and this process's environment.
    pub fn process(file: Option<PathBuf>, file_optional: bool) -> ConfigSource {
        ConfigSource { file, file_optional, env: std::env::vars().collect() }
    }
}

/// One version of the inputs, read and checked whole.
pub struct Inputs {
    pub config: Config,
    pub contracts: Contracts,
    pub credentials: Credentials,
    config_version: String,
}

impl Inputs {
    /// Errors name the file, the field and, where one is known, the fix.
    pub fn read(source: &ConfigSource) -> Result<Inputs, String> {
        let file = source.file.as_deref().filter(|file| !source.file_optional || file.exists());
        let (config, config_version) =
            config::load_versioned(file, source.env.iter().cloned()).map_err(|e| e.to_string())?;
        let contracts = Contracts::load(&config.contracts).map_err(|e| format!("contracts: {e}"))?;
        // The request rules are compiled here, before anything is built, so
        // that `protomesh check` and a reload that must be refused say so
        // first; the contracts keep them for the inbound routes. The JSON
        // routes are checked here for the same reason.
        if let Some(inbound) = &config.inbound {
            effective::check_request_rules(&contracts, &config.policy).map_err(|e| format!("contracts: {e}"))?;
            InboundRoutes::json_routes(inbound, &config.policy, &contracts).map_err(|e| format!("contracts: {e}"))?;
        }
        let credentials = Credentials::read(&config.identity)?;
        Ok(Inputs { config, contracts, credentials, config_version })
    }

    /// The versions of the config, the contracts and the identity files read.
    pub fn versions(&self) -> Versions {
        [self.config_version.clone(), self.contracts.version().to_string(), self.credentials.version.clone()]
    }
}

/// When each input was loaded, and its version.
#[derive(Clone, Debug)]
struct Loaded {
    version: String,
    at: SystemTime,
}

impl Loaded {
    fn now(version: &str) -> Loaded {
        Loaded { version: version.to_string(), at: SystemTime::now() }
    }

    fn json(&self) -> Value {
        json!({ "version": self.version, "loaded_at": rfc3339(self.at) })
    }
}

fn rfc3339(at: SystemTime) -> String {
    let format = time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from(at).format(&format).unwrap_or_default()
}

/// The versions of the config, the contracts and the identity files.
pub type Versions = [String; 3];

/// What is in service, and what the last reload said.
struct Running {
    config: Loaded,
    contracts: Loaded,
    identity: Loaded,
    /// When the last failure was, what it said, and the versions that failed.
    last_failure: Option<(SystemTime, String, Versions)>,
    failures: u64,
    restart_needed: Vec<String>,
    breaking_changes: Vec<String>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Every input reads as the version in service.
    Unchanged,
    /// The new version is in service.
    Applied,
    /// The running version stays; the error names the file and field.
    Failed(String),
}

/// Takes new versions of the inputs into the running sidecar.
pub struct Reloader {
    source: ConfigSource,
    routes: CurrentRoutes,
    identity: Arc<Identity>,
    tracing: Option<Arc<Tracing>>,
    /// One reload at a time, with the live state the routes draw on.
    registries: tokio::sync::Mutex<Registries>,
    running: Mutex<Running>,
}

impl Reloader {
    pub fn new(
        source: ConfigSource,
        routes: CurrentRoutes,
        [config, contracts, identity_files]: Versions,
        identity: Arc<Identity>,
        registries: Registries,
        tracing: Option<Arc<Tracing>>,
    ) -> Reloader {
        let running = Running {
            config: Loaded::now(&config),
            contracts: Loaded::now(&contracts),
            identity: Loaded::now(&identity_files),
            last_failure: None,
            failures: 0,
            restart_needed: Vec::new(),
            breaking_changes: Vec::new(),
        };
        Reloader {
            source,
            routes,
            identity,
            tracing,
            registries: tokio::sync::Mutex::new(registries),
            running: Mutex::new(running),
        }
    }

    /// The routes in service.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.load_full()
    }

    /// Reads the inputs again and, if any changed, takes the new version
    /// whole or not at all. Inputs that failed before and have not changed
    /// since fail again without being read.
    pub async fn reload(&self) -> ReloadOutcome {
        let mut registries = self.registries.lock().await;
        let on_disk = self.on_disk();
        {
            let mut running = self.running.lock().expect("reload state lock");
            if on_disk == [&running.config, &running.contracts, &running.identity].map(|l| l.version.clone()) {
                // Back to the version in service: nothing fails to load any more.
                running.last_failure = None;
                registries.metrics.reload_failing(false);
                return ReloadOutcome::Unchanged;
            }
            if let Some((_, error, failed)) = &running.last_failure
                && *failed == on_disk
            {
                return ReloadOutcome::Failed(error.clone());
            }
        }
        match self.apply(&mut registries).await {
            Ok(()) => {
                registries.metrics.reload("applied");
                registries.metrics.reload_failing(false);
                ReloadOutcome::Applied
            }
            Err(error) => {
                tracing::warn!(%error, "reload failed; the running config, contracts and identity stay in service");
                registries.metrics.reload("failed");
                registries.metrics.reload_failing(true);
                let mut running = self.running.lock().expect("reload state lock");
                running.failures += 1;
                running.last_failure = Some((SystemTime::now(), error.clone(), on_disk));
                ReloadOutcome::Failed(error)
            }
        }
    }

    /// The versions of the inputs as they read now, without parsing them.
    fn on_disk(&self) -> Versions {
        let routes = self.routes();
        [
            config::version_on_disk(self.source.file.as_deref(), self.source.env.iter().cloned()),
            routes.contracts.version_on_disk(),
            routes.config.identity.version_on_disk(),
        ]
    }

    async fn apply(&self, registries: &mut Registries) -> Result<(), String> {
        let Inputs { mut config, contracts, credentials, config_version } = Inputs::read(&self.source)?;
        let current = self.routes();
        let restart_needed = current.config.keep_running(&mut config);
        for setting in &restart_needed {
            tracing::warn!(%setting, "this setting changed but applies only after a restart; the running value stays");
        }
        let breaking: Vec<String> =
            breaking_changes(&current.contracts, &contracts).iter().map(ToString::to_string).collect();
        for change in &breaking {
            tracing::warn!(%change, "breaking contract change");
        }
        if !breaking.is_empty() && config.contracts.breaking_changes == BreakingChanges::Refuse {
            return Err(format!(
                "contracts: {} breaking change(s), refused by contracts.breaking_changes: refuse: {}",
                breaking.len(),
                breaking.join("; ")
            ));
        }
        self.identity.check(&credentials)?;
        let versions = (contracts.version().to_string(), credentials.version.clone());
        // Building stages its changes to live state; they apply only once
        // every step that can fail has passed.
        let built = Routes::build(Arc::new(config), Arc::new(contracts), registries, self.tracing.clone()).await;
        let accepted = built.and_then(|routes| Ok((routes, self.identity.renew(credentials)?)));
        let routes = match accepted {
            Ok((routes, ())) => routes,
            Err(error) => {
                registries.abort();
                return Err(error);
            }
        };
        registries.commit();
        self.routes.store(Arc::new(routes));
        let mut running = self.running.lock().expect("reload state lock");
        running.config = Loaded::now(&config_version);
        running.contracts = Loaded::now(&versions.0);
        running.identity = Loaded::now(&versions.1);
        running.restart_needed = restart_needed;
        running.breaking_changes = breaking;
        running.last_failure = None;
        tracing::info!(config = %config_version, contracts = %versions.0, identity = %versions.1, "reloaded");
        Ok(())
    }

    /// What `/config` shows of the versions in service and of the last reload.
    pub fn status(&self) -> Value {
        let routes = self.routes();
        let running = self.running.lock().expect("reload state lock");
        let file = self.source.file.as_ref().map(|f| f.display().to_string());
        let mut identity = running.identity.json();
        identity["id"] = json!(self.identity.id.as_str());
        identity["cert"] = json!(routes.config.identity.cert.display().to_string());
        let mut config = running.config.json();
        config["file"] = json!(file);
        // An optional file that is not there (yet) is read as empty.
        config["file_present"] = json!(self.source.file.as_ref().map(|f| f.exists()));
        let mut contracts = running.contracts.json();
        contracts["files"] =
            json!(routes.contracts.files().iter().map(|f| f.display().to_string()).collect::<Vec<_>>());
        // Permissive: methods outside the contracts are forwarded, counted under method `*`.
        contracts["mode"] = json!(routes.config.contracts.mode.as_str());
        json!({
            "identity": identity,
            "config": config,
            "contracts": contracts,
            "reload": {
                "failures": running.failures,
                "last_failure": running.last_failure.as_ref().map(|(at, error, _)| json!({ "at": rfc3339(*at), "error": error })),
                "restart_needed": running.restart_needed,
                "breaking_changes": running.breaking_changes,
            },
        })
    }

    /// The directories whose changes may change an input: those of the
    /// config file, the contracts and their include paths, and the identity files.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let routes = self.routes();
        let config = &routes.config;
        let files = self.source.file.iter().cloned();
        let files = files.chain(routes.contracts.files().iter().cloned());
        let files = files.chain(config.identity.files().map(|(_, path)| path.to_path_buf()));
        let parents = files.filter_map(|file| {
            file.parent().map(|p| if p.as_os_str().is_empty() { ".".into() } else { p.to_path_buf() })
        });
        let mut dirs: Vec<PathBuf> = parents.chain(config.contracts.include.iter().cloned()).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}
