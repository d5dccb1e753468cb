//! nasbak's own encoder and NBD client against the real qemu-nbd and qemu-img: a disk exported
//! by qemu-nbd, read through its block status (and a dirty bitmap for an incremental), written
//! zstd-compressed, LUKS-encrypted and compressed inside a LUKS container, which stock qemu-img
//! opens with the key, finds clean (`check`) and equal to the disk (`compare`), chains included;
//! a stopped copy leaves no file that looks like a qcow2; the decoder reads back what the
//! encoder wrote; and an encoded file's key rotates in place as `key rotate` does it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nasbak_qemu_img::decode::Decoder;
use nasbak_qemu_img::encode::{EncodeError, EncodeTarget, Encoder, Plan, copy_from_nbd};
use nasbak_qemu_img::nbd::{BASE_ALLOCATION, NbdClient};
use nasbak_qemu_img::{StoredFile, StoredImage, StoredLayout};

mod common;
use common::{KEY, disk, key_file, qemu_img, qemu_io_opts};

const LAYOUTS: [(&str, StoredLayout, bool); 3] = [
    ("zstd", StoredLayout::Qcow2, true),
    ("luks", StoredLayout::Qcow2Luks, false),
    ("both", StoredLayout::Qcow2InLuks, true),
];

/// qemu-nbd serving `image` read-only on a socket of its own (with `bitmap` exported when
/// given), killed on drop.
struct Served {
    child: Child,
    socket: PathBuf,
}

impl Served {
    fn start(image: &Path, format: &str, bitmap: Option<&str>) -> Served {
        let socket = image.with_extension("sock");
        let _ = fs::remove_file(&socket);
        let mut command = Command::new("qemu-nbd");
        command.args(["-r", "-t", "-x", "disk", "-f", format, "-k"]).arg(&socket);
        if let Some(b) = bitmap {
            command.args(["-B", b]);
        }
        let child = command.arg(image).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(20), "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Served { child, socket }
    }

