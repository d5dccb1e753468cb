//! A stored backup file (or chain) whose data QEMU would have to decompress or decrypt, written
//! out as a plain qcow2 or raw without QEMU, on every core.
//!
//! Why: `qemu-img convert` of an encrypted qcow2 decrypts sector by sector on one thread, and of
//! a compressed one decompresses a cluster at a time: a restore of an encrypted backup took 2.3x
//! the copy of a plain one, of a compressed one 1.6x. The formats are fixed and small (qcow2's
//! tables, zstd frames, LUKS1's aes-xts-plain64), so this module reads them itself: the stored
//! file once, front to back (every byte handed to the caller's checksum as it goes), each data
//! cluster decrypted and decompressed on a pool of threads and written at its place: in a new
//! plain qcow2 whose layout is computed before the first byte is written
//! ([`Decoder::write_qcow2`]), or raw into a file or onto a block device ([`Decoder::write_raw`]).
//! In a chain each cluster comes from the topmost file whose tables map it or say it reads as
//! zeros, as QEMU reads a backing chain.
//!
//! Only what nasbak stores is taken: a qcow2, or a chain of them given file by file (512 B to
//! 2 MiB clusters, no external data file or subclusters, closed cleanly), plain, zstd-compressed,
//! LUKS-encrypted ([`StoredLayout::Qcow2Luks`]) or inside a LUKS container
//! ([`StoredLayout::Qcow2InLuks`]). Anything else is [`DecodeError::Unsupported`] before a
//! byte is written, and the caller converts with qemu-img as before.
//!
//! The plain qcow2 written: version 3, the source's cluster size, 16-bit refcounts, laid out as
//! header, refcount table, refcount blocks, L1 table, L2 tables, then the data clusters in guest
//! order. A cluster that reads as zeros is left a hole of the file (mapped, so a guest write to
//! it costs no allocation). `qemu-img check` finds nothing to say of it (tested).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::be::{be32, be64};
use crate::luks::{DataCipher, LuksError, LuksFile};
use crate::qcow2::{
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1_OFFSET_MASK, L2_OFFSET_MASK, MAGIC as QCOW2_MAGIC,
    OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SECTOR,
};
use crate::stored::StoredLayout;

/// How much of the stored file is read at a time.
const CHUNK: usize = 8 << 20;

/// Why a stored file was not decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The file is not one this module decodes (qemu-img can): nothing was written.
    #[error("{path} is not decoded by nasbak itself: {detail}")]
    Unsupported {
        /// The stored file.
        path: PathBuf,
        /// What it has that is not read here.
        detail: String,
    },
    /// The file contradicts itself (a table beyond its end, a cluster that does not
    /// decompress): it is damaged.
    #[error("{path} is damaged: {detail}")]
    Damaged {
        /// The stored file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The key opens none of its keyslots.
    #[error("the key opens none of the keyslots of {path}")]
    WrongKey {
        /// The stored file.
        path: PathBuf,
    },
    /// Its LUKS header could not be read.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// Reading or writing failed.
    #[error("could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The caller's progress callback said stop.
    #[error("decoding {path} was stopped")]
    Stopped {
        /// The stored file.
        path: PathBuf,
    },
}

/// One data cluster of the source: where its bytes are and where they go.
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// Its offset in the qcow2 (for [`StoredLayout::Qcow2InLuks`], in the container's payload).
    host: u64,
    /// Its length there (a compressed cluster's upper bound).
    len: u64,
    /// Its cluster index in the guest's disk.
    guest: u64,
    compressed: bool,
}

/// What [`Decoder::write_qcow2`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the stored files read (and handed to the checksums).
    pub read: u64,
    /// Data bytes written (clusters reading as zeros are not).
    pub written: u64,
}

