//! A backup file written compressed or encrypted by nasbak itself, on every core: the mirror of
//! [`crate::decode`].
//!
//! Why: QEMU compresses a cluster at a time on one thread (a job writing through qemu-storage-
//! daemon's export, or `qemu-img convert -c`), and encrypts 512-byte sector by sector on one
//! thread: a compressed full backup took 2.8x an uncompressed one, an encrypted one 1.7x. Here
//! the guest data comes in chunks (from the pull-mode backup job's NBD export, read by
//! [`crate::nbd`]), each chunk's clusters are compressed (zstd) or encrypted (LUKS1
//! aes-xts-plain64) on a pool of threads, and the results are appended to the file in guest
//! order while the next chunk is read ([`copy_from_nbd`]).
//!
//! What is written is what QEMU writes and reads, in the layouts of [`StoredLayout`]: a qcow2
//! (version 3, 64 KiB clusters, 16-bit refcounts) whose clusters are zstd-compressed
//! (`compression_type=zstd`; a cluster that does not shrink is stored as it is, as QEMU does),
//! a qcow2 with built-in LUKS (`encrypt.format=luks`), or a compressed qcow2 inside a LUKS
//! container. `qemu-img check` finds nothing to say of any of them and `qemu-img compare` reads
//! the guest's data back (tested).
//!
//! The file is laid out as: the header cluster (and, with built-in LUKS, the LUKS header's
//! clusters), the data, then the L2 tables, the L1 table, the refcount table and its blocks. The
//! header is written last: until [`Encoder::finish`] has run, the file is no qcow2 at all, so a
//! killed backup never leaves one that looks complete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rayon::prelude::*;

use crate::luks::{self, DataCipher, LuksError, QCOW2_BACKING_FORMAT_EXT, QCOW2_CRYPTO_EXT};
use crate::nbd::{self, NbdClient, NbdError, StatusExtent};
use crate::qcow2::{INCOMPAT_COMPRESSION, MAGIC, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SECTOR};
use crate::stored::StoredLayout;

const CLUSTER_BITS: u32 = 16;
/// The zstd level clusters are compressed with. QEMU uses zstd's default (3); level 1 compresses
/// an operating system's files about 40 % faster for 5 % more bytes there (and the same on
/// data that does not compress), which keeps a compressed backup within 2 % of the size QEMU
/// writes (measured; see docs/encryption.md).
pub const ZSTD_LEVEL: i32 = 1;
/// How much guest data is read, encoded and written at a time.
pub const CHUNK: u32 = 4 << 20;
/// How many written buffers an encoder keeps for its caller to read into again.
const SPARE_BUFFERS: usize = 16;
/// How many reads are in flight.
const READ_WINDOW: usize = 4;
/// How much guest data is encoded and written together: a cluster's worth at most is lost to
/// alignment per batch (0.2 % at worst).
pub const BATCH: u64 = 32 << 20;

/// Why a file was not encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// What was asked does not make a file this module writes.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Its LUKS header could not be made.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// Reading the guest's data failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// Writing failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The caller asked it to stop.
    #[error("stopped before {path} was complete")]
    Stopped {
        /// The file.
        path: PathBuf,
    },
}

/// What a new file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeTarget {
    /// Its layout.
    pub layout: StoredLayout,
    /// Whether its clusters are zstd-compressed (with [`StoredLayout::Qcow2`] or
    /// [`StoredLayout::Qcow2InLuks`]; built-in LUKS cannot be compressed).
    pub compress: bool,
    /// The guest disk's size.
    pub size: u64,
    /// The backing file its header names (an incremental's parent), if any.
    pub backing: Option<String>,
    /// Whether it lies over a parent (an incremental): a cluster that reads as zeros is then
    /// written as a zero cluster, where a full leaves it unallocated.
    pub over_parent: bool,
}

/// What was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Guest bytes taken in (data and zeros).
    pub read: u64,
    /// The file's length.
    pub file_len: u64,
    /// The file's BLAKE3, computed as it was written; `None` if it could not be (the file is
    /// then hashed by reading it).
    pub hash: Option<FileHash>,
}

