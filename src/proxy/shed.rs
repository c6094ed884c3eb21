//! Load shedding: while the sidecar's resident memory is over
//! `limits.memory_budget`, new calls are refused with RESOURCE_EXHAUSTED and
//! the calls in flight go on, so that a burst cannot push the process past
//! its container's limit, where the kernel would end every call at once.
//! Memory is sampled in the background; a call only reads the last sample.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytesize::ByteSize;

use super::routes::CurrentRoutes;
use crate::call::PolicyError;
use crate::grpc::Code;
use crate::telemetry::process::resident_bytes;

/// How often resident memory is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The share of the container's memory limit that an unset budget allows.
const SHARE_OF_CONTAINER_LIMIT: f64 = 0.9;

/// The last sample of resident memory and the budget in force (0: none).
#[derive(Debug, Default)]
pub struct MemoryBudget {
    resident: AtomicU64,
    budget: AtomicU64,
}

#[derive(Debug)]
pub struct OverBudget {
    resident: u64,
    budget: u64,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (resident, budget) = (ByteSize::b(self.resident).display().iec(), ByteSize::b(self.budget).display().iec());
        write!(f, "sidecar memory {resident} is over limits.memory_budget {budget}; new calls are shed until it falls")
    }
}

impl std::error::Error for OverBudget {}

impl PolicyError for OverBudget {
    fn code(&self) -> Code {
        Code::ResourceExhausted
    }

    fn reason(&self) -> &'static str {
        "memory_budget"
    }
}

impl MemoryBudget {
    /// Whether a new call may start.
    pub fn admit(&self) -> Result<(), OverBudget> {
        let budget = self.budget.load(Ordering::Relaxed);
        let resident = self.resident.load(Ordering::Relaxed);
        if budget == 0 || resident <= budget {
            return Ok(());
        }
        Err(OverBudget { resident, budget })
    }

    /// Samples memory, against the budget of the config in force, for as long as it runs.
    pub async fn sample(&self, routes: CurrentRoutes) {
        let mut shedding = false;
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let budget = match routes.load().config.limits.memory_budget {
                Some(budget) => budget.as_u64(),
                None => container_limit(Path::new("/sys/fs/cgroup"))
                    .map_or(0, |limit| (limit as f64 * SHARE_OF_CONTAINER_LIMIT) as u64),
            };
            let resident = resident_bytes().unwrap_or(0).max(0) as u64;
            self.budget.store(budget, Ordering::Relaxed);
            self.resident.store(resident, Ordering::Relaxed);
            let over = self.admit().err();
            if over.is_some() != shedding {
                shedding = over.is_some();
                match over {
                    Some(over) => tracing::warn!("{over}"),
                    None => tracing::info!(resident, budget, "sidecar memory back under limits.memory_budget"),
                }
            }
        }
    }
}

/// The memory limit of the container this process runs in, from its cgroup
/// (v2 `memory.max`, else v1 `memory/memory.limit_in_bytes`); `None` when unlimited.
fn container_limit(cgroup: &Path) -> Option<u64> {
    // cgroup v1 writes "unlimited" as a page-rounded i64::MAX.
    const UNLIMITED: u64 = 1 << 60;
    ["memory.max", "memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|file| std::fs::read_to_string(cgroup.join(file)).ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&limit| limit < UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_container_limit_is_read_from_cgroup_v2_or_v1() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(container_limit(dir.path()), None);
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        std::fs::write(dir.path().join("memory/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(container_limit(dir.path()), None, "v1's unlimited");
        std::fs::write(dir.path().join("memory/memory.limit_in_bytes"), "268435456\n").unwrap();
        assert_eq!(container_limit(dir.path()), Some(256 << 20));
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(container_limit(dir.path()), None, "v2's unlimited");
        std::fs::write(dir.path().join("memory.max"), "134217728\n").unwrap();
        assert_eq!(container_limit(dir.path()), Some(128 << 20));
    }

    #[test]
    fn calls_are_shed_only_over_a_budget() {
        let budget = MemoryBudget::default();
        budget.resident.store(500 << 20, Ordering::Relaxed);
        assert!(budget.admit().is_ok(), "no budget");
        budget.budget.store(600 << 20, Ordering::Relaxed);
        assert!(budget.admit().is_ok());
        budget.budget.store(400 << 20, Ordering::Relaxed);
        let over = budget.admit().unwrap_err();
        assert_eq!(over.code(), Code::ResourceExhausted);
        assert_eq!(
            over.to_string(),
            "sidecar memory 500.0 MiB is over limits.memory_budget 400.0 MiB; new calls are shed until it falls"
        );
    }
}
