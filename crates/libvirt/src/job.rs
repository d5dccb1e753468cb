//! Running a push backup job: begin, progress, completion, timeout, cancel.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

pub use nasbak_process::CancelHandle;

use crate::backup::PushBackup;
use crate::hypervisor::{Hypervisor, JobInfo, JobKind, LibvirtError, Versions};

/// Progress of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobProgress {
    /// Bytes processed.
    pub processed: u64,
    /// Bytes in all (0 while unknown).
    pub total: u64,
}

/// How often to look at the job and report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOptions {
    /// The job is aborted when it runs longer.
    pub timeout: Duration,
    /// Between two looks at the job: completion is noticed within this time.
    pub poll: Duration,
    /// At most this long between two progress reports.
    pub report_every: Duration,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            timeout: Duration::from_secs(24 * 3600),
            poll: Duration::from_millis(50),
            report_every: Duration::from_millis(250),
        }
    }
}

/// A completed backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    /// Bytes copied.
    pub processed: u64,
    /// Bytes in all.
    pub total: u64,
    /// How long libvirt says it ran.
    pub elapsed: Option<Duration>,
}

/// A backup job did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Versions too old.
    #[error(
        "nasbak needs libvirt >= 7.2.0 and QEMU >= 4.2.0 for push backups; this host has libvirt {libvirt} and QEMU {qemu}"
    )]
    TooOld {
        /// libvirt found.
        libvirt: String,
        /// QEMU found.
        qemu: String,
    },
    /// Another job runs on the domain.
    #[error("another job is already running on {domain}{}; wait for it or abort it (libvirt: domjobabort)", if *.is_backup { " (a backup)" } else { "" })]
    Busy {
        /// The domain.
        domain: String,
        /// Whether that job is a backup.
        is_backup: bool,
    },
    /// libvirt refused to start the job.
    #[error("starting the backup of {domain} failed: {message}{hint}")]
    BeginFailed {
        /// The domain.
        domain: String,
        /// libvirt's words.
        message: String,
        /// What to do, when the cause is known.
        hint: String,
    },
    /// The job failed.
    #[error("the backup job of {domain} failed: {message}")]
    Failed {
        /// The domain.
        domain: String,
        /// libvirt's words.
        message: String,
    },
    /// The job was cancelled through the caller's [`CancelHandle`].
    #[error("the backup job of {domain} was cancelled")]
    Cancelled {
        /// The domain.
        domain: String,
    },
    /// The job was aborted by something other than the caller (`virsh domjobabort`, another
    /// management tool, the domain going away).
    #[error("the backup job of {domain} was aborted outside this process (by another tool, or the VM stopped)")]
    Aborted {
        /// The domain.
        domain: String,
    },
    /// The job ran past its timeout and was aborted.
    #[error("the backup job of {domain} ran longer than {timeout:?} and was aborted")]
    TimedOut {
        /// The domain.
        domain: String,
        /// The limit.
        timeout: Duration,
    },
    /// libvirt stopped answering about the job.
    #[error(
        "lost track of the backup job of {domain}: libvirt no longer reports it (the VM stopped, or libvirtd restarted or went away)"
    )]
    Libvirt {
        /// The domain.
        domain: String,
        /// The error.
        #[source]
        source: LibvirtError,
    },
    /// libvirtd or the domain's QEMU stopped answering while the job was started or followed.
    #[error(
        "the backup job of {domain} could not be followed: libvirt did not answer in time; an abort was sent, and the job may run on until QEMU answers again (the next backup of {domain} aborts it)"
    )]
    Unresponsive {
        /// The domain.
        domain: String,
        /// The call that did not answer ([`LibvirtError::is_timeout`]).
        #[source]
        source: LibvirtError,
    },
}

impl JobError {
    /// A libvirt error while following `domain`'s job: [`JobError::Unresponsive`] for a call
    /// that did not answer, else [`JobError::Libvirt`].
    fn following(domain: &str, source: LibvirtError) -> JobError {
        let domain = domain.to_owned();
        if source.is_timeout() {
            JobError::Unresponsive { domain, source }
        } else {
            JobError::Libvirt { domain, source }
        }
    }
}

