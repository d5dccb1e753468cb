//! Typed calls to a guest agent over any transport.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::protocol::{AgentCommand, ExecStarted, ExecStatus, FreezeStatus, FsInfo, decode};
use crate::transport::AgentTransport;

/// A guest-agent call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// There is no agent, or it is not connected or not answering.
    #[error(
        "the guest agent of {domain} is not available: {reason}; install and start qemu-guest-agent in the guest and give the domain an org.qemu.guest_agent.0 channel"
    )]
    Unavailable {
        /// The domain.
        domain: String,
        /// libvirt's words.
        reason: String,
    },
    /// The call did not return in time.
    #[error("the guest agent of {domain} did not answer within {timeout:?}")]
    TimedOut {
        /// The domain.
        domain: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The agent answered with an error.
    #[error("the guest agent of {domain} refused {command}: {desc} ({class})")]
    Refused {
        /// The domain.
        domain: String,
        /// The command.
        command: String,
        /// The QMP error class.
        class: String,
        /// The agent's words.
        desc: String,
    },
    /// The reply could not be read.
    #[error("could not read the reply of the guest agent of {domain} to {command}: {detail}")]
    BadReply {
        /// The domain.
        domain: String,
        /// The command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Quiesce was required and could not be done.
    #[error(
        "quiesce was required but {domain} could not be frozen; nothing is frozen. Use --quiesce best-effort to back up crash-consistently instead"
    )]
    QuiesceRequired {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        cause: Box<AgentError>,
    },
    /// The thaw after a freeze failed: the guest may still be frozen.
    #[error(
        "thawing {domain} failed, so its file systems may still be frozen; thaw them through the guest agent once it answers (libvirt: domfsthaw)"
    )]
    ThawFailed {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        cause: Box<AgentError>,
    },
}

/// A guest agent: typed commands, each under a timeout.
#[derive(Debug)]
pub struct GuestAgent<T> {
    transport: T,
    timeout: Duration,
}

impl<T: AgentTransport> GuestAgent<T> {
    /// An agent reached through `transport`, with `timeout` for each command.
    pub fn new(transport: T, timeout: Duration) -> Self {
        GuestAgent { transport, timeout }
    }

    /// The domain it talks to.
    pub fn domain(&self) -> String {
        self.transport.target()
    }

    fn call<R: DeserializeOwned>(&self, command: AgentCommand) -> Result<R, AgentError> {
        let reply = self.transport.execute(&command.to_json(), self.timeout)?;
        let domain = || self.transport.target();
        match decode::<R>(&reply) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(AgentError::Refused {
                domain: domain(),
                command: command.name().to_owned(),
                class: e.class,
                desc: e.desc,
            }),
            Err(e) => Err(AgentError::BadReply { domain: domain(), command: command.name(), detail: e.to_string() }),
        }
    }

    /// `guest-ping`.
    pub fn ping(&self) -> Result<(), AgentError> {
        self.call::<serde_json::Value>(AgentCommand::Ping).map(drop)
    }

    /// Freezes every freezable file system; returns how many were frozen.
    pub fn freeze(&self) -> Result<u32, AgentError> {
        self.call(AgentCommand::Freeze)
    }

    /// Freezes the file systems mounted at `mountpoints`; returns how many were frozen.
    pub fn freeze_list(&self, mountpoints: &[&str]) -> Result<u32, AgentError> {
        self.call(AgentCommand::FreezeList(mountpoints.iter().map(|s| s.to_string()).collect()))
    }

    /// Thaws; returns how many file systems were thawed.
    pub fn thaw(&self) -> Result<u32, AgentError> {
        self.call(AgentCommand::Thaw)
    }

    /// `guest-fsfreeze-status`.
    pub fn status(&self) -> Result<FreezeStatus, AgentError> {
        self.call(AgentCommand::Status)
    }

    /// `guest-get-fsinfo`.
    pub fn fsinfo(&self) -> Result<Vec<FsInfo>, AgentError> {
        self.call(AgentCommand::FsInfo)
    }

    /// Starts `path` with `args` in the guest (`guest-exec`, output captured); its guest pid.
    pub fn exec(&self, path: &str, args: &[&str]) -> Result<i64, AgentError> {
        let command = AgentCommand::Exec { path: path.to_owned(), args: args.iter().map(|a| a.to_string()).collect() };
        self.call::<ExecStarted>(command).map(|s| s.pid)
    }

    /// Where a program [`GuestAgent::exec`] started stands (`guest-exec-status`).
    pub fn exec_status(&self, pid: i64) -> Result<ExecStatus, AgentError> {
        self.call(AgentCommand::ExecStatus(pid))
    }
}
