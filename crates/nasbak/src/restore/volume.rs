//! One disk of a backup restored as a new volume (a file, a block device, an RBD image),
//! optionally attached to a VM.

use std::fs;
use std::path::Path;

use nasbak_libvirt::{CancelHandle, DiskSource, Domain, DomainState, Hypervisor, attach_bus, disk_attach_xml};
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::{BackupId, ManifestDisk, Mounter, VmName};

use crate::engine::{AgentSource, Engine};
use crate::error::{BackupError, Step, at};
use crate::outcome::{Attachment, RestoredVolume};
use crate::progress::Observer;
use crate::protect::{disk_image, resolve_key};
use crate::request::VolumeRestoreRequest;
use crate::store::backup_disks;
use crate::transfer::stage::{Staged, stage_beside};
use crate::transfer::{
    Checked, DecodeOut, check_chain, check_sum, convert, convert_checked, copy_checked, decode_checked, is_plain_chain,
    restore_chain,
};
use nasbak_repo::store::VmLock;
use nasbak_repo::store::ancestors;

/// The VM a restored volume is attached to: its name, whether it runs, its definition.
type AttachTo = (String, bool, Domain);

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
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
        let (attach_to, is_block) = self.check_destination(request)?;
        let mounted = self.mounts.acquire(repository)?;
        let layout = mounted.layout();
        let (_, _, dir) = layout.resolve_backup(&format!("{}/{}", request.vm, request.id))?;
        // A reference-system backup of a shut-off VM saved no definition: its volumes are found
        // among the VM's disks as it is defined now, if it is.
        // Asked of libvirt only when needed.
        let defined = std::cell::OnceCell::new();
        let current = || {
            defined
                .get_or_init(|| {
                    self.hypervisor.inactive_xml(&request.vm).ok().and_then(|x| nasbak_libvirt::Domain::parse(&x).ok())
                })
                .clone()
        };
        let disks = backup_disks(&dir, &request.vm, &request.id, &current)?;
        let disk = disks.iter().find(|d| d.target == request.disk).ok_or_else(|| BackupError::NotFound {
            what: format!(
                "disk {} in backup {}/{} (it has {})",
                request.disk,
                request.vm,
                request.id,
                disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })?;
        // A new RBD image is reached the way the VM it goes to reaches its RBD disks, else the
        // way the backed-up disk was reached (its saved definition): monitors, ceph.conf, client
        // id and key. It must not exist yet.
        let mut request = request.clone();
        let template =
            rbd_template(&self.hypervisor, (attach_to.as_ref().map(|(_, _, d)| d), &current), &dir, &disk.target);
        if let (ImageLocation::Rbd(spec), Some((_, ImageLocation::Rbd(from)))) = (&mut request.to, &template) {
            if spec.id.is_none() && spec.mon_hosts.is_empty() && spec.conf.is_none() {
                spec.id.clone_from(&from.id);
                spec.mon_hosts.clone_from(&from.mon_hosts);
                spec.conf.clone_from(&from.conf);
            }
            if spec.auth == nasbak_qemu_img::RbdAuth::Default {
                spec.auth = from.auth.clone();
            }
        }
        if matches!(request.to, ImageLocation::Rbd(_)) && self.images.info(&request.to).is_ok() {
            return Err(BackupError::Exists { path: request.to.to_string().into() });
        }
        let request = &request;
        let _lock = VmLock::take(&layout.vm_dir(&vm_name), &request.vm)?;
        // An incremental disk: every file of its chain checked, the chain read through. An
        // encrypted one with the repository's key, checked before anything is read.
        let chain = ancestors(&layout.vm_dir(&vm_name), &request.vm, &request.id, disk)?;
        let key = match disk.stored_as.is_encrypted() {
            true => resolve_key(&self.hypervisor, repository.protection(), &self.runtime_dir)?,
            false => None,
        };
        let shown = format!("{}:{}/{}", repository.name(), request.vm, request.id);
        // A compressed or encrypted file is read through qemu-img, never copied as it is stored.
        let flatten = !chain.is_empty() || disk.stored_as != nasbak_repo::FileFormat::Plain;
        // (With a bandwidth, qemu-img's rate limit writes it: never copied at full speed.)
        let copy = matches!((&request.to, &request.format), (ImageLocation::Path(_), ImageFormat::Qcow2))
            && !is_block
            && request.bandwidth.is_none();
        // A chain of plain files into a new qcow2 file is checked while it is copied.
        if !(copy && flatten && is_plain_chain(disk, &chain)) {
            check_chain(&self.images, (&dir, disk), &chain, key.as_ref(), &shown).map_err(at(Step::Check))?;
        }
        let source = disk_image(&dir, disk, &chain, key.as_ref(), &shown)?;
        // Every file the conversion reads has its checksum checked: before anything is written
        // into a block device or an RBD image; while a new file is written beside its place
        // (renamed into it only when both are done); as it is copied, for a plain full.
        let staged = matches!(request.to, ImageLocation::Path(_)) && !is_block && (!copy || flatten);
        let mut checked: Vec<Checked> = chain.clone();
        if !copy || flatten {
            checked.push((dir.clone(), disk.clone()));
        }
        if !staged {
            for (d, file) in std::mem::take(&mut checked) {
                check_sum(d.as_path(), &file, &request.vm, cancel, observer).map_err(at(Step::Check))?;
            }
        }
        let (mut source_for_xml, written) = self
            .write_volume(request, (&dir, disk, source, &chain, &checked), is_block, cancel, observer)
            .map_err(at(Step::Restore { disk: disk.target.clone() }))?;
        if let (
            DiskSource::Network { hosts, auth, config, .. },
            Some((Some(DiskSource::Network { hosts: h, auth: a, config: c, .. }), _)),
        ) = (&mut source_for_xml, &template)
        {
            (*hosts, *auth, *config) = (h.clone(), a.clone(), c.clone());
        }
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

    /// The destination checked before anything is read: a format nasbak writes there, a file that
    /// does not exist yet (or a block device), not already a disk of the VM it is attached to.
    /// Returns the VM to attach to (its name, whether it runs, its definition) and whether the
    /// destination is a block device.
    fn check_destination(&self, request: &VolumeRestoreRequest) -> Result<(Option<AttachTo>, bool), BackupError> {
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
            ImageLocation::Stored(_) => {
                return Err(BackupError::Unsupported {
                    what: "restoring a volume into a compressed or encrypted qcow2 file".into(),
                });
            }
        };
        Ok((attach_to, is_block))
    }

    /// Writes the volume of [`Engine::restore_volume`]; returns its source for the domain XML
    /// and the format written.
    fn write_volume(
        &self,
        request: &VolumeRestoreRequest,
        (dir, disk, source, chain, checked): (&Path, &ManifestDisk, ImageLocation, &[Checked], &[Checked]),
        is_block: bool,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(DiskSource, ImageFormat), BackupError> {
        let vm = request.vm.as_str();
        Ok(match &request.to {
            ImageLocation::Path(p) if is_block => {
                // A compressed or encrypted backup: decoded onto the device on every core.
                let (files, key) = decode_files(dir, disk, chain, &source);
                let shown = format!("{}:{}/{}", request.repository.name(), request.vm, request.id);
                let place = (vm, disk.target.as_str(), shown.as_str());
                let decoded = request.bandwidth.is_none()
                    && decode_checked((&files, key.as_deref()), (p, DecodeOut::InPlace), place, cancel, observer)?;
                if !decoded {
                    let mut r = ConvertRequest::new(source, p.clone(), ImageFormat::Raw);
                    r.rate_limit = request.bandwidth;
                    r.source_format = Some(ImageFormat::Qcow2);
                    r.target_exists = true;
                    convert(&self.images, r, cancel, vm, &disk.target, disk.virtual_size, observer)?;
                }
                (DiskSource::Block(p.clone()), ImageFormat::Raw)
            }
            ImageLocation::Path(p)
                if request.format == ImageFormat::Qcow2
                    && is_plain_chain(disk, chain)
                    && request.bandwidth.is_none() =>
            {
                // Plain files: a full's self-contained qcow2 is copied (checked as it is
                // copied); an incremental's chain has each file read once, the full at copy speed.
                // With a bandwidth, qemu-img's rate limit below holds it instead.
                let staged = Staged(vec![stage_beside(p)?]);
                if chain.is_empty() {
                    copy_checked(dir, disk, &staged.0[0], vm, &disk.target, cancel, observer)?;
                } else {
                    let shown = format!("{}:{}/{}", request.repository.name(), request.vm, request.id);
                    let files = (dir, disk, chain, Some(shown.as_str()));
                    restore_chain(&self.images, files, &staged.0[0], (vm, &disk.target), cancel, observer)?;
                }
                fs::rename(&staged.0[0], p).map_err(|source| BackupError::Io {
                    action: "moving into place",
                    path: p.clone(),
                    source,
                })?;
                (DiskSource::File(p.clone()), ImageFormat::Qcow2)
            }
            ImageLocation::Path(p) => {
                // A compressed or encrypted backup into a new qcow2 or raw file: decoded on every
                // core, each file's checksum checked as it is read. What the decoder leaves (and
                // a rate-limited restore) goes through qemu-img.
                let out = match request.format {
                    ImageFormat::Qcow2 => Some(DecodeOut::Qcow2),
                    ImageFormat::Raw => Some(DecodeOut::Raw),
                    _ => None,
                };
                let mut decoded = false;
                if let Some(out) = out.filter(|_| request.bandwidth.is_none()) {
                    let staged = Staged(vec![stage_beside(p)?]);
                    let shown = format!("{}:{}/{}", request.repository.name(), request.vm, request.id);
                    let place = (vm, disk.target.as_str(), shown.as_str());
                    let (files, key) = decode_files(dir, disk, chain, &source);
                    decoded = decode_checked((&files, key.as_deref()), (&staged.0[0], out), place, cancel, observer)?;
                    if decoded {
                        fs::rename(&staged.0[0], p).map_err(|source| BackupError::Io {
                            action: "moving into place",
                            path: p.clone(),
                            source,
                        })?;
                    }
                }
                if !decoded {
                    self.write_new_file(
                        (source, p, checked),
                        (&request.format, request.bandwidth),
                        cancel,
                        (vm, &disk.target, disk.virtual_size),
                        observer,
                    )?;
                }
                (DiskSource::File(p.clone()), request.format.clone())
            }
            ImageLocation::Rbd(spec) => {
                let mut r = ConvertRequest::new(source, request.to.clone(), ImageFormat::Raw);
                r.rate_limit = request.bandwidth;
                r.source_format = Some(ImageFormat::Qcow2);
                // qemu-img creates the image (it did not exist): a failure on the way removes it,
                // so no image is left that looks like a restored volume.
                if let Err(e) = convert(&self.images, r, cancel, vm, &disk.target, disk.virtual_size, observer) {
                    if self.images.info(&request.to).is_ok()
                        && let Err(rm) = self.images.remove_rbd(spec)
                    {
                        return Err(BackupError::Io {
                            action: "removing the half-written RBD image (remove it by hand: rbd rm)",
                            path: request.to.to_string().into(),
                            source: std::io::Error::other(format!(
                                "{}, after: {}",
                                crate::error::chain(&rm),
                                crate::error::chain(&e)
                            )),
                        });
                    }
                    return Err(e);
                }
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
            ImageLocation::Stored(_) => {
                return Err(BackupError::Unsupported {
                    what: "restoring a volume into a compressed or encrypted qcow2 file".into(),
                });
            }
        })
    }

    /// Writes a new file through `<path>.nasbak-partial` and a rename, so an interrupted restore
    /// never leaves a file that looks complete; the checksums of `checked` are checked meanwhile,
    /// and the file is renamed only when they match.
    fn write_new_file(
        &self,
        (source, path, checked): (ImageLocation, &Path, &[Checked]),
        (format, bandwidth): (&ImageFormat, Option<u64>),
        cancel: &CancelHandle,
        (vm, target, size): (&str, &str, u64),
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let tmp = stage_beside(path)?;
        let mut r = ConvertRequest::new(source, tmp.clone(), format.clone());
        r.rate_limit = bandwidth;
        r.source_format = Some(ImageFormat::Qcow2);
        if let Err(e) = convert_checked(&self.images, (r, checked), cancel, (vm, target, size), observer) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, path).map_err(|source| BackupError::Io {
            action: "moving into place",
            path: path.to_owned(),
            source,
        })
    }
}

