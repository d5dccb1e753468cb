//! `manifest.json`: what a backup holds. A backup is complete exactly when its manifest is in its
//! final place, so the manifest is written last, and validated when read.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::ParseError;
use super::layout::{BackupId, parse_disk_file_name};
use super::name::VmName;
use super::protection::FileFormat;

/// The newest manifest format this code reads and writes. A full backup is written as version 1
/// (so older nasbak versions still read it); a backup with an incremental disk needs version 2,
/// which older versions refuse rather than restore only the top of a chain; a backup with a
/// compressed or encrypted file needs version 3, which older versions refuse rather than open
/// such a file as a plain qcow2.
pub const MANIFEST_VERSION: u32 = 3;

/// Whether a backup (or one disk of it) holds all the data or only what changed since its parent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMode {
    /// Every block: a self-contained file.
    #[default]
    Full,
    /// The blocks changed since the parent backup: a qcow2 whose backing file is the same disk's
    /// file in the parent.
    Incremental,
}

impl std::fmt::Display for BackupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupMode::Full => "full",
            BackupMode::Incremental => "incremental",
        })
    }
}

/// The libvirt checkpoint a backup created, kept with the backup so that the chain can be
/// continued on any host (the checkpoint redefined from here when libvirt lost it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The checkpoint's name (also each disk's bitmap name).
    pub name: String,
    /// Its `<domaincheckpoint>` definition as libvirt printed it.
    pub xml: String,
}

/// The backing file an incremental disk file names: `../<parent id>/<file>`, relative to the
/// backup's own directory, so that a chain resolves wherever the repository is mounted.
pub fn backing_path(parent: &BackupId, file: &str) -> String {
    format!("../{parent}/{file}")
}

/// How the disks were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMethod {
    /// libvirt's push backup job of a running VM.
    PushJob,
    /// libvirt's pull backup job of a running VM, its export read and the files written
    /// (compressed, encrypted) by nasbak.
    PullJob,
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
    /// Full, or incremental on top of `backing`.
    #[serde(default)]
    pub mode: BackupMode,
    /// For an incremental disk: its file's backing file, [`backing_path`] of the parent's file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// Why this disk was copied in full in an incremental backup (a new, resized or raw disk, a
    /// missing bitmap, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// How the backup file is stored: plain, compressed, encrypted, or compressed inside a LUKS
    /// container. Readers open the file by this, never by probing.
    #[serde(default, skip_serializing_if = "is_plain")]
    pub stored_as: FileFormat,
    /// For a disk on Ceph RBD: the snapshot of its image this backup was read from, kept on the
    /// image for the next incremental (whose file then holds what changed since it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd_snapshot: Option<RbdSnapshotRecord>,
    /// Read from a reference-system backup, which has no manifest (never in a manifest): its
    /// entry was made from its file (the header's size and backing name, resolved inside the
    /// repository), so its chain is opened file by file, never by the names in the headers.
    #[serde(skip)]
    pub reference: bool,
}

/// The RBD snapshot a backup of a disk was read from: what the next incremental proves it
/// builds on before it reads the differences since it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdSnapshotRecord {
    /// The snapshot's name on the image (`nasbak-<backup id>`).
    pub name: String,
    /// The snapshot's id in the image: a snapshot of the same name made elsewhere (another
    /// tool, a deep copy of the image) has another.
    pub id: u64,
    /// The image's id: an image removed and created again under its name has another.
    pub image_id: String,
}

/// What part of a VM's state outside its disks a [`ManifestState`] file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateKind {
    /// The UEFI variable store (`<os><nvram>`): boot entries, Secure Boot keys and databases.
    Nvram,
    /// A file of an emulated TPM's state directory (swtpm's).
    Tpm,
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateKind::Nvram => "NVRAM",
            StateKind::Tpm => "TPM state",
        })
    }
}

/// The file name of the NVRAM copy inside a backup directory.
pub const NVRAM_FILE: &str = "state.nvram";
/// The prefix of a TPM state file's copy inside a backup directory: `state.tpm.<its name>`.
pub const TPM_FILE_PREFIX: &str = "state.tpm.";

/// Whether `name` can be a file of a TPM state directory that nasbak keeps: a plain name of
/// letters, digits, `.`, `_` and `-` (at most 100), not hidden (swtpm's `.lock` is not state).
pub fn is_tpm_state_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One file of a VM's state outside its disks (the NVRAM, a TPM state file), kept beside the
/// disk files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestState {
    /// What it is.
    pub kind: StateKind,
    /// Its file inside the backup directory: [`NVRAM_FILE`], or [`TPM_FILE_PREFIX`] and `name`.
    pub file: String,
    /// Its file name where it was (in the TPM state directory, what a restore writes it back
    /// as).
    pub name: String,
    /// Where it was: the NVRAM file, or the TPM state directory.
    pub source: String,
    /// Its length in bytes (what was read, before any encryption).
    pub size: u64,
    /// The checksum of its content (before any encryption): what a restore writes back.
    pub checksum: Checksum,
    /// Its permission bits where it was.
    pub mode: u32,
    /// Its owner where it was.
    pub uid: u32,
    /// Its group where it was.
    pub gid: u32,
    /// How the copy is stored: plain (the bytes as they were) or encrypted (a LUKS-encrypted
    /// qcow2 of them, opened with the repository's key, read as raw and cut at `size`).
    #[serde(default, skip_serializing_if = "is_plain")]
    pub stored_as: FileFormat,
}

