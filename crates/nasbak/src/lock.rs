//! A per-VM lock stored on the repository, so that two hosts cannot back up one VM at once.
//!
//! The lock is a file created with `O_EXCL` (which NFS v3+, SMB and CephFS all honour, unlike
//! flock on a CIFS mount with `nobrl`), holding who took it. A lock left by a process of this
//! host that no longer runs is taken over; one held by another host is reported with its owner.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lock file's name inside `<repo>/<vm>/`.
pub const LOCK_FILE: &str = ".nasbak-lock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    host: String,
    pid: u32,
    since: chrono::DateTime<chrono::Utc>,
}

/// A held VM lock; removed on drop.
#[derive(Debug)]
pub struct VmLock {
    path: PathBuf,
}

/// Why a VM lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Someone else holds it.
    #[error("{vm} is being backed up or restored by {holder} since {since}; if that process is gone, remove {path}")]
    Held {
        /// The VM.
        vm: String,
        /// `host pid N`.
        holder: String,
        /// When.
        since: String,
        /// The lock file.
        path: PathBuf,
    },
    /// The lock file could not be written or read.
    #[error("could not take the lock {path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown-host".into())
}

impl VmLock {
    /// Takes the lock of `vm` in `vm_dir`.
    pub fn take(vm_dir: &Path, vm: &str) -> Result<VmLock, LockError> {
        let path = vm_dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        let me = Owner { host: hostname(), pid: std::process::id(), since: chrono::Utc::now() };
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let text = serde_json::to_string(&me).expect("owner serializes");
                    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
                    return Ok(VmLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner: Option<Owner> =
                        fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok());
                    let stale = owner
                        .as_ref()
                        .is_some_and(|o| o.host == me.host && !Path::new(&format!("/proc/{}", o.pid)).exists());
                    if stale {
                        fs::remove_file(&path).map_err(io)?;
                        continue;
                    }
                    let (holder, since) = match owner {
                        Some(o) => (format!("{} pid {}", o.host, o.pid), o.since.to_rfc3339()),
                        None => ("an unknown process".into(), "an unknown time".into()),
                    };
                    return Err(LockError::Held { vm: vm.to_owned(), holder, since, path });
                }
                Err(e) => return Err(io(e)),
            }
        }
        Err(io(std::io::Error::other("the lock changed hands while taking it; try again")))
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_stale_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let lock = VmLock::take(dir.path(), "vm1").unwrap();
        let e = VmLock::take(dir.path(), "vm1").unwrap_err();
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        // A lock of a dead process on this host is taken over.
        let dead = Owner { host: hostname(), pid: u32::MAX - 1, since: chrono::Utc::now() };
        fs::write(dir.path().join(LOCK_FILE), serde_json::to_string(&dead).unwrap()).unwrap();
        let _l = VmLock::take(dir.path(), "vm1").unwrap();
        // Another host's lock is not.
        drop(_l);
        let other = Owner { host: "elsewhere".into(), pid: 1, since: chrono::Utc::now() };
        fs::write(dir.path().join(LOCK_FILE), serde_json::to_string(&other).unwrap()).unwrap();
        assert!(VmLock::take(dir.path(), "vm1").unwrap_err().to_string().contains("elsewhere pid 1"));
    }
}
