//! A cancel flag shared between the thread doing work and the threads that may stop it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Cancels work from another thread (a Ctrl-C handler, an orchestrator): a running command is
/// killed with its process group, a backup job is aborted, a copy stops at its next block.
/// Clones share one flag.
///
/// Work that waits between polls waits with [`CancelHandle::sleep`], which returns as soon as
/// the handle is cancelled, so a cancel takes effect without waiting out a poll interval.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    cancelled: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl CancelHandle {
    /// A handle not yet cancelled.
    pub fn new() -> Self {
        CancelHandle::default()
    }

    /// Asks the work to stop, and wakes every thread sleeping on this handle.
    pub fn cancel(&self) {
        let _guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.0.wake.notify_all();
    }

    /// Whether cancel was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration`, or until the handle is cancelled if that comes first; returns
    /// whether it was cancelled.
    pub fn sleep(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.is_cancelled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self.0.wake.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

impl PartialEq for CancelHandle {
    /// Two handles are equal when they share one flag.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for CancelHandle {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_ends_at_the_cancel_not_at_the_timeout() {
        let cancel = CancelHandle::new();
        assert!(!cancel.sleep(Duration::from_millis(20)));
        let trigger = cancel.clone();
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            trigger.cancel();
        });
        assert!(cancel.sleep(Duration::from_secs(30)));
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        t.join().unwrap();
        assert!(cancel.is_cancelled() && cancel.sleep(Duration::from_secs(30)));
        assert_eq!(cancel, cancel.clone());
        assert_ne!(cancel, CancelHandle::new());
    }
}
