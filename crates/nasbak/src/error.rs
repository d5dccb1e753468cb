//! The facade's error: [`BackupError`], with [`BackupError::kind`] for the cases callers handle
//! and [`BackupError::step`] for the step of the workflow that failed.
//!
//! Messages say what went wrong and what would be valid, in the library's words: never which
//! command of a tool to run (that wording belongs to the tool; the CLI adds its own hints).

use std::path::PathBuf;

use serde::Serialize;

/// The step of a workflow that failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Step {
    /// Reading the VM's state and configuration from the hypervisor.
    Inspect,
    /// Mounting (or reaching) the repository.
    Mount,
    /// Taking the VM's lock on the repository.
    Lock,
    /// Checking the repository's free space.
    Space,
    /// Freezing the guest's file systems.
    Freeze,
    /// The push backup job (start, copy, end).
    Job,
    /// Copying a shut-off VM's disks with qemu-img.
    Convert,
    /// Checksumming the files just written.
    Checksum,
    /// Writing the manifest.
    Manifest,
    /// Moving the finished backup into place.
    Commit,
    /// Checking a backup's files before a restore.
    Check,
    /// Restoring one disk.
    Restore {
        /// Its target device.
        disk: String,
    },
    /// Attaching a restored volume to a VM.
    Attach,
    /// Showing one disk of a backup read-only (its export).
    Export {
        /// Its target device.
        disk: String,
    },
    /// Unmounting a mounted backup.
    Unmount,
    /// Starting the VM (an instant restore).
    Start,
    /// Keeping the VM's NVRAM and TPM state in the backup, or putting them back.
    State,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Inspect => f.write_str("reading the VM"),
            Step::Mount => f.write_str("mounting the repository"),
            Step::Lock => f.write_str("taking the VM lock"),
            Step::Space => f.write_str("checking free space"),
            Step::Freeze => f.write_str("freezing the guest"),
            Step::Job => f.write_str("the copy of the disks (backup job)"),
            Step::Convert => f.write_str("the copy of the disks (qemu-img)"),
            Step::Checksum => f.write_str("the checksum"),
            Step::Manifest => f.write_str("the manifest"),
            Step::Commit => f.write_str("moving the backup into place"),
            Step::Check => f.write_str("checking the backup"),
            Step::Restore { disk } => write!(f, "the restore of disk {disk}"),
            Step::Attach => f.write_str("attaching the volume"),
            Step::Export { disk } => write!(f, "showing disk {disk} read-only"),
            Step::Unmount => f.write_str("unmounting the backup"),
            Step::Start => f.write_str("starting the VM"),
            Step::State => f.write_str("keeping or restoring the VM's NVRAM and TPM state"),
        }
    }
}

