//! Prune: which backups of a VM go, as a pure function ([`plan_prune`]), and carrying the plan out.
//!
//! Two limits apply, both "at most": the offering's retention policy (Proxmox semantics, over
//! every backup of the VM, also those the reference system wrote), and each schedule's "keep at
//! most N" (over the backups that schedule made, newest first, as the reference system does). A
//! backup goes when either limit says so. With no policy and no schedule limit, nothing goes.

use std::collections::BTreeMap;

use nasbak_qemu_img::ImageTool;
use nasbak_repo::{BackupId, BackupRepository, Mounter, RetentionPolicy, VmName};

use crate::engine::Catalog;
use crate::error::BackupError;
pub use crate::outcome::{DamagedNote, PruneDecision, PruneReport};
use nasbak_repo::store::VmLock;
use nasbak_repo::store::{BackupEntry, BackupKind, list_backups, retire_and_delete};

pub use crate::retention::{PruneCandidate, plan_prune};

impl<I: ImageTool + Sync, M: Mounter> Catalog<'_, I, M> {
    /// Prunes the backups of `vm` on `repository`: decides with [`plan_prune`] over its complete
    /// backups, merges each kept incremental whose parent goes into a self-contained backup
    /// ([`plan_merges`]; a merge that fails keeps the chain instead, the reason said), then
    /// removes those not kept, all under the VM's lock (so a backup, restore or delete of the VM
    /// cannot run in between). Damaged backups are reported, not counted.
    ///
    /// An encrypted chain is merged with the repository's key file; a repository whose key is a
    /// libvirt secret is pruned by [`crate::Engine::prune`], which reads it.
    pub fn prune(
        &self,
        repository: &BackupRepository,
        vm: &str,
        policy: Option<&RetentionPolicy>,
        schedule_keep: &BTreeMap<String, u32>,
        dry_run: bool,
    ) -> Result<PruneReport, BackupError> {
        let key = crate::protect::file_key(repository.protection()).ok().flatten();
        self.prune_keyed(repository, vm, (policy, schedule_keep), dry_run, key.as_ref())
    }

    /// [`Catalog::prune`] with the repository's key resolved by the caller (none: an encrypted
    /// chain's merge fails and the chain is kept, the reason said).
    pub(crate) fn prune_keyed(
        &self,
        repository: &BackupRepository,
        vm: &str,
        (policy, schedule_keep): (Option<&RetentionPolicy>, &BTreeMap<String, u32>),
        dry_run: bool,
        key: Option<&crate::protect::Key>,
    ) -> Result<PruneReport, BackupError> {
        let vm_name = VmName::new(vm)?;
        let mounted = self.mounts().acquire(repository)?;
        let layout = mounted.layout();
        let vm_dir = layout.vm_dir(&vm_name);
        let _lock = if dry_run || !vm_dir.is_dir() { None } else { Some(VmLock::take(&vm_dir, vm)?) };
        if !dry_run {
            nasbak_repo::store::finish_merges(&vm_dir);
        }
        let entries = list_backups(repository.name().as_str(), layout.root(), Some(vm))?;
        let damaged = entries
            .iter()
            .filter_map(|e| match &e.kind {
                BackupKind::Damaged { reason } => Some(DamagedNote { id: e.id.clone(), reason: reason.clone() }),
                _ => None,
            })
            .collect();
        let candidates: Vec<PruneCandidate> = entries.iter().filter_map(candidate).collect();
        let mut decisions = plan_prune(&candidates, policy, schedule_keep);
        let mut parents: BTreeMap<String, String> = entries
            .iter()
            .filter_map(|e| match &e.kind {
                BackupKind::Nasbak(m) => m.parent.clone().map(|p| (e.id.clone(), p)),
                _ => None,
            })
            .collect();
        plan_merges(&mut decisions, &parents);
        if !dry_run {
            let merges: Vec<(String, String)> =
                decisions.iter().rev().filter_map(|d| d.merge_over.clone().map(|p| (d.id.clone(), p))).collect();
            for (id, parent) in merges {
                // A failed merge before this one may have kept this one's parent after all.
                if decisions.iter().any(|d| d.id == parent && d.keep) {
                    let d = decisions.iter_mut().find(|d| d.id == id).expect("planned from the decisions");
                    d.merge_over = None;
                    d.reason = d.reason.replace(&merge_note(&parent), "");
                    continue;
                }
                let merged = crate::merge::merge_backup(
                    self.images(),
                    &vm_dir,
                    vm,
                    (&id, &parent),
                    key,
                    &nasbak_libvirt::CancelHandle::new(),
                    &mut |_| {},
                );
                if merged.is_ok() {
                    parents.remove(&id);
                }
                if let Err(e) = merged {
                    let d = decisions.iter_mut().find(|d| d.id == id).expect("planned from the decisions");
                    d.merge_over = None;
                    d.reason = format!("{}; merging it failed ({}), so its chain is kept", d.reason, crate::chain(&e));
                    keep_parents(&mut decisions, &parents);
                }
            }
            for d in decisions.iter().filter(|d| !d.keep) {
                let (_, _, dir) = layout.resolve_backup(&format!("{vm}/{}", d.id))?;
                retire_and_delete(&vm_dir, &dir)?;
            }
        }
        Ok(PruneReport { vm: vm.to_owned(), decisions, damaged, executed: !dry_run })
    }
}

