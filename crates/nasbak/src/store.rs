//! The engine's side of the repository's store ([`nasbak_repo::store`]): what needs the
//! hypervisor's or qemu-img's view of a backup. The disks of a reference-system backup (its
//! saved domain XML names their targets) and whether a backup file's backing link leads where
//! its manifest says. Below every workflow.

use std::fs;
use std::path::Path;

use nasbak_libvirt::Domain;
use nasbak_qemu_img::{ImageLocation, ImageTool};
use nasbak_repo::ManifestDisk;
use nasbak_repo::model::layout::{DOMAIN_CONFIG_FILE, parse_disk_file_name};
use nasbak_repo::store::{BackupKind, read_backup};

use crate::disks::volume_of;
use crate::error::BackupError;

/// The disks of a backup: from its manifest, or for a reference-system backup from its file
/// names and headers (see `nasbak_repo::store::reference_disk`), each volume's target taken
/// from the saved `domain-config.xml` (else from `current()`, the VM as it is now, asked for
/// only then).
pub(crate) fn backup_disks(
    dir: &Path,
    vm: &str,
    id: &str,
    current: &dyn Fn() -> Option<Domain>,
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
    // The VM as it is now: asked for only when the backup saved no definition.
    let saved =
        fs::read_to_string(dir.join(DOMAIN_CONFIG_FILE)).ok().and_then(|x| Domain::parse(&x).ok()).or_else(current);
    let mut disks = Vec::new();
    for file in files {
        let (_, volume) = parse_disk_file_name(&file).expect("read_backup lists backup file names only");
        let find = |d: &Domain| d.disks.iter().find(|x| volume_of(x) == volume).map(|x| x.target.clone());
        let target = saved.as_ref().and_then(find).ok_or_else(|| BackupError::Mismatch {
            vm: vm.to_owned(),
            problems: vec![format!(
                "the backup's file {file} is volume {volume}, which neither the saved domain-config.xml nor the VM has"
            )],
        })?;
        // Its size and chain from the file's header (a 4.23 incremental names its parent's file).
        let vm_dir = dir.parent().unwrap_or(dir);
        disks.push(nasbak_repo::store::reference_disk(vm_dir, vm, id, &file, &target)?);
    }
    Ok(disks)
}

/// The VM state files (NVRAM, TPM state) a backup keeps: none for a reference-system backup,
/// or for one made before nasbak kept them.
pub(crate) fn backup_state(dir: &Path, vm: &str, id: &str) -> Vec<nasbak_repo::ManifestState> {
    match read_backup("", vm, id, dir).map(|e| e.kind) {
        Some(BackupKind::Nasbak(m)) => m.state.clone(),
        _ => Vec::new(),
    }
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
