//! What starts a reload on its own: a change in a directory that holds an
//! input, once no further change has come for `reload.debounce`; and every
//! `reload.interval` as a backstop.

use std::sync::Arc;
use std::time::Duration;

use super::reload::Reloader;
use crate::watch::DirWatch;

/// Reloads on changes and on the interval, for as long as it runs.
pub async fn reload_on_change(reloader: Arc<Reloader>) {
    let mut watch = DirWatch::default();
    loop {
        let settings = reloader.routes().config.reload.clone();
        watch.set(if settings.watch { reloader.watched_dirs() } else { Vec::new() });
        let interval = async {
            match settings.interval {
                Duration::ZERO => std::future::pending().await,
                every => tokio::time::sleep(every).await,
            }
        };
        tokio::select! {
            () = watch.changed(settings.debounce) => {}
            () = interval => {}
        }
        reloader.reload().await;
    }
}