/// One file of a chain opened for decoding: its header and tables read, its key checked.
struct Part {
    path: PathBuf,
    layout: StoredLayout,
    cipher: Option<DataCipher>,
    /// Where the qcow2 starts in the file (a LUKS container's payload offset).
    base: u64,
    cluster_bits: u32,
    size: u64,
    has_backing: bool,
    /// The data clusters this file gives the disk, in the order of their offsets in the file.
    extents: Vec<Extent>,
    /// The guest clusters its tables say read as zeros (which hide what files below hold).
    zeros: Vec<u64>,
}

/// A stored file, or a chain of them, opened for decoding: every file's header and tables read,
/// its key checked, and for each cluster of the disk the file that gives it found.
pub struct Decoder {
    /// Top first.
    parts: Vec<Part>,
    cluster_bits: u32,
    size: u64,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<(&Path, StoredLayout, usize)> =
            self.parts.iter().map(|p| (p.path.as_path(), p.layout, p.extents.len())).collect();
        f.debug_struct("Decoder").field("files", &files).finish_non_exhaustive()
    }
}

impl Part {
    /// Opens `path`, stored as `layout`, with `passphrase` when the layout is encrypted: reads
    /// its qcow2 header and tables and checks that it is one this module decodes.
    fn open(path: &Path, layout: StoredLayout, passphrase: Option<&[u8]>) -> Result<Self, DecodeError> {
        let unsupported = |detail: &str| DecodeError::Unsupported { path: path.to_owned(), detail: detail.to_owned() };
        let file =
            File::open(path).map_err(|source| DecodeError::Io { action: "open", path: path.to_owned(), source })?;
        let file_len =
            file.metadata().map_err(|source| DecodeError::Io { action: "stat", path: path.to_owned(), source })?.len();
        let (cipher, base) = match layout {
            StoredLayout::Qcow2 => (None, 0),
            StoredLayout::Qcow2Luks | StoredLayout::Qcow2InLuks => {
                let Some(passphrase) = passphrase else {
                    return Err(unsupported("it is encrypted and no key was given"));
                };
                let luks = LuksFile::open(path, layout)?;
                let key = luks.unlock(passphrase)?.ok_or_else(|| DecodeError::WrongKey { path: path.to_owned() })?;
                let (at, len) = luks.region();
                let base = if layout == StoredLayout::Qcow2InLuks { at + len } else { 0 };
                (Some(key.data_cipher()), base)
            }
        };
        let mut d = Part {
            path: path.to_owned(),
            layout,
            cipher,
            base,
            cluster_bits: 0,
            size: 0,
            has_backing: false,
            extents: Vec::new(),
            zeros: Vec::new(),
        };
        let inner_len = file_len.saturating_sub(base);
        let mut head = vec![0u8; 112];
        d.read_meta(&file, 0, &mut head)?;
        if head[..4] != QCOW2_MAGIC {
            return Err(d.damaged("it holds no qcow2 header".into()));
        }
        let version = be32(&head, 4);
        if version != 3 {
            return Err(unsupported(&format!("qcow2 version {version} (3 is decoded)")));
        }
        d.has_backing = be64(&head, 8) != 0;
        let cluster_bits = be32(&head, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(d.damaged(format!("a cluster size of 2^{cluster_bits} bytes")));
        }
        let crypt = be32(&head, 32);
        let expected_crypt = if layout == StoredLayout::Qcow2Luks { 2 } else { 0 };
        if crypt != expected_crypt {
            return Err(unsupported(&format!("qcow2 encryption method {crypt} in a file stored as {layout:?}")));
        }
        let incompatible = be64(&head, 72);
        if incompatible & INCOMPAT_DIRTY != 0 {
            return Err(unsupported("it was not closed cleanly (its dirty bit is set)"));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(d.damaged("QEMU marked it corrupt".into()));
        }
        if incompatible & !INCOMPAT_COMPRESSION != 0 {
            return Err(unsupported(&format!("incompatible features {incompatible:#x}")));
        }
        let header_length = be32(&head, 100);
        let zstd = incompatible & INCOMPAT_COMPRESSION != 0 && header_length > 104 && head[104] == 1;
        let (size, l1_size, l1_offset) = (be64(&head, 24), u64::from(be32(&head, 36)), be64(&head, 40));
        let cs = 1u64 << cluster_bits;
        let l2_entries = cs / 8;
        if l1_size.saturating_mul(l2_entries).saturating_mul(cs) < size
            || !l1_offset.is_multiple_of(cs)
            || l1_offset.saturating_add(l1_size * 8) > inner_len
        {
            return Err(d.damaged(format!("an L1 table of {l1_size} entries at {l1_offset}")));
        }
        (d.cluster_bits, d.size) = (cluster_bits, size);
        let mut l1 = vec![0u8; (l1_size * 8) as usize];
        d.read_meta(&file, l1_offset, &mut l1)?;
        let mut l2 = vec![0u8; cs as usize];
        let compressed_bits = 62 - (cluster_bits - 8);
        let guest_clusters = size.div_ceil(cs);
        for (i, e) in l1.chunks_exact(8).enumerate() {
            let table = be64(e, 0) & L1_OFFSET_MASK;
            if table == 0 {
                continue;
            }
            if !table.is_multiple_of(cs) || table + cs > inner_len {
                return Err(d.damaged(format!("L1 entry {i} names an L2 table at {table}")));
            }
            d.read_meta(&file, table, &mut l2)?;
            for (j, e) in l2.chunks_exact(8).enumerate() {
                let entry = be64(e, 0);
                let guest = i as u64 * l2_entries + j as u64;
                if entry & OFLAG_COMPRESSED != 0 {
                    if !zstd {
                        return Err(unsupported("its clusters are compressed with zlib (zstd is decoded)"));
                    }
                    let host = entry & ((1u64 << compressed_bits) - 1);
                    let sectors = ((entry & !OFLAG_COMPRESSED & !OFLAG_COPIED) >> compressed_bits) + 1;
                    let len = sectors * SECTOR - (host % SECTOR);
                    // QEMU's bound can run past the end of the file by the last sector's rest.
                    let len = len.min(inner_len.saturating_sub(host));
                    if guest >= guest_clusters || len == 0 {
                        return Err(d.damaged(format!("a compressed cluster of guest cluster {guest} at {host}")));
                    }
                    d.extents.push(Extent { host, len, guest, compressed: true });
                } else {
                    let host = entry & L2_OFFSET_MASK;
                    if entry & OFLAG_ZERO != 0 {
                        d.zeros.push(guest);
                        continue;
                    }
                    if host == 0 {
                        continue; // unallocated: what the file below has
                    }
                    if !host.is_multiple_of(cs) || host + cs > inner_len || guest >= guest_clusters {
                        return Err(d.damaged(format!("guest cluster {guest} mapped at {host}")));
                    }
                    d.extents.push(Extent { host, len: cs, guest, compressed: false });
                }
            }
        }
        d.extents.sort_unstable_by_key(|e| e.host);
        Ok(d)
    }

