//! Restore: every disk of a shut-off VM from a backup, or one disk of a backup as a new volume
//! (a file, a block device or an RBD image), optionally attached to a VM.
//!
//! Backup disks are matched to the VM's current disks by identity (target device and volume),
//! never by position; every mismatch is reported before anything is written. Backups the
//! reference system wrote (no manifest) are restored too: their file names give the volume, and
//! the `domain-config.xml` saved with them gives each volume's target.

use nasbak_libvirt::{Disk, Domain, DomainState};
use nasbak_qemu_img::{ImageFormat, ImageLocation};
use nasbak_repo::{BackupId, BackupRepository, ManifestDisk, MountedRepository, Mounter, VmName};
use serde::Serialize;

mod instant;
mod vm;
mod volume;

pub use crate::store::marks::RESTORING_MARK;
pub use instant::{
    CopyState, DEFAULT_FINISH_TIMEOUT, DEFAULT_INSTANT_DIR, DiskCopy, InstantCancelled, InstantDisk, InstantFinished,
    InstantRestore, InstantRestoreRequest, InstantStatus,
};

use crate::disks::volume_of;
use crate::error::{BackupError, Step, at};
use crate::store::backup_disks;

/// Restoring every disk of a shut-off VM from a backup. Built with [`RestoreRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RestoreRequest {
    /// The repository the backup is on.
    pub repository: BackupRepository,
    /// The VM the backup is of.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// Restore into this shut-off VM instead of the backup's own (disks paired by target only).
    pub into: Option<String>,
}

impl RestoreRequest {
    /// Restoring backup `id` of `vm` on `repository` into `vm`.
    pub fn new(repository: BackupRepository, vm: impl Into<String>, id: impl Into<String>) -> Self {
        RestoreRequest { repository, vm: vm.into(), id: id.into(), into: None }
    }

    /// Restores into another shut-off VM.
    pub fn into_vm(mut self, vm: impl Into<String>) -> Self {
        self.into = Some(vm.into());
        self
    }
}

/// A finished whole-VM restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoreOutcome {
    /// The backup restored from, `VM/BACKUP-ID` on the request's repository.
    pub backup: String,
    /// The VM restored into.
    pub vm: String,
    /// Each disk restored.
    pub restored: Vec<RestoredDisk>,
}

/// What was restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoredDisk {
    /// The target device.
    pub target: String,
    /// Where it was written: a path, or `rbd:pool/image`.
    pub location: String,
    /// The format written.
    pub format: String,
    /// Said when an earlier restore of this disk had been interrupted while it wrote in place.
    pub note: Option<String>,
}

/// Where a whole-VM restore (plain or instant) starts, checked in this order: the backup
/// reference, the VM (it must be shut off), the repository, the backup and its disks.
pub(crate) struct RestoreStart<'a, M: Mounter> {
    /// The repository, in use.
    pub mounted: MountedRepository<'a, M>,
    /// The backup's directory.
    pub dir: std::path::PathBuf,
    /// The VM restored into (the backup's own unless the request says another).
    pub target_vm: &'a str,
    /// Its persistent definition, secrets included, as text and as read.
    pub xml: String,
    pub domain: Domain,
    /// The backup's disks.
    pub disks: Vec<ManifestDisk>,
}

impl<H: nasbak_libvirt::Hypervisor, A: crate::engine::AgentSource, I: nasbak_qemu_img::ImageTool, M: Mounter>
    crate::engine::Engine<H, A, I, M>
{
    /// The checks every whole-VM restore starts with (see [`RestoreStart`]).
    pub(crate) fn start_restore<'a>(&'a self, request: &'a RestoreRequest) -> Result<RestoreStart<'a, M>, BackupError> {
        // The backup reference first: bad input is named before anything else is asked.
        VmName::new(&request.vm)?;
        request.id.parse::<BackupId>()?;
        let target_vm = request.into.as_deref().unwrap_or(&request.vm);
        VmName::new(target_vm)?;
        let inspect = || -> Result<_, BackupError> {
            let state = self.hypervisor.domain_state(target_vm)?;
            let xml = self.hypervisor.inactive_xml(target_vm)?;
            Ok((state, Domain::parse(&xml)?, xml))
        };
        let (state, domain, xml) = inspect().map_err(at(Step::Inspect))?;
        if state != DomainState::ShutOff {
            return Err(BackupError::NotShutOff { vm: target_vm.to_owned() });
        }
        let mounted = self.mounts.acquire(&request.repository)?;
        let (_, _, dir) = mounted.layout().resolve_backup(&format!("{}/{}", request.vm, request.id))?;
        let disks = backup_disks(&dir, &request.vm, &request.id, Some(&domain))?;
        Ok(RestoreStart { mounted, dir, target_vm, xml, domain, disks })
    }
}