    fn connect(&self, contexts: &[&str]) -> NbdClient {
        NbdClient::connect(&self.socket, "disk", contexts, Duration::from_secs(30)).unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn target(layout: StoredLayout, compress: bool, size: u64, backing: Option<&Path>) -> EncodeTarget {
    EncodeTarget {
        layout,
        compress,
        size,
        // A file in a LUKS container cannot name its parent (QEMU would open it as a plain
        // qcow2): its chain is given file by file, as nasbak opens every chain.
        backing: backing
            .filter(|_| layout != StoredLayout::Qcow2InLuks)
            .map(|b| b.file_name().unwrap().to_string_lossy().into_owned()),
        over_parent: backing.is_some(),
    }
}

/// `qemu-img compare` of `reference` (a qcow2) with the stored chain `files` (top first).
fn compare(reference: &Path, files: &[PathBuf], layout: StoredLayout, key: &Path) -> Result<String, String> {
    let image = StoredImage {
        chain: files.iter().map(|p| StoredFile { path: p.clone(), layout }).collect(),
        key: Some(key.to_owned()),
    };
    let secret = format!("secret,id=nasbak-key,file={}", key.display());
    qemu_img(&["compare", "--object", &secret, "-f", "qcow2", reference.to_str().unwrap(), &image.filename(true)])
}

/// `qemu-img check` of the top file of the stored chain `files` (top first), its JSON.
fn check(files: &[PathBuf], layout: StoredLayout, key: &Path) -> serde_json::Value {
    let image = StoredImage {
        chain: files.iter().map(|p| StoredFile { path: p.clone(), layout }).collect(),
        key: Some(key.to_owned()),
    };
    let secret = format!("secret,id=nasbak-key,file={}", key.display());
    let out = qemu_img(&["check", "--output=json", "--object", &secret, &image.filename(true)])
        .unwrap_or_else(|e| panic!("{}: {e}", files[0].display()));
    serde_json::from_str(&out).unwrap()
}

fn assert_clean(files: &[PathBuf], layout: StoredLayout, key: &Path) {
    let c = check(files, layout, key);
    assert_eq!(c["check-errors"], 0, "{}: {c}", files[0].display());
    assert!(c.get("leaks").is_none() && c.get("corruptions").is_none(), "{}: {c}", files[0].display());
}

#[test]
fn a_full_and_an_incremental_read_over_nbd_are_stored_in_every_layout_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    // Not a whole number of clusters; several read chunks and L2 tables' worth of 64 KiB
    // clusters is more than the test needs, one L2 table boundary (512 MiB) is not crossed.
    let size = 21 * (1 << 20) + 12345 * 512;
    let raw = disk(dir.path(), size);
    // The VM's disk: a qcow2 with a persistent bitmap that records what changes after the full.
    let src = dir.path().join("src.qcow2");
    let (r, s) = (raw.to_str().unwrap(), src.to_str().unwrap());
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", r, s]).unwrap();
    qemu_img(&["bitmap", "--add", "--enable", s, "b0"]).unwrap();
    let full_ref = dir.path().join("full-ref.qcow2");
    fs::copy(&src, &full_ref).unwrap();

    let mut fulls = Vec::new();
    {
        let served = Served::start(&src, "qcow2", None);
        for (name, layout, compress) in LAYOUTS {
            let mut client = served.connect(&[BASE_ALLOCATION]);
            assert_eq!(client.size(), size);
            let plan = Plan::full(&client.map(BASE_ALLOCATION).unwrap(), size);
            assert!(plan.data_bytes() < size, "{name}: the zero clusters are not read: {plan:?}");
            let path = dir.path().join(format!("{name}-full.qcow2"));
            let mut enc = Encoder::create(&path, target(layout, compress, size, None), Some(KEY.as_bytes())).unwrap();
            let mut last = 0;
            copy_from_nbd(&mut client, &plan, &mut enc, &|| false, &mut |d| last = d).unwrap();
            assert_eq!(last, plan.data_bytes(), "{name}: progress counts the bytes read");
            let done = enc.finish().unwrap();
            assert_eq!(done.file_len, fs::metadata(&path).unwrap().len());
            client.disconnect().unwrap();
            assert_clean(std::slice::from_ref(&path), layout, &key);
            compare(&full_ref, std::slice::from_ref(&path), layout, &key)
                .unwrap_or_else(|e| panic!("{name}: the full differs from the disk: {e}"));
            fulls.push(path);
        }
    }
    // Sizes: compressed ones shrink (a third of this disk's clusters compress), an encrypted
    // one holds the data and its LUKS header, no more.
    let len = |p: &Path| fs::metadata(p).unwrap().len();
    let qemu_zstd = dir.path().join("qemu-zstd.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        r,
        qemu_zstd.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        len(&fulls[0]) as f64 <= len(&qemu_zstd) as f64 * 1.05,
        "{} against qemu-img's {}",
        len(&fulls[0]),
        len(&qemu_zstd)
    );
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", fulls[0].to_str().unwrap()]).unwrap()).unwrap();
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd", "{info}");

    // The guest changes things after the full: data, zeros over data, a partial cluster.
    let opts = format!("driver=qcow2,file.filename={s}");
    qemu_io_opts(
        &opts,
        &key,
        &["write -P 0x55 1M 64k", "write -z 3M 192k", "write -P 0x66 11M 1M", "write -P 0x77 20M 4k"],
    );
    {
        let served = Served::start(&src, "qcow2", Some("b0"));
        for ((name, layout, compress), full) in LAYOUTS.into_iter().zip(&fulls) {
            let dirty_ctx = "qemu:dirty-bitmap:b0";
            let mut client = served.connect(&[BASE_ALLOCATION, dirty_ctx]);
            let plan = Plan::incremental(&client.map(dirty_ctx).unwrap(), &client.map(BASE_ALLOCATION).unwrap(), size);
            assert_eq!(plan.data_bytes(), (64 << 10) + (1 << 20) + (64 << 10), "{name}: {plan:?}");
            assert_eq!(plan.zeros, vec![(3 << 20, 192 << 10)], "{name}");
            let path = dir.path().join(format!("{name}-inc.qcow2"));
            let mut enc =
                Encoder::create(&path, target(layout, compress, size, Some(full)), Some(KEY.as_bytes())).unwrap();
            copy_from_nbd(&mut client, &plan, &mut enc, &|| false, &mut |_| {}).unwrap();
            enc.finish().unwrap();
            let chain = [path.clone(), full.clone()];
            assert_clean(&chain, layout, &key);
            compare(&src, &chain, layout, &key)
                .unwrap_or_else(|e| panic!("{name}: the chain differs from the disk: {e}"));
            assert!(len(&path) < 4 << 20, "{name}: an incremental holds the changes only ({} bytes)", len(&path));
            // nasbak's decoder reads the chain back too.
            let files: Vec<(PathBuf, StoredLayout)> = chain.iter().map(|p| (p.clone(), layout)).collect();
            let out = dir.path().join(format!("{name}-decoded.qcow2"));
            Decoder::open_chain(&files, Some(KEY.as_bytes()))
                .unwrap()
                .write_qcow2(&out, &mut |_, _| {}, &mut |_| true)
                .unwrap();
            qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s, out.to_str().unwrap()])
                .unwrap_or_else(|e| panic!("{name}: decoded chain: {e}"));
        }
    }
}

