//! Side effects: mounting, probing, unmounting and measuring repositories.
//!
//! [`Mounter`] is the seam (mockable with the `mock` feature); [`SystemMounter`] is the real one
//! (mount(8) and umount(8) as argv with timeouts, statvfs under a timeout, mountinfo).
//! [`RepositoryMounts`] sits on top: one stable mount point per repository, shared by every user
//! on the host, with cross-process locks so the last user unmounts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::mountinfo::MountInfoEntry;
use crate::model::repository::MountPlan;

mod manager;
mod system;

pub use manager::{MountedRepository, ReleaseOutcome, RepositoryMounts, RepositoryUser, root_hint};
pub use system::SystemMounter;

use nasbak_process::CommandError;

/// Total, used and free bytes of a repository's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capacity {
    /// Size of the file system in bytes.
    pub total: u64,
    /// Bytes in use.
    pub used: u64,
    /// Bytes available to an unprivileged writer.
    pub available: u64,
}

/// How an unmount ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnmountOutcome {
    /// umount(8) detached it normally.
    Clean,
    /// umount(8) failed or timed out and the mount was lazily detached (`MNT_DETACH`): it is gone
    /// from the namespace, and the kernel finishes releasing it when the last user lets go.
    Lazy {
        /// Why the normal unmount did not work.
        reason: String,
    },
}

/// Time limits for the mount layer. Every operation that may touch a server has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountTimeouts {
    /// For mount(8).
    pub mount: Duration,
    /// For umount(8), before falling back to a lazy detach.
    pub unmount: Duration,
    /// For a probe (statvfs) of a mounted repository.
    pub probe: Duration,
    /// For waiting on another process that is mounting or unmounting the same repository.
    pub lock: Duration,
}

impl Default for MountTimeouts {
    fn default() -> Self {
        MountTimeouts {
            mount: Duration::from_secs(60),
            unmount: Duration::from_secs(30),
            probe: Duration::from_secs(10),
            lock: Duration::from_secs(120),
        }
    }
}

/// The side effects the repository layer needs from the host.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait Mounter {
    /// Mounts `plan` on `target`, writing any credentials to a private 0600 file that is removed
    /// before returning.
    fn mount(&self, plan: &MountPlan, target: &Path, timeout: Duration) -> Result<(), MountError>;
    /// Unmounts `target`, falling back to a lazy detach.
    fn unmount(&self, target: &Path, timeout: Duration) -> Result<UnmountOutcome, MountError>;
    /// The mounts of this process's mount namespace.
    fn mounts(&self) -> Result<Vec<MountInfoEntry>, MountError>;
    /// Checks that `path` answers (statvfs) within `timeout`.
    fn probe(&self, path: &Path, timeout: Duration) -> Result<(), MountError>;
    /// Capacity of the file system holding `path`.
    fn capacity(&self, path: &Path, timeout: Duration) -> Result<Capacity, MountError>;
}

/// A mount-layer operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// mount(8) or umount(8) failed or timed out.
    #[error("{action} {path} failed")]
    Command {
        /// "mounting" or "unmounting".
        action: &'static str,
        /// The mount point.
        path: PathBuf,
        /// The command's error: argv (no secrets), status and stderr.
        #[source]
        source: CommandError,
    },
    /// A file system call did not return in time: the server behind it does not answer.
    #[error("{action} {path} did not answer within {timeout:?}; the server behind it may be down or unreachable")]
    TimedOut {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The limit that passed.
        timeout: Duration,
    },
    /// A local file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Another process held the repository's lock for longer than the lock timeout.
    #[error(
        "another nasbak process has been mounting or unmounting {path} for more than {timeout:?}; check for a stuck mount"
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// The limit that passed.
        timeout: Duration,
    },
    /// Something else is mounted on the repository's mount point.
    #[error(
        "{mount_point} already holds a {found_fstype} mount of {found_source}, not the {expected_fstype} repository; unmount it first"
    )]
    Conflict {
        /// The mount point.
        mount_point: PathBuf,
        /// The type found there.
        found_fstype: String,
        /// The source found there.
        found_source: String,
        /// The type expected.
        expected_fstype: String,
    },
    /// Root may not write to the repository.
    #[error("root cannot write to repository {repository}: {hint}")]
    NotWritable {
        /// The repository.
        repository: String,
        /// What to change.
        hint: String,
        /// The refusal.
        #[source]
        source: std::io::Error,
    },
    /// The mount succeeded but the mounted file system does not answer.
    #[error("{path} was mounted but does not answer: {reason}")]
    Unresponsive {
        /// The mount point.
        path: PathBuf,
        /// Why the probe failed.
        reason: String,
    },
    /// The repository was mounted and no longer is (unmounted by someone else).
    #[error("{path} is no longer mounted (it was unmounted, or the daemon of its file system gave up on the server)")]
    Vanished {
        /// The mount point.
        path: PathBuf,
    },
}
