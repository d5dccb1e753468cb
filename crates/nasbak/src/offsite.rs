//! Off-site copies (feature `s3`): a repository's backups copied to an S3 target, and the
//! backups there listed and verified.
//!
//! On the target a backup keeps the repository's layout: its files are the objects
//! `<prefix>/<vm>/<backup-id>/<file>`, so any S3 tool that downloads a VM's objects gives back a
//! directory nasbak (and stock `qemu-img`) reads as it is. Each object carries the checksum of
//! its bytes in its metadata ([`crate::objstore::CHECKSUM_META`]). The manifest goes up last: a backup whose
//! manifest is not on the target is an interrupted copy, never listed as a backup. Parents go
//! up before their children, so a chain on the target is always whole up to its newest
//! manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use nasbak_process::CancelHandle;
use nasbak_qemu_img::CheckVerdict;
use nasbak_repo::store::{BackupEntry, BackupKind, list_backups};
use nasbak_repo::{BackupId, BackupMode, BackupRepository, Manifest, Mounter, VmName};

use crate::engine::Catalog;
use crate::error::BackupError;
use crate::objstore::{CHECK_DIR, ObjectStore, UploadOptions};
use crate::outcome::{
    BackupCopy, CopyReport, CopyResult, CopySelection, FileStatus, FileVerdict, TargetBackup, VerifyReport,
};
use crate::progress::{Observer, Phase, Progress};
use crate::transfer::hash::{StreamChecksum, blake3_file};

/// The manifest's file name, on the repository and on the target.
const MANIFEST: &str = nasbak_repo::model::layout::MANIFEST_FILE;

impl<H, A, I, M> crate::engine::Engine<H, A, I, M>
where
    H: nasbak_libvirt::Hypervisor,
    A: crate::engine::AgentSource,
    I: nasbak_qemu_img::ImageTool + Sync,
    M: Mounter,
{
    /// `vm`'s backups on `target`, mounted under the engine's runtime directory as a repository
    /// (see [`TargetView`](crate::objview::TargetView)): the engine's restores run over
    /// [`TargetView::repository`](crate::objview::TargetView::repository) straight from the
    /// object store, chains resolved there. Dropping the view unmounts it.
    pub fn target_view(
        &self,
        target: &nasbak_repo::ObjectTarget,
        vm: &str,
    ) -> Result<crate::objview::TargetView, BackupError> {
        let vm = VmName::new(vm)?;
        Ok(crate::objview::TargetView::open(target, &vm, &self.runtime_dir)?)
    }
}

