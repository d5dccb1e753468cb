//! libvirt for nasbak: the domain XML model, and the push-backup and checkpoint XML built from it.
//!
//! The key decision: the XML model reads only what backup and restore need (disks, their
//! sources, formats, targets, backing chains) and ignores everything else, so any domain libvirt
//! can print parses. It is checked against libvirt's own test data (the corpus in `shared/`),
//! every file of which must parse with the right number of disks. A disk's identity is its
//! target device name, never its position.
//!
//! ```
//! # assert_eq!(nasbak_libvirt::DEFAULT_URI, "qemu:///system");
//! let d = nasbak_libvirt::Domain::parse("<domain><name>vm1</name></domain>").unwrap();
//! assert!(d.disks.is_empty());
//! ```
//!
//! The backup job runs through the [`Hypervisor`] seam: [`run_backup`] begins it, reports progress
//! at least every 250 ms, notices completion within one poll (100 ms), tells completion from
//! failure and cancellation, and aborts on timeout, cancel, error or panic. The calls the `virt`
//! crate does not wrap (backup begin, abort) are in one FFI module.

#![deny(missing_docs)]

mod backup;
mod domain;
mod ffi;
#[doc(hidden)]
pub mod fuzz_checks;
mod hypervisor;
mod job;
mod raw;

pub use backup::{BackupTarget, Checkpoint, PushBackup};
pub use domain::{
    BackingLayer, Disk, DiskDevice, DiskSource, Domain, NetworkAuth, NetworkHost, SkippedDisk, XmlError, attach_bus,
    disk_attach_xml,
};
/// The libvirt URI used when none is given.
pub const DEFAULT_URI: &str = "qemu:///system";

#[cfg(any(test, feature = "mock"))]
pub use hypervisor::MockHypervisor;
pub use hypervisor::{DomainState, Hypervisor, JobInfo, JobKind, LibvirtError, LibvirtHypervisor, Versions};
pub use job::{
    CancelHandle, JobError, JobOptions, JobProgress, JobSummary, RunningBackup, check_versions, run_backup,
    start_backup,
};