/// The BLAKE3 of a file [`Encoder`] wrote, as nasbak's manifests record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileHash {
    /// Of the whole file (a file without a LUKS header).
    Whole(blake3::Hash),
    /// Of the three parts of a file around its LUKS header: before it, the header, after it
    /// (so that a new passphrase changes one part's hash only).
    AroundLuksHeader {
        /// The header's offset and length in the file.
        header: (u64, u64),
        /// The three parts' hashes.
        parts: [blake3::Hash; 3],
    },
}

/// The hash of what an [`Encoder`] writes, kept as it writes: of the part of the file hashed as
/// one (the whole file, or what follows its LUKS header), whose bytes from `from` on are
/// written in order and whose bytes before `from` are read back once the file is complete (a
/// header, at most a cluster).
struct StreamHash {
    /// Where the part starts in the file.
    part: u64,
    /// Where the bytes hashed as they are written start.
    from: u64,
    /// Where the next byte written is expected.
    next: u64,
    hasher: PartHasher,
    /// Something was written out of order: no hash, the file is read instead.
    broken: bool,
}

enum PartHasher {
    /// The part's first cluster (its qcow2 header) is written last.
    HeadLast(crate::treehash::HeadLastHasher),
    /// Everything comes in order.
    InOrder(Box<blake3::Hasher>),
}

impl StreamHash {
    fn update(&mut self, data: &[u8]) {
        match &mut self.hasher {
            PartHasher::HeadLast(h) => h.update(data),
            PartHasher::InOrder(h) => {
                h.update_rayon(data);
            }
        }
        self.next += data.len() as u64;
    }

    /// Takes note of `data` written at `at`; what lies between the last write and this one
    /// reads as zeros.
    fn written(&mut self, at: u64, data: &[u8]) {
        let end = at + data.len() as u64;
        if end <= self.from || self.broken {
            return;
        }
        if at < self.next {
            self.broken = true;
            return;
        }
        self.zeros_to(at);
        self.update(data);
    }

    /// Hashes zeros up to `to`.
    fn zeros_to(&mut self, to: u64) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        while self.next < to {
            let n = (to - self.next).min(ZEROS.len() as u64) as usize;
            self.update(&ZEROS[..n]);
        }
    }
}

/// One cluster of guest data, encoded: zeros, compressed (zstd, when `compress` and it saves a
/// sector, as QEMU decides), or as it is.
fn encode_cluster(c: &[u8], compress: bool) -> Cluster {
    if c.iter().all(|b| *b == 0) {
        return Cluster::Zero;
    }
    if !compress {
        return Cluster::Raw;
    }
    let csz = cs() as usize;
    let mut padded = Vec::new();
    let whole = if c.len() == csz {
        c
    } else {
        padded.extend_from_slice(c);
        padded.resize(csz, 0);
        &padded[..]
    };
    // Worth storing compressed only when it saves a sector: zstd stops where the output would
    // not fit. Each thread keeps its compression context (made once, not per cluster).
    let mut out = Vec::with_capacity((cs() - SECTOR - 1) as usize);
    let compressed = COMPRESSOR.with_borrow_mut(|c| {
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut().map(|c| c.compress_to_buffer(whole, &mut out))
    });
    match compressed {
        Some(Ok(_)) if (out.len() as u64) < cs() - SECTOR => Cluster::Compressed(out),
        _ => Cluster::Raw,
    }
}

