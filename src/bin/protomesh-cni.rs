//! `protomesh-cni`: the container runtime runs it with the `CNI_*` variables
//! and the network configuration on stdin, once per pod and command; the
//! `k8s/cni` DaemonSet runs `protomesh-cni install`, which puts it on the
//! node. See `protomesh::cni`.

#![forbid(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use protomesh::cni::install::Install;
use protomesh::cni::{self, Invocation};

/// `protomesh-cni install`: the DaemonSet's command.
#[derive(Parser)]
#[command(name = "protomesh-cni install", version)]
struct InstallCli {
    #[command(flatten)]
    install: Install,
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    if std::env::args().nth(1).as_deref() == Some("install") {
        tracing_subscriber::fmt().with_env_filter(env_filter()).with_writer(std::io::stderr).init();
        let cli = InstallCli::parse_from(std::env::args().skip(1));
        let installed =
            runtime.map_err(|e| e.to_string()).and_then(|runtime| runtime.block_on(cli.install.run(stopped())));
        return match installed {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("protomesh-cni install: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map_err(cni::Error::from);
    let conf = serde_json::from_slice::<serde_json::Value>(&stdin).ok();
    let version = conf.as_ref().and_then(|c| c["cniVersion"].as_str()).unwrap_or("1.0.0").to_string();
    let result = read.and(runtime.map_err(cni::Error::from)).and_then(|runtime| {
        runtime.block_on(async { cni::run(&Invocation::from_vars(std::env::vars())?, &stdin).await })
    });
    match result {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            // The runtime reads the error from stdout; stderr reaches its log.
            eprintln!("protomesh-cni: {error}");
            println!("{}", error.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("PROTOMESH_LOG").unwrap_or_else(|_| "info".into())
}

/// Resolves at SIGTERM (the DaemonSet's pod deleted) or SIGINT.
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
}
