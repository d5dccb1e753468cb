//! The real qemu-img on backup files stored compressed, encrypted and both: written with the
//! key as a secret object, read back with it (alone and as a chain), refused without it, and no
//! sector of the guest's data in plaintext in an encrypted file.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nasbak_process::ExternalCommand;
use nasbak_qemu_img::{
    CheckVerdict, ConvertRequest, ImageFormat, ImageLocation, ImageTool, QemuImg, StoredFile, StoredImage,
    StoredLayout, TargetProtection,
};

const LAYOUTS: [StoredLayout; 3] = [StoredLayout::Qcow2, StoredLayout::Qcow2Luks, StoredLayout::Qcow2InLuks];

fn key(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, value).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A 64 MiB qcow2: 4 MiB of random data at 0, 8 MiB of text (compressible) at 16 MiB.
fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let random: Vec<u8> = (0..4u32 << 20)
        .scan(0x9e37_79b9_u32, |s, _| {
            *s ^= *s << 13;
            *s ^= *s >> 17;
            *s ^= *s << 5;
            Some((*s >> 24) as u8)
        })
        .collect();
    let raw = dir.join("src.raw");
    let mut bytes = random.clone();
    bytes.resize(16 << 20, 0);
    bytes.extend(b"the quick brown fox jumps over the lazy dog\n".iter().cycle().take(8 << 20));
    bytes.resize(64 << 20, 0);
    fs::write(&raw, &bytes).unwrap();
    let src = dir.join("src.qcow2");
    ExternalCommand::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&src).run().unwrap();
    (src, random)
}

fn protection(layout: StoredLayout, key: &Path) -> TargetProtection {
    TargetProtection::new(layout, true, layout.needs_key().then(|| key.to_owned()))
}

fn stored(chain: &[(&Path, StoredLayout)], key: &Path) -> ImageLocation {
    let chain: Vec<StoredFile> =
        chain.iter().map(|(p, layout)| StoredFile { path: p.to_path_buf(), layout: *layout }).collect();
    let needs = chain.iter().any(|f| f.layout.needs_key());
    ImageLocation::Stored(StoredImage { chain, key: needs.then(|| key.to_owned()) })
}

/// How many 512-byte sectors of `data` appear in the file at `path` at any 512-byte offset.
fn plaintext_sectors(path: &Path, data: &[u8]) -> usize {
    let wanted: HashSet<&[u8]> = data.chunks(512).collect();
    let file = fs::read(path).unwrap();
    file.chunks(512).filter(|c| wanted.contains(c)).count()
}

#[test]
fn each_layout_is_written_read_back_with_its_key_and_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let t = QemuImg::new(dir.path().join("runtime"));
    let (src, random) = source(dir.path());
    let k = key(dir.path(), "key", "correct horse battery staple");
    let wrong = key(dir.path(), "wrong", "not the key");
    let plain_size = {
        let dst = dir.path().join("plain.qcow2");
        t.convert(&ConvertRequest::new(src.clone(), dst.clone(), ImageFormat::Qcow2), Arc::new(|_| {})).unwrap();
        fs::metadata(&dst).unwrap().len()
    };
    for layout in LAYOUTS {
        let dst = dir.path().join(format!("{layout:?}.qcow2"));
        let mut r = ConvertRequest::new(src.clone(), dst.clone(), ImageFormat::Qcow2);
        r.protection = Some(protection(layout, &k));
        t.convert(&r, Arc::new(|_| {})).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        let opened = stored(&[(&dst, layout)], &k);
        assert!(t.compare(&ImageLocation::Path(src.clone()), &opened).unwrap(), "{layout:?}: same content");
        assert_eq!(t.check(&opened, &ImageFormat::Qcow2).unwrap().verdict, CheckVerdict::Clean, "{layout:?}");
        assert_eq!(t.info(&opened).unwrap()[0].virtual_size, 64 << 20, "{layout:?}");
        let on_disk = nix_allocated(&dst);
        if layout.needs_key() {
            assert_eq!(plaintext_sectors(&dst, &random), 0, "{layout:?}: no sector of the data in plaintext");
            let with_wrong = stored(&[(&dst, layout)], &wrong);
            assert!(t.compare(&ImageLocation::Path(src.clone()), &with_wrong).is_err(), "{layout:?}: wrong key");
        } else {
            assert!(plaintext_sectors(&dst, &random) > 0, "the check itself finds plaintext");
        }
        if layout != StoredLayout::Qcow2Luks {
            // 8 MiB of text compress to almost nothing: compressed files are well under the plain one.
            assert!(on_disk < plain_size - (6 << 20), "{layout:?}: {on_disk} bytes against {plain_size} plain");
        } else {
            assert!(on_disk < plain_size + (3 << 20), "{layout:?}: holes kept, {on_disk} against {plain_size}");
        }
    }
}

