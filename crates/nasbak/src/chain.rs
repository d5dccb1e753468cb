//! The chain planner: whether a backup is full or incremental, disk by disk, and why. A pure
//! function of what is known about the previous backup, the domain's checkpoint and each disk,
//! so every decision is tested without a hypervisor.
//!
//! The rule: an incremental only on what can be proven. A disk is copied in full (with the reason
//! recorded) when its parent file, its bitmap or its size cannot be trusted; the whole backup is
//! full when the parent backup or the checkpoint cannot. Never an error where a full would do.

use nasbak_repo::{BackupMode, Manifest, backing_path};
use serde::Serialize;

pub use crate::request::{DEFAULT_FULL_EVERY, ModeRequest};

/// The previous backup of the VM on this repository, as far as the chain is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent<'a> {
    /// There is none.
    None,
    /// There is one but it cannot be built on (damaged, unverifiable, written by the reference
    /// system, without a checkpoint).
    Unusable {
        /// Why.
        reason: String,
    },
    /// A backup to build on.
    Usable {
        /// Its manifest.
        manifest: &'a Manifest,
        /// How many backups its chain holds, itself included (1 for a full).
        chain_len: u32,
    },
}

/// The domain's side of the parent's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointState {
    /// libvirt has the checkpoint the parent created.
    Present,
    /// libvirt lost its metadata (domain redefined, another host, state lost); it can be
    /// redefined from the definition kept in the parent's manifest.
    Redefinable,
    /// It cannot be used.
    Unusable {
        /// Why.
        reason: String,
    },
}

/// The dirty bitmap of one disk for the parent's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    /// In the top image, recording, consistent.
    Valid,
    /// Not there.
    Missing,
    /// Marked in use (the VM crashed while it was open) or not recording: it cannot be trusted.
    Inconsistent,
    /// The disk's format holds no persistent bitmap (raw).
    Unsupported,
    /// An RBD disk whose image holds the snapshot the parent was read from: its changes since
    /// come from RBD's diff.
    Snapshot,
    /// An RBD disk whose image no longer holds the parent's snapshot.
    SnapshotMissing,
    /// An RBD disk whose image holds a snapshot of the parent's name that is not the one the
    /// parent recorded (made by someone else, or the image deep-copied).
    SnapshotForeign,
    /// An RBD disk whose image is not the one the parent was read from (removed and created
    /// again under its name).
    ImageReplaced,
    /// An RBD disk whose image nasbak cannot reach itself (no key for it on this host, or
    /// `rbd` fails): read through the backup job, in full.
    RbdUnreachable,
}

/// What is known of one disk of the VM now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    /// Its target device.
    pub target: String,
    /// Its volume identity.
    pub volume: String,
    /// Its file name in this backup.
    pub file: String,
    /// Its guest-visible size now.
    pub virtual_size: u64,
    /// Its bitmap for the parent's checkpoint.
    pub bitmap: BitmapState,
    /// Why its files in the parent's chain cannot be built on (missing, truncated, failing
    /// `qemu-img check`, a backing link elsewhere), when they cannot.
    pub chain_problem: Option<String>,
}

/// The decision for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskPlan {
    /// Its target device.
    pub target: String,
    /// Full or incremental.
    pub mode: BackupMode,
    /// For an incremental: the backing file (`../<parent>/<file>`).
    pub backing: Option<String>,
    /// Why it is full although the backup is incremental or an incremental was asked for.
    pub full_reason: Option<String>,
}

/// The decision for a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainPlan {
    /// Full or incremental (at least one disk incremental).
    pub mode: BackupMode,
    /// The backup it builds on.
    pub parent: Option<String>,
    /// Whether the parent's checkpoint must first be redefined from its manifest.
    pub redefine_checkpoint: bool,
    /// Why the backup is full although an incremental was asked for or possible.
    pub full_reason: Option<String>,
    /// Each disk, in the order given.
    pub disks: Vec<DiskPlan>,
}

