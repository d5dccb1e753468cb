//! Moving bytes, shared by backup and restore: qemu-img conversions with their progress told to
//! the caller's observer, the one-pass verified copy, checksums, `qemu-img check` of backup
//! files, synced writes, and the files staged beside a volume ([`stage`]).
//!
//! Every function here stops at a cancel: qemu-img's process group is killed (looked at every
//! 20 ms), copies and checksums stop at their next 2 MiB.

pub mod hash;
pub(crate) mod stage;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use nasbak_libvirt::CancelHandle;
use nasbak_qemu_img::{CheckVerdict, ConvertRequest, ImageFormat, ImageLocation, ImageTool};
use nasbak_repo::ManifestDisk;

use crate::error::BackupError;
use crate::error::cancelled_or;
use crate::progress::{Observer, Phase, Progress};
use crate::protect::{Key, disk_image};

/// Runs one conversion on a helper thread and hands its progress to `progress` on this one.
pub(crate) fn convert<I: ImageTool + Sync>(
    images: &I,
    mut request: ConvertRequest,
    cancel: &CancelHandle,
    vm: &str,
    target: &str,
    size: u64,
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    request.cancel = cancel.clone();
    let request = &request;
    with_progress(|progress| images.convert(request, progress), cancel, observer, &|p| as_bytes(p, vm, target, size))
}

/// A backup file to check against its manifest's checksum: its directory and its entry.
pub(crate) type Checked = (PathBuf, ManifestDisk);

/// [`convert`] while the checksums of `checked` (the backup files the conversion reads) are
/// checked on another thread, so the two reads of each file overlap instead of following each
/// other. Only for a target staged beside its place (a new file, renamed into place by the
/// caller once this returns `Ok`): both must succeed, and when both fail the damaged file is
/// the error said.
pub(crate) fn convert_checked<I: ImageTool + Sync>(
    images: &I,
    (request, checked): (ConvertRequest, &[Checked]),
    cancel: &CancelHandle,
    (vm, target, size): (&str, &str, u64),
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    std::thread::scope(|s| {
        let checking =
            s.spawn(|| checked.iter().try_for_each(|(dir, disk)| check_sum(dir, disk, vm, cancel, &mut |_| {})));
        let converted = convert(images, request, cancel, vm, target, size, observer);
        let sums = checking.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        sums.map_err(crate::error::at(crate::error::Step::Check)).and(converted)
    })
}

/// Copies the clusters a bitmap marks dirty (see [`ImageTool::copy_dirty`]) on a helper thread,
/// its progress handed to `observer` on this one.
pub(crate) fn copy_dirty<I: ImageTool + Sync>(
    images: &I,
    copy: &nasbak_qemu_img::DirtyCopy,
    vm: &str,
    target: &str,
    size: u64,
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    with_progress(|progress| images.copy_dirty(copy, progress), &copy.cancel, observer, &|p| {
        as_bytes(p, vm, target, size)
    })
}

/// Copies what changed in an RBD image between two snapshots (see
/// [`ImageTool::copy_rbd_diff`]) on a helper thread, its progress handed to `observer` on this
/// one.
pub(crate) fn copy_rbd_diff<I: ImageTool + Sync>(
    images: &I,
    copy: &nasbak_qemu_img::RbdDiffCopy,
    vm: &str,
    target: &str,
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    with_progress(|progress| images.copy_rbd_diff(copy, progress).map(drop), &copy.cancel, observer, &|p| {
        as_bytes(p, vm, target, copy.size)
    })
}

/// qemu-img's percentage as a [`Phase::Convert`] progress, as bytes of `size` when known.
fn as_bytes(percent: f64, vm: &str, target: &str, size: u64) -> Progress {
    let (done, total) = if size > 0 { ((percent / 100.0 * size as f64) as u64, size) } else { (percent as u64, 100) };
    Progress::new(Phase::Convert, vm, done, total).on_disk(target)
}

