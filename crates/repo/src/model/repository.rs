//! The backup repository: kind, address, options, and the mount plan derived from them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::address::Address;
use super::error::ParseError;
use super::name::RepositoryName;
use super::options::{MountOption, MountOptions};
use super::protection::{Compression, Encryption, KeySource, Protection};
use nasbak_process::Secret;

/// What kind of storage a repository is, which decides how its address is parsed and mounted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RepositoryKind {
    /// NFS (v3 or v4; the version comes from `vers=`).
    Nfs,
    /// CIFS/SMB.
    Cifs,
    /// CephFS through the kernel client.
    CephFs,
    /// A path the admin already mounted on every host; nasbak never mounts it.
    Shared,
    /// Any file system type mount(8) knows (`ext4` on a loop image, `fuse.sshfs`, `glusterfs`, ...).
    Custom(FsType),
}

impl RepositoryKind {
    /// Builds a kind from its name and, for `custom`, the file system type.
    ///
    /// Accepted names: `nfs`, `cifs` (or `smb`), `cephfs` (or `ceph`), `shared`, `custom`.
    pub fn from_parts(name: &str, fstype: Option<&str>) -> Result<Self, ParseError> {
        let kind = match name.to_ascii_lowercase().as_str() {
            "nfs" => RepositoryKind::Nfs,
            "cifs" | "smb" => RepositoryKind::Cifs,
            "cephfs" | "ceph" => RepositoryKind::CephFs,
            "shared" => RepositoryKind::Shared,
            "custom" => {
                let Some(t) = fstype else {
                    return Err(ParseError::new(
                        "repository type",
                        name,
                        0,
                        "a custom repository needs a file system type",
                        "give --fstype, for example ext4 or fuse.sshfs",
                    ));
                };
                return Ok(RepositoryKind::Custom(t.parse()?));
            }
            _ => {
                return Err(ParseError::new(
                    "repository type",
                    name,
                    0,
                    "unknown type",
                    "expected one of nfs, cifs, cephfs, shared, custom",
                ));
            }
        };
        if let Some(t) = fstype {
            return Err(ParseError::new(
                "file system type",
                t,
                0,
                format!("only a custom repository takes a file system type, not {kind}"),
                "leave it out, or use type custom",
            ));
        }
        Ok(kind)
    }

    /// The file system type given to mount(8), or `None` for `shared`.
    pub fn fstype(&self) -> Option<&str> {
        match self {
            RepositoryKind::Nfs => Some("nfs"),
            RepositoryKind::Cifs => Some("cifs"),
            RepositoryKind::CephFs => Some("ceph"),
            RepositoryKind::Shared => None,
            RepositoryKind::Custom(t) => Some(t.as_str()),
        }
    }

    fn parse_address(&self, input: &str) -> Result<Address, ParseError> {
        match self {
            RepositoryKind::Nfs => Address::parse_nfs(input),
            RepositoryKind::Cifs => Address::parse_cifs(input),
            RepositoryKind::CephFs => Address::parse_ceph(input),
            RepositoryKind::Shared => Address::parse_shared(input),
            RepositoryKind::Custom(_) => Address::parse_custom(input),
        }
    }
}

impl fmt::Display for RepositoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepositoryKind::Nfs => "nfs",
            RepositoryKind::Cifs => "cifs",
            RepositoryKind::CephFs => "cephfs",
            RepositoryKind::Shared => "shared",
            RepositoryKind::Custom(_) => "custom",
        })
    }
}

/// A file system type name for mount(8) `-t`, such as `ext4` or `fuse.sshfs`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FsType(String);

impl FsType {
    /// The type as mount(8) takes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for FsType {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let expected = "expected a file system type such as ext4, xfs, fuse.sshfs or glusterfs";
        if s.is_empty() || s.starts_with('-') {
            return Err(ParseError::new("file system type", s, 0, "it is empty or starts with '-'", expected));
        }
        if let Some(i) = s.find(|c: char| !(c.is_ascii_alphanumeric() || "._+-".contains(c))) {
            return Err(ParseError::new("file system type", s, i, "this character is not allowed", expected));
        }
        Ok(FsType(s.to_owned()))
    }
}

