//! Repository addresses, parsed and validated per repository kind.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::error::{ParseError, first_control};
use super::host::{Host, parse_host};

/// An NFS export: `host:/export`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsAddress {
    /// The NFS server.
    pub host: Host,
    /// The exported path on the server; starts with `/`.
    pub export: String,
}

/// A CIFS/SMB share: `//host/share[/sub/dir]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CifsAddress {
    /// The SMB server.
    pub host: Host,
    /// The share name.
    pub share: String,
    /// A directory inside the share, without leading `/`; empty for the share root.
    pub subdir: String,
}

/// One Ceph monitor, with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephMonitor {
    /// The monitor host.
    pub host: Host,
    /// Its port, when not the default.
    pub port: Option<u16>,
}

/// A CephFS location, in either of the two syntaxes mount.ceph accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CephAddress {
    /// `mon1[:port],mon2[:port]:/path`.
    Monitors {
        /// The monitors, at least one.
        monitors: Vec<CephMonitor>,
        /// The path inside the file system; starts with `/`.
        path: String,
    },
    /// `user@fsid.fsname=/path` (the fsid may be empty: `user@.fsname=/path`).
    Named {
        /// The Ceph client name (without `client.`).
        user: String,
        /// The cluster fsid, when given.
        fsid: Option<uuid::Uuid>,
        /// The file system name.
        fs_name: String,
        /// The path inside the file system; starts with `/`.
        path: String,
    },
}

/// A repository address; which variant is allowed depends on the repository kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// NFS.
    Nfs(NfsAddress),
    /// CIFS/SMB.
    Cifs(CifsAddress),
    /// CephFS.
    Ceph(CephAddress),
    /// An absolute path already mounted on every host.
    Shared(PathBuf),
    /// The source argument of mount(8) for any other file system type, passed as written.
    Custom(String),
}

fn check_common(what: &'static str, input: &str, expected: &str) -> Result<(), ParseError> {
    if input.is_empty() {
        return Err(ParseError::new(what, input, 0, "it is empty", expected));
    }
    if let Some(pos) = first_control(input) {
        return Err(ParseError::new(what, input, pos, "it holds a control character", expected));
    }
    if input.starts_with('-') {
        return Err(ParseError::new(what, input, 0, "it starts with '-' and would be read as an option", expected));
    }
    Ok(())
}

fn check_path(what: &'static str, input: &str, at: usize, expected: &str) -> Result<String, ParseError> {
    let path = &input[at..];
    if !path.starts_with('/') {
        return Err(ParseError::new(what, input, at, "the path must start with '/'", expected));
    }
    Ok(path.to_owned())
}

const NFS_EXPECTED: &str = "expected host:/export, for example nas1:/backups or [fd00::1]:/backups";
const CIFS_EXPECTED: &str = "expected //host/share or //host/share/dir, for example //nas1/backups";
const CEPH_EXPECTED: &str = "expected mon1[:port],mon2[:port]:/path or user@fsid.fsname=/path, for example 10.0.0.1:6789,10.0.0.2:/ or admin@.cephfs=/";
const SHARED_EXPECTED: &str = "expected an absolute path without '..', for example /mnt/backups";
const CUSTOM_EXPECTED: &str = "expected the source argument of mount(8), for example /srv/backup.img";

impl Address {
    /// Parses an NFS address.
    ///
    /// ```
    /// let a = nasbak_repo::Address::parse_nfs("[fd00::1]:/exports/backup").unwrap();
    /// assert_eq!(a.to_string(), "[fd00::1]:/exports/backup");
    /// ```
    pub fn parse_nfs(input: &str) -> Result<Address, ParseError> {
        const W: &str = "NFS address";
        check_common(W, input, NFS_EXPECTED)?;
        let (host, end) = parse_host(W, input, 0, |c| c == ':')?;
        if !input[end..].starts_with(':') {
            return Err(ParseError::new(W, input, end, "':' after the host is missing", NFS_EXPECTED));
        }
        let export = check_path(W, input, end + 1, NFS_EXPECTED)?;
        Ok(Address::Nfs(NfsAddress { host, export }))
    }