fn is_plain(f: &FileFormat) -> bool {
    *f == FileFormat::Plain
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
    /// Full (every disk self-contained), or incremental (at least one disk builds on `parent`).
    #[serde(default)]
    pub mode: BackupMode,
    /// The backup of the same VM on the same repository this one builds on.
    #[serde(default)]
    pub parent: Option<String>,
    /// The checkpoint this backup created in the domain, the base of the next incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointRecord>,
    /// Why a full backup was made although an incremental was asked for or possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// The VM's state outside its disks (its NVRAM, its TPM's state), each file complete in
    /// every backup, whatever its disks' mode. Empty for a VM without either, and in backups
    /// made before nasbak kept them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<ManifestState>,
    /// What of the VM's state outside its disks could not be kept, and why (an NVRAM file
    /// libvirt has not made yet, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_note: Option<String>,
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
        m.check_chain()?;
        m.check_state()?;
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

    /// The version this manifest must be written as: 1 for a full backup, 2 when a disk is
    /// incremental.
    pub fn required_version(&self) -> u32 {
        if self.disks.iter().any(|d| d.stored_as != FileFormat::Plain) {
            3
        } else if self.mode == BackupMode::Full && self.disks.iter().all(|d| d.mode == BackupMode::Full) {
            1
        } else {
            2
        }
    }

    /// The chain fields agree: an incremental names an earlier parent, every incremental disk
    /// points at `../<parent>/<backup file>`, a full has no incremental disk, and the version
    /// is one that says so.
    fn check_chain(&self) -> Result<(), ParseError> {
        let bad = |input: &str, problem: String| {
            ParseError::new(
                "manifest",
                input,
                0,
                problem,
                "expected a full backup, or an incremental on an earlier backup",
            )
        };
        let incremental_disks: Vec<&ManifestDisk> =
            self.disks.iter().filter(|d| d.mode == BackupMode::Incremental).collect();
        if self.version < self.required_version() {
            return Err(bad(
                "manifest.json",
                format!("this backup needs version {}, it says {}", self.required_version(), self.version),
            ));
        }
        match (self.mode, &self.parent) {
            (BackupMode::Full, _) if !incremental_disks.is_empty() => {
                return Err(bad(&incremental_disks[0].target, "a disk is incremental in a full backup".into()));
            }
            (BackupMode::Full, Some(p)) => return Err(bad(p, "a full backup has no parent".into())),
            (BackupMode::Incremental, None) => {
                return Err(bad("manifest.json", "an incremental backup names no parent".into()));
            }
            (BackupMode::Incremental, Some(p)) => {
                let parent: BackupId = p.parse()?;
                let own: BackupId = self.id.parse()?;
                if parent >= own {
                    return Err(bad(p, format!("the parent is not older than the backup {}", self.id)));
                }
                if incremental_disks.is_empty() {
                    return Err(bad("manifest.json", "an incremental backup has no incremental disk".into()));
                }
                for d in &incremental_disks {
                    let file = d.backing.as_deref().and_then(|b| b.strip_prefix(&format!("../{p}/")));
                    if file.is_none_or(|f| parse_disk_file_name(f).is_none()) {
                        return Err(bad(
                            d.backing.as_deref().unwrap_or(&d.target),
                            format!("disk {} must be backed by ../{p}/<its backup file>", d.target),
                        ));
                    }
                }
            }
            (BackupMode::Full, None) => {}
        }
        if let Some(d) = self.disks.iter().find(|d| d.mode == BackupMode::Full && d.backing.is_some()) {
            return Err(bad(&d.target, "a full disk has a backing file".into()));
        }
        Ok(())
    }

    /// The state files are plain names inside the backup directory, stored plain or encrypted,
    /// one NVRAM at most, each TPM file named after its name in the state directory.
    fn check_state(&self) -> Result<(), ParseError> {
        let bad = |input: &str, problem: &str, valid: &str| ParseError::new("manifest", input, 0, problem, valid);
        for (i, s) in self.state.iter().enumerate() {
            match s.kind {
                StateKind::Nvram if s.file != NVRAM_FILE => {
                    return Err(bad(&s.file, "this NVRAM file is not the backup's", "expected state.nvram"));
                }
                StateKind::Tpm if s.file.strip_prefix(TPM_FILE_PREFIX) != Some(s.name.as_str()) => {
                    return Err(bad(
                        &s.file,
                        "this TPM state file is not named after its file",
                        "expected state.tpm.<name>",
                    ));
                }
                StateKind::Tpm if !is_tpm_state_name(&s.name) => {
                    return Err(bad(
                        &s.name,
                        "this is not a TPM state file name",
                        "expected letters, digits, '.', '_' and '-', not starting with '.'",
                    ));
                }
                _ => {}
            }
            if !matches!(s.stored_as, FileFormat::Plain | FileFormat::Encrypted) {
                return Err(bad(&s.file, "a state file is stored plain or encrypted", "expected plain or encrypted"));
            }
            if self.state[..i].iter().any(|o| o.file.eq_ignore_ascii_case(&s.file)) {
                return Err(bad(&s.file, "two state entries have this file", "expected one entry per file"));
            }
        }
        Ok(())
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
                mode: BackupMode::Full,
                backing: None,
                full_reason: None,
                stored_as: FileFormat::Plain,
                rbd_snapshot: None,
                reference: false,
            }],
            mode: BackupMode::Full,
            parent: None,
            checkpoint: None,
            full_reason: None,
            state: Vec::new(),
            state_note: None,
        }
    }

    fn incremental() -> Manifest {
        let mut m = sample();
        m.id = "2027.01.16.08.00.00".into();
        m.version = 2;
        m.mode = BackupMode::Incremental;
        m.parent = Some("2027.01.15.08.00.00".into());
        m.checkpoint =
            Some(CheckpointRecord { name: "nasbak-2027.01.16.08.00.00".into(), xml: "<domaincheckpoint/>".into() });
        m.disks[0].mode = BackupMode::Incremental;
        m.disks[0].backing = Some(backing_path(&"2027.01.15.08.00.00".parse().unwrap(), "root.vol-1.qcow2"));
        m
    }

    #[test]
    fn chains_are_checked() {
        let m = incremental();
        assert_eq!(m.required_version(), 2);
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        assert_eq!(sample().required_version(), 1);
        let v1: Manifest = serde_json::from_str(&sample().to_json().replace(",\n  \"mode\": \"full\"", "")).unwrap();
        assert_eq!(v1.mode, BackupMode::Full, "manifests written before incrementals read as full");
        let broken = |f: &dyn Fn(&mut Manifest), what: &str| {
            let mut m = incremental();
            f(&mut m);
            let e = Manifest::from_json(&m.to_json()).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        broken(&|m| m.version = 1, "needs version 2, it says 1");
        broken(&|m| m.parent = None, "names no parent");
        broken(&|m| m.parent = Some("2027.01.17.00.00.00".into()), "not older");
        broken(&|m| m.disks[0].backing = Some("../../etc/root.vol-1.qcow2".into()), "must be backed by");
        broken(&|m| m.disks[0].backing = Some("/abs/root.vol-1.qcow2".into()), "must be backed by");
        broken(&|m| m.mode = BackupMode::Full, "incremental in a full backup");
        let mut full = sample();
        full.disks[0].backing = Some("../2027.01.14.08.00.00/root.vol-1.qcow2".into());
        let e = Manifest::from_json(&full.to_json()).unwrap_err().to_string();
        assert!(e.contains("a full disk has a backing file"), "{e}");
    }

    fn state(kind: StateKind, file: &str, name: &str) -> ManifestState {
        ManifestState {
            kind,
            file: file.into(),
            name: name.into(),
            source: "/var/lib/libvirt/swtpm/u/tpm2".into(),
            size: 9,
            checksum: Checksum { algorithm: "blake3".into(), value: "cd".repeat(32) },
            mode: 0o600,
            uid: 107,
            gid: 113,
            stored_as: FileFormat::Plain,
        }
    }

    #[test]
    fn state_files_are_plain_names_of_the_backup() {
        let mut m = sample();
        m.state = vec![
            state(StateKind::Nvram, NVRAM_FILE, "web1_VARS.fd"),
            state(StateKind::Tpm, "state.tpm.tpm2-00.permall", "tpm2-00.permall"),
        ];
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        assert_eq!(m.required_version(), 1, "older versions read the disks; the state is an addition");
        assert!(!sample().to_json().contains("state"), "a VM without state writes the manifest it always did");
        let broken = |s: ManifestState, what: &str| {
            let mut m = sample();
            m.state = vec![s];
            let e = Manifest::from_json(&m.to_json()).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        broken(state(StateKind::Nvram, "../../etc/shadow", "x"), "not the backup's");
        broken(state(StateKind::Tpm, "state.tpm.a", "b"), "not named after its file");
        broken(state(StateKind::Tpm, "state.tpm.../x", "../x"), "not a TPM state file name");
        broken(state(StateKind::Tpm, "state.tpm..lock", ".lock"), "not a TPM state file name");
        let mut compressed = state(StateKind::Nvram, NVRAM_FILE, "v");
        compressed.stored_as = FileFormat::Compressed;
        broken(compressed, "stored plain or encrypted");
        let mut twice = sample();
        twice.state = vec![state(StateKind::Nvram, NVRAM_FILE, "a"), state(StateKind::Nvram, NVRAM_FILE, "b")];
        assert!(Manifest::from_json(&twice.to_json()).unwrap_err().to_string().contains("two state entries"));
        assert!(is_tpm_state_name("tpm2-00.volatilestate") && !is_tpm_state_name("a/b") && !is_tpm_state_name(""));
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
