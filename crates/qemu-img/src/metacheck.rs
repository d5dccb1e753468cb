//! `qemu-img check` of a qcow2 file's metadata, in this process: the common case (a backup file
//! as QEMU or nasbak wrote it, nothing wrong with it) answered without starting qemu-img.
//!
//! What it checks is what `qemu-img check` checks of such a file (QEMU's
//! `qcow2_check_refcounts`): every cluster the metadata uses (the header, the L1 table, each L2
//! table, each data cluster, compressed ones by the sectors they span, the refcount table and its
//! blocks) is counted, and each count is compared with the refcount
//! the file stores: a stored refcount below the count is a corruption, one above it a leak. A
//! table or cluster that is not aligned or lies past the end of the file is a corruption, and so
//! is an L1 or L2 entry whose "copied" flag does not say whether its cluster's refcount is one.
//!
//! A file with anything this module does not count (internal snapshots, persistent bitmaps, an
//! external data file, subclusters, another refcount width, a dirty or corrupt flag, an unknown
//! header extension, version 2) is not checked here, nor is an encrypted one (qemu-img opens it
//! only with its key): [`check`] returns `None` and qemu-img is asked.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::be::{be16, be32, be64};
use crate::qcow2::{
    INCOMPAT_COMPRESSION, L1_OFFSET_MASK, L2_OFFSET_MASK, MAGIC, OFLAG_COMPRESSED, OFLAG_COPIED, SECTOR,
};

/// The offset bits of a refcount table entry.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Header extensions this module knows: the backing file's format and the feature name table.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// The most clusters a file checked here has (256 GiB of 64 KiB clusters): 16 MiB of counts.
const MAX_CLUSTERS: u64 = 1 << 22;

/// What the check counted, as `qemu-img check` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaCheck {
    /// Clusters whose stored refcount is below their use, or metadata that points wrong.
    pub corruptions: u64,
    /// Clusters whose stored refcount is above their use.
    pub leaks: u64,
}

impl MetaCheck {
    /// Nothing found.
    pub fn clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }
}

