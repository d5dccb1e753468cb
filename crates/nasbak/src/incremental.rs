//! Incremental backups on the engine's side: what the chain planner needs, gathered from the
//! repository and libvirt; the parent's checkpoint readied; and the checkpoint housekeeping
//! around the job.
//!
//! Between backups the domain carries no nasbak checkpoint metadata, only the bitmap of the
//! newest backup's checkpoint inside its qcow2 images: the definition lives in that backup's
//! manifest. Before an incremental the checkpoint is redefined from there (validated by
//! libvirt), so a domain that was redefined or moved to another host continues its chain, and
//! the domain can always be undefined. After the new backup is in place, the parent's checkpoint
//! is deleted with its bitmaps and the new one is forgotten (its bitmaps stay); a backup that
//! fails deletes the checkpoint it created and forgets the parent's again.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use nasbak_libvirt::{Checkpoint, Disk, Hypervisor};
use nasbak_qemu_img::{CheckVerdict, ImageFormat, ImageInfo, ImageLocation, ImageTool};
use nasbak_repo::model::layout::PARTIAL_SUFFIX;
use nasbak_repo::{BackupId, BackupMode, CheckpointRecord, Manifest};

use crate::chain::{BitmapState, ChainPlan, CheckpointState, DiskFacts, Parent, plan_chain};
use crate::disks::volume_of;
use crate::rbd::RbdDisk;
use crate::request::BackupRequest;
use nasbak_repo::store::{BackupKind, read_backup};

/// The name of the checkpoint a backup creates: `nasbak-<backup id>`.
pub(crate) fn checkpoint_name(id: &BackupId) -> String {
    format!("nasbak-{id}")
}

/// The newest complete backup of a VM, as the chain sees it.
#[derive(Debug)]
pub(crate) enum Found {
    /// No backup of the VM on this repository.
    None,
    /// The newest cannot be built on.
    Unusable(String),
    /// The newest, and how many backups its chain holds.
    Usable(Box<Manifest>, u32),
}

/// The newest backup in `vm_dir` and its chain, every parent read and checked on the way.
pub(crate) fn newest_backup(vm_dir: &Path, vm: &str) -> Found {
    let Ok(entries) = fs::read_dir(vm_dir) else { return Found::None };
    let newest = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().filter(|n| !n.ends_with(PARTIAL_SUFFIX))?.parse::<BackupId>().ok())
        .max();
    let Some(newest) = newest else { return Found::None };
    let read = |id: &str| match read_backup("", vm, id, &vm_dir.join(id)).map(|e| e.kind) {
        Some(BackupKind::Nasbak(m)) => Ok(m),
        Some(BackupKind::Damaged { reason }) => Err(format!("backup {id} is damaged: {reason}")),
        Some(BackupKind::Reference { .. }) => Err(format!("backup {id} was written by the reference system")),
        None => Err(format!("backup {id} is missing")),
    };
    let manifest = match read(&newest.to_string()) {
        Ok(m) => m,
        Err(reason) => return Found::Unusable(reason),
    };
    if manifest.checkpoint.is_none() && manifest.disks.iter().all(|d| d.rbd_snapshot.is_none()) {
        return Found::Unusable(format!(
            "backup {newest} recorded no checkpoint and no RBD snapshot (no disk of it keeps a dirty bitmap, or it was made before incrementals)"
        ));
    }
    let mut chain_len = 1;
    let mut current = manifest.clone();
    while let Some(parent) = current.parent.clone() {
        match read(&parent) {
            Ok(m) => current = m,
            Err(reason) => return Found::Unusable(format!("the chain of backup {newest} is broken: {reason}")),
        }
        chain_len += 1;
        if chain_len > 10_000 {
            return Found::Unusable(format!("the chain of backup {newest} does not end"));
        }
    }
    Found::Usable(manifest, chain_len)
}

/// What the backup of a running VM will do about its chain.
#[derive(Debug)]
pub(crate) struct ChainDecision {
    /// Full or incremental, disk by disk.
    pub plan: ChainPlan,
    /// The parent's checkpoint, when the backup builds on it.
    pub from: Option<String>,
    /// The parent's checkpoint record (for its housekeeping after the backup).
    pub parent_checkpoint: Option<CheckpointRecord>,
    /// Whether this backup redefined the parent's checkpoint in libvirt.
    pub redefined: bool,
    /// nasbak checkpoints an interrupted run left in libvirt, removed.
    pub removed: Vec<String>,
}

