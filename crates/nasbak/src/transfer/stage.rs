//! Files a restore writes beside a volume before renaming them over it.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::BackupError;

/// The suffix of the files a restore writes beside a volume before renaming them over it.
pub const STAGE_SUFFIX: &str = ".nasbak-restore";
/// Appended to a staged file's name for the directory where a chain is put together
/// (see [`super::restore_chain`]).
pub(crate) const CHAIN_SUFFIX: &str = ".chain";

/// Creates, exclusively, an empty file beside `path` to write a restored volume into before it
/// is renamed over `path`: `.<file name>.<pid>-<n>.nasbak-restore`. Never derived by changing an
/// extension, so `disk.qcow2` and `disk.img` in one directory get their own.
pub(crate) fn stage_beside(path: &Path) -> Result<PathBuf, BackupError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for n in 0u32.. {
        let candidate = dir.join(format!(".{name}.{}-{n}{STAGE_SUFFIX}", std::process::id()));
        match fs::OpenOptions::new().write(true).create_new(true).open(&candidate) {
            Ok(_) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(BackupError::Io { action: "creating", path: candidate, source }),
        }
    }
    unreachable!("some staging name is free")
}

/// Removes what killed restores staged beside `path` (files of processes that no longer run).
pub(crate) fn remove_stale_stages(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(CHAIN_SUFFIX).unwrap_or(rest).strip_suffix(STAGE_SUFFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            match e.file_type() {
                Ok(t) if t.is_dir() => drop(fs::remove_dir_all(e.path())),
                _ => drop(fs::remove_file(e.path())),
            }
        }
    }
}

/// Copies staged beside their volumes, removed on drop unless renamed into place.
pub(crate) struct Staged(pub(crate) Vec<PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}
