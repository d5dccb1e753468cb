//! Instant restore: a shut-off VM started within seconds on copy-on-write overlays over its
//! backup, while libvirt block jobs move the data onto the VM's own volumes.
//!
//! For each disk:
//! 1. the backup file (with its chain) is shown read-only as a raw file by a
//!    qemu-storage-daemon (FUSE export, in the work directory), which keeps the repository
//!    mounted for as long as it runs;
//! 2. a qcow2 overlay over that export takes the guest's writes;
//! 3. the volume is replaced by an empty image of the same format, size, owner and mode (a block
//!    device is used as it is), marked half-written on the repository;
//! 4. the domain is started with its disks on the overlays (its persistent definition is not
//!    changed), and a block copy of each disk to its volume begins: a libvirt job that goes on
//!    without nasbak.
//!
//! [`Engine::instant_finish`] waits until every copy has caught up, checks the backup files'
//! checksums, switches each disk to its volume (pivot), and removes the overlays, the exports
//! and the marks: the VM then runs on its own volumes, self-contained, with nothing left that
//! points at the repository. [`Engine::instant_cancel`] stops the VM and removes everything
//! but the marks (the volumes are partly written). The backup files are only ever read.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nasbak_libvirt::{
    BlockCopyFlags, CancelHandle, DiskEncryption, DiskSource, DiskSwap, DomainState, Hypervisor, swap_disk_sources,
};
use nasbak_qemu_img::{
    ConvertRequest, ImageFormat, ImageLocation, ImageTool, ReadOnlyExport, StoredLayout, TargetProtection,
};

use crate::export::{Overlay, nbd_socket};
use nasbak_repo::{ManifestDisk, Mounter, VmName};

use super::match_disks;
use crate::engine::{AgentSource, Engine};
use crate::error::{BackupError, Step, at};
use crate::outcome::{
    CopyState, DiskCopy, InstantCancelled, InstantDisk, InstantFinished, InstantRestore, InstantStatus, RestoredDisk,
};
use crate::progress::{Observer, Phase, Progress};
use crate::request::InstantRestoreRequest;
use crate::transfer::stage::{Staged, remove_stale_stages, stage_beside};
use crate::transfer::{
    DecodeOut, check_chain, convert_checked, copy_checked, decode_checked, is_plain_chain, restore_chain,
};
use nasbak_repo::store::VmLock;
use nasbak_repo::store::ancestors;
use nasbak_repo::store::{RESTORING_MARK, RestoringMark};

