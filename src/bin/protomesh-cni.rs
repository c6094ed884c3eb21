//! `protomesh-cni`: the container runtime runs it with the `CNI_*` variables
//! and the network configuration on stdin, once per pod and command. See
//! `protomesh::cni`.

#![forbid(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;

use protomesh::cni::{self, Invocation};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map_err(cni::Error::from);
    let conf = serde_json::from_slice::<serde_json::Value>(&stdin).ok();
    let version = conf.as_ref().and_then(|c| c["cniVersion"].as_str()).unwrap_or("1.0.0").to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
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