fn version_text(v: (u32, u32, u32)) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// Checks libvirt >= 7.2.0 and QEMU >= 4.2.0 (what push backups need).
pub fn check_versions(v: Versions) -> Result<(), JobError> {
    if v.libvirt < (7, 2, 0) || v.qemu < (4, 2, 0) {
        return Err(JobError::TooOld { libvirt: version_text(v.libvirt), qemu: version_text(v.qemu) });
    }
    Ok(())
}

/// What to do about libvirt's refusal to open a target, when we can tell.
fn begin_hint(message: &str, target_dirs: &[PathBuf]) -> String {
    let dir = target_dirs.first().map(|d| d.display().to_string()).unwrap_or_default();
    if message.contains("Permission denied") {
        format!(
            ". QEMU runs as an unprivileged user (libvirt-qemu on Debian) and cannot create files in {dir}: make the directory and every parent traversable (0755) and the directory writable by that user"
        )
    } else if message.contains("No such file or directory") && target_dirs.iter().all(|d| Path::new(d).is_dir()) {
        format!(
            ". {dir} exists on the host but not in QEMU's mount namespace: it was mounted after the VM started while / is not a shared mount. Run `mount --make-rshared /` before starting libvirtd and the VM (systemd hosts do this), or restart the VM"
        )
    } else {
        String::new()
    }
}

/// A push backup job that has started. Dropping it before [`RunningBackup::wait`] returned
/// aborts the job: an error or a panic between start and wait leaves no job running.
#[derive(Debug)]
pub struct RunningBackup<'a, H: Hypervisor> {
    hv: &'a H,
    domain: String,
    armed: bool,
}

impl<H: Hypervisor> Drop for RunningBackup<'_, H> {
    fn drop(&mut self) {
        if self.armed {
            abort_and_wait(self.hv, &self.domain);
        }
    }
}

/// Starts the push backup `backup` of `domain`, refusing when another job runs.
///
/// Thaw a frozen guest right after this returns (success or not), then [`RunningBackup::wait`].
pub fn start_backup<'a, H: Hypervisor>(
    hv: &'a H,
    domain: &str,
    backup: &PushBackup,
) -> Result<RunningBackup<'a, H>, JobError> {
    let target_dirs: Vec<PathBuf> =
        backup.targets.iter().filter_map(|t| t.file.parent().map(Path::to_path_buf)).collect();
    let current = hv.current_job(domain).map_err(|source| JobError::following(domain, source))?;
    if current.kind == JobKind::Active {
        return Err(JobError::Busy { domain: domain.to_owned(), is_backup: current.is_backup });
    }
    hv.backup_begin(domain, &backup.to_xml(), backup.checkpoint_xml(), backup.reuses_targets()).map_err(|e| {
        if e.is_timeout() {
            // The begin may still take effect once QEMU answers: the abort goes after it.
            abort_and_wait(hv, domain);
            return JobError::following(domain, e);
        }
        JobError::BeginFailed {
            domain: domain.to_owned(),
            hint: begin_hint(&e.message, &target_dirs),
            message: e.message,
        }
    })?;
    Ok(RunningBackup { hv, domain: domain.to_owned(), armed: true })
}

/// Starts and waits: [`start_backup`] then [`RunningBackup::wait`].
pub fn run_backup<H: Hypervisor>(
    hv: &H,
    domain: &str,
    backup: &PushBackup,
    options: JobOptions,
    cancel: &CancelHandle,
    progress: &mut dyn FnMut(JobProgress),
) -> Result<JobSummary, JobError> {
    start_backup(hv, domain, backup)?.wait(options, cancel, progress)
}

