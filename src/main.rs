use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use protomesh::admin::SetLogLevel;
use protomesh::config::{self, Config};
use protomesh::contract::Contracts;
use protomesh::identity::{Identity, SpiffeId, certs};
use protomesh::proxy::{Options, Sidecar};

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
    /// Run the sidecar.
    Run {
        /// YAML config; every field can also be set by a PROTOMESH_* variable.
        #[arg(long, env = "PROTOMESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config, identity and contracts, and print every method's policy.
    Check {
        #[arg(long, env = "PROTOMESH_CONFIG")]
        config: Option<PathBuf>,
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
    /// Run a whole demo mesh on loopback and show what crosses it.
    Demo {
        /// Export spans to this OTLP/gRPC endpoint, e.g. http://127.0.0.1:4317 (Jaeger).
        #[arg(long)]
        otlp: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let set_log_level = init_logging(matches!(cli.command, Command::Demo { .. }));
    let result = match cli.command {
        Command::Run { config } => run(config, set_log_level),
        Command::Check { config } => check(config),
        Command::Certs { out, trust_domain, namespace, workloads } => {
            write_certs(&out, &trust_domain, &namespace, &workloads)
        }
        Command::Demo { otlp } => runtime().block_on(protomesh::demo::run(otlp)),
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
fn init_logging(quiet: bool) -> SetLogLevel {
    use tracing_subscriber::{EnvFilter, fmt, prelude::*, reload};
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_env("PROTOMESH_LOG").unwrap_or_else(|_| EnvFilter::new(default));
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

fn load(path: Option<PathBuf>) -> Result<(Config, Contracts), String> {
    let config = config::load(path.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    let contracts = Contracts::load(&config.contracts).map_err(|e| format!("contracts: {e}"))?;
    Ok((config, contracts))
}

fn run(path: Option<PathBuf>, set_log_level: SetLogLevel) -> Result<(), String> {
    let (config, contracts) = load(path)?;
    runtime().block_on(async {
        let options = Options { set_log_level: Some(set_log_level) };
        let sidecar = Sidecar::start(&config, Arc::new(contracts), options).await?;
        shutdown_signal().await;
        tracing::info!(drain = ?config.drain_timeout, "shutting down");
        sidecar.shutdown().await;
        Ok(())
    })
}

/// The main thread's event loop: a current-thread scheduler, which costs a
/// third less CPU per call than work stealing. It is the sidecar's first
/// worker; `worker_threads` adds more, each with a loop of its own.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn check(path: Option<PathBuf>) -> Result<(), String> {
    let (config, contracts) = load(path)?;
    let identity = Identity::load(&config.identity)?;
    print!("{}", protomesh::check::report(&config, &identity, &contracts));
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
