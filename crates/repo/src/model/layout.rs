//! The on-repository layout, compatible with the reference system:
//! `<repo>/<vm>/<backup-id>/{root.<volume>.qcow2, datadisk.<volume>.qcow2, domain-config.xml}`,
//! plus our `manifest.json`.
//!
//! Every path is built from validated single components ([`VmName`], [`BackupId`],
//! [`VolumeName`]), so no path built here can leave the repository.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Utc};

use super::error::ParseError;
use super::name::{VmName, VolumeName};

/// The saved domain XML of a backup.
pub const DOMAIN_CONFIG_FILE: &str = "domain-config.xml";
/// Our manifest; a backup is complete exactly when it is in place.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Suffix of a backup directory still being written.
pub const PARTIAL_SUFFIX: &str = ".partial";

const TIME_FORMAT: &str = "%Y.%m.%d.%H.%M.%S";
const ID_EXPECTED: &str =
    "expected yyyy.MM.dd.HH.mm.ss with an optional -N suffix, for example 2026.11.27.21.30.05 or 2026.11.27.21.30.05-2";

/// A backup id: the reference's `yyyy.MM.dd.HH.mm.ss` (UTC in backups we write), with a `-N`
/// suffix (N >= 2) when two backups of one VM start within the same second.
///
/// ```
/// use nasbak_repo::BackupId;
/// let id: BackupId = "2026.11.27.21.30.05-2".parse().unwrap();
/// assert_eq!(id.sequence(), 2);
/// assert_eq!(id.to_string(), "2026.11.27.21.30.05-2");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupId {
    time: NaiveDateTime,
    seq: u32,
}

impl BackupId {
    /// The id for a backup started at `time` (whole seconds), without suffix.
    pub fn at(time: DateTime<Utc>) -> Self {
        let time = time.naive_utc();
        let time = time.with_nanosecond_zero();
        BackupId { time, seq: 1 }
    }

    /// The id at `time` that sorts after every id in `existing` of the same second: no suffix
    /// when that second has none, else one past the highest suffix (an id freed by a delete is
    /// never reused, so a newer backup never sorts before an older one).
    pub fn next_after<'a>(time: DateTime<Utc>, existing: impl IntoIterator<Item = &'a BackupId>) -> Self {
        let mut id = BackupId::at(time);
        if let Some(max) = existing.into_iter().filter(|e| e.time == id.time).map(|e| e.seq).max() {
            id.seq = max + 1;
        }
        id
    }

    /// The time in the id (UTC for backups nasbak wrote, local time for the reference's).
    pub fn time(&self) -> NaiveDateTime {
        self.time
    }

    /// 1 for an id without suffix, else N of `-N`.
    pub fn sequence(&self) -> u32 {
        self.seq
    }
}

trait WithNanosecondZero {
    fn with_nanosecond_zero(self) -> Self;
}

impl WithNanosecondZero for NaiveDateTime {
    fn with_nanosecond_zero(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.time.format(TIME_FORMAT))?;
        if self.seq > 1 {
            write!(f, "-{}", self.seq)?;
        }
        Ok(())
    }
}

impl FromStr for BackupId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = |pos: usize, problem: &str| ParseError::new("backup id", s, pos, problem, ID_EXPECTED);
        let (stamp, seq) = match s.split_once('-') {
            Some((stamp, n)) => {
                let ok = !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit());
                let seq = n
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| ok && n >= 2)
                    .ok_or_else(|| err(stamp.len() + 1, "the suffix is not a number of 2 or more"))?;
                (stamp, seq)
            }
            None => (s, 1),
        };
        let shape_ok = stamp.len() == 19
            && stamp
                .bytes()
                .enumerate()
                .all(|(i, b)| if matches!(i, 4 | 7 | 10 | 13 | 16) { b == b'.' } else { b.is_ascii_digit() });
        if !shape_ok {
            return Err(err(0, "it does not have the shape yyyy.MM.dd.HH.mm.ss"));
        }
        let time =
            NaiveDateTime::parse_from_str(stamp, TIME_FORMAT).map_err(|_| err(0, "it is not a valid date and time"))?;
        Ok(BackupId { time, seq })
    }
}

/// The role of a disk in a backup file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskRole {
    /// The boot/root disk: `root.<volume>.qcow2`.
    Root,
    /// Any other disk: `datadisk.<volume>.qcow2`.
    Data,
}

/// The backup file name of one disk, as the reference writes it.
pub fn disk_file_name(role: DiskRole, volume: &VolumeName) -> String {
    let prefix = match role {
        DiskRole::Root => "root",
        DiskRole::Data => "datadisk",
    };
    format!("{prefix}.{volume}.qcow2")
}