    fn damaged(&self, detail: String) -> DecodeError {
        DecodeError::Damaged { path: self.path.clone(), detail }
    }

    fn io(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> DecodeError + '_ {
        move |source| DecodeError::Io { action, path: self.path.clone(), source }
    }

    /// Reads `buf.len()` bytes of the qcow2 at `at`, decrypted when it is in a LUKS container.
    fn read_meta(&self, file: &File, at: u64, buf: &mut [u8]) -> Result<(), DecodeError> {
        match (self.layout, &self.cipher) {
            (StoredLayout::Qcow2InLuks, Some(cipher)) => {
                let first = at / SECTOR;
                let end = (at + buf.len() as u64).div_ceil(SECTOR);
                let mut sectors = vec![0u8; ((end - first) * SECTOR) as usize];
                file.read_exact_at(&mut sectors, self.base + first * SECTOR).map_err(self.io("read"))?;
                cipher.decrypt(&mut sectors, first);
                let skip = (at - first * SECTOR) as usize;
                buf.copy_from_slice(&sectors[skip..skip + buf.len()]);
                Ok(())
            }
            _ => file.read_exact_at(buf, self.base + at).map_err(self.io("read")),
        }
    }

    /// The file range an extent's bytes are read from (whole sectors when they must be
    /// decrypted).
    fn span(&self, e: &Extent) -> (u64, u64) {
        match self.cipher {
            Some(_) => (self.base + e.host / SECTOR * SECTOR, self.base + (e.host + e.len).div_ceil(SECTOR) * SECTOR),
            None => (self.base + e.host, self.base + e.host + e.len),
        }
    }

