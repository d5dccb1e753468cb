//! nasbak's own decoder against the real qemu-img: files qemu-img writes compressed (zstd),
//! LUKS-encrypted and compressed inside a LUKS container, as nasbak stores backups, decoded
//! into plain qcow2 files that `qemu-img compare` finds equal to the source disk and `qemu-img
//! check` finds clean; every byte of the stored file reaches the checksum sink, in order; and
//! what it does not decode (a backing file, zlib clusters, a wrong key, a cut file) it says
//! before writing, or fails without calling the result good.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nasbak_process::ExternalCommand;
use nasbak_qemu_img::decode::{DecodeError, Decoder};
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageTool, QemuImg, StoredLayout, TargetProtection};
use sha2::{Digest, Sha256};

const KEY: &str = "a-backup-key-of-at-least-32-characters!!";

fn qemu_img(args: &[&str]) -> Result<String, String> {
    ExternalCommand::new("qemu-img")
        .args(args)
        .timeout(std::time::Duration::from_secs(120))
        .run()
        .map(|o| o.stdout_text())
        .map_err(|e| format!("{e:?}"))
}

fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("key");
    fs::write(&path, KEY).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A raw disk of `size` bytes: pseudo-random clusters, text-like (compressible) clusters, zero
/// clusters and holes, a partial cluster at its end.
fn disk(dir: &Path, size: u64) -> PathBuf {
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

/// `source` written by qemu-img (through nasbak's own convert) as `layout`.
fn stored(dir: &Path, source: &Path, name: &str, layout: StoredLayout, compressed: bool, key: &Path) -> PathBuf {
    let target = dir.join(name);
    let mut r = ConvertRequest::new(source.to_owned(), target.clone(), ImageFormat::Qcow2);
    r.source_format = Some(ImageFormat::Raw);
    r.protection = Some(TargetProtection::new(layout, compressed, Some(key.to_owned())).clone());
    if layout == StoredLayout::Qcow2 {
        r.protection = Some(TargetProtection::new(layout, compressed, None));
    }
    QemuImg::new(dir).convert(&r, Arc::new(|_| {})).unwrap();
    target
}

/// Decodes `path` into `out`; returns the SHA-256 of what the sink got, and the result.
fn decode(path: &Path, layout: StoredLayout, key: Option<&[u8]>, out: &Path) -> (String, Result<u64, DecodeError>) {
    let mut sum = Sha256::new();
    let mut sink = |b: &[u8]| sum.update(b);
    let result =
        Decoder::open(path, layout, key).and_then(|d| d.write_qcow2(out, &mut sink, &mut |_| true)).map(|d| d.read);
    (format!("{:x}", sum.finalize()), result)
}

fn sha256_file(path: &Path) -> String {
    format!("{:x}", Sha256::digest(fs::read(path).unwrap()))
}

#[test]
fn compressed_encrypted_and_both_decode_to_plain_qcow2_files_equal_to_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    // Not a whole number of clusters, and more than one read chunk (8 MiB) and one L2 table of
    // 512-byte clusters' worth.
    let size = 21 * (1 << 20) + 12345 * 512;
    let raw = disk(dir.path(), size);
    for (name, layout, compressed) in [
        ("zstd.qcow2", StoredLayout::Qcow2, true),
        ("plain.qcow2", StoredLayout::Qcow2, false),
        ("luks.qcow2", StoredLayout::Qcow2Luks, false),
        ("zstd-in-luks.qcow2", StoredLayout::Qcow2InLuks, true),
    ] {
        let file = stored(dir.path(), &raw, name, layout, compressed, &key);
        let out = dir.path().join(format!("{name}.restored"));
        let passphrase = layout.needs_key().then_some(KEY.as_bytes());
        let (sum, result) = decode(&file, layout, passphrase, &out);
        let read = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(read, fs::metadata(&file).unwrap().len(), "{name}: the whole file is read");
        assert_eq!(sum, sha256_file(&file), "{name}: the sink got every byte, in order");
        let out_s = out.to_str().unwrap();
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", raw.to_str().unwrap(), out_s])
            .unwrap_or_else(|e| panic!("{name}: the decoded file differs from the disk: {e}"));
        let check = qemu_img(&["check", "--output=json", out_s]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let check: serde_json::Value = serde_json::from_str(&check).unwrap_or_else(|e| panic!("{name}: {e}: {check}"));
        assert_eq!(check["check-errors"], 0, "{name}: {check}");
        assert!(check.get("leaks").is_none() && check.get("corruptions").is_none(), "{name}: {check}");
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", out_s]).unwrap()).unwrap();
        assert_eq!(info["virtual-size"], size, "{name}");
        assert!(info["format-specific"]["data"].get("encrypt").is_none(), "{name}: written plain");
    }
}

#[test]
fn small_clusters_and_many_l2_tables_decode_too() {
    let dir = tempfile::tempdir().unwrap();
    let raw = disk(dir.path(), 9 << 20);
    let file = dir.path().join("small.qcow2");
    let (r, f) = (raw.to_str().unwrap(), file.to_str().unwrap());
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd", r, f])
        .unwrap();
    let out = dir.path().join("out.qcow2");
    let (_, result) = decode(&file, StoredLayout::Qcow2, None, &out);
    result.unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", r, out.to_str().unwrap()]).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", out.to_str().unwrap()]).unwrap()).unwrap();
    assert_eq!(info["cluster-size"], 4096);
}