/// Reads into `buf` from `at`, up to the file's end: what lies past it stays as it is in `buf`.
fn read_up_to(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, at) {
            Ok(0) => break,
            Ok(n) => (buf, at) = (&mut buf[n..], at + n as u64),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

thread_local! {
    /// This thread's zstd compression context.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// One cluster, encoded.
enum Cluster {
    Zero,
    Raw,
    Compressed(Vec<u8>),
}

/// A file being written. Give it the guest data in chunks ([`Encoder::put`],
/// [`Encoder::put_zeros`]), then [`Encoder::finish`] it.
pub struct Encoder {
    path: PathBuf,
    file: File,
    target: EncodeTarget,
    cipher: Option<DataCipher>,
    /// Where the qcow2 starts in the file (past a LUKS container's header).
    base: u64,
    /// The built-in LUKS header's place and length.
    luks_header: Option<(u64, u64)>,
    /// The next free byte of the qcow2.
    cursor: u64,
    /// L1 index to its L2 table's entries.
    l2: BTreeMap<u64, Vec<u64>>,
    /// Each host cluster's refcount.
    refcounts: Vec<u16>,
    read: u64,
    /// Data taken and not yet written.
    pending: Vec<(u64, Vec<u8>)>,
    pending_bytes: u64,
    /// Buffers of data written, for the caller to read into again ([`Encoder::take_spare`]).
    spare: Vec<Vec<u8>>,
    /// The file's hash, kept as it is written.
    hash: StreamHash,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("path", &self.path).field("target", &self.target).finish_non_exhaustive()
    }
}

fn cs() -> u64 {
    1u64 << CLUSTER_BITS
}

impl Encoder {
    /// Creates (or replaces) `path` as `target`, encrypted with a new master key under
    /// `passphrase` when its layout is encrypted.
    pub fn create(path: &Path, target: EncodeTarget, passphrase: Option<&[u8]>) -> Result<Self, EncodeError> {
        let invalid = |detail: &str| EncodeError::Invalid { path: path.to_owned(), detail: detail.to_owned() };
        if target.layout == StoredLayout::Qcow2Luks && target.compress {
            return Err(invalid("a qcow2 with built-in LUKS cannot be compressed (QEMU refuses both at once)"));
        }
        if target.layout == StoredLayout::Qcow2InLuks && !target.compress {
            return Err(invalid("a qcow2 inside a LUKS container is written compressed"));
        }
        if target.size == 0 || target.size > 1 << 50 {
            return Err(invalid(&format!("a disk of {} bytes (1 byte to 1 PiB are written)", target.size)));
        }
        if target.backing.as_ref().is_some_and(|b| b.is_empty() || b.len() > 1023) {
            return Err(invalid("a backing file name must have 1 to 1023 bytes"));
        }
        let io = |action| move |source| EncodeError::Io { action, path: path.to_owned(), source };
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(io("create"))?;
        let mut e = Encoder {
            path: path.to_owned(),
            file,
            cipher: None,
            base: 0,
            luks_header: None,
            cursor: cs(),
            l2: BTreeMap::new(),
            refcounts: vec![1],
            read: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            spare: Vec::new(),
            // Set below once the layout's headers are in place.
            hash: StreamHash {
                part: 0,
                from: cs(),
                next: cs(),
                hasher: PartHasher::HeadLast(crate::treehash::HeadLastHasher::new()),
                broken: false,
            },
            target,
        };
        if e.target.layout.needs_key() {
            let passphrase = passphrase.ok_or_else(|| invalid("an encrypted file needs a key"))?;
            match e.target.layout {
                StoredLayout::Qcow2InLuks => {
                    let key = luks::write_new_header(&e.file, path, 0, passphrase)?;
                    e.base = luks::header_len();
                    e.cipher = Some(key.data_cipher());
                    // Hashed after the LUKS header: from the qcow2's header cluster on.
                    (e.hash.part, e.hash.from, e.hash.next) = (e.base, e.base + cs(), e.base + cs());
                }
                _ => {
                    let len = luks::header_len();
                    let clusters = len.div_ceil(cs());
                    let key = luks::write_new_header(&e.file, path, cs(), passphrase)?;
                    e.luks_header = Some((cs(), len));
                    e.cursor += clusters * cs();
                    e.refcounts.extend(std::iter::repeat_n(1, clusters as usize));
                    e.cipher = Some(key.data_cipher());
                    // Hashed after the LUKS header, in order: the rest of its last cluster,
                    // then the data.
                    let mut rest = vec![0u8; (e.cursor - cs() - len) as usize];
                    read_up_to(&e.file, &mut rest, cs() + len).map_err(io("read back"))?;
                    e.hash = StreamHash {
                        part: cs() + len,
                        from: cs() + len,
                        next: cs() + len,
                        hasher: PartHasher::InOrder(Box::default()),
                        broken: false,
                    };
                    e.hash.update(&rest);
                }
            }
        }
        Ok(e)
    }

    fn invalid(&self, detail: String) -> EncodeError {
        EncodeError::Invalid { path: self.path.clone(), detail }
    }

    fn io(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> EncodeError + '_ {
        move |source| EncodeError::Io { action, path: self.path.clone(), source }
    }

    fn set_entry(&mut self, guest_cluster: u64, entry: u64) {
        let per_table = cs() / 8;
        let table = self.l2.entry(guest_cluster / per_table).or_insert_with(|| vec![0; per_table as usize]);
        table[(guest_cluster % per_table) as usize] = entry;
    }

    fn count(&mut self, from: u64, to_excl: u64) {
        for c in from / cs()..to_excl.div_ceil(cs()) {
            if c as usize >= self.refcounts.len() {
                self.refcounts.resize(c as usize + 1, 0);
            }
            self.refcounts[c as usize] = self.refcounts[c as usize].saturating_add(1);
        }
    }

    /// Marks the clusters of `offset..offset + len` (cluster-aligned, or ending at the disk's
    /// end) as reading zeros: zero clusters over a parent, left unallocated in a full.
    pub fn put_zeros(&mut self, offset: u64, len: u64) -> Result<(), EncodeError> {
        self.check_range(offset, len)?;
        self.read += len;
        if self.target.over_parent {
            for g in offset / cs()..(offset + len).div_ceil(cs()) {
                self.set_entry(g, OFLAG_ZERO);
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EncodeError> {
        let end = offset.saturating_add(len);
        if !offset.is_multiple_of(cs())
            || end > self.target.size
            || (!end.is_multiple_of(cs()) && end != self.target.size)
        {
            return Err(self.invalid(format!(
                "{len} bytes at {offset}: ranges start on a {} KiB cluster and end on one or at the disk's end ({} bytes)",
                cs() >> 10,
                self.target.size
            )));
        }
        Ok(())
    }

    /// Takes the guest data `data` at `offset` (cluster-aligned; its length a whole number of
    /// clusters, or ending at the disk's end). Data is encoded and written a batch at a time
    /// ([`BATCH`]): its clusters on every core, then after what is already written.
    pub fn put(&mut self, offset: u64, data: Vec<u8>) -> Result<(), EncodeError> {
        self.check_range(offset, data.len() as u64)?;
        self.read += data.len() as u64;
        self.pending_bytes += data.len() as u64;
        self.pending.push((offset, data));
        if self.pending_bytes >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Encodes and writes the pending data.
    fn flush(&mut self) -> Result<(), EncodeError> {
        let mut pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let csz = cs() as usize;
        let compress = self.target.compress;
        let encoded: Vec<(usize, usize, Cluster)> = {
            let clusters: Vec<(usize, usize, &[u8])> = pending
                .iter()
                .enumerate()
                .flat_map(|(p, (_, data))| data.chunks(csz).enumerate().map(move |(i, c)| (p, i, c)))
                .collect();
            clusters.par_iter().map(|&(p, i, c)| (p, i, encode_cluster(c, compress))).collect()
        };
        // Compressed clusters first, packed after what the batch before left, then the ones
        // stored as they are, on cluster boundaries: one partial cluster at most is lost per
        // batch, where interleaving them would lose one at every change. Those are written
        // from the buffers they were read into (encrypted there), not copied.
        let start = self.cursor;
        let mut packed: Vec<u8> = Vec::new();
        let csize_shift = 62 - (CLUSTER_BITS - 8);
        let mut raw: Vec<(usize, usize)> = Vec::new();
        for (p, i, cluster) in encoded {
            let guest = pending[p].0 / cs() + i as u64;
            match cluster {
                Cluster::Zero => {
                    if self.target.over_parent {
                        self.set_entry(guest, OFLAG_ZERO);
                    }
                }
                Cluster::Compressed(z) => {
                    let host = self.cursor;
                    let sectors = (host % SECTOR + z.len() as u64).div_ceil(SECTOR);
                    self.set_entry(guest, OFLAG_COMPRESSED | ((sectors - 1) << csize_shift) | host);
                    self.count(host, host - host % SECTOR + sectors * SECTOR);
                    packed.extend_from_slice(&z);
                    self.cursor += z.len() as u64;
                }
                Cluster::Raw => raw.push((p, i)),
            }
        }
        if !raw.is_empty() {
            self.cursor = self.cursor.next_multiple_of(cs());
        } else if self.cipher.is_some() {
            // Encrypted whole sectors: the next batch starts on one.
            self.cursor = self.cursor.next_multiple_of(SECTOR);
        }
        packed.resize((self.cursor - start) as usize, 0);
        self.write(start, &mut packed, true)?;
        // Runs of neighbouring clusters of one buffer go out in one write each.
        let mut n = 0;
        while n < raw.len() {
            let (p, first) = raw[n];
            let mut end = n + 1;
            while end < raw.len() && raw[end] == (p, first + (end - n)) {
                end += 1;
            }
            let host = self.cursor;
            for k in 0..(end - n) as u64 {
                let guest = pending[p].0 / cs() + first as u64 + k;
                self.set_entry(guest, (host + k * cs()) | OFLAG_COPIED);
                self.count(host + k * cs(), host + (k + 1) * cs());
            }
            self.cursor = host + (end - n) as u64 * cs();
            let data = &mut pending[p].1;
            let range = first * csz..(first + end - n) * csz;
            if range.end <= data.len() {
                self.write(host, &mut data[range], true)?;
            } else {
                // The disk's last, partial cluster: written whole.
                let mut whole = data[range.start..].to_vec();
                whole.resize(range.len(), 0);
                self.write(host, &mut whole, true)?;
            }
            n = end;
        }
        self.spare.extend(pending.into_iter().map(|(_, data)| data).take(SPARE_BUFFERS));
        self.spare.truncate(SPARE_BUFFERS);
        Ok(())
    }

    /// The buffers of data given to [`Encoder::put`] that are written now, to read into again.
    pub fn take_spare(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.spare)
    }

    /// Writes `buf` at the qcow2's offset `at`, encrypting it first where the layout says:
    /// every sector in a LUKS container, the data clusters (`data`) with built-in LUKS, whose IV
    /// is the sector's place in the file (QEMU's `crypt_physical_offset`).
    fn write(&mut self, at: u64, buf: &mut [u8], data: bool) -> Result<(), EncodeError> {
        if buf.is_empty() {
            return Ok(());
        }
        let encrypted = data || self.luks_header.is_none();
        if let Some(cipher) = self.cipher.as_ref().filter(|_| encrypted) {
            let step = cs() as usize;
            buf.par_chunks_mut(step).enumerate().for_each(|(i, c)| {
                cipher.encrypt(c, (at + (i * step) as u64) / SECTOR);
            });
        }
        self.file.write_all_at(buf, self.base + at).map_err(self.io("write"))?;
        self.hash.written(self.base + at, buf);
        if data {
            self.start_writeback(self.base + at, buf.len() as u64);
        }
        Ok(())
    }

    /// Starts writing `len` bytes at `offset` back to the disk without waiting, so that the
    /// final sync finds little left to write (the kernel would otherwise begin only once a
    /// tenth of memory is dirty, after a whole backup of most disks). A failure changes nothing
    /// but the time of the final sync, which reports any error.
    fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        // SAFETY: the descriptor is this encoder's open file, alive for the call; the call
        // reads no memory of ours.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Writes the tables and the header, and syncs the file.
    pub fn finish(mut self) -> Result<Encoded, EncodeError> {
        self.flush()?;
        let cs = cs();
        let per_table = cs / 8;
        let meta = self.cursor.div_ceil(cs);
        let tables = self.l2.len() as u64;
        let l1_size = self.target.size.div_ceil(cs).div_ceil(per_table);
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let per_block = cs / 2;
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        let total = loop {
            let total = meta + tables + l1_clusters + table_clusters + blocks;
            let (b, t) = (total.div_ceil(per_block), (total.div_ceil(per_block) * 8).div_ceil(cs));
            if b <= blocks && t <= table_clusters {
                break total;
            }
            (blocks, table_clusters) = (b.max(blocks), t.max(table_clusters));
        };
        if l1_size > u64::from(u32::MAX) || table_clusters > u64::from(u32::MAX) {
            return Err(self.invalid(format!("{total} clusters are more than a qcow2 header describes")));
        }
        let l2_at = meta * cs;
        let l1_at = l2_at + tables * cs;
        let rt_at = l1_at + l1_clusters * cs;
        let rb_at = rt_at + table_clusters * cs;
        self.refcounts.resize(total as usize, 0);
        self.refcounts[meta as usize..].fill(1);
        let mut out = vec![0u8; ((total - meta) * cs) as usize];
        let put64 = |b: &mut [u8], at: u64, v: u64| b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
        for (n, (index, entries)) in self.l2.iter().enumerate() {
            let table = n as u64 * cs;
            for (j, e) in entries.iter().enumerate() {
                put64(&mut out, table + j as u64 * 8, *e);
            }
            put64(&mut out, l1_at - l2_at + index * 8, (l2_at + table) | OFLAG_COPIED);
        }
        for b in 0..blocks {
            put64(&mut out, rt_at - l2_at + b * 8, rb_at + b * cs);
        }
        for (c, r) in self.refcounts.iter().enumerate() {
            let at = (rb_at - l2_at) as usize + c * 2;
            out[at..at + 2].copy_from_slice(&r.to_be_bytes());
        }
        let file_len = self.base + total * cs;
        self.file.set_len(file_len).map_err(self.io("size"))?;
        self.write(l2_at, &mut out, false)?;
        let mut head = self.header(l1_size, l1_at, rt_at, table_clusters)?;
        self.write(0, &mut head, false)?;
        self.file.sync_all().map_err(self.io("sync"))?;
        let read = self.read;
        let hash = self.file_hash(file_len)?;
        Ok(Encoded { read, file_len, hash })
    }

    /// The complete file's hash: what was hashed as it was written, with the bytes before
    /// that read back (the headers). `None` if something was written out of order.
    fn file_hash(mut self, file_len: u64) -> Result<Option<FileHash>, EncodeError> {
        if self.hash.broken || self.hash.next > file_len {
            return Ok(None);
        }
        self.hash.zeros_to(file_len);
        let (file, path) = (&self.file, &self.path);
        let read_back = |from: u64, to: u64| {
            let mut buf = vec![0u8; (to - from) as usize];
            file.read_exact_at(&mut buf, from).map(|()| buf).map_err(|source| EncodeError::Io {
                action: "read back",
                path: path.clone(),
                source,
            })
        };
        let head = read_back(self.hash.part, self.hash.from)?;
        let StreamHash { part, hasher, .. } = self.hash;
        let rest = match hasher {
            PartHasher::HeadLast(h) => h.finish(&head),
            PartHasher::InOrder(h) if head.is_empty() => h.finalize(),
            PartHasher::InOrder(_) => return Ok(None),
        };
        if !self.target.layout.needs_key() {
            return Ok((part == 0).then_some(FileHash::Whole(rest)));
        }
        // Split where nasbak's checksum splits it: at the header the file's own LUKS says.
        let header = luks::LuksFile::open(path, self.target.layout)?.region();
        if header.0 + header.1 != part {
            return Ok(None);
        }
        let before = blake3::hash(&read_back(0, header.0)?);
        let luks = blake3::hash(&read_back(header.0, part)?);
        Ok(Some(FileHash::AroundLuksHeader { header, parts: [before, luks, rest] }))
    }

    /// The header cluster's first bytes (a whole number of sectors).
    fn header(&self, l1_size: u64, l1_at: u64, rt_at: u64, table_clusters: u64) -> Result<Vec<u8>, EncodeError> {
        let mut head = vec![0u8; 4096];
        let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        head[..4].copy_from_slice(&MAGIC);
        put32(&mut head, 4, 3);
        put32(&mut head, 20, CLUSTER_BITS);
        put64(&mut head, 24, self.target.size);
        put32(&mut head, 32, if self.luks_header.is_some() { 2 } else { 0 });
        put32(&mut head, 36, l1_size as u32);
        put64(&mut head, 40, l1_at);
        put64(&mut head, 48, rt_at);
        put32(&mut head, 56, table_clusters as u32);
        if self.target.compress {
            put64(&mut head, 72, INCOMPAT_COMPRESSION);
            head[104] = 1; // compression_type: zstd
        }
        put32(&mut head, 96, 4); // refcount_order: 16-bit
        put32(&mut head, 100, 112);
        let mut at = 112;
        if self.target.backing.is_some() {
            put32(&mut head, at, QCOW2_BACKING_FORMAT_EXT);
            put32(&mut head, at + 4, 5);
            head[at + 8..at + 13].copy_from_slice(b"qcow2");
            at += 16;
        }
        if let Some((luks_at, len)) = self.luks_header {
            put32(&mut head, at, QCOW2_CRYPTO_EXT);
            put32(&mut head, at + 4, 16);
            put64(&mut head, at + 8, luks_at);
            put64(&mut head, at + 16, len);
            at += 24;
        }
        at += 8; // the end of the extensions
        if let Some(b) = &self.target.backing {
            put64(&mut head, 8, at as u64);
            put32(&mut head, 16, b.len() as u32);
            head[at..at + b.len()].copy_from_slice(b.as_bytes());
            at += b.len();
        }
        if at > head.len() {
            return Err(self.invalid("a header longer than 4 KiB".into()));
        }
        Ok(head)
    }
}

/// What to read from an export and how: the data ranges to read and the ranges that read as
/// zeros, each cluster-aligned (or ending at the disk's end), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// (offset, length) of each range whose data is read.
    pub data: Vec<(u64, u64)>,
    /// (offset, length) of each range that reads as zeros and is marked so.
    pub zeros: Vec<(u64, u64)>,
}

impl Plan {
    /// The bytes the plan reads.
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|(_, l)| l).sum()
    }

    /// A full's plan from the export's allocation: what is not a hole or zeros is read, rounded
    /// out to whole clusters.
    pub fn full(allocation: &[StatusExtent], size: u64) -> Plan {
        let mut plan = Plan::default();
        for e in allocation.iter().filter(|e| e.flags & nbd::STATE_ZERO == 0) {
            push_range(&mut plan.data, e.offset, e.len, size);
        }
        plan
    }

    /// An incremental's plan: the dirty ranges of `dirty` (a `qemu:dirty-bitmap:` map), rounded
    /// out to whole clusters; within them, the whole clusters `allocation` says read as zeros
    /// are marked zero, the rest read.
    pub fn incremental(dirty: &[StatusExtent], allocation: &[StatusExtent], size: u64) -> Plan {
        let mut rounded = Vec::new();
        for e in dirty.iter().filter(|e| e.flags & nbd::STATE_DIRTY != 0) {
            push_range(&mut rounded, e.offset, e.len, size);
        }
        let mut plan = Plan::default();
        let zero_at = |c: u64| {
            let end = (c + cs()).min(size);
            // Inside one allocation extent that reads as zeros.
            let i = allocation.partition_point(|e| e.offset + e.len <= c);
            allocation
                .get(i)
                .is_some_and(|e| e.flags & nbd::STATE_ZERO != 0 && e.offset <= c && e.offset + e.len >= end)
        };
        for (start, len) in rounded {
            let mut c = start;
            while c < start + len {
                let end = (c + cs()).min(size);
                if zero_at(c) {
                    push_range(&mut plan.zeros, c, end - c, size);
                } else {
                    push_range(&mut plan.data, c, end - c, size);
                }
                c = end;
            }
        }
        plan
    }
}

/// Appends `offset..offset + len`, rounded out to clusters and cut at `size`, merging with the
/// last range where they meet.
fn push_range(ranges: &mut Vec<(u64, u64)>, offset: u64, len: u64, size: u64) {
    if len == 0 {
        return;
    }
    let start = offset - offset % cs();
    let end = (offset + len).next_multiple_of(cs()).min(size);
    match ranges.last_mut() {
        Some((s, l)) if *s + *l >= start => *l = (*l).max(end - *s),
        _ => ranges.push((start, end - start)),
    }
}

/// Reads what `plan` says from `client` and gives it to `encoder`: one thread reads (several
/// requests in flight) while the chunk before is encoded on the pool and written. `stop` is
/// asked between chunks; `progress` gets the guest bytes done so far.
pub fn copy_from_nbd(
    client: &mut NbdClient,
    plan: &Plan,
    encoder: &mut Encoder,
    stop: &(dyn Fn() -> bool + Sync),
    progress: &mut dyn FnMut(u64),
) -> Result<(), EncodeError> {
    for (offset, len) in &plan.zeros {
        encoder.put_zeros(*offset, *len)?;
    }
    let path = encoder.path.clone();
    // The reader stays a batch ahead while the one before is encoded and written.
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>((BATCH / u64::from(CHUNK)) as usize + 2);
    let chunk = u64::from(CHUNK);
    let ranges: Vec<(u64, u32)> = plan
        .data
        .iter()
        .flat_map(|&(offset, len)| {
            (0..len.div_ceil(chunk)).map(move |i| (offset + i * chunk, (len - i * chunk).min(chunk) as u32))
        })
        .collect();
    // Buffers written go back to the reader, to be read into again.
    let (back, spare) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let buffer = || spare.try_recv().unwrap_or_default();
            client.read_ranges_into(ranges, READ_WINDOW, buffer, |offset, data| {
                if stop() {
                    return Err(ReadStop::Stopped);
                }
                tx.send((offset, data)).map_err(|_| ReadStop::Receiver)
            })
        });
        let mut done = 0u64;
        let mut failure = None;
        for (offset, data) in rx.iter() {
            if stop() {
                failure = Some(EncodeError::Stopped { path: path.clone() });
                break;
            }
            let n = data.len() as u64;
            if let Err(e) = encoder.put(offset, data) {
                failure = Some(e);
                break;
            }
            for b in encoder.take_spare() {
                let _ = back.send(b);
            }
            done += n;
            progress(done);
        }
        drop(rx);
        let read = reader.join().unwrap_or(Err(ReadStop::Receiver));
        match (failure, read) {
            (Some(e), _) => Err(e),
            (None, Err(ReadStop::Nbd(e))) => Err(EncodeError::Nbd(e)),
            (None, Err(ReadStop::Stopped)) => Err(EncodeError::Stopped { path: path.clone() }),
            (None, Err(ReadStop::Receiver)) => Err(EncodeError::Stopped { path: path.clone() }),
            (None, Ok(())) => Ok(()),
        }
    })
}

