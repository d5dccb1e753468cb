//! The backup workflow: mount, lock, check space, write into `<id>.partial`, save the domain
//! XML, copy the disks (push job or qemu-img), checksum, write the manifest, rename into place.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak_agent::{AgentTransport, GuestAgent, QuiescePolicy, quiesce};
use nasbak_libvirt::{CancelHandle, Disk, Domain, DomainState, Hypervisor, JobOptions, PushBackup, start_backup};
use nasbak_qemu_img::{
    CheckVerdict, ConvertRequest, ImageFormat, ImageInfo, ImageLocation, ImageTool, StoredImage, StoredLayout,
    WritableExport,
};
use nasbak_repo::model::layout::{DOMAIN_CONFIG_FILE, MANIFEST_FILE, PARTIAL_SUFFIX};
use nasbak_repo::store::{BackupKind, ancestors, read_backup, write_atomic};
use nasbak_repo::{
    BackupId, BackupMethod, BackupMode, BackupRef, Checksum, FileFormat, Manifest, ManifestDisk, Mounter, VmName,
};

use crate::disks::{backup_files, keyed_source, volume_of};
use crate::engine::{AgentSource, Engine};
use crate::error::{BackupError, Step, at, cancelled_or, repository_unavailable};
use crate::outcome::{BackupOutcome, SkippedDisk};
use crate::progress::{Observer, Phase, Progress};
use crate::protect::{Key, TransientSecret};
use crate::request::BackupRequest;
use crate::transfer::convert;
use crate::transfer::hash::{checksum_algorithm_for, checksum_file_observed};
use crate::watchdog::ThawWatchdog;
use nasbak_repo::store::VmLock;
use nasbak_repo::store::write_synced;

/// What a backup tells besides its manifest.
#[derive(Debug, Default)]
struct Notes {
    cleaned: Vec<String>,
    warnings: Vec<String>,
}

/// Until the backup is in place: on any way out, the checkpoint the backup created is deleted
/// (with its bitmaps) and the parent's, if this backup redefined it, forgotten again.
struct CheckpointGuard<'h, H: Hypervisor> {
    hypervisor: &'h H,
    vm: &'h str,
    created: Option<String>,
    redefined: Option<String>,
}

impl<H: Hypervisor> Drop for CheckpointGuard<'_, H> {
    fn drop(&mut self) {
        if let Some(created) = self.created.take() {
            // The backup may have failed at its deadline: undoing gets a budget of its own.
            let _scope =
                nasbak_libvirt::deadline::scope(std::time::Instant::now() + nasbak_libvirt::deadline::CLEANUP_BUDGET);
            crate::incremental::after_failure(self.hypervisor, self.vm, self.redefined.as_deref(), &created);
        }
    }
}

/// Until a shut-off VM's backup is in place: on any way out, the bitmap it added to its disks'
/// images is removed again.
struct BitmapGuard<'i, I: ImageTool> {
    images: &'i I,
    name: String,
    /// The disks (target, image) it was added to.
    files: Vec<(String, PathBuf)>,
}

impl<I: ImageTool> Drop for BitmapGuard<'_, I> {
    fn drop(&mut self) {
        for (_, file) in self.files.drain(..) {
            let _ = self.images.remove_bitmap(&file, &self.name);
        }
    }
}

/// One backup in flight: what its phases share.
struct Run<'r> {
    request: &'r BackupRequest,
    vm: &'r VmName,
    state: DomainState,
    /// The domain's definition, as saved with the backup.
    xml: &'r str,
    domain: &'r Domain,
    vm_dir: &'r Path,
    /// `<id>.partial`, where everything is written.
    partial: &'r Path,
    /// Each disk backed up, with its file's name.
    files: &'r [(&'r Disk, String)],
    /// Each disk's virtual size, by target.
    sizes: &'r HashMap<String, u64>,
    cancel: &'r CancelHandle,
    /// A failure of a step while the repository is in use: the repository's going away, if it did.
    unavailable: &'r dyn Fn(Step, BackupError) -> BackupError,
    /// How this backup's files are stored (the repository's protection).
    format: FileFormat,
    /// The repository's key, when it encrypts.
    key: Option<&'r Key>,
    /// The RBD disks read from snapshots of their images (those nasbak reaches), by target.
    rbd: &'r HashMap<String, crate::rbd::RbdDisk>,
}

/// How the disks were copied.
struct Copied {
    method: BackupMethod,
    quiesced: bool,
    note: Option<String>,
    /// The VM's NVRAM and TPM state, read with the disks.
    state: crate::vmstate::Captured,
    /// The checksums of the files nasbak wrote itself (a pull job's), by disk target, kept as
    /// they were written: not read again.
    hashed: HashMap<String, Checksum>,
}

/// What the manifest is made of beyond the run.
struct ManifestParts<'p> {
    id: &'p BackupId,
    started: chrono::DateTime<chrono::Utc>,
    copied: Copied,
    disks: Vec<ManifestDisk>,
    state: Vec<nasbak_repo::ManifestState>,
    chain: &'p crate::incremental::ChainDecision,
    created: Option<&'p str>,
}

/// A VM left half-written by an interrupted restore is refused (its disks are not the VM's).
fn refuse_half_restored(
    request: &BackupRequest,
    vm: &VmName,
    vm_dir: &Path,
    chosen: &[&Disk],
) -> Result<(), BackupError> {
    let half: Vec<_> = nasbak_repo::store::interrupted_restores(vm_dir)
        .into_iter()
        .filter(|m| chosen.iter().any(|d| d.target == m.target))
        .collect();
    if half.is_empty() {
        return Ok(());
    }
    Err(BackupError::HalfRestored {
        vm: request.vm.clone(),
        problems: half.iter().map(nasbak_repo::store::RestoringMark::describe).collect(),
        marks: half
            .iter()
            .map(|m| format!("{}:{}/{}{}", request.repository.name(), vm, nasbak_repo::store::RESTORING_MARK, m.target))
            .collect(),
    })
}

