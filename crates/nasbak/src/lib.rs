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
mod checksum;
pub mod config;
mod error;
mod fault;
mod lock;
#[cfg(test)]
mod mocked;
pub mod prune;
mod restore;
pub mod schedule;
mod service;
mod watchdog;

pub use backup::{AgentSource, BackupOutcome, BackupProgress, BackupRequest, Engine};
pub use catalog::{BackupEntry, BackupKind, Catalog, FileStatus, FileVerdict};
pub use checksum::{CHECKSUM_ALGORITHM, blake3_file, checksum_file, copy_verified, sha256_file};
pub use error::{BackupError, chain};
pub use lock::{LOCK_FILE, LockError, VmLock};
pub use prune::{DamagedNote, PruneDecision, PruneReport, plan_prune};
pub use restore::{RestoredDisk, RestoredVolume, VolumeRestoreRequest, match_disks, parse_destination};
pub use service::{DueRun, Placement, RunDue, placement};
pub use {nasbak_agent, nasbak_libvirt, nasbak_process, nasbak_qemu_img, nasbak_repo};