/// Marks each kept backup whose parent goes to be merged into a self-contained backup (a
/// synthetic full) before the parent is removed, with the reason; the rest of the plan stays.
/// Once merged it builds on nothing, and the kept backups built on it keep their chain.
/// `parents` maps a backup id to its parent's.
pub fn plan_merges(decisions: &mut [PruneDecision], parents: &BTreeMap<String, String>) {
    let going: Vec<String> = decisions.iter().filter(|d| !d.keep).map(|d| d.id.clone()).collect();
    for d in decisions.iter_mut().filter(|d| d.keep) {
        if let Some(parent) = parents.get(&d.id).filter(|p| going.contains(p)) {
            d.reason = format!("{}{}", d.reason, merge_note(parent));
            d.merge_over = Some(parent.clone());
        }
    }
}

fn merge_note(parent: &str) -> String {
    format!("; merged into a self-contained backup, since {parent} goes")
}

/// Keeps every backup a kept backup builds on (its parent, the parent's parent, ...), with the
/// reason, so that prune never leaves a kept incremental without its chain. `parents` maps a
/// backup id to its parent's.
pub fn keep_parents(decisions: &mut [PruneDecision], parents: &BTreeMap<String, String>) {
    loop {
        let kept: Vec<String> = decisions.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect();
        let mut changed = false;
        for child in kept {
            let Some(parent) = parents.get(&child) else { continue };
            if let Some(d) = decisions.iter_mut().find(|d| &d.id == parent && !d.keep) {
                d.keep = true;
                d.reason = format!("the kept backup {child} builds on it");
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

impl<H, A, I, M> crate::Engine<H, A, I, M>
where
    H: nasbak_libvirt::Hypervisor,
    A: crate::AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// [`Catalog::prune`] with the repository's key wherever it is kept: a key file, or a
    /// libvirt secret read through libvirt (into a 0600 file for the prune's length). A key that
    /// cannot be read keeps an encrypted chain unmerged, the reason said.
    pub fn prune(
        &self,
        repository: &BackupRepository,
        vm: &str,
        policy: Option<&RetentionPolicy>,
        schedule_keep: &BTreeMap<String, u32>,
        dry_run: bool,
    ) -> Result<PruneReport, BackupError> {
        let key =
            crate::protect::resolve_key(&self.hypervisor, repository.protection(), &self.runtime_dir).ok().flatten();
        self.catalog().prune_keyed(repository, vm, (policy, schedule_keep), dry_run, key.as_ref())
    }
}

fn candidate(e: &BackupEntry) -> Option<PruneCandidate> {
    let id = e.id.parse::<BackupId>().ok()?;
    let time = id.time() + chrono::Duration::nanoseconds(i64::from(id.sequence()));
    let schedule = match &e.kind {
        BackupKind::Nasbak(m) => m.schedule.clone(),
        BackupKind::Reference { .. } => None,
        BackupKind::Damaged { .. } => return None,
    };
    Some(PruneCandidate { id: e.id.clone(), time, schedule })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(id: &str, hour: u32, schedule: Option<&str>) -> PruneCandidate {
        let time = chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap().and_hms_opt(hour, 0, 0).unwrap();
        PruneCandidate { id: id.into(), time, schedule: schedule.map(str::to_owned) }
    }

    #[test]
    fn a_kept_incremental_keeps_its_chain() {
        let backups = [c("a", 1, None), c("b", 2, None), c("c", 3, None), c("d", 4, None)];
        let mut plan = plan_prune(&backups, Some(&RetentionPolicy::keep_last(1)), &BTreeMap::new());
        // d builds on c, c on b; a is a separate full.
        let parents = BTreeMap::from([("d".to_owned(), "c".to_owned()), ("c".to_owned(), "b".to_owned())]);
        keep_parents(&mut plan, &parents);
        let kept: Vec<&str> = plan.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, ["d", "c", "b"]);
        assert_eq!(plan.iter().find(|d| d.id == "b").unwrap().reason, "the kept backup c builds on it");
    }

    #[test]
    fn a_kept_incremental_whose_parent_goes_is_merged() {
        let backups = [c("a", 1, None), c("b", 2, None), c("c", 3, None), c("d", 4, None)];
        let mut plan = plan_prune(&backups, Some(&RetentionPolicy::keep_last(2)), &BTreeMap::new());
        // d builds on c, c on b, b on a: c is kept and merged over b; a and b go.
        let parents = BTreeMap::from([
            ("d".to_owned(), "c".to_owned()),
            ("c".to_owned(), "b".to_owned()),
            ("b".to_owned(), "a".to_owned()),
        ]);
        plan_merges(&mut plan, &parents);
        let kept: Vec<&str> = plan.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, ["d", "c"]);
        let merges: Vec<(&str, &str)> =
            plan.iter().filter_map(|d| Some((d.id.as_str(), d.merge_over.as_deref()?))).collect();
        assert_eq!(merges, [("c", "b")]);
        assert!(plan[1].reason.ends_with("merged into a self-contained backup, since b goes"), "{:?}", plan[1]);
    }

    proptest! {
        #[test]
        fn no_kept_backup_loses_its_parent(keep in prop::collection::vec(any::<bool>(), 1..20), links in prop::collection::vec(any::<bool>(), 1..20)) {
            let n = keep.len();
            let mut plan: Vec<PruneDecision> = (0..n)
                .map(|i| PruneDecision { id: format!("{i:02}"), keep: keep[i], reason: String::new(), merge_over: None })
                .collect();
            // Backup i builds on i-1 where links[i] says so.
            let parents: BTreeMap<String, String> = (1..n)
                .filter(|i| links.get(*i).copied().unwrap_or(false))
                .map(|i| (format!("{i:02}"), format!("{:02}", i - 1)))
                .collect();
            // Merging: every kept backup whose parent goes is merged, no other; nothing else
            // changes.
            let mut merged = plan.clone();
            plan_merges(&mut merged, &parents);
            for (d, before) in merged.iter().zip(&plan) {
                prop_assert_eq!(d.keep, before.keep);
                let parent_goes = parents.get(&d.id).is_some_and(|p| merged.iter().any(|x| &x.id == p && !x.keep));
                prop_assert_eq!(d.merge_over.is_some(), d.keep && parent_goes);
                prop_assert_eq!(d.merge_over.as_ref(), d.merge_over.as_ref().and(parents.get(&d.id)));
            }
            keep_parents(&mut plan, &parents);
            for d in plan.iter().filter(|d| d.keep) {
                if let Some(p) = parents.get(&d.id) {
                    prop_assert!(plan.iter().any(|x| &x.id == p && x.keep), "{} kept without its parent {}", d.id, p);
                }
            }
            for (i, d) in plan.iter().enumerate() {
                if keep[i] { prop_assert!(d.keep, "a backup the retention kept is still kept"); }
            }
        }
    }

    #[test]
    fn schedule_limits_count_only_their_own_backups() {
        let backups = [c("a", 1, Some("s")), c("b", 2, None), c("c", 3, Some("s")), c("d", 4, Some("s"))];
        let keep = BTreeMap::from([("s".to_owned(), 2)]);
        let plan = plan_prune(&backups, None, &keep);
        let kept: Vec<&str> = plan.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, ["d", "c", "b"]);
        assert_eq!(plan[3].reason, "schedule s keeps at most 2");
        assert!(plan_prune(&backups, None, &BTreeMap::new()).iter().all(|d| d.keep));
    }

    #[test]
    fn the_policy_and_the_schedule_limit_both_apply() {
        let backups = [c("a", 1, Some("s")), c("b", 2, None), c("c", 3, Some("s"))];
        let keep = BTreeMap::from([("s".to_owned(), 1)]);
        let plan = plan_prune(&backups, Some(&RetentionPolicy::keep_last(2)), &keep);
        let kept: Vec<&str> = plan.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, ["c", "b"]);
        assert!(plan[0].reason.contains("keep-last"), "{:?}", plan[0]);
    }

    fn arb_backups() -> impl Strategy<Value = Vec<PruneCandidate>> {
        prop::collection::vec((0u32..2000, prop::option::of(0u8..3)), 0..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (minutes, s))| {
                    let time = chrono::DateTime::from_timestamp(1_800_000_000 + i64::from(minutes) * 3600, 0)
                        .unwrap()
                        .naive_utc();
                    PruneCandidate { id: format!("{i:03}"), time, schedule: s.map(|s| format!("s{s}")) }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn every_backup_is_decided_once_and_limits_hold(
            backups in arb_backups(),
            last in prop::option::of(0u32..6),
            daily in prop::option::of(0u32..6),
            limits in prop::collection::btree_map("s[0-2]", 0u32..4, 0..3),
        ) {
            let policy = RetentionPolicy { last, daily, ..RetentionPolicy::default() };
            let plan = plan_prune(&backups, Some(&policy), &limits);
            prop_assert_eq!(plan.len(), backups.len());
            let mut ids: Vec<&str> = plan.iter().map(|d| d.id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            prop_assert_eq!(ids.len(), backups.len());
            // Never more of a schedule kept than its limit.
            for (s, limit) in limits.iter().filter(|(_, l)| **l > 0) {
                let kept = plan.iter().filter(|d| d.keep && backups.iter().any(|b| b.id == d.id && b.schedule.as_ref() == Some(s))).count();
                prop_assert!(kept <= *limit as usize);
            }
            // Nothing the policy alone would remove is kept.
            let alone: Vec<(String, chrono::NaiveDateTime)> = backups.iter().map(|b| (b.id.clone(), b.time)).collect();
            for d in policy.plan(&alone) {
                if d.keep.is_none() {
                    prop_assert!(!plan.iter().any(|p| p.id == d.backup && p.keep));
                }
            }
            // Without limits nothing goes; the plan does not depend on input order.
            prop_assert!(plan_prune(&backups, None, &BTreeMap::new()).iter().all(|d| d.keep));
            let mut reversed = backups.clone();
            reversed.reverse();
            prop_assert_eq!(plan_prune(&reversed, Some(&policy), &limits), plan);
        }
    }
}