/// `manifest.json` written last (synced), then, only while the lock is still ours (a holder
/// that stalled past its lease abandons), the partial directory renamed into place and the
/// rename synced.
fn commit(run: &Run<'_>, manifest: &Manifest, lock: &VmLock, final_dir: &Path) -> Result<(), BackupError> {
    let manifest_path = run.partial.join(MANIFEST_FILE);
    write_synced(&manifest_path, manifest.to_json().as_bytes())
        .map_err(|e| (run.unavailable)(Step::Manifest, e.into()))?;
    crate::fault::point("manifest");
    lock.check(run.vm.as_str()).map_err(|e| at(Step::Commit)(e.into()))?;
    fs::rename(run.partial, final_dir)
        .map_err(io("moving the finished backup into place", final_dir))
        .map_err(|e| (run.unavailable)(Step::Commit, e))?;
    if let Ok(d) = fs::File::open(run.vm_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The description of the transient secret a backup of `vm` defines, up to its pid and `)`.
fn job_secret_prefix(vm: &str) -> String {
    format!("nasbak: the key of a backup of {vm} (pid ")
}

/// Removes the directory on drop unless disarmed: no half-written backup survives an error.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + use<> {
    let path = path.to_owned();
    move |source| BackupError::Io { action, path, source }
}

/// Each disk's `qemu-img info` (when qemu-img could open it) and virtual size, by target.
type Measured = (HashMap<String, ImageInfo>, HashMap<String, u64>);

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// Backs up one VM. See the module documentation for the steps; any failure or
    /// interruption leaves no complete-looking backup, and leftovers of earlier interrupted
    /// runs of this VM are removed first.
    pub fn backup(
        &self,
        request: &BackupRequest,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<BackupOutcome, BackupError> {
        let vm = VmName::new(&request.vm)?;
        // A key that cannot be used stops the backup before anything is asked of the VM.
        let key = crate::protect::resolve_key(&self.hypervisor, request.repository.protection(), &self.runtime_dir)?;
        // Every libvirt call of the backup ends by its timeout, whatever the VM's QEMU does.
        let _deadline = nasbak_libvirt::deadline::scope(std::time::Instant::now() + request.timeout);
        let (state, xml, domain) = self.inspect(&request.vm).map_err(at(Step::Inspect))?;
        let (chosen, skipped) = domain.backup_selection();
        if chosen.is_empty() {
            return Err(BackupError::NothingToBackUp { vm: request.vm.clone() });
        }
        let repository = request.repository.name().to_string();
        crate::protect::refuse_plaintext_of_encrypted(
            &chosen,
            request.repository.protection(),
            vm.as_str(),
            &repository,
        )?;
        let mounted = self.mounts.acquire(&request.repository)?;
        crate::fault::point("mounted");
        let layout = mounted.layout();
        let vm_dir = layout.vm_dir(&vm);
        fs::create_dir_all(&vm_dir).map_err(io("creating", &vm_dir))?;
        let _ = fs::set_permissions(&vm_dir, fs::Permissions::from_mode(0o755));
        let lock = VmLock::take(&vm_dir, vm.as_str())?;
        refuse_half_restored(request, &vm, &vm_dir, &chosen)?;
        let mut notes = Notes { cleaned: lock.takeovers().to_vec(), warnings: Vec::new() };
        let interrupted = self.clean_leftovers(request, state, &vm_dir, &chosen, &mut notes)?;
        let running = state == DomainState::Running;
        let (sources, sizes) = self.check_space(&chosen, &mounted.capacity()?.available, &request.vm, running)?;
        let (started, id) = self.next_id(&vm_dir, vm.as_str())?;
        let partial = layout.partial_dir(&vm, &id);
        fs::create_dir(&partial).map_err(io("creating", &partial))?;
        let mut cleanup = RemoveOnDrop(Some(partial.clone()));
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755)).map_err(io("opening to QEMU", &partial))?;
        fs::write(partial.join(DOMAIN_CONFIG_FILE), &xml).map_err(io("writing", &partial))?;
        let files = backup_files(&chosen);
        let rbd = match state {
            DomainState::Running | DomainState::ShutOff => {
                crate::rbd::reachable(&self.hypervisor, &self.images, &chosen)
            }
            DomainState::Other => HashMap::new(),
        };
        // A failure while the repository is in use may be the repository going away: say so.
        let unavailable = |step: Step, e: BackupError| {
            repository_unavailable(&mounted, request.repository.name().to_string(), step.clone(), at(step)(e))
        };
        let run = Run {
            request,
            vm: &vm,
            state,
            xml: &xml,
            domain: &domain,
            vm_dir: &vm_dir,
            partial: &partial,
            files: &files,
            sizes: &sizes,
            cancel,
            unavailable: &unavailable,
            format: request.repository.protection().file_format(),
            key: key.as_ref(),
            rbd: &rbd,
        };
        // Full or incremental, disk by disk; the parent's checkpoint readied in libvirt. Until
        // the backup is in place, a failure deletes the checkpoint this backup creates, and
        // removes the bitmaps a shut-off VM's disks got.
        let (mut chain, created) = self.decide_chain(&run, &id, &interrupted, &sources);
        self.keep_chain_uniform(&run, &mut chain)?;
        let mut bitmaps = self.offline_bitmaps(&run, created.clone().unwrap_or_default());
        crate::fault::point("chain-decided");
        notes.cleaned.extend(
            chain
                .removed
                .iter()
                .map(|c| format!("removed the checkpoint {c}: no backup of this VM here builds on it any more")),
        );
        let mut checkpoint_guard = CheckpointGuard {
            hypervisor: &self.hypervisor,
            vm: &request.vm,
            created: created.clone(),
            redefined: chain.redefined.then(|| chain.from.clone()).flatten(),
        };
        // The RBD snapshots this backup takes; removed again unless it is put in place.
        let mut snapshots = crate::rbd::Snapshots::new(&self.images, crate::incremental::checkpoint_name(&id));
        let copied = self.copy_disks(&run, &mut chain, (created.as_deref(), &mut snapshots), &mut notes, observer)?;
        crate::fault::point("checksum");
        let disks = self.checksum_disks(&run, (&chain.plan, &copied.hashed), &snapshots, observer)?;
        let state =
            crate::vmstate::write_state(&self.images, &copied.state, &partial, (run.format, key.as_ref()), cancel)
                .map_err(|e| (run.unavailable)(Step::State, e))?;
        let parts =
            ManifestParts { id: &id, started, copied, disks, state, chain: &chain, created: created.as_deref() };
        let manifest = self.manifest(&run, parts, &bitmaps);
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let final_dir = layout.backup_dir(&vm, &id);
        commit(&run, &manifest, &lock, &final_dir)?;
        // In place: nothing is undone any more. The parent's checkpoint goes (with its bitmaps),
        // this one's record is forgotten (its bitmaps stay for the next incremental).
        cleanup.0 = None;
        checkpoint_guard.created = None;
        checkpoint_guard.redefined = None;
        bitmaps.files.clear();
        snapshots.keep();
        self.after_commit(&run, &chain, created.as_deref());
        notes.cleaned.extend(crate::rbd::remove_older(&self.images, &rbd, &vm_dir, &interrupted, &snapshots.name));
        crate::fault::point("renamed");
        let relative_dir = final_dir.strip_prefix(layout.root()).unwrap_or(&final_dir).to_owned();
        let skipped =
            skipped.into_iter().map(|s| SkippedDisk { target: s.target, reason: s.reason.to_owned() }).collect();
        let id = BackupRef::new(Some(request.repository.name().clone()), vm, id);
        Ok(BackupOutcome { id, manifest, relative_dir, skipped, cleaned: notes.cleaned, warnings: notes.warnings })
    }

    /// The VM's state, its definition as libvirt gives it, and that definition parsed.
    fn inspect(&self, vm: &str) -> Result<(DomainState, String, Domain), BackupError> {
        let state = self.hypervisor.domain_state(vm)?;
        let xml = self.hypervisor.domain_xml(vm)?;
        let domain = Domain::parse(&xml)?;
        Ok((state, xml, domain))
    }

    /// What interrupted runs left, cleaned holding the VM's lock: a push job still writing into
    /// a `.partial` directory, the `.partial` directories, a merge half done, and the bitmaps of
    /// checkpoints whose backups were deleted. Returns the removed `.partial` directories (their
    /// checkpoints are stale).
    fn clean_leftovers(
        &self,
        request: &BackupRequest,
        state: DomainState,
        vm_dir: &Path,
        chosen: &[&Disk],
        notes: &mut Notes,
    ) -> Result<Vec<String>, BackupError> {
        let running = state == DomainState::Running;
        if running && self.abort_orphaned_job(&request.vm, vm_dir)? {
            notes.cleaned.push(format!("aborted the backup job of {} left running by an interrupted run", request.vm));
        }
        // A killed backup's transient key secret, whatever state the VM is in now.
        if request.repository.protection().encryption() == nasbak_repo::Encryption::Luks {
            notes.cleaned.extend(self.remove_leaked_secrets(&request.vm));
        }
        let interrupted = nasbak_repo::store::clean_partials(vm_dir);
        notes.cleaned.extend(interrupted.iter().map(|p| format!("removed the unfinished backup {p}")));
        notes.cleaned.extend(
            nasbak_repo::store::finish_merges(vm_dir)
                .iter()
                .map(|b| format!("completed the merge of backup {b}, which an interrupted prune had left")),
        );
        // Checkpoints of backups deleted or pruned here since the last backup: their bitmaps go.
        notes.cleaned.extend(
            crate::incremental::remove_retired(&self.hypervisor, &self.images, &request.vm, running, chosen, vm_dir)
                .iter()
                .map(|c| format!("removed the bitmaps of checkpoint {c}, whose backup was deleted")),
        );
        Ok(interrupted)
    }

    /// The transient secrets a killed backup of `vm` left in libvirt (see `encrypted_targets`):
    /// those whose process is gone are undefined. Said, never an error: a secret nobody can read
    /// back is no danger, only clutter.
    fn remove_leaked_secrets(&self, vm: &str) -> Vec<String> {
        crate::protect::remove_leaked_secrets(&self.hypervisor, &job_secret_prefix(vm))
            .into_iter()
            .map(|uuid| {
                format!("removed the transient key secret {uuid} an interrupted backup of {vm} left in libvirt")
            })
            .collect()
    }

    /// Now (by the engine's clock), and the id of a backup made now: after every backup of that
    /// second in `vm_dir`, finished or not, and after the last id this host gave the VM in any
    /// repository (kept under the runtime directory). The checkpoint a backup creates, and its
    /// bitmaps in the VM's images, are named after the id: two repositories' backups of one VM
    /// in the same second must not name theirs alike.
    fn next_id(&self, vm_dir: &Path, vm: &str) -> Result<(chrono::DateTime<chrono::Utc>, BackupId), BackupError> {
        let started = self.clock.now();
        let mut existing: Vec<BackupId> = fs::read_dir(vm_dir)
            .map_err(io("listing", vm_dir))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.trim_end_matches(PARTIAL_SUFFIX).parse().ok()))
            .collect();
        let record = self.runtime_dir.join("last-ids").join(vm);
        existing.extend(fs::read_to_string(&record).ok().and_then(|t| t.trim().parse::<BackupId>().ok()));
        let id = BackupId::next_after(started, &existing);
        let dir = self.runtime_dir.join("last-ids");
        fs::create_dir_all(&dir)
            .and_then(|()| write_atomic(&record, id.to_string().as_bytes(), 0o644))
            .map_err(io("recording the backup id in", &dir))?;
        Ok((started, id))
    }

    /// Full or incremental, disk by disk (see `incremental`), and the checkpoint this backup
    /// creates.
    fn decide_chain(
        &self,
        run: &Run<'_>,
        id: &BackupId,
        interrupted: &[String],
        sources: &HashMap<String, ImageInfo>,
    ) -> (crate::incremental::ChainDecision, Option<String>) {
        let chain = match run.state {
            DomainState::Running => crate::incremental::decide(
                &self.hypervisor,
                &self.images,
                run.request,
                run.vm_dir,
                interrupted,
                (run.files, run.rbd),
                run.sizes,
            ),
            _ => crate::incremental::decide_stopped(
                &self.images,
                run.request,
                run.vm_dir,
                interrupted,
                (run.files, run.rbd),
                sources,
            ),
        };
        (chain, Some(crate::incremental::checkpoint_name(id)))
    }

    /// A chain is stored one way. An incremental on a parent whose files are stored otherwise
    /// than the repository now asks (its protection changed) starts a new chain with a full,
    /// the reason recorded. An encrypted parent must open with the repository's key, file by
    /// file down to its full: if it does not, the backup stops here, before any data moves.
    fn keep_chain_uniform(
        &self,
        run: &Run<'_>,
        chain: &mut crate::incremental::ChainDecision,
    ) -> Result<(), BackupError> {
        let Some(parent) = chain.plan.parent.clone().filter(|_| chain.plan.mode == BackupMode::Incremental) else {
            return Ok(());
        };
        let dir = run.vm_dir.join(&parent);
        let Some(BackupKind::Nasbak(m)) = read_backup("", &run.request.vm, &parent, &dir).map(|e| e.kind) else {
            return Ok(());
        };
        if let Some(other) = m.disks.iter().map(|d| d.stored_as).find(|f| *f != run.format) {
            chain.plan = chain.plan.clone().into_full(format!(
                "the repository now stores backups {}, its chain's files are stored {other}: a new chain starts",
                run.format
            ));
            chain.from = None;
            return Ok(());
        }
        if !run.format.is_encrypted() {
            return Ok(());
        }
        let shown = format!("{}:{}/{parent}", run.request.repository.name(), run.request.vm);
        for d in &m.disks {
            let below = ancestors(run.vm_dir, &run.request.vm, &parent, d)?;
            let image = crate::protect::disk_image(&dir, d, &below, run.key, &shown)?;
            let problem = match self.images.check(&image, &ImageFormat::Qcow2) {
                Ok(r) if matches!(r.verdict, CheckVerdict::Clean | CheckVerdict::Leaks) => continue,
                Ok(r) => format!("qemu-img check says {:?}", r.verdict),
                Err(e) => {
                    if e.is_wrong_key() {
                        return Err(BackupError::KeyNeeded {
                            backup: shown,
                            detail: format!(
                                "the next backup builds on it, and disk {} does not open with the key",
                                d.target
                            ),
                        });
                    }
                    crate::error::chain(&e)
                }
            };
            // Damaged rather than locked: never an error where a full would do.
            chain.plan.disk_to_full(
                &d.target,
                format!("its file in the previous backup's chain cannot be built on: {problem}"),
            );
        }
        if chain.plan.mode == BackupMode::Full {
            chain.from = None;
        }
        Ok(())
    }

    /// A shut-off VM's qcow2 disks get this backup's bitmap `name` before anything is read (no
    /// one writes to them in between): the base of the next incremental. The guard removes
    /// them again unless the backup is put in place.
    fn offline_bitmaps(&self, run: &Run<'_>, name: String) -> BitmapGuard<'_, I> {
        let mut bitmaps = BitmapGuard { images: &self.images, name, files: Vec::new() };
        if run.state == DomainState::ShutOff {
            for (disk, _) in run.files {
                if let Some(file) = crate::incremental::bitmap_file(disk)
                    && self.images.add_bitmap(file, &bitmaps.name).is_ok()
                {
                    bitmaps.files.push((disk.target.clone(), file.to_owned()));
                }
            }
        }
        bitmaps
    }

    /// Copies the disks into the partial directory: a running VM's through libvirt's push job
    /// (an incremental job libvirt refuses at its start is taken again as a full), a shut-off
    /// VM's through qemu-img; each incremental file then points at its parent's.
    fn copy_disks(
        &self,
        run: &Run<'_>,
        chain: &mut crate::incremental::ChainDecision,
        (created, snapshots): (Option<&str>, &mut crate::rbd::Snapshots<'_, I>),
        notes: &mut Notes,
        observer: &mut dyn Observer,
    ) -> Result<Copied, BackupError> {
        match run.state {
            DomainState::Running => {
                // With scratch storage, the job writes there and the files are copied to the
                // repository afterwards (see `crate::staging`).
                let staging = match &self.scratch {
                    Some(scratch) => {
                        let name =
                            run.partial.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        let id = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(&name);
                        Some(crate::staging::Staging::create(scratch, &run.request.vm, id).map_err(at(Step::Job))?)
                    }
                    None => None,
                };
                let staging = staging.as_ref();
                let mut push = |chain: &crate::incremental::ChainDecision, notes: &mut Notes| {
                    self.push(
                        run,
                        (&chain.plan, chain.from.as_deref(), created),
                        (notes, &mut *snapshots, staging),
                        &mut *observer,
                    )
                };
                let copied = match push(chain, notes) {
                    // libvirt refused the incremental job although it accepted the checkpoint
                    // (a bitmap found inconsistent when the job starts): a full instead, the
                    // reason recorded. Never an error where a full would do.
                    Err(PushFailure::Refused(e)) if chain.plan.mode == BackupMode::Incremental => {
                        if run.cancel.is_cancelled() {
                            return Err(BackupError::Cancelled);
                        }
                        let reason = format!("libvirt refused the incremental job: {}", crate::error::chain(&e));
                        chain.plan = chain.plan.clone().into_full(reason);
                        chain.from = None;
                        for (_, file) in run.files {
                            let _ = fs::remove_file(run.partial.join(file));
                            if let Some(s) = staging {
                                let _ = fs::remove_file(s.path().join(file));
                            }
                        }
                        push(chain, notes)
                    }
                    other => other,
                }
                .map_err(|f| (run.unavailable)(Step::Job, f.error()))?;
                if let Some(s) = staging {
                    self.unstage(run, s, observer).map_err(|e| (run.unavailable)(Step::Convert, e))?;
                }
                self.copy_rbd(run, &mut chain.plan, snapshots, observer)
                    .map_err(|e| (run.unavailable)(Step::Convert, e))?;
                self.point_at_parents(run, &chain.plan, &copied.hashed).map_err(|e| (run.unavailable)(Step::Job, e))?;
                Ok(copied)
            }
            DomainState::ShutOff => {
                // Nothing writes a shut-off VM's state: read before its disks.
                let state = crate::vmstate::capture(run.domain).map_err(at(Step::State))?;
                let from = chain.from.clone();
                snapshots.take(run.rbd)?;
                self.convert(run, (&mut chain.plan, from.as_deref()), observer)
                    .map_err(|e| (run.unavailable)(Step::Convert, e))?;
                self.copy_rbd(run, &mut chain.plan, snapshots, observer)
                    .map_err(|e| (run.unavailable)(Step::Convert, e))?;
                let hashed = HashMap::new();
                self.point_at_parents(run, &chain.plan, &hashed).map_err(|e| (run.unavailable)(Step::Convert, e))?;
                Ok(Copied {
                    method: BackupMethod::QemuImg,
                    quiesced: false,
                    note: Some("the VM was shut off".to_owned()),
                    state,
                    hashed,
                })
            }
            DomainState::Other => Err(BackupError::NotBackupable { vm: run.request.vm.clone() }),
        }
    }

    /// Each file written, checksummed (cancellable, with progress), as its manifest entry. A
    /// file hashed as it was written (`hashed`, by disk target) is not read again.
    fn checksum_disks(
        &self,
        run: &Run<'_>,
        (plan, hashed): (&crate::chain::ChainPlan, &HashMap<String, Checksum>),
        snapshots: &crate::rbd::Snapshots<'_, I>,
        observer: &mut dyn Observer,
    ) -> Result<Vec<ManifestDisk>, BackupError> {
        let mut disks = Vec::new();
        for (disk, file) in run.files {
            if run.cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let path = run.partial.join(file);
            let opened = match run.format {
                FileFormat::Plain | FileFormat::Compressed => ImageLocation::Path(path.clone()),
                other => ImageLocation::Stored(StoredImage::single(
                    path.clone(),
                    crate::protect::layout_of(other),
                    run.key.map(|k| k.path().to_owned()),
                )),
            };
            let info = self.images.info(&opened).map_err(|e| (run.unavailable)(Step::Checksum, e.into()))?;
            let size = fs::metadata(&path).map_err(io("measuring", &path))?.len();
            let mut report = |done: u64| {
                observer(&Progress::new(Phase::Checksum, &run.request.vm, done, size).on_disk(&disk.target));
                !run.cancel.is_cancelled()
            };
            let checksum = match hashed.get(&disk.target) {
                Some(kept) => {
                    report(size);
                    kept.clone()
                }
                None => {
                    let algorithm = checksum_algorithm_for(&path, crate::protect::layout_of(run.format));
                    let value = checksum_file_observed(&path, &algorithm, &mut report)
                        .map_err(|e| cancelled_or(run.cancel, io("checksumming", &path)(e)))
                        .map_err(|e| (run.unavailable)(Step::Checksum, e))?;
                    Checksum { algorithm, value }
                }
            };
            let planned = plan.disks.iter().find(|p| p.target == disk.target);
            disks.push(ManifestDisk {
                target: disk.target.clone(),
                volume: volume_of(disk).to_string(),
                source: disk.source.as_ref().map(ToString::to_string).unwrap_or_default(),
                source_format: disk.format.clone(),
                file: file.clone(),
                format: "qcow2".into(),
                virtual_size: info.first().map_or(0, |i| i.virtual_size),
                size,
                checksum: Some(checksum),
                mode: planned.map_or(BackupMode::Full, |p| p.mode),
                backing: planned.and_then(|p| p.backing.clone()),
                full_reason: planned.and_then(|p| p.full_reason.clone()),
                stored_as: run.format,
                rbd_snapshot: snapshots.record(&disk.target),
                reference: false,
            });
        }
        Ok(disks)
    }

    /// The backup's manifest: its disks, how it was made, its chain and its checkpoint.
    fn manifest(&self, run: &Run<'_>, parts: ManifestParts<'_>, bitmaps: &BitmapGuard<'_, I>) -> Manifest {
        let versions = self.hypervisor.versions().ok();
        let v = |t: (u32, u32, u32)| format!("{}.{}.{}", t.0, t.1, t.2);
        let checkpoint = match run.state {
            DomainState::Running => {
                parts.created.and_then(|c| crate::incremental::record(&self.hypervisor, &run.request.vm, c))
            }
            _ => (!bitmaps.files.is_empty()).then(|| {
                let with: Vec<(&Disk, bool)> =
                    run.files.iter().map(|(d, _)| (*d, bitmaps.files.iter().any(|(t, _)| *t == d.target))).collect();
                crate::incremental::offline_record(&bitmaps.name, run.xml, &with, parts.started.timestamp())
            }),
        };
        let mut manifest = Manifest {
            version: 1,
            id: parts.id.to_string(),
            repository: run.request.repository.name().to_string(),
            vm: run.request.vm.clone(),
            method: parts.copied.method,
            started: parts.started,
            finished: self.clock.now(),
            quiesced: parts.copied.quiesced,
            quiesce_note: parts.copied.note,
            libvirt_version: versions.map(|x| v(x.libvirt)),
            qemu_version: versions.map(|x| v(x.qemu)),
            schedule: run.request.schedule.clone(),
            disks: parts.disks,
            mode: parts.chain.plan.mode,
            parent: parts.chain.plan.parent.clone(),
            checkpoint,
            full_reason: parts.chain.plan.full_reason.clone(),
            state: parts.state,
            state_note: (!parts.copied.state.notes.is_empty()).then(|| parts.copied.state.notes.join("; ")),
        };
        manifest.version = manifest.required_version();
        manifest
    }

    /// Once the backup is in place: the parent's checkpoint goes with its bitmaps; this one's
    /// record is forgotten, its bitmaps stay for the next incremental.
    fn after_commit(&self, run: &Run<'_>, chain: &crate::incremental::ChainDecision, created: Option<&str>) {
        if run.state == DomainState::Running {
            crate::incremental::after_success(
                &self.hypervisor,
                &run.request.vm,
                chain.parent_checkpoint.as_ref(),
                created,
            );
        } else {
            let disks: Vec<&Disk> = run.files.iter().map(|(d, _)| *d).collect();
            crate::incremental::after_stopped_success(
                &self.hypervisor,
                &self.images,
                &run.request.vm,
                chain.parent_checkpoint.as_ref(),
                &disks,
            );
        }
    }

    /// A nasbak process killed during a push job leaves the job running, writing into its
    /// `.partial` directory. Holding the VM lock (so that process is gone), abort such a job:
    /// a backup job whose targets are all inside this VM's directory on this repository.
    pub(crate) fn abort_orphaned_job(&self, vm: &str, vm_dir: &Path) -> Result<bool, BackupError> {
        let job = self.hypervisor.current_job(vm)?;
        if job.kind != nasbak_libvirt::JobKind::Active || !job.is_backup {
            return Ok(false);
        }
        let Ok(xml) = self.hypervisor.backup_xml(vm) else { return Ok(false) };
        let running = PushBackup::parse(&xml)?;
        // Into this VM's `.partial` directory, or into the exports of a protected repository's
        // backup of this VM (`<runtime>/exports/<vm>/`); or a pull job whose nasbak is gone
        // (its socket in a directory of ours named by a dead pid).
        let exports = self.runtime_dir.join("exports").join(vm);
        let ours = match &running.pull_socket {
            Some(socket) => crate::pull::orphaned_socket(&self.runtime_dir, socket),
            None => {
                !running.targets.is_empty()
                    && running.targets.iter().all(|t| {
                        t.file.parent().is_some_and(|p| {
                            (p.parent() == Some(vm_dir) && p.to_string_lossy().ends_with(PARTIAL_SUFFIX))
                                || p == exports
                        })
                    })
            }
        };
        if !ours {
            return Ok(false);
        }
        if let Err(e) = self.hypervisor.abort_job(vm) {
            // The job may have ended by itself since it was seen (it goes on without nasbak):
            // then there is nothing left to abort, and its directory is cleaned up as any other.
            if self.hypervisor.current_job(vm)?.kind != nasbak_libvirt::JobKind::Active {
                let _ = self.hypervisor.completed_job(vm);
                return Ok(false);
            }
            return Err(e.into());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.hypervisor.current_job(vm)?.kind == nasbak_libvirt::JobKind::Active {
            if std::time::Instant::now() > deadline {
                return Err(BackupError::Unsupported {
                    what: format!("aborting the orphaned backup job of {vm} did not finish in 30 s"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.hypervisor.completed_job(vm);
        Ok(true)
    }

    /// Refuses when the disks' allocated bytes exceed the space available; returns each disk's
    /// `qemu-img info` by target (its bitmaps for a shut-off VM's chain), so no other step asks
    /// qemu-img again, and each disk's virtual size (for progress and the chain). A disk of a
    /// running VM that qemu-img cannot open (an RBD disk whose key libvirt keeps private) is
    /// measured by libvirt instead.
    fn check_space(&self, disks: &[&Disk], available: &u64, vm: &str, running: bool) -> Result<Measured, BackupError> {
        let mut needed = 0u64;
        let mut sources = HashMap::new();
        let mut sizes = HashMap::new();
        for d in disks {
            if let Ok(loc) = keyed_source(&self.hypervisor, d)
                && let Ok(info) = self.images.info(&loc)
                && let Some(top) = info.into_iter().next()
            {
                needed += top.actual_size.unwrap_or(0);
                sizes.insert(d.target.clone(), top.virtual_size);
                sources.insert(d.target.clone(), top);
            } else if running && let Ok(size) = self.hypervisor.block_size(vm, &d.target) {
                needed += size.allocation;
                sizes.insert(d.target.clone(), size.capacity);
            }
        }
        if needed > *available {
            return Err(BackupError::NoSpace { vm: vm.to_owned(), needed, available: *available });
        }
        Ok((sources, sizes))
    }

    fn push(
        &self,
        run: &Run<'_>,
        (plan, from, checkpoint): (&crate::chain::ChainPlan, Option<&str>, Option<&str>),
        (notes, snapshots, staging): (&mut Notes, &mut crate::rbd::Snapshots<'_, I>, Option<&crate::staging::Staging>),
        observer: &mut dyn Observer,
    ) -> Result<Copied, PushFailure> {
        // The job's files go to the scratch directory when there is one, else to the partial
        // directory on the repository.
        let partial = staging.map_or(run.partial, |s| s.path());
        let staged = Run { partial, ..*run };
        let run = &staged;
        let (request, domain, files, cancel) = (run.request, run.domain, run.files, run.cancel);
        let mut backup = PushBackup::for_domain(domain, partial, |d| d.target.clone());
        backup.checkpoint = checkpoint.map(str::to_owned);
        // RBD disks nasbak reaches are read from their snapshots, taken right after the job
        // starts (the guest still frozen), not by the job.
        backup.targets.retain(|t| !run.rbd.contains_key(&t.disk));
        backup.without_bitmap.retain(|t| !run.rbd.contains_key(t));
        backup.excluded.extend(run.rbd.keys().cloned());
        for t in &mut backup.targets {
            let name =
                files.iter().find(|(d, _)| d.target == t.disk).map(|(_, f)| f.clone()).expect("the same selection");
            t.file = partial.join(name);
            let incremental = plan.disks.iter().any(|d| d.target == t.disk && d.mode == BackupMode::Incremental);
            t.incremental = if incremental { from.map(str::to_owned) } else { None };
        }
        // A compressing or encrypting repository: a pull job, whose exports nasbak reads and
        // writes compressed or encrypted on every core (see `crate::pull`); the files are
        // written where the push job's would be.
        let (pull, pull_disks, passphrase) = self.pull_targets(run, plan, &mut backup, staging)?;
        // Where a disk is itself encrypted, the push job: into LUKS-encrypted qcow2 files nasbak
        // made, QEMU encrypting with the key given it as a transient libvirt secret, or (a
        // compressing repository) into raw files that store it compressed (or compressed and
        // encrypted). Both made before the guest is frozen.
        let job_secret = if pull.is_some() { None } else { self.encrypted_targets(run)? };
        backup.encryption_secret = job_secret.as_ref().map(|s| s.uuid.clone());
        let exports: Vec<(String, WritableExport)> =
            if job_secret.is_some() || pull.is_some() { Vec::new() } else { self.protected_targets(run, plan)? };
        if !exports.is_empty() {
            backup.into_existing_raw = true;
            for t in &mut backup.targets {
                let export = exports.iter().find(|(target, _)| *target == t.disk).expect("one export per disk");
                t.file = export.1.mountpoint().to_owned();
            }
        }
        // The job started (none when every disk is read from an RBD snapshot), then the RBD
        // snapshots taken and the VM's NVRAM and TPM state read, the guest still frozen: a
        // snapshot or a read that fails drops the job, which aborts it.
        let begin = |backup: &PushBackup, snapshots: &mut crate::rbd::Snapshots<'_, I>| {
            let job = if backup.targets.is_empty() {
                None
            } else {
                Some(start_backup(&self.hypervisor, &request.vm, backup).map_err(|e| PushFailure::Refused(e.into()))?)
            };
            snapshots.take(run.rbd).map_err(|e| PushFailure::Failed(at(Step::Job)(e)))?;
            let state = crate::vmstate::capture(domain).map_err(|e| PushFailure::Failed(at(Step::State)(e)))?;
            Ok::<_, PushFailure>((job, state))
        };
        // Armed from before the freeze until the job has ended: should this process die in
        // between, it thaws the guest and aborts the job.
        let mut watchdog = self.agents.watchdog_uri().and_then(|uri| ThawWatchdog::arm(&uri, &request.vm));
        let agent = self.agents.agent_transport(&request.vm).map(|t| GuestAgent::new(t, self.agent_timeout));
        let mut outcome;
        let mut thaw_failed = None;
        let (job, state) = match (&agent, request.quiesce) {
            (Ok(agent), policy) => {
                // Holding the VM lock, a frozen guest was left so by an interrupted run (or by
                // hand): freezing again would fail, so thaw it and say so.
                if policy != QuiescePolicy::Off
                    && agent.status().is_ok_and(|s| s == nasbak_agent::FreezeStatus::Frozen)
                    && agent.thaw().is_ok()
                {
                    notes.cleaned.push(format!("thawed {}, which an interrupted run had left frozen", request.vm));
                }
                let (guard, o) = quiesce(agent, request.quiesce, None).map_err(|e| at(Step::Freeze)(e.into()))?;
                outcome = o;
                crate::fault::point("frozen");
                let started = begin(&backup, snapshots);
                // Thawed right after the start, whatever happened; a thaw that fails (retried
                // three times) is tried again once the job has ended, and said in any case.
                thaw_failed = guard.map(|g| g.thaw()).and_then(Result::err);
                match started {
                    Ok(job) => job,
                    Err(e) if thaw_failed.is_none() => return Err(e),
                    Err(e) => {
                        let settled = thaw_failed.map(|first| settle_thaw(agent, first, &mut watchdog, &request.vm));
                        return Err(still_frozen(settled.and_then(|s| s.1), e.error()).into());
                    }
                }
            }
            (Err(e), QuiescePolicy::Required) => {
                return Err(at(Step::Freeze)(BackupError::Libvirt(e.clone())).into());
            }
            (Err(e), _) => {
                outcome = nasbak_agent::QuiesceOutcome {
                    quiesced: false,
                    frozen_filesystems: 0,
                    note: Some(format!("not quiesced (crash-consistent): {e}")),
                };
                begin(&backup, snapshots)?
            }
        };
        crate::fault::point("job-started");
        let waited = match (job, &pull) {
            // The exports read while the scratch is watched, then the job ended.
            (Some(job), Some(p)) => {
                let deadline = std::time::Instant::now() + request.timeout;
                let key = (run.format, passphrase.as_deref().map(Vec::as_slice));
                let read = |c: &CancelHandle| {
                    let hashed = crate::pull::read_disks(
                        &p.socket,
                        &pull_disks,
                        key,
                        (deadline, c),
                        (&request.vm, &mut *observer),
                    )?;
                    job.end_pull().map_err(BackupError::from).map(|()| hashed)
                };
                match p.scratch(staging) {
                    Some(s) => match s.watch(cancel, SCRATCH_CHECK, read) {
                        (Err(_), Some(reason)) => Err(s.full(reason)),
                        (waited, _) => waited,
                    },
                    None => read(cancel),
                }
            }
            (job, _) => {
                let options = JobOptions { timeout: request.timeout, ..JobOptions::default() };
                let mut wait = |job: nasbak_libvirt::RunningBackup<'_, H>, cancel: &CancelHandle| {
                    job.wait(options, cancel, &mut |p| {
                        observer(&Progress::new(Phase::Job, &request.vm, p.processed, p.total));
                    })
                    .map(drop)
                };
                match (job, staging) {
                    // A job that ended within the limit's last check, past it, fails as one
                    // stopped.
                    (Some(job), Some(s)) => match s.watch(cancel, SCRATCH_CHECK, |c| wait(job, c)) {
                        (Err(_), Some(reason)) => Err(s.full(reason)),
                        (Ok(()), _) if let Some(reason) = s.exceeded() => Err(s.full(reason)),
                        (waited, _) => waited.map_err(BackupError::from),
                    },
                    (Some(job), None) => wait(job, cancel).map_err(BackupError::from),
                    (None, _) => Ok(()),
                }
                .map(|()| HashMap::new())
            }
        };
        let mut frozen = None;
        if let (Some(first), Ok(agent)) = (thaw_failed, &agent) {
            let (note, warning) = settle_thaw(agent, first, &mut watchdog, &request.vm);
            outcome.note = Some(outcome.note.map_or(note.clone(), |n| format!("{n}; {note}")));
            frozen = warning;
        }
        drop(watchdog);
        // A guest that may still be frozen is said on every path: a warning with the backup, or
        // the error of a failed one.
        let hashed = match waited {
            Ok(hashed) => hashed,
            Err(e) => {
                let e = match e {
                    e @ BackupError::Scratch { .. } => e,
                    e => cancelled_or(cancel, e),
                };
                return Err(still_frozen(frozen, e).into());
            }
        };
        notes.warnings.extend(frozen);
        // The job is done: each protected file flushed and closed, complete only then.
        for (target, export) in exports {
            export.finish(EXPORT_FINISH_TIMEOUT).map_err(|e| at(Step::Job)(export_not_finished(&target, e)))?;
        }
        let method = if pull.is_some() { BackupMethod::PullJob } else { BackupMethod::PushJob };
        Ok(Copied { method, quiesced: outcome.quiesced, note: outcome.note, state, hashed })
    }

    /// For a repository that compresses or encrypts (and no disk that is itself encrypted): the
    /// job made a pull job (its socket and scratch files, see `crate::pull`), and the disks
    /// nasbak then reads from it with the files they go to and the key they are encrypted with.
    #[allow(clippy::type_complexity)]
    fn pull_targets(
        &self,
        run: &Run<'_>,
        plan: &crate::chain::ChainPlan,
        backup: &mut PushBackup,
        staging: Option<&crate::staging::Staging>,
    ) -> Result<
        (Option<crate::pull::PullSetup>, Vec<crate::pull::PullDisk>, Option<zeroize::Zeroizing<Vec<u8>>>),
        BackupError,
    > {
        let disks: Vec<&Disk> =
            run.files.iter().filter(|(d, _)| !run.rbd.contains_key(&d.target)).map(|(d, _)| *d).collect();
        if backup.targets.is_empty() || !crate::pull::wanted(run.format, &disks) {
            return Ok((None, Vec::new(), None));
        }
        let passphrase = match run.key.filter(|_| run.format.is_encrypted()) {
            Some(k) => Some(zeroize::Zeroizing::new(
                fs::read(k.path()).map_err(io("reading the repository's key from", k.path()))?,
            )),
            None if run.format.is_encrypted() => {
                return Err(BackupError::KeyNeeded {
                    backup: format!("{}:{}", run.request.repository.name(), run.request.vm),
                    detail: "the repository encrypts and no key was resolved".into(),
                });
            }
            None => None,
        };
        let name = run.partial.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let id = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(&name);
        // The scratch holds at most what the guest overwrites of its disks meanwhile.
        let limit = run.sizes.values().sum::<u64>() + (1 << 30);
        let setup = crate::pull::prepare(&self.runtime_dir, staging.is_some(), (&run.request.vm, id, run.xml), limit)?;
        let Some(scratch) = setup.scratch(staging) else {
            return Err(BackupError::Scratch {
                vm: run.request.vm.clone(),
                dir: PathBuf::from(crate::pull::DEFAULT_PULL_SCRATCH),
                detail: "no directory for the pull job's scratch files".into(),
            });
        };
        backup.pull_socket = Some(setup.socket.clone());
        let mut disks = Vec::new();
        for t in &mut backup.targets {
            let planned = plan.disks.iter().find(|d| d.target == t.disk);
            disks.push(crate::pull::PullDisk {
                target: t.disk.clone(),
                file: t.file.clone(),
                incremental: t.incremental.is_some(),
                backing: planned.filter(|d| d.mode == BackupMode::Incremental).and_then(|d| d.backing.clone()),
            });
            t.file = scratch.path().join(format!("{}.scratch", t.disk));
        }
        Ok((Some(setup), disks, passphrase))
    }

    /// Copies each file the job staged in the scratch directory to the partial directory on the
    /// repository, byte for byte (holes kept), and removes it from the scratch. A repository
    /// that stalls delays only this copy, which ends by its timeout or a cancel.
    fn unstage(
        &self,
        run: &Run<'_>,
        staging: &crate::staging::Staging,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        for (disk, file) in run.files.iter().filter(|(d, _)| !run.rbd.contains_key(&d.target)) {
            if run.cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let from = staging.path().join(file);
            let size = fs::metadata(&from).map_err(io("reading the staged file", &from))?.len();
            let mut r =
                ConvertRequest::new(ImageLocation::Path(from.clone()), run.partial.join(file), ImageFormat::Raw);
            r.source_format = Some(ImageFormat::Raw);
            convert(&self.images, r, run.cancel, &run.request.vm, &disk.target, size, observer)?;
            let _ = fs::remove_file(&from);
        }
        Ok(())
    }

    /// For a repository that encrypts and does not compress: each disk's file created empty in
    /// the partial directory as a LUKS-encrypted qcow2 of the disk's size (an incremental's
    /// parent named once the job is done, see `point_at_parents`: during the job libvirt gives
    /// QEMU the live disk as its backing), and the repository's key defined as a transient
    /// libvirt secret for QEMU to open them with (undefined when the returned guard drops).
    /// QEMU then encrypts what the push job writes, in its own I/O path. None otherwise.
    fn encrypted_targets(&self, run: &Run<'_>) -> Result<Option<TransientSecret<'_, H>>, BackupError> {
        if run.format != FileFormat::Encrypted {
            return Ok(None);
        }
        let protection = crate::protect::target_protection(run.format, run.key).expect("an encrypting format");
        for (disk, file) in run.files.iter().filter(|(d, _)| !run.rbd.contains_key(&d.target)) {
            let size = run.sizes.get(&disk.target).copied().unwrap_or(0);
            self.images.create_protected(&run.partial.join(file), size, None, &protection)?;
        }
        let key = run.key.ok_or_else(|| BackupError::KeyNeeded {
            backup: format!("{}:{}", run.request.repository.name(), run.request.vm),
            detail: "the repository encrypts and no key was resolved".into(),
        })?;
        // The key as QEMU's secret objects read it from the file: its bytes as they are (a key
        // from a libvirt secret was written there by nasbak; a key file was checked already).
        let bytes = fs::read(key.path()).map_err(io("reading the repository's key from", key.path()))?;
        let value = String::from_utf8(bytes).map(nasbak_process::Secret::new).map_err(|_| BackupError::KeyNeeded {
            backup: format!("{}:{}", run.request.repository.name(), run.request.vm),
            detail: "the repository's key is not UTF-8 text, which libvirt needs to hand it to QEMU; use a text key (head -c 32 /dev/urandom | base64)".into(),
        })?;
        TransientSecret::define(&self.hypervisor, &job_secret_prefix(&run.request.vm), &value).map(Some)
    }

    /// For a repository that compresses or encrypts: each disk's file created in the partial
    /// directory as its protection says (an incremental naming its parent's file, except inside
    /// a LUKS container) and exported writable as a raw file for the push job, with the chain it
    /// builds on (see `WritableExport`). None for a plain repository.
    fn protected_targets(
        &self,
        run: &Run<'_>,
        plan: &crate::chain::ChainPlan,
    ) -> Result<Vec<(String, WritableExport)>, BackupError> {
        let Some(protection) = crate::protect::target_protection(run.format, run.key) else { return Ok(Vec::new()) };
        // One directory per VM: what a killed backup of this VM left is told apart from the
        // exports of another VM's backup in flight.
        let dir = self.runtime_dir.join("exports").join(run.request.vm.as_str());
        let io = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| BackupError::Io { action, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        // QEMU runs as another user: it must reach the exports.
        for d in [self.runtime_dir.as_path(), &self.runtime_dir.join("exports"), dir.as_path()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io("opening to QEMU", d))?;
        }
        let id = run.partial.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Exports a killed backup of this VM left (its daemon died with it): holding the VM's
        // lock, none is in use.
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_file(e.path());
        }
        let mut exports = Vec::new();
        for (disk, file) in run.files.iter().filter(|(d, _)| !run.rbd.contains_key(&d.target)) {
            let planned = plan.disks.iter().find(|d| d.target == disk.target);
            let backing = planned.filter(|d| d.mode == BackupMode::Incremental).and_then(|d| d.backing.clone());
            let header = backing.clone().filter(|_| run.format != FileFormat::CompressedInLuks);
            let size = run.sizes.get(&disk.target).copied().unwrap_or(0);
            let path = run.partial.join(file);
            self.images.create_protected(&path, size, header, &protection)?;
            let chain = match &backing {
                Some(b) => Some(crate::protect::parent_chain(run.vm_dir, &run.request.vm, b, run.key)?),
                None => None,
            };
            let mountpoint = dir.join(format!("{id}-{}.raw", disk.target));
            let export = WritableExport::start(&path, &protection, chain.as_ref(), &mountpoint, &self.runtime_dir)?;
            exports.push((disk.target.clone(), export));
        }
        Ok(exports)
    }

    /// libvirt (and the offline copy) write an incremental file without a backing file, or with
    /// the live disk as its backing: point each at the same disk's file in the parent, relative,
    /// so the chain resolves wherever the repository is mounted.
    ///
    /// A compressed qcow2 inside a LUKS container names no backing file: its chain is given by
    /// the manifests whenever it is opened.
    fn point_at_parents(
        &self,
        run: &Run<'_>,
        plan: &crate::chain::ChainPlan,
        hashed: &HashMap<String, Checksum>,
    ) -> Result<(), BackupError> {
        // A file nasbak wrote itself names its parent already (and is hashed as it is).
        for d in plan.disks.iter().filter(|d| d.mode == BackupMode::Incremental && !hashed.contains_key(&d.target)) {
            let (_, file) = run.files.iter().find(|(x, _)| x.target == d.target).expect("planned from files");
            let backing = d.backing.as_deref().expect("an incremental disk has its backing");
            let path = run.partial.join(file);
            let image = match run.format {
                FileFormat::CompressedInLuks => continue,
                FileFormat::Encrypted => ImageLocation::Stored(StoredImage::single(
                    path,
                    StoredLayout::Qcow2Luks,
                    run.key.map(|k| k.path().to_owned()),
                )),
                FileFormat::Plain | FileFormat::Compressed => ImageLocation::Path(path),
            };
            self.images.set_backing(&image, backing, &ImageFormat::Qcow2)?;
        }
        Ok(())
    }

    /// Copies the RBD disks read from this backup's snapshots (see `crate::rbd`): a full disk
    /// whole from its snapshot (`qemu-img convert`), an incremental one as what changed since
    /// the parent's snapshot. An incremental copy that fails is taken whole instead, the reason
    /// recorded: never an error where a full would do.
    fn copy_rbd(
        &self,
        run: &Run<'_>,
        plan: &mut crate::chain::ChainPlan,
        snapshots: &crate::rbd::Snapshots<'_, I>,
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let vm = run.request.vm.as_str();
        for (disk, file) in run.files.iter().filter(|(d, _)| run.rbd.contains_key(&d.target)) {
            if run.cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let source = run.rbd[&disk.target].spec.at_snapshot(&snapshots.name);
            let size = run.sizes.get(&disk.target).copied().unwrap_or(0);
            let path = run.partial.join(file);
            let backing = plan
                .disks
                .iter()
                .find(|d| d.target == disk.target && d.mode == BackupMode::Incremental)
                .and_then(|d| d.backing.clone());
            if let (Some(backing), Some(parent)) = (backing, plan.parent.clone()) {
                match self.rbd_increment(run, (&disk.target, &source, &parent), (&path, &backing, size), observer) {
                    Ok(()) => continue,
                    Err(e) if run.cancel.is_cancelled() => return Err(e),
                    Err(e) => {
                        let _ = fs::remove_file(&path);
                        plan.disk_to_full(
                            &disk.target,
                            format!("its incremental copy failed: {}", crate::error::chain(&e)),
                        );
                    }
                }
            }
            let mut r = ConvertRequest::new(ImageLocation::Rbd(source), path, ImageFormat::Qcow2);
            r.source_format = Some(ImageFormat::Raw);
            r.protection = crate::protect::target_protection(run.format, run.key);
            convert(&self.images, r, run.cancel, vm, &disk.target, size, observer)?;
        }
        Ok(())
    }

    /// Writes into the new file `path` (of `size` bytes, building on `backing`) what changed
    /// in the RBD image `source` of disk `disk` (at this backup's snapshot) since the snapshot
    /// of backup `parent`, as the repository stores files.
    fn rbd_increment(
        &self,
        run: &Run<'_>,
        (disk, source, parent): (&str, &nasbak_qemu_img::RbdSpec, &str),
        (path, backing, size): (&Path, &str, u64),
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let mut protection = crate::protect::target_protection(run.format, run.key)
            .unwrap_or_else(|| nasbak_qemu_img::TargetProtection::new(StoredLayout::Qcow2, false, None));
        // The diff's writes come at any offset and length: through QEMU's compress filter a
        // cluster written twice fails (seen with zstd inside LUKS). Its few changed clusters
        // go in uncompressed; the file is still stored (and read) as the repository says.
        protection.compressed = false;
        let header = Some(backing.to_owned()).filter(|_| run.format != FileFormat::CompressedInLuks);
        self.images.create_protected(path, size, header, &protection)?;
        let chain = crate::protect::parent_chain(run.vm_dir, &run.request.vm, backing, run.key)?;
        let dir = self.runtime_dir.join("exports").join(run.request.vm.as_str());
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let id = run.partial.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let copy = nasbak_qemu_img::RbdDiffCopy {
            image: source.clone(),
            // The parent's snapshot is named after it, as this backup's is.
            from: format!("nasbak-{parent}"),
            target: path.to_owned(),
            size,
            protection,
            backing: Some(chain),
            mountpoint: dir.join(format!("{id}-{disk}.rbd.raw")),
            cancel: run.cancel.clone(),
        };
        crate::transfer::copy_rbd_diff(&self.images, &copy, &run.request.vm, disk, observer)
    }

    /// Copies a shut-off VM's disks: each planned incremental disk's clusters its bitmap for
    /// `from` marks (qemu-storage-daemon), the others whole (`qemu-img convert`).
    fn convert(
        &self,
        run: &Run<'_>,
        (plan, from): (&mut crate::chain::ChainPlan, Option<&str>),
        observer: &mut dyn Observer,
    ) -> Result<(), BackupError> {
        let (vm, files, sizes, partial, cancel) =
            (run.request.vm.as_str(), run.files, run.sizes, run.partial, run.cancel);
        // RBD disks read from snapshots are copied by `copy_rbd`.
        for (disk, file) in files.iter().filter(|(d, _)| !run.rbd.contains_key(&d.target)) {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let source = keyed_source(&self.hypervisor, disk)?;
            // An encrypted volume is read with its own passphrase (and written with the
            // repository's key).
            let volume_key = crate::protect::volume_key(&self.hypervisor, disk, &self.runtime_dir)?;
            let source = match (&volume_key, source) {
                (Some(k), ImageLocation::Path(p)) => {
                    ImageLocation::Stored(StoredImage::single(p, StoredLayout::Qcow2Luks, Some(k.path().to_owned())))
                }
                (_, source) => source,
            };
            let size = sizes.get(&disk.target).copied().unwrap_or(0);
            if volume_key.is_some() {
                plan.disk_to_full(&disk.target, "an encrypted volume of a shut-off VM is copied whole".into());
            }
            let incremental = plan.disks.iter().any(|d| d.target == disk.target && d.mode == BackupMode::Incremental);
            if let (true, Some(bitmap), ImageLocation::Path(path)) = (incremental, from, &source) {
                let copy = nasbak_qemu_img::DirtyCopy {
                    source: path.clone(),
                    bitmap: bitmap.to_owned(),
                    target: partial.join(file),
                    cancel: cancel.clone(),
                    protection: crate::protect::target_protection(run.format, run.key),
                };
                match crate::transfer::copy_dirty(&self.images, &copy, vm, &disk.target, size, observer) {
                    Ok(()) => continue,
                    Err(e) if cancel.is_cancelled() => return Err(e),
                    // Never an error where a full would do: this disk is copied whole instead.
                    Err(e) => {
                        let _ = fs::remove_file(partial.join(file));
                        plan.disk_to_full(
                            &disk.target,
                            format!("its incremental copy failed: {}", crate::error::chain(&e)),
                        );
                    }
                }
            }
            let mut r = ConvertRequest::new(source, partial.join(file), ImageFormat::Qcow2);
            r.source_format = disk.format.as_deref().map(|f| f.parse().unwrap_or_else(|never| match never {}));
            r.protection = crate::protect::target_protection(run.format, run.key);
            convert(&self.images, r, cancel, vm, &disk.target, size, observer)?;
        }
        Ok(())
    }
}

/// A protected file's export that failed to finish, said with its disk.
fn export_not_finished(target: &str, e: nasbak_qemu_img::ImageError) -> BackupError {
    BackupError::Io {
        action: "finishing the protected backup file of disk",
        path: target.into(),
        source: std::io::Error::other(crate::error::chain(&e)),
    }
}

/// How long a protected backup file's export may take to flush and stop once the job is done.
const EXPORT_FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the scratch storage is measured while a staged job runs.
const SCRATCH_CHECK: Duration = Duration::from_millis(100);

/// After the thaw right after the job start failed (`first`): tries again (three times); if that
/// fails too, hands the thaw to the watchdog. Returns the note for the manifest and, when the
/// guest may still be frozen, the warning for the operator.
fn settle_thaw<T: AgentTransport>(
    agent: &GuestAgent<T>,
    first: nasbak_agent::AgentError,
    watchdog: &mut Option<ThawWatchdog>,
    vm: &str,
) -> (String, Option<String>) {
    if (0..3).any(|_| agent.thaw().is_ok()) {
        return (format!("the thaw right after the job start failed ({first}); it succeeded later"), None);
    }
    let then = match watchdog.take().and_then(ThawWatchdog::hand_over_thaw) {
        Some(pid) => format!(
            "a helper process (pid {pid}) keeps trying every 5 s for {} minutes",
            crate::watchdog::THAW_RETRY_MINUTES
        ),
        None => "thaw them through the guest agent (libvirt: domfsthaw) once it answers".to_owned(),
    };
    let warning = format!("the file systems of {vm} may still be frozen: every thaw failed ({first}); {then}");
    (format!("thaw failed: {first}"), Some(warning))
}

/// `e`, or [`BackupError::StillFrozen`] around it when the guest may still be frozen.
/// How a push backup failed: libvirt refused to start the job (the guest thawed again), or
/// anything else.
enum PushFailure {
    Refused(BackupError),
    Failed(BackupError),
}

impl From<BackupError> for PushFailure {
    fn from(e: BackupError) -> Self {
        PushFailure::Failed(e)
    }
}

impl PushFailure {
    fn error(self) -> BackupError {
        match self {
            PushFailure::Refused(e) | PushFailure::Failed(e) => e,
        }
    }
}

fn still_frozen(warning: Option<String>, e: BackupError) -> BackupError {
    match warning {
        Some(warning) => BackupError::StillFrozen { warning, source: Box::new(e) },
        None => e,
    }
}
