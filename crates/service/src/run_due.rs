//! The service layer over the configuration: which repository and policy a VM's backup uses,
//! prune by offering and schedule, and `run-due` (what a systemd timer calls every minute).

use std::collections::BTreeMap;
use std::path::Path;

use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, Hypervisor};
use nasbak::nasbak_qemu_img::ImageTool;
use nasbak::nasbak_repo::{BackupRepository, Mounter, RetentionPolicy};
use nasbak::prune::PruneReport;
use nasbak::{
    AgentSource, BackupError, BackupRequest, BootResult, BootVerification, BootVerifyRequest, Catalog, Engine,
    LockError, Observer, Progress, VmLock, chain,
};
use serde::Serialize;

use crate::config::{Config, ConfigError, RunOutcome, ScheduleState};

/// Where a VM's backups go and how, from the command line and the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Placement {
    /// The repository.
    pub repository: BackupRepository,
    /// The quiesce policy.
    pub quiesce: QuiescePolicy,
    /// The longest chain an `auto` backup builds (the offering's, else the default).
    pub full_every: u32,
    /// The off-site target the backup is copied to next (the offering's `copy_to`, where the
    /// backup goes to the offering's repository).
    pub copy_to: Option<String>,
}

/// Resolves the repository and quiesce policy of a backup of `vm`: an explicit repository, else
/// an explicit offering, else the VM's assigned offering, else the only repository there is. An
/// explicit quiesce policy wins over the offering's.
pub fn placement(
    config: &Config,
    vm: &str,
    repository: Option<&str>,
    offering: Option<&str>,
    quiesce: Option<QuiescePolicy>,
) -> Result<Placement, BackupError> {
    let not_found = |what: String| BackupError::NotFound { what };
    let offering = match offering {
        Some(o) => Some(config.offering(o).ok_or_else(|| not_found(format!("offering {o}")))?),
        None if repository.is_none() => config.offering_of(vm),
        None => None,
    };
    let repo_name = repository.map(str::to_owned).or_else(|| offering.map(|o| o.repository.clone()));
    let repository = match repo_name {
        Some(name) => config.repository(&name).ok_or_else(|| not_found(format!("repository {name}")))?.clone(),
        None if config.repositories.len() == 1 => config.repositories[0].clone(),
        None => {
            return Err(BackupError::Ambiguous {
                what: format!(
                    "which repository {vm}'s backup goes to: there are {} repositories and {vm} has no offering; \
                     name a repository or an offering, or assign {vm} to an offering",
                    config.repositories.len()
                ),
            });
        }
    };
    // The offering's compression and encryption, where its backups go to its repository.
    let repository = match offering.filter(|o| *o.repository == *repository.name().as_str()) {
        Some(o) => {
            let protection = o.protection_on(&repository)?;
            repository.with_protection(protection)
        }
        None => repository,
    };
    let quiesce = quiesce.or(offering.map(|o| o.quiesce)).unwrap_or_default();
    let full_every = offering.and_then(|o| o.full_every).unwrap_or(nasbak::chain::DEFAULT_FULL_EVERY);
    let copy_to = offering.filter(|o| *o.repository == *repository.name().as_str()).and_then(|o| o.copy_to.clone());
    Ok(Placement { repository, quiesce, full_every, copy_to })
}

/// The outcome of one due schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DueRun {
    /// The schedule.
    pub schedule: String,
    /// The VM.
    pub vm: String,
    /// The backup made (`REPO:VM/ID`), or why none was.
    pub outcome: RunOutcome,
    /// Backups prune removed afterwards (their ids).
    pub pruned: Vec<String>,
    /// Why prune failed afterwards, if it did (the backup itself is made).
    pub prune_error: Option<String>,
    /// The boot verification of the backup made, when the VM's offering asks for one: its
    /// result, or why it could not run.
    pub boot_verified: Option<Result<BootVerification, String>>,
    /// The copy of the backup made to the offering's off-site target (`copy_to`), when it has
    /// one: the target and the backups that went there (the new one, and its chain's that were
    /// not there yet), or why the copy failed.
    pub copied: Option<Result<CopiedOffsite, String>>,
}

/// The copy `run-due` made of a new backup to its offering's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CopiedOffsite {
    /// The target.
    pub target: String,
    /// The backups copied (`REPO:VM/ID`), parents first.
    pub copied: Vec<String>,
    /// The bytes sent.
    pub sent: u64,
}

