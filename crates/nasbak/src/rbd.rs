//! Ceph RBD disks backed up from snapshots of their images.
//!
//! An RBD image keeps no dirty bitmap, but it keeps snapshots, and RBD tells what changed
//! between two of them (with fast-diff, from the object map, without reading the data). Each
//! backup of an RBD disk nasbak can reach itself takes the snapshot `nasbak-<backup id>` of its
//! image (a running VM's guest frozen around it, as around the job start), reads the backup
//! from that snapshot, and records it in the manifest (name, snapshot id, image id). The next
//! backup proves the image still holds that very snapshot, and then writes only what changed
//! since (`rbd export-diff`) into a qcow2 file backed by the parent's, like any incremental.
//! Once it is in place, the older snapshots of this VM's backups on this repository go; the
//! newest stays for the next incremental.
//!
//! An image nasbak cannot reach (its key in a private libvirt secret and no keyring on the
//! host) is read through the backup job as before, in full, with the reason.

use std::collections::HashMap;
use std::path::Path;

use nasbak_libvirt::{Disk, DiskSource, Hypervisor};
use nasbak_qemu_img::{ImageLocation, ImageTool, RbdImageFacts, RbdSpec};
use nasbak_repo::model::layout::PARTIAL_SUFFIX;
use nasbak_repo::{BackupId, ManifestDisk, RbdSnapshotRecord};

use crate::chain::BitmapState;
use crate::error::BackupError;

/// An RBD disk whose image nasbak reaches: where it is (with its key), and what it holds.
#[derive(Debug, Clone)]
pub(crate) struct RbdDisk {
    /// The image, with the domain's monitors, client and key.
    pub spec: RbdSpec,
    /// Its id, size and snapshots, read before the backup decided anything.
    pub facts: RbdImageFacts,
}

/// Whether `disk` is an RBD network disk.
pub(crate) fn is_rbd(disk: &Disk) -> bool {
    matches!(&disk.source, Some(DiskSource::Network { protocol, .. }) if protocol == "rbd")
}

/// The RBD disks among `disks` whose images nasbak reaches, by target. The others (no key on
/// this host, `rbd` failing) are left to the backup job.
pub(crate) fn reachable<H: Hypervisor, I: ImageTool>(
    hypervisor: &H,
    images: &I,
    disks: &[&Disk],
) -> HashMap<String, RbdDisk> {
    let mut found = HashMap::new();
    for disk in disks.iter().filter(|d| is_rbd(d)) {
        let Ok(ImageLocation::Rbd(spec)) = crate::disks::keyed_source(hypervisor, disk) else { continue };
        if let Ok(facts) = images.rbd_image(&spec) {
            found.insert(disk.target.clone(), RbdDisk { spec, facts });
        }
    }
    found
}

/// How far the RBD disk `disk` (`None`: unreachable) can build on its file in the parent
/// backup, `before`.
pub(crate) fn snapshot_state(disk: Option<&RbdDisk>, before: Option<&ManifestDisk>) -> BitmapState {
    let Some(disk) = disk else { return BitmapState::RbdUnreachable };
    let Some(record) = before.and_then(|b| b.rbd_snapshot.as_ref()) else { return BitmapState::SnapshotMissing };
    if disk.facts.id != record.image_id {
        return BitmapState::ImageReplaced;
    }
    match disk.facts.snapshots.iter().find(|s| s.name == record.name) {
        None => BitmapState::SnapshotMissing,
        Some(s) if s.id != record.id => BitmapState::SnapshotForeign,
        Some(_) => BitmapState::Snapshot,
    }
}

/// The snapshots a backup took, by target; removed again when dropped unless the backup was
/// put in place ([`Snapshots::keep`]).
pub(crate) struct Snapshots<'a, I: ImageTool> {
    images: &'a I,
    /// Their name, `nasbak-<backup id>`.
    pub name: String,
    taken: Vec<(String, RbdSpec, RbdSnapshotRecord)>,
    kept: bool,
}

impl<'a, I: ImageTool> Snapshots<'a, I> {
    /// None taken yet; they will be called `name`.
    pub(crate) fn new(images: &'a I, name: String) -> Self {
        Snapshots { images, name, taken: Vec::new(), kept: false }
    }

