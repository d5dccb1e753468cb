//! Big-endian fields read out of a byte slice: qcow2's header and tables, the LUKS header and
//! the NBD protocol all store their numbers this way. Each panics when the slice is too short,
//! which callers rule out by reading fixed-size headers and entries.

/// The big-endian `u16` at `at`.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian `u32` at `at`.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The big-endian `u64` at `at`.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