    /// The guest data of the extent `e`, from the `window` of stored bytes starting at `start`:
    /// decrypted and decompressed as it is stored.
    fn decode_extent<'w>(&self, window: &'w [u8], start: u64, e: &Extent) -> Result<Cow<'w, [u8]>, DecodeError> {
        let (from, to) = self.span(e);
        let stored = &window[(from - start) as usize..(to - start) as usize];
        // Encrypted: the sectors' plaintext, numbered from the qcow2's start (the container's
        // payload, or the file of a LUKS qcow2: its physical offsets).
        let bytes = match &self.cipher {
            Some(cipher) => {
                let mut plain = stored.to_vec();
                cipher.decrypt(&mut plain, (from - self.base) / SECTOR);
                Cow::Owned(plain)
            }
            None => Cow::Borrowed(stored),
        };
        let skip = (self.base + e.host - from) as usize;
        let range = skip..skip + e.len as usize;
        if !e.compressed {
            return Ok(match bytes {
                Cow::Borrowed(b) => Cow::Borrowed(&b[range]),
                Cow::Owned(mut b) => {
                    b.truncate(range.end);
                    b.drain(..range.start);
                    Cow::Owned(b)
                }
            });
        }
        let mut cluster = vec![0u8; 1 << self.cluster_bits];
        decompress(&bytes[range], &mut cluster)
            .map_err(|detail| self.damaged(format!("guest cluster {}: {detail}", e.guest)))?;
        Ok(Cow::Owned(cluster))
    }

    /// Reads the stored file front to back, hands every byte to `sink` and, as each extent's
    /// bytes have all arrived, the batch of such extents to `decode` (with the window of bytes
    /// holding them and the window's offset in the file), the two side by side on the pool.
    fn stream(
        &self,
        sink: &mut (dyn FnMut(&[u8]) + Send),
        progress: &mut dyn FnMut(u64) -> bool,
        decode: impl Fn(&[u8], u64, &[usize]) -> Result<(), DecodeError> + Sync,
    ) -> Result<u64, DecodeError> {
        let mut file = File::open(&self.path).map_err(self.io("open"))?;
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(1);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..2 {
            let _ = empty_tx.send(Vec::with_capacity(CHUNK));
        }
        std::thread::scope(|scope| {
            let (empty_tx, full_rx) = (empty_tx, full_rx);
            scope.spawn(move || {
                use std::io::Read;
                while let Ok(mut buf) = empty_rx.recv() {
                    buf.resize(CHUNK, 0);
                    let mut filled = 0;
                    while filled < CHUNK {
                        match file.read(&mut buf[filled..]) {
                            Ok(0) => break,
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                let _ = full_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    buf.truncate(filled);
                    if full_tx.send(Ok(buf)).is_err() || filled == 0 {
                        return;
                    }
                }
            });
            // The bytes from `start` on that an extent not yet decoded may need.
            let (mut window, mut start, mut pos, mut next) = (Vec::<u8>::new(), 0u64, 0u64, 0usize);
            for chunk in full_rx {
                let chunk = chunk.map_err(self.io("read"))?;
                if chunk.is_empty() {
                    break;
                }
                pos += chunk.len() as u64;
                let first_needed = self.extents.get(next).map_or(u64::MAX, |e| self.span(e).0);
                if window.is_empty() {
                    // Nothing kept: keep from the next extent's start, if it is in this chunk.
                    start = first_needed.max(pos - chunk.len() as u64);
                    if start < pos {
                        window.extend_from_slice(&chunk[(start - (pos - chunk.len() as u64)) as usize..]);
                    }
                } else {
                    window.extend_from_slice(&chunk);
                }
                let ready = self.extents[next..].iter().take_while(|e| self.span(e).1 <= pos).count();
                let batch: Vec<usize> = (next..next + ready).collect();
                let (hashed, decoded) = rayon::join(|| sink(&chunk), || decode(&window, start, &batch));
                let () = hashed;
                decoded?;
                next += ready;
                let _ = empty_tx.send(chunk);
                // Drop what no extent still needs.
                let keep_from = self.extents.get(next).map_or(pos, |e| self.span(e).0.min(pos));
                if keep_from > start {
                    let drop = ((keep_from - start) as usize).min(window.len());
                    window.drain(..drop);
                    start = keep_from;
                }
                if window.is_empty() {
                    start = pos;
                }
                if !progress(pos) {
                    return Err(DecodeError::Stopped { path: self.path.clone() });
                }
            }
            if next < self.extents.len() {
                return Err(self.damaged(format!(
                    "it ends at {pos} bytes, before the cluster its tables place at {}",
                    self.extents[next].host
                )));
            }
            Ok(pos)
        })
    }
}

impl Decoder {
    /// Opens `path`, stored as `layout`, with `passphrase` when the layout is encrypted: reads
    /// its qcow2 header and tables and checks that it is one this module decodes (a file with a
    /// backing file is not: see [`Decoder::open_chain`]).
    pub fn open(path: &Path, layout: StoredLayout, passphrase: Option<&[u8]>) -> Result<Self, DecodeError> {
        Self::open_chain(&[(path.to_owned(), layout)], passphrase)
    }

    /// Opens a chain of stored files, top first, each backed by the next (whatever its header
    /// names: the files given are the chain), the last one by nothing; `passphrase` opens the
    /// encrypted ones. Each cluster of the disk comes from the topmost file whose tables map it
    /// (or say it reads as zeros).
    pub fn open_chain(files: &[(PathBuf, StoredLayout)], passphrase: Option<&[u8]>) -> Result<Self, DecodeError> {
        let Some(((top_path, _), _)) = files.split_first() else {
            return Err(DecodeError::Unsupported { path: PathBuf::new(), detail: "a chain of no files".into() });
        };
        let parts =
            files.iter().map(|(path, layout)| Part::open(path, *layout, passphrase)).collect::<Result<Vec<_>, _>>()?;
        let (cluster_bits, size) = (parts[0].cluster_bits, parts[0].size);
        if let Some(p) = parts.iter().find(|p| p.cluster_bits != cluster_bits) {
            return Err(DecodeError::Unsupported {
                path: p.path.clone(),
                detail: format!("its clusters are not the size of {}'s", top_path.display()),
            });
        }
        if let Some(last) = parts.last().filter(|p| p.has_backing) {
            return Err(DecodeError::Unsupported { path: last.path.clone(), detail: "it has a backing file".into() });
        }
        let mut decoder = Decoder { parts, cluster_bits, size };
        // Each cluster from the topmost file that says what it holds.
        let clusters = size.div_ceil(1 << cluster_bits);
        let mut decided = vec![0u64; clusters.div_ceil(64) as usize];
        let mut take = |guest: u64| {
            let (word, bit) = ((guest / 64) as usize, 1u64 << (guest % 64));
            let free = guest < clusters && decided[word] & bit == 0;
            if free {
                decided[word] |= bit;
            }
            free
        };
        for part in &mut decoder.parts {
            // Zeros and data of one file never name the same cluster (one L2 entry each).
            part.zeros.retain(|g| take(*g));
            part.extents.retain(|e| take(e.guest));
        }
        Ok(decoder)
    }

    /// The disk's virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// How many files it reads.
    pub fn files(&self) -> usize {
        self.parts.len()
    }

    /// Reads each file once, the chain's last first, and hands every data cluster that does not
    /// read as zeros to `write` (its file's index, its index there, its bytes) on the pool;
    /// `write` returns the bytes it wrote.
    fn decode_all(
        &self,
        sink: &mut (dyn FnMut(usize, &[u8]) + Send),
        progress: &mut dyn FnMut(u64) -> bool,
        write: impl Fn(usize, usize, &[u8]) -> Result<u64, DecodeError> + Sync,
    ) -> Result<Decoded, DecodeError> {
        let written = std::sync::atomic::AtomicU64::new(0);
        let mut read = 0;
        for (p, part) in self.parts.iter().enumerate().rev() {
            let before = read;
            read +=
                part.stream(&mut |bytes| sink(p, bytes), &mut |n| progress(before + n), |window, start, batch| {
                    batch.par_iter().try_for_each(|&i| {
                        let cluster = part.decode_extent(window, start, &part.extents[i])?;
                        if cluster.iter().any(|b| *b != 0) {
                            written.fetch_add(write(p, i, &cluster)?, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })?;
        }
        Ok(Decoded { read, written: written.into_inner() })
    }

    /// Writes the disk into `target`, created anew as a plain qcow2, reading each stored file
    /// once from its start to its end, the chain's last (the full) first: `sink` gets every
    /// byte read with the index of its file in the chain, in order (for the caller's checksums,
    /// computed while the data is decoded); `progress` the bytes read so far, and returns false
    /// to stop. `target` is synced; on an error it is left for the caller to remove.
    pub fn write_qcow2(
        &self,
        target: &Path,
        sink: &mut (dyn FnMut(usize, &[u8]) + Send),
        progress: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Decoded, DecodeError> {
        let cs = 1u64 << self.cluster_bits;
        // The data clusters' places in the target: guest order.
        let mut by_guest: Vec<(u64, usize, usize)> = self
            .parts
            .iter()
            .enumerate()
            .flat_map(|(p, part)| part.extents.iter().enumerate().map(move |(i, e)| (e.guest, p, i)))
            .collect();
        by_guest.sort_unstable();
        if let Some(w) = by_guest.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(self.parts[w[0].1].damaged(format!("two L2 entries map guest cluster {}", w[0].0)));
        }
        let layout = Layout::new(self.size, self.cluster_bits, by_guest.iter().map(|(g, _, _)| *g));
        let mut slot: Vec<Vec<u64>> = self.parts.iter().map(|p| vec![0; p.extents.len()]).collect();
        for (n, (_, p, i)) in by_guest.iter().enumerate() {
            slot[*p][*i] = layout.data + n as u64 * cs;
        }
        let out = OpenOptions::new().write(true).create_new(true).open(target).map_err(|source| DecodeError::Io {
            action: "create",
            path: target.to_owned(),
            source,
        })?;
        let out_err = |action| move |source| DecodeError::Io { action, path: target.to_owned(), source };
        out.set_len(layout.data + by_guest.len() as u64 * cs).map_err(out_err("size"))?;
        let decoded = self.decode_all(sink, progress, |p, i, cluster| {
            out.write_all_at(cluster, slot[p][i]).map_err(out_err("write"))?;
            Ok(cs)
        })?;
        layout.write_metadata(&out, by_guest.iter().map(|(g, _, _)| *g)).map_err(out_err("write"))?;
        out.sync_all().map_err(out_err("sync"))?;
        Ok(decoded)
    }

    /// Writes the disk in place into `target`, an existing raw file or block device: what the
    /// backup holds at its place, zeros everywhere else in its first [`Decoder::virtual_size`]
    /// bytes (holes punched in a file, the range zeroed on a device), nothing past them; each
    /// stored file read once, as [`Decoder::write_qcow2`] reads it (`sink`, `progress` alike). A
    /// file shorter than the disk is extended; a device smaller than the disk is refused before
    /// anything is written. On an error the target is left partly written, for the caller to
    /// say.
    pub fn write_raw(
        &self,
        target: &Path,
        sink: &mut (dyn FnMut(usize, &[u8]) + Send),
        progress: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Decoded, DecodeError> {
        use std::os::unix::fs::FileTypeExt;
        let cs = 1u64 << self.cluster_bits;
        let out_err = |action| move |source| DecodeError::Io { action, path: target.to_owned(), source };
        let out = OpenOptions::new().write(true).open(target).map_err(out_err("open for writing"))?;
        let device = out.metadata().map_err(out_err("stat"))?.file_type().is_block_device();
        let mut data: Vec<u64> = self.parts.iter().flat_map(|p| p.extents.iter().map(|e| e.guest)).collect();
        data.sort_unstable();
        if device {
            let len = device_size(&out).map_err(out_err("measure"))?;
            if len < self.size {
                return Err(DecodeError::Io {
                    action: "restore onto",
                    path: target.to_owned(),
                    source: std::io::Error::other(format!(
                        "the device holds {len} bytes, the disk {} bytes",
                        self.size
                    )),
                });
            }
            // Zeros where the backup has no data: the gaps between its clusters.
            let mut at = 0;
            for g in data.iter().map(|g| g * cs).chain(std::iter::once(self.size)) {
                if g > at {
                    zero_range(&out, at, g - at, false).map_err(out_err("zero"))?;
                }
                at = at.max((g + cs).min(self.size));
            }
        } else {
            if out.metadata().map_err(out_err("stat"))?.len() < self.size {
                out.set_len(self.size).map_err(out_err("extend"))?;
            }
            zero_range(&out, 0, self.size, true).map_err(out_err("zero"))?;
        }
        let decoded = self.decode_all(sink, progress, |p, i, cluster| {
            let at = self.parts[p].extents[i].guest * cs;
            let cluster = &cluster[..(self.size - at).min(cs) as usize];
            out.write_all_at(cluster, at).map_err(out_err("write"))?;
            Ok(cluster.len() as u64)
        })?;
        out.sync_all().map_err(out_err("sync"))?;
        Ok(decoded)
    }
}

/// Makes `len` bytes of `file` at `offset` read as zeros: holes punched in a regular file
/// (`hole`), the range zeroed on a device; written as zeros where the file system or the device
/// takes neither.
fn zero_range(file: &File, offset: u64, len: u64, hole: bool) -> std::io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let flags = match hole {
        true => FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        false => FallocateFlags::FALLOC_FL_ZERO_RANGE,
    };
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::other(format!("a range of {len} bytes at {offset}")));
    };
    if len == 0 || fallocate(std::os::fd::AsRawFd::as_raw_fd(file), flags, o, l).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The size of a block device in bytes.
fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::End(0))
}

/// Decompresses one zstd-compressed cluster (a frame, then whatever the last sector held) into
/// `out`, which it must fill exactly.
fn decompress(data: &[u8], out: &mut [u8]) -> Result<(), String> {
    let frame = zstd::zstd_safe::find_frame_compressed_size(data)
        .map_err(|code| format!("no zstd frame ({})", zstd::zstd_safe::get_error_name(code)))?;
    let n = zstd::bulk::decompress_to_buffer(&data[..frame], out).map_err(|e| format!("zstd: {e}"))?;
    if n != out.len() {
        return Err(format!("decompresses to {n} bytes, not a cluster's {}", out.len()));
    }
    Ok(())
}

/// Where everything goes in the plain qcow2 written.
#[derive(Debug)]
struct Layout {
    cluster_bits: u32,
    size: u64,
    refcount_table: u64,
    refcount_table_clusters: u64,
    /// Where the refcount blocks start, and how many there are.
    refcount_blocks_at: u64,
    refcount_blocks: u64,
    l1: u64,
    l1_size: u64,
    l2: u64,
    /// L1 index to the L2 table's place, for the L1 entries that have one.
    l2_tables: Vec<(u64, u64)>,
    data: u64,
    clusters: u64,
}

impl Layout {
    fn new(size: u64, cluster_bits: u32, guests: impl Iterator<Item = u64> + Clone) -> Layout {
        let cs = 1u64 << cluster_bits;
        let l2_entries = cs / 8;
        let l1_size = size.div_ceil(cs).div_ceil(l2_entries);
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let mut l1_indexes: Vec<u64> = guests.clone().map(|g| g / l2_entries).collect();
        l1_indexes.dedup(); // guest order: equal indexes are together
        let data_clusters = guests.count() as u64;
        let per_block = cs / 2; // 16-bit refcounts
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        let total = loop {
            let total = 1 + table_clusters + blocks + l1_clusters + l1_indexes.len() as u64 + data_clusters;
            let (b, t) = (total.div_ceil(per_block), (total.div_ceil(per_block) * 8).div_ceil(cs));
            if b == blocks && t == table_clusters {
                break total;
            }
            (blocks, table_clusters) = (b.max(blocks), t.max(table_clusters));
        };
        let refcount_table = cs;
        let refcount_blocks = refcount_table + table_clusters * cs;
        let l1 = refcount_blocks + blocks * cs;
        let l2 = l1 + l1_clusters * cs;
        let l2_tables = l1_indexes.iter().enumerate().map(|(n, i)| (*i, l2 + n as u64 * cs)).collect();
        let data = l2 + l1_indexes.len() as u64 * cs;
        Layout {
            cluster_bits,
            size,
            refcount_table,
            refcount_table_clusters: table_clusters,
            refcount_blocks_at: refcount_blocks,
            refcount_blocks: blocks,
            l1,
            l1_size,
            l2,
            l2_tables,
            data,
            clusters: total,
        }
    }

    /// Writes the header, refcounts and tables (the data clusters `guests`, in guest order, are
    /// at [`Layout::data`] on).
    fn write_metadata(&self, out: &File, guests: impl Iterator<Item = u64>) -> std::io::Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let l2_entries = cs / 8;
        let mut head = vec![0u8; 112];
        let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        head[..4].copy_from_slice(&QCOW2_MAGIC);
        put32(&mut head, 4, 3);
        put32(&mut head, 20, self.cluster_bits);
        put64(&mut head, 24, self.size);
        put32(&mut head, 36, self.l1_size as u32);
        put64(&mut head, 40, self.l1);
        put64(&mut head, 48, self.refcount_table);
        put32(&mut head, 56, self.refcount_table_clusters as u32);
        put32(&mut head, 96, 4); // refcount_order: 16-bit
        put32(&mut head, 100, 104); // header_length; then the extensions' end (zeroes)
        let mut table = vec![0u8; (self.refcount_table_clusters * cs) as usize];
        for b in 0..self.refcount_blocks {
            put64(&mut table, (b * 8) as usize, self.refcount_blocks_at + b * cs);
        }
        out.write_all_at(&table, self.refcount_table)?;
        let mut counts = vec![0u8; (self.refcount_blocks * cs) as usize];
        counts[..(self.clusters * 2) as usize].chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&1u16.to_be_bytes()));
        out.write_all_at(&counts, self.refcount_blocks_at)?;
        let mut l1 = vec![0u8; (self.l1_size * 8) as usize];
        for (i, at) in &self.l2_tables {
            put64(&mut l1, (*i * 8) as usize, at | OFLAG_COPIED);
        }
        out.write_all_at(&l1, self.l1)?;
        let mut tables = vec![0u8; (self.l2_tables.len() as u64 * cs) as usize];
        let mut table_of = self.l2_tables.iter().enumerate().peekable();
        for (n, g) in guests.enumerate() {
            let i = g / l2_entries;
            while table_of.peek().is_some_and(|(_, (li, _))| *li < i) {
                table_of.next();
            }
            let (t, _) = table_of.peek().expect("an L2 table for every data cluster");
            let at = *t as u64 * cs + (g % l2_entries) * 8;
            put64(&mut tables, at as usize, (self.data + n as u64 * cs) | OFLAG_COPIED);
        }
        out.write_all_at(&tables, self.l2)?;
        // The header last: until it is there, the file is no qcow2.
        out.write_all_at(&head, 0)
    }
}
