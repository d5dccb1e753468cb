//! Marks of disks written in place by a restore: a restore killed midway leaves its mark on the
//! repository, which the next backup of the VM refuses on and the next restore reports.

use std::fs;
use std::path::{Path, PathBuf};

use super::{StoreError, create_synced};

/// The prefix of the marks of in-place writes in `<repo>/<vm>/` (`.nasbak-restoring.<target>`).
pub const RESTORING_MARK: &str = ".nasbak-restoring.";

/// A disk being (or left half) written in place by a restore.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RestoringMark {
    /// The disk's target.
    pub target: String,
    /// Where it is written.
    pub location: String,
    /// The backup restored from, `VM/ID`.
    pub backup: String,
    /// When the write began.
    pub started: chrono::DateTime<chrono::Utc>,
    /// Who wrote.
    pub host: String,
    /// The writing process.
    pub pid: u32,
    #[serde(skip)]
    path: PathBuf,
}

impl RestoringMark {
    /// Marks, in the VM's directory `dir`, that disk `target` is about to be written in place at
    /// `location` from backup `backup` (`VM/ID`), at `now`. The mark is synced before this
    /// returns, so a write killed at any moment after it leaves it behind.
    pub fn write(
        dir: &Path,
        target: &str,
        location: &str,
        backup: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<RestoringMark, StoreError> {
        let path = dir.join(format!("{RESTORING_MARK}{target}"));
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let mark = RestoringMark {
            target: target.to_owned(),
            location: location.to_owned(),
            backup: backup.to_owned(),
            started: now,
            host,
            pid: std::process::id(),
            path: path.clone(),
        };
        let io = |source| StoreError::Io { action: "marking the in-place restore in", path: path.clone(), source };
        fs::create_dir_all(dir).map_err(io)?;
        let text = serde_json::to_string(&mark).expect("a mark serializes");
        create_synced(&path, text.as_bytes()).map_err(io)?;
        Ok(mark)
    }

    /// The write completed: the mark goes.
    pub fn done(self) {
        let _ = fs::remove_file(&self.path);
    }

    /// What it says, for an error or a warning.
    pub fn describe(&self) -> String {
        format!(
            "disk {} ({}) was left half-written by a restore from {} begun {} (pid {} on {}) that did not finish",
            self.target, self.location, self.backup, self.started, self.pid, self.host
        )
    }
}

/// The marks of in-place restores that did not finish, in `vm_dir`.
pub fn interrupted_restores(vm_dir: &Path) -> Vec<RestoringMark> {
    let Ok(entries) = fs::read_dir(vm_dir) else { return Vec::new() };
    let mut marks: Vec<RestoringMark> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(RESTORING_MARK))
        .filter_map(|e| {
            let mut m: RestoringMark = serde_json::from_str(&fs::read_to_string(e.path()).ok()?).ok()?;
            m.path = e.path();
            Some(m)
        })
        .collect();
    marks.sort_by(|a, b| a.target.cmp(&b.target));
    marks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_stays_until_its_write_is_done_and_says_what_was_left() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm1");
        let now = chrono::Utc::now();
        let b = RestoringMark::write(&vm, "vdb", "/images/b.qcow2", "vm1/2026.12.01.02.00.00", now).unwrap();
        let a = RestoringMark::write(&vm, "vda", "/images/a.qcow2", "vm1/2026.12.01.02.00.00", now).unwrap();
        fs::write(vm.join(format!("{RESTORING_MARK}junk")), "not json").unwrap();
        let left = interrupted_restores(&vm);
        let targets: Vec<&str> = left.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["vda", "vdb"], "ordered, an unreadable mark skipped");
        let said = left[0].describe();
        assert!(
            said.contains("disk vda (/images/a.qcow2)") && said.contains(&std::process::id().to_string()),
            "{said}"
        );
        a.done();
        b.done();
        assert!(interrupted_restores(&vm).is_empty());
        assert!(interrupted_restores(&dir.path().join("none")).is_empty());
    }
}