impl<I: nasbak_qemu_img::ImageTool, M: Mounter> Catalog<'_, I, M> {
    /// Copies backups of `repository` to `store`'s target: `selection`'s backups and every
    /// backup their chains build on, oldest first, so parents go before children.
    ///
    /// For each backup, every file goes up (a file already on the target with the same size and
    /// checksum is kept; an interrupted upload resumes from its last part), then the manifest.
    /// A backup whose manifest on the target is its own (by checksum) is skipped as already
    /// copied. With the target's object lock, every object is locked for its days from the
    /// copy's start. A backup of the reference system (no manifest) or a damaged one is
    /// skipped, with the reason, and so is a child whose parent could not be copied.
    ///
    /// `bandwidth` limits the upload (bytes per second, on average over each part). The first
    /// error stops the copy (what went up stays, and the next copy resumes it); a cancel through
    /// `cancel` stops it at the next part.
    pub fn copy_to_target(
        &self,
        repository: &BackupRepository,
        store: &ObjectStore,
        selection: &CopySelection,
        bandwidth: Option<u64>,
        cancel: &CancelHandle,
        observer: &mut dyn Observer,
    ) -> Result<CopyReport, BackupError> {
        let mounted = self.mounts().acquire(repository)?;
        let repo = repository.name().as_str();
        let vm_filter = match selection {
            CopySelection::Backup { vm, .. } | CopySelection::Vm(vm) => Some(vm.as_str()),
            CopySelection::All => None,
        };
        if let Some(vm) = vm_filter {
            VmName::new(vm)?;
        }
        let all = list_backups(repo, mounted.root(), vm_filter)?;
        let by_key: BTreeMap<(String, String), &BackupEntry> =
            all.iter().map(|b| ((b.vm.clone(), b.id.clone()), b)).collect();
        let mut wanted: BTreeSet<(String, String)> = match selection {
            CopySelection::Backup { vm, id } => {
                if !by_key.contains_key(&(vm.clone(), id.clone())) {
                    return Err(BackupError::NotFound { what: format!("backup {repo}:{vm}/{id}") });
                }
                [(vm.clone(), id.clone())].into()
            }
            _ => by_key.keys().cloned().collect(),
        };
        // The backups the chosen ones build on, found through their manifests.
        let mut stack: Vec<(String, String)> = wanted.iter().cloned().collect();
        while let Some(key) = stack.pop() {
            if let Some(BackupKind::Nasbak(m)) = by_key.get(&key).map(|b| &b.kind) {
                for parent in parents(m) {
                    let pk = (key.0.clone(), parent);
                    if wanted.insert(pk.clone()) {
                        stack.push(pk);
                    }
                }
            }
        }
        let mut report =
            CopyReport { target: store.target().name().to_string(), repository: repo.to_owned(), backups: Vec::new() };
        let mut on_target: BTreeSet<(String, String)> = BTreeSet::new();
        // Backup ids sort by time: a parent before every child.
        for key in wanted {
            let (vm, id) = (&key.0, &key.1);
            let skipped = |reason: String| BackupCopy {
                backup: format!("{repo}:{vm}/{id}"),
                vm: vm.clone(),
                id: id.clone(),
                result: CopyResult::Skipped { reason },
                files: 0,
                sent: 0,
                kept: 0,
                locked_until: None,
            };
            let Some(entry) = by_key.get(&key) else {
                report.backups.push(skipped(format!(
                    "a backup of its chain, {vm}/{id}, is not on repository {repo}: copy the chain whole or not at all"
                )));
                continue;
            };
            let manifest = match &entry.kind {
                BackupKind::Nasbak(m) => m,
                BackupKind::Reference { .. } => {
                    report.backups.push(skipped(
                        "written by the reference system: it has no manifest, so its copy could not be shown complete"
                            .into(),
                    ));
                    continue;
                }
                BackupKind::Damaged { reason } => {
                    report.backups.push(skipped(format!("damaged: {reason}")));
                    continue;
                }
            };
            if let Some(missing) = parents(manifest).into_iter().find(|p| !on_target.contains(&(vm.clone(), p.clone())))
            {
                report.backups.push(skipped(format!("it builds on {vm}/{missing}, which is not on the target")));
                continue;
            }
            let dir = mounted.layout().backup_dir(&VmName::new(vm)?, &id.parse::<BackupId>()?);
            let journal = self.mounts().runtime_dir().join("uploads");
            let copy = copy_backup(store, (repo, vm, id), &dir, manifest, (bandwidth, &journal), cancel, observer)?;
            on_target.insert(key.clone());
            report.backups.push(copy);
        }
        Ok(report)
    }
}

/// The ids of the backups `m`'s disks build on (their backing links, `../ID/FILE`), and its
/// recorded parent.
fn parents(m: &Manifest) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = m.parent.iter().cloned().collect();
    for d in m.disks.iter().filter(|d| d.mode == BackupMode::Incremental) {
        if let Some((parent, _)) =
            d.backing.as_deref().and_then(|b| b.strip_prefix("../")).and_then(|r| r.split_once('/'))
        {
            out.insert(parent.to_owned());
        }
    }
    out
}

/// The checksum (`ALGORITHM:HEX`) of each file the manifest records one for.
fn recorded_checksums(m: &Manifest) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for d in &m.disks {
        if let Some(c) = &d.checksum {
            out.insert(d.file.clone(), format!("{}:{}", c.algorithm, c.value));
        }
    }
    for s in &m.state {
        out.insert(s.file.clone(), format!("{}:{}", s.checksum.algorithm, s.checksum.value));
    }
    out
}

