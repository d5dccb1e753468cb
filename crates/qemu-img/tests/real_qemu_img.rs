//! The real qemu-img on real files: info, convert (progress, compression, -n, timeout), check
//! (clean, leaks, corruption), compare, create.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nasbak_process::ExternalCommand;
use nasbak_qemu_img::{
    CheckVerdict, Compression, ConvertRequest, ImageError, ImageFormat, ImageLocation, ImageTimeouts, ImageTool,
    QemuImg,
};

fn tool(dir: &Path) -> QemuImg {
    QemuImg::new(dir.join("runtime"))
}

/// A qcow2 of `mib` MiB whose first `data_mib` MiB hold a pattern.
fn image_with_data(dir: &Path, name: &str, mib: u64, data_mib: u64) -> PathBuf {
    let path = dir.join(name);
    tool(dir).create(&path.clone().into(), &ImageFormat::Qcow2, mib << 20).unwrap();
    let cmd = format!("write -P 0xab 0 {data_mib}M");
    ExternalCommand::new("qemu-io").args(["-f", "qcow2", "-c", &cmd]).arg(&path).run().unwrap();
    path
}

fn loc(p: &Path) -> ImageLocation {
    ImageLocation::Path(p.to_owned())
}

#[test]
fn convert_reports_progress_and_copies_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let src = image_with_data(dir.path(), "src.qcow2", 64, 16);
    let dst = dir.path().join("dst.qcow2");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let t = tool(dir.path());
    t.convert(
        &ConvertRequest::new(src.clone(), dst.clone(), ImageFormat::Qcow2),
        Arc::new(move |p| sink.lock().unwrap().push(p)),
    )
    .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.last().copied(), Some(100.0), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(t.compare(&loc(&src), &loc(&dst)).unwrap());
    let info = t.info(&loc(&dst)).unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].format, ImageFormat::Qcow2);
    assert_eq!(info[0].virtual_size, 64 << 20);
    assert_eq!(info[0].backing_file, None);
    assert_eq!(t.check(&loc(&dst), &ImageFormat::Qcow2).unwrap().verdict, CheckVerdict::Clean);
}

#[test]
fn zstd_compression_raw_targets_and_existing_targets() {
    let dir = tempfile::tempdir().unwrap();
    let t = tool(dir.path());
    let src = image_with_data(dir.path(), "src.qcow2", 32, 8);
    let z = dir.path().join("z.qcow2");
    let mut r = ConvertRequest::new(src.clone(), z.clone(), ImageFormat::Qcow2);
    r.compression = Compression::Zstd;
    t.convert(&r, Arc::new(|_| {})).unwrap();
    assert_eq!(t.info(&loc(&z)).unwrap()[0].compression_type.as_deref(), Some("zstd"));
    assert!(t.compare(&loc(&src), &loc(&z)).unwrap());
    // Into an existing raw target (as into a block device), with -n.
    let raw = dir.path().join("existing.raw");
    fs::File::create(&raw).unwrap().set_len(32 << 20).unwrap();
    let mut r = ConvertRequest::new(z.clone(), raw.clone(), ImageFormat::Raw);
    r.target_exists = true;
    t.convert(&r, Arc::new(|_| {})).unwrap();
    assert!(t.compare(&loc(&src), &loc(&raw)).unwrap());
}

#[test]
fn compare_tells_different_images_apart() {
    let dir = tempfile::tempdir().unwrap();
    let a = image_with_data(dir.path(), "a.qcow2", 16, 4);
    let b = image_with_data(dir.path(), "b.qcow2", 16, 2);
    assert!(!tool(dir.path()).compare(&loc(&a), &loc(&b)).unwrap());
}

