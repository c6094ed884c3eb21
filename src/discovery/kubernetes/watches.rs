//! How a watch runs: what it keeps of the objects it is told of, how long
//! it waits before asking again, and how its endpoints reach those who
//! follow it (shared, and stopped once the last of them is gone).

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::runtime::watcher::Event;
use tokio::sync::watch;

use super::name_of;
use crate::discovery::Found;

/// Endpoints as a watch sends them (a [`watch::Receiver`]); the watch ends
/// once the last of its receivers is dropped.
pub struct Watched {
    receiver: watch::Receiver<Vec<Found>>,
    pub(super) task: Arc<WatchTask>,
}

impl std::ops::Deref for Watched {
    type Target = watch::Receiver<Vec<Found>>;
    fn deref(&self) -> &Self::Target {
        &self.receiver
    }
}

impl std::ops::DerefMut for Watched {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.receiver
    }
}

/// A watch's task, stopped when the last [`Watched`] of it is dropped.
pub(super) struct WatchTask {
    /// Never read: a clone of it is a new receiver that has missed nothing
    /// (its first endpoints, once sent, read as a change).
    unread: watch::Receiver<Vec<Found>>,
    task: tokio::task::AbortHandle,
}

/// Sends a watch's endpoints: its first set always, since those who follow
/// it wait for that one even when it is empty; then only changes.
pub(super) struct EndpointsSender {
    sender: watch::Sender<Vec<Found>>,
    sent: bool,
}

impl EndpointsSender {
    /// Sends `endpoints` unless they are what was sent last; whether it did.
    pub(super) fn send(&mut self, endpoints: Vec<Found>) -> bool {
        let first = !std::mem::replace(&mut self.sent, true);
        self.sender.send_if_modified(|current| {
            let changed = first || *current != endpoints;
            if changed {
                *current = endpoints;
            }
            changed
        })
    }
}

impl WatchTask {
    /// Runs `follow` until the last receiver is gone, or it ends.
    pub(super) fn spawn<F: Future<Output = ()> + Send + 'static>(follow: impl FnOnce(EndpointsSender) -> F) -> Watched {
        let (sender, unread) = watch::channel(Vec::new());
        let task = tokio::spawn(follow(EndpointsSender { sender, sent: false })).abort_handle();
        let task = Arc::new(WatchTask { unread, task });
        Watched { receiver: task.unread.clone(), task }
    }

    pub(super) fn watched(self: &Arc<Self>) -> Watched {
        Watched { receiver: self.unread.clone(), task: self.clone() }
    }
}

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a watch has reported of each object, by name (`T`: what is kept of
/// a `K`); a relist replaces it whole once it is done.
pub(super) struct Known<T> {
    pub(super) current: BTreeMap<String, T>,
    listing: Option<BTreeMap<String, T>>,
    /// Whether a first list is done.
    pub(super) listed: bool,
}

impl<T> Default for Known<T> {
    fn default() -> Self {
        Known { current: BTreeMap::new(), listing: None, listed: false }
    }
}

impl<T> Known<T> {
    /// Takes `event` in, keeping what `keep` takes of each object (nothing
    /// where it says `None`); whether what is kept changed.
    pub(super) fn apply<K: kube::Resource>(&mut self, event: Event<K>, keep: impl Fn(K) -> Option<T>) -> bool {
        let put = |map: &mut BTreeMap<String, T>, object: K| {
            let name = name_of(object.meta());
            match keep(object) {
                Some(kept) => map.insert(name, kept),
                None => map.remove(&name),
            };
        };
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(listing) = &mut self.listing {
                    put(listing, object);
                }
                false
            }
            Event::InitDone => {
                self.current = self.listing.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(object) => {
                put(&mut self.current, object);
                true
            }
            Event::Delete(object) => {
                self.current.remove(&name_of(object.meta()));
                true
            }
        }
    }
}

/// How long a watch waits before it asks again after a failure: doubling
/// from 200 ms up to 3 s, each wait drawn from its upper half, and back to
/// the start as soon as the API server answers. kube-rs's default backoff
/// resets only after two minutes, so a watch that failed while the server
/// was down would wait up to 30 s after it is back; this one converges
/// within seconds. For N pods each watching M Services, a server that is
/// down gets at most N·M requests every 1.5 s.
#[derive(Debug)]
pub struct Reconnect {
    next: std::time::Duration,
}

const FIRST_RECONNECT: std::time::Duration = std::time::Duration::from_millis(200);
const LONGEST_RECONNECT: std::time::Duration = std::time::Duration::from_secs(3);

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { next: FIRST_RECONNECT }
    }
}

impl Iterator for Reconnect {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let wait = self.next.mul_f64(0.5 + fastrand::f64() / 2.0);
        self.next = (self.next * 2).min(LONGEST_RECONNECT);
        Some(wait)
    }
}

impl kube::runtime::utils::Backoff for Reconnect {
    fn reset(&mut self) {
        self.next = FIRST_RECONNECT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_to_a_bound_with_jitter_and_start_over_once_answered() {
        use kube::runtime::utils::Backoff;
        let mut reconnect = Reconnect::default();
        let waits: Vec<_> = (&mut reconnect).take(8).collect();
        assert!(waits[0] >= FIRST_RECONNECT / 2 && waits[0] <= FIRST_RECONNECT, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= LONGEST_RECONNECT), "{waits:?}");
        assert!(waits[7] >= LONGEST_RECONNECT / 2, "{waits:?}");
        reconnect.reset();
        assert!(reconnect.next().unwrap() <= FIRST_RECONNECT);
    }
}