/// The newest backup of a VM on this repository, as both deciders start from it.
struct Previous {
    found: Found,
    /// Its checkpoint, when it can be built on.
    record: Option<CheckpointRecord>,
    /// The disks that checkpoint keeps a bitmap for.
    recorded: Vec<String>,
}

impl Previous {
    fn read(vm_dir: &Path, vm: &str) -> Previous {
        let found = newest_backup(vm_dir, vm);
        let record = match &found {
            Found::Usable(m, _) => m.checkpoint.clone(),
            _ => None,
        };
        let recorded = record
            .as_ref()
            .and_then(|r| Checkpoint::parse(&r.xml).ok())
            .map(|c| c.disks.into_iter().filter(|(_, bitmap)| *bitmap).map(|(t, _)| t).collect())
            .unwrap_or_default();
        Previous { found, record, recorded }
    }

    fn parent(&self) -> Parent<'_> {
        match &self.found {
            Found::None => Parent::None,
            Found::Unusable(reason) => Parent::Unusable { reason: reason.clone() },
            Found::Usable(m, chain_len) => Parent::Usable { manifest: m, chain_len: *chain_len },
        }
    }

    /// The facts of each chosen disk, its bitmap state told by `bitmap`; an RBD disk's by its
    /// image's snapshots (`rbd`: the images nasbak reaches).
    fn facts<I: ImageTool>(
        &self,
        images: &I,
        (vm_dir, vm): (&Path, &str),
        (files, rbd): (&[(&Disk, String)], &HashMap<String, RbdDisk>),
        sizes: &HashMap<String, u64>,
        bitmap: impl Fn(&Disk) -> BitmapState,
    ) -> Vec<DiskFacts> {
        let chain_problem = |target: &str| match &self.found {
            Found::Usable(m, _) => disk_chain_problem(images, vm_dir, vm, m, target),
            _ => None,
        };
        let before = |target: &str| match &self.found {
            Found::Usable(m, _) => m.disks.iter().find(|d| d.target == target),
            _ => None,
        };
        let state = |d: &Disk| {
            if crate::rbd::is_rbd(d) {
                crate::rbd::snapshot_state(rbd.get(&d.target), before(&d.target))
            } else {
                bitmap(d)
            }
        };
        disk_facts(files, state, sizes, chain_problem)
    }

    /// Whether the checkpoint or bitmap `name` was left behind by this VM's runs on this
    /// repository: a run that was killed (its `.partial`, among `interrupted`, just removed)
    /// or an older backup here, and not the one the next incremental builds on. Those of other
    /// repositories' chains and of other tools are never touched.
    fn left_behind(&self, name: &str, vm_dir: &Path, interrupted: &[String]) -> bool {
        let Some(id) = name.strip_prefix("nasbak-").filter(|id| id.parse::<BackupId>().is_ok()) else { return false };
        let killed = interrupted.iter().any(|p| p.strip_suffix(PARTIAL_SUFFIX) == Some(id));
        (killed || vm_dir.join(id).is_dir()) && self.record.as_ref().is_none_or(|r| r.name != name)
    }
}