fn read_u64(f: &mut fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn check_tells_leaks_from_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let t = tool(dir.path());
    // A leak: one more cluster at the end of the file whose refcount says "in use".
    let leak = image_with_data(dir.path(), "leak.qcow2", 16, 4);
    {
        let mut f = OpenOptions::new().read(true).write(true).open(&leak).unwrap();
        let refcount_table = read_u64(&mut f, 48);
        let block = read_u64(&mut f, refcount_table);
        let len = f.metadata().unwrap().len();
        let cluster = len / 65536;
        f.set_len(len + 65536).unwrap();
        f.seek(SeekFrom::Start(block + 2 * cluster)).unwrap();
        f.write_all(&1u16.to_be_bytes()).unwrap();
    }
    let r = t.check(&loc(&leak), &ImageFormat::Qcow2).unwrap();
    assert_eq!((r.verdict, r.corruptions), (CheckVerdict::Leaks, 0), "{r:?}");
    assert!(r.leaks >= 1);
    // A corruption: an L1 entry pointing at a misaligned L2 table.
    let bad = image_with_data(dir.path(), "bad.qcow2", 16, 4);
    {
        let mut f = OpenOptions::new().read(true).write(true).open(&bad).unwrap();
        let l1 = read_u64(&mut f, 40);
        let entry = read_u64(&mut f, l1);
        f.seek(SeekFrom::Start(l1)).unwrap();
        f.write_all(&(entry + 0x200).to_be_bytes()).unwrap();
    }
    let r = t.check(&loc(&bad), &ImageFormat::Qcow2).unwrap();
    assert_eq!(r.verdict, CheckVerdict::Corrupt, "{r:?}");
    assert!(r.corruptions > 0);
    // raw has nothing to check.
    let raw = dir.path().join("x.raw");
    fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
    assert_eq!(t.check(&loc(&raw), &ImageFormat::Raw).unwrap().verdict, CheckVerdict::Unsupported);
}

#[test]
fn a_conversion_past_its_timeout_is_killed_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let src = image_with_data(dir.path(), "src.qcow2", 64, 32);
    let t = tool(dir.path())
        .with_timeouts(ImageTimeouts { quick: Duration::from_secs(60), copy: Duration::from_millis(500) });
    let mut r = ConvertRequest::new(src, dir.path().join("slow.qcow2"), ImageFormat::Qcow2);
    r.rate_limit = Some(1 << 20);
    let start = Instant::now();
    let e = t.convert(&r, Arc::new(|_| {})).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(matches!(e, ImageError::Command { .. }) && text.contains("did not finish within 500ms"), "{text}");
}

#[test]
fn a_missing_image_gives_qemu_img_s_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let e = tool(dir.path()).info(&loc(&dir.path().join("nope.qcow2"))).unwrap_err();
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        text.contains("qemu-img info failed") && text.contains("nope.qcow2") && text.contains("No such file"),
        "{text}"
    );
}

