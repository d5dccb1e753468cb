//! Whole-VM restore: every disk of a shut-off VM from a backup, checked before any volume
//! changes; qcow2 volumes get a verified copy renamed over them, the others are written in place
//! under a mark.

use std::fs;
use std::path::{Path, PathBuf};

use nasbak_libvirt::{CancelHandle, Disk, DiskSource, Hypervisor};
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageLocation, ImageTool, StoredLayout, TargetProtection};
use nasbak_repo::{FileFormat, ManifestDisk, Mounter, VmName};

use super::match_disks;
use crate::engine::{AgentSource, Engine};
use crate::error::{BackupError, Step, at};
use crate::outcome::{RestoreOutcome, RestoredDisk};
use crate::progress::{Observer, Progress};
use crate::protect::{Key, disk_image, resolve_key};
use crate::request::RestoreRequest;
use crate::transfer::stage::{Staged, remove_stale_stages, stage_beside};
use crate::transfer::{
    Checked, DecodeOut, check_chain, check_sum, convert, convert_checked, copy_checked, decode_checked, is_plain_chain,
    restore_chain,
};
use nasbak_repo::store::VmLock;
use nasbak_repo::store::ancestors;
use nasbak_repo::store::{RestoringMark, interrupted_restores};

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// Restores every disk of the request's shut-off VM (the backup's own VM unless
    /// [`RestoreRequest::into_vm`]) from the backup. Backup files are checked (`qemu-img check` and
    /// their checksum: BLAKE3, or SHA-256 in older manifests) before anything is written. qcow2 volumes get a self-contained qcow2 (no backing
    /// file), written beside the volume and renamed over it; raw files and block devices are
    /// written in place as raw. Into another VM, disks pair by target only.
    pub fn restore(
        &self,
        request: &RestoreRequest,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<RestoreOutcome, BackupError> {
        let (repository, vm, id) = (&request.repository, request.vm.as_str(), request.id.as_str());
        let start = self.start_restore(request)?;
        let (mounted, dir, target_vm) = (&start.mounted, &start.dir, start.target_vm);
        let vm_name = VmName::new(vm)?;
        let layout = mounted.layout();
        let pairs = match_disks(&start.disks, &start.domain, target_vm == vm)?;
        let _lock = VmLock::take(&layout.vm_dir(&vm_name), vm)?;
        // An encrypted backup needs the repository's key (a chain is stored one way, like its
        // top file): checked before anything is read.
        let key = match pairs.iter().any(|(b, _)| b.stored_as.is_encrypted())
            || start.state.iter().any(|(s, _)| s.stored_as.is_encrypted())
        {
            true => resolve_key(&self.hypervisor, repository.protection(), &self.runtime_dir)?,
            false => None,
        };
        let shown = format!("{}:{vm}/{id}", repository.name());
        // Everything is checked before a volume changes: qemu-img check of every file; the
        // checksum of files written in place (raw, block) first, of qcow2 copies while they are
        // copied beside their volumes. Only then are raw volumes written and the copies renamed.
        let (in_place, copies) =
            self.check_and_sort(&pairs, (dir, &layout.vm_dir(&vm_name)), (vm, id, key.as_ref()), cancel, observer)?;
        // The VM's NVRAM and TPM state, read and checked now; put back once the disks are.
        let mut state = Vec::new();
        for (s, place) in &start.state {
            let bytes =
                crate::vmstate::read_state(&self.images, dir, s, key.as_ref(), cancel).map_err(at(Step::Check))?;
            state.push((s.clone(), place.clone(), bytes));
        }
        let mut staged = Staged(Vec::new()); // renamed copies are gone; the rest is removed on drop
        for (b, d, path, flatten, checked) in &copies {
            remove_stale_stages(path);
            let tmp = stage_beside(path)?;
            staged.0.push(tmp.clone());
            let copied = if *flatten {
                let chain = ancestors(&layout.vm_dir(&vm_name), vm, id, b)?;
                // Written encrypted again with the volume's own passphrase (held until written).
                let volume_key = crate::protect::volume_key(&self.hypervisor, d, &self.runtime_dir)?;
                if volume_key.is_none() && is_plain_chain(b, &chain) {
                    // Each file read once, the full at copy speed.
                    restore_chain(&self.images, (dir, b, &chain, Some(&shown)), &tmp, (vm, &d.target), cancel, observer)
                } else {
                    let source = disk_image(dir, b, &chain, key.as_ref(), &shown)?;
                    // A compressed or encrypted backup into a plain volume: decoded on every core.
                    let files: Vec<Checked> = std::iter::once((dir.to_owned(), (*b).clone())).chain(chain).collect();
                    let decoded = volume_key.is_none()
                        && decode_checked(
                            (&files, key.as_ref().map(|k| k.path())),
                            (&tmp, DecodeOut::Qcow2),
                            (vm, &d.target, &shown),
                            cancel,
                            observer,
                        )?;
                    if decoded {
                        Ok(())
                    } else {
                        let mut r = ConvertRequest::new(source, tmp.clone(), ImageFormat::Qcow2);
                        r.source_format = Some(ImageFormat::Qcow2);
                        r.protection = volume_key
                            .as_ref()
                            .map(|k| TargetProtection::new(StoredLayout::Qcow2Luks, false, Some(k.path().to_owned())));
                        convert_checked(&self.images, (r, checked), cancel, (vm, &d.target, b.virtual_size), observer)
                    }
                }
            } else {
                copy_checked(dir, b, &tmp, vm, &d.target, cancel, observer)
            };
            copied.map_err(|e| {
                let step = Step::Restore { disk: d.target.clone() };
                crate::error::repository_unavailable(mounted, repository.name().to_string(), step.clone(), at(step)(e))
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
                .map_err(|e| incomplete(&restored, None, e.into()))?;
            let chain =
                ancestors(&layout.vm_dir(&vm_name), vm, id, b).map_err(|e| incomplete(&restored, None, e.into()))?;
            let source =
                disk_image(dir, b, &chain, key.as_ref(), &shown).map_err(|e| incomplete(&restored, None, e))?;
            let mut first = true;
            let mut report = |p: &Progress| {
                if std::mem::take(&mut first) {
                    crate::fault::point("restore-write");
                }
                observer(p)
            };
            // A compressed or encrypted backup: decoded in place on every core.
            let decoded = match &location {
                ImageLocation::Path(p) => {
                    let files: Vec<Checked> = std::iter::once((dir.to_owned(), b.clone())).chain(chain).collect();
                    let backup = format!("{}:{vm}/{id}", repository.name());
                    let place = (target_vm, d.target.as_str(), backup.as_str());
                    let keyed = (files.as_slice(), key.as_ref().map(|k| k.path()));
                    decode_checked(keyed, (p, DecodeOut::InPlace), place, cancel, &mut report)
                        .map_err(|e| incomplete(&restored, Some(&d.target), e))?
                }
                _ => false,
            };
            if !decoded {
                let mut r = ConvertRequest::new(source, location, ImageFormat::Raw);
                r.source_format = Some(ImageFormat::Qcow2);
                r.target_exists = true;
                if let Err(e) = convert(&self.images, r, cancel, target_vm, &d.target, b.virtual_size, &mut report) {
                    return Err(incomplete(&restored, Some(&d.target), e));
                }
            }
            mark.done();
            restored.push(RestoredDisk { target: d.target.clone(), location: shown, format: "raw".into(), note });
        }
        for ((_, d, path, _, _), tmp) in copies.iter().zip(&staged.0) {
            if let Err(source) = fs::rename(tmp, path) {
                let e = BackupError::Io { action: "replacing", path: path.clone(), source };
                return Err(incomplete(&restored, None, at(Step::Restore { disk: d.target.clone() })(e)));
            }
            let location = path.display().to_string();
            // A mark an interrupted restore (in place, or instant) left on this disk: rewritten now.
            let note = earlier.iter().find(|m| m.target == d.target).map(|m| {
                m.clone().done();
                format!(
                    "the restore of {location} begun {} (pid {} on {}) had been interrupted; this one rewrote it",
                    m.started, m.pid, m.host
                )
            });
            restored.push(RestoredDisk { target: d.target.clone(), location, format: "qcow2".into(), note });
        }
        let state = crate::vmstate::put_back(&state).map_err(|e| incomplete(&restored, None, at(Step::State)(e)))?;
        Ok(RestoreOutcome {
            backup: format!("{vm}/{id}"),
            vm: target_vm.to_owned(),
            restored,
            state,
            notes: start.state_note.clone().into_iter().collect(),
        })
    }

    /// Every file of every disk's chain checked (qemu-img check; checksums of what is written in
    /// place, and of a chain's files), and each disk sorted: written in place (raw, block, RBD),
    /// or a qcow2 copy beside its volume (flattened when the disk is incremental).
    fn check_and_sort<'p>(
        &self,
        pairs: &[(&'p ManifestDisk, &'p Disk)],
        (dir, vm_dir): (&Path, &Path),
        (vm, id, key): (&str, &str, Option<&Key>),
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(Vec<InPlace<'p>>, Vec<Copy<'p>>), BackupError> {
        let mut in_place = Vec::new();
        let mut copies = Vec::new();
        for (b, d) in pairs {
            // An incremental disk needs every file of its chain: each checked as its own
            // backup's, then the chain read through (flattened) into a self-contained volume.
            let chain = ancestors(vm_dir, vm, id, b)?;
            let shown = format!("{vm}/{id}");
            // A compressed or encrypted file is read through qemu-img into a plain volume, never
            // copied as it is stored.
            // An encrypted VM disk gets its volume back encrypted with its own passphrase, through
            // qemu-img: its secret must be there before anything is written.
            let encrypted = crate::protect::volume_key(&self.hypervisor, d, &self.runtime_dir)?.is_some();
            let flatten = !chain.is_empty() || b.stored_as != FileFormat::Plain || encrypted;
            let target = restore_target(&self.hypervisor, d)?;
            // A chain of plain files restored as a copy is checked while it is copied
            // (restore_chain), before any volume changes.
            let copied_chain = matches!(target, RestoreTarget::Qcow2File(_)) && !encrypted && is_plain_chain(b, &chain);
            if !(flatten && copied_chain) {
                check_chain(&self.images, (dir, b), &chain, key, &shown).map_err(at(Step::Check))?;
            }
            match target {
                RestoreTarget::Qcow2File(path) => {
                    // Checked while it is copied or converted beside the volume (renamed over it
                    // only when every disk is done).
                    let mut checked: Vec<Checked> = chain;
                    if flatten {
                        checked.push((dir.to_owned(), (*b).clone()));
                    }
                    copies.push((*b, *d, path, flatten, checked));
                }
                RestoreTarget::InPlace(_) if encrypted => {
                    return Err(BackupError::Unsupported {
                        what: format!("restoring the encrypted disk {} in place", d.target),
                    });
                }
                RestoreTarget::InPlace(location) => {
                    for (parent_dir, parent) in &chain {
                        check_sum(parent_dir, parent, vm, cancel, observer).map_err(at(Step::Check))?;
                    }
                    check_sum(dir, b, vm, cancel, observer).map_err(at(Step::Check))?;
                    in_place.push((*b, *d, location));
                }
            }
        }
        Ok((in_place, copies))
    }
}

/// A disk written in place: the backup's, the VM's, where.
type InPlace<'p> = (&'p ManifestDisk, &'p Disk, ImageLocation);
/// A disk restored as a copy beside its qcow2 volume: the backup's, the VM's, the volume,
/// whether its chain is flattened, and the files checked while it is (a flattened chain's).
type Copy<'p> = (&'p ManifestDisk, &'p Disk, PathBuf, bool, Vec<Checked>);

/// Where a VM disk is restored to.
enum RestoreTarget {
    /// A qcow2 file: restored as a checked copy of the backup file beside it, renamed over it.
    Qcow2File(PathBuf),
    /// A raw file, a block device or an RBD image: written in place as raw (`convert -n`).
    InPlace(ImageLocation),
}

fn restore_target(hypervisor: &impl Hypervisor, disk: &Disk) -> Result<RestoreTarget, BackupError> {
    let location = crate::disks::keyed_location(hypervisor, disk).ok_or_else(|| BackupError::Unsupported {
        what: format!("restoring disk {} with source {:?}", disk.target, disk.source),
    })?;
    Ok(match (location, &disk.source) {
        (ImageLocation::Path(p), Some(DiskSource::File(_))) if disk.format.as_deref() == Some("qcow2") => {
            RestoreTarget::Qcow2File(p)
        }
        (location, _) => RestoreTarget::InPlace(location),
    })
}
