//! Finding, verifying and deleting backups on a repository, including backups written by the
//! reference system (no manifest: `root.*`/`datadisk.*` qcow2 files and `domain-config.xml`).
//!
//! Catalog work needs a repository and qemu-img, never a hypervisor: [`Catalog`] holds only
//! those, so `list`, `verify`, `delete` and `prune` work while libvirtd is down. Every directory
//! named like a backup is accounted for: a backup (ours or the reference system's), or a damaged
//! one with the reason, never silently left out.

use std::fs;
use std::path::Path;

use nasbak_process::CancelHandle;
use nasbak_qemu_img::{CheckVerdict, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::{BackupRepository, FileFormat, ManifestDisk, Mounter};

use crate::engine::Catalog;
use crate::error::BackupError;
use crate::outcome::{CapacityReport, FileStatus, FileVerdict, VerifyReport};
use crate::progress::{Observer, Phase, Progress};
use crate::store::link_problem;
use nasbak_repo::store::VmLock;
use nasbak_repo::store::{BackupEntry, BackupKind, ancestors, list_backups, read_backup, retire_and_delete};

impl<I: ImageTool, M: Mounter> Catalog<'_, I, M> {
    /// The backups on `repository` (of `vm` only, when given), oldest first: complete ones and
    /// damaged ones ([`BackupKind::Damaged`]). Partial directories of backups still being
    /// written and anything not named like a backup are not listed.
    pub fn list(&self, repository: &BackupRepository, vm: Option<&str>) -> Result<Vec<BackupEntry>, BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        Ok(list_backups(repository.name().as_str(), mounted.root(), vm)?)
    }

    /// One backup (complete or damaged); [`BackupError::NotFound`] when there is none of that id.
    pub fn entry(&self, repository: &BackupRepository, vm: &str, id: &str) -> Result<BackupEntry, BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        let (_, _, dir) = mounted.layout().resolve_backup(&format!("{vm}/{id}"))?;
        read_backup(repository.name().as_str(), vm, id, &dir)
            .ok_or_else(|| BackupError::NotFound { what: format!("backup {}:{vm}/{id}", repository.name()) })
    }

    /// Verifies every backup on `repository` (of `vm` only, when given), oldest first; a damaged
    /// backup is a report that says why, not an error.
    pub fn verify_all(
        &self,
        repository: &BackupRepository,
        vm: Option<&str>,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<Vec<VerifyReport>, BackupError> {
        let mut reports = Vec::new();
        for b in self.list(repository, vm)? {
            reports.push(match self.verify(repository, &b.vm, &b.id, cancel, observer) {
                Ok(report) => report,
                Err(BackupError::DamagedBackup { reason, .. }) => VerifyReport::of_damaged(b.reference(), reason),
                Err(e) => return Err(e),
            });
        }
        Ok(reports)
    }

    /// Checks every file of one backup: that it is there and readable, `qemu-img check`, and its
    /// checksum against the manifest. A damaged backup (its manifest unreadable or invalid) is
    /// [`BackupError::DamagedBackup`]. Progress is the bytes of the files checked so far.
    pub fn verify(
        &self,
        repository: &BackupRepository,
        vm: &str,
        id: &str,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<VerifyReport, BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        let (_, _, dir) = mounted.layout().resolve_backup(&format!("{vm}/{id}"))?;
        let entry = read_backup(repository.name().as_str(), vm, id, &dir)
            .ok_or_else(|| BackupError::NotFound { what: format!("backup {vm}/{id}") })?;
        let backup = entry.reference();
        // Each file: the directory it is in, its name, its name as shown, its checksum. An
        // incremental disk brings the files of its chain (shown as `../<backup>/<file>`), and
        // its backing link is checked against its manifest.
        let mut files: Vec<(std::path::PathBuf, String, String, Option<nasbak_repo::Checksum>, Opened)> = Vec::new();
        let mut links = Vec::new();
        // Files whose chain cannot be followed, and why (a reference-system file).
        let mut problems: Vec<(String, String)> = Vec::new();
        // The VM state files (NVRAM, TPM state), and the key their encrypted copies open with.
        let mut state = (Vec::new(), None);
        match entry.kind {
            BackupKind::Nasbak(m) => {
                let vm_dir = dir.parent().unwrap_or(&dir).to_owned();
                if m.state.iter().any(|s| s.stored_as.is_encrypted()) {
                    state.1 = crate::protect::file_key(repository.protection()).ok().flatten();
                }
                state.0.clone_from(&m.state);
                // Encrypted files are checked with the repository's key file when it has one;
                // without it, their checksums still say whether what is stored is intact.
                let key = match m.disks.iter().any(|d| d.stored_as.is_encrypted()) {
                    true => crate::protect::file_key(repository.protection()).ok().flatten(),
                    false => None,
                };
                for d in &m.disks {
                    let chain = ancestors(&vm_dir, vm, id, d)?;
                    let how = opened(&dir, d, &chain, key.as_ref(), &backup);
                    // A key that opens nothing is said as such, not as damage in every file.
                    if let Opened::As(image) = &how
                        && let Err(e) = self.images().check(image, &ImageFormat::Qcow2)
                        && e.is_wrong_key()
                    {
                        return Err(BackupError::KeyNeeded {
                            backup: backup.clone(),
                            detail: format!("disk {} does not open with the repository's key file", d.target),
                        });
                    }
                    files.push((dir.clone(), d.file.clone(), d.file.clone(), d.checksum.clone(), how));
                    // A qcow2 inside a LUKS container names no backing file: its chain is the
                    // manifests'.
                    if let Some(backing) = d.backing.as_ref().filter(|_| d.stored_as != FileFormat::CompressedInLuks) {
                        links.push((d.file.clone(), backing.clone()));
                    }
                    for (i, (parent_dir, parent)) in chain.iter().enumerate() {
                        let shown = format!(
                            "../{}/{}",
                            parent_dir.file_name().unwrap_or_default().to_string_lossy(),
                            parent.file
                        );
                        if !files.iter().any(|f| f.2 == shown) {
                            let how = opened(parent_dir, parent, &chain[i + 1..], key.as_ref(), &backup);
                            files.push((parent_dir.clone(), parent.file.clone(), shown, parent.checksum.clone(), how));
                        }
                    }
                }
            }
            BackupKind::Reference { files: names } => {
                // Each file alone (its header's backing name is not opened: it may point at the
                // reference script's old mount point), then the files of its chain, resolved in
                // the repository; a name that leads elsewhere is the file's damage.
                let vm_dir = dir.parent().unwrap_or(&dir).to_owned();
                let alone = |d: &Path, f: &str| {
                    Opened::As(ImageLocation::Stored(nasbak_qemu_img::StoredImage::single(
                        d.join(f),
                        nasbak_qemu_img::StoredLayout::Qcow2,
                        None,
                    )))
                };
                for f in names {
                    files.push((dir.clone(), f.clone(), f.clone(), None, alone(&dir, &f)));
                    let chain = nasbak_repo::store::reference_disk(&vm_dir, vm, id, &f, "")
                        .and_then(|d| ancestors(&vm_dir, vm, id, &d));
                    match chain {
                        Ok(chain) => {
                            for (parent_dir, parent) in chain {
                                let backup_name = parent_dir.file_name().unwrap_or_default().to_string_lossy();
                                let shown = format!("../{backup_name}/{}", parent.file);
                                if !files.iter().any(|x| x.2 == shown) {
                                    let how = alone(&parent_dir, &parent.file);
                                    files.push((parent_dir.clone(), parent.file.clone(), shown, None, how));
                                }
                            }
                        }
                        Err(e) => problems.push((f.clone(), crate::error::chain(&BackupError::from(e)))),
                    }
                }
            }
            BackupKind::Damaged { reason } => {
                return Err(BackupError::DamagedBackup { backup: format!("{vm}/{id}"), reason });
            }
        }
        let sizes: Vec<u64> =
            files.iter().map(|(d, f, _, _, _)| fs::metadata(d.join(f)).map_or(0, |m| m.len())).collect();
        let total = sizes.iter().sum();
        let mut processed = 0;
        observer(&Progress::new(Phase::Verify, vm, processed, total));
        let mut verdicts = Vec::new();
        for ((file_dir, file, shown, sum, opened), size) in files.into_iter().zip(sizes) {
            let mut report = |done: u64| {
                observer(&Progress::new(Phase::Verify, vm, processed + done.min(size), total));
                !cancel.is_cancelled()
            };
            let mut verdict = self.verify_file(&file_dir, (file.clone(), sum, opened), &mut report);
            verdict.file = shown;
            if let Some((_, problem)) = problems.iter().find(|(f, _)| *f == verdict.file) {
                verdict = FileVerdict::new(
                    verdict.file,
                    verdict.check,
                    verdict.checksum_ok,
                    Some((FileStatus::Corrupt, problem.clone())),
                );
            }
            if let Some((_, backing)) = links.iter().find(|(f, _)| *f == file && file_dir == dir)
                && verdict.ok()
                && let Some(problem) = link_problem(self.images(), &dir.join(&file), &dir.join(backing))
            {
                verdict = FileVerdict::new(
                    verdict.file,
                    verdict.check,
                    verdict.checksum_ok,
                    Some((FileStatus::Corrupt, problem)),
                );
            }
            verdicts.push(verdict);
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            processed += size;
            observer(&Progress::new(Phase::Verify, vm, processed, total));
        }
        for s in &state.0 {
            verdicts.push(self.verify_state(&dir, s, state.1.as_ref(), cancel));
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
        }
        Ok(VerifyReport { backup, damaged: None, files: verdicts })
    }

    /// The verdict on a VM state file (NVRAM, TPM state): read (decrypted with `key` when it
    /// is stored encrypted) and its content checked against the manifest's checksum. It is no
    /// disk image: `check` is `Unsupported`. An encrypted copy without the key is not read.
    fn verify_state(
        &self,
        dir: &Path,
        s: &nasbak_repo::ManifestState,
        key: Option<&crate::protect::Key>,
        cancel: &CancelHandle,
    ) -> FileVerdict {
        let file = s.file.clone();
        if let Err(e) = fs::File::open(dir.join(&file)) {
            let status =
                if e.kind() == std::io::ErrorKind::NotFound { FileStatus::Missing } else { FileStatus::Unreadable };
            return FileVerdict::new(file, CheckVerdict::Incomplete, None, Some((status, e.to_string())));
        }
        if s.stored_as.is_encrypted() && key.is_none() {
            return FileVerdict::new(file, CheckVerdict::Unsupported, None, None);
        }
        match crate::vmstate::read_state(self.images(), dir, s, key, cancel) {
            Ok(_) => FileVerdict::new(file, CheckVerdict::Unsupported, Some(true), None),
            Err(BackupError::Damaged { .. }) => FileVerdict::new(file, CheckVerdict::Unsupported, Some(false), None),
            Err(e @ BackupError::Io { .. }) => FileVerdict::new(
                file,
                CheckVerdict::Incomplete,
                None,
                Some((FileStatus::Unreadable, crate::error::chain(&e))),
            ),
            Err(e) => FileVerdict::new(
                file,
                CheckVerdict::Incomplete,
                None,
                Some((FileStatus::Corrupt, crate::error::chain(&e))),
            ),
        }
    }

    fn verify_file(
        &self,
        dir: &Path,
        (file, sum, opened): (String, Option<nasbak_repo::Checksum>, Opened),
        progress: &mut dyn FnMut(u64) -> bool,
    ) -> FileVerdict {
        let path = dir.join(&file);
        // Open it first: a missing file and one that cannot be read are told apart from bad data.
        if let Err(e) = fs::File::open(&path) {
            let status =
                if e.kind() == std::io::ErrorKind::NotFound { FileStatus::Missing } else { FileStatus::Unreadable };
            return FileVerdict::new(file, CheckVerdict::Incomplete, None, Some((status, e.to_string())));
        }
        let (checksum_ok, error) = match sum {
            None => (None, None),
            Some(c) => match crate::transfer::hash::checksum_file_observed(&path, &c.algorithm, progress) {
                Ok(actual) => (Some(actual == c.value), None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (None, Some((FileStatus::Missing, e.to_string())))
                }
                Err(e) => (None, Some((FileStatus::Unreadable, format!("reading it failed: {e}")))),
            },
        };
        let image = match opened {
            Opened::ByPath => ImageLocation::Path(path),
            Opened::As(image) => image,
            // Encrypted, and no key to open it: its checksum is all that is checked.
            Opened::NotWithoutKey => return FileVerdict::new(file, CheckVerdict::Unsupported, checksum_ok, error),
        };
        let check = match self.images().check(&image, &ImageFormat::Qcow2) {
            Ok(r) => r.verdict,
            Err(_) => CheckVerdict::Incomplete,
        };
        FileVerdict::new(file, check, checksum_ok, error)
    }

    /// The capacity of `repository` (mounted for the measurement, then released).
    pub fn capacity(&self, repository: &BackupRepository) -> Result<CapacityReport, BackupError> {
        self.measure(repository, false)
    }

    /// Every backup on `repository` and its capacity, with one mount (what a status of every
    /// VM asks of each repository).
    pub fn survey(&self, repository: &BackupRepository) -> Result<(Vec<BackupEntry>, CapacityReport), BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        let entries = list_backups(repository.name().as_str(), mounted.root(), None)?;
        let c = mounted.capacity()?;
        mounted.release()?;
        Ok((entries, CapacityReport::new(repository.name().to_string(), c.total, c.used, c.available)))
    }

    /// Checks `repository` end to end: mount, write a file, read it back, measure, unmount. Says
    /// so when root may not write (root_squash).
    pub fn check(&self, repository: &BackupRepository) -> Result<CapacityReport, BackupError> {
        self.measure(repository, true)
    }

    fn measure(&self, repository: &BackupRepository, probe: bool) -> Result<CapacityReport, BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        if probe {
            mounted.check_writable()?;
        }
        let c = mounted.capacity()?;
        mounted.release()?;
        Ok(CapacityReport {
            repository: repository.name().to_string(),
            total: c.total,
            used: c.used,
            available: c.available,
        })
    }

    /// Deletes one backup, complete or damaged. Only `VM/BACKUP-ID` naming an existing backup
    /// directory is accepted: never the repository, a VM directory, or anything else.
    pub fn delete(&self, repository: &BackupRepository, vm: &str, id: &str) -> Result<(), BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        let (vm_name, _, dir) = mounted.layout().resolve_backup(&format!("{vm}/{id}"))?;
        let missing = || BackupError::NotFound { what: format!("backup {vm}/{id} on {}", repository.name()) };
        if read_backup(repository.name().as_str(), vm, id, &dir).is_none() {
            return Err(missing());
        }
        // Not while a backup, restore or prune of this VM runs; and looked at again under the
        // lock: a prune that held it may have removed the backup meanwhile.
        let vm_dir = mounted.layout().vm_dir(&vm_name);
        let _lock = VmLock::take(&vm_dir, vm)?;
        if read_backup(repository.name().as_str(), vm, id, &dir).is_none() {
            return Err(missing());
        }
        // Never a backup a remaining one builds on: that one could no longer be restored.
        let dependents: Vec<String> = list_backups(repository.name().as_str(), mounted.root(), Some(vm))?
            .into_iter()
            .filter(|e| match &e.kind {
                BackupKind::Nasbak(m) => m.parent.as_deref() == Some(id),
                // A reference-system incremental whose file's header leads to this backup.
                BackupKind::Reference { files } => files.iter().any(|f| {
                    nasbak_repo::store::reference_disk(&vm_dir, vm, &e.id, f, "")
                        .is_ok_and(|d| d.backing.is_some_and(|b| b.starts_with(&format!("../{id}/"))))
                }),
                BackupKind::Damaged { .. } => false,
            })
            .map(|e| e.id)
            .collect();
        if !dependents.is_empty() {
            return Err(BackupError::HasDependents { backup: format!("{vm}/{id}"), dependents });
        }
        Ok(retire_and_delete(&vm_dir, &dir)?)
    }
}

