//! Quiesce policies: what to do when the guest cannot be frozen.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::agent::{AgentError, GuestAgent};
use crate::guard::FreezeGuard;
use crate::transport::AgentTransport;

/// Whether a backup must, may or must not freeze the guest's file systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuiescePolicy {
    /// Fail fast and clearly when the guest cannot be frozen.
    Required,
    /// Freeze if possible; otherwise go on crash-consistently and record why.
    #[default]
    BestEffort,
    /// Never freeze.
    Off,
}

impl FromStr for QuiescePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(QuiescePolicy::Required),
            "best-effort" => Ok(QuiescePolicy::BestEffort),
            "off" => Ok(QuiescePolicy::Off),
            _ => Err(format!("unknown quiesce policy {s:?}; expected required, best-effort or off")),
        }
    }
}

impl fmt::Display for QuiescePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuiescePolicy::Required => "required",
            QuiescePolicy::BestEffort => "best-effort",
            QuiescePolicy::Off => "off",
        })
    }
}

/// What quiesce did, for the backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuiesceOutcome {
    /// Whether the guest's file systems were frozen when the job started.
    pub quiesced: bool,
    /// How many file systems were frozen.
    pub frozen_filesystems: u32,
    /// Why not, or anything worth knowing.
    pub note: Option<String>,
}

/// Applies `policy`: returns the guard to drop (or thaw) right after the backup job started,
/// and the outcome to record.
pub fn quiesce<'a, T: AgentTransport>(
    agent: &'a GuestAgent<T>,
    policy: QuiescePolicy,
    mountpoints: Option<&[&str]>,
) -> Result<(Option<FreezeGuard<'a, T>>, QuiesceOutcome), AgentError> {
    if policy == QuiescePolicy::Off {
        let outcome = QuiesceOutcome { quiesced: false, frozen_filesystems: 0, note: Some("quiesce is off".into()) };
        return Ok((None, outcome));
    }
    let attempt = agent.ping().and_then(|()| FreezeGuard::freeze(agent, mountpoints));
    match (attempt, policy) {
        (Ok(guard), _) => {
            let frozen = guard.frozen();
            let note = (frozen == 0).then(|| "the guest has no file system that can be frozen".to_owned());
            Ok((Some(guard), QuiesceOutcome { quiesced: true, frozen_filesystems: frozen, note }))
        }
        (Err(e), QuiescePolicy::Required) => {
            Err(AgentError::QuiesceRequired { domain: agent.domain(), cause: Box::new(e) })
        }
        (Err(e), _) => Ok((
            None,
            QuiesceOutcome {
                quiesced: false,
                frozen_filesystems: 0,
                note: Some(format!("not quiesced (crash-consistent): {e}")),
            },
        )),
    }
}
