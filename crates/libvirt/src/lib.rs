//! libvirt for nasbak: the domain XML model, and the push-backup and checkpoint XML built from it.
//!
//! The key decision: the XML model reads only what backup and restore need (disks, their
//! sources, formats, targets, backing chains) and ignores everything else, so any domain libvirt
//! can print parses. It is checked against libvirt's own test data (the corpus in `shared/`),
//! every file of which must parse with the right number of disks. A disk's identity is its
//! target device name, never its position.
//!
//! ```
//! use std::path::Path;
//! use nasbak_libvirt::{Domain, PushBackup};
//!
//! let domain = Domain::parse(
//!     "<domain><name>vm1</name><devices>\
//!        <disk type='file' device='disk'><driver type='qcow2'/><source file='/v/root.qcow2'/><target dev='vda'/></disk>\
//!        <disk type='file' device='cdrom'><target dev='sda'/></disk>\
//!      </devices></domain>",
//! )?;
//! // Which disks a backup takes, and why the others are left out.
//! let (chosen, skipped) = domain.backup_selection();
//! assert_eq!((chosen.len(), skipped[0].target.as_str()), (1, "sda"));
//! // The push-backup document for libvirt: one qcow2 file per chosen disk.
//! let backup = PushBackup::for_domain(&domain, Path::new("/backups/vm1"), |d| format!("{}.qcow2", d.target));
//! assert!(backup.to_xml().contains("file='/backups/vm1/vda.qcow2'"));
//! # Ok::<(), nasbak_libvirt::XmlError>(())
//! ```
//!
//! The backup job runs through the [`Hypervisor`] seam (mockable with the `mock` feature):
//! [`start_backup`] begins it and [`RunningBackup::wait`] reports progress at least every
//! 250 ms, notices completion within one 50 ms poll, tells completion from failure and
//! cancellation, and aborts on timeout, cancel, error or panic ([`run_backup`] does both). The
//! calls the `virt` crate does not wrap (backup begin, abort, job stats) are in one FFI module.

#![deny(missing_docs)]

mod backup;
pub mod deadline;
mod domain;
mod ffi;
#[doc(hidden)]
pub mod fuzz_checks;
mod hypervisor;
mod job;
mod rewrite;
mod xml_shape;

pub use backup::{BackupTarget, Checkpoint, PushBackup, export_bitmap};
pub use domain::{
    BackingLayer, Disk, DiskDevice, DiskEncryption, DiskSource, Domain, EmulatedTpm, NetworkAuth, NetworkHost, Nvram,
    SkippedDisk, XmlError, attach_bus, disk_attach_xml, disk_copy_destination_xml,
};
/// The libvirt URI used when none is given.
pub const DEFAULT_URI: &str = "qemu:///system";

#[cfg(any(test, feature = "mock"))]
pub use hypervisor::MockHypervisor;
pub use hypervisor::{
    BlockCopyFlags, BlockJob, BlockSize, DomainState, Hypervisor, JobInfo, JobKind, LibvirtError, LibvirtHypervisor,
    Versions,
};
pub use job::{
    CancelHandle, END_PULL_WAIT, JobError, JobOptions, JobProgress, JobSummary, RunningBackup, check_versions,
    run_backup, start_backup,
};
pub use rewrite::{DiskSwap, Throwaway, has_agent_channel, swap_disk_sources, throwaway_definition};