impl DueRun {
    /// Whether the schedule's backup failed, or its boot verification did not pass.
    pub fn failed(&self) -> bool {
        self.failure().is_some()
    }

    /// Why the run failed: the backup's error, or what the boot verification of the new backup
    /// said (or why it could not run). None when it did not fail.
    pub fn failure(&self) -> Option<String> {
        if let (RunOutcome::Succeeded(_), Some(Err(e))) = (&self.outcome, &self.copied) {
            return Some(format!("the copy of the new backup to its off-site target failed: {e}"));
        }
        match (&self.outcome, &self.boot_verified) {
            (RunOutcome::Failed(e), _) => Some(e.clone()),
            (_, Some(Err(e))) => Some(format!("the boot verification of the new backup could not run: {e}")),
            (_, Some(Ok(v))) if v.result != BootResult::Passed => {
                Some(format!("the new backup {} did not pass its boot verification: {}", v.backup, v.detail))
            }
            _ => None,
        }
    }
}

/// What `run-due` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunDue {
    /// The schedules that were due, in configuration order (those of a VM whose backup by an
    /// earlier `run-due` still goes: [`RunOutcome::Skipped`]).
    Ran(Vec<DueRun>),
}

/// Prunes `vm` by its offering's retention and its schedules' limits (none: nothing goes).
/// Encrypted chains are merged with the repository's key file; [`prune_vm_with`] reads a key
/// kept as a libvirt secret.
pub fn prune_vm<I: ImageTool + Sync, M: Mounter>(
    catalog: &Catalog<'_, I, M>,
    config: &Config,
    vm: &str,
    dry_run: bool,
) -> Result<PruneReport, BackupError> {
    prune_vm_by(config, vm, |repository, keep, limits| catalog.prune(repository, vm, keep, limits, dry_run))
}

/// [`prune_vm`] through the engine, which reads a repository key kept as a libvirt secret.
pub fn prune_vm_with<H, A, I, M>(
    engine: &Engine<H, A, I, M>,
    config: &Config,
    vm: &str,
    dry_run: bool,
) -> Result<PruneReport, BackupError>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    prune_vm_by(config, vm, |repository, keep, limits| engine.prune(repository, vm, keep, limits, dry_run))
}

/// Prunes `vm`'s copies on an off-site target by its offering's retention and its schedules'
/// limits, as on its repository (see [`nasbak::prune_target`]: nothing merged, locked copies
/// kept and said).
#[cfg(feature = "s3")]
pub fn prune_target_vm(
    store: &nasbak::objstore::ObjectStore,
    config: &Config,
    vm: &str,
    dry_run: bool,
) -> Result<PruneReport, BackupError> {
    prune_vm_by(config, vm, |_, keep, limits| nasbak::prune_target(store, vm, keep, limits, dry_run))
}

/// The offering's retention and the schedules' limits of `vm`, handed to `prune`.
fn prune_vm_by(
    config: &Config,
    vm: &str,
    prune: impl FnOnce(
        &BackupRepository,
        Option<&RetentionPolicy>,
        &BTreeMap<String, u32>,
    ) -> Result<PruneReport, BackupError>,
) -> Result<PruneReport, BackupError> {
    let offering = config.offering_of(vm).ok_or_else(|| BackupError::NotFound {
        what: format!("an offering of {vm} (prune follows the offering's retention)"),
    })?;
    let repository = config
        .repository(&offering.repository)
        .ok_or_else(|| BackupError::NotFound { what: format!("repository {}", offering.repository) })?;
    let limits: BTreeMap<String, u32> =
        config.schedules.iter().filter(|s| s.vm == vm).map(|s| (s.id.clone(), s.keep)).collect();
    prune(repository, offering.keep.as_ref(), &limits)
}

/// The configuration or the schedule state failed: the engine's error of that kind.
fn config_error(e: ConfigError) -> BackupError {
    BackupError::Config(Box::new(e))
}