/// Runs `work` on a helper thread; the percentages it tells reach `observer` on this one, as
/// `progress` makes them.
fn with_progress(
    work: impl FnOnce(Arc<nasbak_qemu_img::ProgressFn>) -> Result<(), nasbak_qemu_img::ImageError> + Send,
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
    progress: &dyn Fn(f64) -> Progress,
) -> Result<(), BackupError> {
    let (tx, rx) = mpsc::channel::<f64>();
    let result = std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let tx = std::sync::Mutex::new(tx);
            work(Arc::new(move |p| {
                let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(p);
            }))
        });
        for percent in rx {
            observer(&progress(percent));
        }
        worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    result.map_err(|e| cancelled_or(cancel, e))
}

/// `qemu-img check` of one backup file.
pub(crate) fn check_image<I: ImageTool>(images: &I, dir: &Path, disk: &ManifestDisk) -> Result<(), BackupError> {
    let path = dir.join(&disk.file);
    // A reference-system file alone: its header may name its parent by a path outside the
    // repository, which qemu-img must not open.
    let image = match disk.reference {
        true => ImageLocation::Stored(nasbak_qemu_img::StoredImage::single(
            path.clone(),
            nasbak_qemu_img::StoredLayout::Qcow2,
            None,
        )),
        false => ImageLocation::Path(path.clone()),
    };
    let report = images.check(&image, &ImageFormat::Qcow2)?;
    if !matches!(report.verdict, CheckVerdict::Clean | CheckVerdict::Leaks) {
        return Err(BackupError::Damaged { path, detail: format!("qemu-img check: {report:?}") });
    }
    Ok(())
}