/// Default NFS options added when the admin did not set them: soft mounts that give up, so a
/// stalled NAS returns EIO to the backup instead of hanging the host (the reference's defect 2).
///
/// Over TCP the client waits `timeo` tenths of a second, then backs off linearly for `retrans`
/// retries: 10 s + 20 s + 30 s, so a stalled server surfaces as an I/O error after about one
/// minute. Give `hard` (or your own `timeo`/`retrans`) to choose otherwise.
pub const NFS_DEFAULT_OPTIONS: &[(&str, Option<&str>)] =
    &[("soft", None), ("timeo", Some("100")), ("retrans", Some("2"))];

/// Upper bound, in seconds, of how long a soft NFS mount with the default options waits for a
/// stalled server before an operation fails.
pub const NFS_DEFAULT_STALL_BOUND_SECS: u64 = 60;

/// Options that must not be given twice (with any values).
const SINGLE_VALUED: &[&str] = &[
    "vers",
    "nfsvers",
    "timeo",
    "retrans",
    "rsize",
    "wsize",
    "sec",
    "port",
    "proto",
    "username",
    "user",
    "domain",
    "uid",
    "gid",
    "name",
    "fsid",
    "credentials",
    "secretfile",
];
/// Pairs of flags that contradict each other.
const CONTRADICTIONS: &[(&str, &str)] = &[("soft", "hard"), ("ro", "rw"), ("sync", "async")];

fn check_consistent(options: &MountOptions) -> Result<(), ParseError> {
    let shown = options.to_string();
    let keys: Vec<String> = options.iter().map(|o| o.key().to_ascii_lowercase()).collect();
    let position_of = |n: usize| options.iter().take(n).map(|o| o.to_string().len() + 1).sum::<usize>();
    for (i, key) in keys.iter().enumerate() {
        let same = |k: &str| k == key || (key == "vers" && k == "nfsvers") || (key == "nfsvers" && k == "vers");
        if SINGLE_VALUED.contains(&key.as_str()) && keys[..i].iter().any(|k| same(k)) {
            return Err(ParseError::new(
                "mount options",
                &shown,
                position_of(i),
                format!("{key} is given twice"),
                "keep one",
            ));
        }
        for (a, b) in CONTRADICTIONS {
            let other = if key == a {
                b
            } else if key == b {
                a
            } else {
                continue;
            };
            if keys[..i].iter().any(|k| k == other) {
                return Err(ParseError::new(
                    "mount options",
                    &shown,
                    position_of(i),
                    format!("{key} contradicts {other}"),
                    "keep one of them",
                ));
            }
        }
    }
    Ok(())
}

/// A backup repository: where backups are stored and how to mount it.
///
/// ```
/// use nasbak_repo::{BackupRepository, RepositoryKind};
/// let r = BackupRepository::new("nas1", RepositoryKind::Nfs, "nas1:/backups", "vers=4.2", None).unwrap();
/// let plan = r.mount_plan().unwrap();
/// assert_eq!(plan.options.to_string(), "vers=4.2,soft,timeo=100,retrans=2");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RepositoryRecord", into = "RepositoryRecord")]
pub struct BackupRepository {
    name: RepositoryName,
    kind: RepositoryKind,
    address: Address,
    mount_options: MountOptions,
    zone: Option<String>,
    protection: Protection,
}

