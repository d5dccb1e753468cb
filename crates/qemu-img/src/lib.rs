//! qemu-img for nasbak: `info`, `convert` with progress, `check`, `compare` and `create`.
//!
//! The key decision: qemu-img moves the bytes (sparse-aware, parallel with `-W -m 16` by default,
//! optionally compressed or rate-limited), and this crate builds its argv, reads its JSON and its
//! `-p` progress, and interprets its exit codes. One exception: a compressed or encrypted backup
//! file restored into a plain qcow2 is decoded by [`decode`] on every core, where qemu-img
//! decrypts and decompresses on one.
//! Ceph keys reach qemu-img through a temporary 0600 keyring file named in the `rbd:` filename,
//! never on argv.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageTool, QemuImg};
//!
//! let tool = QemuImg::new("/run/nasbak");
//! let request = ConvertRequest::new(std::path::PathBuf::from("/var/lib/libvirt/images/vm1.qcow2"),
//!     std::path::PathBuf::from("/run/nasbak/mnt/nas1/vm1/root.vol1.qcow2"), ImageFormat::Qcow2);
//! tool.convert(&request, Arc::new(|percent| eprintln!("{percent:.1}%")))?;
//! # Ok::<(), nasbak_qemu_img::ImageError>(())
//! ```
//!
//! The argv it runs for that request (a pure function, so it is tested without qemu-img):
//!
//! ```
//! use nasbak_qemu_img::{ConvertRequest, ImageFormat};
//! let r = ConvertRequest::new(std::path::PathBuf::from("/a"), std::path::PathBuf::from("/b"), ImageFormat::Qcow2);
//! assert_eq!(r.args("/a", "/b").join(" "), "convert -p -O qcow2 -W -m 16 /a /b");
//! ```

#![deny(missing_docs)]

mod be;
mod convert;
mod daemon;
pub mod decode;
pub mod encode;
mod error;
#[doc(hidden)]
pub mod fuzz_checks;
mod info;
mod location;
pub mod luks;
pub mod metacheck;
pub mod nbd;
mod qcow2;
mod rbd;
mod stored;
mod tool;
pub mod treehash;

pub use convert::{CacheMode, Compression, ConvertRequest, last_progress};
pub use daemon::{DirtyCopy, ExportKind, ReadOnlyExport, WritableExport, nbd_uri};
pub use error::{ImageError, ProgressFn};
pub use info::{Bitmap, CheckReport, CheckVerdict, ImageFormat, ImageInfo, parse_check, parse_info};
pub use location::{ImageLocation, LocationError, RADOS_OP_TIMEOUT, RbdAuth, RbdSpec};
pub use rbd::{DiffEvent, DiffParser, RbdDiffCopy, RbdImageFacts, RbdSnapshot, parse_image_facts, parse_snapshots};
pub use stored::{KEY_SECRET_ID, StoredFile, StoredImage, StoredLayout, TARGET_KEY_SECRET_ID, TargetProtection};
#[cfg(any(test, feature = "mock"))]
pub use tool::MockImageTool;
pub use tool::{ImageTimeouts, ImageTool, QemuImg, Rekeyed};
