//! Checksums of backup files, and the verified copy restore uses.
//!
//! New backups record BLAKE3 (hashed on every core: several times faster than SHA-256 with the
//! CPU's SHA extensions on the lab machine, which matters because the checksum is part of every
//! backup's time). Manifests that say `sha256` are verified with SHA-256.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The algorithm new backups record.
pub const CHECKSUM_ALGORITHM: &str = "blake3";

const CHUNK: usize = 2 << 20;

/// Reads `path` on a helper thread, 2 MiB at a time with up to three chunks in flight, and hands
/// each chunk to `consume` on this thread, so reading from the disk overlaps hashing and
/// writing. Memory stays bounded (no mmap: mapped file pages would count as this process's RSS).
/// `consume` returns false to stop early.
fn read_pipelined(path: &Path, mut consume: impl FnMut(&[u8]) -> std::io::Result<bool>) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(2);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..3 {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(move |scope| {
        // The channels live in this closure: when it returns (done, stopped or failed), they
        // close and the reader ends before the scope joins it.
        let (empty_tx, full_rx) = (empty_tx, full_rx);
        scope.spawn(move || {
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
                let last = filled == 0;
                if full_tx.send(Ok(buf)).is_err() || last {
                    return;
                }
            }
        });
        for chunk in full_rx {
            let chunk = chunk?;
            if chunk.is_empty() || !consume(&chunk)? {
                break;
            }
            let _ = empty_tx.send(chunk);
        }
        Ok(())
    })
}

/// The lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    read_pipelined(path, |chunk| {
        hasher.update(chunk);
        Ok(true)
    })?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The lowercase hex BLAKE3 of a file (each chunk hashed on every core).
pub fn blake3_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    read_pipelined(path, |chunk| {
        hasher.update_rayon(chunk);
        Ok(true)
    })?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn unknown(algorithm: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!(
            "unknown checksum algorithm {algorithm:?}; this nasbak knows blake3, sha256 and {SPLIT_PREFIX}OFFSET+LENGTH"
        ),
    )
}

/// The prefix of the checksum algorithm of an encrypted backup file: `blake3-split@A+L` is the
/// BLAKE3 of each of three parts of the file, `[0, A)`, `[A, A+L)` (its LUKS header: keyslots)
/// and `[A+L, end)`, written `H1:H2:H3`. Every byte is covered, as by `blake3`, and a key
/// rotation, which changes the header alone, hashes the header alone (2 MiB) instead of the
/// whole file. Each part is checked with stock tools (`dd ... | b3sum`).
pub const SPLIT_PREFIX: &str = "blake3-split@";

/// The split algorithm for a LUKS header of `len` bytes at `offset` (see [`SPLIT_PREFIX`]).
pub fn split_algorithm(offset: u64, len: u64) -> String {
    format!("{SPLIT_PREFIX}{offset}+{len}")
}

/// The header's offset and length a split algorithm names; `None` for another algorithm.
pub fn split_bounds(algorithm: &str) -> Option<(u64, u64)> {
    let (offset, len) = algorithm.strip_prefix(SPLIT_PREFIX)?.split_once('+')?;
    Some((offset.parse().ok()?, len.parse().ok()?))
}

/// The checksum algorithm for the backup file at `path`, stored as `layout`: split at its LUKS
/// header when it has one ([`SPLIT_PREFIX`]), else [`CHECKSUM_ALGORITHM`] (also when the header
/// cannot be read: the whole file is then hashed as one, which is as sound, only slower to
/// rotate).
pub fn checksum_algorithm_for(path: &Path, layout: nasbak_qemu_img::StoredLayout) -> String {
    match nasbak_qemu_img::luks::LuksFile::open(path, layout) {
        Ok(luks) if layout.needs_key() => {
            let (offset, len) = luks.region();
            split_algorithm(offset, len)
        }
        _ => CHECKSUM_ALGORITHM.to_owned(),
    }
}

