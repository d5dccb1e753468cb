//! What an operator (or a monitoring system) asks every morning: is each assigned VM protected?
//! For each VM, its newest good backup against its schedules (the recovery point objective),
//! its last failed run, its chain, its last boot verification; for each repository, its
//! capacity. [`status`] gathers it from the repositories and the schedule state;
//! the `metrics` module renders it for node_exporter.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use nasbak::nasbak_qemu_img::ImageTool;
use nasbak::nasbak_repo::{BackupMode, Mounter};
use nasbak::{BackupEntry, BackupKind, BootResult, BootVerification, CapacityReport, Catalog, chain};
use serde::Serialize;

use crate::config::{Config, Failure, Schedule, ScheduleState};
use crate::schedule::{latest_occurrence, parse_tz};

/// The longest a scheduled backup may take before its occurrence counts as missed: the
/// schedule's period, at most an hour (a daily backup at 02:00 must have been made by 03:00;
/// one every 5 minutes within 5 minutes).
pub const LONGEST_GRACE: Duration = Duration::hours(1);

/// The status of every assigned or scheduled VM and of every repository.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StatusReport {
    /// When it was gathered.
    pub generated: DateTime<Utc>,
    /// Each VM that has an offering or a schedule, by name.
    pub vms: Vec<VmStatus>,
    /// Each repository of the configuration, in its order.
    pub repositories: Vec<RepositoryStatus>,
}

impl StatusReport {
    /// Whether a VM misses its recovery point objective, its last scheduled run failed, or its
    /// status could not be told (an unreachable repository).
    pub fn needs_attention(&self) -> bool {
        self.vms.iter().any(VmStatus::needs_attention)
    }
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct VmStatus {
    /// The VM.
    pub vm: String,
    /// Its offering.
    pub offering: Option<String>,
    /// The repository its backups go to.
    pub repository: Option<String>,
    /// Its schedules' ids.
    pub schedules: Vec<String>,
    /// Its newest good backup: complete, made by nasbak, and not failed by a boot verification.
    pub newest: Option<NewestBackup>,
    /// Its newest good backup against its schedules.
    pub rpo: Rpo,
    /// Its scheduled runs that failed since the state began.
    pub failures_total: u64,
    /// Its scheduled runs that failed since its last successful one.
    pub consecutive_failures: u32,
    /// Its last failed scheduled run.
    pub last_failure: Option<Failure>,
    /// How many backups a restore of its newest good backup reads: 1 for a full, 1 + the
    /// incrementals on it otherwise.
    pub chain_length: Option<u32>,
    /// The newest boot verification of any of its backups.
    pub boot_verified: Option<BootVerification>,
    /// Why its backups could not be read (its placement, its repository), if they could not.
    pub error: Option<String>,
}

impl VmStatus {
    /// Whether its RPO is missed, its last scheduled run failed, or its status is unknown.
    pub fn needs_attention(&self) -> bool {
        self.error.is_some() || self.consecutive_failures > 0 || self.rpo.state == RpoState::Missed
    }
}

/// A VM's newest good backup.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct NewestBackup {
    /// `REPO:VM/BACKUP-ID`.
    pub backup: String,
    /// When it began: the point in time it restores to.
    pub started: DateTime<Utc>,
    /// When it was complete.
    pub finished: DateTime<Utc>,
    /// Its age at [`StatusReport::generated`], in seconds (from its start).
    pub age_seconds: i64,
    /// How long it took, in seconds.
    pub duration_seconds: f64,
    /// Full or incremental.
    pub mode: BackupMode,
    /// The bytes its files hold on the repository.
    pub bytes_written: u64,
}

/// A VM's newest good backup against its schedules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Rpo {
    /// Met, missed, or nothing to measure.
    pub state: RpoState,
    /// The schedule occurrence the newest backup must have started at or after (the latest
    /// occurrence, of any of the VM's schedules, whose grace has passed).
    pub required_since: Option<DateTime<Utc>>,
    /// The schedule of that occurrence.
    pub schedule: Option<String>,
}

/// Whether a VM's recovery point objective is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RpoState {
    /// Its newest good backup started at or after the latest occurrence whose grace passed.
    Met,
    /// It did not (or it has no good backup while one is required).
    Missed,
    /// No occurrence of its schedules has passed its grace yet (a schedule added today).
    Pending,
    /// It has no schedule: nothing says how old its newest backup may be.
    Unscheduled,
    /// Its backups could not be read (see [`VmStatus::error`]).
    Unknown,
}

