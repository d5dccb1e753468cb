//! The in-process metadata check against the real `qemu-img check`: on files qemu-img and
//! qemu-io write (plain, zstd, zlib, with a backing file, partly overwritten) and nasbak's
//! encoder writes (zstd), and on the same files damaged in each way the check looks for, it counts the
//! corruptions and leaks qemu-img counts. `QemuImg::check` answers a clean file itself and
//! leaves every other verdict to qemu-img.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nasbak_process::ExternalCommand;
use nasbak_qemu_img::encode::{EncodeTarget, Encoder};
use nasbak_qemu_img::metacheck::{self, MetaCheck};
use nasbak_qemu_img::{CheckVerdict, ImageFormat, ImageLocation, ImageTool, QemuImg, StoredLayout};

mod common;
use common::{disk, qemu_img};

/// qemu-img's own count of `path`'s corruptions and leaks.
fn qemu_img_check(path: &Path) -> MetaCheck {
    let out = ExternalCommand::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .timeout(std::time::Duration::from_secs(60))
        .run_unchecked()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap_or_else(|e| {
        panic!("{}: {e}: {} {}", path.display(), out.stdout_text(), out.stderr_text());
    });
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    MetaCheck { corruptions: n("corruptions"), leaks: n("leaks") }
}

fn be64_at(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn put64(path: &Path, at: u64, v: u64) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(&v.to_be_bytes(), at).unwrap();
}

fn put16(path: &Path, at: u64, v: u16) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(&v.to_be_bytes(), at).unwrap();
}

/// Where things are in a qcow2 with 64 KiB clusters: the first L2 table, its first allocated
/// entry's place and value, and the first refcount block.
struct Places {
    l1: u64,
    l2: u64,
    entry_at: u64,
    entry: u64,
    refblock: u64,
}

fn places(path: &Path) -> Places {
    let l1 = be64_at(path, 40);
    let l2 = be64_at(path, l1) & 0x00ff_ffff_ffff_fe00;
    let entry_at = (0..8192).map(|i| l2 + i * 8).find(|at| be64_at(path, *at) & 0x00ff_ffff_ffff_fe00 != 0).unwrap();
    let refblock = be64_at(path, be64_at(path, 48)) & !0x1ff;
    Places { l1, l2, entry_at, entry: be64_at(path, entry_at), refblock }
}

/// A way to damage a file.
type Damage<'a> = Box<dyn Fn(&Path) + 'a>;

/// The files to check, each fresh: (name, path).
fn files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let raw = disk(dir, 24 << 20);
    let raw = raw.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let mut made = |name: &'static str, args: &[&str]| {
        let path = dir.join(format!("{name}.qcow2"));
        let _ = fs::remove_file(&path);
        let mut all: Vec<&str> = args.to_vec();
        let p = path.to_string_lossy().into_owned();
        all.push(&raw);
        all.push(&p);
        qemu_img(&all).unwrap();
        out.push((name, path));
    };
    made("plain", &["convert", "-f", "raw", "-O", "qcow2"]);
    made("zstd", &["convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd"]);
    made("zlib", &["convert", "-f", "raw", "-O", "qcow2", "-c"]);
    // nasbak's encoder: the header written last, compressed clusters packed.
    let encoded = dir.join("encoded.qcow2");
    let target =
        EncodeTarget { layout: StoredLayout::Qcow2, compress: true, size: 24 << 20, backing: None, over_parent: false };
    let mut e = Encoder::create(&encoded, target, None).unwrap();
    e.put(0, fs::read(dir.join("disk.raw")).unwrap()).unwrap();
    e.finish().unwrap();
    out.push(("encoded", encoded));
    // An overlay with some clusters of its own, as an incremental is.
    let top = dir.join("top.qcow2");
    let _ = fs::remove_file(&top);
    qemu_img(&["create", "-f", "qcow2", "-F", "qcow2", "-b", "plain.qcow2", &top.to_string_lossy()]).unwrap();
    ExternalCommand::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -z 8M 1M", "-c", "write -P 7 20M 64k"])
        .arg(&top)
        .timeout(std::time::Duration::from_secs(60))
        .run()
        .unwrap();
    out.push(("top", top));
    out
}