const STATE_FILE: &str = "state.json";
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// Starts the request's shut-off VM on overlays over the backup and begins the block
    /// copies onto its volumes (see the module's documentation). Returns once the VM runs;
    /// [`Engine::instant_finish`] completes the restore, [`Engine::instant_cancel`] undoes it.
    /// Every backup file passes `qemu-img check` first; their checksums are checked before the
    /// finish switches the VM to its volumes. A failure before the VM runs leaves everything
    /// as it was.
    pub fn instant_restore(
        &self,
        request: &InstantRestoreRequest,
        cancel: &CancelHandle,
    ) -> Result<InstantRestore, BackupError> {
        self.start_instant(request, cancel, None)
    }

    /// An instant restore from start to finish in one call: the VM started on its backup as
    /// [`Engine::instant_restore`] does (`on_running` is told once it runs), while the backup
    /// is already being copied beside its file volumes (from the moment every file is checked);
    /// then [`Engine::instant_finish`] with `timeout`: the copies put in place, the guest's
    /// writes mirrored, the pivot. A failure once the VM runs leaves the restore in flight, as
    /// a failed finish does.
    pub fn instant_restore_and_finish(
        &self,
        request: &InstantRestoreRequest,
        timeout: Duration,
        cancel: &CancelHandle,
        on_running: &mut dyn FnMut(&InstantRestore),
        observer: &mut dyn Observer,
    ) -> Result<InstantFinished, BackupError> {
        let (plan_tx, plan_rx) = std::sync::mpsc::channel::<InstantRestore>();
        let (progress_tx, progress_rx) = std::sync::mpsc::channel::<Progress>();
        let images = &self.images;
        // The copies stop at the caller's cancel, and when the VM could not be started.
        let stop = CancelHandle::new();
        let vm = std::thread::scope(|s| -> Result<String, BackupError> {
            let stop_copies = &stop;
            let copier = s.spawn(move || -> Result<Vec<(usize, Staged)>, BackupError> {
                let Ok(plan) = plan_rx.recv() else { return Ok(Vec::new()) };
                let mut staged = Vec::new();
                for (i, d) in plan.disks.iter().enumerate().filter(|(_, d)| d.copy_at_finish && !d.in_place()) {
                    let mut tell = |p: &Progress| {
                        if cancel.is_cancelled() {
                            stop_copies.cancel();
                        }
                        drop(progress_tx.send(p.clone()));
                    };
                    let backup = (plan.vm.as_str(), plan.backup.as_str());
                    staged.push((i, copy_beside_volume(images, d, backup, stop_copies, &mut tell)?));
                }
                Ok(staged)
            });
            let started = self.start_instant(request, cancel, Some(plan_tx));
            if started.is_err() {
                stop.cancel();
            }
            if let Ok(state) = &started {
                on_running(state);
            }
            for p in progress_rx {
                observer(&p);
            }
            let copied = copier.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let mut state = started?;
            // The VM runs on its overlays: the copies go in place of the volumes.
            for (i, mut staged) in copied? {
                put_in_place(&state.disks[i], &mut staged)?;
                state.disks[i].copied = true;
                write_state(&state)?;
            }
            Ok(state.vm)
        })?;
        self.instant_finish(&request.work_dir, &vm, timeout, cancel, observer)
    }

    /// [`Engine::instant_restore`]; with `plan_to`, the restore's record (every file checked,
    /// nothing changed yet) is sent there before the exports are made and the VM is started.
    fn start_instant(
        &self,
        request: &InstantRestoreRequest,
        cancel: &CancelHandle,
        plan_to: Option<std::sync::mpsc::Sender<InstantRestore>>,
    ) -> Result<InstantRestore, BackupError> {
        let r = &request.restore;
        let (repository, vm, id) = (&r.repository, r.vm.as_str(), r.id.as_str());
        let start = self.start_restore(r)?;
        let (mounted, dir, target_vm, xml) = (&start.mounted, &start.dir, start.target_vm, &start.xml);
        let (vm_name, target_name) = (VmName::new(vm)?, VmName::new(target_vm)?);
        let layout = mounted.layout();
        let pairs = match_disks(&start.disks, &start.domain, target_vm == vm)?;
        let _lock = VmLock::take(&layout.vm_dir(&vm_name), vm)?;
        let work = request.work_dir.join(target_name.as_str());
        make_private_dir(&request.work_dir)?;
        match fs::create_dir(&work) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(BackupError::InFlight { vm: target_vm.to_owned(), dir: work });
            }
            Err(source) => return Err(BackupError::Io { action: "creating", path: work, source }),
        }
        let mut undo =
            Undo { hypervisor: &self.hypervisor, vm: target_vm, dir: work.clone(), started: false, armed: true };
        // An encrypted backup is read with the repository's key: checked before anything changes.
        let encrypted = pairs.iter().any(|(b, _)| b.stored_as.is_encrypted())
            || start.state.iter().any(|(s, _)| s.stored_as.is_encrypted());
        let key = match encrypted {
            true => crate::protect::resolve_key(&self.hypervisor, repository.protection(), &self.runtime_dir)?,
            false => None,
        };
        // Every file of every chain checked before anything changes.
        let mut plan = self.plan_disks(&pairs, (dir, &layout.vm_dir(&vm_name)), (vm, id, key.as_ref()), &work)?;
        // A volume that is itself encrypted: its passphrase (from its libvirt secret, which must
        // be readable) for its overlay and its new image, held until both are made.
        let mut volume_keys = HashMap::new();
        for (_, d) in &pairs {
            if let Some(k) = crate::protect::volume_key(&self.hypervisor, d, &self.runtime_dir)? {
                volume_keys.insert(d.target.clone(), k);
            }
        }
        // The VM's NVRAM and TPM state from the backup, checked now, put in the VM's own places
        // (copies: the backup is never written) just before it starts.
        let mut kept_state = Vec::new();
        for (s, place) in &start.state {
            let bytes =
                crate::vmstate::read_state(&self.images, dir, s, key.as_ref(), cancel).map_err(at(Step::Check))?;
            kept_state.push((s.clone(), place.clone(), bytes));
        }
        // The finish copies the backup onto each volume in one pass and mirrors only what the
        // guest wrote; an encrypted backup (its key is not kept for the finish), and a restore
        // with a bandwidth limit (libvirt's limits the whole copy), and a volume that is itself
        // encrypted (QEMU encrypts what it copies), keep a block copy of the whole disk from the
        // start.
        for d in &mut plan {
            d.copy_at_finish = key.is_none() && request.bandwidth.is_none() && !d.encrypted;
        }
        let mut state = InstantRestore {
            vm: target_vm.to_owned(),
            backup: format!("{}:{vm}/{id}", repository.name()),
            repository: repository.name().to_string(),
            started: self.clock.now(),
            dir: work.clone(),
            marks: layout.vm_dir(&target_name),
            disks: Vec::new(),
        };
        // The copies may start now: every file is checked, nothing changed yet. (Started only
        // as the VM starts, they cost the total more than they gain the start: measured.)
        if let Some(to) = plan_to {
            let _ = to.send(InstantRestore { disks: plan.clone(), ..state.clone() });
        }
        let mut sizes = Vec::new();
        for (disk, (b, _)) in plan.into_iter().zip(&pairs) {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            // Recorded first, so that an undo finds its export.
            state.disks.push(disk.clone());
            write_state(&state)?;
            let source =
                crate::protect::disk_image(&disk.files[0].0, b, &disk.files[1..], key.as_ref(), &state.backup)?;
            let over = Overlay {
                source: &source,
                size: b.virtual_size,
                socket: &disk.export,
                file: &disk.overlay,
                key: volume_keys.get(&disk.target).map(|k| k.path()),
            };
            let size = over
                .make(&self.images, mounted.registration())
                .map_err(at(Step::Restore { disk: disk.target.clone() }))?;
            sizes.push(size);
        }
        let swaps: Vec<DiskSwap> = state
            .disks
            .iter()
            .zip(&pairs)
            .map(|(d, (_, defined))| DiskSwap {
                target: d.target.clone(),
                source: DiskSource::File(d.overlay.clone()),
                format: "qcow2".into(),
                // The overlay of an encrypted volume is encrypted with the volume's secret.
                encryption: defined.encryption.clone().filter(|_| d.encrypted),
            })
            .collect();
        let live = swap_disk_sources(xml, &swaps)?;
        if !kept_state.is_empty() {
            // The VM's own set aside first: a cancel or a failure gives them back.
            crate::vmstate::set_aside(&start.state, &work).map_err(at(Step::State))?;
            crate::vmstate::put_back(&kept_state).map_err(at(Step::State))?;
        }
        self.hypervisor.start_with_xml(&live).map_err(|e| at(Step::Start)(e.into()))?;
        undo.started = true;
        // The VM runs on the overlays; only now do its volumes change, each marked half-written
        // on the repository until the finish.
        self.start_copies(&state, &sizes, &format!("{vm}/{id}"), request.bandwidth, &volume_keys)?;
        // The daemons hold the repository now; the marks stay until the finish.
        undo.armed = false;
        Ok(state)
    }

    /// What each disk of an instant restore will be (its volume, overlay, export and the files
    /// of its chain), every file of every chain checked first: `dir` is the backup's directory,
    /// `vm_dir` the VM's on the repository, `work` the restore's own directory.
    fn plan_disks(
        &self,
        pairs: &[(&ManifestDisk, &nasbak_libvirt::Disk)],
        (dir, vm_dir): (&Path, &Path),
        (vm, id, key): (&str, &str, Option<&crate::protect::Key>),
        work: &Path,
    ) -> Result<Vec<InstantDisk>, BackupError> {
        let mut plan = Vec::new();
        for (b, d) in pairs {
            let (volume, block, rbd) = match &d.source {
                Some(DiskSource::File(p)) => (p.clone(), false, None),
                Some(DiskSource::Block(p)) => (p.clone(), true, None),
                // An RBD image: written in place, reached as the domain reaches it.
                Some(DiskSource::Network { protocol, name: Some(name), .. }) if protocol == "rbd" => {
                    (PathBuf::from(format!("rbd:{name}")), false, Some(name.clone()))
                }
                other => {
                    return Err(BackupError::Unsupported {
                        what: format!(
                            "an instant restore of disk {} ({other:?}); restore it without --instant",
                            d.target
                        ),
                    });
                }
            };
            // An encrypted volume gets a new image of its own kind beside it; a block device or
            // an RBD image would be written in place, which its encryption does not allow here.
            if d.encryption.is_some() && (block || rbd.is_some()) {
                return Err(BackupError::Unsupported {
                    what: format!(
                        "an instant restore of the encrypted disk {} in place ({}); restore it without --instant",
                        d.target,
                        volume.display()
                    ),
                });
            }
            let chain = ancestors(vm_dir, vm, id, b)?;
            check_chain(&self.images, (dir, b), &chain, key, &format!("{vm}/{id}")).map_err(at(Step::Check))?;
            let mut files = vec![(dir.to_owned(), (*b).clone())];
            files.extend(chain);
            let format = d.format.clone().unwrap_or_else(|| "raw".into());
            if !matches!(format.as_str(), "qcow2" | "raw") {
                return Err(BackupError::Unsupported {
                    what: format!("an instant restore into a {format} volume ({})", volume.display()),
                });
            }
            plan.push(InstantDisk {
                target: d.target.clone(),
                overlay: work.join(format!("{}.overlay.qcow2", d.target)),
                export: nbd_socket(&self.runtime_dir)?,
                volume,
                block,
                rbd,
                format,
                files,
                copy_at_finish: false,
                copied: false,
                encrypted: d.encryption.is_some(),
            });
        }
        Ok(plan)
    }

    /// Each volume of the running VM marked half-written on the repository (`backup` is
    /// `VM/ID`); unless the finish copies it, emptied (a file volume) and given a libvirt block
    /// copy from the VM's overlay.
    /// An encrypted volume's new image is encrypted with its passphrase (`volume_keys`, by
    /// target), and its block copy writes through QEMU's encryption.
    fn start_copies(
        &self,
        state: &InstantRestore,
        sizes: &[u64],
        backup: &str,
        bandwidth: Option<u64>,
        volume_keys: &HashMap<String, crate::protect::Key>,
    ) -> Result<(), BackupError> {
        for (disk, size) in state.disks.iter().zip(sizes) {
            let step = || Step::Restore { disk: disk.target.clone() };
            let mark = RestoringMark::write(
                &state.marks,
                &disk.target,
                &disk.volume.to_string_lossy(),
                backup,
                self.clock.now(),
            )?;
            if disk.copy_at_finish {
                continue;
            }
            if !disk.in_place()
                && let Err(e) = self.empty_volume(disk, *size, volume_keys.get(&disk.target))
            {
                mark.done(); // the volume was not replaced
                return Err(at(step())(e));
            }
            if disk.rbd.is_some() {
                self.rbd_volume(&state.vm, disk, *size).map_err(at(step()))?;
            }
            let volume = self.volume_source(&state.vm, disk)?;
            let encryption = self.volume_encryption(&state.vm, disk)?;
            let dest = nasbak_libvirt::disk_copy_destination_xml(&volume, &disk.format, encryption.as_ref())?;
            let flags = BlockCopyFlags { reuse_external: true, shallow: false, bandwidth };
            self.hypervisor.block_copy(&state.vm, &disk.target, &dest, flags).map_err(|e| at(step())(e.into()))?;
        }
        Ok(())
    }

    /// Where the block copy of `disk` goes: its file or block device, or its RBD image as the
    /// domain `vm`'s definition reaches it (monitors, `<auth>`).
    fn volume_source(&self, vm: &str, disk: &InstantDisk) -> Result<DiskSource, BackupError> {
        if disk.rbd.is_none() {
            return Ok(if disk.block {
                DiskSource::Block(disk.volume.clone())
            } else {
                DiskSource::File(disk.volume.clone())
            });
        }
        self.defined_disk(vm, &disk.target)?.source.ok_or_else(|| BackupError::Unsupported {
            what: format!("an instant restore of disk {} whose defined source is gone", disk.target),
        })
    }

    /// The encryption of an encrypted disk's volume, as the domain `vm` defines it (its secret);
    /// `None` for a plain one. One that lost it since is an error: its copy would be plaintext.
    fn volume_encryption(&self, vm: &str, disk: &InstantDisk) -> Result<Option<DiskEncryption>, BackupError> {
        if !disk.encrypted {
            return Ok(None);
        }
        match self.defined_disk(vm, &disk.target)?.encryption {
            Some(e) => Ok(Some(e)),
            None => Err(BackupError::Unsupported {
                what: format!(
                    "copying onto the encrypted volume of disk {} of {vm}, whose definition no longer names its encryption",
                    disk.target
                ),
            }),
        }
    }

    /// Disk `target` of the domain `vm` as it is defined (not as it runs on its overlays).
    fn defined_disk(&self, vm: &str, target: &str) -> Result<nasbak_libvirt::Disk, BackupError> {
        let xml = self.hypervisor.inactive_xml(vm)?;
        nasbak_libvirt::Domain::parse(&xml)?.disks.into_iter().find(|d| d.target == target).ok_or_else(|| {
            BackupError::Unsupported { what: format!("an instant restore of disk {target}, which {vm} no longer has") }
        })
    }

    /// The RBD image of `disk` (of the domain `vm`), with the key the domain's secret holds;
    /// created (raw, `size` bytes) when it is gone, so that the restore brings it back.
    fn rbd_volume(&self, vm: &str, disk: &InstantDisk, size: u64) -> Result<ImageLocation, BackupError> {
        let location = crate::disks::keyed_source(&self.hypervisor, &self.defined_disk(vm, &disk.target)?)?;
        if let ImageLocation::Rbd(spec) = &location
            && self.images.rbd_image(spec).is_err()
        {
            self.images.create(&location, &ImageFormat::Raw, size)?;
        }
        Ok(location)
    }

    /// Replaces a file volume by an empty image of its format and size, with its owner and mode
    /// (made beside it, then renamed over it); an encrypted volume's encrypted again with its
    /// passphrase (`volume_key`).
    fn empty_volume(
        &self,
        disk: &InstantDisk,
        size: u64,
        volume_key: Option<&crate::protect::Key>,
    ) -> Result<(), BackupError> {
        let meta = fs::metadata(&disk.volume).map_err(|source| BackupError::Io {
            action: "reading",
            path: disk.volume.clone(),
            source,
        })?;
        let staged = stage_beside(&disk.volume)?;
        let _ = fs::remove_file(&staged);
        let format: ImageFormat = disk.format.parse().unwrap_or(ImageFormat::Raw);
        let result = (|| {
            match (disk.encrypted, volume_key) {
                (false, _) => self.images.create(&ImageLocation::Path(staged.clone()), &format, size)?,
                (true, Some(key)) => {
                    let luks = TargetProtection::new(StoredLayout::Qcow2Luks, false, Some(key.path().to_owned()));
                    self.images.create_protected(&staged, size, None, &luks)?;
                }
                (true, None) => {
                    return Err(BackupError::Unsupported {
                        what: format!("making the encrypted volume of disk {} without its passphrase", disk.target),
                    });
                }
            }
            let io = |source| BackupError::Io { action: "setting the owner and mode of", path: staged.clone(), source };
            std::os::unix::fs::chown(&staged, Some(meta.uid()), Some(meta.gid())).map_err(io)?;
            fs::set_permissions(&staged, fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(io)?;
            fs::rename(&staged, &disk.volume).map_err(|source| BackupError::Io {
                action: "replacing",
                path: disk.volume.clone(),
                source,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result
    }

    /// The instant restores in flight under `work_dir`, with where their copies stand.
    pub fn instant_restores(&self, work_dir: &Path) -> Result<Vec<InstantStatus>, BackupError> {
        let mut all = Vec::new();
        let Ok(entries) = fs::read_dir(work_dir) else { return Ok(all) };
        let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for name in names {
            if let Some(state) = read_state(&work_dir.join(&name)) {
                all.push(self.status_of(state));
            }
        }
        Ok(all)
    }

    fn status_of(&self, restore: InstantRestore) -> InstantStatus {
        // A listing answers within the cleanup budget per VM, whatever its QEMU does: a copy
        // libvirt does not report in time is shown as unknown.
        let _scope = nasbak_libvirt::deadline::scope(Instant::now() + nasbak_libvirt::deadline::CLEANUP_BUDGET);
        let running = self.hypervisor.domain_state(&restore.vm).is_ok_and(|s| s == DomainState::Running);
        let disks = restore
            .disks
            .iter()
            .map(|d| {
                let state = match self.copy_state(&restore.vm, &d.target) {
                    Ok(CopyState::Gone) if d.copy_at_finish && running => CopyState::Pending,
                    Ok(state) => state,
                    Err(e) => CopyState::Unknown { error: e.message },
                };
                DiskCopy { target: d.target.clone(), state }
            })
            .collect();
        InstantStatus { restore, running, disks }
    }

    /// Where the block copy of `vm`'s disk `target` stands; an error when libvirt does not say.
    fn copy_state(&self, vm: &str, target: &str) -> Result<CopyState, nasbak_libvirt::LibvirtError> {
        match self.hypervisor.block_job(vm, target) {
            Ok(Some(j)) if j.ready() => Ok(CopyState::Ready { total: j.end }),
            Ok(Some(j)) => Ok(CopyState::Copying { done: j.cur, total: j.end }),
            Ok(None) => Ok(CopyState::Gone),
            Err(e) if e.is_no_domain() => Ok(CopyState::Gone),
            Err(e) => Err(e),
        }
    }

    /// Waits (up to `timeout`) until every block copy of `vm`'s instant restore has caught up,
    /// checks the backup files' checksums (while the copies run), then switches each disk to
    /// its volume and removes the overlays, the exports, the marks and the state. A cancel or
    /// timeout while waiting leaves the restore in flight (the copies go on); a copy that is
    /// gone, or a checksum that differs, fails with the restore left in flight, to be
    /// cancelled.
    pub fn instant_finish(
        &self,
        work_dir: &Path,
        vm: &str,
        timeout: Duration,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<InstantFinished, BackupError> {
        let name = VmName::new(vm)?;
        let mut state = read_state(&work_dir.join(name.as_str()))
            .ok_or_else(|| BackupError::NotFound { what: format!("an instant restore of {vm} in flight") })?;
        let deadline = Instant::now() + timeout;
        // Every libvirt call of the copy and the wait ends by the timeout, whatever QEMU does.
        let waiting = nasbak_libvirt::deadline::scope(deadline);
        // The volumes the finish writes: the backup copied on, then the guest's writes mirrored.
        self.copy_onto_volumes(&mut state, cancel, observer)?;
        let state = state;
        let sums_cancel = CancelHandle::new();
        let verified = std::thread::scope(|scope| {
            let sums = scope.spawn(|| -> Result<(), BackupError> {
                // A copy made by the finish checked its files' checksums as it read them.
                for disk in state.disks.iter().filter(|d| !d.copy_at_finish) {
                    for (dir, file) in &disk.files {
                        crate::transfer::check_sum(dir, file, vm, &sums_cancel, &mut |_| {})?;
                    }
                }
                Ok(())
            });
            let waited = self.wait_ready(&state, deadline, cancel, observer);
            if waited.is_err() {
                sums_cancel.cancel();
            }
            let sums = sums.join().unwrap_or(Err(BackupError::Cancelled));
            waited.and(sums.map_err(at(Step::Check)))
        });
        verified?;
        drop(waiting);
        // Every copy caught up: the switch gets the cleanup budget (a pivot left half done
        // would leave the restore neither in flight nor finished).
        let _switch = nasbak_libvirt::deadline::scope(Instant::now() + nasbak_libvirt::deadline::CLEANUP_BUDGET);
        let settle = Instant::now() + PIVOT_SETTLE;
        for disk in &state.disks {
            // The cursor can reach the end a moment before libvirt marks the mirror ready (a
            // small copy, under load): "not ready for pivot yet" is waited out, briefly.
            loop {
                match self.hypervisor.block_job_end(vm, &disk.target, true) {
                    Ok(()) => break,
                    Err(e) if e.message.contains("not ready for pivot") && Instant::now() < settle => {
                        cancel.sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(at(Step::Restore { disk: disk.target.clone() })(e.into())),
                }
            }
        }
        let live = self.hypervisor.domain_xml(vm).map_err(|e| at(Step::Inspect)(e.into()))?;
        if live.contains(&*state.dir.to_string_lossy())
            || state.disks.iter().any(|d| live.contains(&*d.export.to_string_lossy()))
        {
            return Err(BackupError::Unsupported {
                what: format!("{vm} still reads from {} after the pivot", state.dir.display()),
            });
        }
        let restored = state
            .disks
            .iter()
            .map(|d| RestoredDisk {
                target: d.target.clone(),
                location: d.volume.display().to_string(),
                format: d.format.clone(),
                note: None,
            })
            .collect();
        remove_files(&state)?;
        for d in &state.disks {
            let _ = fs::remove_file(state.marks.join(format!("{RESTORING_MARK}{}", d.target)));
        }
        // Finished: the VM keeps the backup's NVRAM and TPM state.
        crate::vmstate::discard_aside(&state.dir);
        let _ = fs::remove_file(state.dir.join(STATE_FILE));
        let _ = fs::remove_dir(&state.dir);
        let _ = self.mounts.unmount_if_unused(&state.repository);
        Ok(InstantFinished { backup: state.backup, vm: vm.to_owned(), restored })
    }

    /// For each disk the finish writes ([`InstantDisk::copy_at_finish`]) whose mirror has not
    /// begun: the backup written onto its volume (unless an interrupted finish did), then a
    /// shallow block copy from the overlay (the guest's writes only) into it.
    fn copy_onto_volumes(
        &self,
        state: &mut InstantRestore,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let vm = state.vm.clone();
        for i in 0..state.disks.len() {
            let d = state.disks[i].clone();
            let step = || Step::Restore { disk: d.target.clone() };
            if !d.copy_at_finish || matches!(self.hypervisor.block_job(&vm, &d.target), Ok(Some(_))) {
                continue;
            }
            // A VM that stopped (crashed, destroyed) took the guest's writes with it: nothing is
            // copied over its volume; the restore can only be cancelled.
            if !self.hypervisor.domain_state(&vm).is_ok_and(|s| s == DomainState::Running) {
                return Err(BackupError::CopyGone { vm: vm.clone(), disk: d.target.clone() });
            }
            if !d.copied {
                self.copy_onto_volume(&d, (&vm, &state.backup), cancel, observer).map_err(at(step()))?;
                state.disks[i].copied = true;
                write_state(state)?;
            }
            let volume = self.volume_source(&vm, &d)?;
            let encryption = self.volume_encryption(&vm, &d)?;
            let dest = nasbak_libvirt::disk_copy_destination_xml(&volume, &d.format, encryption.as_ref())?;
            let flags = BlockCopyFlags { reuse_external: true, shallow: true, bandwidth: None };
            self.hypervisor.block_copy(&vm, &d.target, &dest, flags).map_err(|e| {
                if e.is_past_deadline() {
                    return BackupError::TimedOut { what: format!("starting the mirror of {vm}'s disk {}", d.target) };
                }
                let what = format!("the mirror of {vm}'s disk {} (the restore stays in flight)", d.target);
                at(step())(BackupError::Unanswered { what, source: e })
            })?;
        }
        Ok(())
    }

    /// The backup of `d` written onto its volume, every file's checksum checked as it is read:
    /// a file volume through [`copy_beside_volume`] and [`put_in_place`]; a block
    /// device written in place (it is marked half-written on the repository).
    fn copy_onto_volume(
        &self,
        d: &InstantDisk,
        (vm, backup): (&str, &str),
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        if d.in_place() {
            let (dir, top) = &d.files[0];
            let source = crate::protect::disk_image(dir, top, &d.files[1..], None, backup)?;
            let target = match &d.rbd {
                Some(_) => self.rbd_volume(vm, d, top.virtual_size)?,
                None => ImageLocation::Path(d.volume.clone()),
            };
            // A compressed backup: decoded in place on every core.
            if let ImageLocation::Path(p) = &target
                && decode_checked((&d.files, None), (p, DecodeOut::InPlace), (vm, &d.target, backup), cancel, observer)?
            {
                return Ok(());
            }
            let mut r = ConvertRequest::new(source, target, ImageFormat::Raw);
            r.source_format = Some(ImageFormat::Qcow2);
            r.target_exists = true;
            return convert_checked(&self.images, (r, &d.files), cancel, (vm, &d.target, top.virtual_size), observer);
        }
        let mut staged = copy_beside_volume(&self.images, d, (vm, backup), cancel, observer)?;
        put_in_place(d, &mut staged)
    }

    fn wait_ready(
        &self,
        state: &InstantRestore,
        deadline: Instant,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        loop {
            let (mut done, mut total, mut ready) = (0, 0, true);
            for d in &state.disks {
                let copy = self.copy_state(&state.vm, &d.target).map_err(|e| {
                    if e.is_past_deadline() {
                        return BackupError::TimedOut {
                            what: format!("waiting for the copies of {}'s disks", state.vm),
                        };
                    }
                    let what = format!("the copy of {}'s disk {} (the restore stays in flight)", state.vm, d.target);
                    at(Step::Restore { disk: d.target.clone() })(BackupError::Unanswered { what, source: e })
                })?;
                match copy {
                    CopyState::Ready { total: t } => (done, total) = (done + t, total + t),
                    CopyState::Copying { done: c, total: t } => {
                        (done, total, ready) = (done + c, total + t, false);
                    }
                    CopyState::Gone | CopyState::Pending | CopyState::Unknown { .. } => {
                        return Err(BackupError::CopyGone { vm: state.vm.clone(), disk: d.target.clone() });
                    }
                }
            }
            observer(&Progress::new(Phase::Mirror, &state.vm, done, total));
            if ready {
                return Ok(());
            }
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            if Instant::now() > deadline {
                return Err(BackupError::TimedOut { what: format!("waiting for the copies of {}'s disks", state.vm) });
            }
            cancel.sleep(Duration::from_millis(200));
        }
    }

    /// Undoes `vm`'s instant restore: the copies abandoned, the VM stopped (what the guest
    /// wrote since it started is lost), the overlays, exports and state removed. The volumes
    /// are partly written: their marks stay on the repository until a restore rewrites them.
    pub fn instant_cancel(&self, work_dir: &Path, vm: &str) -> Result<InstantCancelled, BackupError> {
        let name = VmName::new(vm)?;
        let state = read_state(&work_dir.join(name.as_str()))
            .ok_or_else(|| BackupError::NotFound { what: format!("an instant restore of {vm} in flight") })?;
        {
            // The VM is destroyed next whatever the copies do: abandoning them gets the
            // cleanup budget, and a QEMU that does not answer is not waited for.
            let _scope = nasbak_libvirt::deadline::scope(Instant::now() + nasbak_libvirt::deadline::CLEANUP_BUDGET);
            for d in &state.disks {
                if matches!(self.hypervisor.block_job(vm, &d.target), Ok(Some(_))) {
                    let _ = self.hypervisor.block_job_end(vm, &d.target, false);
                }
            }
        }
        if self.hypervisor.domain_state(vm).is_ok_and(|s| s != DomainState::ShutOff) {
            self.hypervisor.destroy(vm)?;
        }
        remove_files(&state)?;
        // The VM's own NVRAM and TPM state, as they were before.
        crate::vmstate::put_aside_back(&state.dir)?;
        // A volume the finish had not yet written is as it was: its mark goes.
        let untouched = |d: &&InstantDisk| d.copy_at_finish && !d.copied && !d.in_place();
        for d in state.disks.iter().filter(untouched) {
            let _ = fs::remove_file(state.marks.join(format!("{RESTORING_MARK}{}", d.target)));
        }
        let _ = fs::remove_file(state.dir.join(STATE_FILE));
        let _ = fs::remove_dir(&state.dir);
        let _ = self.mounts.unmount_if_unused(&state.repository);
        Ok(InstantCancelled {
            vm: vm.to_owned(),
            partly_written: state.disks.iter().filter(|d| !untouched(d)).map(|d| d.volume.clone()).collect(),
        })
    }
}

/// How long a pivot waits for libvirt to mark a caught-up mirror ready.
const PIVOT_SETTLE: Duration = Duration::from_secs(20);

fn make_private_dir(dir: &Path) -> Result<(), BackupError> {
    let io = |source| BackupError::Io { action: "creating", path: dir.to_owned(), source };
    fs::create_dir_all(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).map_err(io)
}

fn write_state(state: &InstantRestore) -> Result<(), BackupError> {
    let path = state.dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("the state serialises");
    nasbak_repo::store::write_atomic(&path, text.as_bytes(), 0o600).map_err(|source| BackupError::Io {
        action: "writing",
        path,
        source,
    })
}

fn read_state(dir: &Path) -> Option<InstantRestore> {
    serde_json::from_str(&fs::read_to_string(dir.join(STATE_FILE)).ok()?).ok()
}

/// Stops the exports and removes the overlays of `state` (those that exist).
fn remove_files(state: &InstantRestore) -> Result<(), BackupError> {
    for d in &state.disks {
        ReadOnlyExport::stop_at(&d.export, STOP_TIMEOUT)?;
        let _ = fs::remove_file(&d.export);
        let _ = fs::remove_file(&d.overlay);
    }
    Ok(())
}

/// The backup of the file volume of `d` written beside it, every file's checksum checked
/// as it is read: a full's file copied, a chain's files copied and committed, a compressed
/// file or a raw volume converted. Removed on drop unless [`put_in_place`] renamed it.
fn copy_beside_volume<I: ImageTool + Sync>(
    images: &I,
    d: &InstantDisk,
    (vm, backup): (&str, &str),
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<Staged, BackupError> {
    let (dir, top) = &d.files[0];
    let chain = &d.files[1..];
    let format: ImageFormat = d.format.parse().unwrap_or(ImageFormat::Raw);
    remove_stale_stages(&d.volume);
    let staged = Staged(vec![stage_beside(&d.volume)?]);
    let tmp = &staged.0[0];
    let plain = is_plain_chain(top, chain);
    if format == ImageFormat::Qcow2 && plain && chain.is_empty() {
        copy_checked(dir, top, tmp, vm, &d.target, cancel, observer)?;
    } else if format == ImageFormat::Qcow2 && plain {
        // Checked when the restore began (a second round of checks would slow the VM's start).
        restore_chain(images, (dir, top, chain, None), tmp, (vm, &d.target), cancel, observer)?;
    } else {
        let _ = fs::remove_file(tmp);
        let source = crate::protect::disk_image(dir, top, chain, None, backup)?;
        // A compressed backup into a qcow2 volume: decoded on every core.
        let decoded = format == ImageFormat::Qcow2
            && decode_checked((&d.files, None), (tmp, DecodeOut::Qcow2), (vm, &d.target, backup), cancel, observer)?;
        if !decoded {
            let mut r = ConvertRequest::new(source, ImageLocation::Path(tmp.clone()), format);
            r.source_format = Some(ImageFormat::Qcow2);
            convert_checked(images, (r, &d.files), cancel, (vm, &d.target, top.virtual_size), observer)?;
        }
    }
    Ok(staged)
}

/// The copy `staged` (from [`copy_beside_volume`]) given the owner and mode of the
/// volume of `d` and renamed over it.
fn put_in_place(d: &InstantDisk, staged: &mut Staged) -> Result<(), BackupError> {
    let tmp = staged.0[0].clone();
    let meta = fs::metadata(&d.volume).map_err(|source| BackupError::Io {
        action: "reading",
        path: d.volume.clone(),
        source,
    })?;
    let io = |source| BackupError::Io { action: "setting the owner and mode of", path: tmp.clone(), source };
    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid())).map_err(io)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(io)?;
    fs::rename(&tmp, &d.volume).map_err(|source| BackupError::Io {
        action: "replacing",
        path: d.volume.clone(),
        source,
    })?;
    staged.0.clear();
    Ok(())
}

/// Undoes an instant restore that failed before it was handed over: the VM stopped if it was
/// started, the exports, overlays and state removed; the marks of volumes already emptied stay
/// (those volumes must be restored again).
struct Undo<'a, H: Hypervisor> {
    hypervisor: &'a H,
    vm: &'a str,
    dir: PathBuf,
    started: bool,
    armed: bool,
}

impl<H: Hypervisor> Drop for Undo<'_, H> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.started {
            let _ = self.hypervisor.destroy(self.vm);
        }
        let _ = crate::vmstate::put_aside_back(&self.dir);
        if let Some(state) = read_state(&self.dir) {
            let _ = remove_files(&state);
        }
        // Exports and overlays made before the state recorded them.
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let _ = ReadOnlyExport::stop_at(&e.path(), STOP_TIMEOUT);
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}