/// Bitmaps offline, and the copy of what one marks dirty through the real qemu-storage-daemon:
/// only the written clusters are copied, the bitmap is left as it was, and with the source as
/// its backing file the copy reads as the source; a cancel stops the job and leaves no daemon.
#[test]
fn a_bitmaps_dirty_clusters_are_copied_and_nothing_else() {
    use nasbak_qemu_img::DirtyCopy;
    let dir = tempfile::tempdir().unwrap();
    let src = image_with_data(dir.path(), "src.qcow2", 64, 16);
    let t = tool(dir.path());
    t.add_bitmap(&src, "b1").unwrap();
    let flags = |t: &QemuImg| {
        t.info(&loc(&src)).unwrap()[0].bitmaps.iter().map(|b| (b.name.clone(), b.flags.clone())).collect::<Vec<_>>()
    };
    assert_eq!(flags(&t), [("b1".to_owned(), vec!["auto".to_owned()])]);
    ExternalCommand::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xcd 20M 3M"]).arg(&src).run().unwrap();
    let dst = dir.path().join("dirty.qcow2");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let copy = DirtyCopy {
        source: src.clone(),
        bitmap: "b1".into(),
        target: dst.clone(),
        cancel: Default::default(),
        protection: None,
    };
    t.copy_dirty(&copy, Arc::new(move |p| sink.lock().unwrap().push(p))).unwrap();
    assert_eq!(seen.lock().unwrap().last().copied(), Some(100.0));
    let size = fs::metadata(&dst).unwrap().len();
    assert!((3 << 20..5 << 20).contains(&size), "about the 3 MiB written: {size}");
    assert_eq!(flags(&t), [("b1".to_owned(), vec!["auto".to_owned()])], "the bitmap is left as it was");
    // Over the pre-write state (the source before the write, as the parent backup holds it),
    // the copy reads as the source now.
    let before = dir.path().join("before.qcow2");
    let parent = image_with_data(dir.path(), "parent.qcow2", 64, 16);
    fs::rename(&parent, &before).unwrap();
    t.set_backing(&ImageLocation::Path(dst.clone()), "before.qcow2", &ImageFormat::Qcow2).unwrap();
    assert!(t.compare(&loc(&dst), &loc(&src)).unwrap());
    t.remove_bitmap(&src, "b1").unwrap();
    assert!(flags(&t).is_empty());
    // A missing bitmap: the daemon's own words.
    let err = t.copy_dirty(&DirtyCopy { target: dir.path().join("none.qcow2"), ..copy.clone() }, Arc::new(|_| {}));
    let text = err.unwrap_err().to_string();
    assert!(text.contains("b1") || text.contains("bitmap"), "{text}");
    // Cancelled before it starts: an error at once, and no daemon keeps the image open.
    t.add_bitmap(&src, "b2").unwrap();
    let cancel = nasbak_process::CancelHandle::new();
    cancel.cancel();
    let started = Instant::now();
    let cancelled = DirtyCopy { bitmap: "b2".into(), target: dir.path().join("c.qcow2"), cancel, ..copy };
    let err = t.copy_dirty(&cancelled, Arc::new(|_| {})).unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Cancelled while it copies (512 MiB dirty): the job is cancelled, the daemon stops and
    // the image is free again (removing a bitmap needs it for writing).
    ExternalCommand::new("qemu-img").args(["resize", "-q"]).arg(&src).arg("1G").run().unwrap();
    ExternalCommand::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 64M 512M"]).arg(&src).run().unwrap();
    let handle = nasbak_process::CancelHandle::new();
    let trigger = handle.clone();
    let midway = DirtyCopy { cancel: handle, target: dir.path().join("mid.qcow2"), ..cancelled };
    let err = t
        .copy_dirty(
            &midway,
            Arc::new(move |p| {
                if p > 0.0 {
                    trigger.cancel()
                }
            }),
        )
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    t.remove_bitmap(&src, "b2").expect("the image is free again");
}

