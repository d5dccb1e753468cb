//! Freeze with a guaranteed thaw.

use crate::agent::{AgentError, GuestAgent};
use crate::transport::AgentTransport;

/// Frozen guest file systems, thawed when this guard is thawed or dropped: on success, error,
/// timeout or panic alike.
#[derive(Debug)]
pub struct FreezeGuard<'a, T: AgentTransport> {
    agent: &'a GuestAgent<T>,
    frozen: u32,
    thawed: bool,
}

impl<'a, T: AgentTransport> FreezeGuard<'a, T> {
    /// Freezes every freezable file system, or only `mountpoints` when given.
    ///
    /// If the freeze fails without a refusal from the agent (a timeout, a lost or garbled
    /// reply), a thaw is sent anyway before the error is returned: the freeze may still complete
    /// in the guest. A refusal (the guest is already frozen by someone else) thaws nothing.
    pub fn freeze(agent: &'a GuestAgent<T>, mountpoints: Option<&[&str]>) -> Result<Self, AgentError> {
        let result = match mountpoints {
            Some(points) => agent.freeze_list(points),
            None => agent.freeze(),
        };
        match result {
            Ok(frozen) => Ok(FreezeGuard { agent, frozen, thawed: false }),
            Err(e) => {
                if !matches!(e, AgentError::Refused { .. }) {
                    let _ = agent.thaw();
                }
                Err(e)
            }
        }
    }

    /// How many file systems the freeze froze.
    pub fn frozen(&self) -> u32 {
        self.frozen
    }

    /// Thaws now and reports how it went.
    pub fn thaw(mut self) -> Result<u32, AgentError> {
        self.thawed = true;
        thaw_with_retries(self.agent)
    }
}

/// A thaw is retried: a lost reply must not leave a guest frozen.
fn thaw_with_retries<T: AgentTransport>(agent: &GuestAgent<T>) -> Result<u32, AgentError> {
    let mut last = None;
    for _ in 0..3 {
        match agent.thaw() {
            Ok(n) => return Ok(n),
            Err(e) => last = Some(e),
        }
    }
    let cause = Box::new(last.expect("three attempts were made"));
    Err(AgentError::ThawFailed { domain: agent.domain(), cause })
}

impl<T: AgentTransport> Drop for FreezeGuard<'_, T> {
    fn drop(&mut self) {
        if !self.thawed {
            self.thawed = true;
            let _ = thaw_with_retries(self.agent);
        }
    }
}
