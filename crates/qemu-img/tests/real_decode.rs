//! nasbak's own decoder against the real qemu-img: files qemu-img writes compressed (zstd),
//! LUKS-encrypted and compressed inside a LUKS container, as nasbak stores backups, decoded
//! into plain qcow2 files that `qemu-img compare` finds equal to the source disk and `qemu-img
//! check` finds clean; every byte of the stored file reaches the checksum sink, in order; and
//! what it does not decode (a backing file, zlib clusters, a wrong key, a cut file) it says
//! before writing, or fails without calling the result good.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nasbak_process::ExternalCommand;
use nasbak_qemu_img::decode::{DecodeError, Decoder};
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageTool, QemuImg, StoredLayout, TargetProtection};
use sha2::{Digest, Sha256};

mod common;
use common::{KEY, disk, key_file, qemu_img, qemu_io_opts};

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
    let mut sink = |_: usize, b: &[u8]| sum.update(b);
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
    match decoder.write_qcow2(&out, &mut |_, _| {}, &mut |_| true) {
        Err(DecodeError::Damaged { detail, .. }) => assert!(detail.contains("ends at"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // Stopped by its caller.
    let plain = stored(dir.path(), &raw, "again.qcow2", StoredLayout::Qcow2, true, &key);
    let out2 = dir.path().join("out2.qcow2");
    let stopped =
        Decoder::open(&plain, StoredLayout::Qcow2, None).unwrap().write_qcow2(&out2, &mut |_, _| {}, &mut |_| false);
    assert!(matches!(stopped, Err(DecodeError::Stopped { .. })), "{stopped:?}");
}

/// The image-opts of the qcow2 `top` over `depth` files, every one opened with the secret `k`
/// when `encrypted`.
fn chain_opts(top: &Path, depth: usize, encrypted: bool) -> String {
    let mut opts = format!("driver=qcow2,file.filename={}", top.display());
    if encrypted {
        for d in 0..=depth {
            opts.push_str(&format!(",{}encrypt.key-secret=k", "backing.".repeat(d)));
        }
    }
    opts
}

/// `qemu-io` commands run on `top` (a qcow2 over `depth` files), opened with the key file `key`
/// when `encrypted`.
fn qemu_io(top: &Path, depth: usize, encrypted: bool, key: &Path, commands: &[&str]) {
    qemu_io_opts(&chain_opts(top, depth, encrypted), key, commands);
}

#[test]
fn a_chain_decodes_each_cluster_from_its_topmost_file_zeros_included() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let size = 12u64 << 20;
    let raw = disk(dir.path(), size);
    for (name, layout, compressed) in [("zstd", StoredLayout::Qcow2, true), ("luks", StoredLayout::Qcow2Luks, false)] {
        let encrypted = layout == StoredLayout::Qcow2Luks;
        let base = stored(dir.path(), &raw, &format!("{name}-base.qcow2"), layout, compressed, &key);
        // Two incrementals over it, as nasbak's are: qcow2 files (encrypted ones with their own
        // LUKS header) naming the file below.
        let mut chain = vec![base.clone()];
        for (n, commands) in [
            &["write -P 0x55 1M 64k", "write -z 3M 192k", "write -P 0x66 11M 1M"][..],
            &["write -P 0x77 1M 32k", "write -P 0x88 3M 64k", "write -z 11M 64k"][..],
        ]
        .iter()
        .enumerate()
        {
            let below = chain.last().unwrap().clone();
            let top = dir.path().join(format!("{name}-inc{n}.qcow2"));
            // An encrypted one's header made by nasbak (QEMU times its PBKDF, which fails on a
            // loaded machine), as nasbak makes its incrementals' files.
            if encrypted {
                nasbak_qemu_img::luks::create_encrypted_qcow2(
                    &top,
                    size,
                    below.to_str().map(|b| (b, &nasbak_qemu_img::ImageFormat::Qcow2)),
                    KEY.as_bytes(),
                )
                .unwrap();
            } else {
                qemu_img(&[
                    "create",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    below.to_str().unwrap(),
                    top.to_str().unwrap(),
                ])
                .unwrap();
            }
            qemu_io(&top, n + 1, encrypted, &key, commands);
            chain.push(top);
        }
        // qemu-img's reading of the chain is the reference.
        let top = chain.last().unwrap();
        let expected = dir.path().join(format!("{name}-expected.raw"));
        let secret = format!("secret,id=k,file={}", key.display());
        let opts = chain_opts(top, 2, encrypted);
        qemu_img(&["convert", "--object", &secret, "--image-opts", &opts, "-O", "raw", expected.to_str().unwrap()])
            .unwrap();
        let files: Vec<(PathBuf, StoredLayout)> = chain.iter().rev().map(|p| (p.clone(), layout)).collect();
        let decoder = Decoder::open_chain(&files, encrypted.then_some(KEY.as_bytes())).unwrap();
        assert_eq!(decoder.files(), 3);
        let out = dir.path().join(format!("{name}-chain.qcow2"));
        let mut sums: Vec<Sha256> = vec![Sha256::new(); 3];
        let done = decoder.write_qcow2(&out, &mut |i, b| sums[i].update(b), &mut |_| true).unwrap();
        for (i, (path, _)) in files.iter().enumerate() {
            assert_eq!(format!("{:x}", sums[i].clone().finalize()), sha256_file(path), "{name}: file {i} hashed whole");
        }
        assert_eq!(done.read, files.iter().map(|(p, _)| fs::metadata(p).unwrap().len()).sum::<u64>());
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", expected.to_str().unwrap(), out.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{name}: the decoded chain differs from qemu-img's reading: {e}"));
        qemu_img(&["check", out.to_str().unwrap()]).unwrap();
        // Given alone, a file with a backing file is left to qemu-img.
        assert!(matches!(
            Decoder::open(top, layout, encrypted.then_some(KEY.as_bytes())),
            Err(DecodeError::Unsupported { .. })
        ));
    }
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = ExternalCommand::new("losetup").args(["-d", &self.0]).run();
    }
}