/// Copies one backup's directory `dir`: its files, then its manifest.
#[allow(clippy::too_many_arguments)]
fn copy_backup(
    store: &ObjectStore,
    (repo, vm, id): (&str, &str, &str),
    dir: &Path,
    manifest: &Manifest,
    (bandwidth, journal): (Option<u64>, &Path),
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<BackupCopy, BackupError> {
    let io = |what: &Path, e: std::io::Error| BackupError::Io {
        action: "reading the backup file",
        path: what.to_owned(),
        source: e,
    };
    let manifest_path = dir.join(MANIFEST);
    let manifest_bytes = fs::read(&manifest_path).map_err(|e| io(&manifest_path, e))?;
    let manifest_sum = format!("blake3:{}", blake3::hash(&manifest_bytes).to_hex());
    let prefix = format!("{vm}/{id}");
    let lock_days = store.target().lock().map(|l| l.days);
    let locked_until = lock_days.map(|d| SystemTime::now() + Duration::from_secs(u64::from(d) * 86_400));
    let mut copy = BackupCopy {
        backup: format!("{repo}:{vm}/{id}"),
        vm: vm.to_owned(),
        id: id.to_owned(),
        result: CopyResult::Copied,
        files: 0,
        sent: 0,
        kept: 0,
        locked_until: None,
    };
    // Already there, unless the target locks and the manifest there is not locked (copied
    // before the target locked): then every object is checked and locked below.
    if let Some(head) = store.head(&format!("{prefix}/{MANIFEST}"))?
        && head.checksum.as_deref() == Some(manifest_sum.as_str())
        && (locked_until.is_none() || head.locked_until.is_some())
    {
        copy.result = CopyResult::AlreadyCopied;
        copy.locked_until = head.locked_until.and_then(|s| chrono::DateTime::from_timestamp(s, 0));
        return Ok(copy);
    }
    // Every regular file of the directory but the manifest (and no hidden temporary file).
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata().map_err(|e| io(&entry.path(), e))?;
        if meta.is_file() && name != MANIFEST && !name.starts_with('.') {
            files.push((name, meta.len()));
        }
    }
    files.sort();
    let recorded = recorded_checksums(manifest);
    let total: u64 = files.iter().map(|f| f.1).sum::<u64>() + manifest_bytes.len() as u64;
    let options = UploadOptions::new(bandwidth, locked_until).with_journal(journal);
    let mut done = 0u64;
    for (name, size) in &files {
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let path = dir.join(name);
        let sum = match recorded.get(name) {
            Some(sum) => sum.clone(),
            None => format!("blake3:{}", blake3_file(&path).map_err(|e| io(&path, e))?),
        };
        let key = format!("{prefix}/{name}");
        if let Some(head) = store.head(&key)?
            && head.size == *size
            && head.checksum.as_deref() == Some(sum.as_str())
        {
            if let Some(until) = locked_until
                && head.locked_until.is_none()
            {
                store.ensure_locked(&key, head.version.as_deref(), until).map_err(|e| stopped(e, cancel))?;
            }
            copy.kept += size;
            done += size;
            observer(&Progress::new(Phase::Upload, vm, done, total).on_disk(name.clone()));
            continue;
        }
        let base = done;
        let up = store
            .upload_file(&key, &path, &sum, &options, cancel, &mut |n| {
                observer(&Progress::new(Phase::Upload, vm, base + n, total).on_disk(name.clone()))
            })
            .map_err(|e| stopped(e, cancel))?;
        copy.sent += up.sent;
        copy.kept += up.resumed;
        done += size;
    }
    // Last, the manifest: the backup is on the target from now on.
    let up = store.upload_file(
        &format!("{prefix}/{MANIFEST}"),
        &manifest_path,
        &manifest_sum,
        &options,
        cancel,
        &mut |_| {},
    )?;
    copy.sent += up.sent;
    copy.files = files.len() + 1;
    observer(&Progress::new(Phase::Upload, vm, total, total));
    copy.locked_until = locked_until.map(chrono::DateTime::<chrono::Utc>::from);
    Ok(copy)
}

/// A target's error, or [`BackupError::Cancelled`] when it came of a cancel.
fn stopped(e: crate::error::TargetError, cancel: &CancelHandle) -> BackupError {
    if cancel.is_cancelled() { BackupError::Cancelled } else { e.into() }
}

