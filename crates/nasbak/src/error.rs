//! The facade's error.

use std::path::PathBuf;

/// A workflow failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Invalid input (a name, an id).
    #[error(transparent)]
    Input(#[from] nasbak_repo::ParseError),
    /// The repository could not be mounted or measured.
    #[error(transparent)]
    Mount(#[from] nasbak_repo::MountError),
    /// The configuration or the schedule state.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The VM lock.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// libvirt.
    #[error(transparent)]
    Libvirt(#[from] nasbak_libvirt::LibvirtError),
    /// The domain XML.
    #[error(transparent)]
    Xml(#[from] nasbak_libvirt::XmlError),
    /// The backup job (its cancellation through our handle is [`BackupError::Cancelled`]).
    #[error(transparent)]
    Job(nasbak_libvirt::JobError),
    /// qemu-img.
    #[error(transparent)]
    Image(#[from] nasbak_qemu_img::ImageError),
    /// Quiesce.
    #[error(transparent)]
    Agent(#[from] nasbak_agent::AgentError),
    /// A file operation on the repository.
    #[error("{action} {path} failed")]
    Io {
        /// What.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not enough free space.
    #[error(
        "the repository has {available} bytes free but {vm}'s disks hold {needed} bytes; free space or use another repository"
    )]
    NoSpace {
        /// The VM.
        vm: String,
        /// Bytes allocated by its disks.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// No disk to back up.
    #[error("{vm} has no disk that can be backed up")]
    NothingToBackUp {
        /// The VM.
        vm: String,
    },
    /// The VM is neither running nor shut off.
    #[error("{vm} is neither running nor shut off (crashed, suspended to disk, shutting down); wait or start it")]
    NotBackupable {
        /// The VM.
        vm: String,
    },
    /// Something nasbak cannot do yet.
    #[error("not supported: {what}")]
    Unsupported {
        /// What.
        what: String,
    },
    /// The VM must be shut off for this.
    #[error("{vm} is running; shut it off before restoring (`virsh shutdown {vm}`)")]
    NotShutOff {
        /// The VM.
        vm: String,
    },
    /// The backup's disks do not match the VM's.
    #[error("the backup does not match {vm}'s disks; nothing was written: {}", .problems.join("; "))]
    Mismatch {
        /// The VM.
        vm: String,
        /// Every mismatch.
        problems: Vec<String>,
    },
    /// A backup file failed its check.
    #[error("{path} is damaged ({detail}); nothing was written")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A backup whose manifest cannot be read or is invalid, or that holds no backup file.
    #[error("backup {backup} is damaged: {reason}; it cannot be verified or restored, only deleted")]
    DamagedBackup {
        /// `VM/BACKUP-ID`.
        backup: String,
        /// What is wrong.
        reason: String,
    },
    /// Nothing of that name.
    #[error("{what} does not exist; `nasbak list` shows what does")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The destination exists; restore-volume never overwrites.
    #[error("{path} exists; restore-volume never overwrites a file: choose another path or remove it")]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// The input does not say enough to choose.
    #[error("say {what}")]
    Ambiguous {
        /// What must be said.
        what: String,
    },
    /// The volume was restored but could not be attached.
    #[error("the volume was restored to {location} (it is complete and stays there) but attaching it to {vm} failed")]
    AttachFailed {
        /// Where the volume is.
        location: String,
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: nasbak_libvirt::LibvirtError,
    },
    /// A whole-VM restore stopped after it had begun to change volumes.
    #[error(
        "the restore of {vm} stopped after volumes had changed: restored {}; partly written (restore again): {}; unchanged: {}",
        list(.restored), .partly_written.as_deref().unwrap_or("none"), list(.untouched)
    )]
    RestoreIncomplete {
        /// The VM restored into.
        vm: String,
        /// Disks (targets) fully restored.
        restored: Vec<String>,
        /// The disk being written in place when the restore stopped: its content is mixed.
        partly_written: Option<String>,
        /// Disks not changed.
        untouched: Vec<String>,
        /// Why it stopped.
        #[source]
        source: Box<BackupError>,
    },
    /// The repository went away (stopped answering, or was unmounted) while a workflow used it;
    /// `source` is the failure that followed.
    #[error("the repository {repository} became unavailable during the {phase}: {state}")]
    RepositoryUnavailable {
        /// The repository.
        repository: String,
        /// What was being done.
        phase: &'static str,
        /// What the check of the repository found.
        state: String,
        /// The failure it caused.
        #[source]
        source: Box<BackupError>,
    },
    /// A disk of the VM was left half-written by a restore that did not finish: a backup now
    /// would save mixed content that looks complete.
    #[error("refusing to back up {vm}: {}; restore it again first (the mark on the repository is {})", .problems.join("; "), .marks.join(", "))]
    HalfRestored {
        /// The VM.
        vm: String,
        /// Each half-written disk, described.
        problems: Vec<String>,
        /// The mark files on the repository (removing one says the disk is good after all).
        marks: Vec<String>,
    },
    /// The backup failed after the guest had been frozen, and every thaw failed: the guest may
    /// still be frozen (the warning says what keeps trying).
    #[error("the backup failed, and {warning}")]
    StillFrozen {
        /// What the operator must know.
        warning: String,
        /// Why the backup failed.
        #[source]
        source: Box<BackupError>,
    },
    /// Cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl From<nasbak_libvirt::JobError> for BackupError {
    /// One representation of cancellation: a job cancelled through the caller's handle is
    /// [`BackupError::Cancelled`], like every other cancelled phase.
    fn from(e: nasbak_libvirt::JobError) -> Self {
        match e {
            nasbak_libvirt::JobError::Cancelled { .. } => BackupError::Cancelled,
            other => BackupError::Job(other),
        }
    }
}

/// An error and its causes on one line (`a: b: c`), for reports that outlive the error.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".to_owned() } else { items.join(", ") }
}
