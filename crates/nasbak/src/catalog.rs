//! Finding, verifying and deleting backups on a repository, including backups written by the
//! reference system (no manifest: `root.*`/`datadisk.*` qcow2 files and `domain-config.xml`).

use std::fs;
use std::path::Path;

use nasbak_libvirt::Hypervisor;
use nasbak_qemu_img::{CheckVerdict, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::model::layout::{MANIFEST_FILE, parse_disk_file_name};
use nasbak_repo::{BackupId, BackupRepository, Manifest, Mounter, VmName};

use crate::backup::{AgentSource, Engine};
use crate::error::BackupError;

/// Who wrote a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupKind {
    /// nasbak, with its manifest.
    Nasbak(Box<Manifest>),
    /// The reference system: its disk files, no manifest.
    Reference {
        /// The disk files.
        files: Vec<String>,
    },
}

/// A backup found on a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupEntry {
    /// The VM.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// What it is.
    pub kind: BackupKind,
}

/// The verdict on one file of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVerdict {
    /// The file name.
    pub file: String,
    /// qemu-img check's verdict.
    pub check: CheckVerdict,
    /// Whether the SHA-256 matches the manifest (`None`: no checksum recorded).
    pub checksum_ok: Option<bool>,
}

impl FileVerdict {
    /// Whether the file is good.
    pub fn ok(&self) -> bool {
        matches!(self.check, CheckVerdict::Clean | CheckVerdict::Leaks) && self.checksum_ok != Some(false)
    }
}

pub(crate) fn read_backup(vm: &str, id: &str, dir: &Path) -> Option<BackupEntry> {
    let manifest = dir.join(MANIFEST_FILE);
    if manifest.exists() {
        let m = Manifest::from_json(&fs::read_to_string(&manifest).ok()?).ok()?;
        return Some(BackupEntry { vm: vm.into(), id: id.into(), kind: BackupKind::Nasbak(Box::new(m)) });
    }
    let mut files: Vec<String> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| parse_disk_file_name(n).is_some())
        .collect();
    files.sort();
    // Root first, as the reference writes it.
    files.sort_by_key(|f| !f.starts_with("root."));
    (!files.is_empty()).then(|| BackupEntry { vm: vm.into(), id: id.into(), kind: BackupKind::Reference { files } })
}

impl<H, I, M> Engine<H, I, M>
where
    H: Hypervisor + AgentSource,
    I: ImageTool,
    M: Mounter,
{
    /// The complete backups on `repository` (of `vm` only, when given), oldest first. Partial
    /// directories and anything that is not a backup are not listed.
    pub fn list(&self, repository: &BackupRepository, vm: Option<&str>) -> Result<Vec<BackupEntry>, BackupError> {
        let mounted = self.mounts.acquire(repository)?;
        let root = mounted.root().to_owned();
        let mut out = Vec::new();
        let vms: Vec<String> = match vm {
            Some(v) => vec![VmName::new(v)?.to_string()],
            None => fs::read_dir(&root)
                .map_err(|source| BackupError::Io { action: "listing", path: root.clone(), source })?
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
                    && let Some(entry) = read_backup(&v, &name, &e.path())
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

    /// Checks every file of one backup: `qemu-img check`, and the SHA-256 against the manifest.
    /// Progress is the bytes of the files checked so far.
    pub fn verify(
        &self,
        repository: &BackupRepository,
        vm: &str,
        id: &str,
        progress: &mut dyn FnMut(crate::BackupProgress),
    ) -> Result<Vec<FileVerdict>, BackupError> {
        let mounted = self.mounts.acquire(repository)?;
        let (_, _, dir) = mounted.layout().resolve_backup(&format!("{vm}/{id}"))?;
        let entry =
            read_backup(vm, id, &dir).ok_or_else(|| BackupError::NotFound { what: format!("backup {vm}/{id}") })?;
        let files: Vec<(String, Option<nasbak_repo::Checksum>)> = match &entry.kind {
            BackupKind::Nasbak(m) => m.disks.iter().map(|d| (d.file.clone(), d.checksum.clone())).collect(),
            BackupKind::Reference { files } => files.iter().map(|f| (f.clone(), None)).collect(),
        };
        let sizes: Vec<u64> = files.iter().map(|(f, _)| fs::metadata(dir.join(f)).map_or(0, |m| m.len())).collect();
        let total = sizes.iter().sum();
        let mut processed = 0;
        progress(crate::BackupProgress::Bytes { processed, total });
        let mut verdicts = Vec::new();
        for ((file, sum), size) in files.into_iter().zip(sizes) {
            let path = dir.join(&file);
            let check = match self.images.check(&ImageLocation::Path(path.clone()), &ImageFormat::Qcow2) {
                Ok(r) => r.verdict,
                Err(_) => CheckVerdict::Incomplete,
            };
            let checksum_ok =
                sum.map(|c| crate::checksum::checksum_file(&path, &c.algorithm).is_ok_and(|actual| actual == c.value));
            verdicts.push(FileVerdict { file, check, checksum_ok });
            processed += size;
            progress(crate::BackupProgress::Bytes { processed, total });
        }
        Ok(verdicts)
    }

    /// Deletes one backup. Only `VM/BACKUP-ID` naming an existing backup directory is accepted:
    /// never the repository, a VM directory, or anything that is not a backup.
    pub fn delete(&self, repository: &BackupRepository, vm: &str, id: &str) -> Result<(), BackupError> {
        let mounted = self.mounts.acquire(repository)?;
        let (_, _, dir) = mounted.layout().resolve_backup(&format!("{vm}/{id}"))?;
        if read_backup(vm, id, &dir).is_none() {
            return Err(BackupError::NotFound { what: format!("backup {vm}/{id} on {}", repository.name()) });
        }
        // Not while a backup, restore or prune of this VM runs.
        let _lock = crate::lock::VmLock::take(&mounted.layout().vm_dir(&VmName::new(vm)?), vm)?;
        fs::remove_dir_all(&dir).map_err(|source| BackupError::Io { action: "deleting", path: dir.clone(), source })
    }
}
