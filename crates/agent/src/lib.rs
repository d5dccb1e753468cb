//! QEMU guest-agent quiesce for nasbak.
//!
//! The key decision: a freeze is only ever handed out inside a [`FreezeGuard`], whose drop
//! thaws (with retries), so every path out of a backup (success, error, timeout, panic, a job
//! that failed to start) thaws the guest. A freeze that fails or times out is followed by a
//! thaw too, since it may still complete inside the guest. What happened is returned as a
//! [`QuiesceOutcome`] for the manifest: unlike the reference system, a backup that could not be
//! quiesced says so.
//!
//! ```
//! use std::time::Duration;
//! use nasbak_agent::{fake::FakeAgent, quiesce, FreezeStatus, GuestAgent, QuiescePolicy};
//!
//! let fake = FakeAgent::new(2);
//! let agent = GuestAgent::new(&fake, Duration::from_secs(5));
//! let (guard, outcome) = quiesce(&agent, QuiescePolicy::Required, None)?;
//! assert_eq!(outcome.frozen_filesystems, 2);
//! assert_eq!(agent.status()?, FreezeStatus::Frozen);
//! drop(guard); // right after the backup job started
//! assert_eq!(agent.status()?, FreezeStatus::Thawed);
//! # Ok::<(), nasbak_agent::AgentError>(())
//! ```

#![deny(missing_docs)]

mod agent;
pub mod fake;
mod guard;
mod policy;
mod protocol;
mod transport;

pub use agent::{AgentError, GuestAgent};
pub use guard::FreezeGuard;
pub use policy::{QuiesceOutcome, QuiescePolicy, quiesce};
pub use protocol::{AgentCommand, ErrorReply, ExecStarted, ExecStatus, FreezeStatus, FsDisk, FsInfo, decode};
pub use transport::{AgentTransport, LibvirtAgentTransport};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::fake::FakeAgent;
    use super::*;

    fn agent(fake: &FakeAgent) -> GuestAgent<&FakeAgent> {
        GuestAgent::new(fake, Duration::from_secs(1))
    }

    #[test]
    fn the_guard_thaws_on_drop_and_on_panic() {
        let fake = FakeAgent::new(1);
        let a = agent(&fake);
        let g = FreezeGuard::freeze(&a, None).unwrap();
        assert!(fake.with(|s| s.frozen));
        drop(g);
        assert!(!fake.with(|s| s.frozen));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = FreezeGuard::freeze(&a, Some(&["/data"])).unwrap();
            panic!("the backup job failed to start");
        }));
        assert!(r.is_err());
        assert!(!fake.with(|s| s.frozen));
    }

    #[test]
    fn a_freeze_that_times_out_is_thawed_anyway() {
        let fake = FakeAgent::new(1);
        fake.with(|s| s.times_out_on = Some("guest-fsfreeze-freeze"));
        let e = FreezeGuard::freeze(&agent(&fake), None).unwrap_err();
        assert!(matches!(e, AgentError::TimedOut { .. }), "{e}");
        assert!(!fake.with(|s| s.frozen), "left frozen");
    }

    #[test]
    fn a_lost_thaw_reply_is_retried_and_a_persistent_failure_is_reported() {
        let fake = FakeAgent::new(1);
        let a = agent(&fake);
        fake.with(|s| s.failing_thaws = 2);
        assert_eq!(FreezeGuard::freeze(&a, None).unwrap().thaw().unwrap(), 1);
        fake.with(|s| s.failing_thaws = 5);
        let e = FreezeGuard::freeze(&a, None).unwrap().thaw().unwrap_err();
        assert!(e.to_string().contains("thawing fake failed") && e.to_string().contains("domfsthaw"), "{e}");
    }

    #[test]
    fn policies() {
        let fake = FakeAgent::new(1);
        fake.with(|s| s.available = false);
        let a = agent(&fake);
        let e = quiesce(&a, QuiescePolicy::Required, None).unwrap_err();
        assert!(e.to_string().contains("quiesce was required") && e.to_string().contains("best-effort"), "{e}");
        let (guard, outcome) = quiesce(&a, QuiescePolicy::BestEffort, None).unwrap();
        assert!(guard.is_none() && !outcome.quiesced);
        assert!(outcome.note.unwrap().contains("not connected"));
        let (guard, outcome) = quiesce(&a, QuiescePolicy::Off, None).unwrap();
        assert!(guard.is_none() && !outcome.quiesced);
        assert_eq!(fake.with(|s| s.log.iter().filter(|c| c.contains("freeze")).count()), 0, "nothing frozen");
        assert_eq!("best-effort".parse::<QuiescePolicy>(), Ok(QuiescePolicy::BestEffort));
        assert!("sometimes".parse::<QuiescePolicy>().unwrap_err().contains("required, best-effort or off"));
    }
}
