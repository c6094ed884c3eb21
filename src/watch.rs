//! Watching directories for changes (inotify, through the `notify` crate).
//! Directories rather than files, because Kubernetes updates a ConfigMap,
//! Secret or CSI volume by swapping the `..data` link in its directory, which
//! a watch on a file behind that link never sees.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// A watch on a set of directories, each without its subdirectories.
pub struct DirWatch {
    watcher: Option<RecommendedWatcher>,
    changed: Arc<Notify>,
    dirs: BTreeSet<PathBuf>,
    /// Directories that could not be watched, warned about once.
    unwatchable: BTreeSet<PathBuf>,
}

impl Default for DirWatch {
    fn default() -> Self {
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            if event.is_ok_and(|event| changes_content(&event.kind)) {
                notify.notify_one();
            }
        });
        let watcher = watcher
            .inspect_err(|error| tracing::warn!(%error, "cannot watch files; reading them on an interval only"))
            .ok();
        DirWatch { watcher, changed, dirs: BTreeSet::new(), unwatchable: BTreeSet::new() }
    }
}

impl DirWatch {
    /// Watches exactly `dirs` from now on. Each is watched anew: a path that
    /// leads through a swapped link now names another directory.
    pub fn set(&mut self, dirs: impl IntoIterator<Item = PathBuf>) {
        let Some(watcher) = &mut self.watcher else { return };
        for dir in std::mem::take(&mut self.dirs) {
            let _ = watcher.unwatch(&dir);
        }
        for dir in dirs {
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.unwatchable.remove(&dir);
                    self.dirs.insert(dir);
                }
                Err(error) => {
                    if self.unwatchable.insert(dir.clone()) {
                        let dir = dir.display();
                        tracing::warn!(%dir, %error, "cannot watch a directory; its changes are seen on an interval");
                    }
                }
            }
        }
    }

    /// Resolves once something changed and then nothing more for `debounce`:
    /// an update usually comes as several changes (a volume swaps several entries).
    pub async fn changed(&self, debounce: Duration) {
        self.changed.notified().await;
        while tokio::time::timeout(debounce, self.changed.notified()).await.is_ok() {}
    }
}

/// Reads (the sidecar's own among them) change nothing.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_swapped_link_in_a_watched_directory_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("..v1")).unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        let mut watch = DirWatch::default();
        watch.set([dir.path().to_path_buf()]);
        let changed = watch.changed(Duration::from_millis(20));
        tokio::pin!(changed);
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut changed).await.is_err(), "nothing changed yet");
        std::fs::create_dir(dir.path().join("..v2")).unwrap();
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), changed).await.expect("the swap is seen");
    }
}