/// Decides the chain of `request`'s backup of a running VM whose chosen disks are `files`, and
/// readies the parent's checkpoint in libvirt when the backup builds on it. `sizes` are the
/// disks' virtual sizes by target; `interrupted` the `.partial` directories of killed runs this
/// backup just removed from `vm_dir`.
pub(crate) fn decide<H: Hypervisor, I: ImageTool>(
    hypervisor: &H,
    images: &I,
    request: &BackupRequest,
    vm_dir: &Path,
    interrupted: &[String],
    (files, rbd): (&[(&Disk, String)], &HashMap<String, RbdDisk>),
    sizes: &HashMap<String, u64>,
) -> ChainDecision {
    let (vm, requested, full_every) = (request.vm.as_str(), request.mode, request.full_every);
    let previous = Previous::read(vm_dir, vm);
    let parent = previous.parent();
    let record = previous.record.clone();
    let mut facts = previous.facts(images, (vm_dir, vm), (files, rbd), sizes, |d| {
        if d.format.as_deref() != Some("qcow2") {
            BitmapState::Unsupported
        } else if previous.recorded.contains(&d.target) {
            BitmapState::Valid
        } else {
            BitmapState::Missing
        }
    });
    // Holding the VM lock: checkpoints libvirt still lists that this VM's runs here left
    // behind go, with their bitmaps.
    let mut listed = hypervisor.checkpoints(vm).unwrap_or_default();
    let mut removed = Vec::new();
    for name in listed.iter().filter(|n| previous.left_behind(n, vm_dir, interrupted)) {
        if hypervisor.delete_checkpoint(vm, name).is_err() {
            let _ = hypervisor.forget_checkpoint(vm, name);
        }
        removed.push(name.clone());
    }
    listed.retain(|n| !removed.contains(n));
    // A parent with RBD snapshots and no checkpoint (no disk of it kept a bitmap) needs none:
    // its RBD disks build on their snapshots, and any other disk's bitmap is missing.
    let by_snapshot = |f: &DiskFacts| f.bitmap == BitmapState::Snapshot;
    let state = match &record {
        Some(r) if listed.contains(&r.name) => CheckpointState::Present,
        Some(_) => CheckpointState::Redefinable,
        None if facts.iter().any(by_snapshot) => CheckpointState::Present,
        None => CheckpointState::Unusable { reason: "none recorded".into() },
    };
    let mut plan = plan_chain(requested, full_every, &parent, &state, &facts);
    let mut redefined = false;
    // Validated: libvirt checks that every disk's bitmap is there and consistent. When it
    // refuses, each planned disk's bitmap is tried alone, and the chain goes on with those
    // libvirt accepts; the others are copied in full. RBD disks have none to check.
    let planned: Vec<String> = plan
        .disks
        .iter()
        .filter(|d| d.mode == BackupMode::Incremental)
        .filter(|d| !facts.iter().any(|f| f.target == d.target && by_snapshot(f)))
        .map(|d| d.target.clone())
        .collect();
    if plan.redefine_checkpoint
        && !planned.is_empty()
        && let Some(r) = &record
    {
        let planned: Vec<&str> = planned.iter().map(String::as_str).collect();
        match redefine_accepted(hypervisor, vm, r, &planned) {
            Ok(refused) => {
                redefined = true;
                if !refused.is_empty() {
                    for f in facts.iter_mut().filter(|f| refused.contains(&f.target)) {
                        f.bitmap = BitmapState::Missing;
                    }
                    plan = plan_chain(requested, full_every, &parent, &state, &facts);
                }
            }
            Err(message) => {
                let state = CheckpointState::Unusable { reason: format!("redefining it failed: {message}") };
                plan = plan_chain(requested, full_every, &parent, &state, &facts);
            }
        }
    }
    // The job builds on the parent's checkpoint only for disks with a bitmap.
    let with_bitmap = plan
        .disks
        .iter()
        .any(|d| d.mode == BackupMode::Incremental && !facts.iter().any(|f| f.target == d.target && by_snapshot(f)));
    let from = with_bitmap.then(|| record.as_ref().map(|r| r.name.clone())).flatten();
    ChainDecision { plan, from, parent_checkpoint: record, redefined, removed }
}

/// Redefines the parent's checkpoint `r`, validated. When libvirt refuses it, each of the
/// `planned` disks' bitmaps is tried alone and the checkpoint is redefined with the accepted
/// ones only: returns the disks refused, or libvirt's first message when none is accepted.
fn redefine_accepted<H: Hypervisor>(
    hypervisor: &H,
    vm: &str,
    r: &CheckpointRecord,
    planned: &[&str],
) -> Result<Vec<String>, String> {
    let first = match hypervisor.redefine_checkpoint(vm, &r.xml, true) {
        Ok(()) => return Ok(Vec::new()),
        Err(e) => e.message,
    };
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for target in planned {
        let alone = Checkpoint::with_bitmaps_only(&r.xml, &[target]);
        if hypervisor.redefine_checkpoint(vm, &alone, true).is_ok() {
            let _ = hypervisor.forget_checkpoint(vm, &r.name);
            accepted.push(*target);
        } else {
            refused.push((*target).to_owned());
        }
    }
    if accepted.is_empty() {
        return Err(first);
    }
    hypervisor
        .redefine_checkpoint(vm, &Checkpoint::with_bitmaps_only(&r.xml, &accepted), true)
        .map_err(|e| e.message)?;
    Ok(refused)
}

