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
        format!("unknown checksum algorithm {algorithm:?}; this nasbak knows blake3 and sha256"),
    )
}

/// The checksum of `path` with `algorithm` (`blake3` or `sha256`).
pub fn checksum_file(path: &Path, algorithm: &str) -> std::io::Result<String> {
    match algorithm {
        "blake3" => blake3_file(path),
        "sha256" => sha256_file(path),
        other => Err(unknown(other)),
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
}

impl Hasher {
    fn new(algorithm: &str) -> std::io::Result<Hasher> {
        match algorithm {
            "blake3" => Ok(Hasher::Blake3(Box::default())),
            "sha256" => Ok(Hasher::Sha256(Sha256::new())),
            other => Err(unknown(other)),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Blake3(h) => {
                h.update_rayon(data);
            }
            Hasher::Sha256(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
            Hasher::Sha256(h) => format!("{:x}", h.finalize()),
        }
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
    dst.sync_all()?;
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
        assert!(checksum_file(&p, "md5").unwrap_err().to_string().contains("blake3 and sha256"));
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