impl BackupRepository {
    /// Validates and builds a repository: the name, the address for this kind, the options, and
    /// that secrets are given only where they can be kept off argv (CIFS and CephFS).
    pub fn new(
        name: &str,
        kind: RepositoryKind,
        address: &str,
        options: &str,
        zone: Option<&str>,
    ) -> Result<Self, ParseError> {
        let name = RepositoryName::new(name)?;
        let address = kind.parse_address(address)?;
        let mount_options = MountOptions::parse(options)?;
        check_consistent(&mount_options)?;
        let allows_secrets = matches!(kind, RepositoryKind::Cifs | RepositoryKind::CephFs);
        if let Some(o) = mount_options.iter().find(|o| o.is_secret()).filter(|_| !allows_secrets) {
            return Err(ParseError::new(
                "mount options",
                &mount_options.to_string(),
                0,
                format!("{} is a secret, and a {kind} repository has no way to keep it off the command line", o.key()),
                "secrets are supported for cifs (credentials file) and cephfs (secretfile); use a key file option of the file system instead",
            ));
        }
        if kind == RepositoryKind::Shared && !mount_options.is_empty() {
            return Err(ParseError::new(
                "mount options",
                &mount_options.to_string(),
                0,
                "a shared repository is never mounted by nasbak",
                "leave the options empty",
            ));
        }
        Ok(BackupRepository {
            name,
            kind,
            address,
            mount_options,
            zone: zone.map(str::to_owned),
            protection: Protection::none(),
        })
    }

    /// The repository's name.
    pub fn name(&self) -> &RepositoryName {
        &self.name
    }
    /// The repository's kind.
    pub fn kind(&self) -> &RepositoryKind {
        &self.kind
    }
    /// The parsed address.
    pub fn address(&self) -> &Address {
        &self.address
    }
    /// The options as the admin gave them.
    pub fn mount_options(&self) -> &MountOptions {
        &self.mount_options
    }
    /// How its backup files are protected (compression, encryption, key); none unless set with
    /// [`BackupRepository::with_protection`].
    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// The repository with `protection` for its future backups (compression, encryption, key).
    pub fn with_protection(mut self, protection: Protection) -> Self {
        self.protection = protection;
        self
    }

    /// The zone, if any.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// How to mount this repository, or `None` for a `shared` one (already mounted by the admin).
    pub fn mount_plan(&self) -> Option<MountPlan> {
        let fstype = self.kind.fstype()?.to_owned();
        let mut options = self.mount_options.clone();
        let mut credentials = None;
        match self.kind {
            RepositoryKind::Nfs => {
                let chose_mode = options.contains("soft") || options.contains("hard");
                for (key, value) in NFS_DEFAULT_OPTIONS {
                    if (*key == "soft" && chose_mode) || options.contains(key) {
                        continue;
                    }
                    options.push(option(key, *value));
                }
            }
            RepositoryKind::Cifs => {
                let mut secret = String::new();
                for key in ["password", "pass", "password2"] {
                    for o in options.take(key) {
                        let v = o.value().map(|v| v.unquoted()).unwrap_or_default();
                        let file_key = if key == "password2" { "password2" } else { "password" };
                        secret.push_str(&format!("{file_key}={v}\n"));
                    }
                }
                if !secret.is_empty() {
                    credentials = Some(CredentialsFile { option: "credentials", contents: Secret::new(secret) });
                }
                if !options.contains("nobrl") {
                    options.push(option("nobrl", None));
                }
            }
            RepositoryKind::CephFs => {
                if let Some(o) = options.take("secret").into_iter().next() {
                    let v = o.value().map(|v| v.unquoted()).unwrap_or_default();
                    credentials = Some(CredentialsFile { option: "secretfile", contents: Secret::new(v) });
                }
            }
            RepositoryKind::Shared | RepositoryKind::Custom(_) => {}
        }
        Some(MountPlan { fstype, source: self.address.to_string(), options, credentials })
    }

    /// The directory holding the backups: the mount point for mounted kinds, the path itself for
    /// `shared`.
    pub fn shared_path(&self) -> Option<PathBuf> {
        match &self.address {
            Address::Shared(p) => Some(p.clone()),
            _ => None,
        }
    }
}

fn option(key: &str, value: Option<&str>) -> MountOption {
    match value {
        Some(v) => MountOption::with_value(key, v),
        None => MountOption::flag(key),
    }
    .expect("built-in options are valid")
}

