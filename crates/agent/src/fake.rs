//! A small stateful fake guest agent, for unit tests of code that quiesces.

use std::sync::Mutex;
use std::time::Duration;

use crate::agent::AgentError;
use crate::transport::AgentTransport;

/// What the fake agent does; change it between calls through [`FakeAgent::with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeState {
    /// Whether the guest's file systems are frozen.
    pub frozen: bool,
    /// How many file systems a freeze freezes.
    pub filesystems: u32,
    /// Whether an agent is there at all.
    pub available: bool,
    /// A command that times out (and still takes effect in the guest, as a slow freeze does).
    pub times_out_on: Option<&'static str>,
    /// How many thaws fail before one succeeds.
    pub failing_thaws: u32,
    /// Every command received, by name.
    pub log: Vec<String>,
}

/// A fake guest agent that keeps freeze state like qemu-ga does.
#[derive(Debug)]
pub struct FakeAgent(Mutex<FakeState>);

impl FakeAgent {
    /// A guest with `filesystems` freezable file systems and a working agent.
    pub fn new(filesystems: u32) -> Self {
        FakeAgent(Mutex::new(FakeState {
            frozen: false,
            filesystems,
            available: true,
            times_out_on: None,
            failing_thaws: 0,
            log: Vec::new(),
        }))
    }

    /// Reads or changes the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl AgentTransport for FakeAgent {
    fn execute(&self, command: &str, timeout: Duration) -> Result<String, AgentError> {
        let value: serde_json::Value = serde_json::from_str(command).expect("valid JSON from GuestAgent");
        let name = value["execute"].as_str().unwrap_or_default().to_owned();
        self.with(|s| {
            s.log.push(name.clone());
            if !s.available {
                return Err(AgentError::Unavailable { domain: "fake".into(), reason: "QEMU guest agent is not connected".into() });
            }
            let timed_out = s.times_out_on == Some(name.as_str());
            let reply = match name.as_str() {
                "guest-ping" => r#"{"return":{}}"#.to_owned(),
                "guest-fsfreeze-freeze" | "guest-fsfreeze-freeze-list" if s.frozen => {
                    r#"{"error":{"class":"GenericError","desc":"The command guest-fsfreeze-freeze has been disabled for this instance"}}"#.to_owned()
                }
                "guest-fsfreeze-freeze" | "guest-fsfreeze-freeze-list" => {
                    s.frozen = true;
                    format!(r#"{{"return":{}}}"#, s.filesystems)
                }
                "guest-fsfreeze-thaw" if s.failing_thaws > 0 => {
                    s.failing_thaws -= 1;
                    return Err(AgentError::TimedOut { domain: "fake".into(), timeout });
                }
                "guest-fsfreeze-thaw" => {
                    let n = if s.frozen { s.filesystems } else { 0 };
                    s.frozen = false;
                    format!(r#"{{"return":{n}}}"#)
                }
                "guest-fsfreeze-status" => {
                    format!(r#"{{"return":"{}"}}"#, if s.frozen { "frozen" } else { "thawed" })
                }
                _ => r#"{"error":{"class":"CommandNotFound","desc":"not supported by the fake"}}"#.to_owned(),
            };
            if timed_out { Err(AgentError::TimedOut { domain: "fake".into(), timeout }) } else { Ok(reply) }
        })
    }

    fn target(&self) -> String {
        "fake".into()
    }
}

impl AgentTransport for &FakeAgent {
    fn execute(&self, command: &str, timeout: Duration) -> Result<String, AgentError> {
        (**self).execute(command, timeout)
    }
    fn target(&self) -> String {
        (**self).target()
    }
}