/// Why the files of disk `target` in the chain ending in backup `newest` cannot be built on, or
/// `None` when they can. What is cheap to prove without reading the data: each file of the
/// chain is there with the size its manifest records, `qemu-img check` finds it clean (or with
/// leaks only), and each incremental file's backing link leads to the parent's file its
/// manifest names. A changed byte inside the data is found by `verify`, which reads every byte.
pub(crate) fn disk_chain_problem<I: ImageTool>(
    images: &I,
    vm_dir: &Path,
    vm: &str,
    newest: &Manifest,
    target: &str,
) -> Option<String> {
    let disk = newest.disks.iter().find(|d| d.target == target)?;
    let mut files = vec![(vm_dir.join(&newest.id), disk.clone())];
    match nasbak_repo::store::ancestors(vm_dir, vm, &newest.id, disk) {
        Ok(chain) => files.extend(chain),
        Err(e) => return Some(crate::error::chain(&e)),
    }
    for (dir, d) in &files {
        let path = dir.join(&d.file);
        let shown = format!("{}/{}", dir.file_name().unwrap_or_default().to_string_lossy(), d.file);
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => return Some(format!("{shown} cannot be read: {e}")),
        };
        if size != d.size {
            return Some(format!("{shown} is {size} bytes, its manifest says {}", d.size));
        }
        // An encrypted file opens only with the key: the backup checks it with the key once the
        // chain is decided (`keep_chain_uniform`).
        if !d.stored_as.is_encrypted() {
            let location = ImageLocation::Path(path.clone());
            match images.check(&location, &ImageFormat::Qcow2).map(|c| c.verdict) {
                Ok(CheckVerdict::Clean | CheckVerdict::Leaks) => {}
                Ok(verdict) => return Some(format!("qemu-img check of {shown} says {verdict:?}")),
                Err(e) => return Some(format!("qemu-img check of {shown} failed: {}", crate::error::chain(&e))),
            }
        }
        // A qcow2 inside a LUKS container names no backing file: its chain is the manifests'.
        if let Some(backing) = d.backing.as_ref().filter(|_| d.stored_as != nasbak_repo::FileFormat::CompressedInLuks)
            && let Some(problem) = crate::store::link_problem(images, &path, &dir.join(backing))
        {
            return Some(format!("{shown}: {problem}"));
        }
    }
    None
}

/// The record of the checkpoint `name` the job created, standalone (its parent left out, since
/// the parent is deleted once this backup is in place); `None` when libvirt has no such
/// checkpoint (no disk could keep a bitmap).
pub(crate) fn record<H: Hypervisor>(hypervisor: &H, vm: &str, name: &str) -> Option<CheckpointRecord> {
    let xml = hypervisor.checkpoint_xml(vm, name).ok()?;
    Some(CheckpointRecord { name: name.to_owned(), xml: Checkpoint::without_parent(&xml) })
}

/// After the backup is in place: the parent's checkpoint deleted with its bitmaps (defined
/// again first when libvirt has forgotten it), the new checkpoint forgotten (its bitmaps stay
/// for the next incremental). Best effort: a failure leaves at most a bitmap or a record behind,
/// never a wrong backup.
pub(crate) fn after_success<H: Hypervisor>(
    hypervisor: &H,
    vm: &str,
    parent: Option<&CheckpointRecord>,
    created: Option<&str>,
) {
    if let Some(p) = parent {
        delete_everywhere(hypervisor, vm, p);
    }
    if let Some(c) = created {
        let _ = hypervisor.forget_checkpoint(vm, c);
    }
}

/// Deletes checkpoint `p` with every disk's bitmap of it, by its whole definition (the backup
/// may have redefined it with some disks' bitmaps only). libvirt refuses the whole deletion when
/// one disk's bitmap is gone (deleted, or lost in a crash): then each disk's bitmap is deleted
/// on its own. What cannot be deleted is forgotten.
fn delete_everywhere<H: Hypervisor>(hypervisor: &H, vm: &str, p: &CheckpointRecord) {
    let forget = || {
        if hypervisor.checkpoints(vm).is_ok_and(|n| n.contains(&p.name)) {
            let _ = hypervisor.forget_checkpoint(vm, &p.name);
        }
    };
    forget();
    if hypervisor.redefine_checkpoint(vm, &p.xml, false).is_ok() && hypervisor.delete_checkpoint(vm, &p.name).is_ok() {
        return;
    }
    let disks = Checkpoint::parse(&p.xml).map(|c| c.disks).unwrap_or_default();
    for (target, _) in disks.iter().filter(|(_, bitmap)| *bitmap) {
        forget();
        let alone = Checkpoint::with_bitmaps_only(&p.xml, &[target]);
        if hypervisor.redefine_checkpoint(vm, &alone, false).is_ok() {
            let _ = hypervisor.delete_checkpoint(vm, &p.name);
        }
    }
    forget();
}

