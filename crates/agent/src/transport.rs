//! How commands reach the agent: the seam, and libvirt's `virDomainQemuAgentCommand`.

use std::time::Duration;

use nasbak_process::run_with_timeout;

use crate::AgentError;

/// Sends one JSON command to a guest agent and returns its JSON reply.
pub trait AgentTransport {
    /// Executes `command` and waits at most `timeout` for the reply.
    fn execute(&self, command: &str, timeout: Duration) -> Result<String, AgentError>;
    /// A name for messages (the domain name).
    fn target(&self) -> String;
}

/// The agent of a libvirt domain, through libvirt's agent channel.
#[derive(Debug, Clone)]
pub struct LibvirtAgentTransport {
    domain: virt::domain::Domain,
    name: String,
}

impl LibvirtAgentTransport {
    /// Talks to the agent of `domain`.
    ///
    /// This also silences libvirt's default error printer for the process (libvirt writes
    /// every error to stderr otherwise): errors come back as values instead.
    pub fn new(domain: virt::domain::Domain) -> Self {
        virt::error::clear_error_callback();
        let name = domain.name().unwrap_or_else(|_| "<unnamed domain>".into());
        LibvirtAgentTransport { domain, name }
    }
}

impl AgentTransport for LibvirtAgentTransport {
    fn execute(&self, command: &str, timeout: Duration) -> Result<String, AgentError> {
        let domain = self.domain.clone();
        let owned = command.to_owned();
        let seconds = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        // libvirt first sends guest-sync with its own 5 s limit, so the call itself may take up
        // to `timeout` + 5 s; the outer bound makes the whole call keep its promise regardless.
        let bound = timeout + Duration::from_secs(6);
        match run_with_timeout(bound, move || domain.qemu_agent_command(&owned, seconds, 0)) {
            Some(Ok(reply)) => Ok(reply),
            // libvirt turns the agent's own error replies into its errors; they mean the agent
            // answered and said no, which is not the same as having no agent.
            Some(Err(e)) if e.message().contains("unable to execute QEMU agent command") => Err(AgentError::Refused {
                domain: self.name.clone(),
                command: command_name(command),
                class: "libvirt".into(),
                desc: e.message().to_owned(),
            }),
            Some(Err(e)) => Err(AgentError::Unavailable { domain: self.name.clone(), reason: e.message().to_owned() }),
            None => Err(AgentError::TimedOut { domain: self.name.clone(), timeout: bound }),
        }
    }

    fn target(&self) -> String {
        self.name.clone()
    }
}

fn command_name(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["execute"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "a command".into())
}
