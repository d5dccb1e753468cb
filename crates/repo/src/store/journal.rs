//! The merge journal: a merge (synthetic full) stages its files beside the backup's as
//! `<file>.merging`, then writes `manifest.json.merging`, the decision. From then on the switch
//! is completed, never undone, by whoever runs next holding the VM's lock.

use std::fs;
use std::path::Path;

use crate::model::layout::MANIFEST_FILE;

/// The suffix of a merge's new files until they are renamed into place.
pub const MERGING_SUFFIX: &str = ".merging";

/// Completes or undoes a merge interrupted in backup directory `dir`: with its new manifest
/// written, every `.merging` file is renamed into place and the manifest last; without it, the
/// `.merging` files are removed. Returns whether a merge was completed.
pub fn finish_merge(dir: &Path) -> std::io::Result<bool> {
    let pending = dir.join(format!("{MANIFEST_FILE}{MERGING_SUFFIX}"));
    let decided = pending.is_file();
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(file) = name.strip_suffix(MERGING_SUFFIX) else { continue };
        if file == MANIFEST_FILE {
            continue;
        }
        if decided {
            fs::rename(e.path(), dir.join(file))?;
        } else {
            fs::remove_file(e.path())?;
        }
    }
    if decided {
        fs::rename(&pending, dir.join(MANIFEST_FILE))?;
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(decided)
}

/// [`finish_merge`] in every backup directory of `vm_dir`; returns the backups whose merge it
/// completed. Run holding the VM's lock.
pub fn finish_merges(vm_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(vm_dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter(|e| finish_merge(&e.path()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read_to_string(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_interrupted_merge_is_completed_once_decided_and_undone_before() {
        let base = tempfile::tempdir().unwrap();
        let write = |dir: &Path, files: &[(&str, &str)]| {
            fs::create_dir_all(dir).unwrap();
            for (n, c) in files {
                fs::write(dir.join(n), c).unwrap();
            }
        };
        // Decided (the new manifest written), one file already switched: rolled forward.
        let decided = base.path().join("2026.11.30.02.00.00");
        write(
            &decided,
            &[
                ("manifest.json", "old"),
                ("root.a.qcow2", "new a"),
                ("datadisk.b.qcow2", "old b"),
                ("datadisk.b.qcow2.merging", "new b"),
                ("manifest.json.merging", "new"),
            ],
        );
        // Not decided: the staged file removed, the backup as it was.
        let undecided = base.path().join("2026.12.01.02.00.00");
        write(&undecided, &[("manifest.json", "old"), ("root.a.qcow2", "old a"), ("root.a.qcow2.merging", "half")]);
        let mut done = finish_merges(base.path());
        done.sort();
        assert_eq!(done, ["2026.11.30.02.00.00"]);
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(
            names(&decided),
            pairs(&[("datadisk.b.qcow2", "new b"), ("manifest.json", "new"), ("root.a.qcow2", "new a")])
        );
        assert_eq!(names(&undecided), pairs(&[("manifest.json", "old"), ("root.a.qcow2", "old a")]));
        assert!(finish_merges(base.path()).is_empty(), "nothing left to do");
    }
}