/// What to run to mount a repository. Secret options have been moved to `credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// `-t` of mount(8).
    pub fstype: String,
    /// The source argument of mount(8).
    pub source: String,
    /// `-o` of mount(8), without secrets; the credentials option is added at mount time.
    pub options: MountOptions,
    /// The secrets, to be written to a 0600 file named by an option.
    pub credentials: Option<CredentialsFile>,
}

/// What may be shown of a repository (listings, `--json`): its secrets redacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RepositorySummary {
    /// Its name.
    pub name: String,
    /// Its kind (`nfs`, `cifs`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its address.
    pub address: String,
    /// Its mount options, secret values shown as `***`.
    pub options: String,
    /// Its zone.
    pub zone: Option<String>,
    /// The compression of its new backup files (`zstd` or `none`).
    pub compression: String,
    /// The encryption of its new backup files (`luks` or `none`).
    pub encryption: String,
    /// Where the key comes from (`file:PATH` or `libvirt-secret:UUID`), never the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl BackupRepository {
    /// What may be shown of it.
    pub fn summary(&self) -> RepositorySummary {
        RepositorySummary {
            name: self.name.to_string(),
            kind: self.kind.to_string(),
            address: self.address.to_string(),
            options: self.mount_options.to_string(),
            zone: self.zone.clone(),
            compression: self.protection.compression().to_string(),
            encryption: self.protection.encryption().to_string(),
            key: self.protection.key().map(ToString::to_string),
        }
    }
}

/// A file of secrets handed to the mount helper by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsFile {
    /// The option that names the file (`credentials` for CIFS, `secretfile` for CephFS).
    pub option: &'static str,
    /// What the file holds.
    pub contents: Secret,
}

/// The serialized form of a repository (configuration files).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RepositoryRecord {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fstype: Option<String>,
    address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    options: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    compression: Compression,
    #[serde(default, skip_serializing_if = "is_default")]
    encryption: Encryption,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl TryFrom<RepositoryRecord> for BackupRepository {
    type Error = ParseError;
    fn try_from(r: RepositoryRecord) -> Result<Self, ParseError> {
        let kind = RepositoryKind::from_parts(&r.kind, r.fstype.as_deref())?;
        let key = r.key.as_deref().map(str::parse::<KeySource>).transpose()?;
        let protection = Protection::new(r.compression, r.encryption, key)?;
        Ok(BackupRepository::new(&r.name, kind, &r.address, &r.options, r.zone.as_deref())?.with_protection(protection))
    }
}

