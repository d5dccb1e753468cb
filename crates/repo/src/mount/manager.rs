//! One stable mount point per repository, shared by every nasbak user on the host.
//!
//! Locking protocol, with `flock(2)` locks that the kernel drops when a process dies:
//! - `<runtime>/locks/<repo>.lock` is a mutex held only while mounting or unmounting;
//! - every user holds a shared lock on `<runtime>/locks/<repo>.users` for as long as it uses the
//!   repository. On release, a user drops its shared lock and, still under the mutex, tries an
//!   exclusive one: it succeeds only when no other user is left, and then that user unmounts.

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::{Capacity, MountError, MountTimeouts, Mounter, UnmountOutcome};
use crate::model::layout::RepositoryLayout;
use crate::model::repository::{BackupRepository, MountPlan};

/// Mounts repositories on demand under a runtime directory (`/run/nasbak` on a host).
#[derive(Debug)]
pub struct RepositoryMounts<M> {
    mounter: M,
    runtime_dir: PathBuf,
    timeouts: MountTimeouts,
}

/// How long [`RepositoryMounts::unmount_if_unused`] waits for a registration whose holder is
/// on its way out.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A process registered as a user of a repository (see [`RepositoryMounts::users`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepositoryUser {
    /// Its process id.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
}

impl std::fmt::Display for RepositoryUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.command, self.pid)
    }
}

/// What releasing a repository did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Other users still use the mount (or the repository is `shared`): nothing unmounted.
    StillInUse,
    /// This was the last user and the repository was unmounted.
    Unmounted(UnmountOutcome),
}

impl<M: Mounter> RepositoryMounts<M> {
    /// Mount points go to `<runtime_dir>/mnt/<repo>`, locks to `<runtime_dir>/locks/`.
    pub fn new(mounter: M, runtime_dir: impl Into<PathBuf>, timeouts: MountTimeouts) -> Self {
        RepositoryMounts { mounter, runtime_dir: runtime_dir.into(), timeouts }
    }

    /// The directory of what lives only while this host runs (mount points, locks).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The mounter underneath.
    pub fn mounter(&self) -> &M {
        &self.mounter
    }

    /// Where `repo` is (or would be) mounted.
    pub fn mount_point(&self, repo: &BackupRepository) -> PathBuf {
        match repo.shared_path() {
            Some(p) => p,
            None => self.runtime_dir.join("mnt").join(repo.name().as_str()),
        }
    }

