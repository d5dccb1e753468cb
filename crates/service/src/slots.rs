//! Limits that hold across `run-due` processes: counted slots (`<dir>/<name>.<k>` files, each
//! held with `flock`, released by the kernel when its holder ends, however it ends), and the
//! state lock under which a run decides what is due and records how runs ended.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nasbak::BackupError;
use nix::fcntl::{Flock, FlockArg};

fn open(path: &Path) -> Result<File, BackupError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BackupError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
    }
    OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|source| BackupError::Io {
        action: "opening",
        path: path.to_owned(),
        source,
    })
}

/// One of `count` slots named `name` in `dir`, if one is free now (held until dropped).
pub(crate) fn try_slot(dir: &Path, name: &str, count: usize) -> Result<Option<Flock<File>>, BackupError> {
    for k in 0..count {
        let file = open(&dir.join(format!("{name}.{k}")))?;
        if let Ok(held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            return Ok(Some(held));
        }
    }
    Ok(None)
}

/// The state lock in `dir` (held until dropped). Its holders hold it for a read and a write of
/// the state file, so it is waited for.
pub(crate) fn state_lock(dir: &Path) -> Result<Flock<File>, BackupError> {
    let path = dir.join("state.lock");
    Flock::lock(open(&path)?, FlockArg::LockExclusive).map_err(|(_, errno)| BackupError::Io {
        action: "locking",
        path,
        source: std::io::Error::from(errno),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_freed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = try_slot(dir.path(), "host", 2).unwrap().expect("a first slot");
        let b = try_slot(dir.path(), "host", 2).unwrap().expect("a second slot");
        assert!(try_slot(dir.path(), "host", 2).unwrap().is_none(), "only two");
        assert!(try_slot(dir.path(), "repo-a", 1).unwrap().is_some(), "other names count apart");
        drop(a);
        assert!(try_slot(dir.path(), "host", 2).unwrap().is_some(), "freed");
        drop(b);
        let _held = state_lock(dir.path()).unwrap();
    }
}