impl From<BackupRepository> for RepositoryRecord {
    fn from(r: BackupRepository) -> Self {
        let fstype = match &r.kind {
            RepositoryKind::Custom(t) => Some(t.as_str().to_owned()),
            _ => None,
        };
        RepositoryRecord {
            name: r.name.to_string(),
            kind: r.kind.to_string(),
            fstype,
            address: r.address.to_string(),
            options: r.mount_options.to_mount_string(),
            zone: r.zone,
            compression: r.protection.compression(),
            encryption: r.protection.encryption(),
            key: r.protection.key().map(ToString::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(kind: RepositoryKind, address: &str, options: &str) -> Result<BackupRepository, ParseError> {
        BackupRepository::new("r1", kind, address, options, None)
    }

    fn plan_options(kind: RepositoryKind, address: &str, options: &str) -> String {
        repo(kind, address, options).unwrap().mount_plan().unwrap().options.to_mount_string()
    }

    #[test]
    fn nfs_defaults_bound_hangs_and_yield_to_the_admin() {
        assert_eq!(plan_options(RepositoryKind::Nfs, "n:/e", ""), "soft,timeo=100,retrans=2");
        // The defaults bound a stalled server: timeo (tenths of a second), backing off linearly
        // over the first try and the retries.
        let timeo = NFS_DEFAULT_OPTIONS
            .iter()
            .find(|(k, _)| *k == "timeo")
            .and_then(|(_, v)| v.and_then(|v| v.parse::<u64>().ok()));
        let retrans = NFS_DEFAULT_OPTIONS
            .iter()
            .find(|(k, _)| *k == "retrans")
            .and_then(|(_, v)| v.and_then(|v| v.parse::<u64>().ok()));
        let tries = retrans.unwrap() + 1;
        assert_eq!(timeo.unwrap() / 10 * tries * (tries + 1) / 2, NFS_DEFAULT_STALL_BOUND_SECS);
        assert_eq!(plan_options(RepositoryKind::Nfs, "n:/e", "hard"), "hard,timeo=100,retrans=2");
        assert_eq!(plan_options(RepositoryKind::Nfs, "n:/e", "timeo=50,vers=3"), "timeo=50,vers=3,soft,retrans=2");
    }

    #[test]
    fn cifs_gets_nobrl_once_and_moves_the_password_to_a_file() {
        let r = repo(RepositoryKind::Cifs, "//n/s", r#"username=bk,password="p,w",vers=3.1.1"#).unwrap();
        let plan = r.mount_plan().unwrap();
        assert_eq!(plan.options.to_mount_string(), "username=bk,vers=3.1.1,nobrl");
        let creds = plan.credentials.unwrap();
        assert_eq!(creds.option, "credentials");
        assert_eq!(creds.contents.expose(), "password=p,w\n");
        assert!(!format!("{r:?}").contains("p,w"));
        assert_eq!(plan_options(RepositoryKind::Cifs, "//n/s", "nobrl"), "nobrl");
    }

    #[test]
    fn ceph_secret_goes_to_a_secretfile() {
        let r = repo(RepositoryKind::CephFs, "m1:/", "name=bk,secret=AQB==").unwrap();
        let plan = r.mount_plan().unwrap();
        assert_eq!(plan.options.to_mount_string(), "name=bk");
        assert_eq!(plan.credentials.unwrap().contents.expose(), "AQB==");
        assert_eq!(plan.fstype, "ceph");
    }

    #[test]
    fn contradictions_and_repeats_are_errors() {
        let e = repo(RepositoryKind::Nfs, "n:/e", "soft,vers=4,hard").unwrap_err();
        assert_eq!(e.position, 12);
        assert!(e.problem.contains("hard contradicts soft"), "{e}");
        let e = repo(RepositoryKind::Nfs, "n:/e", "vers=4,nfsvers=3").unwrap_err();
        assert!(e.problem.contains("given twice"), "{e}");
        assert!(repo(RepositoryKind::Nfs, "n:/e", "x-unknown=1,x-unknown=2").is_ok());
    }

    #[test]
    fn secrets_only_where_they_stay_off_argv() {
        let e = repo(RepositoryKind::Nfs, "n:/e", "password=x").unwrap_err();
        assert!(e.to_string().contains("password is a secret"), "{e}");
        assert!(!e.to_string().contains("=x"), "{e}");
        assert!(repo(RepositoryKind::Shared, "/mnt/x", "ro").is_err());
    }

    #[test]
    fn kinds() {
        assert_eq!(RepositoryKind::from_parts("CEPH", None).unwrap(), RepositoryKind::CephFs);
        assert!(RepositoryKind::from_parts("custom", None).is_err());
        assert!(RepositoryKind::from_parts("nfs", Some("ext4")).is_err());
        assert!(RepositoryKind::from_parts("zfs", None).unwrap_err().to_string().contains("one of nfs"));
        let k = RepositoryKind::from_parts("custom", Some("fuse.sshfs")).unwrap();
        assert_eq!(k.fstype(), Some("fuse.sshfs"));
        assert!(RepositoryKind::from_parts("custom", Some("-x")).is_err());
    }

    #[test]
    fn serde_round_trip_keeps_secrets_for_the_config_only() {
        let r = repo(RepositoryKind::Cifs, "//n/s", "password=pw").unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("password=pw"), "{json}");
        let back: BackupRepository = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let bad = r#"{"name":"x","type":"nfs","address":"nohost"}"#;
        assert!(serde_json::from_str::<BackupRepository>(bad).unwrap_err().to_string().contains("NFS address"));
    }
}