#[test]
fn written_in_place_a_raw_file_and_a_block_device_hold_the_disk_and_nothing_of_before() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let size = 10u64 * (1 << 20) + 4096; // a partial last cluster
    let raw = disk(dir.path(), size);
    let want = fs::read(&raw).unwrap();
    for (name, layout, compressed) in [
        ("zstd", StoredLayout::Qcow2, true),
        ("luks", StoredLayout::Qcow2Luks, false),
        ("both", StoredLayout::Qcow2InLuks, true),
    ] {
        let file = stored(dir.path(), &raw, &format!("{name}.qcow2"), layout, compressed, &key);
        let passphrase = layout.needs_key().then_some(KEY.as_bytes());
        let decoder = Decoder::open(&file, layout, passphrase).unwrap();
        // A raw file holding other data, and longer than the disk (grown since): the disk's
        // bytes replace its first part, the rest stays.
        let target = dir.path().join(format!("{name}-target.raw"));
        fs::write(&target, vec![0xaau8; (size + (3 << 20)) as usize]).unwrap();
        let mut sum = Sha256::new();
        decoder.write_raw(&target, &mut |_, b| sum.update(b), &mut |_| true).unwrap();
        assert_eq!(format!("{:x}", sum.finalize()), sha256_file(&file), "{name}");
        let got = fs::read(&target).unwrap();
        assert!(got[..size as usize] == want[..], "{name}: the disk in place");
        assert!(got[size as usize..].iter().all(|b| *b == 0xaa), "{name}: nothing past the disk changed");
        // A shorter file is extended to the disk's size.
        let short = dir.path().join(format!("{name}-short.raw"));
        fs::write(&short, vec![0x55u8; 1 << 20]).unwrap();
        decoder.write_raw(&short, &mut |_, _| {}, &mut |_| true).unwrap();
        assert!(fs::read(&short).unwrap() == want, "{name}: a short file");
        // A block device (a loop device over a file of old data).
        let backing = dir.path().join(format!("{name}-device"));
        fs::write(&backing, vec![0x77u8; (size + (1 << 20)) as usize]).unwrap();
        let device = ExternalCommand::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .run()
            .unwrap()
            .stdout_text()
            .trim()
            .to_owned();
        let device = Loop(device);
        decoder.write_raw(Path::new(&device.0), &mut |_, _| {}, &mut |_| true).unwrap();
        drop(device);
        let got = fs::read(&backing).unwrap();
        assert!(got[..size as usize] == want[..], "{name}: the disk on the device");
        assert!(got[size as usize..].iter().all(|b| *b == 0x77), "{name}: nothing past the disk on the device");
    }
    // A device smaller than the disk: refused, nothing written.
    let file = stored(dir.path(), &raw, "small.qcow2", StoredLayout::Qcow2, true, &key);
    let backing = dir.path().join("small-device");
    fs::write(&backing, vec![0x77u8; 4 << 20]).unwrap();
    let device = ExternalCommand::new("losetup").args(["-f", "--show"]).arg(&backing).run().unwrap();
    let device = Loop(device.stdout_text().trim().to_owned());
    let refused = Decoder::open(&file, StoredLayout::Qcow2, None).unwrap().write_raw(
        Path::new(&device.0),
        &mut |_, _| {},
        &mut |_| true,
    );
    drop(device);
    assert!(matches!(refused, Err(DecodeError::Io { .. })), "{refused:?}");
    assert!(fs::read(&backing).unwrap().iter().all(|b| *b == 0x77), "nothing written");
}
