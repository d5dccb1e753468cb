//! A running VM's backup staged in local scratch storage ([`Scratch`]): the push job writes the
//! backup's files to a local directory, so the guest's copy-before-write waits on a local disk,
//! never on the repository; once the job has ended they are copied to the repository's partial
//! directory, where a slow or stalled NAS delays only nasbak (and a stall past the copy's timeout
//! fails the backup). The files are staged as they are stored (compressed, encrypted).
//!
//! Why staging, not libvirt's pull mode with a scratch file: pull mode keeps only the
//! overwritten clusters locally (less scratch), but nasbak would then read the job's NBD export
//! and, for an incremental, copy only the extents its dirty bitmap marks, which neither
//! `qemu-img convert` nor a `qemu-storage-daemon` job can do from an NBD client; staging keeps
//! the push job, its incrementals, and every stored format as they are. Its cost is scratch
//! space for the whole backup (a full: the disks' allocated data), bounded by the limit.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak_libvirt::CancelHandle;

use crate::error::BackupError;
use crate::request::Scratch;

/// One backup's directory in the scratch storage: `<dir>/<vm>/<pid>-<id>/`, removed (with what
/// it holds) when dropped.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: PathBuf,
    root: PathBuf,
    limit: u64,
    vm: String,
}

impl Staging {
    /// Makes the directory of the backup `id` of `vm`, after removing what killed runs of this
    /// VM left (directories of processes that no longer exist). Refuses when the scratch file
    /// system has less than [`Scratch::RESERVE`] free.
    pub(crate) fn create(scratch: &Scratch, vm: &str, id: &str) -> Result<Staging, BackupError> {
        let fail = |detail: String| BackupError::Scratch { vm: vm.to_owned(), dir: scratch.dir.clone(), detail };
        let vm_dir = scratch.dir.join(vm);
        fs::create_dir_all(&vm_dir).map_err(|e| fail(format!("creating {}: {e}", vm_dir.display())))?;
        // QEMU (another user) writes the files: it must reach the directory.
        for d in [&scratch.dir, &vm_dir] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| fail(format!("opening {} to QEMU: {e}", d.display())))?;
        }
        remove_left_by_dead_processes(&vm_dir);
        let free = available(&scratch.dir).map_err(|e| fail(format!("measuring its free space: {e}")))?;
        if free < Scratch::RESERVE {
            return Err(fail(format!(
                "only {} MiB free, less than the {} MiB it keeps free; free space there or set another scratch directory",
                free >> 20,
                Scratch::RESERVE >> 20
            )));
        }
        let dir = vm_dir.join(format!("{}-{id}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| fail(format!("opening {} to QEMU: {e}", dir.display())))?;
        Ok(Staging { dir, root: scratch.dir.clone(), limit: scratch.limit, vm: vm.to_owned() })
    }

    /// Where the job writes this backup's files.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// The bytes the staged files hold on the disk (their allocated blocks).
    pub(crate) fn used(&self) -> u64 {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Why the job must stop, if it must: the files hold more than the limit, or the scratch
    /// file system's free space fell below its reserve.
    pub(crate) fn exceeded(&self) -> Option<String> {
        let used = self.used();
        if used > self.limit {
            return Some(format!(
                "the backup's files took {} MiB, more than its limit of {} MiB: the backup was stopped and the guest ran on; raise the scratch limit or back up without scratch",
                used >> 20,
                self.limit >> 20
            ));
        }
        match available(&self.root) {
            Ok(free) if free < Scratch::RESERVE => Some(format!(
                "its file system has only {} MiB free, less than the {} MiB it keeps free: the backup was stopped and the guest ran on",
                free >> 20,
                Scratch::RESERVE >> 20
            )),
            _ => None,
        }
    }

    /// Runs `job` (which waits for the push job with the cancel handle it is given) while a
    /// watcher checks the scratch every `every`: past its limit (see [`Staging::exceeded`]) it
    /// cancels the job's handle, as it does when `cancel` is cancelled. Returns the job's result,
    /// and why the scratch stopped it (if it did).
    pub(crate) fn watch<T>(
        &self,
        cancel: &CancelHandle,
        every: Duration,
        job: impl FnOnce(&CancelHandle) -> T,
    ) -> (T, Option<String>) {
        let inner = CancelHandle::new();
        let done = std::sync::atomic::AtomicBool::new(false);
        let mut reason = None;
        let out = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if cancel.is_cancelled() {
                        inner.cancel();
                    } else if let Some(why) = self.exceeded() {
                        inner.cancel();
                        return Some(why);
                    }
                    std::thread::sleep(every);
                }
                None
            });
            let out = job(&inner);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            reason = watcher.join().ok().flatten();
            out
        });
        (out, reason)
    }

    /// The error of a job the scratch stopped.
    pub(crate) fn full(&self, reason: String) -> BackupError {
        BackupError::Scratch { vm: self.vm.clone(), dir: self.root.clone(), detail: reason }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether `name` (`<pid>-...`) names what a process that no longer runs left.
pub(crate) fn left_by_dead_process(name: &str) -> bool {
    let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
}

/// Removes what processes that no longer run left in `dir` (entries named `<pid>-...`).
pub(crate) fn remove_left_by_dead_processes(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if left_by_dead_process(&entry.file_name().to_string_lossy()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The bytes an unprivileged writer may still write to the file system of `dir`.
fn available(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_directory_goes_with_its_backup_and_a_dead_runs_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let scratch = Scratch::new(root.path(), 1 << 30);
        // A dead process's leftovers (pid 0x7ffffffe never exists) go; another live one's stay.
        let dead = root.path().join("web1").join("2147483646-2026.01.01.00.00.00");
        let live = root.path().join("web1").join("1-2026.01.01.00.00.00");
        for d in [&dead, &live] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("root.vda.qcow2"), b"x").unwrap();
        }
        let staging = Staging::create(&scratch, "web1", "2026.02.02.00.00.00").unwrap();
        assert!(!dead.exists() && live.exists());
        assert!(staging.path().starts_with(root.path().join("web1")));
        assert_eq!(fs::metadata(staging.path()).unwrap().permissions().mode() & 0o777, 0o755);
        let path = staging.path().to_owned();
        drop(staging);
        assert!(!path.exists());
    }

    #[test]
    fn past_its_limit_the_watcher_stops_the_job_and_says_why() {
        let root = tempfile::tempdir().unwrap();
        let staging = Staging::create(&Scratch::new(root.path(), 1 << 20), "web1", "x").unwrap();
        let file = staging.path().join("root.vda.qcow2");
        let cancel = CancelHandle::new();
        // A "job" that writes 4 MiB and then waits for its handle, as a push job would run on.
        // The file appears whole (written beside the staging directory, then renamed in), so
        // the watcher never samples it half written.
        let whole = root.path().join("whole.qcow2");
        let (finished, reason) = staging.watch(&cancel, Duration::from_millis(10), |inner| {
            fs::write(&whole, vec![0x55u8; 4 << 20]).unwrap();
            fs::rename(&whole, &file).unwrap();
            for _ in 0..500 {
                if inner.is_cancelled() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            true
        });
        assert!(!finished, "the job was stopped");
        let reason = reason.expect("the watcher says why");
        assert!(reason.contains("4 MiB") && reason.contains("limit of 1 MiB"), "{reason}");
        let e = staging.full(reason).to_string();
        assert!(e.contains("scratch directory") && e.contains("web1"), "{e}");
        // Within the limit, and a cancel from outside: the job's handle is cancelled, no reason.
        let staging = Staging::create(&Scratch::new(root.path(), 1 << 30), "web2", "y").unwrap();
        let outer = CancelHandle::new();
        outer.cancel();
        let (seen, reason) = staging.watch(&outer, Duration::from_millis(10), |inner| {
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                inner.is_cancelled()
            })
        });
        assert!(seen && reason.is_none());
    }
}
