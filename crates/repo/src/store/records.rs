//! The records kept beside backups: the last boot verification of a backup, and the checkpoints
//! of deleted backups whose bitmaps the next backup of the VM removes.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{StoreError, create_synced, write_atomic};
use crate::{BackupId, CheckpointRecord, Manifest};

/// The file beside a backup's manifest that holds its last boot verification.
pub const BOOT_VERIFY_FILE: &str = "boot-verify.json";
/// The outcome of a boot verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BootResult {
    /// The guest booted: its agent answered (and the check succeeded).
    Passed,
    /// The guest did not answer in time, stopped, or the check failed.
    Failed,
    /// The VM has no guest agent: nasbak cannot tell a booted guest from a hung one.
    Unverifiable,
}

/// A boot verification of a backup, as recorded beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BootVerification {
    /// `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// The outcome.
    pub result: BootResult,
    /// When it ran.
    pub at: chrono::DateTime<chrono::Utc>,
    /// How long the guest took to answer (or how long it was given), in milliseconds.
    pub millis: u64,
    /// What happened, in words.
    pub detail: String,
    /// The console's last lines, for a failed boot.
    pub console: Vec<String>,
    /// How long the guest took to boot: from the throwaway VM's start to its guest agent's first
    /// answer, in milliseconds (what an operator waits for a restore of it to come up). None
    /// when the agent never answered, and in records of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_millis: Option<u64>,
}

impl BootVerification {
    /// A verification of backup `backup` (`REPO:VM/BACKUP-ID`) with `result` at `at`, what
    /// happened in `detail`; no time taken and no console lines yet.
    pub fn new(backup: String, result: BootResult, at: chrono::DateTime<chrono::Utc>, detail: String) -> Self {
        BootVerification { backup, result, at, millis: 0, detail, console: Vec::new(), boot_millis: None }
    }
}

/// Records `v` beside the backup in `dir` ([`BOOT_VERIFY_FILE`]), replacing the last one atomically.
pub fn write_record(dir: &Path, v: &BootVerification) -> Result<(), StoreError> {
    let path = dir.join(BOOT_VERIFY_FILE);
    let text = serde_json::to_string_pretty(v).expect("a verification serialises");
    write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| StoreError::Io {
        action: "recording the boot verification in",
        path,
        source,
    })
}

/// The last boot verification recorded beside the backup in `dir`, if any.
pub fn read_record(dir: &Path) -> Option<BootVerification> {
    serde_json::from_str(&fs::read_to_string(dir.join(BOOT_VERIFY_FILE)).ok()?).ok()
}

/// The directory in a VM's directory on the repository where `delete` and `prune` leave the
/// checkpoints of the backups they removed whose bitmaps may still live in the VM's images, for
/// the next backup of the VM (which has the hypervisor) to remove.
pub const RETIRED_DIR: &str = ".nasbak-retired-checkpoints";

/// Called holding the VM's lock, before backup `removed` goes: when it is the VM's newest
/// backup here and recorded a checkpoint, that checkpoint's bitmaps are still in the VM's
/// images (an older backup's went when the next one was made): its record is left in
/// [`RETIRED_DIR`] for the next backup to remove.
pub fn retire_checkpoint(vm_dir: &Path, removed: &Manifest) -> std::io::Result<()> {
    let Some(record) = &removed.checkpoint else { return Ok(()) };
    let Ok(id) = removed.id.parse::<BackupId>() else { return Ok(()) };
    let newer = fs::read_dir(vm_dir)?
        .flatten()
        .any(|e| e.file_name().to_str().and_then(|n| n.parse::<BackupId>().ok()).is_some_and(|other| other > id));
    if newer {
        return Ok(());
    }
    let dir = vm_dir.join(RETIRED_DIR);
    fs::create_dir_all(&dir)?;
    let json = serde_json::to_string(record).map_err(std::io::Error::other)?;
    create_synced(&dir.join(format!("{}.json", record.name)), json.as_bytes())
}

/// The checkpoints `delete` and `prune` retired in `vm_dir`, each with the file that holds it
/// (removed once its bitmaps are gone).
pub fn retired_checkpoints(vm_dir: &Path) -> Vec<(PathBuf, CheckpointRecord)> {
    let Ok(entries) = fs::read_dir(vm_dir.join(RETIRED_DIR)) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let record = serde_json::from_str(&fs::read_to_string(e.path()).ok()?).ok()?;
            Some((e.path(), record))
        })
        .collect()
}
