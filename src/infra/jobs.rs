//! A service's background work (retention, delivery workers, limiter housekeeping): spawned
//! through [`Jobs`], it is tracked, stops on the service's shutdown token, and is drained before
//! the service's `run` returns — no task outlives its service.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone)]
pub struct Jobs {
    tracker: TaskTracker,
    /// The service's shutdown token; every job watches it.
    pub shutdown: CancellationToken,
}

impl Jobs {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    pub fn spawn<F>(&self, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(job);
    }

    /// Waits for every job to end (they end once the shutdown token is cancelled).
    pub async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
