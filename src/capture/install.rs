//! Installing the capture rules with the `nft` tool, in the network namespace
//! `protomesh init` runs in.
//!
//! Through `nft` rather than netlink from Rust: the nftables netlink protocol
//! is undocumented outside libnftnl and the Rust crates that speak it are
//! young or GPL; `nft` is what every distribution ships and what operators
//! debug with, and it checks and applies the ruleset as one transaction.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::rules::{CaptureRules, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "`{0}` was not found: the init container's image needs nftables (the protomesh image's `init` target has it), or pass --nft with its path"
    )]
    NoNft(String),
    #[error(
        "not permitted to change the pod's netfilter rules: the init container needs the NET_ADMIN capability (securityContext.capabilities.add: [NET_ADMIN]); nft said: {0}"
    )]
    NotPermitted(String),
    #[error(
        "the kernel refused the rules; it needs nf_tables with NAT and redirect (modules nf_tables, nft_nat, nft_redir, kernel 5.2 or later); nft said: {0}"
    )]
    Unsupported(String),
    #[error("nft failed: {0}")]
    Failed(String),
}

/// Replaces the pod's capture rules with `rules`, atomically.
pub fn install(rules: &CaptureRules, nft: &Path) -> Result<(), InitError> {
    apply(&rules.ruleset(), nft)
}

/// Takes the pod's capture rules out, if they are in: its traffic goes where
/// it is sent again.
pub fn uninstall(nft: &Path) -> Result<(), InitError> {
    // Declaring the table first makes deleting it succeed when it is absent.
    apply(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"), nft)
}

/// Runs `ruleset` through `nft -f`, one transaction.
fn apply(ruleset: &str, nft: &Path) -> Result<(), InitError> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => InitError::NoNft(nft.display().to_string()),
            _ => InitError::Failed(format!("cannot run {}: {error}", nft.display())),
        })?;
    let written = child.stdin.take().expect("stdin is piped").write_all(ruleset.as_bytes());
    let output = child.wait_with_output().map_err(|e| InitError::Failed(e.to_string()))?;
    if output.status.success() {
        return written.map_err(|e| InitError::Failed(format!("writing the ruleset to nft: {e}")));
    }
    let said = String::from_utf8_lossy(&output.stderr).lines().next().unwrap_or("").trim().to_string();
    Err(if said.contains("Operation not permitted") {
        InitError::NotPermitted(said)
    } else if said.contains("No such file or directory") || said.contains("not supported") {
        InitError::Unsupported(said)
    } else {
        InitError::Failed(said)
    })
}