impl<H: Hypervisor> RunningBackup<'_, H> {
    /// Waits for the job to end. `progress` is called at least every `report_every` while it
    /// runs, and once at the end. Timeout and cancel abort it.
    pub fn wait(
        mut self,
        options: JobOptions,
        cancel: &CancelHandle,
        progress: &mut dyn FnMut(JobProgress),
    ) -> Result<JobSummary, JobError> {
        let domain = self.domain.clone();
        let hv = self.hv;
        // A poll not sent because the operation's deadline passed: the operation's time is up.
        let lost = |source: LibvirtError| {
            if source.is_past_deadline() {
                JobError::TimedOut { domain: domain.clone(), timeout: options.timeout }
            } else {
                JobError::following(&domain, source)
            }
        };
        let start = Instant::now();
        let mut last_report: Option<Instant> = None;
        loop {
            let info = hv.current_job(&domain).map_err(lost)?;
            if info.kind != JobKind::Active {
                break;
            }
            if last_report.is_none_or(|t| t.elapsed() >= options.report_every.saturating_sub(options.poll)) {
                progress(JobProgress { processed: info.processed, total: info.total });
                last_report = Some(Instant::now());
            }
            if cancel.is_cancelled() {
                return Err(JobError::Cancelled { domain: domain.clone() });
            }
            if start.elapsed() > options.timeout {
                return Err(JobError::TimedOut { domain: domain.clone(), timeout: options.timeout });
            }
            // Wakes at a cancel rather than at the end of the poll.
            cancel.sleep(options.poll);
        }
        self.armed = false;
        let done: JobInfo = hv.completed_job(&domain).map_err(lost)?;
        match done.kind {
            JobKind::Completed => {
                progress(JobProgress { processed: done.processed, total: done.total });
                Ok(JobSummary { processed: done.processed, total: done.total, elapsed: done.elapsed })
            }
            JobKind::Cancelled if cancel.is_cancelled() => Err(JobError::Cancelled { domain: domain.clone() }),
            JobKind::Cancelled => Err(JobError::Aborted { domain: domain.clone() }),
            _ if cancel.is_cancelled() => Err(JobError::Cancelled { domain: domain.clone() }),
            _ => Err(JobError::Failed {
                domain: domain.clone(),
                message: done.error.unwrap_or_else(|| "libvirt gave no reason".into()),
            }),
        }
    }
}

impl<H: Hypervisor> RunningBackup<'_, H> {
    /// Ends a pull-mode job whose export has been read: aborted (a pull job runs until then)
    /// and waited for until libvirt no longer lists it, for [`END_PULL_WAIT`] at most (a busy
    /// QEMU can take longer than the usual cleanup budget to tear it down). A job that ended
    /// by itself before failed, and says why: what was read from its export may not be whole.
    /// A job still listed after the wait is an error too: the next job would find it.
    pub fn end_pull(self) -> Result<(), JobError> {
        self.end_pull_within(END_PULL_WAIT)
    }

    /// [`RunningBackup::end_pull`] waiting `wait` at most for the job to go.
    pub fn end_pull_within(mut self, wait: Duration) -> Result<(), JobError> {
        let domain = self.domain.clone();
        let info = self.hv.current_job(&domain).map_err(|e| JobError::following(&domain, e))?;
        self.armed = false;
        if info.kind != JobKind::Active {
            let done = self.hv.completed_job(&domain).map_err(|e| JobError::following(&domain, e))?;
            return Err(JobError::Failed {
                domain,
                message: done.error.unwrap_or_else(|| "the pull job ended before its export was read".into()),
            });
        }
        let until = Instant::now() + wait;
        let _scope = crate::deadline::scope(until.max(Instant::now() + crate::deadline::CLEANUP_BUDGET));
        // An abort refused because the job has just gone is no failure: the poll below tells.
        if let Err(e) = self.hv.abort_job(&domain)
            && e.is_timeout()
        {
            return Err(JobError::following(&domain, e));
        }
        let mut pause = Duration::from_millis(10);
        loop {
            match self.hv.current_job(&domain) {
                // Soon at first (a job usually ends within some tens of milliseconds), then not
                // too often: each look holds libvirt's job lock and the monitor, which the
                // handler of QEMU's block-job events needs to end the job (polled every 5 ms, a
                // busy QEMU's teardown was starved for 30 s).
                Ok(j) if j.kind == JobKind::Active && Instant::now() < until => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Ok(j) if j.kind == JobKind::Active => {
                    return Err(JobError::Failed {
                        domain: domain.clone(),
                        message: format!(
                            "the pull job was still running {} s after nasbak aborted it (QEMU is busy or stuck); end it with `virsh domjobabort {domain}`",
                            wait.as_secs()
                        ),
                    });
                }
                _ => {
                    let _ = self.hv.completed_job(&domain);
                    return Ok(());
                }
            }
        }
    }
}

