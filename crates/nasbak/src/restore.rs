//! Restore of a whole shut-off VM from one of its backups.
//!
//! Backup disks are matched to the VM's current disks by identity (target device and volume),
//! never by position; every mismatch is reported before anything is written.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nasbak_libvirt::{Disk, DiskSource, Domain, DomainState, Hypervisor};
use nasbak_qemu_img::{CheckVerdict, ConvertRequest, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::model::layout::MANIFEST_FILE;
use nasbak_repo::{BackupRepository, Manifest, ManifestDisk, Mounter, VmName};

use crate::backup::{AgentSource, Engine, volume_of};
use crate::error::BackupError;
use crate::lock::VmLock;

/// What was restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    /// The target device.
    pub target: String,
    /// Where it was written.
    pub path: PathBuf,
    /// The format written.
    pub format: String,
}

/// Pairs each backup disk with the VM disk of the same identity, or says every mismatch.
pub fn match_disks<'a>(
    manifest: &'a Manifest,
    domain: &'a Domain,
) -> Result<Vec<(&'a ManifestDisk, &'a Disk)>, BackupError> {
    let (current, _) = domain.backup_selection();
    let mut problems = Vec::new();
    let mut pairs = Vec::new();
    for b in &manifest.disks {
        match current.iter().find(|d| d.target == b.target) {
            None => problems
                .push(format!("the backup has disk {} ({}), the VM has no disk {}", b.target, b.volume, b.target)),
            Some(d) if volume_of(d).as_str() != b.volume => problems.push(format!(
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
        if !manifest.disks.iter().any(|b| b.target == d.target) {
            problems.push(format!("the VM's disk {} ({}) is not in the backup", d.target, volume_of(d)));
        }
    }
    if problems.is_empty() { Ok(pairs) } else { Err(BackupError::Mismatch { vm: domain.name.clone(), problems }) }
}

impl<H, I, M> Engine<H, I, M>
where
    H: Hypervisor + AgentSource,
    I: ImageTool,
    M: Mounter,
{
    /// Restores every disk of `vm` from the backup `<repository>/<vm>/<id>`. The VM must be
    /// shut off. Backup files are checked (`qemu-img check` and their SHA-256) before anything
    /// is written. qcow2 volumes get a self-contained qcow2 (no backing file), written beside
    /// the volume and renamed over it; raw files and block devices are written in place as raw.
    pub fn restore(&self, repository: &BackupRepository, vm: &str, id: &str) -> Result<Vec<RestoredDisk>, BackupError> {
        let vm_name = VmName::new(vm)?;
        let state = self.hypervisor.domain_state(vm)?;
        if state != DomainState::ShutOff {
            return Err(BackupError::NotShutOff { vm: vm.to_owned() });
        }
        let domain = Domain::parse(&self.hypervisor.domain_xml(vm)?)?;
        let mounted = self.mounts.acquire(repository)?;
        let layout = mounted.layout();
        let (_, _, dir) = layout.resolve_backup(&format!("{vm}/{id}"))?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest_path).map_err(|source| BackupError::Io {
            action: "reading the manifest (is this a complete backup?)",
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = Manifest::from_json(&text)?;
        let pairs = match_disks(&manifest, &domain)?;
        let _lock = VmLock::take(&layout.vm_dir(&vm_name), vm)?;
        for (b, _) in &pairs {
            self.verify_file(&dir, b)?;
        }
        let mut restored = Vec::new();
        for (b, d) in pairs {
            restored.push(self.restore_disk(&dir.join(&b.file), d)?);
        }
        Ok(restored)
    }

    /// `qemu-img check` and the manifest's checksum of one backup file.
    pub(crate) fn verify_file(&self, dir: &Path, disk: &ManifestDisk) -> Result<(), BackupError> {
        let path = dir.join(&disk.file);
        let report = self.images.check(&ImageLocation::Path(path.clone()), &ImageFormat::Qcow2)?;
        if !matches!(report.verdict, CheckVerdict::Clean | CheckVerdict::Leaks) {
            return Err(BackupError::Damaged { path, detail: format!("qemu-img check: {report:?}") });
        }
        if let Some(sum) = &disk.checksum {
            let actual = crate::checksum::sha256_file(&path).map_err(|source| BackupError::Io {
                action: "checksumming",
                path: path.clone(),
                source,
            })?;
            if actual != sum.value {
                return Err(BackupError::Damaged {
                    path,
                    detail: format!("sha256 is {actual}, the manifest says {}", sum.value),
                });
            }
        }
        Ok(())
    }

    fn restore_disk(&self, backup_file: &Path, disk: &Disk) -> Result<RestoredDisk, BackupError> {
        let (path, is_block) = match &disk.source {
            Some(DiskSource::File(p)) => (p.clone(), false),
            Some(DiskSource::Block(p)) => (p.clone(), true),
            other => {
                return Err(BackupError::Unsupported {
                    what: format!("restoring disk {} with source {other:?}", disk.target),
                });
            }
        };
        let format = disk.format.clone().unwrap_or_else(|| "raw".into());
        let source = ImageLocation::Path(backup_file.to_owned());
        if format == "qcow2" && !is_block {
            let tmp = path.with_extension("nasbak-restore");
            let mut r = ConvertRequest::new(source, tmp.clone(), ImageFormat::Qcow2);
            r.source_format = Some(ImageFormat::Qcow2);
            let result = self.images.convert(&r, Arc::new(|_| {}));
            if let Err(e) = result {
                let _ = fs::remove_file(&tmp);
                return Err(e.into());
            }
            fs::rename(&tmp, &path).map_err(|source| BackupError::Io {
                action: "replacing",
                path: path.clone(),
                source,
            })?;
        } else {
            let mut r = ConvertRequest::new(source, path.clone(), ImageFormat::Raw);
            r.source_format = Some(ImageFormat::Qcow2);
            r.target_exists = true;
            self.images.convert(&r, Arc::new(|_| {}))?;
        }
        Ok(RestoredDisk { target: disk.target.clone(), path, format })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(disks: &[(&str, &str)]) -> Domain {
        let mut xml = String::from("<domain><name>vm</name><devices>");
        for (target, file) in disks {
            xml.push_str(&format!("<disk type='file' device='disk'><driver type='qcow2'/><source file='{file}'/><target dev='{target}'/></disk>"));
        }
        xml.push_str("</devices></domain>");
        Domain::parse(&xml).unwrap()
    }

    fn manifest(disks: &[(&str, &str)]) -> Manifest {
        let t = chrono::DateTime::from_timestamp(0, 0).unwrap();
        Manifest {
            version: 1,
            id: "2026.01.01.00.00.00".into(),
            repository: "r".into(),
            vm: "vm".into(),
            method: nasbak_repo::BackupMethod::QemuImg,
            started: t,
            finished: t,
            quiesced: false,
            quiesce_note: None,
            libvirt_version: None,
            qemu_version: None,
            disks: disks
                .iter()
                .map(|(target, volume)| ManifestDisk {
                    target: target.to_string(),
                    volume: volume.to_string(),
                    source: String::new(),
                    source_format: None,
                    file: format!("datadisk.{volume}.qcow2"),
                    format: "qcow2".into(),
                    virtual_size: 1,
                    size: 1,
                    checksum: None,
                })
                .collect(),
        }
    }

    #[test]
    fn disks_pair_by_identity_not_position() {
        // The VM lists its disks in another order than the backup (a data disk created first).
        let d = domain(&[("vdb", "/v/data1.qcow2"), ("vda", "/v/root1.qcow2")]);
        let m = manifest(&[("vda", "root1"), ("vdb", "data1")]);
        let pairs = match_disks(&m, &d).unwrap();
        for (b, disk) in pairs {
            assert_eq!(b.target, disk.target);
        }
    }

    #[test]
    fn every_mismatch_is_reported() {
        let d = domain(&[("vda", "/v/root2.qcow2"), ("vdc", "/v/extra.qcow2")]);
        let m = manifest(&[("vda", "root1"), ("vdb", "data1")]);
        let e = match_disks(&m, &d).unwrap_err().to_string();
        assert!(e.contains("disk vda of the VM is volume root2, the backup's vda is volume root1"), "{e}");
        assert!(e.contains("the VM has no disk vdb"), "{e}");
        assert!(e.contains("the VM's disk vdc (extra) is not in the backup"), "{e}");
        assert!(e.contains("nothing was written"), "{e}");
    }
}
