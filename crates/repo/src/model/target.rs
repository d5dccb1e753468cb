//! Off-site targets: an S3-compatible object store (endpoint, bucket, prefix), where backups are
//! copied and, with object lock, kept unchangeable for a retention period. Validated here,
//! without I/O: what reaches the store is only what passed these checks.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::{ParseError, first_control};
use super::name::TargetName;

/// S3 object lock's retention modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Nobody without the `s3:BypassGovernanceRetention` permission can delete or overwrite a
    /// locked version before its date; an account that has it can.
    Governance,
    /// Nobody can, not even the bucket's owner, until the date.
    Compliance,
}

impl FromStr for LockMode {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            _ => Err(ParseError::new("lock mode", s, 0, "not a lock mode", "expected governance or compliance")),
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        })
    }
}

impl LockMode {
    /// The mode as S3 spells it (`GOVERNANCE`, `COMPLIANCE`).
    pub fn s3_name(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// The longest retention a target may ask for: 100 years.
pub const MAX_LOCK_DAYS: u32 = 36_500;

/// The object lock every copied object gets: its mode, and for how many days from its upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLock {
    /// The retention mode.
    pub mode: LockMode,
    /// Days from the upload the object stays locked (1 to [`MAX_LOCK_DAYS`]).
    pub days: u32,
}

impl ObjectLock {
    /// A lock of `days` days in `mode`.
    pub fn new(mode: LockMode, days: u32) -> Result<Self, ParseError> {
        if days == 0 || days > MAX_LOCK_DAYS {
            return Err(ParseError::new(
                "lock days",
                &days.to_string(),
                0,
                "out of range",
                format!("expected 1 to {MAX_LOCK_DAYS} days"),
            ));
        }
        Ok(ObjectLock { mode, days })
    }
}

/// Where a target's credentials come from. Shown by where they are, never by their value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum S3Credentials {
    /// A file in the AWS shared-credentials format (`[default]`, `aws_access_key_id`,
    /// `aws_secret_access_key`): root-owned, not readable by group or others.
    File(PathBuf),
    /// The usual AWS places: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, then the
    /// `AWS_PROFILE` (or default) profile of `~/.aws/credentials`.
    Environment,
}

impl fmt::Display for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::File(p) => write!(f, "file:{}", p.display()),
            S3Credentials::Environment => f.write_str("environment"),
        }
    }
}

/// An S3 endpoint URL, checked: `https://HOST[:PORT]`, or `http://` on a loopback address
/// only (nothing else may travel in the clear), with no user, path or query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint {
    url: String,
}

impl Endpoint {
    /// Checks `url`.
    pub fn new(url: &str) -> Result<Self, ParseError> {
        let expected = "expected https://HOST[:PORT] (http:// only on 127.0.0.1, ::1 or localhost)";
        let err = |pos: usize, problem: &str| ParseError::new("endpoint", url, pos, problem, expected);
        if let Some(pos) = first_control(url) {
            return Err(err(pos, "it holds a control character"));
        }
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err(err(0, "it is not an http(s) URL")),
        };
        let start = url.len() - rest.len();
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(pos) = authority.find(['/', '?', '#']) {
            return Err(err(start + pos, "an endpoint has no path or query (the bucket is given apart)"));
        }
        if let Some(pos) = authority.find('@') {
            return Err(err(start + pos, "credentials never go in the URL (give a credentials file)"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let end = v6.find(']').ok_or_else(|| err(start, "an IPv6 address lacks its ']'"))?;
                (&v6[..end], &v6[end + 1..])
            }
            None => match authority.rfind(':') {
                Some(i) => (&authority[..i], &authority[i..]),
                None => (authority, ""),
            },
        };
        if host.is_empty()
            || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
            || host.starts_with(['-', '.'])
        {
            return Err(err(start, "the host is not a host name or address"));
        }
        if !port.is_empty() {
            let digits = port.strip_prefix(':').unwrap_or("x");
            if digits.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(err(url.len() - port.len(), "the port is not a number from 1 to 65535"));
            }
        }
        if !tls && !matches!(host, "127.0.0.1" | "::1" | "localhost") && !host.starts_with("127.") {
            return Err(err(0, "plain http would send the data and the signatures in the clear"));
        }
        Ok(Endpoint { url: format!("{}://{authority}", if tls { "https" } else { "http" }) })
    }

    /// The URL (without a trailing `/`).
    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl TryFrom<String> for Endpoint {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        Endpoint::new(&s)
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.url
    }
}

/// Checks an S3 bucket name (the rules every S3 store shares): 3 to 63 of `a-z 0-9 . -`,
/// beginning and ending with a letter or digit, no `..`, not an IP address.
pub fn check_bucket(name: &str) -> Result<(), ParseError> {
    let expected = "expected 3 to 63 of a-z 0-9 '.' '-', starting and ending with a letter or digit";
    let err = |pos: usize, problem: &str| ParseError::new("bucket", name, pos, problem, expected);
    if !(3..=63).contains(&name.len()) {
        return Err(err(0, "it is not 3 to 63 characters long"));
    }
    if let Some((pos, c)) =
        name.char_indices().find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-')))
    {
        return Err(err(pos, &format!("character {c:?} is not allowed")));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(err(0, "it must start and end with a letter or digit"));
    }
    if let Some(pos) = name.find("..") {
        return Err(err(pos, "two dots in a row"));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(err(0, "it is an IP address"));
    }
    Ok(())
}