    /// Makes `repo` available and registers this caller as a user of it.
    ///
    /// Reuses a mount that is already there and answers; replaces a stale one (listed in
    /// mountinfo but not answering within the probe timeout); refuses a foreign mount on the
    /// mount point.
    pub fn acquire(&self, repo: &BackupRepository) -> Result<MountedRepository<'_, M>, MountError> {
        let mount_point = self.mount_point(repo);
        let Some(plan) = repo.mount_plan() else {
            self.mounter.probe(&mount_point, self.timeouts.probe)?;
            return Ok(MountedRepository {
                owner: self,
                root: mount_point,
                users: None,
                name: repo.name().to_string(),
                kind: repo.kind().clone(),
            });
        };
        let locks = self.runtime_dir.join("locks");
        make_dir(&locks, 0o755)?;
        make_dir(&self.runtime_dir.join("mnt"), 0o755)?;
        let name = repo.name().as_str();
        let mutex = self.lock_mutex(&locks.join(format!("{name}.lock")))?;
        self.ensure_mounted(&plan, &mount_point, &locks.join(format!("{name}.source")))?;
        let users_path = locks.join(format!("{name}.users"));
        let users = open_lock_file(&users_path)?;
        users.lock_shared().map_err(|source| MountError::Io {
            action: "registering as a user of",
            path: users_path,
            source,
        })?;
        drop(mutex);
        Ok(MountedRepository {
            owner: self,
            root: mount_point,
            users: Some(users),
            name: name.to_owned(),
            kind: repo.kind().clone(),
        })
    }

    /// Unmounts the repository called `name` if nasbak mounted it and no user is left (a user
    /// may be another process, or a daemon that inherited a registration, see
    /// [`MountedRepository::registration`]): what a process that let go of such a daemon calls.
    ///
    /// A daemon just stopped lets go of its registration as it exits: while the registration
    /// is held but no process is seen holding it ([`RepositoryMounts::users`]), it is one on
    /// its way out, and the check is made again (for at most 5 s).
    pub fn unmount_if_unused(&self, name: &str) -> Result<ReleaseOutcome, MountError> {
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match self.unmount_if_unheld(name)? {
                Some(outcome) => return Ok(outcome),
                None if Instant::now() < deadline && self.users(name).is_empty() => {
                    thread::sleep(Duration::from_millis(50));
                }
                None => return Ok(ReleaseOutcome::StillInUse),
            }
        }
    }

    /// One try of [`RepositoryMounts::unmount_if_unused`]: `None` while a registration is held.
    fn unmount_if_unheld(&self, name: &str) -> Result<Option<ReleaseOutcome>, MountError> {
        let locks = self.runtime_dir.join("locks");
        let users_path = locks.join(format!("{name}.users"));
        if !users_path.exists() {
            return Ok(Some(ReleaseOutcome::StillInUse));
        }
        let root = self.runtime_dir.join("mnt").join(name);
        let mutex = self.lock_mutex(&locks.join(format!("{name}.lock")))?;
        let check = open_lock_file(&users_path)?;
        let outcome = match check.try_lock() {
            Ok(()) if self.mounter.mounts()?.iter().any(|m| m.mount_point == root) => {
                Some(ReleaseOutcome::Unmounted(self.unmount(name, &root)?))
            }
            Ok(()) => Some(ReleaseOutcome::StillInUse),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Error(source)) => {
                return Err(MountError::Io { action: "locking", path: users_path, source });
            }
        };
        drop(check);
        drop(mutex);
        Ok(outcome)
    }

    /// The processes that hold a registration on the repository called `name` (its users file
    /// open): this process's own included, found in `/proc/*/fd`. What to name when a repository
    /// stays mounted after its last known user let go.
    pub fn users(&self, name: &str) -> Vec<RepositoryUser> {
        let users_path = self.runtime_dir.join("locks").join(format!("{name}.users"));
        let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
        let mut found = Vec::new();
        for entry in procs.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
            if fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == users_path)) {
                let command = fs::read_to_string(entry.path().join("comm")).unwrap_or_default().trim().to_owned();
                found.push(RepositoryUser { pid, command });
            }
        }
        found
    }

    /// `record` keeps what nasbak mounted there (type and source, never options or secrets):
    /// two configurations may each name a different repository `backup`, and the second must
    /// not write into the first's share because the mount point is the same.
    fn ensure_mounted(&self, plan: &MountPlan, mount_point: &Path, record: &Path) -> Result<(), MountError> {
        let expected = format!("{}\n{}\n", plan.fstype, plan.source);
        let existing = self.mounter.mounts()?.into_iter().rev().find(|m| m.mount_point == mount_point);
        if let Some(found) = existing {
            let recorded = fs::read_to_string(record).ok();
            let other = recorded.as_deref().filter(|r| *r != expected);
            if !fstype_matches(&found.fstype, plan) || other.is_some() {
                let found_source = match other.and_then(|r| r.lines().nth(1)) {
                    Some(source) => format!("{source} (another repository of the same name)"),
                    None => found.source,
                };
                return Err(MountError::Conflict {
                    mount_point: mount_point.to_owned(),
                    found_fstype: found.fstype,
                    found_source,
                    expected_fstype: plan.fstype.clone(),
                });
            }
            if self.mounter.probe(mount_point, self.timeouts.probe).is_ok() {
                return Ok(());
            }
            // Stale: listed but not answering. Detach it and mount afresh.
            self.mounter.unmount(mount_point, self.timeouts.unmount)?;
        }
        // Only now, with nothing mounted there, is it safe to touch the mount point: a stat of a
        // stalled mount would hang.
        make_mount_point(mount_point)?;
        if let Err(e) = self.mounter.mount(plan, mount_point, self.timeouts.mount) {
            // A helper killed at its timeout may have mounted before it hung (sshfs does).
            if self.mounter.mounts().is_ok_and(|all| all.iter().any(|m| m.mount_point == mount_point)) {
                let _ = self.mounter.unmount(mount_point, self.timeouts.unmount);
            }
            return Err(e);
        }
        if let Err(e) = self.mounter.probe(mount_point, self.timeouts.probe) {
            let _ = self.mounter.unmount(mount_point, self.timeouts.unmount);
            return Err(MountError::Unresponsive { path: mount_point.to_owned(), reason: e.to_string() });
        }
        fs::write(record, expected).map_err(|source| MountError::Io {
            action: "recording what was mounted in",
            path: record.to_owned(),
            source,
        })
    }

    fn lock_mutex(&self, path: &Path) -> Result<File, MountError> {
        let file = open_lock_file(path)?;
        let deadline = Instant::now() + self.timeouts.lock;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(TryLockError::WouldBlock) => {
                    return Err(MountError::LockTimeout { path: path.to_owned(), timeout: self.timeouts.lock });
                }
                Err(TryLockError::Error(source)) => {
                    return Err(MountError::Io { action: "locking", path: path.to_owned(), source });
                }
            }
        }
    }

    /// Unmounts `root` and forgets what was mounted there (under the mutex).
    fn unmount(&self, name: &str, root: &Path) -> Result<UnmountOutcome, MountError> {
        let outcome = self.mounter.unmount(root, self.timeouts.unmount)?;
        let _ = fs::remove_file(self.runtime_dir.join("locks").join(format!("{name}.source")));
        Ok(outcome)
    }

    fn release(&self, name: &str, root: &Path, users: File) -> Result<ReleaseOutcome, MountError> {
        let locks = self.runtime_dir.join("locks");
        let mutex = self.lock_mutex(&locks.join(format!("{name}.lock")))?;
        drop(users);
        let users_path = locks.join(format!("{name}.users"));
        let check = open_lock_file(&users_path)?;
        let outcome = match check.try_lock() {
            Ok(()) => ReleaseOutcome::Unmounted(self.unmount(name, root)?),
            Err(TryLockError::WouldBlock) => ReleaseOutcome::StillInUse,
            Err(TryLockError::Error(source)) => {
                return Err(MountError::Io { action: "locking", path: users_path, source });
            }
        };
        drop(check);
        drop(mutex);
        Ok(outcome)
    }
}

