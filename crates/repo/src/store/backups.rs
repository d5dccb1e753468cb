//! The backups on a repository (nasbak's, the reference system's, damaged ones): listing and
//! reading them, walking their chains, deleting them, and removing what interrupted runs left.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::StoreError;
use super::records::{BootVerification, read_record, retire_checkpoint};
use crate::model::layout::{MANIFEST_FILE, PARTIAL_SUFFIX, parse_disk_file_name};
use crate::{BackupId, BackupMode, Manifest, ManifestDisk, VmName};

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
pub fn read_backup(repository: &str, vm: &str, id: &str, dir: &Path) -> Option<BackupEntry> {
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
pub fn retire_and_delete(vm_dir: &Path, dir: &Path) -> Result<(), StoreError> {
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(BackupKind::Nasbak(m)) = read_backup("", "", &id, dir).map(|e| e.kind) {
        retire_checkpoint(vm_dir, &m).map_err(|source| StoreError::Io {
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
pub fn delete_dir(dir: &Path) -> Result<(), StoreError> {
    let mut doomed = dir.as_os_str().to_owned();
    doomed.push(".deleting");
    doomed.push(PARTIAL_SUFFIX);
    let doomed = PathBuf::from(doomed);
    fs::rename(dir, &doomed).map_err(|source| StoreError::Io { action: "deleting", path: dir.to_owned(), source })?;
    fs::remove_dir_all(&doomed).map_err(|source| StoreError::Io { action: "deleting", path: doomed, source })
}

/// The backups below a mounted repository root, of VM `vm` or of every VM, ordered by VM and
/// backup id. A directory whose name is not a VM name or a backup id is not looked into.
pub fn list_backups(repository: &str, root: &Path, vm: Option<&str>) -> Result<Vec<BackupEntry>, StoreError> {
    let mut out = Vec::new();
    let vms: Vec<String> = match vm {
        Some(v) => vec![VmName::new(v)?.to_string()],
        None => fs::read_dir(root)
            .map_err(|source| StoreError::Io { action: "listing", path: root.to_owned(), source })?
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

/// The backup files an incremental disk builds on, nearest first (empty for a full disk), each
/// found through its backing link in its own backup's manifest: `vm_dir` is the VM's directory.
/// A link to a backup or file that is not there is [`StoreError::Damaged`]: the chain is
/// broken and the disk cannot be restored from this backup.
pub fn ancestors(
    vm_dir: &Path,
    vm: &str,
    id: &str,
    disk: &ManifestDisk,
) -> Result<Vec<(PathBuf, ManifestDisk)>, StoreError> {
    let mut chain = Vec::new();
    let (mut current_id, mut current) = (id.to_owned(), disk.clone());
    while current.mode == BackupMode::Incremental {
        let broken = |reason: String| StoreError::Damaged { backup: format!("{vm}/{id}"), reason };
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
            Some(BackupKind::Reference { files }) if files.iter().any(|f| f == file) => {
                reference_disk(vm_dir, vm, parent, file, &current.target)?
            }
            Some(BackupKind::Reference { .. }) => {
                return Err(broken(format!("its chain is broken: backup {parent} has no file {file}")));
            }
            None => return Err(broken(format!("its chain is broken: backup {parent} is missing"))),
        };
        chain.push((dir, next.clone()));
        if chain.len() > 10_000 {
            return Err(broken("its chain does not end".into()));
        }
        (current_id, current) = (parent.to_owned(), next);
    }
    Ok(chain)
}

/// How much of a qcow2 file's start is read for its header and backing name.
const HEADER_READ: usize = 64 << 10;

/// The entry of file `file` of the reference-system backup `id` of VM `vm` (in `vm_dir`), as
/// disk `target`: its size and virtual size, and, when its header names a backing file (an
/// incremental of the reference's 4.23 script), that file resolved inside the VM's directory
/// ([`crate::resolve_backing`]) as `../<backup>/<file>`. A header that cannot be read, or a
/// backing name that leads anywhere else, is [`StoreError::Damaged`].
pub fn reference_disk(vm_dir: &Path, vm: &str, id: &str, file: &str, target: &str) -> Result<ManifestDisk, StoreError> {
    let damaged =
        |reason: String| StoreError::Damaged { backup: format!("{vm}/{id}"), reason: format!("{file}: {reason}") };
    let (_, volume) = parse_disk_file_name(file).ok_or_else(|| damaged("not a backup file name".into()))?;
    let path = vm_dir.join(id).join(file);
    let mut head = Vec::with_capacity(HEADER_READ);
    let size = fs::File::open(&path)
        .and_then(|f| {
            let size = f.metadata()?.len();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, HEADER_READ as u64), &mut head)?;
            Ok(size)
        })
        .map_err(|e| damaged(format!("cannot be read: {e}")))?;
    let header = crate::parse_qcow2_header(&head).map_err(damaged)?;
    let backing = match &header.backing {
        None => None,
        Some(name) => {
            let vm_name = VmName::new(vm).map_err(|e| damaged(e.to_string()))?;
            let this: BackupId = id.parse().map_err(|_| damaged(format!("{id} is not a backup id")))?;
            let (parent, parent_file) = crate::resolve_backing(&vm_name, &this, name).map_err(damaged)?;
            Some(crate::backing_path(&parent, &parent_file))
        }
    };
    Ok(ManifestDisk {
        target: target.to_owned(),
        volume: volume.to_string(),
        source: String::new(),
        source_format: None,
        file: file.to_owned(),
        format: "qcow2".into(),
        virtual_size: header.virtual_size,
        size,
        checksum: None,
        mode: if backing.is_some() { BackupMode::Incremental } else { BackupMode::Full },
        backing,
        full_reason: None,
        stored_as: crate::FileFormat::Plain,
        rbd_snapshot: None,
        reference: true,
    })
}

/// Removes `<id>.partial` directories that interrupted runs left in `vm_dir` (a backup being
/// written, or a backup being deleted); returns their names. Run holding the VM's lock, so that
/// none of them is being written.
pub fn clean_partials(vm_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(vm_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(PARTIAL_SUFFIX) && fs::remove_dir_all(e.path()).is_ok() {
                removed.push(name);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::backing_path;
    use crate::{BackupMethod, CheckpointRecord};

    fn manifest(id: &str, parent: Option<&str>) -> Manifest {
        let t = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let mode = if parent.is_some() { BackupMode::Incremental } else { BackupMode::Full };
        Manifest {
            version: 2,
            id: id.into(),
            repository: "r".into(),
            vm: "vm1".into(),
            method: BackupMethod::PushJob,
            started: t,
            finished: t,
            quiesced: false,
            quiesce_note: None,
            libvirt_version: None,
            qemu_version: None,
            schedule: None,
            disks: vec![ManifestDisk {
                target: "vda".into(),
                volume: "a".into(),
                source: String::new(),
                source_format: None,
                file: "root.a.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 1,
                size: 1,
                checksum: None,
                mode,
                backing: parent.map(|p| backing_path(&p.parse().unwrap(), "root.a.qcow2")),
                full_reason: None,
                stored_as: crate::FileFormat::Plain,
                rbd_snapshot: None,
                reference: false,
            }],
            mode,
            parent: parent.map(Into::into),
            checkpoint: Some(CheckpointRecord { name: format!("nasbak-{id}"), xml: "<domaincheckpoint/>".into() }),
            full_reason: None,
            state: Vec::new(),
            state_note: None,
        }
    }

    fn put(vm_dir: &Path, m: &Manifest) -> PathBuf {
        let dir = vm_dir.join(&m.id);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(MANIFEST_FILE), m.to_json()).unwrap();
        fs::write(dir.join("root.a.qcow2"), "x").unwrap();
        dir
    }

    #[test]
    fn every_kind_of_backup_directory_is_read_for_what_it_is() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("vm1");
        let nasbak = put(&vm, &manifest("2026.12.01.02.00.00", None));
        let kind = |dir: &Path| read_backup("r", "vm1", "x", dir).map(|e| e.kind);
        assert!(matches!(kind(&nasbak), Some(BackupKind::Nasbak(m)) if m.id == "2026.12.01.02.00.00"));
        // The reference system's: disk files only, the root first.
        let reference = vm.join("2026.12.02.02.00.00");
        fs::create_dir_all(&reference).unwrap();
        for f in ["datadisk.b.qcow2", "root.c.qcow2", "domain-config.xml", "notes.txt"] {
            fs::write(reference.join(f), "x").unwrap();
        }
        assert_eq!(
            kind(&reference),
            Some(BackupKind::Reference { files: vec!["root.c.qcow2".into(), "datadisk.b.qcow2".into()] })
        );
        // A manifest that does not parse, and a directory holding no backup file.
        let bad = vm.join("2026.12.03.02.00.00");
        fs::create_dir_all(&bad).unwrap();
        fs::write(bad.join(MANIFEST_FILE), "{ not json").unwrap();
        assert!(matches!(kind(&bad), Some(BackupKind::Damaged { reason }) if reason.contains("manifest is invalid")));
        let empty = vm.join("2026.12.04.02.00.00");
        fs::create_dir_all(&empty).unwrap();
        assert!(matches!(kind(&empty), Some(BackupKind::Damaged { reason }) if reason.contains("neither")));
        assert_eq!(kind(&vm.join("2026.12.05.02.00.00")), None, "no directory, no backup");
        // A recorded boot verification is read with the backup.
        let v =
            BootVerification::new("r:vm1/x".into(), super::super::BootResult::Passed, chrono::Utc::now(), "ok".into());
        super::super::write_record(&nasbak, &v).unwrap();
        assert_eq!(read_backup("r", "vm1", "x", &nasbak).unwrap().boot_verified, Some(v));
    }

    #[test]
    fn listing_skips_what_is_not_a_backup_and_orders_by_vm_then_id() {
        let root = tempfile::tempdir().unwrap();
        put(&root.path().join("vm2"), &manifest("2026.12.01.02.00.00", None));
        put(&root.path().join("vm1"), &manifest("2026.12.01.02.00.00-10", None));
        put(&root.path().join("vm1"), &manifest("2026.12.01.02.00.00-9", None));
        fs::create_dir_all(root.path().join("vm1/2026.12.02.02.00.00.partial")).unwrap();
        fs::create_dir_all(root.path().join("vm1/.nasbak-retired-checkpoints")).unwrap();
        fs::create_dir_all(root.path().join("lost+found")).unwrap();
        fs::write(root.path().join("README"), "x").unwrap();
        let all = list_backups("r", root.path(), None).unwrap();
        let ids: Vec<String> = all.iter().map(BackupEntry::reference).collect();
        assert_eq!(ids, ["r:vm1/2026.12.01.02.00.00-9", "r:vm1/2026.12.01.02.00.00-10", "r:vm2/2026.12.01.02.00.00"]);
        assert_eq!(list_backups("r", root.path(), Some("vm2")).unwrap().len(), 1);
        assert!(list_backups("r", root.path(), Some("vm3")).unwrap().is_empty());
        assert!(matches!(list_backups("r", root.path(), Some("../etc")), Err(StoreError::Input(_))));
        assert!(matches!(list_backups("r", &root.path().join("gone"), None), Err(StoreError::Io { .. })));
    }

    #[test]
    fn a_chain_is_walked_to_its_full_and_a_broken_one_says_where() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("vm1");
        let ids = ["2026.12.01.02.00.00", "2026.12.02.02.00.00", "2026.12.03.02.00.00"];
        put(&vm, &manifest(ids[0], None));
        put(&vm, &manifest(ids[1], Some(ids[0])));
        let last = manifest(ids[2], Some(ids[1]));
        put(&vm, &last);
        let chain = ancestors(&vm, "vm1", ids[2], &last.disks[0]).unwrap();
        let dirs: Vec<PathBuf> = chain.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(dirs, [vm.join(ids[1]), vm.join(ids[0])], "nearest first");
        assert!(ancestors(&vm, "vm1", ids[0], &manifest(ids[0], None).disks[0]).unwrap().is_empty());
        // The middle backup gone: the chain is broken, and the error names the missing backup.
        fs::remove_dir_all(vm.join(ids[1])).unwrap();
        match ancestors(&vm, "vm1", ids[2], &last.disks[0]) {
            Err(StoreError::Damaged { backup, reason }) => {
                assert_eq!(backup, format!("vm1/{}", ids[2]));
                assert!(reason.contains(ids[1]) && reason.contains("missing"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deleting_and_cleaning_leave_no_backup_that_looks_complete() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("vm1");
        let older = put(&vm, &manifest("2026.12.01.02.00.00", None));
        let newest = put(&vm, &manifest("2026.12.02.02.00.00", None));
        // The newest backup's checkpoint is retired for the next backup to remove its bitmaps;
        // an older one's is not (its bitmaps went with the next backup).
        retire_and_delete(&vm, &older).unwrap();
        assert!(super::super::retired_checkpoints(&vm).is_empty());
        retire_and_delete(&vm, &newest).unwrap();
        assert_eq!(super::super::retired_checkpoints(&vm).len(), 1);
        assert!(!older.exists() && !newest.exists());
        // What killed runs left: partial directories, removed and named.
        fs::create_dir_all(vm.join("2026.12.03.02.00.00.partial")).unwrap();
        fs::create_dir_all(vm.join("2026.12.01.02.00.00.deleting.partial/x")).unwrap();
        let mut cleaned = clean_partials(&vm);
        cleaned.sort();
        assert_eq!(cleaned, ["2026.12.01.02.00.00.deleting.partial", "2026.12.03.02.00.00.partial"]);
        assert!(matches!(delete_dir(&older), Err(StoreError::Io { action: "deleting", .. })));
    }
}
