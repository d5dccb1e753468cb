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
    with_progress(|progress| images.convert(request, progress), cancel, vm, target, size, observer)
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
    with_progress(|progress| images.copy_dirty(copy, progress), &copy.cancel, vm, target, size, observer)
}

/// Runs `work` on a helper thread; the percentages it tells reach `observer` on this one, as
/// bytes of `size` when known.
fn with_progress(
    work: impl FnOnce(Arc<nasbak_qemu_img::ProgressFn>) -> Result<(), nasbak_qemu_img::ImageError> + Send,
    cancel: &CancelHandle,
    vm: &str,
    target: &str,
    size: u64,
    observer: &mut dyn Observer,
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
            // qemu-img tells percent; with the disk's size known, it is told as bytes.
            let (done, total) =
                if size > 0 { ((percent / 100.0 * size as f64) as u64, size) } else { (percent as u64, 100) };
            observer(&Progress::new(Phase::Convert, vm, done, total).on_disk(target));
        }
        worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    result.map_err(|e| cancelled_or(cancel, e))
}

/// `qemu-img check` of one backup file.
pub(crate) fn check_image<I: ImageTool>(images: &I, dir: &Path, disk: &ManifestDisk) -> Result<(), BackupError> {
    let path = dir.join(&disk.file);
    let report = images.check(&ImageLocation::Path(path.clone()), &ImageFormat::Qcow2)?;
    if !matches!(report.verdict, CheckVerdict::Clean | CheckVerdict::Leaks) {
        return Err(BackupError::Damaged { path, detail: format!("qemu-img check: {report:?}") });
    }
    Ok(())
}

/// `qemu-img check` of a backup disk's file (in `dir`) and of every file below it (`chain`,
/// nearest first, as `ancestors` gives it): plain and compressed files by their path, encrypted
/// ones with the key, each with the chain below it. A key that does not open an encrypted file
/// is [`BackupError::KeyNeeded`], naming `backup`.
pub(crate) fn check_chain<I: ImageTool>(
    images: &I,
    (dir, disk): (&Path, &ManifestDisk),
    chain: &[(PathBuf, ManifestDisk)],
    key: Option<&Key>,
    backup: &str,
) -> Result<(), BackupError> {
    let mut all = vec![(dir.to_owned(), disk.clone())];
    all.extend(chain.iter().cloned());
    for (i, (d, m)) in all.iter().enumerate() {
        if !m.stored_as.is_encrypted() {
            check_image(images, d, m)?;
            continue;
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
    let path = dir.join(&disk.file);
    let algorithm = disk.checksum.as_ref().map_or(hash::CHECKSUM_ALGORITHM, |c| c.algorithm.as_str());
    let size = fs::metadata(&path).map_or(0, |m| m.len());
    // The staged name is this process's own (its pid is in it); copy_verified creates it anew.
    let _ = fs::remove_file(tmp);
    let mut first = true;
    let copied = hash::copy_verified(&path, tmp, algorithm, &mut |done| {
        if std::mem::take(&mut first) {
            crate::fault::point("restore-copy");
        }
        observer(&Progress::new(Phase::Copy, vm, done, size).on_disk(target));
        !cancel.is_cancelled()
    });
    let result = match copied {
        Err(_) if cancel.is_cancelled() => Err(BackupError::Cancelled),
        Err(source) => Err(BackupError::Io { action: "copying", path: path.clone(), source }),
        Ok(actual) => match &disk.checksum {
            Some(sum) if sum.value != actual => Err(BackupError::Damaged {
                path,
                detail: format!("{} is {actual}, the manifest says {}", sum.algorithm, sum.value),
            }),
            _ => Ok(()),
        },
    };
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}