fn fstype_matches(found: &str, plan: &MountPlan) -> bool {
    let planned = plan.fstype.as_str();
    // A bind mount shows the type of the file system it binds, which cannot be known here.
    let bind = planned == "none" || plan.options.contains("bind") || plan.options.contains("rbind");
    bind || found == planned
        || (planned == "nfs" && found.starts_with("nfs"))
        || (planned == "cifs" && found.starts_with("smb"))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), MountError> {
    let io = |source| MountError::Io { action: "creating", path: path.to_owned(), source };
    DirBuilder::new().recursive(true).mode(mode).create(path).map_err(io)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io)
}

/// Creates the mount point (0755, so an unprivileged QEMU can reach the repository) without
/// ever calling stat on an existing one.
fn make_mount_point(path: &Path) -> Result<(), MountError> {
    match DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|source| MountError::Io {
            action: "creating",
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(MountError::Io { action: "creating", path: path.to_owned(), source }),
    }
}

fn open_lock_file(path: &Path) -> Result<File, MountError> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(|source| MountError::Io {
        action: "opening the lock file",
        path: path.to_owned(),
        source,
    })
}

/// A repository in use by this caller; released (and unmounted if this was the last user) on
/// [`MountedRepository::release`] or on drop.
#[derive(Debug)]
pub struct MountedRepository<'a, M: Mounter> {
    owner: &'a RepositoryMounts<M>,
    root: PathBuf,
    users: Option<File>,
    name: String,
    kind: crate::RepositoryKind,
}

