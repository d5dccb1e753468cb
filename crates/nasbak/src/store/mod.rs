//! What a repository holds, read and written: its backups (nasbak's, the reference system's,
//! damaged ones) and their chains, and the records kept beside them (boot verifications,
//! retired checkpoints). Below every workflow: they read and write the repository through it,
//! never through each other. (Its I/O moves to `nasbak-repo`'s `store` in a later step.)

use std::fs;
use std::path::Path;

use nasbak_libvirt::Domain;
use nasbak_qemu_img::{ImageLocation, ImageTool};
use nasbak_repo::model::layout::{DOMAIN_CONFIG_FILE, MANIFEST_FILE, parse_disk_file_name};
use nasbak_repo::{BackupId, BackupMode, CheckpointRecord, Manifest, ManifestDisk, VmName};
use serde::{Deserialize, Serialize};

pub(crate) mod marks;

use crate::disks::volume_of;
use crate::error::BackupError;

/// Who wrote a backup, or why it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupKind {
    /// nasbak, with its manifest.
    Nasbak(Box<Manifest>),
    /// The reference system: its disk files, no manifest.
    Reference {
        /// The disk files.
        files: Vec<String>,
    },
    /// A directory named like a backup whose manifest cannot be read or is invalid, or that holds
    /// no backup file. It is listed, verified (as damaged) and deletable, never restored from.
    Damaged {
        /// What is wrong.
        reason: String,
    },
}

/// A backup found on a repository.
///
/// Serialised (the CLI's `list --json`) as `id` (`REPO:VM/BACKUP-ID`), `repository`, `vm`,
/// `backup`, `written_by` (`nasbak`, `reference` or `unknown`), and `manifest` (nasbak's),
/// `files` (the reference system's) or `damaged` (the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupEntry {
    /// The repository it is on.
    pub repository: String,
    /// The VM.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// What it is.
    pub kind: BackupKind,
    /// Its last boot verification (`nasbak verify --boot`), if it had one.
    pub boot_verified: Option<BootVerification>,
}

impl BackupEntry {
    /// `REPO:VM/BACKUP-ID`.
    pub fn reference(&self) -> String {
        format!("{}:{}/{}", self.repository, self.vm, self.id)
    }
}

impl Serialize for BackupEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            id: String,
            repository: &'a str,
            vm: &'a str,
            backup: &'a str,
            written_by: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            manifest: Option<&'a Manifest>,
            #[serde(skip_serializing_if = "Option::is_none")]
            files: Option<&'a [String]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            damaged: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            boot_verified: Option<&'a BootVerification>,
        }
        let (written_by, manifest, files, damaged) = match &self.kind {
            BackupKind::Nasbak(m) => ("nasbak", Some(&**m), None, None),
            BackupKind::Reference { files } => ("reference", None, Some(files.as_slice()), None),
            BackupKind::Damaged { reason } => ("unknown", None, None, Some(reason.as_str())),
        };
        Shown {
            id: self.reference(),
            repository: &self.repository,
            vm: &self.vm,
            backup: &self.id,
            written_by,
            manifest,
            files,
            damaged,
            boot_verified: self.boot_verified.as_ref(),
        }
        .serialize(s)
    }
}

/// Reads the backup directory `dir` (`None`: there is no such directory). A manifest that cannot
/// be read or is invalid, and a directory with neither a manifest nor a backup file, give
/// [`BackupKind::Damaged`].
pub(crate) fn read_backup(repository: &str, vm: &str, id: &str, dir: &Path) -> Option<BackupEntry> {
    if !dir.is_dir() {
        return None;
    }
    let entry = |kind| {
        let boot_verified = read_record(dir);
        Some(BackupEntry { repository: repository.into(), vm: vm.into(), id: id.into(), kind, boot_verified })
    };
    let manifest = dir.join(MANIFEST_FILE);
    match fs::read_to_string(&manifest) {
        Ok(text) => {
            return entry(match Manifest::from_json(&text) {
                Ok(m) => BackupKind::Nasbak(Box::new(m)),
                Err(e) => BackupKind::Damaged { reason: format!("its manifest is invalid: {e}") },
            });
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return entry(BackupKind::Damaged { reason: format!("its manifest cannot be read: {e}") });
        }
        Err(_) => {}
    }
    let mut files: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| parse_disk_file_name(n).is_some())
            .collect(),
        Err(e) => return entry(BackupKind::Damaged { reason: format!("its directory cannot be read: {e}") }),
    };
    files.sort();
    // Root first, as the reference writes it.
    files.sort_by_key(|f| !f.starts_with("root."));
    if files.is_empty() {
        return entry(BackupKind::Damaged { reason: "it holds neither a manifest.json nor a backup file".into() });
    }
    entry(BackupKind::Reference { files })
}