impl ChainPlan {
    /// Makes disk `target` a full copy for `reason` (its incremental copy failed); when no disk
    /// is left incremental, the whole backup becomes full, the reasons listed.
    pub fn disk_to_full(&mut self, target: &str, reason: String) {
        for d in self.disks.iter_mut().filter(|d| d.target == target && d.mode == BackupMode::Incremental) {
            d.mode = BackupMode::Full;
            d.backing = None;
            d.full_reason = Some(reason.clone());
        }
        if self.mode == BackupMode::Incremental && self.disks.iter().all(|d| d.mode == BackupMode::Full) {
            let reasons: Vec<String> =
                self.disks.iter().filter_map(|d| Some(format!("{}: {}", d.target, d.full_reason.as_ref()?))).collect();
            self.mode = BackupMode::Full;
            self.parent = None;
            self.full_reason = Some(format!("no disk can be incremental ({})", reasons.join("; ")));
            for d in &mut self.disks {
                d.full_reason = None;
            }
        }
    }

    /// This plan turned into a full backup of the same disks, for `reason` (the incremental
    /// was refused when it started).
    pub fn into_full(self, reason: String) -> ChainPlan {
        ChainPlan {
            mode: BackupMode::Full,
            parent: None,
            redefine_checkpoint: false,
            full_reason: Some(reason),
            disks: self
                .disks
                .into_iter()
                .map(|d| DiskPlan { mode: BackupMode::Full, backing: None, full_reason: None, ..d })
                .collect(),
        }
    }
}