impl<M: Mounter> MountedRepository<'_, M> {
    /// Where the repository's files are.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The on-repository layout rooted here.
    pub fn layout(&self) -> RepositoryLayout {
        RepositoryLayout::new(&self.root)
    }

    /// Whether the repository is still there: still mounted (for repositories nasbak mounts) and
    /// answering a probe within the probe timeout. Workflows ask after a failure, to tell a
    /// repository that went away from other causes.
    pub fn health(&self) -> Result<(), MountError> {
        if self.users.is_some() && !self.owner.mounter.mounts()?.iter().any(|m| m.mount_point == self.root) {
            return Err(MountError::Vanished { path: self.root.clone() });
        }
        self.owner
            .mounter
            .probe(&self.root, self.owner.timeouts.probe)
            .map_err(|e| MountError::Unresponsive { path: self.root.clone(), reason: e.to_string() })
    }

    /// The open file whose shared lock registers this user (`None` for a repository nasbak
    /// does not mount). A process that inherits it (a daemon serving files of the repository)
    /// keeps the repository mounted for as long as it lives, after this user has let go;
    /// [`RepositoryMounts::unmount_if_unused`] unmounts once it has ended.
    pub fn registration(&self) -> Option<&File> {
        self.users.as_ref()
    }

    /// Capacity of the repository, under the probe timeout.
    pub fn capacity(&self) -> Result<Capacity, MountError> {
        self.owner.mounter.capacity(&self.root, self.owner.timeouts.probe)
    }

    /// Writes a probe file as root, reads it back and removes it, all under the probe timeout.
    /// When root may not write (an NFS export with `root_squash`, a share mapping root to a user
    /// without rights), the error says so and what to change.
    pub fn check_writable(&self) -> Result<(), MountError> {
        let probe = self.root.join(format!(".nasbak-check-{}", std::process::id()));
        let p = probe.clone();
        let timeout = self.owner.timeouts.probe;
        let result = nasbak_process::run_with_timeout(timeout, move || -> std::io::Result<Vec<u8>> {
            std::fs::write(&p, b"nasbak")?;
            let back = std::fs::read(&p);
            let _ = std::fs::remove_file(&p);
            back
        })
        .ok_or(MountError::TimedOut { action: "writing a probe file to", path: probe.clone(), timeout })?;
        match result {
            Ok(back) if back == b"nasbak" => Ok(()),
            Ok(_) => Err(MountError::Io {
                action: "reading back other bytes than were written to",
                path: probe,
                source: std::io::Error::other("the repository returned different data"),
            }),
            Err(source)
                if source.kind() == std::io::ErrorKind::PermissionDenied
                    || source.raw_os_error() == Some(libc_eperm()) =>
            {
                Err(MountError::NotWritable { repository: self.name.clone(), hint: root_hint(&self.kind), source })
            }
            Err(source) => Err(MountError::Io { action: "writing", path: probe, source }),
        }
    }

    /// Stops using the repository; the last user unmounts it.
    pub fn release(mut self) -> Result<ReleaseOutcome, MountError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<ReleaseOutcome, MountError> {
        match self.users.take() {
            Some(users) => self.owner.release(&self.name, &self.root, users),
            None => Ok(ReleaseOutcome::StillInUse),
        }
    }
}

fn libc_eperm() -> i32 {
    nix::errno::Errno::EPERM as i32
}

/// What to change when root may not write to a repository of this kind.
pub fn root_hint(kind: &crate::RepositoryKind) -> String {
    use crate::RepositoryKind as K;
    match kind {
        K::Nfs => "the NFS server squashes root (root_squash): export the directory with no_root_squash \
                   (in /etc/exports: `/export HOST(rw,no_root_squash)`, re-exported), \
                   because QEMU and nasbak write as root"
            .into(),
        K::Cifs => "the share maps root to a user without write access: give the user in the credentials \
                    write rights on the share, or mount with uid=0,gid=0 and a user that may write"
            .into(),
        _ => "root may not write there: check the file system's permissions and how the server maps root".into(),
    }
}

