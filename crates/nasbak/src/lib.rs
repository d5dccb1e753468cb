//! nasbak: backup and recovery of KVM/libvirt VMs to network-attached storage.
//!
//! The facade composes the repository layer ([`nasbak_repo`]), libvirt ([`nasbak_libvirt`]),
//! qemu-img ([`nasbak_qemu_img`]), the guest agent ([`nasbak_agent`]) and the process plumbing
//! ([`nasbak_process`]) through their traits, and owns the workflows. An embedder builds an
//! [`Engine`] from four seams (the hypervisor, the source of guest agents, qemu-img and the
//! repository mounts; `nasbak::mock` has a mock of each with the `mock` feature) and drives
//! typed requests through it. Outcomes are `Serialize` structs, every long phase tells its
//! [`Progress`] to a closure and stops soon after its [`CancelHandle`](nasbak_process::CancelHandle)
//! is cancelled from any thread, errors say their [`ErrorKind`] and the [`Step`] that failed, and
//! a [`Clock`] decides backup ids and due schedules. `examples/embed.rs` is a complete program.
//!
//! The key decision: a backup is complete exactly when its `manifest.json` is in its final place.
//! Everything is written into `<id>.partial`, the manifest last, and the directory is renamed
//! into place; any failure removes the partial directory, and the next run removes what a killed
//! run left.
//!
//! A backup and a restore through libvirt on this host:
//!
//! ```no_run
//! use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
//! use nasbak::nasbak_qemu_img::QemuImg;
//! use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter};
//! use nasbak::{BackupRequest, Engine, ErrorKind, RestoreRequest};
//!
//! let libvirt = LibvirtHypervisor::connect("qemu:///system")?;
//! let mounts = RepositoryMounts::new(SystemMounter::new("/run/nasbak"), "/run/nasbak", MountTimeouts::default());
//! let engine = Engine::new(libvirt.clone(), libvirt, QemuImg::new("/run/nasbak"), mounts);
//! let nas = BackupRepository::new("nas1", RepositoryKind::Nfs, "nas1:/exports/backup", "", None)?;
//!
//! let cancel = CancelHandle::new(); // cancel() from any thread stops the backup
//! let made = engine.backup(&BackupRequest::new("web1", nas.clone()), &cancel, &mut |p| {
//!     eprintln!("{} {}: {:.0} %", p.phase, p.disk.as_deref().unwrap_or("all disks"), p.percent())
//! })?;
//! println!("{}", serde_json::to_string(&made)?); // REPO:VM/ID, the manifest, what was skipped
//!
//! let restore = RestoreRequest::new(nas, "web1", made.manifest.id.as_str());
//! match engine.restore(&restore, &CancelHandle::new(), &mut |_| {}) {
//!     Err(e) if e.kind() == ErrorKind::DomainRunning => eprintln!("shut web1 off first"),
//!     other => println!("{:?}", other?.restored),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The catalog needs no hypervisor, only qemu-img and the mounts:
//!
//! ```
//! use nasbak::Catalog;
//! use nasbak::nasbak_qemu_img::QemuImg;
//! use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter};
//!
//! let dir = std::env::temp_dir().join(format!("nasbak-doc-{}", std::process::id()));
//! let runtime = dir.join("runtime");
//! std::fs::create_dir_all(dir.join("repo"))?;
//! let repo = BackupRepository::new("local", RepositoryKind::Shared, dir.join("repo").to_str().unwrap(), "", None)?;
//! let (images, mounts) = (QemuImg::new(&runtime), RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default()));
//! let catalog = Catalog::new(&images, &mounts);
//! assert!(catalog.list(&repo, None)?.is_empty());
//! // The lock that keeps two hosts from backing up one VM at once lives on the repository.
//! let lock = nasbak::VmLock::take(&dir.join("repo"), "vm1")?;
//! assert!(nasbak::VmLock::take(&dir.join("repo"), "vm1").is_err());
//! drop(lock);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod backup;
mod boot;
mod browse;
mod catalog;
pub mod chain;
pub mod clock;
mod devmap;
mod disks;
mod engine;
mod error;
mod export;
mod fault;
mod incremental;
mod keys;
mod lvm;
mod merge;
#[cfg(test)]
mod mocked;
#[cfg(feature = "s3")]
pub mod objstore;
#[cfg(feature = "s3")]
pub mod objview;
#[cfg(feature = "s3")]
mod offsite;
#[cfg(feature = "s3")]
pub use offsite::{prune_target, target_backups, verify_target};
mod outcome;
pub mod progress;
mod protect;
pub mod prune;
mod pull;
mod rbd;
mod request;
mod restore;
mod retention;
mod staging;
mod store;
#[cfg(test)]
mod test_support;
mod transfer;
mod vmstate;
mod watchdog;

pub use browse::{DISK_IMAGE_FILE, MOUNT_STATE_FILE};
pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{AgentSource, Catalog, DEFAULT_AGENT_TIMEOUT, DEFAULT_RUNTIME_DIR, Engine};
pub use error::{BackupError, ErrorKind, Step, TargetError, chain};
pub use nasbak_repo::store::lock::{LOCK_FILE, LockError, VmLock};
pub use nasbak_repo::store::{BOOT_VERIFY_FILE, BackupEntry, BackupKind, BootResult, BootVerification, RESTORING_MARK};
pub use outcome::{
    Attachment, BackupCopy, BackupOutcome, CapacityReport, CopyReport, CopyResult, CopySelection, CopyState,
    DamagedNote, DiskCopy, FileStatus, FileVerdict, InstantCancelled, InstantDisk, InstantFinished, InstantRestore,
    InstantStatus, KeyCheckEntry, KeyCheckReport, KeyRotation, MountedBackup, MountedDisk, MountedFilesystem,
    NotMounted, PruneDecision, PruneReport, RestoreOutcome, RestoredDisk, RestoredState, RestoredVolume, SkippedDisk,
    TargetBackup, UnmountReport, VerifyReport,
};
pub use progress::{Observer, Phase, Progress};
pub use prune::plan_prune;
pub use pull::{DEFAULT_PULL_SCRATCH, SHORT_SOCKET_ROOT as SHORT_PULL_SOCKET_ROOT, socket_root as pull_socket_root};
pub use request::{
    BackupRequest, BootVerifyRequest, DEFAULT_BACKUP_TIMEOUT, DEFAULT_BOOT_TIMEOUT, DEFAULT_FINISH_TIMEOUT,
    DEFAULT_INSTANT_DIR, DEFAULT_VERIFY_DIR, InstantRestoreRequest, MountRequest, RestoreRequest, Scratch,
    VolumeRestoreRequest,
};
pub use restore::match_disks;
pub use transfer::hash::{
    CHECKSUM_ALGORITHM, SPLIT_PREFIX, StreamChecksum, blake3_file, blake3_region, checksum_algorithm_for,
    checksum_file, checksum_file_observed, copy_verified, sha256_file, split_algorithm, split_bounds,
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
