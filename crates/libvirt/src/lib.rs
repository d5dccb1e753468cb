//! libvirt for nasbak: the domain XML model, and the push-backup and checkpoint XML built from it.
//!
//! The key decision: the XML model reads only what backup and restore need (disks, their
//! sources, formats, targets, backing chains) and ignores everything else, so any domain libvirt
//! can print parses. It is checked against libvirt's own test data (the corpus in `shared/`),
//! every file of which must parse with the right number of disks. A disk's identity is its
//! target device name, never its position.
//!
//! ```
//! let d = nasbak_libvirt::Domain::parse("<domain><name>vm1</name></domain>").unwrap();
//! assert!(d.disks.is_empty());
//! ```
//!
//! The backup job itself (begin, progress, completion, abort, over `virt::sys`) is the next step
//! of this crate (issue 3).

#![deny(missing_docs)]

mod backup;
mod domain;
mod raw;

pub use backup::{BackupTarget, PushBackup};
pub use domain::{BackingLayer, Disk, DiskDevice, DiskSource, Domain, NetworkAuth, NetworkHost, SkippedDisk, XmlError};
