//! A cluster task in the background: its own tokio runtime, on its own thread, told to stop
//! through a watch channel and joined when stopped or dropped.
//!
//! Owns: the runtime, the thread and the stop signal. Must not: know what the task does (the
//! host agent, the edge watch).

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::ClusterError;

/// A multi-thread runtime of `workers` threads named `name`.
pub(crate) fn runtime(name: &str, workers: usize) -> Result<Runtime, ClusterError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|source| ClusterError::Runtime {
            what: "runtime",
            source,
        })
}

/// The running task (see the module).
pub(crate) struct Background {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Runs `task(stop)` on `rt`, on a thread named `name`: `stop` turns true when the task
    /// should end.
    pub(crate) fn spawn<F>(
        name: &str,
        rt: Runtime,
        task: impl FnOnce(watch::Receiver<bool>) -> F + Send + 'static,
    ) -> Result<Background, ClusterError>
    where
        F: Future<Output = ()>,
    {
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || rt.block_on(task(stop_rx)))
            .map_err(|source| ClusterError::Runtime {
                what: "thread",
                source,
            })?;
        Ok(Background {
            stop,
            thread: Some(thread),
        })
    }

    /// Tells the task to stop and waits until it did.
    pub(crate) fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}
