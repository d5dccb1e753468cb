//! `manifest.json`: what a backup holds. A backup is complete exactly when its manifest is in its
//! final place, so the manifest is written last, and validated when read.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::ParseError;
use super::layout::{BackupId, parse_disk_file_name};
use super::name::VmName;

/// The manifest format this code writes.
pub const MANIFEST_VERSION: u32 = 1;

/// How the disks were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMethod {
    /// libvirt's push backup job of a running VM.
    PushJob,
    /// qemu-img of a shut-off VM.
    QemuImg,
}

/// A checksum of a backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    /// The algorithm: `blake3` (what nasbak writes), or `sha256` in older manifests.
    pub algorithm: String,
    /// The digest, lowercase hex.
    pub value: String,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// The target device in the VM (`vda`): with `volume`, the disk's identity for restore.
    pub target: String,
    /// The volume identity (the file name part after `root.`/`datadisk.`).
    pub volume: String,
    /// Where the data came from (path, `rbd:pool/image`, ...).
    pub source: String,
    /// The source's format.
    pub source_format: Option<String>,
    /// The backup file, a name inside the backup directory (`root.<volume>.qcow2`).
    pub file: String,
    /// The backup file's format (qcow2).
    pub format: String,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// The backup file's size in bytes.
    pub size: u64,
    /// The backup file's checksum.
    pub checksum: Option<Checksum>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] when written.
    pub version: u32,
    /// The backup id (the directory name).
    pub id: String,
    /// The repository's name.
    pub repository: String,
    /// The VM's name.
    pub vm: String,
    /// How the disks were read.
    pub method: BackupMethod,
    /// When the backup started.
    pub started: DateTime<Utc>,
    /// When it finished.
    pub finished: DateTime<Utc>,
    /// Whether the guest's file systems were frozen when the job started.
    pub quiesced: bool,
    /// Why not, or anything worth knowing about quiesce.
    pub quiesce_note: Option<String>,
    /// The libvirt version on the host.
    pub libvirt_version: Option<String>,
    /// The QEMU version on the host.
    pub qemu_version: Option<String>,
    /// The schedule that made it (`None`: made by hand); per-schedule retention counts these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The disks.
    pub disks: Vec<ManifestDisk>,
}

impl Manifest {
    /// Reads and validates a manifest: known version, a valid id and VM name, and disk files that
    /// are plain backup file names inside the backup directory (never a path elsewhere).
    pub fn from_json(text: &str) -> Result<Manifest, ParseError> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| {
            ParseError::new(
                "manifest",
                "manifest.json",
                e.column(),
                format!("line {}: {e}", e.line()),
                "expected a manifest written by nasbak",
            )
        })?;
        if m.version == 0 || m.version > MANIFEST_VERSION {
            return Err(ParseError::new(
                "manifest",
                "manifest.json",
                0,
                format!("version {} is not one this nasbak reads", m.version),
                format!("expected version 1 to {MANIFEST_VERSION}; upgrade nasbak"),
            ));
        }
        m.id.parse::<BackupId>()?;
        VmName::new(&m.vm)?;
        for d in &m.disks {
            if parse_disk_file_name(&d.file).is_none() {
                return Err(ParseError::new(
                    "manifest",
                    &d.file,
                    0,
                    "this disk file is not a backup file name",
                    "expected root.<volume>.qcow2 or datadisk.<volume>.qcow2",
                ));
            }
        }
        for (i, d) in m.disks.iter().enumerate() {
            if let Some(other) = m.disks[..i].iter().find(|o| o.file.eq_ignore_ascii_case(&d.file)) {
                return Err(ParseError::new(
                    "manifest",
                    &d.file,
                    0,
                    format!("disks {} and {} share this file, so one of them was not saved", other.target, d.target),
                    "expected one file per disk; this backup cannot be restored safely",
                ));
            }
            if m.disks[..i].iter().any(|o| o.target == d.target) {
                return Err(ParseError::new(
                    "manifest",
                    &d.target,
                    0,
                    "two disks have this target",
                    "expected one disk per target device",
                ));
            }
        }
        Ok(m)
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        Manifest {
            version: MANIFEST_VERSION,
            id: "2027.01.15.08.00.00".into(),
            repository: "nas1".into(),
            vm: "web1".into(),
            method: BackupMethod::PushJob,
            started: t,
            finished: t,
            quiesced: true,
            quiesce_note: None,
            libvirt_version: Some("9.0.0".into()),
            qemu_version: Some("7.2.22".into()),
            schedule: Some("web1-daily".into()),
            disks: vec![ManifestDisk {
                target: "vda".into(),
                volume: "vol-1".into(),
                source: "/var/lib/libvirt/images/web1.qcow2".into(),
                source_format: Some("qcow2".into()),
                file: "root.vol-1.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 1 << 30,
                size: 1 << 20,
                checksum: Some(Checksum { algorithm: "sha256".into(), value: "ab".repeat(32) }),
            }],
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let m = sample();
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        let mut bad = sample();
        bad.disks[0].file = "../../etc/passwd".into();
        assert!(Manifest::from_json(&bad.to_json()).unwrap_err().to_string().contains("not a backup file name"));
        let mut newer = sample();
        newer.version = MANIFEST_VERSION + 1;
        assert!(Manifest::from_json(&newer.to_json()).unwrap_err().to_string().contains("upgrade nasbak"));
        let mut shared = sample();
        let mut second = shared.disks[0].clone();
        second.target = "vdb".into();
        second.file = "root.VOL-1.qcow2".into();
        shared.disks.push(second);
        let e = Manifest::from_json(&shared.to_json()).unwrap_err().to_string();
        assert!(e.contains("disks vda and vdb share this file"), "{e}");
        let mut twice = sample();
        let mut second = twice.disks[0].clone();
        second.file = "datadisk.vol-2.qcow2".into();
        twice.disks.push(second);
        assert!(Manifest::from_json(&twice.to_json()).unwrap_err().to_string().contains("two disks have this target"));
        let e = Manifest::from_json("{\n  \"version\": 1,\n  oops").unwrap_err();
        assert!(e.problem.contains("line 3"), "{e}");
    }
}