impl<M: Mounter> Drop for MountedRepository<'_, M> {
    fn drop(&mut self) {
        let _ = self.release_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_hints_name_the_fix() {
        use crate::RepositoryKind as K;
        assert!(root_hint(&K::Nfs).contains("no_root_squash"));
        assert!(root_hint(&K::Cifs).contains("uid=0"));
    }
    use crate::model::mountinfo::MountInfoEntry;
    use crate::model::repository::RepositoryKind;
    use crate::mount::MockMounter;
    use mockall::Sequence;
    use mockall::predicate::*;

    fn repo() -> BackupRepository {
        BackupRepository::new("r1", RepositoryKind::Nfs, "nas:/e", "", None).unwrap()
    }

    fn entry(dir: &Path, fstype: &str) -> MountInfoEntry {
        MountInfoEntry {
            mount_id: 1,
            mount_point: dir.join("mnt/r1"),
            fstype: fstype.into(),
            source: "nas:/e".into(),
            mount_options: "rw".into(),
            super_options: "rw".into(),
        }
    }

    fn mounts(m: MockMounter, dir: &Path) -> RepositoryMounts<MockMounter> {
        RepositoryMounts::new(m, dir, MountTimeouts { lock: Duration::from_millis(300), ..MountTimeouts::default() })
    }

    #[test]
    fn two_users_share_one_mount_and_the_last_unmounts() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("mnt/r1");
        let mut m = MockMounter::new();
        let mut seq = Sequence::new();
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(|| Ok(vec![]));
        m.expect_mount()
            .with(always(), eq(mp.clone()), always())
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(()));
        m.expect_probe().times(1).in_sequence(&mut seq).returning(|_, _| Ok(()));
        let d = dir.path().to_owned();
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(move || Ok(vec![entry(&d, "nfs4")]));
        m.expect_probe().times(1).in_sequence(&mut seq).returning(|_, _| Ok(()));
        m.expect_unmount()
            .with(eq(mp.clone()), always())
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(UnmountOutcome::Clean));
        let mounts = mounts(m, dir.path());
        let a = mounts.acquire(&repo()).unwrap();
        let b = mounts.acquire(&repo()).unwrap();
        assert_eq!(a.root(), mp);
        assert_eq!(a.release().unwrap(), ReleaseOutcome::StillInUse);
        assert_eq!(b.release().unwrap(), ReleaseOutcome::Unmounted(UnmountOutcome::Clean));
    }

    #[test]
    fn a_repository_of_the_same_name_elsewhere_is_refused_rather_than_written_into() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let mut m = MockMounter::new();
        let mut seq = Sequence::new();
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(|| Ok(vec![]));
        m.expect_mount().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(()));
        m.expect_probe().times(1).in_sequence(&mut seq).returning(|_, _| Ok(()));
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(move || Ok(vec![entry(&d, "nfs4")]));
        let mounts = mounts(m, dir.path());
        let a = mounts.acquire(&repo()).unwrap();
        // Another configuration's `r1`: the same type, another server.
        let other = BackupRepository::new("r1", RepositoryKind::Nfs, "othernas:/e", "", None).unwrap();
        let err = mounts.acquire(&other).unwrap_err();
        assert!(matches!(err, MountError::Conflict { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("nas:/e (another repository of the same name)") && text.contains("unmount it"), "{text}");
        // The registration is named with this process.
        let users = mounts.users("r1");
        assert_eq!(users.iter().map(|u| u.pid).collect::<Vec<_>>(), vec![std::process::id()], "{users:?}");
        std::mem::forget(a);
    }

    #[test]
    fn a_registration_held_by_another_process_keeps_the_mount_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let mut m = MockMounter::new();
        let mut seq = Sequence::new();
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(|| Ok(vec![]));
        m.expect_mount().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(()));
        m.expect_probe().times(1).in_sequence(&mut seq).returning(|_, _| Ok(()));
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(move || Ok(vec![entry(&d, "nfs4")]));
        m.expect_unmount().times(1).in_sequence(&mut seq).returning(|_, _| Ok(UnmountOutcome::Clean));
        let mounts = mounts(m, dir.path());
        assert_eq!(mounts.unmount_if_unused("r1").unwrap(), ReleaseOutcome::StillInUse, "never used");
        let a = mounts.acquire(&repo()).unwrap();
        // What a daemon inherits: the same open file, so the same lock.
        let daemon = a.registration().unwrap().try_clone().unwrap();
        assert_eq!(a.release().unwrap(), ReleaseOutcome::StillInUse);
        assert_eq!(mounts.unmount_if_unused("r1").unwrap(), ReleaseOutcome::StillInUse);
        drop(daemon);
        assert_eq!(mounts.unmount_if_unused("r1").unwrap(), ReleaseOutcome::Unmounted(UnmountOutcome::Clean));
    }

    #[test]
    fn a_stale_mount_is_detached_and_mounted_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let mut m = MockMounter::new();
        let mut seq = Sequence::new();
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(move || Ok(vec![entry(&d, "nfs")]));
        m.expect_probe()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|p, t| Err(MountError::TimedOut { action: "probing", path: p.to_owned(), timeout: t }));
        m.expect_unmount()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(UnmountOutcome::Lazy { reason: "busy".into() }));
        m.expect_mount().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(()));
        m.expect_probe().times(1).in_sequence(&mut seq).returning(|_, _| Ok(()));
        m.expect_unmount().times(1).in_sequence(&mut seq).returning(|_, _| Ok(UnmountOutcome::Clean));
        let mounts = mounts(m, dir.path());
        let a = mounts.acquire(&repo()).unwrap();
        drop(a);
    }

    #[test]
    fn a_foreign_mount_on_the_mount_point_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let mut m = MockMounter::new();
        m.expect_mounts().returning(move || Ok(vec![entry(&d, "ext4")]));
        m.expect_mount().never();
        let e = mounts(m, dir.path()).acquire(&repo()).unwrap_err();
        assert!(e.to_string().contains("already holds a ext4 mount"), "{e}");
    }

    #[test]
    fn an_unresponsive_fresh_mount_is_undone_and_not_registered() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MockMounter::new();
        m.expect_mounts().returning(|| Ok(vec![]));
        m.expect_mount().times(2).returning(|_, _, _| Ok(()));
        let mut probes = 0;
        m.expect_probe().times(2).returning(move |p, t| {
            probes += 1;
            if probes == 1 {
                Err(MountError::TimedOut { action: "probing", path: p.to_owned(), timeout: t })
            } else {
                Ok(())
            }
        });
        m.expect_unmount().times(2).returning(|_, _| Ok(UnmountOutcome::Clean));
        let mounts = mounts(m, dir.path());
        let e = mounts.acquire(&repo()).unwrap_err();
        assert!(matches!(e, MountError::Unresponsive { .. }), "{e}");
        // Nobody was registered: the next user mounts again and, alone, unmounts.
        let a = mounts.acquire(&repo()).unwrap();
        assert_eq!(a.release().unwrap(), ReleaseOutcome::Unmounted(UnmountOutcome::Clean));
    }

    #[test]
    fn a_mount_failure_leaves_nothing_registered() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MockMounter::new();
        m.expect_mounts().returning(|| Ok(vec![]));
        m.expect_mount()
            .returning(|_, p, t| Err(MountError::TimedOut { action: "mounting", path: p.to_owned(), timeout: t }));
        m.expect_unmount().never();
        let e = mounts(m, dir.path()).acquire(&repo()).unwrap_err();
        assert!(e.to_string().contains("did not answer"), "{e}");
    }

    #[test]
    fn a_mount_left_by_a_helper_killed_at_its_timeout_is_detached() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let mut m = MockMounter::new();
        let mut seq = Sequence::new();
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(|| Ok(vec![]));
        m.expect_mount()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, p, t| Err(MountError::TimedOut { action: "mounting", path: p.to_owned(), timeout: t }));
        m.expect_mounts().times(1).in_sequence(&mut seq).returning(move || Ok(vec![entry(&d, "nfs4")]));
        m.expect_unmount()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(UnmountOutcome::Lazy { reason: "dead".into() }));
        assert!(mounts(m, dir.path()).acquire(&repo()).is_err());
    }

    #[test]
    fn a_held_mutex_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let m = MockMounter::new();
        let mounts = mounts(m, dir.path());
        fs::create_dir_all(dir.path().join("locks")).unwrap();
        let held = open_lock_file(&dir.path().join("locks/r1.lock")).unwrap();
        held.lock().unwrap();
        let e = mounts.acquire(&repo()).unwrap_err();
        assert!(matches!(e, MountError::LockTimeout { .. }), "{e}");
    }

    #[test]
    fn a_shared_repository_is_only_probed() {
        let dir = tempfile::tempdir().unwrap();
        let shared =
            BackupRepository::new("s", RepositoryKind::Shared, dir.path().to_str().unwrap(), "", None).unwrap();
        let mut m = MockMounter::new();
        m.expect_probe().with(eq(dir.path().to_owned()), always()).times(1).returning(|_, _| Ok(()));
        m.expect_mount().never();
        m.expect_unmount().never();
        let mounts = mounts(m, &dir.path().join("runtime"));
        let a = mounts.acquire(&shared).unwrap();
        assert_eq!(a.root(), dir.path());
        assert_eq!(a.release().unwrap(), ReleaseOutcome::StillInUse);
    }
}