/// The files of `disk`'s chain (its own first, then `chain`) and the key file `source` opens
/// them with, as [`decode_checked`] takes them.
fn decode_files(
    dir: &Path,
    disk: &ManifestDisk,
    chain: &[Checked],
    source: &ImageLocation,
) -> (Vec<Checked>, Option<std::path::PathBuf>) {
    let files = std::iter::once((dir.to_owned(), disk.clone())).chain(chain.iter().cloned()).collect();
    let key = match source {
        ImageLocation::Stored(image) => image.key.clone(),
        _ => None,
    };
    (files, key)
}

/// How a new RBD volume reaches the cluster: the first RBD disk of the VM it is attached to,
/// else the backed-up disk `target` in the backup's saved definition (in `dir`; without one, in
/// `current`, the backed-up VM's definition now) when it was an RBD disk, else that
/// definition's first RBD disk. Its source (monitors, authentication,
/// ceph.conf for the new `<disk>`) and its location with its key, for qemu-img to reach the
/// new image the same way.
fn rbd_template(
    hypervisor: &impl Hypervisor,
    (attach_to, current): (Option<&Domain>, &dyn Fn() -> Option<Domain>),
    dir: &Path,
    target: &str,
) -> Option<(Option<DiskSource>, ImageLocation)> {
    let is_rbd = |d: &&nasbak_libvirt::Disk| matches!(&d.source, Some(DiskSource::Network { protocol, .. }) if protocol == "rbd");
    // A reference-system backup of a shut-off VM saved no definition: the VM's own, if it is
    // defined, says how its disk was reached.
    let saved = fs::read_to_string(dir.join(nasbak_repo::model::layout::DOMAIN_CONFIG_FILE))
        .ok()
        .and_then(|xml| Domain::parse(&xml).ok())
        .or_else(current);
    let disk = match (attach_to.and_then(|d| d.disks.iter().find(is_rbd)), &saved) {
        (Some(disk), _) => disk,
        (None, Some(saved)) => saved
            .disks
            .iter()
            .filter(is_rbd)
            .find(|d| d.target == target)
            .or_else(|| saved.disks.iter().find(is_rbd))?,
        (None, None) => return None,
    };
    Some((disk.source.clone(), crate::disks::keyed_location(hypervisor, disk)?))
}
