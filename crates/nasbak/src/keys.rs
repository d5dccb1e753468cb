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

use nasbak_libvirt::Hypervisor;
use nasbak_process::CancelHandle;
use nasbak_qemu_img::{ImageTool, Rekeyed, StoredFile};
use nasbak_repo::model::layout::MANIFEST_FILE;
use nasbak_repo::store::{BackupKind, MIN_KEY_LEN, VmLock, check_key_file, list_backups, write_atomic};
use nasbak_repo::{
    BackupRepository, Checksum, Compression, Encryption, KeySource, Manifest, Mounter, Protection, VmName,
};

use crate::engine::{Catalog, Engine};
use crate::error::BackupError;
use crate::outcome::{KeyCheckEntry, KeyCheckReport, KeyRotation};
use crate::protect::{Key, file_key, layout_of, resolve_key};
use crate::transfer::hash::{CHECKSUM_ALGORITHM, blake3_region, checksum_algorithm_for, checksum_file, split_bounds};

/// The journal a rotation keeps in a backup's directory while it changes that backup's files:
/// each file it began with, and its checksum before.
pub const ROTATION_JOURNAL: &str = ".nasbak-key-rotation.json";

impl<I: ImageTool + Sync, M: Mounter> Catalog<'_, I, M> {
    /// Gives every encrypted backup file of `repository` the key in the file `new_key` and
    /// removes the repository's current key (its key file) from it, VM by VM under each VM's
    /// lock. Changing the repository's setting to the new key is the caller's, once this
    /// returns; a backup that ran meanwhile with the old key is finished by running this again.
    /// A file that opens with neither key stops the rotation, named.
    /// A repository whose key is a libvirt secret is rotated by [`Engine::rotate_key`], which
    /// reads the secret.
    pub fn rotate_key(
        &self,
        repository: &BackupRepository,
        new_key: &Path,
        cancel: &CancelHandle,
    ) -> Result<KeyRotation, BackupError> {
        let old = file_key(repository.protection())?.ok_or_else(|| BackupError::Unsupported {
            what: format!(
                "rotating the key of repository {} without libvirt: its key is not a file (a libvirt secret is read by the engine's rotate_key)",
                repository.name()
            ),
        })?;
        check_key_file(new_key)?;
        self.rotate_key_files(repository, old.path(), new_key, cancel)
    }

    /// [`Catalog::rotate_key`] from the key in the file `old` (the repository's current key,
    /// wherever it is kept) to the key in the file `new`, both checked by the caller.
    pub(crate) fn rotate_key_files(
        &self,
        repository: &BackupRepository,
        old: &Path,
        new_key: &Path,
        cancel: &CancelHandle,
    ) -> Result<KeyRotation, BackupError> {
        if matches!((fs::read(new_key), fs::read(old)), (Ok(a), Ok(b)) if a == b) {
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
            let done = rotate_in_parallel(self.images(), &backups, (old, new_key), cancel)?;
            report.files += done.files;
            report.rotated += done.rotated;
            report.already += done.already;
        }
        Ok(report)
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
                    what: format!(
                        "checking the key of repository {} without libvirt: it has no key file; give one (a libvirt secret is read by the engine's check_key)",
                        repository.name()
                    ),
                });
            }
        };
        self.check_key_file_of(repository, &key)
    }

    /// [`Catalog::check_key`] with the key in the file `key`, checked by the caller.
    pub(crate) fn check_key_file_of(
        &self,
        repository: &BackupRepository,
        key: &Path,
    ) -> Result<KeyCheckReport, BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        let name = repository.name().to_string();
        let mut backups = Vec::new();
        for entry in list_backups(&name, mounted.root(), None)? {
            let BackupKind::Nasbak(m) = &entry.kind else { continue };
            let dir = mounted.root().join(&entry.vm).join(&entry.id);
            let mut not_opening = Vec::new();
            let mut encrypted = false;
            let files =
                m.disks.iter().map(|d| (&d.file, d.stored_as)).chain(m.state.iter().map(|s| (&s.file, s.stored_as)));
            for (name, stored_as) in files.filter(|(_, f)| f.is_encrypted()) {
                encrypted = true;
                let file = StoredFile { path: dir.join(name), layout: layout_of(stored_as) };
                if !self.images().opens_with(&file, key)? {
                    not_opening.push(name.clone());
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

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: crate::engine::AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// [`Catalog::rotate_key`] for a repository whose key is kept anywhere (a key file or a
    /// libvirt secret), to the key `new` names (a key file, checked as every key file is, or a
    /// libvirt secret of at least 32 bytes). A secret's value is read through libvirt into a
    /// 0600 file under the runtime directory for the rotation's length, never onto argv.
    pub fn rotate_key(
        &self,
        repository: &BackupRepository,
        new: &KeySource,
        cancel: &CancelHandle,
    ) -> Result<KeyRotation, BackupError> {
        let old = self.repository_key(repository, "rotating")?;
        let new_key = self.given_key(new)?;
        self.catalog().rotate_key_files(repository, old.path(), new_key.path(), cancel)
    }

    /// [`Catalog::check_key`] with the key `key` names, or the repository's own (a key file or
    /// a libvirt secret).
    pub fn check_key(
        &self,
        repository: &BackupRepository,
        key: Option<&KeySource>,
    ) -> Result<KeyCheckReport, BackupError> {
        let key = match key {
            Some(k) => self.given_key(k)?,
            None => self.repository_key(repository, "checking")?,
        };
        self.catalog().check_key_file_of(repository, key.path())
    }

    /// The key of `repository` as a file, for `doing` its key.
    fn repository_key(&self, repository: &BackupRepository, doing: &str) -> Result<Key, BackupError> {
        resolve_key(&self.hypervisor, repository.protection(), &self.runtime_dir)?.ok_or_else(|| {
            BackupError::Unsupported {
                what: format!("{doing} the key of repository {}: it is not encrypted", repository.name()),
            }
        })
    }

    /// The key `source` names as a file, checked: a key file as every key file is, a libvirt
    /// secret for its length.
    fn given_key(&self, source: &KeySource) -> Result<Key, BackupError> {
        let protection = Protection::new(Compression::None, Encryption::Luks, Some(source.clone()))?;
        let key =
            resolve_key(&self.hypervisor, &protection, &self.runtime_dir)?.expect("an encrypting protection has a key");
        if let KeySource::LibvirtSecret(uuid) = source {
            let len = fs::metadata(key.path()).map(|m| m.len()).unwrap_or(0);
            if len < MIN_KEY_LEN {
                return Err(BackupError::KeyNeeded {
                    backup: String::new(),
                    detail: format!(
                        "libvirt secret {uuid} holds {len} bytes; a repository key needs at least {MIN_KEY_LEN} (a random string)"
                    ),
                });
            }
        }
        Ok(key)
    }
}

/// The encrypted files of one backup (in `dir`, described by `manifest`) rotated from `old`
/// to `new`, and its manifest's checksums updated, since a file's header is part of what its
/// checksum covers. Before a file's header changes, its checksum is checked against the
/// manifest and kept in the backup's rotation journal ([`ROTATION_JOURNAL`]); a run killed
/// before the manifest is updated leaves the journal, which tells the next run that the
/// changed bytes are its own.
fn rotate_backup<I: ImageTool>(
    images: &I,
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
        let touched = journal.contains_key(&d.file);
        let algorithm = d.checksum.as_ref().map_or(CHECKSUM_ALGORITHM, |c| c.algorithm.as_str()).to_owned();
        // A split checksum (`blake3-split@`) covers the LUKS header as a part of its own: only
        // that part is read, before and after. Its other parts (the data, which a rotation
        // never touches) stay as the manifest says, and `verify` still reads them all.
        let split = split_bounds(&algorithm);
        let parts: Option<Vec<String>> = match (split, &d.checksum) {
            (Some(_), Some(c)) => Some(c.value.split(':').map(str::to_owned).collect()),
            _ => None,
        };
        if split.is_some() && parts.as_ref().is_none_or(|p| p.len() != 3) {
            return Err(BackupError::Damaged {
                path: dir.join(MANIFEST_FILE),
                detail: format!("the checksum of {} is not three parts, as {algorithm} has", d.file),
            });
        }
        let header_sum =
            |(offset, len): (u64, u64)| blake3_region(&file.path, offset, len).map_err(io("checksumming", &file.path));
        if !touched {
            // What the manifest says, before the header changes: never a damaged file made
            // to look intact.
            let (sum, expected) = match (split, &parts) {
                (Some(bounds), Some(p)) => (header_sum(bounds)?, p[1].clone()),
                _ => (
                    checksum_file(&file.path, &algorithm).map_err(io("checksumming", &file.path))?,
                    d.checksum.as_ref().map(|c| c.value.clone()).unwrap_or_default(),
                ),
            };
            if d.checksum.is_some() && sum != expected {
                return Err(BackupError::Damaged {
                    path: file.path.clone(),
                    detail: format!("{algorithm} is {sum}, the manifest says {expected}; not rotated"),
                });
            }
            journal.insert(d.file.clone(), d.checksum.as_ref().map(|c| c.value.clone()).unwrap_or(sum));
            let text = serde_json::to_string(&journal).expect("a journal serialises");
            write_atomic(&journal_path, text.as_bytes(), 0o600).map_err(io("writing", &journal_path))?;
        }
        // The new key added (each key tried once), then the old one's keyslot removed: a run
        // killed between the two leaves a file both keys open.
        let rekeyed = images.begin_rekey(&file, old, new).map_err(|e| match e.is_wrong_key() {
            true => BackupError::KeyNeeded {
                backup: backup.to_owned(),
                detail: format!("{} opens with neither the repository's key nor the new one", d.file),
            },
            false => e.into(),
        })?;
        match rekeyed {
            Rekeyed::Already if !touched => {
                report.already += 1;
                continue;
            }
            Rekeyed::Already => {}
            Rekeyed::Added { old_slot } => {
                crate::fault::point("key-added");
                images.finish_rekey(&file, old_slot)?;
            }
        }
        d.checksum = Some(match (split, parts) {
            (Some(bounds), Some(mut p)) => {
                p[1] = header_sum(bounds)?;
                Checksum { algorithm, value: p.join(":") }
            }
            // A whole-file checksum (a backup of an earlier nasbak) becomes a split one: read
            // once more now, never again.
            _ => {
                let algorithm = checksum_algorithm_for(&file.path, file.layout);
                let value = checksum_file(&file.path, &algorithm).map_err(io("checksumming", &file.path))?;
                Checksum { algorithm, value }
            }
        });
        changed = true;
        report.rotated += 1;
    }
    // The VM state files stored encrypted: their checksums are of what they hold, which a
    // rotation does not change.
    for s in manifest.state.iter().filter(|s| s.stored_as.is_encrypted()) {
        report.files += 1;
        let file = StoredFile { path: dir.join(&s.file), layout: layout_of(s.stored_as) };
        let rekeyed = images.begin_rekey(&file, old, new).map_err(|e| match e.is_wrong_key() {
            true => BackupError::KeyNeeded {
                backup: backup.to_owned(),
                detail: format!("{} opens with neither the repository's key nor the new one", s.file),
            },
            false => e.into(),
        })?;
        match rekeyed {
            Rekeyed::Already => report.already += 1,
            Rekeyed::Added { old_slot } => {
                images.finish_rekey(&file, old_slot)?;
                report.rotated += 1;
            }
        }
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

/// The backups of one VM rotated (see `rotate_backup`), on as many threads as there are cores:
/// a rotation is mostly PBKDF2, one core's work per keyslot opened or made. The first error
/// stops the others at their next backup and is returned.
fn rotate_in_parallel<I: ImageTool + Sync>(
    images: &I,
    backups: &[Encrypted],
    keys: (&Path, &Path),
    cancel: &CancelHandle,
) -> Result<KeyRotation, BackupError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, backups.len().max(1));
    let failed = AtomicBool::new(false);
    let results: Vec<Result<KeyRotation, BackupError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let failed = &failed;
                s.spawn(move || {
                    let mut done = KeyRotation { repository: String::new(), files: 0, rotated: 0, already: 0 };
                    for (backup, dir, manifest) in backups.iter().skip(w).step_by(workers) {
                        if cancel.is_cancelled() {
                            return Err(BackupError::Cancelled);
                        }
                        if failed.load(Ordering::SeqCst) {
                            break;
                        }
                        let rotated = rotate_backup(images, (backup, dir, manifest.clone()), keys, &mut done);
                        if rotated.is_err() {
                            failed.store(true, Ordering::SeqCst);
                        }
                        rotated?;
                    }
                    Ok(done)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let mut total = KeyRotation { repository: String::new(), files: 0, rotated: 0, already: 0 };
    for r in results {
        let r = r?;
        total.files += r.files;
        total.rotated += r.rotated;
        total.already += r.already;
    }
    Ok(total)
}

/// A backup to rotate: its reference (`REPO:VM/BACKUP-ID`), its directory and its manifest.
type Encrypted = (String, PathBuf, Manifest);

/// Every backup below a mounted repository `root` with an encrypted file, by VM.
fn encrypted_backups(repository: &str, root: &Path) -> Result<BTreeMap<String, Vec<Encrypted>>, BackupError> {
    let mut by_vm: BTreeMap<String, Vec<Encrypted>> = BTreeMap::new();
    for entry in list_backups(repository, root, None)? {
        let BackupKind::Nasbak(m) = &entry.kind else { continue };
        if !m.disks.iter().any(|d| d.stored_as.is_encrypted()) && !m.state.iter().any(|s| s.stored_as.is_encrypted()) {
            continue;
        }
        VmName::new(&entry.vm)?;
        let dir = root.join(&entry.vm).join(&entry.id);
        by_vm.entry(entry.vm.clone()).or_default().push((entry.reference(), dir, (**m).clone()));
    }
    Ok(by_vm)
}
