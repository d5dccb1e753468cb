//! The outcomes of the workflows: what a backup, restore, verification, mount or prune did,
//! `Serialize` for the CLI's `--json`. In the lowest layer of the engine with the requests: every
//! workflow may use it, it uses no workflow.

use std::path::PathBuf;

use nasbak_qemu_img::CheckVerdict;
use nasbak_repo::{BackupRef, Manifest, ManifestDisk};
use serde::{Deserialize, Serialize};

/// A disk of the VM that was not backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SkippedDisk {
    /// Its target device.
    pub target: String,
    /// Why not (a cdrom, no medium, shareable, ...).
    pub reason: String,
}

/// A finished backup.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct BackupOutcome {
    /// The backup, `REPO:VM/BACKUP-ID`.
    pub id: BackupRef,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its directory on the (now released) repository, relative to the repository root.
    pub relative_dir: PathBuf,
    /// Disks not backed up, and why.
    pub skipped: Vec<SkippedDisk>,
    /// What this run cleaned up after earlier interrupted runs.
    pub cleaned: Vec<String>,
    /// What the operator must know although the backup is complete (a guest that could not be
    /// thawed).
    pub warnings: Vec<String>,
}

/// A finished whole-VM restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoreOutcome {
    /// The backup restored from, `VM/BACKUP-ID` on the request's repository.
    pub backup: String,
    /// The VM restored into.
    pub vm: String,
    /// Each disk restored.
    pub restored: Vec<RestoredDisk>,
    /// The VM's NVRAM and TPM state files put back from the backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<RestoredState>,
    /// What is worth knowing (a backup without the NVRAM or TPM state the VM has, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A state file put back by a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoredState {
    /// `nvram` or `tpm`.
    pub kind: nasbak_repo::StateKind,
    /// Where it was written.
    pub path: String,
    /// Its length in bytes.
    pub size: u64,
}

/// What was restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoredDisk {
    /// The target device.
    pub target: String,
    /// Where it was written: a path, or `rbd:pool/image`.
    pub location: String,
    /// The format written.
    pub format: String,
    /// Said when an earlier restore of this disk had been interrupted while it wrote in place.
    pub note: Option<String>,
}

/// Where a restored volume was attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Attachment {
    /// The VM.
    pub vm: String,
    /// The target device it was attached as.
    pub target: String,
}

/// A restored volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoredVolume {
    /// The backup restored from, `VM/BACKUP-ID` on the request's repository.
    pub backup: String,
    /// The disk of the backup restored.
    pub disk: String,
    /// Where it was written.
    pub location: String,
    /// Its format.
    pub format: String,
    /// The VM and target it was attached as.
    pub attached: Option<Attachment>,
}

/// An instant restore in flight (kept as `<work_dir>/<vm>/state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstantRestore {
    /// The VM restored into.
    pub vm: String,
    /// The backup, `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// The repository's name.
    pub repository: String,
    /// When it began.
    pub started: chrono::DateTime<chrono::Utc>,
    /// Its directory (overlays, exports, state).
    pub dir: PathBuf,
    /// Where the half-written marks of its volumes are (the VM's directory on the repository).
    pub marks: PathBuf,
    /// Each disk.
    pub disks: Vec<InstantDisk>,
}

/// One disk of an instant restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstantDisk {
    /// The target device.
    pub target: String,
    /// The VM's volume the data goes to (`rbd:POOL/IMAGE` for an RBD image).
    pub volume: PathBuf,
    /// Whether the volume is a block device.
    pub block: bool,
    /// For an RBD image: its `POOL/IMAGE` (the domain's definition says how it is reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<String>,
    /// The volume's format.
    pub format: String,
    /// The overlay the VM runs on until the pivot.
    pub overlay: PathBuf,
    /// The NBD socket of the read-only export of the backup file the overlay reads through.
    pub export: PathBuf,
    /// The backup files of this disk (the newest first, then its chain), with the directory
    /// each is in, for the checksums checked before the pivot.
    pub files: Vec<(PathBuf, ManifestDisk)>,
    /// The volume is written by the finish (`Engine::instant_finish`): the backup copied onto
    /// it in one pass that checks its checksums, then only what the guest wrote meanwhile
    /// mirrored (a shallow block copy). Without it (restores begun by an earlier nasbak, and
    /// encrypted backups), a block copy of the whole disk began when the VM started.
    #[serde(default)]
    pub copy_at_finish: bool,
    /// The finish has put the backup's copy in place of the volume.
    #[serde(default)]
    pub copied: bool,
    /// The volume is itself encrypted (a LUKS qcow2 whose passphrase is a libvirt secret): its
    /// overlay and its new image are encrypted with that passphrase, and QEMU encrypts what the
    /// block copy writes, so nothing of it is plaintext on the host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