    /// Parses a CIFS/SMB address.
    pub fn parse_cifs(input: &str) -> Result<Address, ParseError> {
        const W: &str = "CIFS address";
        check_common(W, input, CIFS_EXPECTED)?;
        if !input.starts_with("//") {
            let problem = if input.starts_with("\\\\") {
                "backslashes are not accepted, write forward slashes"
            } else {
                "it must start with '//'"
            };
            return Err(ParseError::new(W, input, 0, problem, CIFS_EXPECTED));
        }
        let (host, end) = parse_host(W, input, 2, |c| c == '/')?;
        if !input[end..].starts_with('/') {
            return Err(ParseError::new(W, input, end, "the share name is missing", CIFS_EXPECTED));
        }
        let rest = &input[end + 1..];
        let (share, subdir) = rest.split_once('/').unwrap_or((rest, ""));
        if share.is_empty() {
            return Err(ParseError::new(W, input, end + 1, "the share name is empty", CIFS_EXPECTED));
        }
        if let Some(i) = share.find(['\\', ':', '*', '?', '"', '<', '>', '|']) {
            return Err(ParseError::new(
                W,
                input,
                end + 1 + i,
                "this character is not allowed in a share name",
                CIFS_EXPECTED,
            ));
        }
        let subdir = subdir.trim_end_matches('/');
        if subdir.split('/').any(|c| c == ".." || (c.is_empty() && !subdir.is_empty())) {
            let pos = end + 2 + share.len();
            return Err(ParseError::new(W, input, pos, "the directory has an empty or '..' component", CIFS_EXPECTED));
        }
        Ok(Address::Cifs(CifsAddress { host, share: share.to_owned(), subdir: subdir.to_owned() }))
    }

    /// Parses a CephFS address in either syntax.
    pub fn parse_ceph(input: &str) -> Result<Address, ParseError> {
        const W: &str = "CephFS address";
        check_common(W, input, CEPH_EXPECTED)?;
        if let (Some(at), Some(eq)) = (input.find('@'), input.find('='))
            && at < eq
        {
            return parse_ceph_named(input, at, eq);
        }
        let mut monitors = Vec::new();
        let mut pos = 0;
        loop {
            let (host, end) = parse_host(W, input, pos, |c| c == ':' || c == ',')?;
            let mut port = None;
            let mut next = end;
            let after = &input[end..];
            if after.starts_with(':') && !after.starts_with(":/") {
                let digits: String = after[1..].chars().take_while(|c| c.is_ascii_digit()).collect();
                let value = digits.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    ParseError::new(W, input, end + 1, "the port is not a number from 1 to 65535", CEPH_EXPECTED)
                })?;
                port = Some(value);
                next = end + 1 + digits.len();
            }
            monitors.push(CephMonitor { host, port });
            let after = &input[next..];
            if after.starts_with(',') {
                pos = next + 1;
                continue;
            }
            if after.starts_with(":/") {
                let path = check_path(W, input, next + 1, CEPH_EXPECTED)?;
                return Ok(Address::Ceph(CephAddress::Monitors { monitors, path }));
            }
            return Err(ParseError::new(
                W,
                input,
                next,
                "expected ',' and another monitor, or ':/path'",
                CEPH_EXPECTED,
            ));
        }
    }

    /// Parses the path of a `shared` repository.
    pub fn parse_shared(input: &str) -> Result<Address, ParseError> {
        const W: &str = "shared path";
        check_common(W, input, SHARED_EXPECTED)?;
        let path = Path::new(input);
        if !path.is_absolute() {
            return Err(ParseError::new(W, input, 0, "the path is not absolute", SHARED_EXPECTED));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            let pos = input.find("..").unwrap_or(0);
            return Err(ParseError::new(W, input, pos, "'..' is not allowed", SHARED_EXPECTED));
        }
        Ok(Address::Shared(path.components().collect()))
    }

    /// Parses the source of a `custom` repository (any file system type mount(8) knows).
    pub fn parse_custom(input: &str) -> Result<Address, ParseError> {
        check_common("mount source", input, CUSTOM_EXPECTED)?;
        Ok(Address::Custom(input.to_owned()))
    }
}