/// Runs every schedule due now (by the engine's clock), each followed by prune of its VM (and
/// the boot verification its offering asks for); several at once, up to the configuration's
/// `max_parallel` on this host (two per core without it) and each repository's
/// `max_parallel`, counted across every `run-due` process of the host. The longest-waiting go
/// first (never run, then the oldest last run); a VM's due schedules run one after another. A
/// VM whose backup by an earlier `run-due` still goes is skipped ([`RunOutcome::Skipped`],
/// with who runs it since when): never two at once, and the schedules of other VMs run
/// meanwhile (so a timer may call `run-due` every minute, and schedules every few minutes keep
/// their pace beside a long backup). One failure never stops the others; a cancel stops them
/// all. Progress carries the schedule's id and comes from every backup running, on this
/// thread.
///
/// The times are kept in `state_path` (`state.lock` beside it serializes its readers and
/// writers; `running/<vm>/` holds the lease of each VM's run, `slots/` the limits). A schedule
/// whose backup fails is recorded as run and retried at its next occurrence; the failure is in
/// the result. The result lists the runs in configuration order.
pub fn run_due<H, A, I, M>(
    engine: &Engine<H, A, I, M>,
    config: &Config,
    state_path: &Path,
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<RunDue, BackupError>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
    Engine<H, A, I, M>: Sync,
{
    let now = engine.clock().now();
    let state_dir = state_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(state_dir).map_err(|source| BackupError::Io {
        action: "creating",
        path: state_dir.to_owned(),
        source,
    })?;
    let mut skipped = Vec::new();
    // What is due, and the leases of the VMs this run takes, decided under the state lock.
    let units = {
        let _decide = crate::slots::state_lock(state_dir)?;
        let mut state = ScheduleState::load(state_path).map_err(config_error)?;
        let mut due = Vec::new();
        for (index, s) in config.schedules.iter().enumerate() {
            let last = state.last_run.get(&s.id).copied();
            let is_due = s
                .is_due(last, now)
                .map_err(|e| BackupError::Unsupported { what: format!("schedule {}: {e}", s.id) })?;
            if is_due {
                due.push((index, s, last));
            }
        }
        if cancel.is_cancelled() && !due.is_empty() {
            return Err(BackupError::Cancelled);
        }
        // Never run first, then the oldest last run; configuration order among equals.
        due.sort_by_key(|(index, _, last)| (*last, *index));
        let mut units: Vec<Unit<'_>> = Vec::new();
        for (index, s, _) in due {
            if let Some(u) = units.iter_mut().find(|u| u.vm == s.vm) {
                u.schedules.push((index, s));
                continue;
            }
            if let Some((_, reason)) = skipped.iter().find(|(r, _): &&(DueRun, String)| r.vm == s.vm) {
                let reason = reason.clone();
                skipped.push((skip(s, &reason), reason));
                continue;
            }
            let running = state_dir.join("running").join(&s.vm);
            std::fs::create_dir_all(&running).map_err(|source| BackupError::Io {
                action: "creating",
                path: running.clone(),
                source,
            })?;
            match VmLock::take(&running, &s.vm) {
                Ok(lease) => {
                    let repository = placement(config, &s.vm, None, None, Some(s.quiesce))
                        .map(|p| p.repository.name().to_string())
                        .ok();
                    units.push(Unit { vm: s.vm.clone(), repository, schedules: vec![(index, s)], _lease: lease });
                }
                Err(LockError::Held { holder, since, .. }) => {
                    let reason =
                        format!("the backup of {} by an earlier run-due still goes ({holder}, since {since})", s.vm);
                    skipped.push((skip(s, &reason), reason));
                }
                Err(e) => return Err(e.into()),
            }
        }
        for u in &units {
            for (_, s) in &u.schedules {
                state.last_run.insert(s.id.clone(), now);
                state.last_outcome.remove(&s.id);
            }
        }
        state.save(state_path).map_err(config_error)?;
        units
    };
    let mut skipped: Vec<(usize, Option<DueRun>)> = skipped
        .into_iter()
        .map(|(r, _)| (config.schedules.iter().position(|s| s.id == r.schedule).unwrap_or(usize::MAX), Some(r)))
        .collect();
    if units.is_empty() {
        skipped.sort_by_key(|(index, _)| *index);
        return Ok(RunDue::Ran(skipped.into_iter().filter_map(|(_, r)| r).collect()));
    }
    // Most of a backup's time is QEMU's copy and the disks' and the NAS's I/O, not nasbak's
    // CPU: two per core by default (measured: `cargo xtask bench night`).
    let host_limit = config
        .max_parallel
        .map_or_else(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get()), |n| n as usize)
        .max(1);
    let workers = host_limit.min(units.len());
    let shared = Shared {
        slots: state_dir.join("slots"),
        host_limit,
        queue: std::sync::Mutex::new(units),
        fatal: std::sync::Mutex::new(None),
        runs: std::sync::Mutex::new(skipped),
    };
    let (tx, rx) = std::sync::mpsc::channel::<Progress>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (tx, shared) = (tx.clone(), &shared);
            scope.spawn(move || shared.work(engine, config, (state_dir, state_path), cancel, &tx));
        }
        drop(tx);
        for p in rx {
            observer(&p);
        }
    });
    if let Some(e) = shared.fatal.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    // Units a cancel kept from starting: recorded as cancelled (their start was recorded).
    let unstarted = shared.queue.into_inner().unwrap_or_else(|e| e.into_inner());
    if !unstarted.is_empty() {
        let _held = crate::slots::state_lock(state_dir)?;
        let mut state = ScheduleState::load(state_path).map_err(config_error)?;
        for (_, s) in unstarted.iter().flat_map(|u| &u.schedules) {
            state.last_outcome.insert(s.id.clone(), RunOutcome::Cancelled);
        }
        state.save(state_path).map_err(config_error)?;
    }
    let mut runs = shared.runs.into_inner().unwrap_or_else(|e| e.into_inner());
    if cancel.is_cancelled() || runs.iter().any(|(_, r)| r.is_none()) {
        return Err(BackupError::Cancelled);
    }
    runs.sort_by_key(|(index, _)| *index);
    Ok(RunDue::Ran(runs.into_iter().filter_map(|(_, r)| r).collect()))
}

