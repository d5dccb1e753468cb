//! What the real-qemu-img tests of the decoder and the encoder share: the key, a disk of mixed
//! content, and running qemu-img and qemu-io.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nasbak_process::ExternalCommand;

pub const KEY: &str = "a-backup-key-of-at-least-32-characters!!";

pub fn qemu_img(args: &[&str]) -> Result<String, String> {
    ExternalCommand::new("qemu-img")
        .args(args)
        .timeout(std::time::Duration::from_secs(120))
        .run()
        .map(|o| o.stdout_text())
        .map_err(|e| format!("{e:?}"))
}

pub fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("key");
    fs::write(&path, KEY).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A raw disk of `size` bytes: pseudo-random clusters, text-like (compressible) clusters, zero
/// clusters and holes, a partial cluster at its end.
pub fn disk(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut bytes = vec![0u8; size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (n, cluster) in bytes.chunks_mut(64 << 10).enumerate() {
        match n % 7 {
            0 | 3 => cluster.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
            1 | 5 => {
                let line = format!("cluster {n}: the quick brown fox jumps over the lazy dog\n");
                cluster.iter_mut().zip(line.bytes().cycle()).for_each(|(b, c)| *b = c);
            }
            4 => cluster[100] = 1, // one byte: compresses, is not zero
            _ => {}
        }
    }
    fs::write(&path, &bytes).unwrap();
    path
}

/// `qemu-io` commands run on the image `opts` (image-opts), with the key file `key` as secret `k`.
pub fn qemu_io_opts(opts: &str, key: &Path, commands: &[&str]) {
    let secret = format!("secret,id=k,file={}", key.display());
    let mut args = vec!["--object", &secret, "--image-opts", opts];
    for c in commands {
        args.extend(["-c", c]);
    }
    ExternalCommand::new("qemu-io").args(&args).timeout(std::time::Duration::from_secs(60)).run().unwrap();
}