/// Pairs each backup disk with the VM disk of the same identity, or says every mismatch. With
/// `by_volume` false (restoring into another VM, whose volumes are its own), disks pair by
/// target alone.
pub fn match_disks<'a>(
    disks: &'a [ManifestDisk],
    domain: &'a Domain,
    by_volume: bool,
) -> Result<Vec<(&'a ManifestDisk, &'a Disk)>, BackupError> {
    let (current, _) = domain.backup_selection();
    let mut problems = Vec::new();
    let mut pairs = Vec::new();
    for b in disks {
        match current.iter().find(|d| d.target == b.target) {
            None => problems
                .push(format!("the backup has disk {} ({}), the VM has no disk {}", b.target, b.volume, b.target)),
            Some(d) if by_volume && volume_of(d).as_str() != b.volume => problems.push(format!(
                "disk {} of the VM is volume {}, the backup's {} is volume {}",
                d.target,
                volume_of(d),
                b.target,
                b.volume
            )),
            Some(d) => pairs.push((b, *d)),
        }
    }
    for d in &current {
        if !disks.iter().any(|b| b.target == d.target) {
            problems.push(format!("the VM's disk {} ({}) is not in the backup", d.target, volume_of(d)));
        }
    }
    if problems.is_empty() { Ok(pairs) } else { Err(BackupError::Mismatch { vm: domain.name.clone(), problems }) }
}

/// Restoring one disk of a backup as a new volume. Built with [`VolumeRestoreRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VolumeRestoreRequest {
    /// The repository the backup is on.
    pub repository: BackupRepository,
    /// The VM the backup is of.
    pub vm: String,
    /// The backup id.
    pub id: String,
    /// The disk, by its target in the backup (`vdb`).
    pub disk: String,
    /// Where to write: a new file or block device path, or an RBD image.
    pub to: ImageLocation,
    /// The format to write (RBD images are raw).
    pub format: ImageFormat,
    /// Attach the new volume to this VM (running or shut off).
    pub attach: Option<String>,
    /// Write at most this many bytes per second (`qemu-img convert -r`; a qcow2 file restored
    /// as a checked copy is not limited).
    pub bandwidth: Option<u64>,
}

impl VolumeRestoreRequest {
    /// Restoring disk `disk` (its target in the backup) of backup `id` of `vm` on `repository`
    /// to `to`, as qcow2 (raw for an RBD image), attached to no VM.
    pub fn new(
        repository: BackupRepository,
        vm: impl Into<String>,
        id: impl Into<String>,
        disk: impl Into<String>,
        to: ImageLocation,
    ) -> Self {
        let format = if matches!(to, ImageLocation::Rbd(_)) { ImageFormat::Raw } else { ImageFormat::Qcow2 };
        VolumeRestoreRequest {
            repository,
            vm: vm.into(),
            id: id.into(),
            disk: disk.into(),
            to,
            format,
            attach: None,
            bandwidth: None,
        }
    }

    /// The format to write.
    pub fn with_format(mut self, format: ImageFormat) -> Self {
        self.format = format;
        self
    }

    /// Attaches the new volume to `vm` (running or shut off) as its next free target.
    pub fn attach_to(mut self, vm: impl Into<String>) -> Self {
        self.attach = Some(vm.into());
        self
    }

    /// Writes the volume at most `bytes_per_second` fast (spares the storage it goes to).
    pub fn with_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second);
        self
    }
}

/// Where a restored volume was attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Attachment {
    /// The VM.
    pub vm: String,
    /// The target device it was attached as.
    pub target: String,
}

/// A restored volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RestoredVolume {
    /// The backup restored from, `VM/BACKUP-ID` on the request's repository.
    pub backup: String,
    /// The disk of the backup restored.
    pub disk: String,
    /// Where it was written.
    pub location: String,
    /// Its format.
    pub format: String,
    /// The VM and target it was attached as.
    pub attached: Option<Attachment>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use nasbak_repo::Manifest;

    fn domain(disks: &[(&str, &str)]) -> Domain {
        let mut xml = String::from("<domain><name>vm</name><devices>");
        for (target, file) in disks {
            xml.push_str(&format!("<disk type='file' device='disk'><driver type='qcow2'/><source file='{file}'/><target dev='{target}'/></disk>"));
        }
        xml.push_str("</devices></domain>");
        Domain::parse(&xml).unwrap()
    }

    fn manifest(disks: &[(&str, &str)]) -> Manifest {
        crate::test_support::manifest("2026.01.01.00.00.00", disks)
    }

    #[test]
    fn disks_pair_by_identity_not_position() {
        // The VM lists its disks in another order than the backup (a data disk created first).
        let d = domain(&[("vdb", "/v/data1.qcow2"), ("vda", "/v/root1.qcow2")]);
        let m = manifest(&[("vda", "root1"), ("vdb", "data1")]);
        let pairs = match_disks(&m.disks, &d, true).unwrap();
        for (b, disk) in pairs {
            assert_eq!(b.target, disk.target);
        }
    }

    #[test]
    fn every_mismatch_is_reported() {
        let d = domain(&[("vda", "/v/root2.qcow2"), ("vdc", "/v/extra.qcow2")]);
        let m = manifest(&[("vda", "root1"), ("vdb", "data1")]);
        let e = match_disks(&m.disks, &d, true).unwrap_err().to_string();
        // Into another VM, only targets count.
        let e2 = match_disks(&m.disks, &d, false).unwrap_err().to_string();
        assert!(!e2.contains("volume root2") && e2.contains("no disk vdb"), "{e2}");
        assert!(e.contains("disk vda of the VM is volume root2, the backup's vda is volume root1"), "{e}");
        assert!(e.contains("the VM has no disk vdb"), "{e}");
        assert!(e.contains("the VM's disk vdc (extra) is not in the backup"), "{e}");
        assert!(e.contains("nothing was written"), "{e}");
    }
}