#[test]
fn clean_files_are_clean_and_each_damage_is_counted_as_qemu_img_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let tool = QemuImg::new(dir.path());
    for (name, path) in files(dir.path()) {
        let ours = metacheck::check(&path).unwrap().unwrap_or_else(|| panic!("{name}: checked here"));
        assert!(ours.clean(), "{name}: {ours:?}");
        assert_eq!(ours, qemu_img_check(&path), "{name}");
        let report = tool.check(&ImageLocation::Path(path.clone()), &ImageFormat::Qcow2).unwrap();
        assert_eq!(report.verdict, CheckVerdict::Clean, "{name}");
        let clean = fs::read(&path).unwrap();
        let p = places(&path);
        let compressed = p.entry & (1 << 62) != 0;
        let mut damages: Vec<(&str, Damage)> = vec![
            // A data cluster past the end of the file.
            (
                "beyond the end",
                Box::new(|f: &Path| put64(f, p.entry_at, (p.entry & 0xff00_0000_0000_01ff) | (1 << 40))),
            ),
            // An unused cluster counted as used: a leak.
            (
                "leaked cluster",
                Box::new(|f: &Path| {
                    let len = fs::metadata(f).unwrap().len();
                    fs::OpenOptions::new().write(true).open(f).unwrap().set_len(len + (64 << 10)).unwrap();
                    put16(f, p.refblock + (len >> 16) * 2, 1);
                }),
            ),
            // The L2 table's refcount 0: used but not counted.
            ("refcount too low", Box::new(|f: &Path| put16(f, p.refblock + (p.l2 >> 16) * 2, 0))),
            // Its refcount 2: the "copied" flag then lies as well.
            ("refcount too high", Box::new(|f: &Path| put16(f, p.refblock + (p.l2 >> 16) * 2, 2))),
            // The L1 entry without its "copied" flag.
            ("copied flag", Box::new(|f: &Path| put64(f, p.l1, be64_at(f, p.l1) & !(1 << 63)))),
            // Two guest clusters on one host cluster.
            ("shared cluster", Box::new(|f: &Path| put64(f, p.entry_at + 8, p.entry))),
        ];
        if !compressed {
            damages.push(("misaligned", Box::new(|f: &Path| put64(f, p.entry_at, p.entry + 512))));
        }
        for (damage, apply) in damages {
            fs::write(&path, &clean).unwrap();
            apply(&path);
            let want = qemu_img_check(&path);
            let ours = metacheck::check(&path).unwrap().unwrap_or_else(|| panic!("{name} {damage}: checked here"));
            assert!(!want.clean(), "{name} {damage}: qemu-img finds it: {want:?}");
            assert_eq!(ours, want, "{name} {damage}");
            // Not clean: qemu-img says what it is, as before.
            let report = tool.check(&ImageLocation::Path(path.clone()), &ImageFormat::Qcow2).unwrap();
            let verdict = if want.corruptions > 0 { CheckVerdict::Corrupt } else { CheckVerdict::Leaks };
            assert_eq!(report.verdict, verdict, "{name} {damage}: {report:?}");
        }
        fs::write(&path, &clean).unwrap();
    }
}

#[test]
fn what_it_does_not_count_is_left_to_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let raw = disk(dir.path(), 4 << 20);
    let path = dir.path().join("bitmaps.qcow2");
    let p = path.to_string_lossy().into_owned();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &raw.to_string_lossy(), &p]).unwrap();
    qemu_img(&["bitmap", "--add", &p, "b0"]).unwrap();
    assert_eq!(metacheck::check(&path).unwrap(), None, "persistent bitmaps");
    let snap = dir.path().join("snap.qcow2");
    let s = snap.to_string_lossy().into_owned();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &raw.to_string_lossy(), &s]).unwrap();
    qemu_img(&["snapshot", "-c", "one", &s]).unwrap();
    assert_eq!(metacheck::check(&snap).unwrap(), None, "an internal snapshot");
    // Encrypted: qemu-img opens it with its key only.
    let luks = dir.path().join("luks.qcow2");
    let target = EncodeTarget {
        layout: StoredLayout::Qcow2Luks,
        compress: false,
        size: 4 << 20,
        backing: None,
        over_parent: false,
    };
    let mut e = Encoder::create(&luks, target, Some(common::KEY.as_bytes())).unwrap();
    e.put(0, fs::read(&raw).unwrap()).unwrap();
    e.finish().unwrap();
    assert_eq!(metacheck::check(&luks).unwrap(), None, "an encrypted file");
    let v2 = dir.path().join("v2.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "compat=0.10", &v2.to_string_lossy(), "1M"]).unwrap();
    assert_eq!(metacheck::check(&v2).unwrap(), None, "qcow2 version 2");
    // More clusters than it keeps counts for (4 Mi): 512-byte clusters in a 3 GiB file.
    let small = dir.path().join("small-clusters.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "cluster_size=512", &small.to_string_lossy(), "1M"]).unwrap();
    assert!(metacheck::check(&small).unwrap().is_some_and(|c| c.clean()));
    OpenOptions::new().write(true).open(&small).unwrap().set_len(3 << 30).unwrap();
    assert_eq!(metacheck::check(&small).unwrap(), None, "6 Mi clusters");
    // Not a qcow2 at all.
    assert_eq!(metacheck::check(&raw).unwrap(), None);
    // A file whose backing file is gone is qemu-img's to refuse.
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "gone.qcow2", &top.to_string_lossy(), "4M"])
        .unwrap();
    assert!(metacheck::check(&top).unwrap().is_some_and(|c| c.clean()));
    assert_eq!(metacheck::backing_of(&top).unwrap(), Some(dir.path().join("gone.qcow2")));
    let tool = QemuImg::new(dir.path());
    let report = tool.check(&ImageLocation::Path(top), &ImageFormat::Qcow2).unwrap();
    assert_eq!(report.verdict, CheckVerdict::Incomplete, "qemu-img cannot open it: {report:?}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// A damaged file never makes the check panic or run away: any bytes of its metadata
    /// changed, it answers (counts, not checked here, or an error reading).
    #[test]
    fn any_damage_to_the_metadata_is_answered(changes in proptest::collection::vec((0usize..4, 0usize..4096, proptest::prelude::any::<u8>()), 1..12)) {
        use std::sync::OnceLock;
        static CLEAN: OnceLock<(tempfile::TempDir, Vec<u8>)> = OnceLock::new();
        let (dir, clean) = CLEAN.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = files(dir.path()).into_iter().find(|(n, _)| *n == "top").unwrap().1;
            let bytes = fs::read(path).unwrap();
            (dir, bytes)
        });
        // The header, the L1 table, the first L2 table and the refcount block.
        let p = places(&dir.path().join("top.qcow2"));
        let regions = [0, p.l1, p.l2, p.refblock];
        let mut bytes = clean.clone();
        for (region, at, value) in changes {
            let i = regions[region] as usize + at;
            if i < bytes.len() {
                bytes[i] = value;
            }
        }
        let damaged = dir.path().join(format!("damaged-{:?}.qcow2", std::thread::current().id()));
        fs::write(&damaged, &bytes).unwrap();
        let _ = metacheck::check(&damaged);
        let _ = metacheck::backing_of(&damaged);
    }
}
