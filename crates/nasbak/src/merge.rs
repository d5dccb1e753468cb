//! Synthetic fulls: an incremental backup merged, on the repository, into a self-contained backup
//! of the same point, so that prune can remove the backups it was built on without leaving it
//! without its chain.
//!
//! Nothing is read from the VM: each incremental disk's chain is read on the repository and
//! written beside the backup's file as one self-contained qcow2. The switch is journalled, so a
//! merge interrupted at any moment leaves either the old backup or the merged one:
//!
//! 1. The chain's files are checked first (`qemu-img check` and each file's checksum against its
//!    own manifest): a damaged parent is never baked into a full.
//! 2. Each incremental file's chain is converted into `<file>.merging`, synced, checked and
//!    checksummed.
//! 3. The new manifest is written, synced, as `manifest.json.merging`: from here on the merge is
//!    decided.
//! 4. Each `<file>.merging` is renamed over `<file>`, then the manifest over `manifest.json`.
//!
//! [`finish_merges`] completes step 4 for a merge interrupted after step 3, and removes the
//! files of one interrupted before it; prune and backup run it, holding the VM's lock, before
//! they read the VM's backups. Backups built on the merged one need nothing: their backing
//! links name the same file, now self-contained with the same content.

use std::fs;
use std::path::Path;

use nasbak_libvirt::CancelHandle;
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::model::layout::MANIFEST_FILE;
use nasbak_repo::{BackupMode, Checksum, Manifest, ManifestDisk};

use crate::error::BackupError;
use crate::progress::Observer;
use crate::store::write_synced;
use crate::store::{BackupKind, read_backup};
use crate::transfer::hash::{CHECKSUM_ALGORITHM, checksum_file};
use crate::transfer::stage::Staged;
use crate::transfer::{check_image, check_sum, convert};

/// The suffix of a merge's new files until they are renamed into place.
pub const MERGING_SUFFIX: &str = ".merging";

/// Merges backup `id` of `vm` (its directory in `vm_dir`) into a self-contained backup of the
/// same point; `parent` is the backup prune removes, told in each merged disk's `full_reason`.
/// Returns the new manifest. On any error the backup is left as it was.
pub(crate) fn merge_backup<I: ImageTool + Sync>(
    images: &I,
    vm_dir: &Path,
    vm: &str,
    id: &str,
    parent: &str,
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<Manifest, BackupError> {
    let dir = vm_dir.join(id);
    let backup = format!("{vm}/{id}");
    let manifest = match read_backup("", vm, id, &dir).map(|e| e.kind) {
        Some(BackupKind::Nasbak(m)) => *m,
        Some(BackupKind::Damaged { reason }) => return Err(BackupError::DamagedBackup { backup, reason }),
        _ => return Err(BackupError::NotFound { what: format!("backup {backup}") }),
    };
    let mut merged = manifest.clone();
    let mut staged = Staged(Vec::new());
    for d in merged.disks.iter_mut().filter(|d| d.mode == BackupMode::Incremental) {
        let chain = crate::store::ancestors(vm_dir, vm, id, d)?;
        for (from, file) in std::iter::once((dir.clone(), d.clone())).chain(chain) {
            check_image(images, &from, &file)?;
            check_sum(&from, &file, vm, cancel, observer)?;
        }
        let tmp = dir.join(format!("{}{MERGING_SUFFIX}", d.file));
        let _ = fs::remove_file(&tmp);
        staged.0.push(tmp.clone());
        let mut request = ConvertRequest::new(
            ImageLocation::Path(dir.join(&d.file)),
            ImageLocation::Path(tmp.clone()),
            ImageFormat::Qcow2,
        );
        request.source_format = Some(ImageFormat::Qcow2);
        convert(images, request, cancel, vm, &d.target, d.virtual_size, observer)?;
        let io = |action: &'static str| {
            let path = tmp.clone();
            move |source| BackupError::Io { action, path, source }
        };
        fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("syncing"))?;
        check_image(images, &dir, &ManifestDisk { file: format!("{}{MERGING_SUFFIX}", d.file), ..d.clone() })?;
        d.size = fs::metadata(&tmp).map_err(io("measuring"))?.len();
        let value = checksum_file(&tmp, CHECKSUM_ALGORITHM).map_err(io("checksumming"))?;
        d.checksum = Some(Checksum { algorithm: CHECKSUM_ALGORITHM.into(), value });
        d.mode = BackupMode::Full;
        d.backing = None;
        d.full_reason = Some(format!("merged from its chain when prune removed backup {parent}"));
    }
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    merged.mode = BackupMode::Full;
    merged.parent = None;
    merged.version = merged.required_version();
    let pending = dir.join(format!("{MANIFEST_FILE}{MERGING_SUFFIX}"));
    staged.0.push(pending.clone());
    write_synced(&pending, merged.to_json().as_bytes())?;
    // Decided: from here on the staged files are never removed. A switch that fails half-way
    // is completed by the next prune or backup of the VM (`finish_merges`), not undone.
    staged.0.clear();
    crate::fault::point("merge-decided");
    finish_merge(&dir).map_err(|source| BackupError::Io {
        action: "switching to the merged files (the next prune or backup of the VM completes it)",
        path: dir,
        source,
    })?;
    Ok(merged)
}