/// How `verify` opens a file for `qemu-img check`.
enum Opened {
    /// By its path (plain and compressed files, and reference backups).
    ByPath,
    /// Encrypted: with the key and the chain below it.
    As(ImageLocation),
    /// Encrypted, and the repository gives no key file: not opened.
    NotWithoutKey,
}

/// How the file of `disk` in `dir`, with `chain` below it, is opened for its check.
fn opened(
    dir: &Path,
    disk: &ManifestDisk,
    chain: &[(std::path::PathBuf, ManifestDisk)],
    key: Option<&crate::protect::Key>,
    backup: &str,
) -> Opened {
    if !disk.stored_as.is_encrypted() {
        return Opened::ByPath;
    }
    match crate::protect::disk_image(dir, disk, chain, key, backup) {
        Ok(image) if key.is_some() => Opened::As(image),
        _ => Opened::NotWithoutKey,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nasbak_repo::model::layout::MANIFEST_FILE;

    #[test]
    fn every_backup_directory_is_a_backup_or_damaged_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("2026.01.01.00.00.00");
        assert_eq!(read_backup("r", "vm", "2026.01.01.00.00.00", &b), None);
        fs::create_dir(&b).unwrap();
        let kind = |d: &Path| read_backup("r", "vm", "2026.01.01.00.00.00", d).unwrap().kind;
        assert!(matches!(kind(&b), BackupKind::Damaged { reason } if reason.contains("neither a manifest")));
        fs::write(b.join("root.v.qcow2"), "x").unwrap();
        assert_eq!(kind(&b), BackupKind::Reference { files: vec!["root.v.qcow2".into()] });
        fs::write(b.join(MANIFEST_FILE), "{ not json").unwrap();
        assert!(matches!(kind(&b), BackupKind::Damaged { reason } if reason.contains("manifest is invalid")));
        fs::remove_file(b.join(MANIFEST_FILE)).unwrap();
        fs::create_dir(b.join(MANIFEST_FILE)).unwrap();
        assert!(matches!(kind(&b), BackupKind::Damaged { reason } if reason.contains("cannot be read")));
    }

    #[test]
    fn a_file_verdict_tells_bad_data_from_missing_and_unreadable_files() {
        let v = |check, sum, err| FileVerdict::new("f".into(), check, sum, err).status;
        assert_eq!(v(CheckVerdict::Clean, Some(true), None), FileStatus::Ok);
        assert_eq!(v(CheckVerdict::Leaks, None, None), FileStatus::Ok);
        assert_eq!(v(CheckVerdict::Clean, Some(false), None), FileStatus::Differs);
        assert_eq!(v(CheckVerdict::Corrupt, Some(true), None), FileStatus::Corrupt);
        assert_eq!(v(CheckVerdict::Incomplete, None, Some((FileStatus::Missing, "gone".into()))), FileStatus::Missing);
        let e = Some((FileStatus::Unreadable, "EIO".into()));
        assert_eq!(v(CheckVerdict::Clean, None, e), FileStatus::Unreadable);
    }
}