fn parse_ceph_named(input: &str, at: usize, eq: usize) -> Result<Address, ParseError> {
    const W: &str = "CephFS address";
    let name_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let user = &input[..at];
    if !name_ok(user) {
        return Err(ParseError::new(
            W,
            input,
            0,
            "the user name is empty or holds a character other than A-Z a-z 0-9 - _ .",
            CEPH_EXPECTED,
        ));
    }
    let middle = &input[at + 1..eq];
    let Some((fsid_text, fs_name)) = middle.split_once('.') else {
        return Err(ParseError::new(
            W,
            input,
            at + 1,
            "expected fsid.fsname (the fsid may be empty) after '@'",
            CEPH_EXPECTED,
        ));
    };
    let fsid = if fsid_text.is_empty() {
        None
    } else {
        Some(fsid_text.parse::<uuid::Uuid>().map_err(|_| {
            ParseError::new(W, input, at + 1, format!("{fsid_text:?} is not a cluster fsid (a UUID)"), CEPH_EXPECTED)
        })?)
    };
    if !name_ok(fs_name) {
        return Err(ParseError::new(
            W,
            input,
            at + 2 + fsid_text.len(),
            "the file system name is empty or holds a character other than A-Z a-z 0-9 - _ .",
            CEPH_EXPECTED,
        ));
    }
    let path = check_path(W, input, eq + 1, CEPH_EXPECTED)?;
    Ok(Address::Ceph(CephAddress::Named { user: user.to_owned(), fsid, fs_name: fs_name.to_owned(), path }))
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Nfs(a) => write!(f, "{}:{}", a.host, a.export),
            Address::Cifs(a) if a.subdir.is_empty() => write!(f, "//{}/{}", a.host, a.share),
            Address::Cifs(a) => write!(f, "//{}/{}/{}", a.host, a.share, a.subdir),
            Address::Ceph(CephAddress::Monitors { monitors, path }) => {
                for (i, m) in monitors.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}", m.host)?;
                    if let Some(p) = m.port {
                        write!(f, ":{p}")?;
                    }
                }
                write!(f, ":{path}")
            }
            Address::Ceph(CephAddress::Named { user, fsid, fs_name, path }) => {
                let fsid = fsid.map(|u| u.to_string()).unwrap_or_default();
                write!(f, "{user}@{fsid}.{fs_name}={path}")
            }
            Address::Shared(p) => write!(f, "{}", p.display()),
            Address::Custom(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(parse: fn(&str) -> Result<Address, ParseError>, input: &str, shown: &str) {
        let a = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(a.to_string(), shown, "{input:?}");
        assert_eq!(parse(&a.to_string()).unwrap(), a);
    }

    fn bad(parse: fn(&str) -> Result<Address, ParseError>, input: &str, position: usize, problem: &str) {
        let e = parse(input).expect_err(input);
        assert_eq!(e.position, position, "{input:?}: {e}");
        assert!(e.to_string().contains(problem), "{input:?}: {e}");
        assert!(e.to_string().contains("expected"), "{e}");
    }

    #[test]
    fn nfs() {
        ok(Address::parse_nfs, "nas1:/export", "nas1:/export");
        ok(Address::parse_nfs, "10.0.0.5:/a/b c", "10.0.0.5:/a/b c");
        ok(Address::parse_nfs, "[fd00::1]:/x", "[fd00::1]:/x");
        bad(Address::parse_nfs, "nas1", 4, "':' after the host is missing");
        bad(Address::parse_nfs, "nas1:export", 5, "must start with '/'");
        bad(Address::parse_nfs, "fd00::1:/x", 0, "brackets");
        bad(Address::parse_nfs, "[fd00::1:/x", 0, "never closed");
        bad(Address::parse_nfs, "na$s:/x", 2, "'$'");
        bad(Address::parse_nfs, ":/x", 0, "host is missing");
        bad(Address::parse_nfs, "-o:/x", 0, "option");
        bad(Address::parse_nfs, "", 0, "empty");
    }

    #[test]
    fn cifs() {
        ok(Address::parse_cifs, "//nas/backup", "//nas/backup");
        ok(Address::parse_cifs, "//nas/backup/vms/", "//nas/backup/vms");
        ok(Address::parse_cifs, "//[::1]/s/a/b", "//[::1]/s/a/b");
        bad(Address::parse_cifs, "\\\\nas\\share", 0, "backslashes");
        bad(Address::parse_cifs, "nas/share", 0, "'//'");
        bad(Address::parse_cifs, "//nas", 5, "share name is missing");
        bad(Address::parse_cifs, "//nas//x", 6, "share name is empty");
        bad(Address::parse_cifs, "//nas/s/../x", 8, "'..'");
    }

    #[test]
    fn ceph() {
        ok(Address::parse_ceph, "10.0.0.1:6789,10.0.0.2:/", "10.0.0.1:6789,10.0.0.2:/");
        ok(Address::parse_ceph, "mon1,[fd00::2]:3300:/vol/x", "mon1,[fd00::2]:3300:/vol/x");
        ok(Address::parse_ceph, "admin@.cephfs=/", "admin@.cephfs=/");
        ok(
            Address::parse_ceph,
            "backup@b3ab5b1e-8f1a-4b2c-9a5e-0d2a1f3c4e5f.fs1=/vms",
            "backup@b3ab5b1e-8f1a-4b2c-9a5e-0d2a1f3c4e5f.fs1=/vms",
        );
        bad(Address::parse_ceph, "mon1:99999:/", 5, "port");
        bad(Address::parse_ceph, "mon1;mon2:/", 4, "';'");
        bad(Address::parse_ceph, "mon1", 4, "':/path'");
        bad(Address::parse_ceph, "admin@nofsid=/", 6, "fsid.fsname");
        bad(Address::parse_ceph, "admin@zz.fs=/", 6, "UUID");
        bad(Address::parse_ceph, "admin@.=/", 7, "file system name");
        bad(Address::parse_ceph, "admin@.fs=x", 10, "'/'");
    }

    #[test]
    fn shared_and_custom() {
        ok(Address::parse_shared, "/mnt/backups/", "/mnt/backups");
        bad(Address::parse_shared, "mnt", 0, "not absolute");
        bad(Address::parse_shared, "/mnt/../etc", 5, "'..'");
        ok(Address::parse_custom, "user@127.0.0.1:/srv", "user@127.0.0.1:/srv");
        bad(Address::parse_custom, "--bind", 0, "option");
        bad(Address::parse_custom, "a\nb", 1, "control");
    }
}