/// Checks a key prefix: segments of `A-Z a-z 0-9 . _ -` separated by single `/` (none empty,
/// `.` or `..`), at most 512 bytes; the leading and trailing `/` are dropped. Its canonical form.
pub fn check_prefix(prefix: &str) -> Result<String, ParseError> {
    let expected = "expected segments of A-Z a-z 0-9 '.' '_' '-' separated by '/'";
    let err = |pos: usize, problem: &str| ParseError::new("prefix", prefix, pos, problem, expected);
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() || trimmed.len() > 512 {
        return Err(err(0, "it is empty or longer than 512 bytes"));
    }
    let offset = prefix.len() - prefix.trim_start_matches('/').len();
    let mut at = offset;
    for segment in trimmed.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(err(at, "an empty, '.' or '..' segment"));
        }
        if let Some((pos, c)) =
            segment.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(err(at + pos, &format!("character {c:?} is not allowed")));
        }
        at += segment.len() + 1;
    }
    Ok(trimmed.to_owned())
}

/// An off-site target: an S3 bucket (and a prefix in it) on an endpoint, its credentials, the
/// object lock its copies get, and the CA its endpoint's certificate is checked against (the
/// system's roots when none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TargetFields", into = "TargetFields")]
pub struct ObjectTarget {
    name: TargetName,
    endpoint: Endpoint,
    bucket: String,
    prefix: Option<String>,
    region: String,
    credentials: S3Credentials,
    lock: Option<ObjectLock>,
    ca_file: Option<PathBuf>,
}

/// A target as the configuration file holds it; checked whole by [`ObjectTarget::new`] when
/// read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFields {
    name: String,
    endpoint: String,
    bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    credentials: S3Credentials,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lock: Option<ObjectLock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
}

impl TryFrom<TargetFields> for ObjectTarget {
    type Error = ParseError;
    fn try_from(f: TargetFields) -> Result<Self, ParseError> {
        let mut t = ObjectTarget::new(&f.name, &f.endpoint, &f.bucket, f.prefix.as_deref(), f.credentials)?;
        if let Some(lock) = f.lock {
            t = t.with_lock(ObjectLock::new(lock.mode, lock.days)?);
        }
        if let Some(ca) = f.ca_file {
            t = t.with_ca_file(ca)?;
        }
        if let Some(region) = f.region {
            t = t.with_region(&region)?;
        }
        Ok(t)
    }
}

impl From<ObjectTarget> for TargetFields {
    fn from(t: ObjectTarget) -> Self {
        TargetFields {
            name: t.name.as_str().to_owned(),
            endpoint: t.endpoint.url,
            bucket: t.bucket,
            prefix: t.prefix,
            region: (t.region != DEFAULT_REGION).then_some(t.region),
            credentials: t.credentials,
            lock: t.lock,
            ca_file: t.ca_file,
        }
    }
}

/// The region a target signs for when none is given: what S3-compatible stores accept.
pub const DEFAULT_REGION: &str = "us-east-1";

impl ObjectTarget {
    /// A target, every part checked (see [`Endpoint::new`], [`check_bucket`], [`check_prefix`]);
    /// the credentials file and the CA file must be absolute paths.
    pub fn new(
        name: &str,
        endpoint: &str,
        bucket: &str,
        prefix: Option<&str>,
        credentials: S3Credentials,
    ) -> Result<Self, ParseError> {
        let name = TargetName::new(name)?;
        let endpoint = Endpoint::new(endpoint)?;
        check_bucket(bucket)?;
        let prefix = prefix.map(check_prefix).transpose()?;
        if let S3Credentials::File(p) = &credentials {
            absolute("credentials file", p)?;
        }
        Ok(ObjectTarget {
            name,
            endpoint,
            bucket: bucket.to_owned(),
            prefix,
            region: DEFAULT_REGION.to_owned(),
            credentials,
            lock: None,
            ca_file: None,
        })
    }

    /// With object lock on every copied object.
    pub fn with_lock(mut self, lock: ObjectLock) -> Self {
        self.lock = Some(lock);
        self
    }

