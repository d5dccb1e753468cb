//! Deadlines for libvirt calls.
//!
//! A libvirt call can block for ever: libvirtd waits for the domain's QEMU, and a QEMU whose
//! main loop is stuck never answers. On this kind of host that happens when a guest read is
//! blocked on a stalled repository (under TCG the vCPU thread holds QEMU's global lock during
//! device I/O), when a drain waits for a request to a stopped NBD server, or when the process is
//! stopped. libvirt's keepalive does not help: libvirtd itself goes on answering keepalives, only
//! the domain's monitor is silent, so the connection never looks dead.
//!
//! So every call [`LibvirtHypervisor`](crate::LibvirtHypervisor) makes runs on a helper thread,
//! and the caller waits for it only until the call's deadline: the earlier of the connection's
//! call timeout ([`LibvirtHypervisor::with_call_timeout`](crate::LibvirtHypervisor::with_call_timeout),
//! [`DEFAULT_CALL_TIMEOUT`]) and the deadline of the operation it serves, which the operation
//! sets for its thread with [`scope`]. Past the deadline the call fails with an error that says
//! what stopped answering ([`LibvirtError::is_timeout`](crate::LibvirtError::is_timeout)); the
//! helper thread is left to finish on its own (the request may still take effect when QEMU
//! answers again), and a call whose deadline has already passed is never sent.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use nasbak_libvirt::deadline;
//!
//! let end = Instant::now() + Duration::from_secs(5);
//! {
//!     let _scope = deadline::scope(end);
//!     assert_eq!(deadline::current(), Some(end));
//!     // Cleanup after an operation's deadline gets a budget of its own.
//!     let _cleanup = deadline::scope(Instant::now() + deadline::CLEANUP_BUDGET);
//!     assert!(deadline::current() > Some(end));
//! }
//! assert_eq!(deadline::current(), None);
//! ```

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The longest any single libvirt call may take by default, whatever operation it serves.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What cleanup gets after an operation ended, its deadline passed or not: aborting a job,
/// ending a block job, destroying a throwaway domain.
pub const CLEANUP_BUDGET: Duration = Duration::from_secs(10);

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The deadline of this thread's libvirt calls, set by [`scope`].
pub fn current() -> Option<Instant> {
    DEADLINE.with(Cell::get)
}

/// Sets the deadline of this thread's libvirt calls until the returned guard drops; then the
/// previous one is back. The deadline replaces the previous one (cleanup may get a budget of its
/// own after an operation's deadline passed).
#[must_use = "the deadline holds while the scope lives"]
pub fn scope(deadline: Instant) -> Scope {
    Scope { previous: DEADLINE.with(|d| d.replace(Some(deadline))) }
}

/// A deadline in force for this thread ([`scope`]).
#[derive(Debug)]
pub struct Scope {
    previous: Option<Instant>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.previous));
    }
}

/// When a call started now with `call_timeout` must end: the earlier of that and the scope's.
pub(crate) fn for_call(call_timeout: Duration) -> Instant {
    let own = Instant::now() + call_timeout;
    current().map_or(own, |scope| scope.min(own))
}

/// A duration as people read it in messages: `5 s`, `1.5 s`, `250 ms`.
pub(crate) fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(current(), None);
        let a = Instant::now() + Duration::from_secs(100);
        let outer = scope(a);
        assert_eq!(current(), Some(a));
        assert!(for_call(Duration::from_secs(1000)) == a, "the scope is earlier");
        assert!(for_call(Duration::from_secs(1)) < a, "the call timeout is earlier");
        {
            let b = Instant::now() + Duration::from_secs(5);
            let _inner = scope(b);
            assert_eq!(current(), Some(b));
        }
        assert_eq!(current(), Some(a));
        drop(outer);
        assert_eq!(current(), None);
        // Other threads have their own.
        let _s = scope(a);
        assert_eq!(std::thread::spawn(current).join().unwrap(), None);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_secs(5)), "5 s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_millis(250)), "250 ms");
    }
}
