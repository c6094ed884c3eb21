//! `nft` run inside the pod's network namespace: from a thread that entered
//! it, so that the child process starts there and the plugin's own threads
//! stay in the node's.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::capture::{self, CaptureRules, TABLE};

/// Installs `rules` in the namespace at `netns`, as `protomesh init` does in its own.
pub fn install(netns: &Path, rules: &CaptureRules, nft: &Path) -> Result<(), String> {
    inside(netns, || capture::install(rules, nft).map_err(|e| e.to_string()))
}

/// Whether the capture table is in the namespace at `netns`.
pub fn check(netns: &Path, nft: &Path) -> Result<(), String> {
    inside(netns, || {
        let output = Command::new(nft)
            .args(["list", "table", "inet", TABLE])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
        match output.status.success() {
            true => Ok(()),
            false => Err(format!(
                "the pod's capture rules are missing (table inet {TABLE}): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        }
    })
}

fn inside<T: Send>(netns: &Path, task: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let namespace = File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
                move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(|e| format!("entering the pod's network namespace {}: {e}", netns.display()))?;
                task()
            })
            .join()
            .unwrap_or_else(|_| Err("the thread in the pod's network namespace failed".into()))
    })
}