/// One repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RepositoryStatus {
    /// The repository.
    pub repository: String,
    /// Its capacity, if it could be measured.
    pub capacity: Option<CapacityReport>,
    /// Why it could not be reached, if it could not.
    pub error: Option<String>,
}

/// The status at `now` of each VM that has an offering or a schedule in `config`, from the
/// backups on its repository and the failures `state` records, and of each repository. Each
/// repository is mounted (when it must be) once, to list its backups and measure it; one that
/// cannot be reached is an error in its entry and in its VMs', never in the result.
pub fn status<I: ImageTool, M: Mounter>(
    catalog: &Catalog<'_, I, M>,
    config: &Config,
    state: &ScheduleState,
    now: DateTime<Utc>,
) -> StatusReport {
    let mut repositories = Vec::new();
    let mut listed: BTreeMap<String, Result<Vec<BackupEntry>, String>> = BTreeMap::new();
    for r in &config.repositories {
        let name = r.name().to_string();
        let (capacity, error) = match catalog.survey(r) {
            Ok((entries, c)) => {
                listed.insert(name.clone(), Ok(entries));
                (Some(c), None)
            }
            Err(e) => {
                listed.insert(name.clone(), Err(chain(&e)));
                (None, Some(chain(&e)))
            }
        };
        repositories.push(RepositoryStatus { repository: name, capacity, error });
    }
    let vms: BTreeSet<&str> =
        config.assignments.keys().map(String::as_str).chain(config.schedules.iter().map(|s| s.vm.as_str())).collect();
    let vms = vms
        .into_iter()
        .map(|vm| {
            let schedules: Vec<&Schedule> = config.schedules.iter().filter(|s| s.vm == vm).collect();
            let (repository, entries) = match crate::placement(config, vm, None, None, None) {
                Ok(p) => {
                    let name = p.repository.name().to_string();
                    let entries = match listed.get(&name) {
                        Some(Ok(all)) => Ok(all.iter().filter(|e| e.vm == vm).collect::<Vec<_>>()),
                        Some(Err(e)) => Err(format!("repository {name}: {e}")),
                        None => Err(format!("repository {name} is not in the configuration")),
                    };
                    (Some(name), entries)
                }
                Err(e) => (None, Err(chain(&e))),
            };
            let history = state.failures.get(vm).cloned().unwrap_or_default();
            let mut status = VmStatus {
                vm: vm.to_owned(),
                offering: config.assignments.get(vm).cloned(),
                repository,
                schedules: schedules.iter().map(|s| s.id.clone()).collect(),
                newest: None,
                rpo: Rpo { state: RpoState::Unknown, required_since: None, schedule: None },
                failures_total: history.total,
                consecutive_failures: history.consecutive,
                last_failure: history.last,
                chain_length: None,
                boot_verified: None,
                error: None,
            };
            match entries {
                Ok(entries) => {
                    status.boot_verified = entries.iter().filter_map(|e| e.boot_verified.clone()).max_by_key(|v| v.at);
                    let newest = newest_good(&entries);
                    status.chain_length = newest.map(|(_, m)| chain_length(&entries, m));
                    status.newest = newest.map(|(e, m)| NewestBackup {
                        backup: e.reference(),
                        started: m.started,
                        finished: m.finished,
                        age_seconds: (now - m.started).num_seconds(),
                        duration_seconds: (m.finished - m.started).num_milliseconds() as f64 / 1000.0,
                        mode: m.mode,
                        bytes_written: m.disks.iter().map(|d| d.size).sum(),
                    });
                    status.rpo = rpo(&schedules, status.newest.as_ref().map(|n| n.started), now);
                }
                Err(e) => status.error = Some(e),
            }
            status
        })
        .collect();
    StatusReport { generated: now, vms, repositories }
}

/// The newest complete nasbak backup whose boot verification (if any) did not fail.
fn newest_good<'a>(entries: &[&'a BackupEntry]) -> Option<(&'a BackupEntry, &'a nasbak::nasbak_repo::Manifest)> {
    entries
        .iter()
        .filter(|e| !matches!(&e.boot_verified, Some(v) if v.result == BootResult::Failed))
        .filter_map(|e| match &e.kind {
            BackupKind::Nasbak(m) => Some((*e, &**m)),
            _ => None,
        })
        .max_by_key(|(_, m)| m.started)
}

