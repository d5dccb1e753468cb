//! I/O on what a repository holds, beside the pure [`crate::model`] and over it: the backups and
//! their chains ([`list_backups`], [`read_backup`], [`ancestors`], [`delete_dir`]), the records
//! kept beside them (boot verifications, retired checkpoints, restore marks, the merge journal,
//! `.partial` directories), the VM lease lock ([`VmLock`]), encryption key files ([`keys`]), and
//! [`write_atomic`], the one way a record is replaced.
//!
//! Every workflow of the `nasbak` engine reads and writes the repository through this module,
//! never through another workflow.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

mod backups;
mod journal;
pub mod keys;
pub mod lock;
mod marks;
mod records;

pub use backups::{
    BackupEntry, BackupKind, ancestors, clean_partials, delete_dir, list_backups, read_backup, reference_disk,
    retire_and_delete,
};
pub use journal::{MERGING_SUFFIX, finish_merge, finish_merges};
pub use keys::{KeyError, MIN_KEY_LEN, check_key_file, read_key_file};
pub use lock::{DEFAULT_LEASE, LOCK_FILE, LockError, LockOptions, VmLock};
pub use marks::{RESTORING_MARK, RestoringMark, interrupted_restores};
pub use records::{
    BOOT_VERIFY_FILE, BootResult, BootVerification, RETIRED_DIR, read_record, retire_checkpoint, retired_checkpoints,
    write_record,
};

use crate::ParseError;

/// Why the store could not read or write what a repository holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation on the repository.
    #[error("{action} {path} failed")]
    Io {
        /// What.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A backup whose manifest cannot be read or is invalid, that holds no backup file, or whose
    /// chain is broken.
    #[error("backup {backup} is damaged: {reason}")]
    Damaged {
        /// `VM/BACKUP-ID`.
        backup: String,
        /// What is wrong.
        reason: String,
    },
    /// Nothing of that name.
    #[error("{what} does not exist")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// A name that is not valid (a VM name, for example).
    #[error(transparent)]
    Input(#[from] ParseError),
}

/// Writes `data` to a new file at `path` and syncs it (a file no reader looks at until it is
/// renamed into place, or one that is complete once written).
pub fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    create_synced(path, data).map_err(|source| StoreError::Io { action: "writing", path: path.to_owned(), source })
}

fn create_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Replaces `path` with `data` so that a crash or power loss at any moment leaves either the old
/// content or the new one, never a mix or an empty file: the data goes to a temporary file
/// beside it (`.<name>.tmp-<pid>`, created with `mode`), which is synced, renamed over `path`,
/// and the directory synced so that the rename itself is durable.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_record_is_replaced_whole_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"first", 0o600).unwrap();
        write_atomic(&path, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["state.json"], "no temporary file left");
        // A directory that does not exist: an error, and nothing made.
        assert!(write_atomic(&dir.path().join("no/such/x"), b"x", 0o600).is_err());
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
    }
}