/// How long [`RunningBackup::end_pull`] waits for an aborted pull job to go.
pub const END_PULL_WAIT: Duration = Duration::from_secs(60);

/// Aborts the job and waits until libvirt no longer lists it, within the cleanup budget
/// ([`crate::deadline::CLEANUP_BUDGET`]) whatever the operation's deadline was: a QEMU that does
/// not answer gets the abort sent and is left with it.
fn abort_and_wait<H: Hypervisor>(hv: &H, domain: &str) {
    let deadline = Instant::now() + crate::deadline::CLEANUP_BUDGET;
    let _scope = crate::deadline::scope(deadline);
    if hv.abort_job(domain).is_err_and(|e| e.is_timeout()) {
        return;
    }
    while Instant::now() < deadline {
        match hv.current_job(domain) {
            // QEMU ends an aborted job within a few milliseconds: look often.
            Ok(j) if j.kind == JobKind::Active => thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    let _ = hv.completed_job(domain);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::MockHypervisor;
    use mockall::Sequence;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn job(kind: JobKind, processed: u64) -> JobInfo {
        JobInfo { kind, is_backup: true, processed, total: 100, error: None, elapsed: None }
    }

    fn empty() -> PushBackup {
        PushBackup {
            targets: Vec::new(),
            excluded: Vec::new(),
            checkpoint: None,
            without_bitmap: Vec::new(),
            into_existing_raw: false,
            encryption_secret: None,
            pull_socket: None,
        }
    }

    fn fast() -> JobOptions {
        JobOptions {
            timeout: Duration::from_secs(5),
            poll: Duration::from_millis(1),
            report_every: Duration::from_millis(1),
        }
    }

    fn run(
        hv: &MockHypervisor,
        options: JobOptions,
        cancel: &CancelHandle,
    ) -> (Result<JobSummary, JobError>, Vec<JobProgress>) {
        let mut seen = Vec::new();
        let r = run_backup(hv, "vm1", &empty(), options, cancel, &mut |p| seen.push(p));
        (r, seen)
    }

    #[test]
    fn completion_with_progress() {
        let mut hv = MockHypervisor::new();
        let mut seq = Sequence::new();
        hv.expect_current_job().times(1).in_sequence(&mut seq).returning(|_| Ok(job(JobKind::None, 0)));
        hv.expect_backup_begin().times(1).in_sequence(&mut seq).returning(|_, _, _, _| Ok(()));
        for p in [10, 60] {
            hv.expect_current_job().times(1).in_sequence(&mut seq).returning(move |_| Ok(job(JobKind::Active, p)));
        }
        hv.expect_current_job().times(1).in_sequence(&mut seq).returning(|_| Ok(job(JobKind::None, 0)));
        hv.expect_completed_job().times(1).in_sequence(&mut seq).returning(|_| Ok(job(JobKind::Completed, 100)));
        hv.expect_abort_job().never();
        let (r, seen) = run(&hv, fast(), &CancelHandle::new());
        assert_eq!(r.unwrap().processed, 100);
        let processed: Vec<u64> = seen.iter().map(|p| p.processed).collect();
        assert_eq!(processed, [10, 60, 100]);
    }

    #[test]
    fn a_failed_job_is_told_apart_from_completion() {
        let mut hv = MockHypervisor::new();
        let mut n = 0;
        hv.expect_current_job().returning(move |_| {
            n += 1;
            Ok(job(if n == 2 { JobKind::Active } else { JobKind::None }, 0))
        });
        hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
        hv.expect_completed_job()
            .returning(|_| Ok(JobInfo { error: Some("No space left on device".into()), ..job(JobKind::Failed, 5) }));
        let (r, _) = run(&hv, fast(), &CancelHandle::new());
        assert_eq!(
            r.unwrap_err(),
            JobError::Failed { domain: "vm1".into(), message: "No space left on device".into() }
        );
    }

    #[test]
    fn a_running_job_is_refused_before_anything_starts() {
        let mut hv = MockHypervisor::new();
        hv.expect_current_job().returning(|_| Ok(job(JobKind::Active, 1)));
        hv.expect_backup_begin().never();
        let (r, _) = run(&hv, fast(), &CancelHandle::new());
        assert!(r.unwrap_err().to_string().contains("another job is already running on vm1"));
    }

    #[test]
    fn cancel_and_timeout_abort_the_job() {
        for cancelled in [true, false] {
            let mut hv = MockHypervisor::new();
            let mut n = 0;
            let aborted = Arc::new(AtomicBool::new(false));
            let a = Arc::clone(&aborted);
            hv.expect_current_job().returning(move |_| {
                n += 1;
                Ok(job(if n == 1 || a.load(Ordering::SeqCst) { JobKind::None } else { JobKind::Active }, 0))
            });
            hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
            let a = Arc::clone(&aborted);
            hv.expect_abort_job().times(1).returning(move |_| {
                a.store(true, Ordering::SeqCst);
                Ok(())
            });
            hv.expect_completed_job().returning(|_| Ok(job(JobKind::Cancelled, 0)));
            let cancel = CancelHandle::new();
            let mut options = fast();
            if cancelled {
                cancel.cancel();
            } else {
                options.timeout = Duration::from_millis(20);
            }
            let (r, _) = run(&hv, options, &cancel);
            let e = r.unwrap_err();
            assert!(
                matches!(e, JobError::Cancelled { .. } if cancelled)
                    || matches!(e, JobError::TimedOut { .. } if !cancelled),
                "{e}"
            );
        }
    }

    #[test]
    fn a_job_whose_qemu_stops_answering_is_unresponsive_and_aborted_once() {
        // The first poll finds no job, the next ones time out: the wait fails with
        // Unresponsive (the timeout as its source), an abort is sent once and not waited on.
        let mut hv = MockHypervisor::new();
        let mut n = 0;
        hv.expect_current_job().returning(move |_| {
            n += 1;
            if n == 1 { Ok(job(JobKind::None, 0)) } else { Err(LibvirtError::timeout("QEMU is not answering")) }
        });
        hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
        hv.expect_abort_job().times(1).returning(|_| Err(LibvirtError::timeout("QEMU is not answering")));
        hv.expect_completed_job().never();
        let (r, _) = run(&hv, fast(), &CancelHandle::new());
        match r.unwrap_err() {
            JobError::Unresponsive { domain, source } => {
                assert_eq!(domain, "vm1");
                assert!(source.is_timeout());
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn a_poll_past_the_operations_deadline_is_the_jobs_timeout() {
        // The operation's time ran out before a poll: the job timed out (and is aborted), it is
        // not a QEMU that stopped answering.
        let mut hv = MockHypervisor::new();
        let mut n = 0;
        hv.expect_current_job().returning(move |_| {
            n += 1;
            if n == 1 { Ok(job(JobKind::None, 0)) } else { Err(LibvirtError::past_deadline("not sent")) }
        });
        hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
        hv.expect_abort_job().times(1).returning(|_| Ok(()));
        hv.expect_completed_job().returning(|_| Ok(job(JobKind::Cancelled, 0)));
        let (r, _) = run(&hv, fast(), &CancelHandle::new());
        assert!(matches!(r.unwrap_err(), JobError::TimedOut { .. }));
    }

    #[test]
    fn a_begin_that_does_not_answer_is_followed_by_an_abort() {
        // The begin may take effect once QEMU answers again: the abort goes after it.
        let mut hv = MockHypervisor::new();
        hv.expect_current_job().returning(|_| Ok(job(JobKind::None, 0)));
        hv.expect_backup_begin().returning(|_, _, _, _| Err(LibvirtError::timeout("not answering")));
        hv.expect_abort_job().times(1).returning(|_| Ok(()));
        hv.expect_completed_job().returning(|_| Ok(job(JobKind::None, 0)));
        let (r, _) = run(&hv, fast(), &CancelHandle::new());
        assert!(matches!(r.unwrap_err(), JobError::Unresponsive { .. }));
    }

    #[test]
    fn a_pull_job_is_aborted_to_end_and_one_that_ended_by_itself_failed() {
        let mut hv = MockHypervisor::new();
        let mut polls = 0;
        hv.expect_current_job().returning(move |_| {
            polls += 1;
            // Idle before the begin, running until the abort.
            Ok(job(if polls == 1 || polls > 2 { JobKind::None } else { JobKind::Active }, 0))
        });
        hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
        hv.expect_abort_job().times(1).returning(|_| Ok(()));
        hv.expect_completed_job().returning(|_| Ok(job(JobKind::Cancelled, 0)));
        start_backup(&hv, "vm1", &empty()).unwrap().end_pull().unwrap();
        // Ended before it was read: failed, with libvirt's reason; no abort.
        let mut hv = MockHypervisor::new();
        hv.expect_current_job().returning(|_| Ok(job(JobKind::None, 0)));
        hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
        hv.expect_abort_job().times(0);
        hv.expect_completed_job()
            .returning(|_| Ok(JobInfo { error: Some("scratch file full".into()), ..job(JobKind::Failed, 0) }));
        let e = start_backup(&hv, "vm1", &empty()).unwrap().end_pull().unwrap_err();
        assert!(e.to_string().contains("scratch file full"), "{e}");
        // Still listed long after its abort: an error that says so, never a silent success.
        let mut hv = MockHypervisor::new();
        let mut polls = 0;
        hv.expect_current_job().returning(move |_| {
            polls += 1;
            Ok(job(if polls == 1 { JobKind::None } else { JobKind::Active }, 0))
        });
        hv.expect_backup_begin().returning(|_, _, _, _| Ok(()));
        hv.expect_abort_job().returning(|_| Ok(()));
        hv.expect_completed_job().returning(|_| Ok(job(JobKind::None, 0)));
        let started = Instant::now();
        let e = start_backup(&hv, "vm1", &empty()).unwrap().end_pull_within(Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("still running") && e.to_string().contains("domjobabort"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn begin_failures_get_a_hint() {
        let dir = std::env::temp_dir();
        let backup = PushBackup {
            targets: vec![crate::BackupTarget { disk: "vda".into(), file: dir.join("a.qcow2"), incremental: None }],
            excluded: Vec::new(),
            checkpoint: None,
            without_bitmap: Vec::new(),
            into_existing_raw: false,
            encryption_secret: None,
            pull_socket: None,
        };
        let mut hv = MockHypervisor::new();
        hv.expect_current_job().returning(|_| Ok(job(JobKind::None, 0)));
        hv.expect_backup_begin().returning(|_, _, _, _| {
            Err(LibvirtError::new("internal error: unable to execute QEMU command 'blockdev-add': Could not open '/x/a.qcow2': No such file or directory"))
        });
        let mut seen = Vec::new();
        let e = run_backup(&hv, "vm1", &backup, fast(), &CancelHandle::new(), &mut |p| seen.push(p)).unwrap_err();
        assert!(e.to_string().contains("mount namespace") && e.to_string().contains("make-rshared"), "{e}");
        assert!(begin_hint("Could not open 'x': Permission denied", &[]).contains("libvirt-qemu"));
    }

    #[test]
    fn versions() {
        assert!(check_versions(Versions { libvirt: (9, 0, 0), qemu: (7, 2, 0) }).is_ok());
        let e = check_versions(Versions { libvirt: (7, 1, 9), qemu: (7, 2, 0) }).unwrap_err();
        assert!(e.to_string().contains("libvirt 7.1.9 and QEMU 7.2.0"), "{e}");
        assert!(check_versions(Versions { libvirt: (8, 0, 0), qemu: (4, 1, 0) }).is_err());
    }
}
