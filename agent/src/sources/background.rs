//! Work a source does on a thread of its own: the probe, mesh and net-test
//! sources measure over the network at their own pace, so the agent's
//! collection tick never waits for a slow endpoint. Each runs its tasks on
//! a tokio runtime of its own in a named thread; the tasks end when the
//! source is dropped (a reload builds new sources).

use std::future::Future;

use tokio::sync::oneshot;

use super::SourceError;

/// Tasks running on their own thread until this is dropped (dropping the
/// sender is what tells the thread to stop).
pub struct Background {
    _stop: oneshot::Sender<()>,
}

impl Background {
    /// Starts `tasks` on `rt` in a thread named `thread` (`what` names the
    /// source in errors). Dropping the result aborts the tasks at their next
    /// await and lets the thread end.
    pub fn start<F>(
        what: &str,
        thread: &str,
        rt: tokio::runtime::Runtime,
        tasks: impl IntoIterator<Item = F>,
    ) -> Result<Background, SourceError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let tasks: Vec<F> = tasks.into_iter().collect();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut set = tokio::task::JoinSet::new();
                    for t in tasks {
                        set.spawn(t);
                    }
                    // Never sent: ends when the sender is dropped.
                    let _ = stopped.await;
                    set.abort_all();
                });
            })
            .map_err(|e| SourceError::Failed(format!("cannot start the {what} thread: {e}")))?;
        Ok(Background { _stop: stop })
    }

    /// A single-threaded runtime for [`Background::start`].
    pub fn runtime(what: &str) -> Result<tokio::runtime::Runtime, SourceError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SourceError::Failed(format!("cannot start the {what} runtime: {e}")))
    }
}

/// Runs `round` every `interval` (a late tick is skipped, not caught up).
pub async fn every<F, Fut>(interval: std::time::Duration, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        round().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn tasks_run_until_dropped() {
        let n = Arc::new(AtomicU64::new(0));
        let c = n.clone();
        let bg = Background::start(
            "test",
            "vitals-test-bg",
            Background::runtime("test").unwrap(),
            [every(Duration::from_millis(10), move || {
                c.fetch_add(1, Ordering::Relaxed);
                async {}
            })],
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        while n.load(Ordering::Relaxed) < 3 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(n.load(Ordering::Relaxed) >= 3, "the task ran");
        drop(bg);
        std::thread::sleep(Duration::from_millis(100));
        let after = n.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(n.load(Ordering::Relaxed), after, "stopped once dropped");
    }
}
