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
use crate::protect::{Key, disk_image};
use crate::transfer::hash::{checksum_algorithm_for, checksum_file};
use crate::transfer::stage::Staged;
use crate::transfer::{check_chain, check_sum, convert};
use nasbak_repo::store::write_synced;
use nasbak_repo::store::{BackupKind, read_backup};
use nasbak_repo::store::{MERGING_SUFFIX, finish_merge};

/// Merges backup `id` of `vm` (its directory in `vm_dir`) into a self-contained backup of the
/// same point; `parent` is the backup prune removes, told in each merged disk's `full_reason`.
/// Returns the new manifest. On any error the backup is left as it was.
pub(crate) fn merge_backup<I: ImageTool + Sync>(
    images: &I,
    vm_dir: &Path,
    vm: &str,
    (id, parent): (&str, &str),
    key: Option<&Key>,
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
        // An encrypted chain is read with the repository's key; without it the merge fails and
        // prune keeps the chain, the reason said.
        let chain = nasbak_repo::store::ancestors(vm_dir, vm, id, d)?;
        check_chain(images, (&dir, d), &chain, key, &backup)?;
        for (from, file) in std::iter::once((dir.clone(), d.clone())).chain(chain.iter().cloned()) {
            check_sum(&from, &file, vm, cancel, observer)?;
        }
        let tmp = dir.join(format!("{}{MERGING_SUFFIX}", d.file));
        let _ = fs::remove_file(&tmp);
        staged.0.push(tmp.clone());
        let source = disk_image(&dir, d, &chain, key, &backup)?;
        let mut request = ConvertRequest::new(source, ImageLocation::Path(tmp.clone()), ImageFormat::Qcow2);
        request.source_format = Some(ImageFormat::Qcow2);
        // The merged file is stored like the chain it replaces.
        request.protection = crate::protect::target_protection(d.stored_as, key);
        convert(images, request, cancel, vm, &d.target, d.virtual_size, observer)?;
        let io = |action: &'static str| {
            let path = tmp.clone();
            move |source| BackupError::Io { action, path, source }
        };
        fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("syncing"))?;
        let merging = ManifestDisk { file: format!("{}{MERGING_SUFFIX}", d.file), ..d.clone() };
        check_chain(images, (&dir, &merging), &[], key, &backup)?;
        d.size = fs::metadata(&tmp).map_err(io("measuring"))?.len();
        let algorithm = checksum_algorithm_for(&tmp, crate::protect::layout_of(d.stored_as));
        let value = checksum_file(&tmp, &algorithm).map_err(io("checksumming"))?;
        d.checksum = Some(Checksum { algorithm, value });
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