/// How many backups a restore of `newest` reads: itself and each parent up to the full.
fn chain_length(entries: &[&BackupEntry], newest: &nasbak::nasbak_repo::Manifest) -> u32 {
    let mut length = 1;
    let mut parent = newest.parent.as_deref();
    while let Some(id) = parent {
        let Some(m) = entries.iter().find(|e| e.id == id).and_then(|e| match &e.kind {
            BackupKind::Nasbak(m) => Some(m),
            _ => None,
        }) else {
            break;
        };
        length += 1;
        parent = m.parent.as_deref();
        if length > 10_000 {
            break;
        }
    }
    length
}

/// The RPO of a VM whose newest good backup started at `newest` (none: it has none), against
/// its `schedules` at `now`.
pub fn rpo(schedules: &[&Schedule], newest: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Rpo {
    if schedules.is_empty() {
        return Rpo { state: RpoState::Unscheduled, required_since: None, schedule: None };
    }
    let mut required: Option<(DateTime<Utc>, &str)> = None;
    for s in schedules {
        let (Ok(at), Ok(tz)) = (s.at(), parse_tz(&s.tz)) else { continue };
        let latest = latest_occurrence(&at, tz, now);
        let previous = latest_occurrence(&at, tz, latest - Duration::seconds(1));
        let grace = (latest - previous).min(LONGEST_GRACE);
        let due = latest_occurrence(&at, tz, now - grace);
        if due > s.created && required.is_none_or(|(r, _)| due > r) {
            required = Some((due, s.id.as_str()));
        }
    }
    let Some((since, schedule)) = required else {
        return Rpo { state: RpoState::Pending, required_since: None, schedule: None };
    };
    let state = if newest.is_some_and(|n| n >= since) { RpoState::Met } else { RpoState::Missed };
    Rpo { state, required_since: Some(since), schedule: Some(schedule.to_owned()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Every;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn schedule(id: &str, every: Every, at: &str, created: &str) -> Schedule {
        Schedule {
            id: id.into(),
            vm: "web1".into(),
            every,
            at: at.into(),
            tz: "UTC".into(),
            keep: 1,
            quiesce: Default::default(),
            created: utc(created),
        }
    }

    #[test]
    fn the_rpo_is_the_latest_occurrence_past_its_grace() {
        let daily = schedule("d", Every::Daily, "02:00", "2026-01-01T00:00:00Z");
        let s = [&daily];
        // 02:30: the grace of today's 02:00 (an hour) runs; yesterday's backup meets it.
        let now = utc("2026-03-10T02:30:00Z");
        let r = rpo(&s, Some(utc("2026-03-09T02:00:30Z")), now);
        assert_eq!((r.state, r.required_since), (RpoState::Met, Some(utc("2026-03-09T02:00:00Z"))));
        // 03:01 without today's: missed; with today's: met.
        let now = utc("2026-03-10T03:01:00Z");
        assert_eq!(rpo(&s, Some(utc("2026-03-09T02:00:30Z")), now).state, RpoState::Missed);
        assert_eq!(rpo(&s, Some(utc("2026-03-10T02:00:10Z")), now).state, RpoState::Met);
        assert_eq!(rpo(&s, None, now).state, RpoState::Missed);
        // Every 5 minutes: a grace of 5 minutes. The most demanding schedule decides.
        let often = schedule("m", Every::Minutes(5), "0", "2026-01-01T00:00:00Z");
        let both = [&daily, &often];
        let now = utc("2026-03-10T10:07:00Z");
        let r = rpo(&both, Some(utc("2026-03-10T10:00:20Z")), now);
        assert_eq!((r.state, r.schedule.as_deref()), (RpoState::Met, Some("m")));
        assert_eq!(r.required_since, Some(utc("2026-03-10T10:00:00Z")));
        assert_eq!(rpo(&both, Some(utc("2026-03-10T09:55:20Z")), now).state, RpoState::Missed);
        // A schedule made after its latest occurrence asks for nothing yet; none: unscheduled.
        let new = schedule("n", Every::Daily, "02:00", "2026-03-10T02:10:00Z");
        assert_eq!(rpo(&[&new], None, utc("2026-03-10T04:00:00Z")).state, RpoState::Pending);
        assert_eq!(rpo(&[], None, now).state, RpoState::Unscheduled);
    }
}
