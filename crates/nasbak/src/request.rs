//! The requests of the workflows: what to do, built with `new` and the `with_` methods. The
//! lowest layer of the engine with the errors and progress: every workflow may use it, it uses
//! no workflow.

use std::path::PathBuf;
use std::time::Duration;

use nasbak_agent::QuiescePolicy;
use nasbak_qemu_img::{ImageFormat, ImageLocation};
use nasbak_repo::BackupRepository;

use serde::Serialize;

/// Local scratch storage for the push jobs of running VMs (`Engine::with_scratch`): the job
/// writes each disk's backup file there, so a guest write that must first save the old data
/// (copy-before-write) waits on a local disk, never on the repository; the files are then copied
/// to the repository, where a slow or stalled NAS delays only nasbak.
///
/// The files are the backup's own, stored as the repository says (compressed, encrypted), so
/// nothing is on the scratch disk in plaintext that the repository would have encrypted. While
/// the job runs, the files may hold at most `limit` bytes, and the file system at least
/// [`Scratch::RESERVE`] free: past either, the job is aborted (the guest runs on, never paused)
/// and the backup fails with [`crate::BackupError::Scratch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Scratch {
    /// The directory (on a local file system QEMU may write); each backup uses
    /// `<dir>/<vm>/<pid>-<id>/`, removed when it ends.
    pub dir: PathBuf,
    /// The most bytes one backup's files may hold there.
    pub limit: u64,
}

impl Scratch {
    /// The free space the scratch file system keeps while a job writes to it: a job that would
    /// take it is aborted rather than have QEMU meet a full disk in a guest write's path.
    pub const RESERVE: u64 = 256 << 20;

    /// Scratch storage in `dir`, at most `limit` bytes per backup.
    pub fn new(dir: impl Into<PathBuf>, limit: u64) -> Self {
        Scratch { dir: dir.into(), limit }
    }
}

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

/// Restoring every disk of a shut-off VM from a backup. Built with [`RestoreRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RestoreRequest {
    /// The repository the backup is on.
    pub repository: BackupRepository,
    /// The VM the backup is of.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// Restore into this shut-off VM instead of the backup's own (disks paired by target only).
    pub into: Option<String>,
}

impl RestoreRequest {
    /// Restoring backup `id` of `vm` on `repository` into `vm`.
    pub fn new(repository: BackupRepository, vm: impl Into<String>, id: impl Into<String>) -> Self {
        RestoreRequest { repository, vm: vm.into(), id: id.into(), into: None }
    }

    /// Restores into another shut-off VM.
    pub fn into_vm(mut self, vm: impl Into<String>) -> Self {
        self.into = Some(vm.into());
        self
    }
}

/// Restoring one disk of a backup as a new volume. Built with [`VolumeRestoreRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VolumeRestoreRequest {
    /// The repository the backup is on.
    pub repository: BackupRepository,
    /// The VM the backup is of.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// The disk, by its target in the backup (`vdb`).
    pub disk: String,
    /// Where to write: a new file or block device path, or an RBD image.
    pub to: ImageLocation,
    /// The format to write (RBD images are raw).
    pub format: ImageFormat,
    /// Attach the new volume to this VM (running or shut off).
    pub attach: Option<String>,
    /// Write at most this many bytes per second (`qemu-img convert -r`; a qcow2 file restored
    /// as a checked copy is not limited).
    pub bandwidth: Option<u64>,
}

impl VolumeRestoreRequest {
    /// Restoring disk `disk` (its target in the backup) of backup `id` of `vm` on `repository`
    /// to `to`, as qcow2 (raw for an RBD image), attached to no VM.
    pub fn new(
        repository: BackupRepository,
        vm: impl Into<String>,
        id: impl Into<String>,
        disk: impl Into<String>,
        to: ImageLocation,
    ) -> Self {
        let format = if matches!(to, ImageLocation::Rbd(_)) { ImageFormat::Raw } else { ImageFormat::Qcow2 };
        VolumeRestoreRequest {
            repository,
            vm: vm.into(),
            id: id.into(),
            disk: disk.into(),
            to,
            format,
            attach: None,
            bandwidth: None,
        }
    }

    /// The format to write.
    pub fn with_format(mut self, format: ImageFormat) -> Self {
        self.format = format;
        self
    }

    /// Attaches the new volume to `vm` (running or shut off) as its next free target.
    pub fn attach_to(mut self, vm: impl Into<String>) -> Self {
        self.attach = Some(vm.into());
        self
    }

