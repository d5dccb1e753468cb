//! Restore: every disk of a shut-off VM from a backup, or one disk of a backup as a new volume
//! (a file, a block device or an RBD image), optionally attached to a VM.
//!
//! Backup disks are matched to the VM's current disks by identity (target device and volume),
//! never by position; every mismatch is reported before anything is written. Backups the
//! reference system wrote (no manifest) are restored too: their file names give the volume, and
//! the `domain-config.xml` saved with them gives each volume's target.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use nasbak_libvirt::{CancelHandle, Disk, DiskSource, Domain, DomainState, Hypervisor, attach_bus, disk_attach_xml};
use nasbak_qemu_img::{CheckVerdict, ConvertRequest, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::model::layout::{DOMAIN_CONFIG_FILE, parse_disk_file_name};
use nasbak_repo::{BackupId, BackupRepository, ManifestDisk, Mounter, VmName};
use serde::Serialize;

use crate::backup::{cancelled_or, volume_of};
use crate::catalog::{BackupKind, read_backup};
use crate::engine::{AgentSource, Engine};
use crate::error::{BackupError, Step, at};
use crate::lock::VmLock;
use crate::progress::{Observer, Phase, Progress};

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

/// The disks of a backup: from its manifest, or for a reference-system backup from its file
/// names, each volume's target taken from the saved `domain-config.xml` (else from `current`,
/// the VM as it is now).
pub(crate) fn backup_disks(
    dir: &Path,
    vm: &str,
    id: &str,
    current: Option<&Domain>,
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
    let saved = fs::read_to_string(dir.join(DOMAIN_CONFIG_FILE)).ok().and_then(|x| Domain::parse(&x).ok());
    let mut disks = Vec::new();
    for file in files {
        let (_, volume) = parse_disk_file_name(&file).expect("read_backup lists backup file names only");
        let find = |d: &Domain| d.disks.iter().find(|x| volume_of(x) == volume).map(|x| x.target.clone());
        let target = saved.as_ref().and_then(find).or_else(|| current.and_then(find)).ok_or_else(|| {
            BackupError::Mismatch {
                vm: vm.to_owned(),
                problems: vec![format!(
                    "the backup's file {file} is volume {volume}, which neither the saved domain-config.xml nor the VM has"
                )],
            }
        })?;
        disks.push(ManifestDisk {
            target,
            volume: volume.to_string(),
            source: String::new(),
            source_format: None,
            file: file.clone(),
            format: "qcow2".into(),
            virtual_size: 0,
            size: 0,
            checksum: None,
        });
    }
    Ok(disks)
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
        VolumeRestoreRequest { repository, vm: vm.into(), id: id.into(), disk: disk.into(), to, format, attach: None }
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

/// Parses `--to`: `rbd:POOL/IMAGE` (Ceph's default client and ceph.conf) or an absolute path.
pub fn parse_destination(to: &str) -> Result<ImageLocation, BackupError> {
    let bad = |why: &str| {
        BackupError::Input(nasbak_repo::ParseError::new(
            "destination",
            to,
            0,
            why.to_owned(),
            "expected an absolute path or rbd:POOL/IMAGE",
        ))
    };
    if let Some(rest) = to.strip_prefix("rbd:") {
        let (pool, image) = rest.split_once('/').ok_or_else(|| bad("no /IMAGE after the pool"))?;
        if pool.is_empty() || image.is_empty() || image.contains(['/', ':', '@']) || pool.contains(':') {
            return Err(bad("pool and image must be plain names"));
        }
        return Ok(ImageLocation::Rbd(nasbak_qemu_img::RbdSpec::new(pool, image)));
    }
    if !to.starts_with('/') {
        return Err(bad("not an absolute path"));
    }
    Ok(ImageLocation::Path(PathBuf::from(to)))
}

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// Restores every disk of the shut-off VM `into` (the backup's own VM when `None`) from the
    /// backup `<repository>/<vm>/<id>`. Backup files are checked (`qemu-img check` and their
    /// SHA-256) before anything is written. qcow2 volumes get a self-contained qcow2 (no backing
    /// file), written beside the volume and renamed over it; raw files and block devices are
    /// written in place as raw. Into another VM, disks pair by target only.
    pub fn restore(
        &self,
        request: &RestoreRequest,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<RestoreOutcome, BackupError> {
        let (repository, vm, id) = (&request.repository, request.vm.as_str(), request.id.as_str());
        // The backup reference first: bad input is named before anything else is asked.
        let vm_name = VmName::new(vm)?;
        id.parse::<BackupId>()?;
        let target_vm = request.into.as_deref().unwrap_or(vm);
        let inspect = || -> Result<_, BackupError> {
            let state = self.hypervisor.domain_state(target_vm)?;
            Ok((state, Domain::parse(&self.hypervisor.domain_xml(target_vm)?)?))
        };
        let (state, domain) = inspect().map_err(at(Step::Inspect))?;
        if state != DomainState::ShutOff {
            return Err(BackupError::NotShutOff { vm: target_vm.to_owned() });
        }
        let mounted = self.mounts.acquire(repository)?;
        let layout = mounted.layout();
        let (_, _, dir) = layout.resolve_backup(&format!("{vm}/{id}"))?;
        let disks = backup_disks(&dir, vm, id, Some(&domain))?;
        let pairs = match_disks(&disks, &domain, target_vm == vm)?;
        let _lock = VmLock::take(&layout.vm_dir(&vm_name), vm)?;
        // Everything is checked before a volume changes: qemu-img check of every file; the
        // checksum of files written in place (raw, block) first, of qcow2 copies while they are
        // copied beside their volumes. Only then are raw volumes written and the copies renamed.
        let mut in_place = Vec::new();
        let mut copies = Vec::new();
        for (b, d) in &pairs {
            self.check_image(&dir, b).map_err(at(Step::Check))?;
            match restore_target(d)? {
                RestoreTarget::Qcow2File(path) => copies.push((*b, *d, path)),
                RestoreTarget::InPlace(location) => {
                    self.check_sum(&dir, b, vm, cancel, observer).map_err(at(Step::Check))?;
                    in_place.push((*b, *d, location));
                }
            }
        }
        let mut staged = Staged(Vec::new()); // renamed copies are gone; the rest is removed on drop
        for (b, d, path) in &copies {
            remove_stale_stages(path);
            let tmp = stage_beside(path)?;
            staged.0.push(tmp.clone());
            self.copy_checked(&dir, b, &tmp, vm, &d.target, cancel, observer).map_err(|e| {
                let step = Step::Restore { disk: d.target.clone() };
                crate::backup::repository_unavailable(
                    &mounted,
                    repository.name().to_string(),
                    step.clone(),
                    at(step)(e),
                )
            })?;
        }
        // From here on volumes change: a failure says which did and which did not.
        let mut restored = Vec::new();
        let all: Vec<String> = pairs.iter().map(|(_, d)| d.target.clone()).collect();
        let incomplete = |restored: &[RestoredDisk], partly: Option<&str>, e: BackupError| {
            let e = match partly {
                Some(disk) => at(Step::Restore { disk: disk.to_owned() })(e),
                None => e,
            };
            let done: Vec<String> = restored.iter().map(|r| r.target.clone()).collect();
            BackupError::RestoreIncomplete {
                vm: target_vm.to_owned(),
                untouched: all.iter().filter(|t| !done.contains(t) && Some(t.as_str()) != partly).cloned().collect(),
                partly_written: partly.map(str::to_owned),
                restored: done,
                source: Box::new(e),
            }
        };
        // A disk written in place is marked on the repository while it is written: a restore
        // killed midway leaves the mark, which the next backup refuses on and the next restore
        // reports.
        let marks_dir = VmName::new(target_vm).map_or_else(|_| layout.vm_dir(&vm_name), |n| layout.vm_dir(&n));
        let earlier = interrupted_restores(&marks_dir);
        for (b, d, location) in in_place {
            let shown = location.to_string();
            let note = earlier.iter().find(|m| m.target == d.target).map(|m| {
                format!(
                    "the restore of {} begun {} (pid {} on {}) had been interrupted; this one rewrote it",
                    shown, m.started, m.pid, m.host
                )
            });
            let mark = RestoringMark::write(&marks_dir, &d.target, &shown, &format!("{vm}/{id}"), self.clock.now())
                .map_err(|e| incomplete(&restored, None, e))?;
            let mut r = ConvertRequest::new(ImageLocation::Path(dir.join(&b.file)), location, ImageFormat::Raw);
            r.source_format = Some(ImageFormat::Qcow2);
            r.target_exists = true;
            let mut first = true;
            let mut report = |p: &Progress| {
                if std::mem::take(&mut first) {
                    crate::fault::point("restore-write");
                }
                observer(p)
            };
            if let Err(e) = self.convert_reporting(r, cancel, target_vm, &d.target, b.virtual_size, &mut report) {
                return Err(incomplete(&restored, Some(&d.target), e));
            }
            mark.done();
            restored.push(RestoredDisk { target: d.target.clone(), location: shown, format: "raw".into(), note });
        }
        for ((_, d, path), tmp) in copies.iter().zip(&staged.0) {
            if let Err(source) = fs::rename(tmp, path) {
                let e = BackupError::Io { action: "replacing", path: path.clone(), source };
                return Err(incomplete(&restored, None, at(Step::Restore { disk: d.target.clone() })(e)));
            }
            let location = path.display().to_string();
            restored.push(RestoredDisk { target: d.target.clone(), location, format: "qcow2".into(), note: None });
        }
        Ok(RestoreOutcome { backup: format!("{vm}/{id}"), vm: target_vm.to_owned(), restored })
    }

    /// Restores one disk of a backup to a new file, block device or RBD image, and optionally
    /// attaches it to a VM with the right driver type and the next free target name. An existing
    /// file is never overwritten; everything is checked before anything is written.
    pub fn restore_volume(
        &self,
        request: &VolumeRestoreRequest,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<RestoredVolume, BackupError> {
        let repository = &request.repository;
        let vm_name = VmName::new(&request.vm)?;
        request.id.parse::<BackupId>()?;
        if matches!(request.to, ImageLocation::Rbd(_)) && request.format != ImageFormat::Raw {
            return Err(BackupError::Unsupported { what: "RBD images in a format other than raw".into() });
        }
        if !matches!(request.format, ImageFormat::Raw | ImageFormat::Qcow2) {
            return Err(BackupError::Unsupported {
                what: format!("restoring as {}; use qcow2 or raw", request.format),
            });
        }
        let attach_to = match &request.attach {
            Some(vm) => {
                let inspect = || -> Result<_, BackupError> {
                    let running = self.hypervisor.domain_state(vm)? == DomainState::Running;
                    Ok((vm.clone(), running, Domain::parse(&self.hypervisor.domain_xml(vm)?)?))
                };
                Some(inspect().map_err(at(Step::Inspect))?)
            }
            None => None,
        };
        let is_block = match &request.to {
            ImageLocation::Path(p) => {
                let meta = fs::metadata(p);
                let block =
                    meta.as_ref().is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
                if meta.is_ok() && !block {
                    return Err(BackupError::Exists { path: p.clone() });
                }
                if let Some((vm, _, d)) = &attach_to
                    && d.disks
                        .iter()
                        .any(|x| matches!(&x.source, Some(DiskSource::File(f) | DiskSource::Block(f)) if f == p))
                {
                    return Err(BackupError::Unsupported {
                        what: format!("{} is already a disk of {vm}", p.display()),
                    });
                }
                block
            }
            ImageLocation::Rbd(_) => false,
        };
        let mounted = self.mounts.acquire(repository)?;
        let layout = mounted.layout();
        let (_, _, dir) = layout.resolve_backup(&format!("{}/{}", request.vm, request.id))?;
        let disks = backup_disks(&dir, &request.vm, &request.id, None)?;
        let disk = disks.iter().find(|d| d.target == request.disk).ok_or_else(|| BackupError::NotFound {
            what: format!(
                "disk {} in backup {}/{} (it has {})",
                request.disk,
                request.vm,
                request.id,
                disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })?;
        let _lock = VmLock::take(&layout.vm_dir(&vm_name), &request.vm)?;
        self.check_image(&dir, disk).map_err(at(Step::Check))?;
        if !matches!((&request.to, &request.format), (ImageLocation::Path(_), ImageFormat::Qcow2)) || is_block {
            // Converted straight into place: the checksum first.
            self.check_sum(&dir, disk, &request.vm, cancel, observer).map_err(at(Step::Check))?;
        }
        let (source_for_xml, written) = self
            .write_volume(request, &dir, disk, is_block, cancel, observer)
            .map_err(at(Step::Restore { disk: disk.target.clone() }))?;
        let attached = match attach_to {
            Some((vm, running, domain)) => {
                let (prefix, bus) = attach_bus(&disk.target, running);
                let target = domain.next_free_target(prefix);
                let xml = disk_attach_xml(&source_for_xml, &written.to_string(), &target, bus)?;
                self.hypervisor.attach_disk(&vm, &xml, running).map_err(|source| BackupError::AttachFailed {
                    location: request.to.to_string(),
                    vm: vm.clone(),
                    source,
                })?;
                Some(Attachment { vm, target })
            }
            None => None,
        };
        Ok(RestoredVolume {
            backup: format!("{}/{}", request.vm, request.id),
            disk: disk.target.clone(),
            location: request.to.to_string(),
            format: written.to_string(),
            attached,
        })
    }

    /// Writes the volume of [`Engine::restore_volume`]; returns its source for the domain XML
    /// and the format written.
    fn write_volume(
        &self,
        request: &VolumeRestoreRequest,
        dir: &Path,
        disk: &ManifestDisk,
        is_block: bool,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(DiskSource, ImageFormat), BackupError> {
        let vm = request.vm.as_str();
        let source = ImageLocation::Path(dir.join(&disk.file));
        Ok(match &request.to {
            ImageLocation::Path(p) if is_block => {
                let mut r = ConvertRequest::new(source, p.clone(), ImageFormat::Raw);
                r.source_format = Some(ImageFormat::Qcow2);
                r.target_exists = true;
                self.convert_reporting(r, cancel, vm, &disk.target, disk.virtual_size, observer)?;
                (DiskSource::Block(p.clone()), ImageFormat::Raw)
            }
            ImageLocation::Path(p) if request.format == ImageFormat::Qcow2 => {
                // The backup file is a self-contained qcow2: a checked copy is the restore.
                let staged = Staged(vec![stage_beside(p)?]);
                self.copy_checked(dir, disk, &staged.0[0], vm, &disk.target, cancel, observer)?;
                fs::rename(&staged.0[0], p).map_err(|source| BackupError::Io {
                    action: "moving into place",
                    path: p.clone(),
                    source,
                })?;
                (DiskSource::File(p.clone()), ImageFormat::Qcow2)
            }
            ImageLocation::Path(p) => {
                self.write_new_file(source, p, &request.format, cancel, vm, &disk.target, disk.virtual_size, observer)?;
                (DiskSource::File(p.clone()), request.format.clone())
            }
            ImageLocation::Rbd(spec) => {
                let mut r = ConvertRequest::new(source, request.to.clone(), ImageFormat::Raw);
                r.source_format = Some(ImageFormat::Qcow2);
                self.convert_reporting(r, cancel, vm, &disk.target, disk.virtual_size, observer)?;
                let name = format!("{}/{}", spec.pool, spec.image);
                let rbd = DiskSource::Network {
                    protocol: "rbd".into(),
                    name: Some(name),
                    hosts: vec![],
                    auth: None,
                    config: None,
                };
                (rbd, ImageFormat::Raw)
            }
        })
    }

    /// Writes a new file through `<path>.nasbak-partial` and a rename, so an interrupted restore
    /// never leaves a file that looks complete.
    #[allow(clippy::too_many_arguments)]
    fn write_new_file(
        &self,
        source: ImageLocation,
        path: &Path,
        format: &ImageFormat,
        cancel: &CancelHandle,
        vm: &str,
        target: &str,
        size: u64,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let tmp = stage_beside(path)?;
        let mut r = ConvertRequest::new(source, tmp.clone(), format.clone());
        r.source_format = Some(ImageFormat::Qcow2);
        if let Err(e) = self.convert_reporting(r, cancel, vm, target, size, observer) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, path).map_err(|source| BackupError::Io {
            action: "moving into place",
            path: path.to_owned(),
            source,
        })
    }

    /// Runs one conversion on a helper thread and hands its progress to `progress` on this one.
    pub(crate) fn convert_reporting(
        &self,
        mut request: ConvertRequest,
        cancel: &CancelHandle,
        vm: &str,
        target: &str,
        size: u64,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        request.cancel = cancel.clone();
        let (tx, rx) = mpsc::channel::<f64>();
        let images = &self.images;
        let request = &request;
        let result = std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let tx = std::sync::Mutex::new(tx);
                images.convert(
                    request,
                    Arc::new(move |p| {
                        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(p);
                    }),
                )
            });
            for percent in rx {
                // qemu-img tells percent; with the disk's size known, it is told as bytes.
                let (done, total) =
                    if size > 0 { ((percent / 100.0 * size as f64) as u64, size) } else { (percent as u64, 100) };
                observer(&Progress::new(Phase::Convert, vm, done, total).on_disk(target));
            }
            worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        result.map_err(|e| cancelled_or(cancel, e))
    }

    /// `qemu-img check` of one backup file.
    pub(crate) fn check_image(&self, dir: &Path, disk: &ManifestDisk) -> Result<(), BackupError> {
        let path = dir.join(&disk.file);
        let report = self.images.check(&ImageLocation::Path(path.clone()), &ImageFormat::Qcow2)?;
        if !matches!(report.verdict, CheckVerdict::Clean | CheckVerdict::Leaks) {
            return Err(BackupError::Damaged { path, detail: format!("qemu-img check: {report:?}") });
        }
        Ok(())
    }

    /// The manifest's checksum of one backup file (none recorded: nothing to compare).
    pub(crate) fn check_sum(
        &self,
        dir: &Path,
        disk: &ManifestDisk,
        vm: &str,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let Some(sum) = &disk.checksum else { return Ok(()) };
        let path = dir.join(&disk.file);
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        let mut report = |done: u64| {
            observer(&Progress::new(Phase::Checksum, vm, done, size).on_disk(&disk.target));
            !cancel.is_cancelled()
        };
        let actual = crate::checksum::checksum_file_observed(&path, &sum.algorithm, &mut report).map_err(|source| {
            cancelled_or(cancel, BackupError::Io { action: "checksumming", path: path.clone(), source })
        })?;
        if actual != sum.value {
            return Err(BackupError::Damaged {
                path,
                detail: format!("{} is {actual}, the manifest says {}", sum.algorithm, sum.value),
            });
        }
        Ok(())
    }

    /// Copies a backup file to `tmp` in one pass that also checks its checksum; removes `tmp` on
    /// any failure.
    #[allow(clippy::too_many_arguments)]
    fn copy_checked(
        &self,
        dir: &Path,
        disk: &ManifestDisk,
        tmp: &Path,
        vm: &str,
        target: &str,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let path = dir.join(&disk.file);
        let algorithm = disk.checksum.as_ref().map_or(crate::checksum::CHECKSUM_ALGORITHM, |c| c.algorithm.as_str());
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        // The staged name is this process's own (its pid is in it); copy_verified creates it anew.
        let _ = fs::remove_file(tmp);
        let mut first = true;
        let copied = crate::checksum::copy_verified(&path, tmp, algorithm, &mut |done| {
            if std::mem::take(&mut first) {
                crate::fault::point("restore-copy");
            }
            observer(&Progress::new(Phase::Copy, vm, done, size).on_disk(target));
            !cancel.is_cancelled()
        });
        let result = match copied {
            Err(_) if cancel.is_cancelled() => Err(BackupError::Cancelled),
            Err(source) => Err(BackupError::Io { action: "copying", path: path.clone(), source }),
            Ok(actual) => match &disk.checksum {
                Some(sum) if sum.value != actual => Err(BackupError::Damaged {
                    path,
                    detail: format!("{} is {actual}, the manifest says {}", sum.algorithm, sum.value),
                }),
                _ => Ok(()),
            },
        };
        if result.is_err() {
            let _ = fs::remove_file(tmp);
        }
        result
    }
}

/// Where a VM disk is restored to.
enum RestoreTarget {
    /// A qcow2 file: restored as a checked copy of the backup file beside it, renamed over it.
    Qcow2File(PathBuf),
    /// A raw file, a block device or an RBD image: written in place as raw (`convert -n`).
    InPlace(ImageLocation),
}

fn restore_target(disk: &Disk) -> Result<RestoreTarget, BackupError> {
    let location = crate::backup::disk_location(disk).ok_or_else(|| BackupError::Unsupported {
        what: format!("restoring disk {} with source {:?}", disk.target, disk.source),
    })?;
    Ok(match (location, &disk.source) {
        (ImageLocation::Path(p), Some(DiskSource::File(_))) if disk.format.as_deref() == Some("qcow2") => {
            RestoreTarget::Qcow2File(p)
        }
        (location, _) => RestoreTarget::InPlace(location),
    })
}

/// The prefix of the marks of in-place writes in `<repo>/<vm>/` (`.nasbak-restoring.<target>`).
pub const RESTORING_MARK: &str = ".nasbak-restoring.";

/// A disk being (or left half) written in place by a restore.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RestoringMark {
    /// The disk's target.
    pub target: String,
    /// Where it is written.
    pub location: String,
    /// The backup restored from, `VM/ID`.
    pub backup: String,
    /// When the write began.
    pub started: chrono::DateTime<chrono::Utc>,
    /// Who wrote.
    pub host: String,
    /// The writing process.
    pub pid: u32,
    #[serde(skip)]
    path: PathBuf,
}

impl RestoringMark {
    fn write(
        dir: &Path,
        target: &str,
        location: &str,
        backup: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<RestoringMark, BackupError> {
        let path = dir.join(format!("{RESTORING_MARK}{target}"));
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let mark = RestoringMark {
            target: target.to_owned(),
            location: location.to_owned(),
            backup: backup.to_owned(),
            started: now,
            host,
            pid: std::process::id(),
            path: path.clone(),
        };
        let io = |source| BackupError::Io { action: "marking the in-place restore in", path: path.clone(), source };
        fs::create_dir_all(dir).map_err(io)?;
        let text = serde_json::to_string(&mark).expect("a mark serializes");
        let mut f = fs::File::create(&path).map_err(io)?;
        std::io::Write::write_all(&mut f, text.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
        Ok(mark)
    }

    /// The write completed: the mark goes.
    fn done(self) {
        let _ = fs::remove_file(&self.path);
    }

    /// What it says, for an error or a warning.
    pub(crate) fn describe(&self) -> String {
        format!(
            "disk {} ({}) was left half-written by a restore from {} begun {} (pid {} on {}) that did not finish",
            self.target, self.location, self.backup, self.started, self.pid, self.host
        )
    }
}

/// The marks of in-place restores that did not finish, in `vm_dir`.
pub(crate) fn interrupted_restores(vm_dir: &Path) -> Vec<RestoringMark> {
    let Ok(entries) = fs::read_dir(vm_dir) else { return Vec::new() };
    let mut marks: Vec<RestoringMark> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(RESTORING_MARK))
        .filter_map(|e| {
            let mut m: RestoringMark = serde_json::from_str(&fs::read_to_string(e.path()).ok()?).ok()?;
            m.path = e.path();
            Some(m)
        })
        .collect();
    marks.sort_by(|a, b| a.target.cmp(&b.target));
    marks
}

/// The suffix of the files a restore writes beside a volume before renaming them over it.
pub const STAGE_SUFFIX: &str = ".nasbak-restore";

/// Creates, exclusively, an empty file beside `path` to write a restored volume into before it
/// is renamed over `path`: `.<file name>.<pid>-<n>.nasbak-restore`. Never derived by changing an
/// extension, so `disk.qcow2` and `disk.img` in one directory get their own.
pub(crate) fn stage_beside(path: &Path) -> Result<PathBuf, BackupError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for n in 0u32.. {
        let candidate = dir.join(format!(".{name}.{}-{n}{STAGE_SUFFIX}", std::process::id()));
        match fs::OpenOptions::new().write(true).create_new(true).open(&candidate) {
            Ok(_) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(BackupError::Io { action: "creating", path: candidate, source }),
        }
    }
    unreachable!("some staging name is free")
}

/// Removes what killed restores staged beside `path` (files of processes that no longer run).
fn remove_stale_stages(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(STAGE_SUFFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Copies staged beside their volumes, removed on drop unless renamed into place.
struct Staged(Vec<PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
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
            schedule: None,
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