#[test]
fn what_it_does_not_decode_it_says_before_writing_and_a_cut_file_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let raw = disk(dir.path(), 4 << 20);
    let out = dir.path().join("out.qcow2");
    let unsupported = |path: &Path, layout, key: Option<&[u8]>| match Decoder::open(path, layout, key) {
        Err(DecodeError::Unsupported { detail, .. }) => detail,
        other => panic!("{}: {other:?}", path.display()),
    };
    // zlib clusters (qemu-img's default compression).
    let zlib = dir.path().join("zlib.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), zlib.to_str().unwrap()]).unwrap();
    assert!(unsupported(&zlib, StoredLayout::Qcow2, None).contains("zlib"));
    // A backing file.
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-F", "qcow2", "-b", zlib.to_str().unwrap(), top.to_str().unwrap()]).unwrap();
    assert!(unsupported(&top, StoredLayout::Qcow2, None).contains("backing file"));
    // A wrong key, and none.
    let luks = stored(dir.path(), &raw, "luks.qcow2", StoredLayout::Qcow2Luks, false, &key);
    assert!(matches!(
        Decoder::open(&luks, StoredLayout::Qcow2Luks, Some(b"not-the-key-but-as-long-as-one-is-1234")),
        Err(DecodeError::WrongKey { .. })
    ));
    assert!(unsupported(&luks, StoredLayout::Qcow2Luks, None).contains("no key"));
    assert!(!out.exists(), "nothing written");
    // A file cut short after its tables were read: damaged, never a result that looks whole.
    let zstd = stored(dir.path(), &raw, "zstd.qcow2", StoredLayout::Qcow2, true, &key);
    let decoder = Decoder::open(&zstd, StoredLayout::Qcow2, None).unwrap();
    let len = fs::metadata(&zstd).unwrap().len();
    fs::OpenOptions::new().write(true).open(&zstd).unwrap().set_len(len / 2).unwrap();
    match decoder.write_qcow2(&out, &mut |_| {}, &mut |_| true) {
        Err(DecodeError::Damaged { detail, .. }) => assert!(detail.contains("ends at"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // Stopped by its caller.
    let plain = stored(dir.path(), &raw, "again.qcow2", StoredLayout::Qcow2, true, &key);
    let out2 = dir.path().join("out2.qcow2");
    let stopped =
        Decoder::open(&plain, StoredLayout::Qcow2, None).unwrap().write_qcow2(&out2, &mut |_| {}, &mut |_| false);
    assert!(matches!(stopped, Err(DecodeError::Stopped { .. })), "{stopped:?}");
}