#[test]
fn a_stopped_copy_leaves_no_qcow2_and_a_missing_bitmap_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let raw = disk(dir.path(), size);
    let served = Served::start(&raw, "raw", None);
    let e =
        NbdClient::connect(&served.socket, "disk", &["qemu:dirty-bitmap:nosuch"], Duration::from_secs(10)).unwrap_err();
    assert!(e.to_string().contains("qemu:dirty-bitmap:nosuch"), "{e}");
    let mut client = served.connect(&[BASE_ALLOCATION]);
    let plan = Plan::full(&client.map(BASE_ALLOCATION).unwrap(), size);
    let path = dir.path().join("stopped.qcow2");
    let mut enc = Encoder::create(&path, target(StoredLayout::Qcow2, true, size, None), None).unwrap();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let stop = || calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 2;
    let result = copy_from_nbd(&mut client, &plan, &mut enc, &stop, &mut |_| {});
    assert!(matches!(result, Err(EncodeError::Stopped { .. })), "{result:?}");
    drop(enc);
    let head = fs::read(&path).unwrap();
    assert!(head.len() < 4 || head[..4] != *b"QFI\xfb", "a stopped file has no qcow2 header");
    assert!(qemu_img(&["info", "-f", "qcow2", path.to_str().unwrap()]).is_err());
}

#[test]
fn an_encoded_files_key_rotates_in_place_and_qemu_opens_it_with_the_new_key_only() {
    use nasbak_qemu_img::luks::LuksFile;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let size = 6u64 << 20;
    let raw = disk(dir.path(), size);
    let served = Served::start(&raw, "raw", None);
    let new_key = dir.path().join("new.key");
    let new = "the new key of the encoded files, 0123456789";
    fs::write(&new_key, new).unwrap();
    for (name, layout, compress) in LAYOUTS.into_iter().filter(|(_, l, _)| l.needs_key()) {
        let mut client = served.connect(&[BASE_ALLOCATION]);
        let plan = Plan::full(&client.map(BASE_ALLOCATION).unwrap(), size);
        let path = dir.path().join(format!("{name}-rotated.qcow2"));
        let mut enc = Encoder::create(&path, target(layout, compress, size, None), Some(KEY.as_bytes())).unwrap();
        copy_from_nbd(&mut client, &plan, &mut enc, &|| false, &mut |_| {}).unwrap();
        enc.finish().unwrap();
        // As `key rotate` does: the new passphrase added to the master key, the old one removed.
        let mut luks = LuksFile::open(&path, layout).unwrap();
        let master = luks.unlock(KEY.as_bytes()).unwrap().expect("the old key opens it");
        luks.add(&master, new.as_bytes()).unwrap();
        luks.remove(&master).unwrap();
        assert!(luks.unlock(KEY.as_bytes()).unwrap().is_none(), "{name}: the old key no longer opens it");
        let reference = dir.path().join(format!("{name}-ref.qcow2"));
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), reference.to_str().unwrap()]).unwrap();
        compare(&reference, std::slice::from_ref(&path), layout, &new_key)
            .unwrap_or_else(|e| panic!("{name}: with the new key: {e}"));
        assert!(compare(&reference, std::slice::from_ref(&path), layout, &key).is_err(), "{name}: the old key fails");
    }
}
