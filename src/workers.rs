//! Worker threads, each an event loop of its own (a current-thread tokio
//! runtime). A connection accepted by a listener is handed to one worker and
//! stays there with all of its calls, and each worker opens its own
//! connections to peers and to the app (see `Endpoint`). No call crosses
//! threads and no task is stolen, so a call costs what it costs on one thread,
//! while the workers together use as many cores as there are workers.
//!
//! Worker 0 is the runtime that started the sidecar; the others are threads
//! started here and stopped when the `Workers` are dropped.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Which worker runs this thread: 0 for the one that started the sidecar, and
/// for any thread that is not a worker.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's thread.
    _stops: Vec<oneshot::Sender<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count - 1` threads beside the current runtime. Must be called
    /// within a tokio runtime, which becomes worker 0.
    pub fn start(count: NonZeroUsize) -> Result<Workers, String> {
        let mut handles = vec![Handle::current()];
        let mut stops = Vec::new();
        for index in 1..count.get() {
            let (handle, stop) =
                start_worker(index).map_err(|e| format!("worker_threads: cannot start worker {index}: {e}"))?;
            handles.push(handle);
            stops.push(stop);
        }
        Ok(Workers { handles, _stops: stops, next: AtomicUsize::new(0) })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task` on the next worker in turn.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].spawn(task);
    }
}

/// A thread running its own runtime until the returned sender is dropped.
fn start_worker(index: usize) -> std::io::Result<(Handle, oneshot::Sender<()>)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new().name(format!("protomesh-w{index}")).spawn(move || {
        INDEX.with(|i| i.set(index));
        let _ = runtime.block_on(stopped);
    })?;
    Ok((handle, stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_take_turns_across_workers_and_each_knows_its_own() {
        let workers = Workers::start(NonZeroUsize::new(3).unwrap()).unwrap();
        assert_eq!(workers.count(), 3);
        let (seen, mut ran) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..6 {
            let seen = seen.clone();
            workers.spawn(async move {
                seen.send((current(), std::thread::current().id())).unwrap();
            });
        }
        let mut runs = Vec::new();
        for _ in 0..6 {
            runs.push(ran.recv().await.unwrap());
        }
        runs.sort_by_key(|(index, _)| *index);
        let indexes: Vec<usize> = runs.iter().map(|(index, _)| *index).collect();
        assert_eq!(indexes, [0, 0, 1, 1, 2, 2]);
        assert_eq!(runs[0].1, std::thread::current().id(), "worker 0 is the runtime that started them");
        assert_eq!(runs[2].1, runs[3].1, "a worker is one thread");
        assert_ne!(runs[2].1, runs[4].1, "each worker has its own thread");
        assert_ne!(runs[0].1, runs[2].1);
    }

    #[tokio::test]
    async fn dropping_the_workers_ends_their_threads() {
        let workers = Workers::start(NonZeroUsize::new(2).unwrap()).unwrap();
        let (ended, on_end) = oneshot::channel::<()>();
        // Spawned second, so on worker 1: dropped (and so sent) when that worker's runtime goes.
        workers.spawn(async {});
        workers.spawn(async move {
            let _ended = ended;
            std::future::pending::<()>().await
        });
        drop(workers);
        tokio::time::timeout(std::time::Duration::from_secs(10), on_end)
            .await
            .expect("the worker's runtime drops its tasks")
            .unwrap_err();
    }
}