/// Decides the mode of a backup and of each of its disks. `full_every` is the longest chain
/// `auto` builds (0 or 1: always full).
pub fn plan_chain(
    requested: ModeRequest,
    full_every: u32,
    parent: &Parent<'_>,
    checkpoint: &CheckpointState,
    disks: &[DiskFacts],
) -> ChainPlan {
    let full = |reason: Option<String>| ChainPlan {
        mode: BackupMode::Full,
        parent: None,
        redefine_checkpoint: false,
        full_reason: reason,
        disks: disks
            .iter()
            .map(|d| DiskPlan { target: d.target.clone(), mode: BackupMode::Full, backing: None, full_reason: None })
            .collect(),
    };
    // A reason is told where an incremental was asked for, or was possible and not taken.
    let asked = requested == ModeRequest::Incremental;
    let told = |reason: String| asked.then_some(reason);
    let (manifest, chain_len) = match (requested, parent) {
        (ModeRequest::Full, Parent::Usable { .. }) => return full(Some("a full backup was asked for".into())),
        (ModeRequest::Full, _) => return full(None),
        (_, Parent::None) => return full(told("there is no earlier backup of this VM on this repository".into())),
        (_, Parent::Unusable { reason }) => {
            return full(Some(format!("the previous backup cannot be built on: {reason}")));
        }
        (_, Parent::Usable { manifest, chain_len }) => (*manifest, *chain_len),
    };
    if requested == ModeRequest::Auto && chain_len >= full_every.max(1) {
        return full(Some(format!(
            "the chain holds {chain_len} backups, and a full is taken every {} backups",
            full_every.max(1)
        )));
    }
    let redefine_checkpoint = match checkpoint {
        CheckpointState::Present => false,
        CheckpointState::Redefinable => true,
        CheckpointState::Unusable { reason } => {
            return full(Some(format!("the checkpoint of the previous backup cannot be used: {reason}")));
        }
    };
    let Ok(parent_id) = manifest.id.parse() else {
        return full(Some(format!("the previous backup's id {} is not valid", manifest.id)));
    };
    let planned: Vec<DiskPlan> = disks
        .iter()
        .map(|d| {
            let mut plan =
                DiskPlan { target: d.target.clone(), mode: BackupMode::Full, backing: None, full_reason: None };
            let before = manifest.disks.iter().find(|p| p.target == d.target);
            let reason = match (before, d.bitmap) {
                (None, _) => Some("the disk is new since the previous backup".to_owned()),
                (Some(p), _) if p.volume != d.volume => {
                    Some(format!("the disk was replaced (volume {} was {})", d.volume, p.volume))
                }
                (Some(_), _) if d.virtual_size == 0 => Some("its size could not be read".to_owned()),
                (Some(p), _) if p.virtual_size != d.virtual_size => {
                    Some(format!("the disk was resized ({} bytes, {} before)", d.virtual_size, p.virtual_size))
                }
                (Some(_), _) if d.chain_problem.is_some() => Some(format!(
                    "its file in the previous backup's chain cannot be built on: {}",
                    d.chain_problem.as_deref().unwrap_or_default()
                )),
                (Some(_), BitmapState::Unsupported) => Some("its format keeps no dirty bitmap (raw)".to_owned()),
                (Some(_), BitmapState::SnapshotMissing) => {
                    Some("its RBD image no longer holds the snapshot the previous backup was read from".to_owned())
                }
                (Some(_), BitmapState::SnapshotForeign) => Some(
                    "its RBD image's snapshot of the previous backup's name is not the one that backup recorded"
                        .to_owned(),
                ),
                (Some(_), BitmapState::ImageReplaced) => {
                    Some("its RBD image was replaced (removed and created again) since the previous backup".to_owned())
                }
                (Some(_), BitmapState::RbdUnreachable) => Some(
                    "nasbak cannot read its RBD image's snapshots (no key for it on this host, or rbd failed)"
                        .to_owned(),
                ),
                (Some(_), BitmapState::Missing) => {
                    Some("its dirty bitmap for the checkpoint is missing or broken".to_owned())
                }
                (Some(_), BitmapState::Inconsistent) => {
                    Some("its dirty bitmap is inconsistent (in use after a crash, or not recording)".to_owned())
                }
                (Some(p), BitmapState::Valid | BitmapState::Snapshot) => {
                    plan.mode = BackupMode::Incremental;
                    plan.backing = Some(backing_path(&parent_id, &p.file));
                    None
                }
            };
            plan.full_reason = reason;
            plan
        })
        .collect();
    if planned.iter().all(|d| d.mode == BackupMode::Full) {
        let reasons: Vec<String> =
            planned.iter().filter_map(|d| d.full_reason.as_ref().map(|r| format!("{}: {r}", d.target))).collect();
        let mut plan = full(Some(format!("no disk can be incremental ({})", reasons.join("; "))));
        plan.disks = planned.into_iter().map(|d| DiskPlan { full_reason: None, ..d }).collect();
        return plan;
    }
    ChainPlan {
        mode: BackupMode::Incremental,
        parent: Some(manifest.id.clone()),
        redefine_checkpoint,
        full_reason: None,
        disks: planned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parent(disks: &[(&str, &str, u64)]) -> Manifest {
        let pairs: Vec<(&str, &str)> = disks.iter().map(|(t, v, _)| (*t, *v)).collect();
        let mut m = crate::test_support::manifest("2026.11.30.02.00.00", &pairs);
        for (i, (d, (_, volume, size))) in m.disks.iter_mut().zip(disks).enumerate() {
            d.virtual_size = *size;
            if i == 0 {
                d.file = format!("root.{volume}.qcow2");
            }
        }
        m
    }

    fn disk(target: &str, volume: &str, size: u64, bitmap: BitmapState) -> DiskFacts {
        DiskFacts {
            target: target.into(),
            volume: volume.into(),
            file: format!("x.{volume}.qcow2"),
            virtual_size: size,
            bitmap,
            chain_problem: None,
        }
    }

    #[test]
    fn an_incremental_builds_on_the_parent_disk_by_disk() {
        let p = parent(&[("vda", "root", 100), ("vdb", "data", 50)]);
        let usable = Parent::Usable { manifest: &p, chain_len: 1 };
        let disks = [disk("vda", "root", 100, BitmapState::Valid), disk("vdb", "data", 60, BitmapState::Valid)];
        let plan = plan_chain(ModeRequest::Auto, 7, &usable, &CheckpointState::Present, &disks);
        assert_eq!((plan.mode, plan.parent.as_deref()), (BackupMode::Incremental, Some("2026.11.30.02.00.00")));
        assert_eq!(plan.disks[0].backing.as_deref(), Some("../2026.11.30.02.00.00/root.root.qcow2"));
        assert_eq!(plan.disks[1].mode, BackupMode::Full);
        assert!(plan.disks[1].full_reason.as_deref().unwrap().contains("resized"));
        // Lost checkpoint metadata: redefined, still incremental.
        let plan = plan_chain(ModeRequest::Auto, 7, &usable, &CheckpointState::Redefinable, &disks);
        assert!(plan.redefine_checkpoint && plan.mode == BackupMode::Incremental);
    }

    #[test]
    fn a_disk_whose_incremental_copy_failed_becomes_full_and_then_the_backup() {
        let p = parent(&[("vda", "root", 100), ("vdb", "data", 50)]);
        let usable = Parent::Usable { manifest: &p, chain_len: 1 };
        let disks = [disk("vda", "root", 100, BitmapState::Valid), disk("vdb", "data", 50, BitmapState::Valid)];
        let mut plan = plan_chain(ModeRequest::Auto, 7, &usable, &CheckpointState::Present, &disks);
        plan.disk_to_full("vda", "the copy failed".into());
        assert_eq!(
            (plan.mode, plan.disks[0].mode, plan.disks[0].backing.as_deref()),
            (BackupMode::Incremental, BackupMode::Full, None)
        );
        assert_eq!(plan.disks[0].full_reason.as_deref(), Some("the copy failed"));
        plan.disk_to_full("vdb", "so did this one".into());
        assert_eq!((plan.mode, plan.parent.as_deref()), (BackupMode::Full, None));
        assert_eq!(
            plan.full_reason.as_deref(),
            Some("no disk can be incremental (vda: the copy failed; vdb: so did this one)")
        );
        assert!(plan.disks.iter().all(|d| d.full_reason.is_none()));
    }

    #[test]
    fn every_reason_for_a_full_is_said() {
        let p = parent(&[("vda", "root", 100)]);
        let usable = Parent::Usable { manifest: &p, chain_len: 1 };
        let ok = [disk("vda", "root", 100, BitmapState::Valid)];
        let reason = |plan: ChainPlan| {
            assert_eq!(plan.mode, BackupMode::Full);
            assert!(plan.disks.iter().all(|d| d.mode == BackupMode::Full && d.backing.is_none()));
            plan.full_reason.unwrap_or_default()
        };
        assert_eq!(
            reason(plan_chain(ModeRequest::Full, 7, &usable, &CheckpointState::Present, &ok)),
            "a full backup was asked for"
        );
        assert!(
            reason(plan_chain(ModeRequest::Incremental, 7, &Parent::None, &CheckpointState::Present, &ok))
                .contains("no earlier backup")
        );
        assert_eq!(
            reason(plan_chain(ModeRequest::Auto, 7, &Parent::None, &CheckpointState::Present, &ok)),
            "",
            "a first full needs no reason"
        );
        let damaged = Parent::Unusable { reason: "its manifest is invalid".into() };
        assert!(
            reason(plan_chain(ModeRequest::Auto, 7, &damaged, &CheckpointState::Present, &ok))
                .contains("manifest is invalid")
        );
        let long = Parent::Usable { manifest: &p, chain_len: 7 };
        assert!(reason(plan_chain(ModeRequest::Auto, 7, &long, &CheckpointState::Present, &ok)).contains("every 7"));
        // Asked for explicitly, an incremental ignores full_every.
        assert_eq!(
            plan_chain(ModeRequest::Incremental, 7, &long, &CheckpointState::Present, &ok).mode,
            BackupMode::Incremental
        );
        let gone = CheckpointState::Unusable { reason: "bitmap already exists".into() };
        assert!(reason(plan_chain(ModeRequest::Auto, 7, &usable, &gone, &ok)).contains("bitmap already exists"));
        for (bitmap, said) in [
            (BitmapState::Missing, "missing"),
            (BitmapState::Inconsistent, "inconsistent"),
            (BitmapState::Unsupported, "no dirty bitmap"),
            (BitmapState::SnapshotMissing, "no longer holds the snapshot"),
            (BitmapState::SnapshotForeign, "not the one that backup recorded"),
            (BitmapState::ImageReplaced, "RBD image was replaced"),
            (BitmapState::RbdUnreachable, "cannot read its RBD image's snapshots"),
        ] {
            let r = reason(plan_chain(
                ModeRequest::Auto,
                7,
                &usable,
                &CheckpointState::Present,
                &[disk("vda", "root", 100, bitmap)],
            ));
            assert!(r.contains("no disk can be incremental") && r.contains(said), "{r}");
        }
        let mut damaged = disk("vda", "root", 100, BitmapState::Valid);
        damaged.chain_problem = Some("root.root.qcow2 of 2026.11.30.02.00.00 is 1 bytes, its manifest says 9".into());
        let r = reason(plan_chain(ModeRequest::Auto, 7, &usable, &CheckpointState::Present, &[damaged]));
        assert!(r.contains("chain cannot be built on") && r.contains("its manifest says 9"), "{r}");
        let replaced = [disk("vda", "other", 100, BitmapState::Valid)];
        assert!(
            reason(plan_chain(ModeRequest::Auto, 7, &usable, &CheckpointState::Present, &replaced))
                .contains("replaced")
        );
    }

    fn bitmap() -> impl Strategy<Value = BitmapState> {
        prop_oneof![
            Just(BitmapState::Valid),
            Just(BitmapState::Missing),
            Just(BitmapState::Inconsistent),
            Just(BitmapState::Unsupported),
            Just(BitmapState::Snapshot),
            Just(BitmapState::SnapshotMissing),
            Just(BitmapState::SnapshotForeign),
            Just(BitmapState::ImageReplaced),
            Just(BitmapState::RbdUnreachable)
        ]
    }

    proptest! {
        /// Whatever the facts: a disk is incremental only when it is in the parent with the same
        /// volume and size and a valid bitmap (or its RBD image holds the parent's snapshot), and points at that disk's parent file; a full disk
        /// has no backing; an incremental backup names its parent; a full of an incremental that
        /// was asked for always says why.
        #[test]
        fn incrementals_only_on_what_is_proven(
            facts in proptest::collection::vec((0usize..4, 0usize..3, 1u64..4, bitmap(), any::<bool>()), 1..4),
            chain_len in 1u32..10,
            full_every in 0u32..10,
            requested in prop_oneof![Just(ModeRequest::Full), Just(ModeRequest::Incremental), Just(ModeRequest::Auto)],
            checkpoint in prop_oneof![
                Just(CheckpointState::Present),
                Just(CheckpointState::Redefinable),
                Just(CheckpointState::Unusable { reason: "gone".into() })
            ],
        ) {
            let p = parent(&[("vda", "v0", 1), ("vdb", "v1", 2), ("vdc", "v2", 3)]);
            let targets = ["vda", "vdb", "vdc", "vdd"];
            let mut disks: Vec<DiskFacts> = Vec::new();
            for (t, v, size, b, damaged) in facts {
                if disks.iter().all(|d| d.target != targets[t]) {
                    let mut facts = disk(targets[t], &format!("v{v}"), size, b);
                    facts.chain_problem = damaged.then(|| "truncated".to_owned());
                    disks.push(facts);
                }
            }
            let usable = Parent::Usable { manifest: &p, chain_len };
            let plan = plan_chain(requested, full_every, &usable, &checkpoint, &disks);
            prop_assert_eq!(plan.disks.len(), disks.len());
            for (d, planned) in disks.iter().zip(&plan.disks) {
                prop_assert_eq!(&d.target, &planned.target);
                if planned.mode == BackupMode::Incremental {
                    let before = p.disks.iter().find(|x| x.target == d.target).unwrap();
                    prop_assert!(before.volume == d.volume && before.virtual_size == d.virtual_size);
                    prop_assert!(matches!(d.bitmap, BitmapState::Valid | BitmapState::Snapshot), "proven changes only");
                    prop_assert!(d.chain_problem.is_none(), "never on a damaged chain");
                    prop_assert_eq!(planned.backing.clone(), Some(format!("../{}/{}", p.id, before.file)));
                    prop_assert!(requested != ModeRequest::Full);
                    let usable_checkpoint = !matches!(checkpoint, CheckpointState::Unusable { .. });
                    prop_assert!(usable_checkpoint);
                } else {
                    prop_assert!(planned.backing.is_none());
                }
            }
            let any_incremental = plan.disks.iter().any(|d| d.mode == BackupMode::Incremental);
            prop_assert_eq!(plan.mode == BackupMode::Incremental, any_incremental);
            prop_assert_eq!(plan.parent.is_some(), any_incremental);
            if plan.mode == BackupMode::Full && requested == ModeRequest::Incremental {
                prop_assert!(plan.full_reason.is_some());
            }
            if requested == ModeRequest::Auto && chain_len >= full_every.max(1) {
                prop_assert_eq!(plan.mode, BackupMode::Full);
            }
        }
    }
}