/// The cases a caller of the workflows may want to handle, whatever step they happened in (see
/// [`BackupError::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// A name, an id, a destination or another input is invalid.
    InvalidInput,
    /// The hypervisor has no such domain.
    NoSuchDomain,
    /// No such backup, repository, offering or disk.
    NotFound,
    /// The input does not say enough to choose (which repository, which backup).
    Ambiguous,
    /// The VM is running where it must be shut off.
    DomainRunning,
    /// The VM is neither running nor shut off.
    DomainNotBackupable,
    /// The repository cannot be mounted or reached, or went away.
    RepositoryUnreachable,
    /// Not enough free space on the repository.
    NoSpace,
    /// Another process holds the VM (a backup, restore or prune runs), or the lock was lost.
    Busy,
    /// The backup's disks do not match the VM's.
    Mismatch,
    /// A backup is damaged: its manifest unreadable or invalid, or no backup file.
    DamagedBackup,
    /// A backup file failed its check (qemu-img check or checksum).
    CorruptFile,
    /// The destination exists.
    Exists,
    /// A disk was left half-written by an interrupted restore.
    HalfRestored,
    /// Other backups build on the backup (it cannot be deleted before them).
    HasDependents,
    /// Cancelled through the caller's handle.
    Cancelled,
    /// libvirtd or the VM's QEMU stopped answering: a libvirt call did not answer by its
    /// deadline (see `nasbak_libvirt::deadline`), and may still take effect later.
    Unresponsive,
    /// Something nasbak does not do.
    Unsupported,
    /// An encrypted backup and a key that does not open it, or no key at all.
    KeyRejected,
    /// An off-site target (an S3 bucket) refused or could not be reached.
    Target,
    /// The configuration.
    Configuration,
    /// Anything else (see the error and its causes).
    Other,
}

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
    /// The configuration or the schedule state, as the crate that keeps them (`nasbak-service`)
    /// says.
    #[error(transparent)]
    Config(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// An encrypted backup that needs a key the repository does not give, or that its key does
    /// not open. Nothing was written.
    #[error(
        "backup {backup} cannot be opened with the repository's key: {detail}; the repository must be given the key the backup was written with"
    )]
    KeyNeeded {
        /// `VM/BACKUP-ID` (with the repository, `REPO:VM/BACKUP-ID`, where known).
        backup: String,
        /// What is wrong.
        detail: String,
    },
    /// An encryption key file that cannot be used (its mode, owner, or content).
    #[error(transparent)]
    Key(#[from] nasbak_repo::store::KeyError),
    /// The VM lock.
    #[error(transparent)]
    Lock(#[from] nasbak_repo::store::LockError),
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
    /// The scratch directory the push job writes to (see `Scratch`) filled up, or could not be
    /// used: the job was aborted before a guest write could wait on it; the guest ran on.
    #[error("the scratch directory {dir} for {vm}'s backup: {detail}")]
    Scratch {
        /// The VM.
        vm: String,
        /// The scratch directory.
        dir: PathBuf,
        /// What happened, with the limit and what was used.
        detail: String,
    },
    /// Reading a running VM's disks from its pull-mode backup job's export, or writing what
    /// was read into the backup's files, failed.
    #[error("{action}: {detail}")]
    Pull {
        /// What was being done (the disk and VM named).
        action: String,
        /// What went wrong.
        detail: String,
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
    /// No key to reach an RBD disk with: libvirt keeps its secret private and the host has no
    /// keyring for its user.
    #[error(
        "no key for disk {disk} (Ceph user client.{user}): libvirt does not give out its secret {secret} ({reason}) and /etc/ceph holds no keyring for that user; define the secret with private='no', or install /etc/ceph/ceph.client.{user}.keyring (mode 0600)"
    )]
    NoCephKey {
        /// The disk's target.
        disk: String,
        /// The Ceph user (without `client.`).
        user: String,
        /// The secret, by UUID or usage.
        secret: String,
        /// libvirt's words.
        reason: String,
    },
    /// Something nasbak cannot do yet.
    #[error("not supported: {what}")]
    Unsupported {
        /// What.
        what: String,
    },
    /// The VM must be shut off for this.
    #[error("{vm} is running; it must be shut off to restore it")]
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
    #[error("{what} does not exist")]
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
    #[error("the repository {repository} became unavailable during {step}: {state}")]
    RepositoryUnavailable {
        /// The repository.
        repository: String,
        /// What was being done.
        step: Step,
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
    /// The backup is the parent of others: deleting it would leave them without their chain.
    #[error("backup {backup} cannot be deleted: the incremental backups {} build on it; delete them first", .dependents.join(", "))]
    HasDependents {
        /// `VM/BACKUP-ID`.
        backup: String,
        /// The backups that build on it.
        dependents: Vec<String>,
    },
    /// A step of a workflow failed; `source` says how.
    #[error("{step} failed")]
    During {
        /// The step.
        step: Step,
        /// The failure.
        #[source]
        source: Box<BackupError>,
    },
    /// A directory given to mount a backup on cannot be used.
    #[error("{path} {problem}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// What is wrong and what would do.
        problem: String,
    },
    /// A system tool (mount, umount, losetup) failed.
    #[error("{action} failed")]
    Tool {
        /// What was being done.
        action: String,
        /// argv, status, stderr.
        #[source]
        source: nasbak_process::CommandError,
    },
    /// An instant restore of the VM is in flight: finish or cancel it first.
    #[error("an instant restore of {vm} is in flight ({}); finish or cancel it first", .dir.display())]
    InFlight {
        /// The VM.
        vm: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// A block copy of an instant restore is gone (it failed, or the VM stopped).
    #[error(
        "the copy of {vm}'s disk {disk} is gone (it failed, or the VM stopped): the instant restore can only be cancelled, then the VM restored again"
    )]
    CopyGone {
        /// The VM.
        vm: String,
        /// Its disk.
        disk: String,
    },
    /// libvirt did not say where something stands: the VM's QEMU or libvirtd did not answer
    /// in time (or failed); what was asked may still take effect.
    #[error("libvirt gave no answer about {what}")]
    Unanswered {
        /// What was asked about, and what is left in flight.
        what: String,
        /// libvirt's error, or the call that did not answer.
        #[source]
        source: nasbak_libvirt::LibvirtError,
    },
    /// Something took longer than it was given.
    #[error("{what} timed out")]
    TimedOut {
        /// What.
        what: String,
    },
    /// Cancelled.
    #[error("cancelled")]
    Cancelled,
    /// An off-site target refused or could not be reached.
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// What went wrong with an off-site target (an S3 bucket), in words that name it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("target {target}: {action} failed: {detail}")]
pub struct TargetError {
    /// The target's name.
    pub target: String,
    /// What was being done.
    pub action: String,
    /// Why it failed (the store's answer, or what is wrong locally), never a secret.
    pub detail: String,
}