    /// With the CA certificate (PEM) the endpoint's certificate is checked against, besides
    /// the system's roots.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Result<Self, ParseError> {
        let path = path.into();
        absolute("CA file", &path)?;
        self.ca_file = Some(path);
        Ok(self)
    }

    /// With the region it signs for (default [`DEFAULT_REGION`]).
    pub fn with_region(mut self, region: &str) -> Result<Self, ParseError> {
        if region.is_empty() || !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ParseError::new("region", region, 0, "not a region name", "expected a-z 0-9 '-'"));
        }
        self.region = region.to_owned();
        Ok(self)
    }

    /// Its name.
    pub fn name(&self) -> &TargetName {
        &self.name
    }
    /// Its endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
    /// Its bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
    /// Its key prefix, canonical (no leading or trailing `/`).
    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }
    /// The region it signs for.
    pub fn region(&self) -> &str {
        &self.region
    }
    /// Where its credentials come from.
    pub fn credentials(&self) -> &S3Credentials {
        &self.credentials
    }
    /// The object lock its copies get.
    pub fn lock(&self) -> Option<ObjectLock> {
        self.lock
    }
    /// The CA its endpoint is checked against.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The object key of `relative` (a `/`-separated path made of validated names) under the
    /// target's prefix.
    pub fn key(&self, relative: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}/{relative}"),
            None => relative.to_owned(),
        }
    }
}

impl fmt::Display for ObjectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}/{}", self.name, self.endpoint, self.bucket)?;
        if let Some(p) = &self.prefix {
            write!(f, "/{p}")?;
        }
        write!(f, ", credentials {}", self.credentials)?;
        if let Some(l) = self.lock {
            write!(f, ", lock {} {} days", l.mode, l.days)?;
        }
        f.write_str(")")
    }
}

impl Serialize for TargetName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TargetName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TargetName::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn absolute(what: &'static str, p: &Path) -> Result<(), ParseError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(ParseError::new(what, &p.to_string_lossy(), 0, "not an absolute path", "expected a path from /"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_or_loopback_http_without_path_or_user() {
        for (good, canonical) in [
            ("https://s3.example.com", "https://s3.example.com"),
            ("https://s3.example.com:8443/", "https://s3.example.com:8443"),
            ("https://[2001:db8::1]:443", "https://[2001:db8::1]:443"),
            ("http://127.0.0.1:7480", "http://127.0.0.1:7480"),
            ("http://localhost", "http://localhost"),
        ] {
            assert_eq!(Endpoint::new(good).unwrap().as_str(), canonical);
        }
        for (bad, problem) in [
            ("s3.example.com", "not an http(s) URL"),
            ("http://s3.example.com", "in the clear"),
            ("https://key:secret@s3.example.com", "never go in the URL"),
            ("https://s3.example.com/bucket", "no path"),
            ("https://s3.example.com:0", "port"),
            ("https://s3.example.com:99999", "port"),
            ("https://", "not a host"),
            ("https://a b", "not a host"),
            ("https://[::1", "']'"),
        ] {
            let e = Endpoint::new(bad).unwrap_err().to_string();
            assert!(e.contains(problem), "{bad}: {e}");
        }
        let e = Endpoint::new("https://key:secret@s3.example.com").unwrap_err();
        assert!(e.to_string().contains("credentials file"), "{e}");
    }

    #[test]
    fn buckets_prefixes_and_locks_follow_the_rules() {
        for good in ["nasbak-locked", "a.b-c", "abc", &"a".repeat(63)] {
            check_bucket(good).unwrap();
        }
        for bad in ["ab", "Upper", "a_b", "-ab", "ab-", "a..b", "192.168.1.1", &"a".repeat(64)] {
            assert!(check_bucket(bad).is_err(), "{bad}");
        }
        assert_eq!(check_prefix("/hosts/kvm1/").unwrap(), "hosts/kvm1");
        for bad in ["", "/", "a//b", "a/../b", "a/./b", "a b", "a\\b"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        let e = check_prefix("ok/../x").unwrap_err();
        assert_eq!(e.position, 3, "{e}");
        assert!(ObjectLock::new(LockMode::Compliance, 0).is_err());
        assert!(ObjectLock::new(LockMode::Governance, MAX_LOCK_DAYS + 1).is_err());
        assert_eq!("compliance".parse::<LockMode>().unwrap().s3_name(), "COMPLIANCE");
        assert!("Compliance".parse::<LockMode>().is_err());
    }

    #[test]
    fn a_target_is_checked_whole_and_shown_without_secrets() {
        let creds = S3Credentials::File("/etc/nasbak/s3.credentials".into());
        let t = ObjectTarget::new("offsite", "https://s3.example.com", "backups", Some("/kvm1/"), creds.clone())
            .unwrap()
            .with_lock(ObjectLock::new(LockMode::Compliance, 30).unwrap());
        assert_eq!(t.key("web1/2026.01.01.00.00.00/manifest.json"), "kvm1/web1/2026.01.01.00.00.00/manifest.json");
        assert_eq!(
            t.to_string(),
            "offsite (https://s3.example.com/backups/kvm1, credentials file:/etc/nasbak/s3.credentials, lock compliance 30 days)"
        );
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<ObjectTarget>(&json).unwrap(), t);
        assert!(ObjectTarget::new("a/b", "https://x.y", "bkt", None, creds.clone()).is_err());
        assert!(ObjectTarget::new("t", "https://x.y", "bkt", None, S3Credentials::File("rel".into())).is_err());
        assert!(t.clone().with_ca_file("ca.pem").is_err());
        assert!(t.with_region("eu west").is_err());
    }
}
