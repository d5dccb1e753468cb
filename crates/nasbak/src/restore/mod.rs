//! Restore: every disk of a shut-off VM from a backup, or one disk of a backup as a new volume
//! (a file, a block device or an RBD image), optionally attached to a VM.
//!
//! Backup disks are matched to the VM's current disks by identity (target device and volume),
//! never by position; every mismatch is reported before anything is written. Backups the
//! reference system wrote (no manifest) are restored too: their file names give the volume, and
//! the `domain-config.xml` saved with them gives each volume's target.

use nasbak_libvirt::{Disk, Domain, DomainState};
use nasbak_repo::{BackupId, ManifestDisk, MountedRepository, Mounter, VmName};

mod instant;
mod vm;
mod volume;

use crate::disks::volume_of;
use crate::error::{BackupError, Step, at};
use crate::request::RestoreRequest;
use crate::store::backup_disks;

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
    /// The VM state files it keeps, each with its place in the target VM (see
    /// `crate::vmstate::placements`): a backup's state the VM has no place for is refused here.
    pub state: Vec<(nasbak_repo::ManifestState, std::path::PathBuf)>,
    /// What a restore says of a backup without the state the VM has.
    pub state_note: Option<String>,
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
        let disks = backup_disks(&dir, &request.vm, &request.id, &|| Some(domain.clone()))?;
        let kept = crate::store::backup_state(&dir, &request.vm, &request.id);
        let state = crate::vmstate::placements(&kept, &domain)
            .map_err(|problems| BackupError::Mismatch { vm: target_vm.to_owned(), problems })?;
        let state_note = crate::vmstate::missing_note(&kept, &domain);
        Ok(RestoreStart { mounted, dir, target_vm, xml, domain, disks, state, state_note })
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
