//! What starts a reload on its own: a change in a directory that holds an
//! input (inotify, through the `notify` crate), once no further change has
//! come for `reload.debounce`; and every `reload.interval` as a backstop.
//! Directories rather than files are watched because Kubernetes updates a
//! ConfigMap, Secret or CSI volume by swapping the `..data` link in its
//! directory, which a watch on a file behind that link never sees.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

use super::reload::Reloader;

/// Reloads on changes and on the interval, for as long as it runs.
pub async fn reload_on_change(reloader: Arc<Reloader>) {
    let changed = Arc::new(Notify::new());
    let mut watch = DirWatch::new(changed.clone());
    loop {
        let settings = reloader.routes().config.reload.clone();
        let dirs = if settings.watch { reloader.watched_dirs() } else { Vec::new() };
        watch.set(dirs);
        let interval = async {
            match settings.interval {
                Duration::ZERO => std::future::pending().await,
                every => tokio::time::sleep(every).await,
            }
        };
        tokio::select! {
            () = changed.notified() => {
                // More changes usually follow the first (a volume swaps several entries).
                while tokio::time::timeout(settings.debounce, changed.notified()).await.is_ok() {}
            }
            () = interval => {}
        }
        reloader.reload().await;
    }
}

/// An inotify watch on a set of directories, each without its subdirectories.
struct DirWatch {
    watcher: Option<RecommendedWatcher>,
    dirs: BTreeSet<PathBuf>,
    /// Directories that could not be watched, warned about once.
    unwatchable: BTreeSet<PathBuf>,
}

impl DirWatch {
    fn new(changed: Arc<Notify>) -> DirWatch {
        let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            if event.is_ok_and(|event| changes_content(&event.kind)) {
                changed.notify_one();
            }
        });
        let watcher = watcher
            .inspect_err(|error| tracing::warn!(%error, "cannot watch files; reloading on the interval only"))
            .ok();
        DirWatch { watcher, dirs: BTreeSet::new(), unwatchable: BTreeSet::new() }
    }

    /// Watches exactly `dirs` from now on. Each is watched anew: a path that
    /// leads through a swapped link now names another directory.
    fn set(&mut self, dirs: Vec<PathBuf>) {
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
                        tracing::warn!(%dir, %error, "cannot watch a directory; its changes are seen on the interval");
                    }
                }
            }
        }
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