/// The run of schedule `s`, skipped for `reason`.
fn skip(s: &crate::config::Schedule, reason: &str) -> DueRun {
    DueRun {
        schedule: s.id.clone(),
        vm: s.vm.clone(),
        outcome: RunOutcome::Skipped(reason.to_owned()),
        pruned: Vec::new(),
        prune_error: None,
        boot_verified: None,
        copied: None,
    }
}

/// The due schedules of one VM, run one after another by one worker.
struct Unit<'c> {
    vm: String,
    /// The repository its backups go to (none: its placement fails, and each run says why).
    repository: Option<String>,
    /// Each schedule with its place in the configuration.
    schedules: Vec<(usize, &'c crate::config::Schedule)>,
    /// This run's lease on the VM (`running/<vm>/` beside the state): until the unit ends.
    _lease: VmLock,
}

/// What the workers share.
struct Shared<'c> {
    /// Where the slot files are.
    slots: std::path::PathBuf,
    host_limit: usize,
    /// The units not started yet.
    queue: std::sync::Mutex<Vec<Unit<'c>>>,
    /// The first error reading or saving the state (which stops the run).
    fatal: std::sync::Mutex<Option<BackupError>>,
    /// Each run with its schedule's place; `None`: cancelled.
    runs: std::sync::Mutex<Vec<(usize, Option<DueRun>)>>,
}

impl<'c> Shared<'c> {
    /// A worker: a slot of the host's, then unit after unit whose repository has a free slot,
    /// each schedule of it run in turn; until the queue is empty, a cancel, or a fatal error.
    fn work<H, A, I, M>(
        &self,
        engine: &Engine<H, A, I, M>,
        config: &Config,
        (state_dir, state_path): (&Path, &Path),
        cancel: &CancelHandle,
        progress: &std::sync::mpsc::Sender<Progress>,
    ) where
        H: Hypervisor,
        A: AgentSource,
        I: ImageTool + Sync,
        M: Mounter,
    {
        let tick = std::time::Duration::from_millis(200);
        let stop = || {
            cancel.is_cancelled()
                || self.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some()
                || self.queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
        };
        let fail = |e: BackupError| {
            self.fatal.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
        };
        // Held for this worker's life: the host's slots count every run-due's workers.
        let _host = loop {
            if stop() {
                return;
            }
            match crate::slots::try_slot(&self.slots, "host", self.host_limit) {
                Ok(Some(slot)) => break slot,
                Ok(None) => {
                    cancel.sleep(tick);
                }
                Err(e) => return fail(e),
            }
        };
        loop {
            if stop() {
                return;
            }
            let picked = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let mut found = None;
                for i in 0..queue.len() {
                    let slot = match (
                        &queue[i].repository,
                        &queue[i].repository.as_ref().and_then(|r| config.repository_max_parallel.get(r)),
                    ) {
                        (Some(r), Some(limit)) => {
                            match crate::slots::try_slot(&self.slots, &format!("repository-{r}"), **limit as usize) {
                                Ok(Some(slot)) => Some(slot),
                                Ok(None) => continue,
                                Err(e) => return fail(e),
                            }
                        }
                        _ => None,
                    };
                    found = Some((queue.remove(i), slot));
                    break;
                }
                found
            };
            let Some((unit, _repository_slot)) = picked else {
                let _ = cancel.sleep(tick);
                continue;
            };
            for (index, s) in &unit.schedules {
                let run = run_one(engine, config, (s, state_dir, state_path), cancel, progress, &self.fatal);
                self.runs.lock().unwrap_or_else(|e| e.into_inner()).push((*index, run));
            }
        }
    }
}

