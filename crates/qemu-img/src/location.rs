//! Where an image is: a file or block device, or a Ceph RBD image.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nasbak_process::Secret;

use crate::stored::{KEY_SECRET_ID, StoredImage, key_object_args};

/// An image qemu-img reads or writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// A file or a block device.
    Path(PathBuf),
    /// A Ceph RBD image.
    Rbd(RbdSpec),
    /// A qcow2 chain stored compressed, encrypted or both, opened with its key.
    Stored(StoredImage),
}

impl From<StoredImage> for ImageLocation {
    fn from(s: StoredImage) -> Self {
        ImageLocation::Stored(s)
    }
}

impl From<&Path> for ImageLocation {
    fn from(p: &Path) -> Self {
        ImageLocation::Path(p.to_owned())
    }
}

impl From<PathBuf> for ImageLocation {
    fn from(p: PathBuf) -> Self {
        ImageLocation::Path(p)
    }
}

/// A location that does not parse (see [`ImageLocation`]'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid image location {input:?} at byte {position}: {problem}; expected an absolute path or rbd:POOL/IMAGE (or rbd:POOL/NAMESPACE/IMAGE)"
)]
#[non_exhaustive]
pub struct LocationError {
    /// The input.
    pub input: String,
    /// Byte offset of the problem.
    pub position: usize,
    /// What is wrong there.
    pub problem: String,
}

impl std::str::FromStr for ImageLocation {
    type Err = LocationError;

    /// `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE` (Ceph's default client and ceph.conf; plain
    /// names without `/`, `:`, `@`, `\\` or control characters), or an absolute path. Its
    /// `Display` gives the same text back.
    fn from_str(s: &str) -> Result<Self, LocationError> {
        let bad = |position: usize, problem: &str| LocationError {
            input: s.to_owned(),
            position,
            problem: problem.to_owned(),
        };
        if let Some(pos) = s.find(|c: char| c.is_control()) {
            return Err(bad(pos, "a control character is not allowed"));
        }
        if let Some(rest) = s.strip_prefix("rbd:") {
            let parts: Vec<&str> = rest.split('/').collect();
            let mut offset = 4;
            for part in &parts {
                if part.is_empty() {
                    return Err(bad(offset, "an empty name"));
                }
                if let Some(i) = part.find([':', '@', '\\']) {
                    return Err(bad(offset + i, "pool, namespace and image must be plain names"));
                }
                offset += part.len() + 1;
            }
            let mut spec = match parts.as_slice() {
                [pool, image] => RbdSpec::new(pool, image),
                [pool, namespace, image] => {
                    let mut spec = RbdSpec::new(pool, image);
                    spec.namespace = Some((*namespace).to_owned());
                    spec
                }
                [_] => return Err(bad(s.len(), "no /IMAGE after the pool")),
                _ => return Err(bad(4, "more than POOL/NAMESPACE/IMAGE")),
            };
            spec.auth = RbdAuth::Default;
            return Ok(ImageLocation::Rbd(spec));
        }
        if !s.starts_with('/') {
            return Err(bad(0, "not an absolute path"));
        }
        Ok(ImageLocation::Path(PathBuf::from(s)))
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Path(p) => write!(f, "{}", p.display()),
            ImageLocation::Rbd(r) => write!(f, "{}", r.filename(None)),
            ImageLocation::Stored(s) => write!(f, "{}", s.top().unwrap_or(Path::new("")).display()),
        }
    }
}

/// How a client authenticates to Ceph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RbdAuth {
    /// Whatever `ceph.conf` and the default keyring say.
    Default,
    /// A keyring file the admin manages.
    Keyring(PathBuf),
    /// A key: written to a 0600 keyring file for the duration of one command, never on argv.
    Key(Secret),
}

/// A Ceph RBD image, with what is needed to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// An optional RADOS namespace.
    pub namespace: Option<String>,
    /// The image name.
    pub image: String,
    /// The Ceph client id (without `client.`).
    pub id: Option<String>,
    /// A ceph.conf to use.
    pub conf: Option<PathBuf>,
    /// Monitor addresses (`host` or `host:port`).
    pub mon_hosts: Vec<String>,
    /// Authentication.
    pub auth: RbdAuth,
    /// A snapshot of the image to read instead of the image itself (read-only).
    pub snapshot: Option<String>,
}

/// Escapes `:` and `\` as QEMU's rbd filename syntax wants.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

impl RbdSpec {
    /// A spec for `pool/image` with default authentication.
    pub fn new(pool: &str, image: &str) -> Self {
        RbdSpec {
            pool: pool.to_owned(),
            namespace: None,
            image: image.to_owned(),
            id: None,
            conf: None,
            mon_hosts: Vec::new(),
            auth: RbdAuth::Default,
            snapshot: None,
        }
    }

    /// The same image's snapshot `name`.
    pub fn at_snapshot(&self, name: &str) -> RbdSpec {
        RbdSpec { snapshot: Some(name.to_owned()), ..self.clone() }
    }

