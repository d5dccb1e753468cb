//! nasbak: backup and recovery of KVM/libvirt VMs to network-attached storage.
//!
//! The facade composes the repository layer ([`nasbak_repo`]), libvirt ([`nasbak_libvirt`]),
//! qemu-img ([`nasbak_qemu_img`]) and the guest agent ([`nasbak_agent`]) through their traits,
//! and owns the workflows. The key decision: a backup is complete exactly when its
//! `manifest.json` is in its final place. Everything is written into `<id>.partial`, the manifest
//! last, and the directory is renamed into place; any failure removes the partial directory, and
//! the next run removes what a killed run left.
//!
//! ```
//! // The lock that keeps two hosts from backing up one VM at once lives on the repository:
//! let dir = std::env::temp_dir().join(format!("nasbak-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let lock = nasbak::VmLock::take(&dir, "vm1").unwrap();
//! assert!(nasbak::VmLock::take(&dir, "vm1").is_err());
//! drop(lock);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

#![deny(missing_docs)]

mod backup;
mod catalog;
pub mod clock;
pub mod config;
mod disks;
mod engine;
mod error;
mod fault;
mod lock;
#[cfg(test)]
mod mocked;
pub mod progress;
pub mod prune;
mod restore;
pub mod schedule;
mod service;
mod transfer;
mod watchdog;

pub use backup::{BackupOutcome, BackupRequest, DEFAULT_BACKUP_TIMEOUT, SkippedDisk};
pub use catalog::{BackupEntry, BackupKind, CapacityReport, Catalog, FileStatus, FileVerdict, VerifyReport};
pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{AgentSource, DEFAULT_AGENT_TIMEOUT, Engine};
pub use error::{BackupError, ErrorKind, Step, chain};
pub use lock::{LOCK_FILE, LockError, VmLock};
pub use progress::{Observer, Phase, Progress};
pub use prune::{DamagedNote, PruneDecision, PruneReport, plan_prune};
pub use restore::{
    Attachment, RestoreOutcome, RestoreRequest, RestoredDisk, RestoredVolume, VolumeRestoreRequest, match_disks,
};
pub use service::{DueRun, Placement, RunDue, placement};
pub use transfer::hash::{
    CHECKSUM_ALGORITHM, blake3_file, checksum_file, checksum_file_observed, copy_verified, sha256_file,
};
pub use {nasbak_agent, nasbak_libvirt, nasbak_process, nasbak_qemu_img, nasbak_repo};

/// The mocks of every seam the engine composes, for embedders' tests (feature `mock`):
/// [`MockHypervisor`](mock::MockHypervisor), [`MockAgentSource`](mock::MockAgentSource) (its
/// transport is the stateful [`FakeAgent`](mock::FakeAgent)), [`MockImageTool`](mock::MockImageTool)
/// and [`MockMounter`](mock::MockMounter).
#[cfg(any(test, feature = "mock"))]
pub mod mock {
    pub use crate::engine::MockAgentSource;
    pub use nasbak_agent::fake::FakeAgent;
    pub use nasbak_libvirt::MockHypervisor;
    pub use nasbak_qemu_img::MockImageTool;
    pub use nasbak_repo::MockMounter;
}