impl InstantDisk {
    /// Whether the volume is written in place (a block device, an RBD image), not replaced by
    /// a file made beside it.
    pub fn in_place(&self) -> bool {
        self.block || self.rbd.is_some()
    }
}

/// Where an instant restore stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstantStatus {
    /// The restore.
    pub restore: InstantRestore,
    /// Whether the VM runs.
    pub running: bool,
    /// Each disk's copy.
    pub disks: Vec<DiskCopy>,
}

/// One disk's block copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DiskCopy {
    /// The target device.
    pub target: String,
    /// Where the copy stands.
    pub state: CopyState,
}

/// Where a disk's block copy stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CopyState {
    /// Copying: `done` of `total` bytes.
    Copying {
        /// Bytes copied.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// Caught up: every write is mirrored; ready to finish.
    Ready {
        /// Bytes in all.
        total: u64,
    },
    /// Nothing copied yet: the finish copies the backup onto the volume, then mirrors what the
    /// guest wrote.
    Pending,
    /// No copy runs (it failed, or the VM stopped): the restore can only be cancelled.
    Gone,
    /// libvirt did not say (the VM's QEMU or libvirtd did not answer in time, or failed): the
    /// copy may still run.
    Unknown {
        /// What libvirt said, or what did not answer.
        error: String,
    },
}

/// A finished instant restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstantFinished {
    /// The backup, `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// The VM.
    pub vm: String,
    /// Each disk, now on its volume.
    pub restored: Vec<RestoredDisk>,
}

/// What cancelling an instant restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstantCancelled {
    /// The VM (stopped).
    pub vm: String,
    /// The volumes left partly written (marked on the repository: restore them again).
    pub partly_written: Vec<PathBuf>,
}

/// A backup mounted read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MountedBackup {
    /// `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// The directory it is mounted under.
    pub dir: PathBuf,
    /// The repository's name (unmounted with the backup when nothing else uses it).
    pub repository: String,
    /// Whether nasbak created `dir` (removed again by unmount).
    pub created_dir: bool,
    /// Each disk shown.
    pub disks: Vec<MountedDisk>,
}

/// One disk of a mounted backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MountedDisk {
    /// The target device in the backup.
    pub target: String,
    /// The raw image showing the disk's content, read-only.
    pub image: PathBuf,
    /// The disk's virtual size in bytes.
    pub size: u64,
    /// How many backup files the content is read from (1 for a full, more for a chain).
    pub files: usize,
    /// The file systems mounted.
    pub filesystems: Vec<MountedFilesystem>,
    /// The partitions (or the whole disk) not mounted, and why.
    pub not_mounted: Vec<NotMounted>,
}

/// A file system of a mounted disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MountedFilesystem {
    /// The partition number, or `None` for a disk without a partition table.
    pub partition: Option<u32>,
    /// The LVM logical volume it is on (`VG/LV`, in the partition), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_volume: Option<String>,
    /// Where its files are.
    pub path: PathBuf,
    /// Its type (`ext4`, `xfs`, ...).
    pub fstype: String,
    /// The options it was mounted with.
    pub options: String,
}

/// A partition (or a whole disk) whose content was not mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NotMounted {
    /// The partition number, or `None` for the whole disk.
    pub partition: Option<u32>,
    /// The LVM logical volume not mounted (`VG/LV`, in the partition), if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_volume: Option<String>,
    /// Why (no file system, swap, an LVM volume device-mapper cannot show here, a LUKS volume
    /// without its key, the mount's error).
    pub reason: String,
}

