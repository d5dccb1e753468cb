//! Running a blocking call (a syscall on a possibly dead server) under a deadline.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Runs `f` on its own thread and waits at most `timeout` for it.
///
/// Returns `None` on timeout. The thread is then left to finish (or stay blocked in the kernel
/// on a dead server) on its own: a call that hangs in an uninterruptible syscall cannot be
/// cancelled, but it can no longer hang the caller.
pub fn run_with_timeout<T: Send + 'static>(timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("nasbak-timed".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(timeout).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn returns_the_value_or_none_at_the_deadline() {
        assert_eq!(run_with_timeout(Duration::from_secs(5), || 7), Some(7));
        let start = Instant::now();
        let r = run_with_timeout(Duration::from_millis(100), || thread::sleep(Duration::from_secs(5)));
        assert_eq!(r, None);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