/// One due schedule: its backup, the boot verification its offering asks for, prune of its VM;
/// the outcome recorded in the state (saved). `None` when it was cancelled.
fn run_one<H, A, I, M>(
    engine: &Engine<H, A, I, M>,
    config: &Config,
    (s, state_dir, state_path): (&crate::config::Schedule, &Path, &Path),
    cancel: &CancelHandle,
    progress: &std::sync::mpsc::Sender<Progress>,
    fatal: &std::sync::Mutex<Option<BackupError>>,
) -> Option<DueRun>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    // Read again and written under the state lock: other runs record theirs meanwhile. A
    // cancelled run counts neither as a failure nor as a success.
    let record = |outcome: RunOutcome, failure: Option<Option<String>>| {
        let saved = crate::slots::state_lock(state_dir).and_then(|_held| {
            let mut st = ScheduleState::load(state_path).map_err(config_error)?;
            st.last_outcome.insert(s.id.clone(), outcome);
            if let Some(failure) = failure {
                let history = st.failures.entry(s.vm.clone()).or_default();
                history.record(engine.clock().now(), failure.as_deref().map(|r| (s.id.as_str(), r)));
            }
            st.save(state_path).map_err(config_error)
        });
        if let Err(e) = saved {
            fatal.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
        }
    };
    let placed = placement(config, &s.vm, None, None, Some(s.quiesce));
    let copy_to = placed.as_ref().ok().and_then(|p| p.copy_to.clone().map(|t| (p.repository.clone(), t)));
    let result = placed.and_then(|p| {
        let request = BackupRequest::new(&s.vm, p.repository)
            .with_quiesce(p.quiesce)
            .with_full_every(p.full_every)
            .with_schedule(&s.id);
        let mut tagged = |p: &Progress| {
            let mut p = p.clone();
            p.schedule = Some(s.id.clone());
            let _ = progress.send(p);
        };
        engine.backup(&request, cancel, &mut tagged)
    });
    let mut boot_verified = None;
    let (outcome, pruned, prune_error, copied) = match result {
        Ok(made) => {
            let offering = config.offering_of(&s.vm);
            if let Some(o) = offering.filter(|o| o.boot_verify)
                && let Some(repository) = config.repository(&o.repository)
            {
                let mut r = BootVerifyRequest::new(repository.clone(), &s.vm, &made.manifest.id);
                if let Some(c) = &o.boot_check {
                    r = r.with_check(c);
                }
                boot_verified = Some(engine.verify_boot(&r, cancel).map_err(|e| chain(&e)));
            }
            let copied = copy_to.as_ref().map(|(repository, target)| {
                copy_offsite(engine, config, repository, (&s.vm, &made.manifest.id), target, cancel)
            });
            let (pruned, prune_error) = match prune_vm_with(engine, config, &s.vm, false) {
                Ok(report) => (report.decisions.into_iter().filter(|d| !d.keep).map(|d| d.id).collect(), None),
                Err(e) => (Vec::new(), Some(chain(&e))),
            };
            (RunOutcome::Succeeded(made.id.to_string()), pruned, prune_error, copied)
        }
        Err(BackupError::Cancelled) => {
            record(RunOutcome::Cancelled, None);
            return None;
        }
        Err(e) => (RunOutcome::Failed(chain(&e)), Vec::new(), None, None),
    };
    let run = DueRun { schedule: s.id.clone(), vm: s.vm.clone(), outcome, pruned, prune_error, boot_verified, copied };
    record(run.outcome.clone(), Some(run.failure()));
    Some(run)
}