/// The backups on `store`'s target (of `vm` only, when given), oldest first per VM: complete
/// ones with their manifests, and interrupted copies (no manifest) with the reason they are not
/// backups. The check probes and any key not shaped `VM/BACKUP-ID/FILE` are not listed.
pub fn target_backups(store: &ObjectStore, vm: Option<&str>) -> Result<Vec<TargetBackup>, BackupError> {
    if let Some(vm) = vm {
        VmName::new(vm)?;
    }
    let listed = store.list(&vm.map(|v| format!("{v}/")).unwrap_or_default())?;
    let mut groups: BTreeMap<(String, String), (usize, u64, bool)> = BTreeMap::new();
    for o in &listed {
        let mut parts = o.key.splitn(3, '/');
        let (Some(v), Some(id), Some(file)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if v == CHECK_DIR || file.is_empty() || VmName::new(v).is_err() || id.parse::<BackupId>().is_err() {
            continue;
        }
        let g = groups.entry((v.to_owned(), id.to_owned())).or_default();
        g.0 += 1;
        g.1 += o.size;
        g.2 |= file == MANIFEST;
    }
    let name = store.target().name().to_string();
    let mut out = Vec::new();
    for ((v, id), (objects, bytes, has_manifest)) in groups {
        let (manifest, incomplete) = if has_manifest {
            match store.get_bytes(&format!("{v}/{id}/{MANIFEST}")) {
                Ok(bytes) => match String::from_utf8(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|t| Manifest::from_json(&t).map_err(|e| e.to_string()))
                {
                    Ok(m) => (Some(Box::new(m)), None),
                    Err(e) => (None, Some(format!("its manifest on the target is invalid: {e}"))),
                },
                Err(e) => return Err(e.into()),
            }
        } else {
            (None, Some("an interrupted copy: its manifest is not on the target (copy it again to finish it)".into()))
        };
        out.push(TargetBackup { backup: format!("{name}:{v}/{id}"), vm: v, id, manifest, incomplete, objects, bytes });
    }
    Ok(out)
}

/// Verifies backups on `store`'s target (of `vm` only, or one backup `vm/id`, when given):
/// each object is streamed and hashed (nothing is written locally) and checked against the
/// checksum recorded on it at upload, and each file the manifest records a checksum for
/// against the manifest; a file the manifest lists that is not there is missing, and so is a
/// parent of its chain that is not on the target. An interrupted copy is reported as damaged.
/// `qemu-img check` needs random access, so it is not run here (`check` is `Unsupported`).
pub fn verify_target(
    store: &ObjectStore,
    vm: Option<&str>,
    id: Option<&str>,
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<Vec<VerifyReport>, BackupError> {
    let backups = target_backups(store, vm)?;
    if let (Some(vm), Some(id)) = (vm, id)
        && !backups.iter().any(|b| b.id == id)
    {
        return Err(BackupError::NotFound { what: format!("backup {}:{vm}/{id}", store.target().name()) });
    }
    let complete: BTreeSet<(String, String)> =
        backups.iter().filter(|b| b.manifest.is_some()).map(|b| (b.vm.clone(), b.id.clone())).collect();
    let mut reports = Vec::new();
    for b in backups.iter().filter(|b| id.is_none_or(|id| b.id == id)) {
        let Some(manifest) = &b.manifest else {
            reports.push(VerifyReport::of_damaged(b.backup.clone(), b.incomplete.clone().unwrap_or_default()));
            continue;
        };
        let prefix = format!("{}/{}/", b.vm, b.id);
        let objects = store.list(&prefix)?;
        let recorded = recorded_checksums(manifest);
        let total: u64 = objects.iter().map(|o| o.size).sum();
        let mut done = 0u64;
        let mut files = Vec::new();
        let present: BTreeSet<&str> = objects.iter().filter_map(|o| o.key.strip_prefix(&prefix)).collect();
        for d in &manifest.disks {
            if !d.reference && !present.contains(d.file.as_str()) {
                files.push(missing(&d.file, "the manifest lists it, but it is not on the target"));
            }
        }
        for parent in parents(manifest) {
            if !complete.contains(&(b.vm.clone(), parent.clone())) {
                files.push(missing(
                    &format!("../{parent}"),
                    &format!("its chain builds on {}/{parent}, which is not on the target", b.vm),
                ));
            }
        }
        for o in &objects {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let Some(file) = o.key.strip_prefix(&prefix) else { continue };
            let verdict =
                verify_object(store, &o.key, file, recorded.get(file).map(String::as_str), cancel, &mut |n| {
                    observer(&Progress::new(Phase::Verify, &b.vm, done + n, total).on_disk(file.to_owned()))
                });
            if verdict.error.as_deref() == Some("cancelled") {
                return Err(BackupError::Cancelled);
            }
            done += o.size;
            files.push(verdict);
        }
        reports.push(VerifyReport { backup: b.backup.clone(), damaged: None, files });
    }
    Ok(reports)
}

/// Prunes the backups of `vm` on `store`'s target by `policy` and the schedules' limits
/// ([`crate::plan_prune`], as on a repository), for copies that cannot be changed:
///
/// - nothing is merged: a backup the retention would remove stays while a kept backup's chain
///   builds on it (said in its reason);
/// - a backup with any object version still locked stays, its reason saying until when; it
///   never stops the prune;
/// - a backup that goes loses every version of every object, its manifest first (so that,
///   stopped halfway, it is an interrupted copy, never a backup with files missing).
///
/// Interrupted copies (no manifest) are neither counted nor removed (a later copy finishes
/// them). `dry_run` decides and removes nothing.
pub fn prune_target(
    store: &ObjectStore,
    vm: &str,
    policy: Option<&nasbak_repo::RetentionPolicy>,
    schedule_keep: &BTreeMap<String, u32>,
    dry_run: bool,
) -> Result<crate::outcome::PruneReport, BackupError> {
    VmName::new(vm)?;
    let backups: Vec<TargetBackup> =
        target_backups(store, Some(vm))?.into_iter().filter(|b| b.vm == vm && b.manifest.is_some()).collect();
    let candidates: Vec<crate::retention::PruneCandidate> = backups
        .iter()
        .filter_map(|b| {
            let id: BackupId = b.id.parse().ok()?;
            let schedule = b.manifest.as_ref().and_then(|m| m.schedule.clone());
            Some(crate::retention::PruneCandidate { id: b.id.clone(), time: id.time(), schedule })
        })
        .collect();
    let mut decisions = crate::retention::plan_prune(&candidates, policy, schedule_keep);
    // Newest first: a kept backup keeps the parents of its chain.
    let manifests: BTreeMap<&str, &Manifest> =
        backups.iter().filter_map(|b| Some((b.id.as_str(), b.manifest.as_deref()?))).collect();
    let mut needed: BTreeMap<String, String> = BTreeMap::new();
    for d in &mut decisions {
        if !d.keep
            && let Some(child) = needed.get(&d.id)
        {
            d.keep = true;
            d.reason = format!("kept: backup {child} builds on it (a copy on a target is never merged)");
        }
        if d.keep
            && let Some(m) = manifests.get(d.id.as_str())
        {
            for p in parents(m) {
                needed.entry(p).or_insert_with(|| d.id.clone());
            }
        }
    }
    let now = chrono::Utc::now().timestamp();
    for d in decisions.iter_mut().filter(|d| !d.keep) {
        let prefix = format!("{vm}/{}/", d.id);
        let versions = store.versions(&prefix)?;
        let mut locked = None::<i64>;
        for (key, version) in &versions {
            if let Some(until) = store.locked_until(key, version)?.filter(|u| *u > now) {
                locked = Some(locked.map_or(until, |l| l.max(until)));
            }
        }
        if let Some(until) = locked {
            let when = chrono::DateTime::from_timestamp(until, 0).map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string());
            d.keep = true;
            d.reason = format!(
                "kept: locked on the target until {} ({})",
                when.unwrap_or_else(|| until.to_string()),
                d.reason
            );
            continue;
        }
        if dry_run {
            continue;
        }
        let manifest_key = format!("{prefix}{MANIFEST}");
        let (first, rest): (Vec<_>, Vec<_>) = versions.iter().partition(|(k, _)| *k == manifest_key);
        for (key, version) in first.into_iter().chain(rest) {
            store.delete(key, (version != "null").then_some(version.as_str()))?;
        }
    }
    Ok(crate::outcome::PruneReport { vm: vm.to_owned(), decisions, damaged: Vec::new(), executed: !dry_run })
}

fn missing(file: &str, why: &str) -> FileVerdict {
    FileVerdict::new(file.to_owned(), CheckVerdict::Unsupported, None, Some((FileStatus::Missing, why.to_owned())))
}

/// Streams one object, hashing it with the algorithm of the checksum on it (and of the
/// manifest's, when it records one and it differs).
fn verify_object(
    store: &ObjectStore,
    key: &str,
    file: &str,
    recorded: Option<&str>,
    cancel: &CancelHandle,
    progress: &mut dyn FnMut(u64),
) -> FileVerdict {
    let verdict = |ok: Option<bool>, error: Option<(FileStatus, String)>| {
        FileVerdict::new(file.to_owned(), CheckVerdict::Unsupported, ok, error)
    };
    let head = match store.head(key) {
        Ok(Some(h)) => h,
        Ok(None) => return verdict(None, Some((FileStatus::Missing, "it went away while verifying".into()))),
        Err(e) => return verdict(None, Some((FileStatus::Unreadable, e.to_string()))),
    };
    // What the bytes must hash to: the manifest's checksum where it records one, and the one
    // recorded on the object at upload.
    let mut expected: Vec<&str> = recorded.into_iter().collect();
    if let Some(on_object) = head.checksum.as_deref()
        && !expected.contains(&on_object)
    {
        expected.push(on_object);
    }
    if expected.is_empty() {
        return verdict(
            None,
            Some((FileStatus::Differs, "it carries no checksum (not written by nasbak's copy)".into())),
        );
    }
    let mut hashers = Vec::new();
    for e in &expected {
        let Some((algorithm, value)) = e.split_once(':').filter(|(a, _)| !a.is_empty()) else {
            return verdict(
                Some(false),
                Some((FileStatus::Differs, format!("its checksum {e:?} is not ALGORITHM:HEX"))),
            );
        };
        // A split checksum's value is `H1:H2:H3`: split at the first ':' only.
        match StreamChecksum::new(algorithm) {
            Ok(h) => hashers.push((h, value)),
            Err(err) => return verdict(None, Some((FileStatus::Unreadable, err.to_string()))),
        }
    }
    let mut read = 0u64;
    let result = store.read_object(
        key,
        &mut |chunk| {
            for (h, _) in hashers.iter_mut() {
                h.update(chunk);
            }
            read += chunk.len() as u64;
            progress(read);
            true
        },
        cancel,
    );
    if let Err(e) = result {
        let cancelled = e.detail == "cancelled";
        return verdict(
            None,
            Some((FileStatus::Unreadable, if cancelled { "cancelled".into() } else { e.to_string() })),
        );
    }
    let ok = hashers.into_iter().all(|(h, value)| h.finish() == value);
    verdict(Some(ok), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nasbak_repo::{Checksum, ManifestDisk};

    fn manifest(id: &str, parent: Option<&str>, backing: Option<&str>) -> Manifest {
        let text = format!(
            r#"{{"version":2,"id":"{id}","repository":"r","vm":"vm1","method":"push-job","started":"2026-12-06T00:00:00Z","finished":"2026-12-06T00:00:01Z","quiesced":false,"disks":[],"mode":"full"}}"#
        );
        let mut m = Manifest::from_json(&text).unwrap();
        m.parent = parent.map(str::to_owned);
        if let Some(b) = backing {
            m.mode = BackupMode::Incremental;
            m.disks.push(ManifestDisk {
                target: "vda".into(),
                volume: "v".into(),
                source: "/v".into(),
                source_format: None,
                file: "root.v.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 1,
                size: 1,
                checksum: Some(Checksum { algorithm: "blake3".into(), value: "ab".into() }),
                mode: BackupMode::Incremental,
                backing: Some(b.into()),
                full_reason: None,
                stored_as: Default::default(),
                rbd_snapshot: None,
                reference: false,
            });
        }
        m
    }

    #[test]
    fn a_chain_names_its_parents_by_its_record_and_its_disks_backing_links() {
        let full = manifest("2026.12.06.00.00.00", None, None);
        assert!(parents(&full).is_empty());
        let inc =
            manifest("2026.12.06.01.00.00", Some("2026.12.06.00.00.00"), Some("../2026.12.05.00.00.00/root.v.qcow2"));
        let p: Vec<String> = parents(&inc).into_iter().collect();
        assert_eq!(p, ["2026.12.05.00.00.00", "2026.12.06.00.00.00"]);
        let sums = recorded_checksums(&inc);
        assert_eq!(sums.get("root.v.qcow2").map(String::as_str), Some("blake3:ab"));
    }
}