    /// QEMU's `rbd:` filename, pointing at `keyring` when given (the key itself never appears).
    pub fn filename(&self, keyring: Option<&Path>) -> String {
        let mut s = format!("rbd:{}/", escape(&self.pool));
        if let Some(ns) = &self.namespace {
            s.push_str(&escape(ns));
            s.push('/');
        }
        s.push_str(&escape(&self.image));
        if let Some(snap) = &self.snapshot {
            s.push_str(&format!("@{}", escape(snap)));
        }
        if let Some(id) = &self.id {
            s.push_str(&format!(":id={}", escape(id)));
        }
        if let Some(conf) = &self.conf {
            s.push_str(&format!(":conf={}", escape(&conf.to_string_lossy())));
        }
        if !self.mon_hosts.is_empty() {
            let hosts: Vec<String> = self.mon_hosts.iter().map(|h| escape(h)).collect();
            s.push_str(&format!(":mon_host={}", hosts.join("\\;")));
        }
        let keyring = match (&self.auth, keyring) {
            (_, Some(k)) => Some(k.to_owned()),
            (RbdAuth::Keyring(k), None) => Some(k.clone()),
            _ => None,
        };
        if let Some(k) = keyring {
            s.push_str(&format!(":keyring={}", escape(&k.to_string_lossy())));
        }
        s
    }
}

/// How long nasbak's own Ceph clients (qemu-img, rbd) wait for a monitor or an OSD before the
/// operation fails, in seconds. librados waits for ever by default: an OSD that dies under a
/// restore would hang it.
pub const RADOS_OP_TIMEOUT: u32 = 120;

/// The client options that bound every wait of nasbak's own Ceph clients ([`RADOS_OP_TIMEOUT`]),
/// as `(name, value)`.
pub(crate) fn rados_timeouts() -> [(&'static str, String); 3] {
    let t = RADOS_OP_TIMEOUT.to_string();
    [("rados_osd_op_timeout", t.clone()), ("rados_mon_op_timeout", t.clone()), ("client_mount_timeout", t)]
}

/// A temporary keyring file, removed on drop.
#[derive(Debug)]
pub(crate) struct TempKeyring(PathBuf);

impl TempKeyring {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempKeyring {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The filename qemu-img gets for `location`, and the keyring file that must live while it runs.
pub(crate) fn filename_for(
    location: &ImageLocation,
    private_dir: &Path,
) -> std::io::Result<(String, Option<TempKeyring>)> {
    match location {
        ImageLocation::Path(p) => Ok((p.to_string_lossy().into_owned(), None)),
        ImageLocation::Stored(s) => Ok((s.filename(true), None)),
        ImageLocation::Rbd(spec) => match &spec.auth {
            RbdAuth::Key(key) => {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(private_dir)?;
                let path = private_dir.join(format!("keyring-{}", uuid::Uuid::new_v4()));
                let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
                let guard = TempKeyring(path);
                let client = spec.id.as_deref().unwrap_or("admin");
                writeln!(f, "[client.{client}]\n\tkey = {}", key.expose())?;
                f.sync_all()?;
                Ok((with_timeouts(spec.filename(Some(guard.path()))), Some(guard)))
            }
            _ => Ok((with_timeouts(spec.filename(None)), None)),
        },
    }
}

/// An `rbd:` filename with the client options that bound its waits.
fn with_timeouts(mut name: String) -> String {
    for (k, v) in rados_timeouts() {
        name.push_str(&format!(":{k}={v}"));
    }
    name
}

/// The `--object` arguments a command that opens `location` needs (the key of a stored chain).
pub(crate) fn objects_for(location: &ImageLocation) -> Vec<String> {
    match location {
        ImageLocation::Stored(s) if s.needs_key() => key_object_args(KEY_SECRET_ID, s.key.as_deref()),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_filenames_escape_and_never_hold_the_key() {
        let mut s = RbdSpec::new("vms", "disk:1");
        s.id = Some("backup".into());
        s.mon_hosts = vec!["10.0.0.1:6789".into(), "10.0.0.2".into()];
        s.auth = RbdAuth::Key(Secret::new("AQBsecret=="));
        let dir = tempfile::tempdir().unwrap();
        let (name, guard) = filename_for(&ImageLocation::Rbd(s.clone()), dir.path()).unwrap();
        let keyring = guard.as_ref().unwrap().path().to_owned();
        assert_eq!(
            name,
            format!(
                "rbd:vms/disk\\:1:id=backup:mon_host=10.0.0.1\\:6789\\;10.0.0.2:keyring={}:rados_osd_op_timeout=120:rados_mon_op_timeout=120:client_mount_timeout=120",
                keyring.display()
            )
        );
        assert!(!name.contains("AQB"));
        assert_eq!(fs::read_to_string(&keyring).unwrap(), "[client.backup]\n\tkey = AQBsecret==\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&keyring).unwrap().permissions().mode() & 0o777, 0o600);
        drop(guard);
        assert!(!keyring.exists());
        assert!(!format!("{s:?}").contains("AQB"));
        assert_eq!(ImageLocation::Rbd(s).to_string(), "rbd:vms/disk\\:1:id=backup:mon_host=10.0.0.1\\:6789\\;10.0.0.2");
    }
}