/// Removes a backup directory with [`delete_dir`], its checkpoint retired first (see
/// [`retire_checkpoint`]) so that the next backup of the VM removes its
/// bitmaps. Run holding the VM's lock.
pub(crate) fn retire_and_delete(vm_dir: &Path, dir: &Path) -> Result<(), BackupError> {
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(BackupKind::Nasbak(m)) = read_backup("", "", &id, dir).map(|e| e.kind) {
        retire_checkpoint(vm_dir, &m).map_err(|source| BackupError::Io {
            action: "retiring the checkpoint of",
            path: dir.to_owned(),
            source,
        })?;
    }
    delete_dir(dir)
}

/// Removes a backup directory: first renamed to a `.partial` name (so that no reader ever sees
/// a half-deleted backup as complete or damaged; a partial directory is removed by the next
/// backup of the VM if this one is interrupted), then removed.
pub(crate) fn delete_dir(dir: &Path) -> Result<(), BackupError> {
    let mut doomed = dir.as_os_str().to_owned();
    doomed.push(".deleting");
    doomed.push(nasbak_repo::model::layout::PARTIAL_SUFFIX);
    let doomed = std::path::PathBuf::from(doomed);
    fs::rename(dir, &doomed).map_err(|source| BackupError::Io { action: "deleting", path: dir.to_owned(), source })?;
    fs::remove_dir_all(&doomed).map_err(|source| BackupError::Io { action: "deleting", path: doomed, source })
}

/// The backups below a mounted repository root (see [`Catalog::list`]).
pub(crate) fn list_mounted(repository: &str, root: &Path, vm: Option<&str>) -> Result<Vec<BackupEntry>, BackupError> {
    let mut out = Vec::new();
    let vms: Vec<String> = match vm {
        Some(v) => vec![VmName::new(v)?.to_string()],
        None => fs::read_dir(root)
            .map_err(|source| BackupError::Io { action: "listing", path: root.to_owned(), source })?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| VmName::new(n).is_ok())
            .collect(),
    };
    for v in vms {
        let Ok(entries) = fs::read_dir(root.join(&v)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<BackupId>().is_ok()
                && let Some(entry) = read_backup(repository, &v, &name, &e.path())
            {
                out.push(entry);
            }
        }
    }
    out.sort_by(|a, b| {
        (a.vm.as_str(), a.id.parse::<BackupId>().ok()).cmp(&(b.vm.as_str(), b.id.parse::<BackupId>().ok()))
    });
    Ok(out)
}

/// Why the backing link of `file` does not lead to `expected` (the parent's file its manifest
/// names), or `None` when it does.
pub(crate) fn link_problem<I: ImageTool>(images: &I, file: &Path, expected: &Path) -> Option<String> {
    let info = match images.info(&ImageLocation::Path(file.to_owned())) {
        Ok(info) => info,
        Err(e) => return Some(format!("its backing chain cannot be read: {}", crate::error::chain(&e))),
    };
    let actual = info.first().and_then(|i| i.backing_file.clone());
    let same = |a: &Path| match (fs::canonicalize(a), fs::canonicalize(expected)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    match actual {
        Some(a) if same(Path::new(&a)) => None,
        Some(a) => Some(format!("its backing file is {a}, its manifest says {}", expected.display())),
        None => Some(format!("it has no backing file, its manifest says {}", expected.display())),
    }
}

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
}

pub(crate) fn write_record(dir: &Path, v: &BootVerification) -> Result<(), BackupError> {
    let path = dir.join(BOOT_VERIFY_FILE);
    let text = serde_json::to_string_pretty(v).expect("a verification serialises");
    nasbak_repo::store::write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| BackupError::Io {
        action: "recording the boot verification in",
        path,
        source,
    })
}

/// The last boot verification recorded beside the backup in `dir`, if any.
pub(crate) fn read_record(dir: &Path) -> Option<BootVerification> {
    serde_json::from_str(&fs::read_to_string(dir.join(BOOT_VERIFY_FILE)).ok()?).ok()
}

/// The directory in a VM's directory on the repository where `delete` and `prune` leave the
/// checkpoints of the backups they removed whose bitmaps may still live in the VM's images, for
/// the next backup of the VM (which has the hypervisor) to remove.
pub(crate) const RETIRED_DIR: &str = ".nasbak-retired-checkpoints";

/// Called holding the VM's lock, before backup `removed` goes: when it is the VM's newest
/// backup here and recorded a checkpoint, that checkpoint's bitmaps are still in the VM's
/// images (an older backup's went when the next one was made): its record is left in
/// [`RETIRED_DIR`] for the next backup to remove.
pub(crate) fn retire_checkpoint(vm_dir: &Path, removed: &Manifest) -> std::io::Result<()> {
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
    write_synced(&dir.join(format!("{}.json", record.name)), json.as_bytes())
        .map_err(|e| std::io::Error::other(crate::error::chain(&e)))
}

