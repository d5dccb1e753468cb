//! The requests of the workflows: what to do, built with `new` and the `with_` methods. The
//! lowest layer of the engine with the errors and progress: every workflow may use it, it uses
//! no workflow.

use std::time::Duration;

use nasbak_agent::QuiescePolicy;
use nasbak_repo::BackupRepository;

use serde::Serialize;

/// What to back up, where, how. Built with [`BackupRequest::new`] and the `with_` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BackupRequest {
    /// The VM (libvirt domain name).
    pub vm: String,
    /// The repository.
    pub repository: BackupRepository,
    /// Quiesce policy (running VMs).
    pub quiesce: QuiescePolicy,
    /// Time limit of the copy.
    pub timeout: Duration,
    /// The schedule this backup is made for (recorded in the manifest for per-schedule retention).
    pub schedule: Option<String>,
    /// Full, incremental, or auto (the chain planner decides).
    pub mode: ModeRequest,
    /// The longest chain `auto` builds before it takes a full again.
    pub full_every: u32,
}

/// The default time limit of a backup's copy.
pub const DEFAULT_BACKUP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl BackupRequest {
    /// A backup of `vm` to `repository`: incremental where a valid chain exists (`auto`), quiesced
    /// best-effort, with a 24 h limit on the copy.
    pub fn new(vm: impl Into<String>, repository: BackupRepository) -> Self {
        BackupRequest {
            vm: vm.into(),
            repository,
            quiesce: QuiescePolicy::default(),
            timeout: DEFAULT_BACKUP_TIMEOUT,
            schedule: None,
            mode: ModeRequest::Auto,
            full_every: DEFAULT_FULL_EVERY,
        }
    }

    /// Full, incremental or auto.
    pub fn with_mode(mut self, mode: ModeRequest) -> Self {
        self.mode = mode;
        self
    }

    /// The longest chain `auto` builds.
    pub fn with_full_every(mut self, full_every: u32) -> Self {
        self.full_every = full_every;
        self
    }

    /// The quiesce policy.
    pub fn with_quiesce(mut self, quiesce: QuiescePolicy) -> Self {
        self.quiesce = quiesce;
        self
    }

    /// The time limit of the copy.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The schedule the backup is made for.
    pub fn with_schedule(mut self, schedule: impl Into<String>) -> Self {
        self.schedule = Some(schedule.into());
        self
    }
}

/// The mode an operator asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeRequest {
    /// Always a full backup.
    Full,
    /// An incremental; a full (with the reason) where one cannot be proven correct.
    Incremental,
    /// An incremental when a valid chain exists and is shorter than `full_every`, else a full.
    #[default]
    Auto,
}

impl std::str::FromStr for ModeRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(ModeRequest::Full),
            "incremental" => Ok(ModeRequest::Incremental),
            "auto" => Ok(ModeRequest::Auto),
            other => Err(format!("{other:?} is not a backup mode; expected full, incremental or auto")),
        }
    }
}

/// How many backups a chain holds at most (its full and the incrementals on it) before `auto`
/// takes a full again, when the offering does not say.
pub const DEFAULT_FULL_EVERY: u32 = 7;