/// After a failed backup: the checkpoint it created deleted with its bitmaps, the parent's
/// forgotten again if this backup redefined it. The chain goes on from the parent next time.
pub(crate) fn after_failure<H: Hypervisor>(hypervisor: &H, vm: &str, redefined: Option<&str>, created: &str) {
    if hypervisor.checkpoints(vm).is_ok_and(|n| n.iter().any(|c| c == created)) {
        let _ = hypervisor.delete_checkpoint(vm, created);
    }
    if let Some(p) = redefined {
        let _ = hypervisor.forget_checkpoint(vm, p);
    }
}

/// What the planner needs of each chosen disk: its identity, file, size (by target, from
/// `sizes`) and `bitmap`.
fn disk_facts(
    files: &[(&Disk, String)],
    bitmap: impl Fn(&Disk) -> BitmapState,
    sizes: &HashMap<String, u64>,
    chain_problem: impl Fn(&str) -> Option<String>,
) -> Vec<DiskFacts> {
    files
        .iter()
        .map(|(d, file)| DiskFacts {
            target: d.target.clone(),
            volume: volume_of(d).to_string(),
            file: file.clone(),
            virtual_size: sizes.get(&d.target).copied().unwrap_or(0),
            bitmap: bitmap(d),
            chain_problem: chain_problem(&d.target),
        })
        .collect()
}

/// A qcow2 file disk of a shut-off VM: its image path, which can carry persistent bitmaps.
pub(crate) fn bitmap_file(disk: &Disk) -> Option<&Path> {
    match &disk.source {
        Some(nasbak_libvirt::DiskSource::File(p)) if disk.format.as_deref() == Some("qcow2") => Some(p),
        _ => None,
    }
}

/// Decides the chain of `request`'s backup of a shut-off VM whose chosen disks are `files`.
/// Each qcow2 disk's bitmap for the parent's checkpoint is read from its image's `qemu-img
/// info` in `sources` (by target; no process has the image open, so its flags are reliable):
/// there and enabled is valid; marked in use (QEMU died with the image open) or disabled is
/// inconsistent. Bitmaps this VM's runs here left behind (see the running case) are removed
/// from the images. Nothing in libvirt is touched.
pub(crate) fn decide_stopped<I: ImageTool>(
    images: &I,
    request: &BackupRequest,
    vm_dir: &Path,
    interrupted: &[String],
    (files, rbd): (&[(&Disk, String)], &HashMap<String, RbdDisk>),
    sources: &HashMap<String, ImageInfo>,
) -> ChainDecision {
    let (vm, requested, full_every) = (request.vm.as_str(), request.mode, request.full_every);
    let previous = Previous::read(vm_dir, vm);
    let record = previous.record.clone();
    let sizes: HashMap<String, u64> = sources.iter().map(|(t, i)| (t.clone(), i.virtual_size)).collect();
    let facts = previous.facts(images, (vm_dir, vm), (files, rbd), &sizes, |d| {
        let (Some(_), Some(r)) = (bitmap_file(d), &record) else { return BitmapState::Unsupported };
        if !previous.recorded.contains(&d.target) {
            return BitmapState::Missing;
        }
        match sources.get(&d.target).and_then(|top| top.bitmaps.iter().find(|b| b.name == r.name)) {
            None => BitmapState::Missing,
            Some(b) if b.flags.iter().any(|f| f == "in-use") || !b.flags.iter().any(|f| f == "auto") => {
                BitmapState::Inconsistent
            }
            Some(_) => BitmapState::Valid,
        }
    });
    let mut removed = Vec::new();
    for (disk, _) in files {
        let (Some(file), Some(top)) = (bitmap_file(disk), sources.get(&disk.target)) else { continue };
        for b in top.bitmaps.iter().filter(|b| previous.left_behind(&b.name, vm_dir, interrupted)) {
            if images.remove_bitmap(file, &b.name).is_ok() && !removed.contains(&b.name) {
                removed.push(b.name.clone());
            }
        }
    }
    let plan = plan_chain(requested, full_every, &previous.parent(), &CheckpointState::Present, &facts);
    let from = (plan.mode == BackupMode::Incremental).then(|| record.as_ref().map(|r| r.name.clone())).flatten();
    ChainDecision { plan, from, parent_checkpoint: record, redefined: false, removed }
}