impl BackupError {
    /// The case this error is, looking through the wrappers that say where it happened
    /// ([`BackupError::During`], [`BackupError::RepositoryUnavailable`],
    /// [`BackupError::StillFrozen`], [`BackupError::RestoreIncomplete`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackupError::During { source, .. }
            | BackupError::StillFrozen { source, .. }
            | BackupError::RestoreIncomplete { source, .. } => source.kind(),
            BackupError::Input(_) | BackupError::Directory { .. } | BackupError::Key(_) => ErrorKind::InvalidInput,
            BackupError::Mount(_) | BackupError::RepositoryUnavailable { .. } => ErrorKind::RepositoryUnreachable,
            BackupError::Config(_) | BackupError::NoCephKey { .. } => ErrorKind::Configuration,
            BackupError::Lock(_) | BackupError::InFlight { .. } => ErrorKind::Busy,
            BackupError::Libvirt(e) if e.is_no_domain() => ErrorKind::NoSuchDomain,
            BackupError::Libvirt(e) | BackupError::Unanswered { source: e, .. } if e.is_timeout() => {
                ErrorKind::Unresponsive
            }
            BackupError::Job(nasbak_libvirt::JobError::Unresponsive { .. }) => ErrorKind::Unresponsive,
            BackupError::NoSpace { .. } | BackupError::Scratch { .. } => ErrorKind::NoSpace,
            BackupError::NotBackupable { .. } => ErrorKind::DomainNotBackupable,
            BackupError::Unsupported { .. } => ErrorKind::Unsupported,
            BackupError::KeyNeeded { .. } => ErrorKind::KeyRejected,
            BackupError::NotShutOff { .. } => ErrorKind::DomainRunning,
            BackupError::Mismatch { .. } => ErrorKind::Mismatch,
            BackupError::Damaged { .. } => ErrorKind::CorruptFile,
            BackupError::DamagedBackup { .. } => ErrorKind::DamagedBackup,
            BackupError::NotFound { .. } => ErrorKind::NotFound,
            BackupError::Exists { .. } => ErrorKind::Exists,
            BackupError::Ambiguous { .. } => ErrorKind::Ambiguous,
            BackupError::HalfRestored { .. } => ErrorKind::HalfRestored,
            BackupError::HasDependents { .. } => ErrorKind::HasDependents,
            BackupError::Cancelled => ErrorKind::Cancelled,
            BackupError::Target(t) if t.detail == "cancelled" => ErrorKind::Cancelled,
            BackupError::Target(_) => ErrorKind::Target,
            _ => ErrorKind::Other,
        }
    }

    /// The step of the workflow that failed, where one is known.
    pub fn step(&self) -> Option<Step> {
        match self {
            BackupError::During { step, .. } => Some(step.clone()),
            BackupError::RepositoryUnavailable { step, .. } => Some(step.clone()),
            BackupError::StillFrozen { source, .. } | BackupError::RestoreIncomplete { source, .. } => source.step(),
            BackupError::Mount(_) => Some(Step::Mount),
            BackupError::Lock(_) | BackupError::HalfRestored { .. } => Some(Step::Lock),
            BackupError::NoSpace { .. } => Some(Step::Space),
            BackupError::Scratch { .. } | BackupError::Pull { .. } => Some(Step::Job),
            BackupError::Job(_) => Some(Step::Job),
            BackupError::Agent(_) => Some(Step::Freeze),
            BackupError::AttachFailed { .. } => Some(Step::Attach),
            _ => None,
        }
    }
}

/// Wraps a failure of `step` as [`BackupError::During`]; a cancel stays [`BackupError::Cancelled`]
/// and a failure that already says its step is left as it is.
pub(crate) fn at(step: Step) -> impl FnOnce(BackupError) -> BackupError {
    move |e| match e {
        BackupError::Cancelled
        | BackupError::During { .. }
        | BackupError::RepositoryUnavailable { .. }
        | BackupError::StillFrozen { .. }
        | BackupError::RestoreIncomplete { .. } => e,
        e => BackupError::During { step, source: Box::new(e) },
    }
}

impl From<nasbak_repo::store::StoreError> for BackupError {
    /// The store's errors are the engine's: the same variants, the same words.
    fn from(e: nasbak_repo::store::StoreError) -> Self {
        use nasbak_repo::store::StoreError;
        match e {
            StoreError::Io { action, path, source } => BackupError::Io { action, path, source },
            StoreError::Damaged { backup, reason } => BackupError::DamagedBackup { backup, reason },
            StoreError::NotFound { what } => BackupError::NotFound { what },
            StoreError::Input(e) => BackupError::Input(e),
            other => BackupError::Io {
                action: "using the repository's store",
                path: Default::default(),
                source: std::io::Error::other(other),
            },
        }
    }
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

/// `e`, or [`BackupError::RepositoryUnavailable`] with `e` as its cause when the repository is
/// no longer mounted or no longer answers.
pub(crate) fn repository_unavailable<M: nasbak_repo::Mounter>(
    mounted: &nasbak_repo::MountedRepository<'_, M>,
    repository: String,
    step: Step,
    e: BackupError,
) -> BackupError {
    if matches!(e, BackupError::Cancelled) {
        return e;
    }
    match mounted.health() {
        Ok(()) => e,
        Err(state) => {
            BackupError::RepositoryUnavailable { repository, step, state: state.to_string(), source: Box::new(e) }
        }
    }
}

/// A failure after a cancel is the cancel.
pub(crate) fn cancelled_or(cancel: &nasbak_process::CancelHandle, e: impl Into<BackupError>) -> BackupError {
    if cancel.is_cancelled() { BackupError::Cancelled } else { e.into() }
}