    /// Writes the volume at most `bytes_per_second` fast (spares the storage it goes to).
    pub fn with_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second);
        self
    }
}

/// How long an instant restore's finish waits for its copies when the caller does not say.
pub const DEFAULT_FINISH_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// An instant restore to begin. Built with [`InstantRestoreRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstantRestoreRequest {
    /// The backup, and the VM to restore (as for a whole-VM restore).
    pub restore: RestoreRequest,
    /// Where the overlays, exports and state go (`<work_dir>/<vm>/`).
    pub work_dir: PathBuf,
    /// At most this many bytes per second for each disk's copy (unlimited when `None`), to
    /// spare the repository's server and the network.
    pub bandwidth: Option<u64>,
}

impl InstantRestoreRequest {
    /// An instant restore of `restore`, its files under [`DEFAULT_INSTANT_DIR`].
    pub fn new(restore: RestoreRequest) -> Self {
        InstantRestoreRequest { restore, work_dir: PathBuf::from(DEFAULT_INSTANT_DIR), bandwidth: None }
    }

    /// Limits each disk's copy to `bytes_per_second`.
    pub fn with_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second);
        self
    }

    /// Keeps the overlays, exports and state under `dir` instead.
    pub fn with_work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = dir.into();
        self
    }
}

/// How long a guest has to answer by default.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A boot verification to run. Built with [`BootVerifyRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BootVerifyRequest {
    /// The repository the backup is on.
    pub repository: nasbak_repo::BackupRepository,
    /// The VM the backup is of.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// How long the guest has to answer (and the check to succeed).
    pub timeout: Duration,
    /// A command run in the guest through its agent (`/bin/sh -c COMMAND`) that must exit 0.
    pub check: Option<String>,
    /// Where the overlays, exports and console log go.
    pub work_dir: PathBuf,
}

impl BootVerifyRequest {
    /// Verifying backup `id` of `vm` on `repository` by booting it.
    pub fn new(repository: nasbak_repo::BackupRepository, vm: impl Into<String>, id: impl Into<String>) -> Self {
        BootVerifyRequest {
            repository,
            vm: vm.into(),
            id: id.into(),
            timeout: DEFAULT_BOOT_TIMEOUT,
            check: None,
            work_dir: PathBuf::from(DEFAULT_VERIFY_DIR),
        }
    }

    /// Gives the guest `timeout` to answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Also runs `command` in the guest (`/bin/sh -c`); it must exit 0.
    pub fn with_check(mut self, command: impl Into<String>) -> Self {
        self.check = Some(command.into());
        self
    }

    /// Keeps the overlays, exports and console log under `dir`.
    pub fn with_work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = dir.into();
        self
    }
}

/// Mounting a backup read-only. Built with [`MountRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MountRequest {
    /// The repository the backup is on.
    pub repository: BackupRepository,
    /// The VM the backup is of.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// Where to show it: an empty directory, or one to create.
    pub dir: PathBuf,
    /// Only this disk (its target in the backup); every disk when `None`.
    pub disk: Option<String>,
    /// The key file that opens LUKS volumes inside the guest's disks (read-only, with
    /// `cryptsetup`, which reads the whole file as the passphrase); without it they are listed
    /// as not mounted.
    pub luks_key_file: Option<PathBuf>,
}

impl MountRequest {
    /// Mounting every disk of backup `id` of `vm` on `repository` under `dir`.
    pub fn new(
        repository: BackupRepository,
        vm: impl Into<String>,
        id: impl Into<String>,
        dir: impl Into<PathBuf>,
    ) -> Self {
        MountRequest { repository, vm: vm.into(), id: id.into(), dir: dir.into(), disk: None, luks_key_file: None }
    }

    /// Mounts only the disk whose target in the backup is `target`.
    pub fn only_disk(mut self, target: impl Into<String>) -> Self {
        self.disk = Some(target.into());
        self
    }

    /// Opens the guest's LUKS volumes with the key file at `path` (see the field
    /// `luks_key_file`).
    pub fn open_luks_with(mut self, path: impl Into<PathBuf>) -> Self {
        self.luks_key_file = Some(path.into());
        self
    }
}

/// Where instant restores keep their overlays, exports and state by default: on local disk
/// (the overlays take the guest's writes until the copies finish).
pub const DEFAULT_INSTANT_DIR: &str = "/var/lib/nasbak/instant";

/// Where boot verifications keep their overlays, exports and console logs by default.
pub const DEFAULT_VERIFY_DIR: &str = "/var/lib/nasbak/verify";