/// What unmounting a backup removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct UnmountReport {
    /// The directory.
    pub dir: PathBuf,
    /// The file systems unmounted.
    pub unmounted: Vec<PathBuf>,
    /// The loop devices detached (those mount(8) had not cleared itself).
    pub loop_devices: Vec<String>,
    /// The device-mapper devices removed (logical volumes that are not one range of a disk,
    /// opened LUKS volumes), by name.
    pub mappings: Vec<String>,
    /// The exports stopped (their image files).
    pub exports: Vec<PathBuf>,
    /// Whether the repository was unmounted (it stays while other users have it).
    pub repository_unmounted: bool,
    /// The processes that keep the repository mounted, when it stays (another backup mounted
    /// from it, an instant restore, a backup running).
    pub repository_users: Vec<nasbak_repo::RepositoryUser>,
    /// Files left in the directory that nasbak did not put there (kept).
    pub left: Vec<PathBuf>,
}

/// A repository's capacity, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CapacityReport {
    /// The repository.
    pub repository: String,
    /// Size of its file system.
    pub total: u64,
    /// In use.
    pub used: u64,
    /// Available to a writer.
    pub available: u64,
}

impl CapacityReport {
    /// The capacity of repository `repository`: `total`, `used` and `available` bytes.
    pub fn new(repository: impl Into<String>, total: u64, used: u64, available: u64) -> Self {
        CapacityReport { repository: repository.into(), total, used, available }
    }
}

/// What verify found in one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The backup, `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// Why the backup is damaged (its manifest unreadable or invalid): then no file was checked.
    pub damaged: Option<String>,
    /// Each file's verdict.
    pub files: Vec<FileVerdict>,
}

impl VerifyReport {
    /// The report on a damaged backup (`REPO:VM/BACKUP-ID`), which has no file to check.
    pub fn of_damaged(backup: impl Into<String>, reason: impl Into<String>) -> Self {
        VerifyReport { backup: backup.into(), damaged: Some(reason.into()), files: Vec::new() }
    }

    /// Whether the backup is complete and every file is good.
    pub fn ok(&self) -> bool {
        self.damaged.is_none() && self.files.iter().all(FileVerdict::ok)
    }
}

/// What is wrong with one file of a backup, or that nothing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileStatus {
    /// Readable, `qemu-img check` clean (or only leaks), the checksum matches (or none recorded).
    Ok,
    /// The content differs from the checksum in the manifest.
    Differs,
    /// `qemu-img check` found corruption or could not check the image.
    Corrupt,
    /// The manifest lists the file but it is not there.
    Missing,
    /// Reading the file failed (an I/O error: the repository may be unreachable; the data may be
    /// fine).
    Unreadable,
}

impl std::fmt::Display for FileStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileStatus::Ok => "ok",
            FileStatus::Differs => "DIFFERS",
            FileStatus::Corrupt => "CORRUPT",
            FileStatus::Missing => "MISSING",
            FileStatus::Unreadable => "UNREADABLE",
        })
    }
}

/// The verdict on one file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FileVerdict {
    /// The file name.
    pub file: String,
    /// qemu-img check's verdict (`Incomplete` when it could not run; `Unsupported` for an
    /// encrypted file verified without its key, of which only the checksum was checked).
    pub check: CheckVerdict,
    /// Whether the checksum matches the manifest (`None`: none recorded, or the file could not
    /// be read; see `error`).
    pub checksum_ok: Option<bool>,
    /// Why the file could not be read, if it could not.
    pub error: Option<String>,
    /// The file's status, from the above.
    pub status: FileStatus,
}

impl FileVerdict {
    pub(crate) fn new(
        file: String,
        check: CheckVerdict,
        checksum_ok: Option<bool>,
        error: Option<(FileStatus, String)>,
    ) -> Self {
        let status = match &error {
            Some((status, _)) => *status,
            None if checksum_ok == Some(false) => FileStatus::Differs,
            // `Unsupported`: an encrypted file verified without its key, its checksum the check.
            None if !matches!(check, CheckVerdict::Clean | CheckVerdict::Leaks | CheckVerdict::Unsupported) => {
                FileStatus::Corrupt
            }
            None => FileStatus::Ok,
        };
        FileVerdict { file, check, checksum_ok, error: error.map(|(_, e)| e), status }
    }

