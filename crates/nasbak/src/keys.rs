//! The key of an encrypted repository: rotated and checked. A rotation changes LUKS keyslots in
//! each backup file's header and never rewrites data.
//!
//! Each file is rotated on its own, in two header changes: the new key added (when it does not
//! open the file yet), then the old one removed (when it still does). A rotation killed at any
//! point therefore leaves every file readable with the old key or the new one, and run again it
//! finishes: files done are recognised by the new key opening them and the old one not. A
//! header is part of what a file's checksum covers, so each backup's manifest gets the new
//! checksums, the old ones kept in a journal until it does (see `ROTATION_JOURNAL`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use nasbak_process::CancelHandle;
use nasbak_qemu_img::{ImageTool, StoredFile};
use nasbak_repo::model::layout::MANIFEST_FILE;
use nasbak_repo::store::{BackupKind, VmLock, check_key_file, list_backups, read_key_file, write_atomic};
use nasbak_repo::{BackupRepository, Checksum, Manifest, Mounter, VmName};

use crate::engine::Catalog;
use crate::error::BackupError;
use crate::outcome::{KeyCheckEntry, KeyCheckReport, KeyRotation};
use crate::protect::{file_key, layout_of};
use crate::transfer::hash::{CHECKSUM_ALGORITHM, checksum_file};

/// The journal a rotation keeps in a backup's directory while it changes that backup's files:
/// each file it began with, and its checksum before.
pub const ROTATION_JOURNAL: &str = ".nasbak-key-rotation.json";