/// The checkpoint record of a shut-off VM's backup `name`, whose bitmap was added to the
/// disks `with_bitmap` (targets) of the domain `domain_xml`: the definition libvirt would have
/// written, so that the next backup (of the VM running or not) builds on it, and libvirt can
/// redefine it once the VM runs.
pub(crate) fn offline_record(name: &str, domain_xml: &str, disks: &[(&Disk, bool)], now: i64) -> CheckpointRecord {
    let mut xml =
        format!("<domaincheckpoint>\n  <name>{name}</name>\n  <creationTime>{now}</creationTime>\n  <disks>\n");
    for (d, bitmap) in disks {
        if *bitmap {
            xml.push_str(&format!("    <disk name='{}' checkpoint='bitmap' bitmap='{name}'/>\n", d.target));
        } else {
            xml.push_str(&format!("    <disk name='{}' checkpoint='no'/>\n", d.target));
        }
    }
    xml.push_str("  </disks>\n");
    let domain = domain_xml.trim();
    let domain = domain.strip_prefix("<?xml").map_or(domain, |r| r.split_once("?>").map_or(r, |(_, rest)| rest.trim()));
    xml.push_str(domain);
    xml.push_str("\n</domaincheckpoint>\n");
    CheckpointRecord { name: name.to_owned(), xml }
}

/// After a shut-off VM's backup is in place: the parent's bitmap removed from each qcow2 disk's
/// image (the new one stays for the next incremental), and libvirt's record of the parent's
/// checkpoint, should it have one, forgotten. Best effort.
pub(crate) fn after_stopped_success<H: Hypervisor, I: ImageTool>(
    hypervisor: &H,
    images: &I,
    vm: &str,
    parent: Option<&CheckpointRecord>,
    disks: &[&Disk],
) {
    let Some(p) = parent else { return };
    // An image without that bitmap (a disk added since, a bitmap already gone) refuses: fine.
    for file in disks.iter().filter_map(|d| bitmap_file(d)) {
        let _ = images.remove_bitmap(file, &p.name);
    }
    if hypervisor.checkpoints(vm).is_ok_and(|n| n.contains(&p.name)) {
        let _ = hypervisor.forget_checkpoint(vm, &p.name);
    }
}

/// Removes the bitmaps of the retired checkpoints of `vm_dir`: from a running VM through
/// libvirt, from a shut-off one's qcow2 images with qemu-img. Returns what it removed.
pub(crate) fn remove_retired<H: Hypervisor, I: ImageTool>(
    hypervisor: &H,
    images: &I,
    vm: &str,
    running: bool,
    disks: &[&Disk],
    vm_dir: &Path,
) -> Vec<String> {
    let mut removed = Vec::new();
    for (file, record) in nasbak_repo::store::retired_checkpoints(vm_dir) {
        if running {
            delete_everywhere(hypervisor, vm, &record);
        } else {
            after_stopped_success(hypervisor, images, vm, Some(&record), disks);
        }
        if fs::remove_file(&file).is_ok() {
            removed.push(record.name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use nasbak_repo::store::retire_checkpoint;

    fn manifest(id: &str, checkpoint: bool) -> Manifest {
        let mut m = crate::test_support::manifest(id, &[]);
        m.checkpoint =
            checkpoint.then(|| CheckpointRecord { name: format!("nasbak-{id}"), xml: "<domaincheckpoint/>".into() });
        m
    }

    #[test]
    fn only_the_newest_backups_checkpoint_is_retired() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["2026.11.30.02.00.00", "2026.12.01.02.00.00-9", "2026.12.01.02.00.00-10"] {
            fs::create_dir_all(dir.path().join(id)).unwrap();
        }
        // An older one's bitmaps went when the next backup was made; one without a checkpoint
        // has none.
        retire_checkpoint(dir.path(), &manifest("2026.11.30.02.00.00", true)).unwrap();
        retire_checkpoint(dir.path(), &manifest("2026.12.01.02.00.00-9", true)).unwrap();
        retire_checkpoint(dir.path(), &manifest("2026.12.01.02.00.00-10", false)).unwrap();
        assert!(nasbak_repo::store::retired_checkpoints(dir.path()).is_empty());
        retire_checkpoint(dir.path(), &manifest("2026.12.01.02.00.00-10", true)).unwrap();
        let retired = nasbak_repo::store::retired_checkpoints(dir.path());
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].1.name, "nasbak-2026.12.01.02.00.00-10");
    }
}