/// Completes or undoes a merge interrupted in backup directory `dir`: with its new manifest
/// written, every `.merging` file is renamed into place and the manifest last; without it, the
/// `.merging` files are removed. Returns whether a merge was completed.
pub(crate) fn finish_merge(dir: &Path) -> std::io::Result<bool> {
    let pending = dir.join(format!("{MANIFEST_FILE}{MERGING_SUFFIX}"));
    let decided = pending.is_file();
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(file) = name.strip_suffix(MERGING_SUFFIX) else { continue };
        if file == MANIFEST_FILE {
            continue;
        }
        if decided {
            fs::rename(e.path(), dir.join(file))?;
        } else {
            fs::remove_file(e.path())?;
        }
    }
    if decided {
        fs::rename(&pending, dir.join(MANIFEST_FILE))?;
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(decided)
}

/// [`finish_merge`] in every backup directory of `vm_dir`; returns the backups whose merge it
/// completed. Run holding the VM's lock.
pub(crate) fn finish_merges(vm_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(vm_dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter(|e| finish_merge(&e.path()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read_to_string(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_interrupted_merge_is_completed_once_decided_and_undone_before() {
        let base = tempfile::tempdir().unwrap();
        let write = |dir: &Path, files: &[(&str, &str)]| {
            fs::create_dir_all(dir).unwrap();
            for (n, c) in files {
                fs::write(dir.join(n), c).unwrap();
            }
        };
        // Decided (the new manifest written), one file already switched: rolled forward.
        let decided = base.path().join("2026.11.30.02.00.00");
        write(
            &decided,
            &[
                ("manifest.json", "old"),
                ("root.a.qcow2", "new a"),
                ("datadisk.b.qcow2", "old b"),
                ("datadisk.b.qcow2.merging", "new b"),
                ("manifest.json.merging", "new"),
            ],
        );
        // Not decided: the staged file removed, the backup as it was.
        let undecided = base.path().join("2026.12.01.02.00.00");
        write(&undecided, &[("manifest.json", "old"), ("root.a.qcow2", "old a"), ("root.a.qcow2.merging", "half")]);
        let mut done = finish_merges(base.path());
        done.sort();
        assert_eq!(done, ["2026.11.30.02.00.00"]);
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(
            names(&decided),
            pairs(&[("datadisk.b.qcow2", "new b"), ("manifest.json", "new"), ("root.a.qcow2", "new a")])
        );
        assert_eq!(names(&undecided), pairs(&[("manifest.json", "old"), ("root.a.qcow2", "old a")]));
        assert!(finish_merges(base.path()).is_empty(), "nothing left to do");
    }
}