impl<I: ImageTool, M: Mounter> Catalog<'_, I, M> {
    /// Gives every encrypted backup file of `repository` the key in the file `new_key` and
    /// removes the repository's current key (its key file) from it, VM by VM under each VM's
    /// lock. Changing the repository's setting to the new key is the caller's, once this
    /// returns; a backup that ran meanwhile with the old key is finished by running this again.
    /// A file that opens with neither key stops the rotation, named.
    pub fn rotate_key(
        &self,
        repository: &BackupRepository,
        new_key: &Path,
        cancel: &CancelHandle,
    ) -> Result<KeyRotation, BackupError> {
        let old = file_key(repository.protection())?.ok_or_else(|| BackupError::Unsupported {
            what: format!(
                "rotating the key of repository {}: it has no key file (only a key file is rotated)",
                repository.name()
            ),
        })?;
        check_key_file(new_key)?;
        if read_key_file(new_key)?.expose() == read_key_file(old.path())?.expose() {
            return Err(BackupError::KeyNeeded {
                backup: format!("{}:", repository.name()),
                detail: format!("{} holds the key the repository has now; give a new one", new_key.display()),
            });
        }
        let mounted = self.mounts().acquire(repository)?;
        let name = repository.name().to_string();
        let mut report = KeyRotation { repository: name.clone(), files: 0, rotated: 0, already: 0 };
        for (vm, backups) in encrypted_backups(&name, mounted.root())? {
            let _lock = VmLock::take(&mounted.root().join(&vm), &vm)?;
            for (backup, dir, manifest) in backups {
                if cancel.is_cancelled() {
                    return Err(BackupError::Cancelled);
                }
                self.rotate_backup((&backup, &dir, manifest), (old.path(), new_key), &mut report)?;
            }
        }
        Ok(report)
    }

    /// The encrypted files of one backup (in `dir`, described by `manifest`) rotated from `old`
    /// to `new`, and its manifest's checksums updated, since a file's header is part of what its
    /// checksum covers. Before a file's header changes, its checksum is checked against the
    /// manifest and kept in the backup's rotation journal ([`ROTATION_JOURNAL`]); a run killed
    /// before the manifest is updated leaves the journal, which tells the next run that the
    /// changed bytes are its own.
    fn rotate_backup(
        &self,
        (backup, dir, mut manifest): (&str, &Path, Manifest),
        (old, new): (&Path, &Path),
        report: &mut KeyRotation,
    ) -> Result<(), BackupError> {
        let journal_path = dir.join(ROTATION_JOURNAL);
        let mut journal: BTreeMap<String, String> =
            fs::read_to_string(&journal_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        let io = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| BackupError::Io { action, path, source }
        };
        let mut changed = false;
        for d in manifest.disks.iter_mut().filter(|d| d.stored_as.is_encrypted()) {
            report.files += 1;
            let file = StoredFile { path: dir.join(&d.file), layout: layout_of(d.stored_as) };
            let (has_new, has_old) = (self.images().opens_with(&file, new)?, self.images().opens_with(&file, old)?);
            let touched = journal.contains_key(&d.file);
            match (has_new, has_old) {
                (true, false) if !touched => {
                    report.already += 1;
                    continue;
                }
                (false, false) => {
                    return Err(BackupError::KeyNeeded {
                        backup: backup.to_owned(),
                        detail: format!("{} opens with neither the repository's key nor the new one", d.file),
                    });
                }
                _ => {}
            }
            let algorithm = d.checksum.as_ref().map_or(CHECKSUM_ALGORITHM, |c| c.algorithm.as_str()).to_owned();
            if !touched {
                // What the manifest says, before the header changes: never a damaged file made
                // to look intact.
                let sum = checksum_file(&file.path, &algorithm).map_err(io("checksumming", &file.path))?;
                if let Some(c) = d.checksum.as_ref().filter(|c| c.value != sum) {
                    return Err(BackupError::Damaged {
                        path: file.path.clone(),
                        detail: format!("{algorithm} is {sum}, the manifest says {}; not rotated", c.value),
                    });
                }
                journal.insert(d.file.clone(), sum);
                let text = serde_json::to_string(&journal).expect("a journal serialises");
                write_atomic(&journal_path, text.as_bytes(), 0o600).map_err(io("writing", &journal_path))?;
            }
            if has_old {
                if !has_new {
                    self.images().add_key(&file, old, new)?;
                    crate::fault::point("key-added");
                }
                self.images().remove_key(&file, new, old)?;
            }
            let value = checksum_file(&file.path, &algorithm).map_err(io("checksumming", &file.path))?;
            d.checksum = Some(Checksum { algorithm, value });
            changed = true;
            report.rotated += 1;
        }
        if changed {
            let path = dir.join(MANIFEST_FILE);
            write_atomic(&path, manifest.to_json().as_bytes(), 0o644).map_err(io("writing", &path))?;
        }
        match fs::remove_file(&journal_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", &journal_path)(e)),
            _ => Ok(()),
        }
    }

    /// Which backups of `repository` open with the key in `key` (the repository's own key file
    /// when none is given). Backups with no encrypted file are listed as opening.
    pub fn check_key(&self, repository: &BackupRepository, key: Option<&Path>) -> Result<KeyCheckReport, BackupError> {
        let own = file_key(repository.protection())?;
        let key = match (key, &own) {
            (Some(k), _) => {
                check_key_file(k)?;
                k.to_owned()
            }
            (None, Some(k)) => k.path().to_owned(),
            (None, None) => {
                return Err(BackupError::Unsupported {
                    what: format!("checking the key of repository {}: it has no key file; give one", repository.name()),
                });
            }
        };
        let mounted = self.mounts().acquire(repository)?;
        let name = repository.name().to_string();
        let mut backups = Vec::new();
        for entry in list_backups(&name, mounted.root(), None)? {
            let BackupKind::Nasbak(m) = &entry.kind else { continue };
            let dir = mounted.root().join(&entry.vm).join(&entry.id);
            let mut not_opening = Vec::new();
            let mut encrypted = false;
            for d in m.disks.iter().filter(|d| d.stored_as.is_encrypted()) {
                encrypted = true;
                let file = StoredFile { path: dir.join(&d.file), layout: layout_of(d.stored_as) };
                if !self.images().opens_with(&file, &key)? {
                    not_opening.push(d.file.clone());
                }
            }
            backups.push(KeyCheckEntry {
                backup: entry.reference(),
                encrypted,
                opens: not_opening.is_empty(),
                not_opening,
            });
        }
        Ok(KeyCheckReport { repository: name, backups })
    }
}

/// A backup to rotate: its reference (`REPO:VM/BACKUP-ID`), its directory and its manifest.
type Encrypted = (String, PathBuf, Manifest);

/// Every backup below a mounted repository `root` with an encrypted file, by VM.
fn encrypted_backups(repository: &str, root: &Path) -> Result<BTreeMap<String, Vec<Encrypted>>, BackupError> {
    let mut by_vm: BTreeMap<String, Vec<Encrypted>> = BTreeMap::new();
    for entry in list_backups(repository, root, None)? {
        let BackupKind::Nasbak(m) = &entry.kind else { continue };
        if !m.disks.iter().any(|d| d.stored_as.is_encrypted()) {
            continue;
        }
        VmName::new(&entry.vm)?;
        let dir = root.join(&entry.vm).join(&entry.id);
        by_vm.entry(entry.vm.clone()).or_default().push((entry.reference(), dir, (**m).clone()));
    }
    Ok(by_vm)
}