/// The metadata of the qcow2 file at `path` checked as `qemu-img check` checks it, or `None`
/// for a file this module does not check (see the module's documentation). An error is a file
/// that could not be read.
pub fn check(path: &Path) -> std::io::Result<Option<MetaCheck>> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut head = vec![0u8; 4096.min(file_len as usize)];
    file.read_exact_at(&mut head, 0)?;
    if head.len() < 112 || head[..4] != MAGIC || be32(&head, 4) != 3 {
        return Ok(None);
    }
    let cluster_bits = be32(&head, 20);
    let crypt = be32(&head, 32);
    let (incompatible, autoclear) = (be64(&head, 72), be64(&head, 88));
    let (snapshots, refcount_order, header_length) = (be32(&head, 60), be32(&head, 96), be32(&head, 100));
    if !(9..=21).contains(&cluster_bits)
        || crypt != 0
        || incompatible & !INCOMPAT_COMPRESSION != 0
        || autoclear != 0
        || snapshots != 0
        || refcount_order != 4
        || !(104..=head.len() as u32).contains(&header_length)
    {
        return Ok(None);
    }
    let cs = 1u64 << cluster_bits;
    if !known_extensions(&head, header_length as usize) {
        return Ok(None);
    }
    // Four bytes per cluster are kept (its use and its stored refcount): a file of more
    // clusters than `MAX_CLUSTERS` is qemu-img's.
    if file_len.div_ceil(cs) > MAX_CLUSTERS {
        return Ok(None);
    }
    let mut c = Counter { counts: vec![0; file_len.div_ceil(cs) as usize], cs, file_len, found: MetaCheck::default() };
    c.count(0, cs);
    // The refcount table and its blocks: the stored refcounts.
    let (rt_offset, rt_clusters) = (be64(&head, 48), u64::from(be32(&head, 56)));
    if !rt_offset.is_multiple_of(cs) || rt_offset.saturating_add(rt_clusters.saturating_mul(cs)) > file_len {
        return Ok(Some(MetaCheck { corruptions: 1, leaks: 0 }));
    }
    c.count(rt_offset, rt_clusters * cs);
    let mut table = vec![0u8; (rt_clusters * cs) as usize];
    file.read_exact_at(&mut table, rt_offset)?;
    let per_block = cs / 2;
    let mut stored = vec![0u16; c.counts.len()];
    let mut block = vec![0u8; cs as usize];
    for (i, e) in table.chunks_exact(8).enumerate() {
        let rb = be64(e, 0) & REFT_OFFSET_MASK;
        if rb == 0 {
            continue;
        }
        if !rb.is_multiple_of(cs) || rb + cs > file_len {
            c.found.corruptions += 1;
            continue;
        }
        c.count(rb, cs);
        file.read_exact_at(&mut block, rb)?;
        let first = i as u64 * per_block;
        for (j, r) in block.chunks_exact(2).enumerate() {
            if let Some(s) = stored.get_mut((first + j as u64) as usize) {
                *s = be16(r, 0);
            }
        }
    }
    // The L1 table, the L2 tables and what they map.
    let (l1_size, l1_offset) = (u64::from(be32(&head, 36)), be64(&head, 40));
    if !l1_offset.is_multiple_of(cs) || l1_offset.saturating_add(l1_size * 8) > file_len {
        return Ok(Some(MetaCheck { corruptions: c.found.corruptions + 1, leaks: 0 }));
    }
    c.count(l1_offset, l1_size * 8);
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    file.read_exact_at(&mut l1, l1_offset)?;
    let csize_shift = 62 - (cluster_bits - 8);
    let csize_mask = (1u64 << (cluster_bits - 8)) - 1;
    let mut l2 = vec![0u8; cs as usize];
    // A table's or a cluster's "copied" flag says whether its stored refcount is one.
    let copied_ok = |host: u64, entry: u64| {
        let refcount = stored.get((host / cs) as usize).copied().unwrap_or(0);
        (refcount == 1) == (entry & OFLAG_COPIED != 0)
    };
    // Each L2 table is read once: one named twice is a corruption (the file is then qemu-img's
    // to judge), never a reason to read the file over and over.
    let mut seen = std::collections::HashSet::new();
    for e in l1.chunks_exact(8) {
        let entry = be64(e, 0);
        let table = entry & L1_OFFSET_MASK;
        if table == 0 {
            continue;
        }
        // Counted where it says, aligned or not, as QEMU counts it.
        c.count(table, cs);
        if !table.is_multiple_of(cs) {
            c.found.corruptions += 1;
        }
        if table + cs > file_len {
            continue;
        }
        if !seen.insert(table) {
            c.found.corruptions += 1;
            continue;
        }
        if !copied_ok(table, entry) {
            c.found.corruptions += 1;
        }
        file.read_exact_at(&mut l2, table)?;
        for e in l2.chunks_exact(8) {
            let entry = be64(e, 0);
            if entry & OFLAG_COMPRESSED != 0 {
                if entry & OFLAG_COPIED != 0 {
                    c.found.corruptions += 1;
                }
                let host = entry & ((1u64 << csize_shift) - 1);
                let sectors = ((entry >> csize_shift) & csize_mask) + 1;
                c.count(host / SECTOR * SECTOR, sectors * SECTOR);
                continue;
            }
            let host = entry & L2_OFFSET_MASK;
            if host == 0 {
                continue;
            }
            c.count(host, cs);
            if !host.is_multiple_of(cs) {
                c.found.corruptions += 1;
                continue;
            }
            if !copied_ok(host, entry) {
                c.found.corruptions += 1;
            }
        }
    }
    for (i, used) in c.counts.iter().enumerate() {
        let s = stored[i];
        if s < *used {
            c.found.corruptions += 1;
        } else if s > *used {
            c.found.leaks += 1;
        }
    }
    Ok(Some(c.found))
}

/// The backing file the header of the qcow2 file at `path` names, resolved as QEMU resolves it
/// (relative to the file's directory); `None` when it names none.
pub fn backing_of(path: &Path) -> std::io::Result<Option<std::path::PathBuf>> {
    let file = File::open(path)?;
    let mut head = [0u8; 20];
    file.read_exact_at(&mut head, 0)?;
    let (offset, len) = (be64(&head, 8), be32(&head, 16));
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a backing file name over 1023 bytes"));
    }
    let mut name = vec![0u8; len as usize];
    file.read_exact_at(&mut name, offset)?;
    let name = Path::new(std::ffi::OsStr::from_bytes(&name));
    Ok(Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name.to_owned(),
    }))
}

/// Whether the header extensions from `from` on are all ones this module knows (and end
/// within `head`).
fn known_extensions(head: &[u8], from: usize) -> bool {
    let mut at = from;
    loop {
        if at + 8 > head.len() {
            return false;
        }
        let (kind, len) = (be32(head, at), be32(head, at + 4) as usize);
        let data = at + 8;
        if data + len > head.len() {
            return false;
        }
        match kind {
            0 => return true,
            EXT_BACKING_FORMAT | EXT_FEATURE_NAMES => {}
            _ => return false,
        }
        at = data + len.next_multiple_of(8);
    }
}

/// The clusters counted as used.
struct Counter {
    counts: Vec<u16>,
    cs: u64,
    file_len: u64,
    found: MetaCheck,
}

impl Counter {
    /// Counts the clusters `len` bytes at `offset` touch; any past the end of the file is a
    /// corruption.
    fn count(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(end) = offset.checked_add(len).filter(|e| *e <= self.file_len.next_multiple_of(self.cs)) else {
            self.found.corruptions += 1;
            return;
        };
        for c in offset / self.cs..end.div_ceil(self.cs) {
            self.counts[c as usize] = self.counts[c as usize].saturating_add(1);
        }
    }
}