/// The checkpoints `delete` and `prune` retired in `vm_dir`, each with the file that holds it
/// (removed once its bitmaps are gone).
pub(crate) fn retired_checkpoints(vm_dir: &Path) -> Vec<(std::path::PathBuf, CheckpointRecord)> {
    let Ok(entries) = fs::read_dir(vm_dir.join(RETIRED_DIR)) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let record = serde_json::from_str(&fs::read_to_string(e.path()).ok()?).ok()?;
            Some((e.path(), record))
        })
        .collect()
}

/// The disks of a backup: from its manifest, or for a reference-system backup from its file
/// names, each volume's target taken from the saved `domain-config.xml` (else from `current`,
/// the VM as it is now).
pub(crate) fn backup_disks(
    dir: &Path,
    vm: &str,
    id: &str,
    current: Option<&Domain>,
) -> Result<Vec<ManifestDisk>, BackupError> {
    let entry =
        read_backup("", vm, id, dir).ok_or_else(|| BackupError::NotFound { what: format!("backup {vm}/{id}") })?;
    let files = match entry.kind {
        BackupKind::Nasbak(m) => return Ok(m.disks),
        BackupKind::Reference { files } => files,
        BackupKind::Damaged { reason } => {
            return Err(BackupError::DamagedBackup { backup: format!("{vm}/{id}"), reason });
        }
    };
    let saved = fs::read_to_string(dir.join(DOMAIN_CONFIG_FILE)).ok().and_then(|x| Domain::parse(&x).ok());
    let mut disks = Vec::new();
    for file in files {
        let (_, volume) = parse_disk_file_name(&file).expect("read_backup lists backup file names only");
        let find = |d: &Domain| d.disks.iter().find(|x| volume_of(x) == volume).map(|x| x.target.clone());
        let target = saved.as_ref().and_then(find).or_else(|| current.and_then(find)).ok_or_else(|| {
            BackupError::Mismatch {
                vm: vm.to_owned(),
                problems: vec![format!(
                    "the backup's file {file} is volume {volume}, which neither the saved domain-config.xml nor the VM has"
                )],
            }
        })?;
        disks.push(ManifestDisk {
            target,
            volume: volume.to_string(),
            source: String::new(),
            source_format: None,
            file: file.clone(),
            format: "qcow2".into(),
            virtual_size: 0,
            size: 0,
            checksum: None,
            mode: BackupMode::Full,
            backing: None,
            full_reason: None,
        });
    }
    Ok(disks)
}

/// The backup files an incremental disk builds on, nearest first (empty for a full disk), each
/// found through its backing link in its own backup's manifest: `vm_dir` is the VM's directory.
/// A link to a backup or file that is not there is [`BackupError::DamagedBackup`]: the chain is
/// broken and the disk cannot be restored from this backup.
pub(crate) fn ancestors(
    vm_dir: &Path,
    vm: &str,
    id: &str,
    disk: &ManifestDisk,
) -> Result<Vec<(std::path::PathBuf, ManifestDisk)>, BackupError> {
    let mut chain = Vec::new();
    let (mut current_id, mut current) = (id.to_owned(), disk.clone());
    while current.mode == BackupMode::Incremental {
        let broken = |reason: String| BackupError::DamagedBackup { backup: format!("{vm}/{id}"), reason };
        let link = current.backing.clone().unwrap_or_default();
        let (parent, file) = link
            .strip_prefix("../")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(|| broken(format!("disk {} of {current_id} has the backing {link:?}", current.target)))?;
        let dir = vm_dir.join(parent);
        let next = match read_backup("", vm, parent, &dir).map(|e| e.kind) {
            Some(BackupKind::Nasbak(m)) => m.disks.into_iter().find(|d| d.file == file).ok_or_else(|| {
                broken(format!("its chain is broken: backup {parent} has no file {file} for disk {}", current.target))
            })?,
            Some(BackupKind::Damaged { reason }) => {
                return Err(broken(format!("its chain is broken: backup {parent} is damaged ({reason})")));
            }
            Some(BackupKind::Reference { .. }) | None => {
                return Err(broken(format!("its chain is broken: backup {parent} is missing")));
            }
        };
        chain.push((dir, next.clone()));
        if chain.len() > 10_000 {
            return Err(broken("its chain does not end".into()));
        }
        (current_id, current) = (parent.to_owned(), next);
    }
    Ok(chain)
}

/// Writes `data` to a new file at `path` and syncs it.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    let io = |source| BackupError::Io { action: "writing", path: path.to_owned(), source };
    let mut f = fs::File::create(path).map_err(io)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io)
}