/// Copies backup `id` of `vm` on `repository` (and what its chain needs) to the configuration's
/// target `target`: what an offering's `copy_to` does after each backup.
#[cfg(feature = "s3")]
pub fn copy_offsite<H, A, I, M>(
    engine: &Engine<H, A, I, M>,
    config: &Config,
    repository: &BackupRepository,
    (vm, id): (&str, &str),
    target: &str,
    cancel: &CancelHandle,
) -> Result<CopiedOffsite, String>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    let t = config.target(target).ok_or_else(|| format!("target {target} is not defined"))?;
    let store = nasbak::objstore::ObjectStore::connect(t).map_err(|e| e.to_string())?;
    let selection = nasbak::CopySelection::Backup { vm: vm.to_owned(), id: id.to_owned() };
    let report = engine
        .catalog()
        .copy_to_target(repository, &store, &selection, None, cancel, &mut |_| {})
        .map_err(|e| chain(&e))?;
    if let Some(skipped) = report.backups.iter().find_map(|b| match &b.result {
        nasbak::CopyResult::Skipped { reason } => Some(format!("{}: {reason}", b.backup)),
        _ => None,
    }) {
        return Err(skipped);
    }
    Ok(CopiedOffsite {
        target: target.to_owned(),
        copied: report
            .backups
            .iter()
            .filter(|b| b.result == nasbak::CopyResult::Copied)
            .map(|b| b.backup.clone())
            .collect(),
        sent: report.backups.iter().map(|b| b.sent).sum(),
    })
}

/// Without feature `s3`, an offering's `copy_to` cannot be followed: said as the copy's failure.
#[cfg(not(feature = "s3"))]
pub fn copy_offsite<H, A, I, M>(
    _engine: &Engine<H, A, I, M>,
    _config: &Config,
    _repository: &BackupRepository,
    _backup: (&str, &str),
    target: &str,
    _cancel: &CancelHandle,
) -> Result<CopiedOffsite, String>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    Err(format!("copying to target {target} needs nasbak-service built with its feature s3"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[[repository]]
name = "a"
type = "shared"
address = "/srv/a"
[[repository]]
name = "b"
type = "shared"
address = "/srv/b"
[[offering]]
name = "gold"
repository = "b"
quiesce = "required"
[assignments]
web1 = "gold"
"#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn placement_follows_flags_then_offering_then_the_only_repository() {
        let c = config();
        let p = placement(&c, "web1", None, None, None).unwrap();
        assert_eq!((p.repository.name().as_str(), p.quiesce), ("b", QuiescePolicy::Required));
        let p = placement(&c, "web1", Some("a"), None, None).unwrap();
        assert_eq!((p.repository.name().as_str(), p.quiesce), ("a", QuiescePolicy::BestEffort));
        let p = placement(&c, "db1", None, Some("gold"), Some(QuiescePolicy::Off)).unwrap();
        assert_eq!((p.repository.name().as_str(), p.quiesce), ("b", QuiescePolicy::Off));
        let e = placement(&c, "db1", None, None, None).unwrap_err().to_string();
        assert!(e.contains("2 repositories") && e.contains("assign db1 to an offering"), "{e}");
        assert!(matches!(placement(&c, "db1", Some("zz"), None, None), Err(BackupError::NotFound { .. })));
        assert!(matches!(placement(&c, "db1", None, Some("zz"), None), Err(BackupError::NotFound { .. })));
        let mut one = c.clone();
        one.repositories.truncate(1);
        one.offerings.clear();
        one.assignments.clear();
        assert_eq!(placement(&one, "db1", None, None, None).unwrap().repository.name().as_str(), "a");
        // An offering that compresses: its backups to its repository are compressed; the same
        // repository named directly keeps its own setting.
        let mut z = c.clone();
        z.offerings[0].compression = Some(nasbak::nasbak_repo::Compression::Zstd);
        let p = placement(&z, "web1", None, None, None).unwrap();
        assert_eq!(p.repository.protection().compression(), nasbak::nasbak_repo::Compression::Zstd);
        let p = placement(&z, "web1", Some("b"), None, None).unwrap();
        assert_eq!(p.repository.protection().compression(), nasbak::nasbak_repo::Compression::None);
    }
}