/// Splits a backup file name back into role and volume (`None` if it is not one).
pub fn parse_disk_file_name(name: &str) -> Option<(DiskRole, VolumeName)> {
    let stem = name.strip_suffix(".qcow2")?;
    let (role, volume) = if let Some(v) = stem.strip_prefix("root.") {
        (DiskRole::Root, v)
    } else {
        (DiskRole::Data, stem.strip_prefix("datadisk.")?)
    };
    Some((role, VolumeName::new(volume).ok()?))
}

/// The backup file names of the disks of one backup, in order, each unique.
///
/// `disks` holds each disk's role, volume and target device. A disk gets the reference name
/// `<role>.<volume>.qcow2` when no other disk of the backup would get the same name, compared
/// without regard to case (SMB shares and some NAS file systems fold case). Disks whose names
/// collide (two `data.qcow2` files in two directories, `Data` and `data`) all get
/// `<role>.<volume>@<target>.qcow2` instead (targets are unique within a domain); should even
/// that name be taken, `@<target>-2`, `@<target>-3`, ... The result depends only on `disks`, and
/// the manifest records each disk's file.
///
/// ```
/// use nasbak_repo::model::layout::{DiskRole, disk_file_names};
/// use nasbak_repo::VolumeName;
/// let (root, data) = (VolumeName::new("root").unwrap(), VolumeName::new("data").unwrap());
/// let names = disk_file_names(&[
///     (DiskRole::Root, &root, "vda"),
///     (DiskRole::Data, &data, "vdb"),
///     (DiskRole::Data, &data, "vdc"),
/// ]);
/// assert_eq!(names, ["root.root.qcow2", "datadisk.data@vdb.qcow2", "datadisk.data@vdc.qcow2"]);
/// ```
pub fn disk_file_names(disks: &[(DiskRole, &VolumeName, &str)]) -> Vec<String> {
    let plain: Vec<String> = disks.iter().map(|(role, volume, _)| disk_file_name(*role, volume)).collect();
    let folded: Vec<String> = plain.iter().map(|n| n.to_lowercase()).collect();
    let unique = |i: usize| folded.iter().filter(|n| **n == folded[i]).count() == 1;
    let mut taken: std::collections::HashSet<String> =
        (0..disks.len()).filter(|&i| unique(i)).map(|i| folded[i].clone()).collect();
    let mut names = plain.clone();
    for (i, (role, volume, target)) in disks.iter().enumerate() {
        if unique(i) {
            continue;
        }
        let target = if VolumeName::new(target).is_ok() { (*target).to_owned() } else { format!("disk{i}") };
        for n in 1u32.. {
            let suffix = if n == 1 { format!("@{target}") } else { format!("@{target}-{n}") };
            // Keep the volume part short enough that the whole stays a valid volume name.
            let mut stem = volume.as_str().to_owned();
            while stem.len() + suffix.len() > 200 {
                stem.pop();
            }
            let Ok(candidate) = VolumeName::new(&format!("{stem}{suffix}")) else { continue };
            let name = disk_file_name(*role, &candidate);
            if taken.insert(name.to_lowercase()) {
                names[i] = name;
                break;
            }
        }
    }
    names
}

/// Paths inside one repository, rooted where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryLayout {
    root: PathBuf,
}