/// `qemu-img check` of a backup disk's file (in `dir`) and of every file below it (`chain`,
/// nearest first, as `ancestors` gives it): plain and compressed files by their path, encrypted
/// ones with the key, each with the chain below it. A key that does not open an encrypted file
/// is [`BackupError::KeyNeeded`], naming `backup`.
pub(crate) fn check_chain<I: ImageTool + Sync>(
    images: &I,
    (dir, disk): (&Path, &ManifestDisk),
    chain: &[(PathBuf, ManifestDisk)],
    key: Option<&Key>,
    backup: &str,
) -> Result<(), BackupError> {
    let mut all = vec![(dir.to_owned(), disk.clone())];
    all.extend(chain.iter().cloned());
    // The files are checked a few at a time: each check is mostly qemu-img starting and reading
    // a little metadata from a cold cache, so a chain's checks overlap. The first failing file
    // in chain order is the error said.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<(), BackupError>>>> =
        all.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..CHECKS_AT_ONCE.min(all.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= all.len() {
                        break;
                    }
                    let r = check_one(images, &all, i, key, backup);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    results.into_iter().try_for_each(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or(Ok(())))
}

/// How many `qemu-img check`s of one chain run at once.
const CHECKS_AT_ONCE: usize = 12;

/// [`check_chain`]'s check of the file `all[i]`, with the files below it.
fn check_one<I: ImageTool>(
    images: &I,
    all: &[(PathBuf, ManifestDisk)],
    i: usize,
    key: Option<&Key>,
    backup: &str,
) -> Result<(), BackupError> {
    let (d, m) = &all[i];
    {
        if !m.stored_as.is_encrypted() {
            return check_image(images, d, m);
        }
        let image = disk_image(d, m, &all[i + 1..], key, backup)?;
        let report = images.check(&image, &ImageFormat::Qcow2).map_err(|e| {
            if e.is_wrong_key() {
                BackupError::KeyNeeded {
                    backup: backup.to_owned(),
                    detail: format!("{} does not open with it", m.file),
                }
            } else {
                e.into()
            }
        })?;
        if !matches!(report.verdict, CheckVerdict::Clean | CheckVerdict::Leaks) {
            return Err(BackupError::Damaged { path: d.join(&m.file), detail: format!("qemu-img check: {report:?}") });
        }
    }
    Ok(())
}

/// The manifest's checksum of one backup file (none recorded: nothing to compare).
pub(crate) fn check_sum(
    dir: &Path,
    disk: &ManifestDisk,
    vm: &str,
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    let Some(sum) = &disk.checksum else { return Ok(()) };
    let path = dir.join(&disk.file);
    let size = fs::metadata(&path).map_or(0, |m| m.len());
    let mut report = |done: u64| {
        observer(&Progress::new(Phase::Checksum, vm, done, size).on_disk(&disk.target));
        !cancel.is_cancelled()
    };
    let actual = hash::checksum_file_observed(&path, &sum.algorithm, &mut report).map_err(|source| {
        cancelled_or(cancel, BackupError::Io { action: "checksumming", path: path.clone(), source })
    })?;
    if actual != sum.value {
        return Err(BackupError::Damaged {
            path,
            detail: format!("{} is {actual}, the manifest says {}", sum.algorithm, sum.value),
        });
    }
    Ok(())
}

/// Copies a backup file to `tmp` in one pass that also checks its checksum; removes `tmp` on
/// any failure.
pub(crate) fn copy_checked(
    dir: &Path,
    disk: &ManifestDisk,
    tmp: &Path,
    vm: &str,
    target: &str,
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    let size = fs::metadata(dir.join(&disk.file)).map_or(0, |m| m.len());
    let mut first = true;
    let result = copy_file_checked((dir, disk), (tmp, true), cancel, &mut |done| {
        if std::mem::take(&mut first) {
            crate::fault::point("restore-copy");
        }
        observer(&Progress::new(Phase::Copy, vm, done, size).on_disk(target));
    });
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Copies the backup file `disk` (in `dir`) to `to` (created anew) in one pass that also checks
/// its checksum, synced when `sync` says so; `copied` is told the bytes copied so far.
fn copy_file_checked(
    (dir, disk): (&Path, &ManifestDisk),
    (to, sync): (&Path, bool),
    cancel: &CancelHandle,
    copied: &mut dyn FnMut(u64),
) -> Result<(), BackupError> {
    let path = dir.join(&disk.file);
    let algorithm = disk.checksum.as_ref().map_or(hash::CHECKSUM_ALGORITHM, |c| c.algorithm.as_str());
    // The staged name is this process's own (its pid is in it); copy_verified creates it anew.
    let _ = fs::remove_file(to);
    let mut report = |done| {
        copied(done);
        !cancel.is_cancelled()
    };
    match hash::copy_hashed(&path, to, algorithm, &mut report, sync) {
        Err(_) if cancel.is_cancelled() => Err(BackupError::Cancelled),
        Err(source) => Err(BackupError::Io { action: "copying", path, source }),
        Ok(actual) => match &disk.checksum {
            Some(sum) if sum.value != actual => Err(BackupError::Damaged {
                path,
                detail: format!("{} is {actual}, the manifest says {}", sum.algorithm, sum.value),
            }),
            _ => Ok(()),
        },
    }
}

/// What [`decode_checked`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeOut {
    /// A new plain qcow2 file (staged: removed on failure).
    Qcow2,
    /// A new raw file (staged: removed on failure).
    Raw,
    /// An existing raw file or block device, written in place (left as it is on failure, for
    /// the caller to say).
    InPlace,
}

/// Restores a backup disk stored compressed, encrypted or both (`files`: its file, then the files
/// it builds on, nearest first, each with its manifest entry; `key` the repository's key file
/// for encrypted ones) into `tmp` as `out` says, with nasbak's own decoder
/// ([`nasbak_qemu_img::decode`]): each file read once, its checksum checked in the same pass, the
/// clusters decrypted and decompressed on every core. `Ok(false)`: files the decoder does not
/// read (plain ones, a reference-system chain, a layout it leaves to qemu-img, a file it cannot
/// open), and nothing was written. A new file is removed on any failure; `backup` names the
/// backup in errors.
pub(crate) fn decode_checked(
    (files, key): (&[Checked], Option<&Path>),
    (tmp, out): (&Path, DecodeOut),
    (vm, target, backup): (&str, &str, &str),
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<bool, BackupError> {
    use nasbak_qemu_img::decode::{DecodeError, Decoder};
    let stored: Vec<(PathBuf, nasbak_qemu_img::StoredLayout)> =
        files.iter().map(|(dir, m)| (dir.join(&m.file), crate::protect::layout_of(m.stored_as))).collect();
    let encrypted = files.iter().any(|(_, m)| m.stored_as.is_encrypted());
    if files.is_empty()
        || files.iter().any(|(_, m)| m.stored_as == nasbak_repo::FileFormat::Plain || m.reference)
        || (encrypted && key.is_none())
    {
        return Ok(false);
    }
    let passphrase = match key.filter(|_| encrypted) {
        Some(k) => Some(zeroize::Zeroizing::new(fs::read(k).map_err(|source| BackupError::Io {
            action: "reading the key file",
            path: k.to_owned(),
            source,
        })?)),
        None => None,
    };
    let top = stored[0].0.clone();
    // What the decoder cannot open (a layout it leaves to qemu-img, a header it finds damaged)
    // goes to qemu-img, which says what it finds; a wrong key is said here.
    let decoder = match Decoder::open_chain(&stored, passphrase.as_deref().map(Vec::as_slice)) {
        Ok(d) => d,
        Err(e @ DecodeError::WrongKey { .. }) => return Err(decode_error(e, backup, &top)),
        Err(_) => return Ok(false),
    };
    drop(passphrase);
    let mut sums = Vec::new();
    for (path, _) in &stored {
        let (_, m) = &files[sums.len()];
        let algorithm = m.checksum.as_ref().map_or(hash::CHECKSUM_ALGORITHM, |c| c.algorithm.as_str());
        sums.push(hash::StreamChecksum::new(algorithm).map_err(|source| BackupError::Io {
            action: "checking",
            path: path.clone(),
            source,
        })?);
    }
    let size: u64 = stored.iter().map(|(p, _)| fs::metadata(p).map_or(0, |m| m.len())).sum();
    let mut first = out != DecodeOut::InPlace; // the caller's observer has its own point
    if out != DecodeOut::InPlace {
        let _ = fs::remove_file(tmp); // the staged name is this process's own
    }
    let mut sink = |i: usize, bytes: &[u8]| sums[i].update(bytes);
    let mut report = |done| {
        if std::mem::take(&mut first) {
            crate::fault::point("restore-copy");
        }
        observer(&Progress::new(Phase::Copy, vm, done, size).on_disk(target));
        !cancel.is_cancelled()
    };
    let written = match out {
        DecodeOut::Qcow2 => decoder.write_qcow2(tmp, &mut sink, &mut report),
        DecodeOut::Raw => fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|source| nasbak_qemu_img::decode::DecodeError::Io {
                action: "create",
                path: tmp.to_owned(),
                source,
            })
            .and_then(|_| decoder.write_raw(tmp, &mut sink, &mut report)),
        DecodeOut::InPlace => decoder.write_raw(tmp, &mut sink, &mut report),
    };
    let checked = written.map_err(|e| decode_error(e, backup, &top)).and_then(|_| {
        for ((sum, (path, _)), (_, m)) in sums.into_iter().zip(&stored).zip(files) {
            let actual = sum.finish();
            if let Some(expected) = m.checksum.as_ref().filter(|c| c.value != actual) {
                return Err(BackupError::Damaged {
                    path: path.clone(),
                    detail: format!("{} is {actual}, the manifest says {}", expected.algorithm, expected.value),
                });
            }
        }
        Ok(true)
    });
    if checked.is_err() && out != DecodeOut::InPlace {
        let _ = fs::remove_file(tmp);
    }
    checked
}

/// A decoder's error as the restore says it.
fn decode_error(e: nasbak_qemu_img::decode::DecodeError, backup: &str, file: &Path) -> BackupError {
    use nasbak_qemu_img::decode::DecodeError;
    match e {
        DecodeError::Stopped { .. } => BackupError::Cancelled,
        DecodeError::WrongKey { path } => BackupError::KeyNeeded {
            backup: backup.to_owned(),
            detail: format!("the key opens none of the keyslots of {}", path.display()),
        },
        DecodeError::Damaged { path, detail } => BackupError::Damaged { path, detail },
        DecodeError::Io { action, path, source } => BackupError::Io { action, path, source },
        other => BackupError::Damaged { path: file.to_owned(), detail: crate::error::chain(&other) },
    }
}

/// Whether `disk` and every file below it (`chain`) are stored as plain qcow2 files, as
/// [`restore_chain`] needs them.
pub(crate) fn is_plain_chain(disk: &ManifestDisk, chain: &[Checked]) -> bool {
    // A reference-system file's header may name its parent by a path that is not in the
    // repository: those chains are converted, given file by file.
    std::iter::once(disk)
        .chain(chain.iter().map(|(_, m)| m))
        .all(|m| m.stored_as == nasbak_repo::FileFormat::Plain && !(m.reference && m.backing.is_some()))
}

/// The directory beside the staged file `tmp` where [`restore_chain`] lays out its copies.
fn chain_workspace(tmp: &Path) -> PathBuf {
    let mut name = tmp.as_os_str().to_owned();
    name.push(stage::CHAIN_SUFFIX);
    PathBuf::from(name)
}

/// Restores an incremental disk stored as plain qcow2 files (`disk` in `dir` on top of `chain`,
/// nearest first, as `ancestors` gives it) into the staged file `tmp`, as one self-contained
/// qcow2, reading each backup file once, as a restore of a full does:
/// - every file is copied, its checksum checked as it is copied, into a directory beside `tmp`
///   laid out as the repository is (`<backup id>/<file>`), so that each copy's backing link (the
///   repository's relative `../<id>/<file>`) leads to the copy below it, never to the repository;
/// - qemu-img then commits the incrementals' copies into the full's copy, which becomes `tmp`.
///
/// The full's copy goes at the speed of a copy instead of through a conversion of the whole
/// chain. With `check` (the backup's name, for errors), `qemu-img check` of every file runs
/// meanwhile on another thread and must pass before the commit reads them; without, the caller
/// has checked them. The copies are not synced (the
/// incrementals' are gone before the page cache would write them back); the result is, once.
/// Progress is the bytes written: every file copied, then the incrementals' again. The
/// directory is removed whatever happens, and `tmp` on failure.
pub(crate) fn restore_chain<I: ImageTool + Sync>(
    images: &I,
    (dir, disk, chain, check): (&Path, &ManifestDisk, &[Checked], Option<&str>),
    tmp: &Path,
    (vm, target): (&str, &str),
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<(), BackupError> {
    struct Workspace(PathBuf);
    impl Drop for Workspace {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let work = Workspace(chain_workspace(tmp));
    let result = std::thread::scope(|s| {
        let checking = s.spawn(|| match check {
            Some(backup) => check_chain(images, (dir, disk), chain, None, backup),
            None => Ok(()),
        });
        let copied = copy_chain(dir, disk, chain, &work.0, (vm, target), cancel, observer);
        let checked = checking.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A file that fails its check is the error said, whatever the copy did.
        let (copies, done, total) = checked.map_err(crate::error::at(crate::error::Step::Check)).and(copied)?;
        let (base, top) = (&copies[0], &copies[copies.len() - 1]);
        let incrementals = total - done;
        with_progress(|progress| images.commit(top, base, cancel, progress), cancel, observer, &|percent| {
            let n = done + (percent / 100.0 * incrementals as f64) as u64;
            Progress::new(Phase::Copy, vm, n.min(total), total).on_disk(target)
        })?;
        let synced = fs::File::open(base).and_then(|f| f.sync_all());
        synced.map_err(|source| BackupError::Io { action: "syncing", path: base.clone(), source })?;
        fs::rename(base, tmp).map_err(|source| BackupError::Io {
            action: "moving into place",
            path: tmp.to_owned(),
            source,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// [`restore_chain`]'s copies into `work`: the full on this thread, the incrementals meanwhile
/// on another (two streams keep a disk busier than one). Returns their paths (the full first),
/// the bytes copied, and the bytes to write in all (the copies, then the incrementals' again).
fn copy_chain(
    dir: &Path,
    disk: &ManifestDisk,
    chain: &[Checked],
    work: &Path,
    (vm, target): (&str, &str),
    cancel: &CancelHandle,
    observer: &mut dyn Observer,
) -> Result<(Vec<PathBuf>, u64, u64), BackupError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let _ = fs::remove_dir_all(work);
    fs::create_dir(work).map_err(|source| BackupError::Io { action: "creating", path: work.to_owned(), source })?;
    let files: Vec<(&Path, &ManifestDisk)> =
        chain.iter().rev().map(|(d, m)| (d.as_path(), m)).chain(std::iter::once((dir, disk))).collect();
    let sizes: Vec<u64> = files.iter().map(|(d, m)| fs::metadata(d.join(&m.file)).map_or(0, |x| x.len())).collect();
    let copied: u64 = sizes.iter().sum();
    let total = copied + sizes[1..].iter().sum::<u64>();
    let mut copies = Vec::new();
    for (d, m) in &files {
        let id = d.file_name().ok_or_else(|| BackupError::Damaged {
            path: d.to_path_buf(),
            detail: "a backup directory without a name".into(),
        })?;
        let to = work.join(id).join(&m.file);
        let parent = to.parent().unwrap_or(work);
        fs::create_dir_all(parent).map_err(|source| BackupError::Io {
            action: "creating",
            path: parent.to_owned(),
            source,
        })?;
        copies.push(to);
    }
    let incrementals_done = AtomicU64::new(0);
    // Each side stops the other: a cancel stops both, a failure of either stops the other.
    let (stop_full, stop_incrementals) = (CancelHandle::new(), CancelHandle::new());
    std::thread::scope(|s| {
        let others = s.spawn(|| {
            let mut before = 0;
            for ((d, m), (to, size)) in files[1..].iter().zip(copies[1..].iter().zip(&sizes[1..])) {
                let one = copy_file_checked((d, m), (to, false), &stop_incrementals, &mut |n| {
                    incrementals_done.store(before + n, Ordering::Relaxed);
                    if cancel.is_cancelled() {
                        stop_incrementals.cancel();
                    }
                });
                if one.is_err() {
                    stop_full.cancel();
                }
                one?;
                before += size;
            }
            Ok(())
        });
        let mut first = true;
        let full = copy_file_checked((files[0].0, files[0].1), (&copies[0], false), &stop_full, &mut |n| {
            if std::mem::take(&mut first) {
                crate::fault::point("restore-copy");
            }
            let done = n + incrementals_done.load(Ordering::Relaxed);
            observer(&Progress::new(Phase::Copy, vm, done, total).on_disk(target));
            if cancel.is_cancelled() {
                stop_full.cancel();
            }
        });
        if full.is_err() {
            stop_incrementals.cancel();
        }
        let others = others.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // The caller's cancel first; then the failure that stopped the other side.
        let result = match (full, others) {
            _ if cancel.is_cancelled() => Err(BackupError::Cancelled),
            (Ok(()) | Err(BackupError::Cancelled), Err(e)) => Err(e),
            (full, others) => full.and(others),
        };
        if result.is_ok() {
            observer(&Progress::new(Phase::Copy, vm, copied, total).on_disk(target));
        }
        result
    })?;
    Ok((copies, copied, total))
}
