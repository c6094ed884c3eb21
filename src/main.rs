#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use protomesh::app::admin::SetLogLevel;
use protomesh::app::{self, ConfigSource, Inputs, Options};
use protomesh::app::{awaiting, tapping};
use protomesh::capture::{self, CaptureRules};
use protomesh::check::breaking;
use protomesh::config;
use protomesh::contract::breaking::Category;
use protomesh::duration;
use protomesh::identity::{SpiffeId, certs};
use protomesh::kube::manifest::{self, Manifests};
use protomesh::kube::settings::{CaptureBy, Defaults};
use protomesh::kube::webhook::{self, WebhookConfig};

// A call allocates a few dozen small blocks that die within it; mimalloc serves
// them faster than glibc malloc, which misses its thread cache under bursts.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A gRPC service-mesh sidecar whose policy lives in the .proto contracts.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (SIGTERM drains and exits; SIGHUP reloads).
    Run {
        /// YAML config; every field can also be set by a PROTOMESH_* variable.
        #[arg(long, env = "PROTOMESH_CONFIG")]
        config: Option<PathBuf>,
        /// A missing --config file reads as empty, and is read once it appears.
        #[arg(long, env = "PROTOMESH_CONFIG_OPTIONAL")]
        config_optional: bool,
    },
    /// Validate the config, identity and contracts, and print every method's policy; with --breaking,
    /// list what the contracts break of another version of them.
    Check {
        #[arg(long, env = "PROTOMESH_CONFIG")]
        config: Option<PathBuf>,
        /// Compare the contracts with --against by buf's breaking rules, and warn of policy that
        /// refuses more; exits 100 when something breaks.
        #[arg(long, requires = "against")]
        breaking: bool,
        /// The other version: a directory, .proto file or descriptor set, or a git branch, tag or commit.
        #[arg(long, requires = "breaking")]
        against: Option<String>,
        /// The rules to apply, by buf's categories (repeatable).
        #[arg(long = "category", value_enum, default_value = "FILE", requires = "breaking")]
        categories: Vec<Category>,
        /// Where imports outside the inputs are found, as protoc's -I (repeatable).
        #[arg(long = "include", short = 'I', requires = "breaking")]
        include: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "text", requires = "breaking")]
        error_format: breaking::Format,
        /// .proto files, directories of them or descriptor sets (by default the config's contracts).
        #[arg(requires = "breaking")]
        inputs: Vec<PathBuf>,
    },
    /// Write a development CA and workload certificates with SPIFFE IDs.
    Certs {
        /// Directory for ca.pem, ca-key.pem, NAME.pem and NAME-key.pem (an existing CA there is reused).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// NAME (gets spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/NAME) or NAME=SPIFFE_ID.
        #[arg(required = true)]
        workloads: Vec<String>,
    },
    /// Add the sidecar to the pod templates of Kubernetes manifests (written to stdout).
    Inject {
        /// A YAML or JSON file, a directory of them, or - for standard input.
        #[arg(default_value = "-")]
        input: PathBuf,
        /// Inject every pod that has not opted out, not only those opted in.
        #[arg(long)]
        all: bool,
        /// The namespace of objects that name none, as with kubectl -n.
        #[arg(long)]
        namespace: Option<String>,
        /// A namespace labelled protomesh.io/inject=enabled (repeatable).
        #[arg(long = "enabled-namespace", value_name = "NAMESPACE")]
        enabled_namespaces: Vec<String>,
        /// The sidecar image, unless a pod's protomesh.io/image says otherwise.
        #[arg(long, env = "PROTOMESH_IMAGE")]
        image: Option<String>,
        /// Who installs captured pods' rules, unless a pod's protomesh.io/capture-by says otherwise:
        /// an init container with NET_ADMIN, or the node's protomesh-cni plugin.
        #[arg(long, env = "PROTOMESH_CAPTURE_BY", value_enum, default_value = "init")]
        capture_by: CaptureBy,
        /// Add no RoleBindings or ClusterRoleBindings for the injected pods' service accounts.
        #[arg(long)]
        no_rbac: bool,
    },
    /// Take the sidecar out of injected manifests again (written to stdout).
    Uninject {
        /// A YAML or JSON file, a directory of them, or - for standard input.
        #[arg(default_value = "-")]
        input: PathBuf,
    },
    /// Run the mutating admission webhook that injects pods as they are created.
    Webhook {
        #[arg(long, env = "PROTOMESH_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// PEM certificate chain the webhook serves (renewed files are read again).
        #[arg(long, env = "PROTOMESH_WEBHOOK_CERT", default_value = "/var/run/protomesh/webhook/tls.crt")]
        cert: PathBuf,
        #[arg(long, env = "PROTOMESH_WEBHOOK_KEY", default_value = "/var/run/protomesh/webhook/tls.key")]
        key: PathBuf,
        /// The sidecar image, unless a pod's protomesh.io/image says otherwise.
        #[arg(long, env = "PROTOMESH_IMAGE")]
        image: Option<String>,
        /// Who installs captured pods' rules, unless a pod's protomesh.io/capture-by says otherwise.
        #[arg(long, env = "PROTOMESH_CAPTURE_BY", value_enum, default_value = "init")]
        capture_by: CaptureBy,
        /// Read the certificate files this often besides when they change.
        #[arg(long, default_value = "60s", value_parser = duration::parse)]
        reload_interval: std::time::Duration,
        /// Keep, for every namespace labelled protomesh.io/inject=enabled, the bindings its
        /// service accounts need (identity, discovery, Service lookup); taken out when the label goes.
        #[arg(long, env = "PROTOMESH_GRANT_NAMESPACES")]
        grant_namespaces: bool,
    },
    /// Install the rules that redirect the pod's TCP traffic through the
    /// sidecar, in the current network namespace (run by the pod's init container).
    Init {
        #[command(flatten)]
        rules: CaptureRules,
        /// Print the nftables ruleset and install nothing.
        #[arg(long)]
        print: bool,
        /// Install nothing; check that the rules are in place (installed by the node's CNI plugin),
        /// as any user but the sidecar's, with no capability.
        #[arg(long, conflicts_with = "print")]
        validate: bool,
        /// The nft program.
        #[arg(long, env = "PROTOMESH_NFT", default_value = "nft")]
        nft: PathBuf,
    },
    /// Take out the rules `protomesh init` (or the CNI plugin) installed, in the current network
    /// namespace: the pod's traffic goes where it is sent again.
    Uninit {
        /// The nft program.
        #[arg(long, env = "PROTOMESH_NFT", default_value = "nft")]
        nft: PathBuf,
    },
    /// Print a running sidecar's live calls as they end, with their messages decoded from the contracts.
    Tap {
        /// The sidecar's admin server (GET /tap; localhost only unless admin.allow_remote).
        #[arg(long, default_value = "127.0.0.1:4191")]
        admin: std::net::SocketAddr,
        /// Calls to these methods: pkg.Service/Method, pkg.Service/* or * (repeatable).
        #[arg(long = "method", value_name = "PATTERN")]
        methods: Vec<String>,
        /// Calls made by these identities: a SPIFFE ID, spiffe://td/ns/NS/* or * (repeatable);
        /// outbound calls are made by the sidecar's own workload.
        #[arg(long = "caller", value_name = "PATTERN")]
        callers: Vec<String>,
        /// Calls that ended with these statuses: OK, UNAVAILABLE, ... or a number (repeatable).
        #[arg(long = "status", value_name = "CODE")]
        statuses: Vec<String>,
        /// inbound or outbound.
        #[arg(long)]
        direction: Option<String>,
        /// Bytes of each message shown (default 4096, at most 65536); a longer one is shown by its size.
        #[arg(long)]
        max_bytes: Option<usize>,
        /// Messages shown of each call, each way (default 16, at most 100).
        #[arg(long)]
        messages: Option<usize>,
        /// Events a second (default 100, at most 1000); more are lost, and counted.
        #[arg(long)]
        rate: Option<u32>,
        /// Each event as the admin server sends it: one JSON object a line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Wait until a sidecar's admin server says it is ready (a classic sidecar's postStart hook), then
    /// run the app's COMMAND if given.
    Await {
        #[arg(long, default_value = "127.0.0.1:4191")]
        admin: std::net::SocketAddr,
        #[arg(long, default_value = "120s", value_parser = duration::parse)]
        timeout: std::time::Duration,
        /// Once COMMAND exits, tell the sidecar to exit too (POST /shutdown), so that a Job's pod completes.
        #[arg(long, requires = "command")]
        shutdown: bool,
        /// The app to run once the sidecar is ready; its exit code is await's.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, config_optional } => {
            let options = Options { set_log_level: Some(init_logging()) };
            runtime().block_on(app::run(ConfigSource::process(config, config_optional), options))
        }
        Command::Check { config, breaking: false, .. } => check(config),
        Command::Check { config, against, categories, include, error_format, inputs, .. } => {
            let against = against.unwrap_or_default();
            match check_breaking(config, against, categories, include, error_format, inputs) {
                Ok(true) => return ExitCode::from(breaking::BREAKING_EXIT_CODE),
                Ok(false) => Ok(()),
                Err(error) => Err(error),
            }
        }
        Command::Certs { out, trust_domain, namespace, workloads } => {
            write_certs(&out, &trust_domain, &namespace, &workloads)
        }
        Command::Inject { input, all, namespace, enabled_namespaces, image, capture_by, no_rbac } => {
            let namespace_labels = enabled_namespaces.into_iter().map(|ns| (ns, "enabled".to_string())).collect();
            let defaults = Defaults { image, capture_by };
            let options = manifest::Options { all, namespace, namespace_labels, defaults, rbac: !no_rbac };
            transform(&input, |manifests| manifest::inject(manifests, &options))
        }
        Command::Uninject { input } => transform(&input, manifest::uninject),
        Command::Webhook { listen, cert, key, image, capture_by, reload_interval, grant_namespaces } => {
            init_logging();
            let defaults = Defaults { image, capture_by };
            let config = WebhookConfig { listen, cert, key, defaults, reload_interval, grant_namespaces };
            runtime().block_on(webhook::run(config))
        }
        Command::Init { rules, print: true, .. } => {
            print!("{}", rules.ruleset());
            Ok(())
        }
        Command::Init { rules, validate: true, .. } => {
            match runtime().block_on(capture::validate(&rules, std::time::Duration::from_secs(5))) {
                Err(error @ capture::ValidateError::NotCaptured { .. }) => {
                    eprintln!("error: protomesh init --validate: {error}");
                    return ExitCode::from(capture::NOT_CAPTURED_EXIT_CODE);
                }
                checked => checked.map_err(|e| format!("protomesh init --validate: {e}")),
            }
        }
        Command::Init { rules, nft, .. } => capture::install(&rules, &nft).map_err(|e| format!("protomesh init: {e}")),
        Command::Uninit { nft } => capture::uninstall(&nft).map_err(|e| format!("protomesh uninit: {e}")),
        Command::Tap { admin, methods, callers, statuses, direction, max_bytes, messages, rate, json, count } => {
            let request = tapping::TapRequest { methods, callers, statuses, direction, max_bytes, messages, rate };
            runtime().block_on(tapping::run(admin, &request, json, count)).map_err(|e| format!("protomesh tap: {e}"))
        }
        Command::Await { admin, timeout, shutdown: _, command } if command.is_empty() => {
            runtime().block_on(awaiting::wait_until_ready(admin, timeout))
        }
        Command::Await { admin, timeout, shutdown, command } => {
            match runtime().block_on(awaiting::run_app(admin, timeout, &command, shutdown)) {
                Ok(code) => return ExitCode::from(code),
                Err(error) => Err(error),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, as text or JSON (`PROTOMESH_LOG_FORMAT=json`), filtered by
/// `PROTOMESH_LOG`; returns the way to change the filter at runtime.
fn init_logging() -> SetLogLevel {
    use tracing_subscriber::{EnvFilter, fmt, prelude::*, reload};
    let filter = EnvFilter::try_from_env("PROTOMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = std::env::var("PROTOMESH_LOG_FORMAT").is_ok_and(|f| f == "json");
    tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| fmt::layer().json().with_writer(std::io::stderr)))
        .with((!json).then(|| {
            use std::io::IsTerminal;
            fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr)
        }))
        .init();
    Arc::new(move |text: &str| {
        let filter = EnvFilter::try_new(text).map_err(|e| format!("`{text}` is not a log filter: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// The main thread's event loop: a current-thread scheduler, which costs a
/// third less CPU per call than work stealing. It is the sidecar's first
/// worker; `worker_threads` adds more, each with a loop of its own.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn check(config: Option<PathBuf>) -> Result<(), String> {
    let inputs = Inputs::read(&ConfigSource::process(config, false))?;
    print!("{}", protomesh::check::report(&inputs));
    Ok(())
}

/// Prints what the contracts break of the other version; true if anything does.
fn check_breaking(
    config: Option<PathBuf>,
    against: String,
    categories: Vec<Category>,
    include: Vec<PathBuf>,
    format: breaking::Format,
    inputs: Vec<PathBuf>,
) -> Result<bool, String> {
    let config = match (&config, inputs.is_empty()) {
        (Some(file), true) => {
            Some(config::load_section(Some(file), std::env::vars(), "contracts").map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let request = breaking::Request { inputs, include, config, against, categories, format };
    let outcome = breaking::run(&request).map_err(|e| format!("protomesh check --breaking: {e}"))?;
    let (out, summary) = outcome.render(format, &request);
    print!("{out}");
    eprintln!("{summary}");
    Ok(!outcome.breaking.is_empty())
}

/// Reads manifests, changes them, writes them to stdout and the report to stderr.
fn transform(
    input: &std::path::Path,
    change: impl FnOnce(&mut Manifests) -> Result<Vec<manifest::Line>, String>,
) -> Result<(), String> {
    let mut manifests = manifest::read(input)?;
    let report = change(&mut manifests)?;
    print!("{}", manifest::render(&manifests));
    for line in report {
        eprintln!("{line}");
    }
    Ok(())
}

fn write_certs(out: &std::path::Path, trust_domain: &str, namespace: &str, workloads: &[String]) -> Result<(), String> {
    let named = workloads
        .iter()
        .map(|w| match w.split_once('=') {
            Some((name, id)) => Ok((name.to_string(), SpiffeId::parse(id)?)),
            None => Ok((w.clone(), SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{w}"))?)),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let files = certs::write_dev_certs(out, &format!("protomesh development CA ({trust_domain})"), &named)?;
    println!("CA: {}", out.join("ca.pem").display());
    for ((_, id), files) in named.iter().zip(files) {
        println!("{id}: {} {}", files.cert.display(), files.key.display());
    }
    Ok(())
}