/// The bytes a file takes on disk (holes are free).
fn nix_allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_chain_of_protected_files_opens_with_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let t = QemuImg::new(dir.path().join("runtime"));
    let (src, _) = source(dir.path());
    let k = key(dir.path(), "key", "one key for the chain");
    for layout in LAYOUTS {
        let sub = dir.path().join(format!("{layout:?}"));
        fs::create_dir_all(sub.join("full")).unwrap();
        fs::create_dir_all(sub.join("inc")).unwrap();
        let full = sub.join("full/root.a.qcow2");
        let mut r = ConvertRequest::new(src.clone(), full.clone(), ImageFormat::Qcow2);
        r.protection = Some(protection(layout, &k));
        t.convert(&r, Arc::new(|_| {})).unwrap();
        // An incremental: created naming its parent, written through the chain as a backup job
        // would write it.
        let inc = sub.join("inc/root.a.qcow2");
        t.create_protected(&inc, 64 << 20, Some("../full/root.a.qcow2".into()), &protection(layout, &k)).unwrap();
        let chain = stored(&[(&inc, layout), (&full, layout)], &k);
        let ImageLocation::Stored(s) = &chain else { unreachable!() };
        let mut io = ExternalCommand::new("qemu-io").args(["-c", "write -P 0x42 1M 1M"]);
        if let Some(key) = &s.key {
            io = io.arg("--object").arg(format!("secret,id=nasbak-key,file={}", key.display()));
        }
        io.arg("--image-opts").arg(image_opts(&s.json(true))).run().unwrap();
        // The expected content: the source with that one change.
        let expected = sub.join("expected.qcow2");
        fs::copy(&src, &expected).unwrap();
        ExternalCommand::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x42 1M 1M"])
            .arg(&expected)
            .run()
            .unwrap();
        assert!(t.compare(&ImageLocation::Path(expected.clone()), &chain).unwrap(), "{layout:?}: the chain reads");
        assert!(!t.compare(&ImageLocation::Path(src.clone()), &chain).unwrap(), "{layout:?}: the change is there");
        // Re-pointing the top file's header needs its key when it is encrypted, and works; a
        // qcow2 inside a LUKS container names no backing file, and is never re-pointed.
        let repointed = t.set_backing(&stored(&[(&inc, layout)], &k), "../full/root.a.qcow2", &ImageFormat::Qcow2);
        assert_eq!(repointed.is_ok(), layout != StoredLayout::Qcow2InLuks, "{layout:?}: {repointed:?}");
        // Restored as a plain, self-contained qcow2.
        let restored = sub.join("restored.qcow2");
        t.convert(&ConvertRequest::new(chain.clone(), restored.clone(), ImageFormat::Qcow2), Arc::new(|_| {})).unwrap();
        assert!(t.compare(&ImageLocation::Path(expected), &ImageLocation::Path(restored)).unwrap(), "{layout:?}");
    }
}

/// A node tree as `--image-opts` (`a.b=c,...`).
fn image_opts(v: &serde_json::Value) -> String {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, v, out);
                }
            }
            serde_json::Value::String(s) => out.push(format!("{prefix}={}", s.replace(',', ",,"))),
            // No way to say null in this syntax: left out (the file it stands for names no
            // backing file anyway).
            serde_json::Value::Null => {}
            other => out.push(format!("{prefix}={other}")),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out.join(",")
}

#[test]
fn a_dirty_copy_writes_each_layout_and_its_chain_reads_the_new_point() {
    use nasbak_qemu_img::DirtyCopy;
    let dir = tempfile::tempdir().unwrap();
    let t = QemuImg::new(dir.path().join("runtime"));
    let k = key(dir.path(), "key", "the key of the repository, long enough");
    for layout in LAYOUTS {
        let sub = dir.path().join(format!("{layout:?}"));
        fs::create_dir_all(sub.join("full")).unwrap();
        fs::create_dir_all(sub.join("inc")).unwrap();
        let (src, _) = source(&sub);
        let full = sub.join("full/root.a.qcow2");
        let mut r = ConvertRequest::new(src.clone(), full.clone(), ImageFormat::Qcow2);
        r.protection = Some(protection(layout, &k));
        t.convert(&r, Arc::new(|_| {})).unwrap();
        // The VM writes after the full: data, and zeroes over data the full holds.
        t.add_bitmap(&src, "b1").unwrap();
        ExternalCommand::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x42 1M 1M", "-c", "write -z 2M 1M"])
            .arg(&src)
            .run()
            .unwrap();
        let inc = sub.join("inc/root.a.qcow2");
        let copy = DirtyCopy {
            source: src.clone(),
            bitmap: "b1".into(),
            target: inc.clone(),
            cancel: Default::default(),
            protection: Some(protection(layout, &k)),
        };
        t.copy_dirty(&copy, Arc::new(|_| {})).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        if layout != StoredLayout::Qcow2InLuks {
            t.set_backing(&stored(&[(&inc, layout)], &k), "../full/root.a.qcow2", &ImageFormat::Qcow2).unwrap();
        }
        let chain = stored(&[(&inc, layout), (&full, layout)], &k);
        t.remove_bitmap(&src, "b1").unwrap();
        assert!(
            t.compare(&ImageLocation::Path(src.clone()), &chain).unwrap(),
            "{layout:?}: the chain is the new point"
        );
        assert!(nix_allocated(&inc) < 8 << 20, "{layout:?}: the incremental holds the change only");
    }
}