    /// Takes the snapshot of each disk in `disks` not taken yet, all at once (the monitors
    /// batch snapshot ids: with Ceph's default `paxos_propose_interval` each round costs up to
    /// a second, however many images), a running VM's with its guest frozen. Any failure is the
    /// error; what was taken goes on drop.
    pub(crate) fn take(&mut self, disks: &HashMap<String, RbdDisk>) -> Result<(), BackupError>
    where
        I: Sync,
    {
        let mut targets: Vec<&String> = disks.keys().filter(|t| !self.taken.iter().any(|(x, _, _)| x == *t)).collect();
        targets.sort();
        let (images, name) = (self.images, self.name.as_str());
        let results: Vec<(&String, Result<u64, nasbak_qemu_img::ImageError>)> = std::thread::scope(|scope| {
            let running: Vec<_> = targets
                .iter()
                .map(|t| (*t, scope.spawn(move || images.rbd_snapshot_create(&disks[*t].spec, name))))
                .collect();
            running.into_iter().map(|(t, h)| (t, h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))).collect()
        });
        let mut first_error = None;
        for (target, result) in results {
            let disk = &disks[target];
            match result {
                Ok(id) => self.taken.push((
                    target.clone(),
                    disk.spec.clone(),
                    RbdSnapshotRecord { name: self.name.clone(), id, image_id: disk.facts.id.clone() },
                )),
                Err(e) => {
                    // It may exist all the same (the listing failed): it goes on drop too.
                    self.taken.push((
                        target.clone(),
                        disk.spec.clone(),
                        RbdSnapshotRecord { name: self.name.clone(), id: 0, image_id: String::new() },
                    ));
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// The snapshot taken of disk `target`, for its manifest entry.
    pub(crate) fn record(&self, target: &str) -> Option<RbdSnapshotRecord> {
        self.taken.iter().find(|(t, _, _)| t == target).map(|(_, _, r)| r.clone())
    }

    /// The backup is in place: its snapshots stay.
    pub(crate) fn keep(&mut self) {
        self.kept = true;
    }
}

impl<I: ImageTool> Drop for Snapshots<'_, I> {
    fn drop(&mut self) {
        if !self.kept {
            for (_, spec, _) in &self.taken {
                let _ = self.images.rbd_snapshot_remove(spec, &self.name);
            }
        }
    }
}

/// Removes each `(image, snapshot)` at once (see [`Snapshots::take`] for why at once); the
/// ones removed.
fn remove_all<'s, I: ImageTool + Sync>(images: &I, doomed: &[(&'s RbdSpec, &'s str)]) -> Vec<(&'s RbdSpec, &'s str)> {
    std::thread::scope(|scope| {
        let running: Vec<_> = doomed
            .iter()
            .map(|(spec, name)| (*spec, *name, scope.spawn(move || images.rbd_snapshot_remove(spec, name))))
            .collect();
        running
            .into_iter()
            .filter_map(|(spec, name, h)| h.join().is_ok_and(|r| r.is_ok()).then_some((spec, name)))
            .collect()
    })
}

/// After a backup is in place: each RBD disk's older nasbak snapshots of this VM's runs on this
/// repository (a backup here, or a killed run's `.partial` among `interrupted`) removed, all but
/// `newest`. Snapshots of other repositories' chains and of other tools stay. Best effort:
/// returns what was removed, as notes.
pub(crate) fn remove_older<I: ImageTool + Sync>(
    images: &I,
    disks: &HashMap<String, RbdDisk>,
    vm_dir: &Path,
    interrupted: &[String],
    newest: &str,
) -> Vec<String> {
    let mut doomed: Vec<(&RbdSpec, &str)> = Vec::new();
    for disk in disks.values() {
        for snapshot in &disk.facts.snapshots {
            let Some(id) = snapshot.name.strip_prefix("nasbak-").filter(|id| id.parse::<BackupId>().is_ok()) else {
                continue;
            };
            let ours =
                vm_dir.join(id).is_dir() || interrupted.iter().any(|p| p.strip_suffix(PARTIAL_SUFFIX) == Some(id));
            if ours && snapshot.name != newest {
                doomed.push((&disk.spec, &snapshot.name));
            }
        }
    }
    remove_all(images, &doomed)
        .into_iter()
        .map(|(spec, name)| format!("removed the RBD snapshot {}@{name}", spec.image))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nasbak_qemu_img::RbdSnapshot;

    fn disk(image_id: &str, snaps: &[(u64, &str)]) -> RbdDisk {
        RbdDisk {
            spec: RbdSpec::new("vms", "d"),
            facts: RbdImageFacts {
                id: image_id.into(),
                size: 1 << 30,
                snapshots: snaps
                    .iter()
                    .map(|(id, n)| RbdSnapshot { id: *id, name: (*n).into(), size: 1 << 30 })
                    .collect(),
            },
        }
    }

    fn before(record: Option<(&str, u64, &str)>) -> ManifestDisk {
        let mut m = crate::test_support::manifest("2026.12.06.10.00.00", &[("vdb", "d")]).disks.remove(0);
        m.rbd_snapshot = record.map(|(n, id, image)| RbdSnapshotRecord { name: n.into(), id, image_id: image.into() });
        m
    }

    #[test]
    fn only_the_very_snapshot_the_parent_recorded_is_built_on() {
        let rec = Some(("nasbak-2026.12.06.10.00.00", 7, "abc"));
        let ok = disk("abc", &[(7, "nasbak-2026.12.06.10.00.00")]);
        assert_eq!(snapshot_state(Some(&ok), Some(&before(rec))), BitmapState::Snapshot);
        assert_eq!(snapshot_state(None, Some(&before(rec))), BitmapState::RbdUnreachable);
        assert_eq!(snapshot_state(Some(&ok), Some(&before(None))), BitmapState::SnapshotMissing);
        assert_eq!(snapshot_state(Some(&disk("abc", &[])), Some(&before(rec))), BitmapState::SnapshotMissing);
        let foreign = disk("abc", &[(9, "nasbak-2026.12.06.10.00.00")]);
        assert_eq!(snapshot_state(Some(&foreign), Some(&before(rec))), BitmapState::SnapshotForeign);
        let replaced = disk("def", &[(7, "nasbak-2026.12.06.10.00.00")]);
        assert_eq!(snapshot_state(Some(&replaced), Some(&before(rec))), BitmapState::ImageReplaced);
    }
}
