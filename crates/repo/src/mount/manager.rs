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
            return Ok(MountedRepository { owner: self, root: mount_point, users: None, name: repo.name().to_string() });
        };
        let locks = self.runtime_dir.join("locks");
        make_dir(&locks, 0o755)?;
        make_dir(&self.runtime_dir.join("mnt"), 0o755)?;
        make_dir(&mount_point, 0o755)?;
        let name = repo.name().as_str();
        let mutex = self.lock_mutex(&locks.join(format!("{name}.lock")))?;
        self.ensure_mounted(&plan, &mount_point)?;
        let users_path = locks.join(format!("{name}.users"));
        let users = open_lock_file(&users_path)?;
        users.lock_shared().map_err(|source| MountError::Io { action: "registering as a user of", path: users_path, source })?;
        drop(mutex);
        Ok(MountedRepository { owner: self, root: mount_point, users: Some(users), name: name.to_owned() })
    }

    fn ensure_mounted(&self, plan: &MountPlan, mount_point: &Path) -> Result<(), MountError> {
        let existing = self.mounter.mounts()?.into_iter().rev().find(|m| m.mount_point == mount_point);
        if let Some(found) = existing {
            if !fstype_matches(&found.fstype, &plan.fstype) {
                return Err(MountError::Conflict {
                    mount_point: mount_point.to_owned(),
                    found_fstype: found.fstype,
                    found_source: found.source,
                    expected_fstype: plan.fstype.clone(),
                });
            }
            if self.mounter.probe(mount_point, self.timeouts.probe).is_ok() {
                return Ok(());
            }
            // Stale: listed but not answering. Detach it and mount afresh.
            self.mounter.unmount(mount_point, self.timeouts.unmount)?;
        }
        self.mounter.mount(plan, mount_point, self.timeouts.mount)?;
        if let Err(e) = self.mounter.probe(mount_point, self.timeouts.probe) {
            let _ = self.mounter.unmount(mount_point, self.timeouts.unmount);
            return Err(MountError::Unresponsive { path: mount_point.to_owned(), reason: e.to_string() });
        }
        Ok(())
    }

    fn lock_mutex(&self, path: &Path) -> Result<File, MountError> {
        let file = open_lock_file(path)?;
        let deadline = Instant::now() + self.timeouts.lock;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(TryLockError::WouldBlock) => return Err(MountError::LockTimeout { path: path.to_owned(), timeout: self.timeouts.lock }),
                Err(TryLockError::Error(source)) => return Err(MountError::Io { action: "locking", path: path.to_owned(), source }),
            }
        }
    }

    fn release(&self, name: &str, root: &Path, users: File) -> Result<ReleaseOutcome, MountError> {
        let locks = self.runtime_dir.join("locks");
        let mutex = self.lock_mutex(&locks.join(format!("{name}.lock")))?;
        drop(users);
        let users_path = locks.join(format!("{name}.users"));
        let check = open_lock_file(&users_path)?;
        let outcome = match check.try_lock() {
            Ok(()) => ReleaseOutcome::Unmounted(self.mounter.unmount(root, self.timeouts.unmount)?),
            Err(TryLockError::WouldBlock) => ReleaseOutcome::StillInUse,
            Err(TryLockError::Error(source)) => return Err(MountError::Io { action: "locking", path: users_path, source }),
        };
        drop(check);
        drop(mutex);
        Ok(outcome)
    }
}

fn fstype_matches(found: &str, planned: &str) -> bool {
    found == planned
        || (planned == "nfs" && found.starts_with("nfs"))
        || (planned == "cifs" && found.starts_with("smb"))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), MountError> {
    let io = |source| MountError::Io { action: "creating", path: path.to_owned(), source };
    DirBuilder::new().recursive(true).mode(mode).create(path).map_err(io)?;
    let current = fs::metadata(path).map_err(io)?.permissions().mode() & 0o7777;
    if current != mode && path.parent().is_some() {
        // Only tighten or loosen our own directories; an existing mount point of a mounted file
        // system keeps the mode its file system gives it.
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
    }
    Ok(())
}

fn open_lock_file(path: &Path) -> Result<File, MountError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| MountError::Io { action: "opening the lock file", path: path.to_owned(), source })
}

/// A repository in use by this caller; released (and unmounted if this was the last user) on
/// [`MountedRepository::release`] or on drop.
#[derive(Debug)]
pub struct MountedRepository<'a, M: Mounter> {
    owner: &'a RepositoryMounts<M>,
    root: PathBuf,
    users: Option<File>,
    name: String,
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

    /// Capacity of the repository, under the probe timeout.
    pub fn capacity(&self) -> Result<Capacity, MountError> {
        self.owner.mounter.capacity(&self.root, self.owner.timeouts.probe)
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

impl<M: Mounter> Drop for MountedRepository<'_, M> {
    fn drop(&mut self) {
        let _ = self.release_inner();
    }
}