/// Why the reading thread stopped early.
enum ReadStop {
    Nbd(NbdError),
    Stopped,
    Receiver,
}

impl From<NbdError> for ReadStop {
    fn from(e: NbdError) -> Self {
        ReadStop::Nbd(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, flags: u32) -> StatusExtent {
        StatusExtent { offset, len, flags }
    }

    #[test]
    fn a_full_reads_what_is_allocated_rounded_out_to_clusters() {
        let k = 1024;
        let size = 1000 * k;
        let map = [ext(0, 100 * k, 0), ext(100 * k, 300 * k, 3), ext(400 * k, 10 * k, 0), ext(410 * k, 590 * k, 3)];
        let plan = Plan::full(&map, size);
        assert_eq!(plan.data, vec![(0, 128 * k), (384 * k, 64 * k)]);
        assert!(plan.zeros.is_empty());
        // The disk's last partial cluster ends at the disk's end.
        let plan = Plan::full(&[ext(0, 900 * k, 3), ext(900 * k, 100 * k, 0)], size);
        assert_eq!(plan.data, vec![(896 * k, 104 * k)]);
    }

    #[test]
    fn an_incremental_reads_the_dirty_clusters_and_marks_the_zeroed_ones() {
        let k = 1024;
        let size = 1024 * k;
        let dirty = [ext(0, 64 * k, 0), ext(64 * k, 192 * k, 1), ext(256 * k, 768 * k, 0)];
        // 64K..128K data, 128K..256K zeros (allocation says so).
        let alloc = [ext(0, 128 * k, 0), ext(128 * k, 896 * k, 2)];
        let plan = Plan::incremental(&dirty, &alloc, size);
        assert_eq!(plan.data, vec![(64 * k, 64 * k)]);
        assert_eq!(plan.zeros, vec![(128 * k, 128 * k)]);
        // A dirty extent inside a cluster makes the whole cluster read.
        let plan = Plan::incremental(&[ext(70 * k, 4 * k, 1)], &[ext(0, size, 0)], size);
        assert_eq!(plan.data, vec![(64 * k, 64 * k)]);
    }

    #[test]
    fn ranges_that_are_not_cluster_aligned_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.qcow2");
        let target = EncodeTarget {
            layout: StoredLayout::Qcow2,
            compress: true,
            size: 1 << 20,
            backing: None,
            over_parent: false,
        };
        let mut e = Encoder::create(&path, target, None).unwrap();
        let err = e.put(512, vec![1u8; 4096]).unwrap_err();
        assert!(err.to_string().contains("f.qcow2") && err.to_string().contains("64 KiB cluster"), "{err}");
        let both = EncodeTarget {
            layout: StoredLayout::Qcow2Luks,
            compress: true,
            size: 1 << 20,
            backing: None,
            over_parent: false,
        };
        let err = Encoder::create(&path, both, Some(b"k")).unwrap_err();
        assert!(err.to_string().contains("cannot be compressed"), "{err}");
    }
}
