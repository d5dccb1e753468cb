//! Which backups of a VM a retention keeps, as a pure function ([`plan_prune`]): shared by
//! prune on a repository and on an off-site target.

use std::collections::BTreeMap;

use chrono::NaiveDateTime;
use nasbak_repo::RetentionPolicy;

use crate::outcome::PruneDecision;

/// One backup, as prune sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PruneCandidate {
    /// The backup id (its time, UTC).
    pub id: String,
    /// When it was made (from its id; backups of one second apart by their sequence number).
    pub time: NaiveDateTime,
    /// The schedule that made it, if any.
    pub schedule: Option<String>,
}

/// Decides for every backup of one VM; the result is newest first.
pub fn plan_prune(
    backups: &[PruneCandidate],
    policy: Option<&RetentionPolicy>,
    schedule_keep: &BTreeMap<String, u32>,
) -> Vec<PruneDecision> {
    let mut sorted: Vec<&PruneCandidate> = backups.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let by_policy: BTreeMap<&str, Option<nasbak_repo::KeepReason>> = match policy {
        Some(p) => {
            let input: Vec<(String, NaiveDateTime)> = sorted.iter().map(|c| (c.id.clone(), c.time)).collect();
            let plan = p.plan(&input);
            sorted
                .iter()
                .map(|c| (c.id.as_str(), plan.iter().find(|d| d.backup == c.id).and_then(|d| d.keep)))
                .collect()
        }
        None => BTreeMap::new(),
    };
    let mut seen_of_schedule: BTreeMap<&str, u32> = BTreeMap::new();
    sorted
        .iter()
        .map(|c| {
            let mut over_schedule = None;
            if let Some(s) = c.schedule.as_deref() {
                let n = seen_of_schedule.entry(s).or_default();
                *n += 1;
                if let Some(&limit) = schedule_keep.get(s).filter(|l| **l > 0)
                    && *n > limit
                {
                    over_schedule = Some(format!("schedule {s} keeps at most {limit}"));
                }
            }
            let policy_verdict = by_policy.get(c.id.as_str()).copied();
            let (keep, reason) = match (over_schedule, policy_verdict) {
                (Some(why), _) => (false, why),
                (None, Some(None)) => (false, format!("not kept by the retention {}", policy.expect("set"))),
                (None, Some(Some(r))) => (true, format!("kept by keep-{}", format!("{r:?}").to_lowercase())),
                (None, None) => (true, "no limit applies".to_owned()),
            };
            PruneDecision { id: c.id.clone(), keep, reason, merge_over: None }
        })
        .collect()
}
