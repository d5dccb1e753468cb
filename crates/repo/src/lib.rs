//! Backup repositories for nasbak: the model, mount options, mounting and on-repository layout.
//!
//! The key decision: the crate is split into a pure [`model`] that never does any I/O (names,
//! addresses, options, secrets, layout, the text of mountinfo) and a [`mount`] layer that holds
//! every side effect behind the [`Mounter`] trait. The model can therefore be fuzzed and
//! property-tested on its own, and every decision of the mount layer can be tested with a mock
//! as well as for real.
//!
//! ```
//! use nasbak_repo::{BackupRepository, RepositoryKind};
//!
//! let repo = BackupRepository::new(
//!     "smb1",
//!     RepositoryKind::Cifs,
//!     "//nas1/backups",
//!     "username=backup,password=hunter2,vers=3.1.1",
//!     Some("zone1"),
//! )?;
//! let plan = repo.mount_plan().expect("cifs is mounted");
//! // The password went to a credentials file; mount(8) gets only what is safe to show.
//! assert_eq!(plan.options.to_mount_string(), "username=backup,vers=3.1.1,nobrl");
//! assert!(!format!("{repo:?}").contains("hunter2"));
//! # Ok::<(), nasbak_repo::ParseError>(())
//! ```

#![deny(missing_docs)]

#[doc(hidden)]
pub mod fuzz_checks;
pub mod model;
pub mod mount;
pub mod store;

pub use model::address::{Address, CephAddress, CephMonitor, CifsAddress, NfsAddress};
pub use model::error::ParseError;
pub use model::host::Host;
pub use model::layout::{BackupId, DiskRole, RepositoryLayout};
pub use model::manifest::{
    BackupMethod, BackupMode, CheckpointRecord, Checksum, MANIFEST_VERSION, Manifest, ManifestDisk, ManifestState,
    NVRAM_FILE, RbdSnapshotRecord, StateKind, TPM_FILE_PREFIX, backing_path, is_tpm_state_name,
};
pub use model::mountinfo::MountInfoEntry;
pub use model::name::{RepositoryName, TargetName, VmName, VolumeName};
pub use model::options::{MountOption, MountOptions, OptionValue};
pub use model::protection::{Compression, Encryption, FileFormat, KeySource, Protection};
pub use model::qcow2::{Qcow2Header, parse_qcow2_header, resolve_backing};
pub use model::reference::BackupRef;
pub use model::repository::{BackupRepository, CredentialsFile, FsType, MountPlan, RepositoryKind, RepositorySummary};
pub use model::retention::{KeepReason, RetentionDecision, RetentionPolicy};
pub use model::target::{DEFAULT_REGION, Endpoint, LockMode, MAX_LOCK_DAYS, ObjectLock, ObjectTarget, S3Credentials};
#[cfg(any(test, feature = "mock"))]
pub use mount::MockMounter;
pub use nasbak_process::Secret;

pub use mount::{
    Capacity, MountError, MountTimeouts, MountedRepository, Mounter, ReleaseOutcome, RepositoryMounts, RepositoryUser,
    SystemMounter, UnmountOutcome,
};
