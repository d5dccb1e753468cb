//! qcow2's on-disk constants, shared by the decoder and the encoder (the qcow2 specification in
//! QEMU's `docs/interop/qcow2.txt`).

/// The sector size compressed clusters are counted in (and LUKS encrypts by).
pub(crate) const SECTOR: u64 = 512;
/// The header's first bytes.
pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The offset bits of an L1 entry (an L2 table's place).
pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The offset bits of a standard L2 entry (a data cluster's place).
pub(crate) const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An L1 or L2 entry whose cluster has a refcount of exactly one.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// An L2 entry describing a compressed cluster.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// A standard L2 entry whose cluster reads as zeros.
pub(crate) const OFLAG_ZERO: u64 = 1;
/// Incompatible feature bit: the image was not closed cleanly.
pub(crate) const INCOMPAT_DIRTY: u64 = 1;
/// Incompatible feature bit: QEMU found the image corrupt.
pub(crate) const INCOMPAT_CORRUPT: u64 = 2;
/// Incompatible feature bit: the header names a compression type (zstd).
pub(crate) const INCOMPAT_COMPRESSION: u64 = 8;