/// The BLAKE3 (hex) of the `len` bytes of `path` at `offset` (fewer where the file ends).
pub fn blake3_region(path: &Path, offset: u64, len: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file.take(len), &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The checksum of `path` with `algorithm` (`blake3`, `sha256` or a split one, see
/// [`SPLIT_PREFIX`]).
pub fn checksum_file(path: &Path, algorithm: &str) -> std::io::Result<String> {
    match algorithm {
        "blake3" => blake3_file(path),
        "sha256" => sha256_file(path),
        other => hash_stream(path, other, &mut |_| true, |_| Ok(())).map(|(sum, _)| sum),
    }
}

/// Like [`checksum_file`], telling `progress` the bytes hashed so far after every 2 MiB;
/// `progress` returns false to stop (an `Interrupted` error).
pub fn checksum_file_observed(
    path: &Path,
    algorithm: &str,
    progress: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<String> {
    hash_stream(path, algorithm, progress, |_| Ok(())).map(|(sum, _)| sum)
}

/// Reads `path` once, hashing it with `algorithm` and handing each chunk to `also`; tells
/// `progress` the bytes read so far, which returns false to stop (an `Interrupted` error).
/// Returns the checksum and the length.
fn hash_stream(
    path: &Path,
    algorithm: &str,
    progress: &mut dyn FnMut(u64) -> bool,
    mut also: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<(String, u64)> {
    let mut hasher = Hasher::new(algorithm)?;
    let mut len = 0u64;
    let mut stopped = false;
    read_pipelined(path, |data| {
        hasher.update(data);
        also(data)?;
        len += data.len() as u64;
        stopped = !progress(len);
        Ok(!stopped)
    })?;
    if stopped {
        return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled"));
    }
    Ok((hasher.finish(), len))
}

enum Hasher {
    Blake3(Box<blake3::Hasher>),
    Sha256(Sha256),
    /// Three BLAKE3s, split at two offsets ([`SPLIT_PREFIX`]), and how far the data has come.
    Split {
        at: [u64; 2],
        parts: Box<[blake3::Hasher; 3]>,
        pos: u64,
    },
}

impl Hasher {
    fn new(algorithm: &str) -> std::io::Result<Hasher> {
        match algorithm {
            "blake3" => Ok(Hasher::Blake3(Box::default())),
            "sha256" => Ok(Hasher::Sha256(Sha256::new())),
            other => match split_bounds(other) {
                Some((offset, len)) => Ok(Hasher::Split { at: [offset, offset + len], parts: Box::default(), pos: 0 }),
                None => Err(unknown(other)),
            },
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        match self {
            Hasher::Blake3(h) => {
                h.update_rayon(data);
            }
            Hasher::Sha256(h) => h.update(data),
            Hasher::Split { at, parts, pos } => {
                while !data.is_empty() {
                    let part = at.iter().filter(|b| **b <= *pos).count();
                    let room = at.get(part).map_or(data.len() as u64, |b| b - *pos);
                    let n = room.min(data.len() as u64) as usize;
                    parts[part].update_rayon(&data[..n]);
                    (*pos, data) = (*pos + n as u64, &data[n..]);
                }
            }
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
            Hasher::Sha256(h) => format!("{:x}", h.finalize()),
            Hasher::Split { parts, .. } => {
                parts.iter().map(|h| h.finalize().to_hex().to_string()).collect::<Vec<_>>().join(":")
            }
        }
    }
}

/// A checksum computed over bytes as they arrive (an object streamed from an off-site target):
/// any algorithm [`checksum_file`] knows.
pub struct StreamChecksum(Hasher);

impl std::fmt::Debug for StreamChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamChecksum")
    }
}

impl StreamChecksum {
    /// A checksum with `algorithm` (`blake3`, `sha256` or a split one, see [`SPLIT_PREFIX`]).
    pub fn new(algorithm: &str) -> std::io::Result<Self> {
        Hasher::new(algorithm).map(StreamChecksum)
    }

    /// Hashes the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The checksum, lowercase hex (a split one as `H1:H2:H3`).
    pub fn finish(self) -> String {
        self.0.finish()
    }
}

/// Copies `source` to a new file `target` in one pass, hashing what it reads with `algorithm`,
/// leaving holes where the source has runs of zeros (64 KiB granularity), syncing the target.
/// Returns the checksum; the caller compares it before putting the target in place. `progress`
/// gets the bytes copied so far and returns false to stop (an `Interrupted` error).
pub fn copy_verified(
    source: &Path,
    target: &Path,
    algorithm: &str,
    progress: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<String> {
    copy_hashed(source, target, algorithm, progress, true)
}

/// [`copy_verified`], the target synced only when `sync` says so: a copy that is worked on and
/// removed before the page cache writes it back (a chain's incremental in a restore's
/// workspace) never costs the disk a write.
pub(crate) fn copy_hashed(
    source: &Path,
    target: &Path,
    algorithm: &str,
    progress: &mut dyn FnMut(u64) -> bool,
    sync: bool,
) -> std::io::Result<String> {
    const BLOCK: usize = 64 << 10;
    Hasher::new(algorithm)?; // an unknown algorithm before the target is created
    let mut dst = OpenOptions::new().write(true).create_new(true).open(target)?;
    let (sum, len) = hash_stream(source, algorithm, progress, |data| {
        for block in data.chunks(BLOCK) {
            if block.iter().all(|b| *b == 0) {
                dst.seek(SeekFrom::Current(block.len() as i64))?;
            } else {
                dst.write_all(block)?;
            }
        }
        Ok(())
    })?;
    dst.set_len(len)?;
    if sync {
        dst.sync_all()?;
    }
    if let Ok(meta) = fs::metadata(source) {
        let _ = fs::set_permissions(target, meta.permissions());
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(
            checksum_file(&p, "blake3").unwrap(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert!(checksum_file(&p, "md5").unwrap_err().to_string().contains("blake3, sha256"));
        let mut seen = 0;
        let observed = checksum_file_observed(&p, "blake3", &mut |n| {
            seen = n;
            true
        });
        assert_eq!((observed.unwrap(), seen), (checksum_file(&p, "blake3").unwrap(), 3));
        let e = checksum_file_observed(&p, "sha256", &mut |_| false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
    }

    #[test]
    fn a_split_checksum_is_the_blake3_of_each_part_wherever_the_reads_fall() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        // Boundaries inside and across the 2 MiB reads, and a file ending inside the header.
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(&p, &data).unwrap();
        let b3 = |d: &[u8]| blake3::hash(d).to_hex().to_string();
        for (offset, len) in [(0u64, 100u64), (262_144, 2_068_480), (2_097_151, 3), (4_999_000, 2_068_480)] {
            let algorithm = split_algorithm(offset, len);
            assert_eq!(split_bounds(&algorithm), Some((offset, len)));
            let (a, b) = (offset as usize, ((offset + len) as usize).min(data.len()));
            let expected = format!("{}:{}:{}", b3(&data[..a]), b3(&data[a..b]), b3(&data[b..]));
            assert_eq!(checksum_file(&p, &algorithm).unwrap(), expected, "{algorithm}");
            assert_eq!(blake3_region(&p, offset, len).unwrap(), b3(&data[a..b]));
            let observed = checksum_file_observed(&p, &algorithm, &mut |_| true).unwrap();
            assert_eq!(observed, expected);
        }
        assert_eq!(split_bounds("blake3"), None);
        assert_eq!(split_bounds("blake3-split@x+1"), None);
    }

    #[test]
    fn verified_copy_hashes_what_it_copies_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 20 << 20];
        for (i, b) in data.iter_mut().enumerate().skip(3 << 20).take(1 << 20) {
            *b = (i % 251) as u8;
        }
        data[(19 << 20) + 5] = 7;
        fs::write(&src, &data).unwrap();
        for algorithm in ["blake3", "sha256"] {
            let dst = dir.path().join(format!("dst-{algorithm}"));
            let mut seen = 0;
            let sum = copy_verified(&src, &dst, algorithm, &mut |n| {
                seen = n;
                true
            })
            .unwrap();
            assert_eq!(seen, 20 << 20);
            assert_eq!(sum, checksum_file(&src, algorithm).unwrap());
            assert_eq!(fs::read(&dst).unwrap(), data);
            use std::os::unix::fs::MetadataExt;
            assert!(fs::metadata(&dst).unwrap().blocks() * 512 < (4 << 20), "the zero runs are holes");
            // Never over an existing file.
            assert!(copy_verified(&src, &dst, algorithm, &mut |_| true).is_err());
            let stopped = dir.path().join(format!("stopped-{algorithm}"));
            let e = copy_verified(&src, &stopped, algorithm, &mut |_| false).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
        }
    }
}