/// A qcow2 chain shown read-only as a raw file through the real qemu-storage-daemon's FUSE
/// export: the guest-visible content at its offsets (the chain read through), writes refused,
/// the image never written, the export found again by another caller, a lock held by the daemon
/// while it runs, and nothing left after stop (no daemon, no FUSE mount, no pid file, no lock).
#[test]
fn an_image_chain_is_exported_read_only_and_the_export_stops_cleanly() {
    use nasbak_qemu_img::ReadOnlyExport;
    let dir = tempfile::tempdir().unwrap();
    let base = image_with_data(dir.path(), "base.qcow2", 64, 2);
    let top = dir.path().join("top.qcow2");
    ExternalCommand::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2"])
        .arg(&top)
        .run()
        .unwrap();
    ExternalCommand::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 8M 1M"]).arg(&top).run().unwrap();
    let before = (fs::read(&base).unwrap(), fs::read(&top).unwrap());
    let file = dir.path().join("disk.raw");
    // The daemon holds a lock for as long as it runs (what keeps a repository mounted).
    let lock_path = dir.path().join("users.lock");
    let lock = fs::File::create(&lock_path).unwrap();
    lock.lock_shared().unwrap();
    let export = ReadOnlyExport::start(&top, "qcow2", &file, Duration::from_secs(30), Some(&lock)).unwrap();
    drop(lock);
    let probe = fs::File::open(&lock_path).unwrap();
    assert!(probe.try_lock().is_err(), "the daemon holds the shared lock after the caller let go");
    assert_eq!(fs::metadata(&file).unwrap().len(), 64 << 20);
    let mut f = fs::File::open(&file).unwrap();
    let mut at = |offset: u64| {
        let mut b = [0u8; 4];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut b).unwrap();
        b
    };
    assert_eq!(at(0), [0xab; 4], "the base's data, through the chain");
    assert_eq!(at(8 << 20), [0x77; 4], "the top's data");
    assert_eq!(at(32 << 20), [0; 4]);
    assert!(OpenOptions::new().write(true).open(&file).and_then(|mut w| w.write_all(b"x")).is_err(), "read-only");
    assert_eq!(ReadOnlyExport::find(&file).as_ref(), Some(&export), "found again by another caller");
    // A second export onto a file in use, or of a format nasbak does not export, is refused.
    let err = ReadOnlyExport::start(&top, "qcow2", &file, Duration::from_secs(30), None).unwrap_err();
    assert!(err.to_string().contains("not an empty file"), "{err}");
    assert!(ReadOnlyExport::start(&top, "vmdk", &dir.path().join("x.raw"), Duration::from_secs(30), None).is_err());
    export.stop(Duration::from_secs(10)).unwrap();
    // Ended: reaped, or a zombie its new parent (init) has not reaped yet.
    let stat = fs::read_to_string(format!("/proc/{}/stat", export.pid)).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    assert!(matches!(state, None | Some('Z' | 'X')), "the daemon is gone: {stat}");
    probe.try_lock().expect("the lock ends with the daemon");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(file.to_str().unwrap()), "no FUSE mount left");
    assert_eq!(fs::metadata(&file).unwrap().len(), 0, "the file is an empty file again");
    assert!(ReadOnlyExport::find(&file).is_none());
    assert_eq!((fs::read(&base).unwrap(), fs::read(&top).unwrap()), before, "the images were never written");
    // A missing image: the daemon's own words, and no export left.
    let gone = dir.path().join("gone.raw");
    let err = ReadOnlyExport::start(&dir.path().join("nope.qcow2"), "qcow2", &gone, Duration::from_secs(30), None)
        .unwrap_err();
    assert!(err.to_string().contains("nope.qcow2"), "{err}");
    assert!(ReadOnlyExport::find(&gone).is_none());
}

#[test]
fn the_lock_an_export_holds_is_free_when_stop_returns_ten_times_in_a_row() {
    use nasbak_qemu_img::ReadOnlyExport;
    // The daemon's threads outlive its main thread by a moment: stop must wait for the last of
    // them, or a new export right after a stop meets the old one's lock.
    let dir = tempfile::tempdir().unwrap();
    let image = image_with_data(dir.path(), "img.qcow2", 16, 1);
    let lock_path = dir.path().join("users.lock");
    for round in 0..10 {
        let file = dir.path().join(format!("disk{round}.raw"));
        let lock = fs::File::create(&lock_path).unwrap();
        lock.lock_shared().unwrap();
        let export = ReadOnlyExport::start(&image, "qcow2", &file, Duration::from_secs(30), Some(&lock)).unwrap();
        drop(lock);
        let probe = fs::File::open(&lock_path).unwrap();
        assert!(probe.try_lock().is_err(), "round {round}: the daemon holds the lock");
        export.stop(Duration::from_secs(10)).unwrap();
        probe.try_lock().unwrap_or_else(|e| panic!("round {round}: the lock is held after stop returned: {e:?}"));
        probe.unlock().unwrap();
    }
}