impl RepositoryLayout {
    /// A layout rooted at `root` (a mount point or a shared path).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RepositoryLayout { root: root.into() }
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<repo>/<vm>`.
    pub fn vm_dir(&self, vm: &VmName) -> PathBuf {
        self.root.join(vm.as_str())
    }

    /// `<repo>/<vm>/<backup-id>`.
    pub fn backup_dir(&self, vm: &VmName, id: &BackupId) -> PathBuf {
        self.vm_dir(vm).join(id.to_string())
    }

    /// `<repo>/<vm>/<backup-id>.partial`: where a backup is written before it is complete.
    pub fn partial_dir(&self, vm: &VmName, id: &BackupId) -> PathBuf {
        self.vm_dir(vm).join(format!("{id}{PARTIAL_SUFFIX}"))
    }

    /// Resolves a user-given `vm/backup-id` to its directory, refusing anything else: no empty
    /// string, no repository root, no bare VM directory, no `..`, no absolute path.
    pub fn resolve_backup(&self, relative: &str) -> Result<(VmName, BackupId, PathBuf), ParseError> {
        let expected = "expected VM/BACKUP-ID, for example web1/2026.11.27.21.30.05";
        let Some((vm, id)) = relative.split_once('/') else {
            return Err(ParseError::new(
                "backup path",
                relative,
                relative.len(),
                "it names no backup inside a VM directory",
                expected,
            ));
        };
        let vm = VmName::new(vm)?;
        let id: BackupId = id.parse().map_err(|e: ParseError| ParseError {
            position: e.position + vm.as_str().len() + 1,
            input: relative.to_owned(),
            ..e
        })?;
        let dir = self.backup_dir(&vm, &id);
        Ok((vm, id, dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_after_never_reuses_a_freed_suffix() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let a = BackupId::at(t);
        assert_eq!(BackupId::next_after(t, []), a);
        let c: BackupId = format!("{a}-3").parse().unwrap();
        let other = BackupId::at(t + chrono::Duration::seconds(1));
        assert_eq!(BackupId::next_after(t, [&c, &other]).to_string(), format!("{a}-4"));
    }
    use chrono::TimeZone;

    #[test]
    fn ids_parse_and_order() {
        for good in ["2026.11.27.21.30.05", "2026.01.01.00.00.00-2", "1999.12.31.23.59.59-17"] {
            assert_eq!(good.parse::<BackupId>().unwrap().to_string(), good);
        }
        for bad in [
            "",
            "2026.11.27.21.30",
            "2026.13.01.00.00.00",
            "2026.11.27.21.30.05-1",
            "2026.11.27.21.30.05-02",
            "2026-11-27",
            "../x",
            "2026.11.27.21.30.05.partial",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad}");
        }
        let a: BackupId = "2026.11.27.21.30.05".parse().unwrap();
        let b: BackupId = "2026.11.27.21.30.05-2".parse().unwrap();
        assert!(a < b);
    }

    #[test]
    fn collisions_get_a_suffix() {
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 21, 30, 5).unwrap();
        let taken: Vec<BackupId> =
            ["2026.11.27.21.30.05", "2026.11.27.21.30.05-2"].iter().map(|s| s.parse().unwrap()).collect();
        let id = BackupId::next_after(t, &taken);
        assert_eq!(id.to_string(), "2026.11.27.21.30.05-3");
    }

    #[test]
    fn file_names_match_the_reference() {
        let v = VolumeName::new("a1b2-c3").unwrap();
        assert_eq!(disk_file_name(DiskRole::Root, &v), "root.a1b2-c3.qcow2");
        assert_eq!(disk_file_name(DiskRole::Data, &v), "datadisk.a1b2-c3.qcow2");
        assert_eq!(parse_disk_file_name("datadisk.a1b2-c3.qcow2"), Some((DiskRole::Data, v)));
        assert_eq!(parse_disk_file_name("domain-config.xml"), None);
    }

    #[test]
    fn colliding_volumes_get_their_target_and_unique_ones_keep_the_reference_name() {
        let v = |s: &str| VolumeName::new(s).unwrap();
        let (root, data, big, at) = (v("root"), v("data"), v("Data"), v("data@vdc"));
        let names = disk_file_names(&[
            (DiskRole::Root, &root, "vda"),
            (DiskRole::Data, &data, "vdb"),
            (DiskRole::Data, &big, "vdc"),
            (DiskRole::Data, &at, "vdd"),
            (DiskRole::Data, &root, "vde"),
        ]);
        // data and Data collide on a case-folding share; the disk whose own volume is
        // "data@vdc" keeps its name, so vdc's disambiguated name moves on to -2.
        assert_eq!(
            names,
            [
                "root.root.qcow2",
                "datadisk.data@vdb.qcow2",
                "datadisk.Data@vdc-2.qcow2",
                "datadisk.data@vdc.qcow2",
                "datadisk.root.qcow2"
            ]
        );
        let long = v(&"x".repeat(200));
        let names = disk_file_names(&[(DiskRole::Data, &long, "vdb"), (DiskRole::Data, &long, "vdc")]);
        assert!(names.iter().all(|n| parse_disk_file_name(n).is_some()), "{names:?}");
        assert_ne!(names[0], names[1]);
    }

    #[test]
    fn resolve_refuses_everything_but_one_backup() {
        let l = RepositoryLayout::new("/mnt/r");
        let (_, _, dir) = l.resolve_backup("web1/2026.11.27.21.30.05").unwrap();
        assert_eq!(dir, Path::new("/mnt/r/web1/2026.11.27.21.30.05"));
        for bad in [
            "",
            "/",
            "web1",
            "web1/",
            "../x/2026.11.27.21.30.05",
            "web1/..",
            "/etc/passwd",
            "web1/2026.11.27.21.30.05/x",
            "./2026.11.27.21.30.05",
        ] {
            assert!(l.resolve_backup(bad).is_err(), "{bad:?}");
        }
    }
}