    /// Whether the file is good.
    pub fn ok(&self) -> bool {
        self.status == FileStatus::Ok
    }
}

/// The decision on one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PruneDecision {
    /// The backup id.
    pub id: String,
    /// Whether it stays.
    pub keep: bool,
    /// Why (the rule that keeps it, or the limit that removes it).
    pub reason: String,
    /// For a kept incremental whose parent goes: the parent. The backup is merged into a
    /// self-contained one on the repository (a synthetic full) before the parent is removed.
    pub merge_over: Option<String>,
}

/// A backup prune did not count because it is damaged (see [`crate::BackupKind::Damaged`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DamagedNote {
    /// The backup id.
    pub id: String,
    /// What is wrong with it.
    pub reason: String,
}

/// What prune decided, and whether it carried it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PruneReport {
    /// The VM.
    pub vm: String,
    /// Every complete backup of the VM, newest first.
    pub decisions: Vec<PruneDecision>,
    /// Damaged backups: neither counted by the retention nor removed; verify or delete them.
    pub damaged: Vec<DamagedNote>,
    /// False for a dry run.
    pub executed: bool,
}

/// What a key rotation did (see `Catalog::rotate_key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyRotation {
    /// The repository.
    pub repository: String,
    /// The encrypted backup files found.
    pub files: usize,
    /// Those this run gave the new key and took the old one from.
    pub rotated: usize,
    /// Those an earlier run had finished already.
    pub already: usize,
}

/// Which backups of a repository open with a key (see `Catalog::check_key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyCheckReport {
    /// The repository.
    pub repository: String,
    /// Every backup of it.
    pub backups: Vec<KeyCheckEntry>,
}

impl KeyCheckReport {
    /// Whether every encrypted backup opens with the key.
    pub fn ok(&self) -> bool {
        self.backups.iter().all(|b| b.opens)
    }
}

/// One backup and the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyCheckEntry {
    /// `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// Whether any of its files is encrypted.
    pub encrypted: bool,
    /// Whether every encrypted file opens with the key (true for a backup with none).
    pub opens: bool,
    /// The files that do not open with it.
    pub not_opening: Vec<String>,
}

/// Which backups of a repository a copy to an off-site target takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySelection {
    /// One backup (and the backups its chain builds on).
    Backup {
        /// The VM.
        vm: String,
        /// The backup id.
        id: String,
    },
    /// Every backup of one VM.
    Vm(String),
    /// Every backup on the repository.
    All,
}

/// What a copy did with one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum CopyResult {
    /// Its files went up, then its manifest.
    Copied,
    /// The target had it already: its manifest there is this manifest (by checksum).
    AlreadyCopied,
    /// Not copied, and why (a backup of the reference system, a damaged one, one whose chain's
    /// parent is not on the target).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One backup of a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BackupCopy {
    /// `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// The VM.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// What was done.
    #[serde(flatten)]
    pub result: CopyResult,
    /// Its files, manifest included.
    pub files: usize,
    /// The bytes sent in this run.
    pub sent: u64,
    /// The bytes already on the target and kept: whole files there with the same checksum, and
    /// the parts of an interrupted upload that were resumed.
    pub kept: u64,
    /// Until when its objects are locked on the target (when the target locks).
    pub locked_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a copy to an off-site target did, backup by backup, parents before children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CopyReport {
    /// The target's name.
    pub target: String,
    /// The repository copied from.
    pub repository: String,
    /// Each backup.
    pub backups: Vec<BackupCopy>,
}

/// A backup on an off-site target, as its objects show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TargetBackup {
    /// `TARGET:VM/BACKUP-ID`.
    pub backup: String,
    /// The VM.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// Its manifest, when the copy is complete (the manifest goes up last) and readable.
    pub manifest: Option<Box<Manifest>>,
    /// Why it is not a usable backup: an interrupted copy (no manifest), an unreadable manifest.
    pub incomplete: Option<String>,
    /// Its objects.
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
}
