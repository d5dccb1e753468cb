//! An off-site target's object store (feature `s3`): a blocking client over the AWS SDK for
//! S3, which owns its own single-threaded Tokio runtime, so that nothing of async reaches an
//! embedder.
//!
//! Why the AWS SDK (`aws-sdk-s3`): it is the one Rust S3 client that covers all that copying to
//! a locked bucket needs, and is kept by the service's own maintainers: object lock on puts and
//! multipart uploads, the bucket's lock configuration, object versions and version-aware
//! deletes, listing a multipart upload's parts (to resume it), retries with backoff, per-attempt
//! timeouts, and rustls with a CA of the operator's (`rust-s3` lacks versions and parts;
//! `object_store` hides versions and lock headers behind its portable API). It is built here
//! with rustls over ring and no default HTTP client, so no C library is compiled.
//!
//! Credentials are read by nasbak from the target's credentials file (checked: a regular file,
//! root-owned, not readable by group or others) and handed to the SDK as text: no path reaches
//! argv, no key a log; the SDK's credentials print as redacted. With the environment instead,
//! the SDK's environment and profile providers are used, never the EC2 instance metadata.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_config::profile::ProfileFileCredentialsProvider;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{ObjectLockEnabled, ObjectLockMode};
use aws_smithy_http_client::tls;
use base64::Engine as _;
use md5::Digest as _;
use nasbak_repo::{ObjectTarget, S3Credentials};
use serde::Serialize;

/// What went wrong with a target, in words that name it.
#[derive(Debug, thiserror::Error)]
#[error("target {target}: {action} failed: {detail}")]
pub struct TargetError {
    /// The target's name.
    pub target: String,
    /// What was being done.
    pub action: String,
    /// Why it failed (the store's answer, or what is wrong locally), never a secret.
    pub detail: String,
}

/// How long a connection may take to open, and an answer to arrive.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// One attempt of one request (a part of a multipart upload is at most 64 MiB).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a check's probe stays locked: long enough to try deleting it, short enough that
/// probes do not pile up.
const PROBE_LOCK: Duration = Duration::from_secs(120);
/// Where checks write their probes, under the target's prefix.
pub const CHECK_DIR: &str = ".nasbak-check";

/// A target's store, connected.
pub struct ObjectStore {
    target: ObjectTarget,
    client: aws_sdk_s3::Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the credentials: only the target is shown.
        f.debug_struct("ObjectStore").field("target", &self.target).finish_non_exhaustive()
    }
}

/// The outcome of [`ObjectStore::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TargetCheck {
    /// The target's name.
    pub target: String,
    /// Whether the bucket has object lock enabled.
    pub bucket_lock: bool,
    /// The bytes of the probe written and read back identical.
    pub probe_bytes: u64,
    /// With the target's lock: whether deleting the locked probe's version was refused, as it
    /// must be.
    pub lock_holds: Option<bool>,
    /// How long the check took, in milliseconds.
    pub millis: u64,
}

impl ObjectStore {
    /// Connects to `target`'s store: its credentials read and checked, TLS verified against the
    /// system's roots and the target's CA file. Nothing is sent yet.
    pub fn connect(target: &ObjectTarget) -> Result<ObjectStore, TargetError> {
        let err = |action: &str, detail: String| TargetError {
            target: target.name().to_string(),
            action: action.to_owned(),
            detail,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err("starting its I/O runtime", e.to_string()))?;
        let mut trust = tls::TrustStore::default();
        if let Some(ca) = target.ca_file() {
            let pem = fs::read(ca).map_err(|e| err("reading its CA file", format!("{}: {e}", ca.display())))?;
            trust = trust.with_pem_certificate(pem);
        }
        let tls = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| err("setting up TLS", e.to_string()))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .tls_context(tls)
            .build_https();
        let credentials: aws_sdk_s3::config::SharedCredentialsProvider = match target.credentials() {
            S3Credentials::File(path) => {
                let text = read_credentials(path).map_err(|d| err("reading its credentials", d))?;
                let keys = parse_credentials(&text)
                    .map_err(|d| err("reading its credentials", format!("{}: {d}", path.display())))?;
                aws_sdk_s3::config::SharedCredentialsProvider::new(keys)
            }
            S3Credentials::Environment => {
                // The profile provider may need HTTP (SSO, a role): through this client, never
                // the instance metadata.
                let providers =
                    aws_config::provider_config::ProviderConfig::without_region().with_http_client(http.clone());
                aws_sdk_s3::config::SharedCredentialsProvider::new(
                    aws_config::meta::credentials::CredentialsProviderChain::first_try(
                        "environment",
                        aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
                    )
                    .or_else("profile", ProfileFileCredentialsProvider::builder().configure(&providers).build()),
                )
            }
        };
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(target.endpoint().as_str())
            .region(Region::new(target.region().to_owned()))
            .force_path_style(true)
            .credentials_provider(credentials)
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            // Checksums only where the API requires them: the flexible checksums of 2025
            // (aws-chunked uploads) are unknown to many S3-compatible stores (radosgw 16).
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(ObjectStore { target: target.clone(), client: aws_sdk_s3::Client::from_conf(config), runtime })
    }

    /// The target.
    pub fn target(&self) -> &ObjectTarget {
        &self.target
    }

    fn err(&self, action: impl Into<String>, detail: impl Into<String>) -> TargetError {
        TargetError { target: self.target.name().to_string(), action: action.into(), detail: detail.into() }
    }

    /// Whether the bucket has object lock enabled (a missing bucket, refused credentials or an
    /// unreachable endpoint are errors, said as such).
    pub fn bucket_lock(&self) -> Result<bool, TargetError> {
        let bucket = self.target.bucket();
        self.runtime.block_on(async {
            self.client.head_bucket().bucket(bucket).send().await.map_err(|e| {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let detail = match status {
                    Some(403) => "the store refuses these credentials for this bucket (HTTP 403)".to_owned(),
                    Some(404) => format!("the store has no bucket {bucket} (HTTP 404)"),
                    _ => said(&e),
                };
                self.err(format!("reaching bucket {bucket}"), detail)
            })?;
            match self.client.get_object_lock_configuration().bucket(bucket).send().await {
                Ok(out) => Ok(out
                    .object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| *e == ObjectLockEnabled::Enabled)),
                // A bucket without object lock answers with an error (ObjectLockConfigurationNotFound).
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
                Err(e) => Err(self.err(format!("reading the object lock of bucket {bucket}"), said(&e))),
            }
        })
    }

    /// Writes `bytes` as the object `key` (under the target's prefix), with object lock until
    /// `locked_until` when given: its version id, when the bucket keeps versions.
    pub fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        locked_until: Option<std::time::SystemTime>,
    ) -> Result<Option<String>, TargetError> {
        let full = self.target.key(key);
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&bytes));
        let mut put = self
            .client
            .put_object()
            .bucket(self.target.bucket())
            .key(&full)
            .content_md5(md5)
            .body(ByteStream::from(bytes));
        if let (Some(until), Some(lock)) = (locked_until, self.target.lock()) {
            put = put
                .object_lock_mode(ObjectLockMode::from(lock.mode.s3_name()))
                .object_lock_retain_until_date(DateTime::from(until));
        }
        self.runtime
            .block_on(put.send())
            .map(|out| out.version_id().map(str::to_owned))
            .map_err(|e| self.err(format!("writing {full}"), said(&e)))
    }

    /// The object `key`'s bytes.
    pub fn get_bytes(&self, key: &str) -> Result<Vec<u8>, TargetError> {
        let full = self.target.key(key);
        self.runtime.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(self.target.bucket())
                .key(&full)
                .send()
                .await
                .map_err(|e| self.err(format!("reading {full}"), said(&e)))?;
            let body = out.body.collect().await.map_err(|e| self.err(format!("reading {full}"), e.to_string()))?;
            Ok(body.into_bytes().to_vec())
        })
    }

    /// Deletes one version of the object `key` (or the object, in a bucket without versions).
    /// A lock that refuses it is an error whose detail says so.
    pub fn delete(&self, key: &str, version: Option<&str>) -> Result<(), TargetError> {
        let full = self.target.key(key);
        let request = self
            .client
            .delete_object()
            .bucket(self.target.bucket())
            .key(&full)
            .set_version_id(version.map(str::to_owned));
        self.runtime.block_on(request.send()).map(drop).map_err(|e| self.err(format!("deleting {full}"), said(&e)))
    }

    /// Checks the target end to end: the bucket is there and these credentials reach it; it
    /// has object lock if the target asks for one; a probe written under
    /// `<prefix>/.nasbak-check/` reads back identical; with a lock, deleting the locked probe's
    /// version is refused. A probe without lock is removed; a locked one stays (for two
    /// minutes' lock), and later checks remove those whose lock has passed.
    pub fn check(&self) -> Result<TargetCheck, TargetError> {
        let started = Instant::now();
        let bucket_lock = self.bucket_lock()?;
        if self.target.lock().is_some() && !bucket_lock {
            return Err(self.err(
                "checking its object lock",
                format!(
                    "bucket {} has no object lock, so nothing copied there could be locked; create a bucket with object lock enabled, or use the target without --lock",
                    self.target.bucket()
                ),
            ));
        }
        self.remove_old_probes();
        let mut probe = vec![0u8; 64 << 10];
        for (i, chunk) in probe.chunks_mut(32).enumerate() {
            chunk.copy_from_slice(
                blake3::hash(&[uuid::Uuid::new_v4().as_bytes().as_slice(), &i.to_le_bytes()].concat()).as_bytes(),
            );
        }
        let key = format!("{CHECK_DIR}/{}", uuid::Uuid::new_v4());
        let until = std::time::SystemTime::now() + PROBE_LOCK;
        let locked = self.target.lock().is_some();
        let version = self.put_bytes(&key, probe.clone(), locked.then_some(until))?;
        let back = self.get_bytes(&key)?;
        if back != probe {
            return Err(self.err("reading the probe back", format!("{key} came back different ({} bytes)", back.len())));
        }
        let lock_holds = if locked {
            let Some(version) = version else {
                return Err(self.err("checking its object lock", "the store gave the locked probe no version id"));
            };
            match self.delete(&key, Some(&version)) {
                Err(e) if refused(&e.detail) => Some(true),
                Err(e) => return Err(e),
                Ok(()) => Some(false),
            }
        } else {
            let _ = self.delete(&key, version.as_deref());
            None
        };
        if lock_holds == Some(false) {
            return Err(self.err(
                "checking its object lock",
                "the store deleted a locked version: its lock does not hold, nothing copied there would be safe",
            ));
        }
        Ok(TargetCheck {
            target: self.target.name().to_string(),
            bucket_lock,
            probe_bytes: probe.len() as u64,
            lock_holds,
            millis: started.elapsed().as_millis() as u64,
        })
    }

    /// Deletes the versions of earlier checks' probes whose lock has passed (a version still
    /// locked is refused and left).
    fn remove_old_probes(&self) {
        let prefix = format!("{}/", self.target.key(CHECK_DIR));
        let listed = self.runtime.block_on(
            self.client.list_object_versions().bucket(self.target.bucket()).prefix(&prefix).max_keys(1000).send(),
        );
        let Ok(listed) = listed else { return };
        for v in listed.versions() {
            if let (Some(key), Some(id)) = (v.key(), v.version_id()) {
                let relative = key.strip_prefix(&self.target.key("")).unwrap_or(key).trim_start_matches('/');
                let _ = self.delete(relative, Some(id));
            }
        }
        for m in listed.delete_markers() {
            if let (Some(key), Some(id)) = (m.key(), m.version_id()) {
                let relative = key.strip_prefix(&self.target.key("")).unwrap_or(key).trim_start_matches('/');
                let _ = self.delete(relative, Some(id));
            }
        }
    }
}

/// Whether a store's answer is a refusal (an object lock's, or a permission's).
fn refused(detail: &str) -> bool {
    detail.contains("AccessDenied") || detail.contains("403") || detail.to_lowercase().contains("object lock")
}

/// An SDK error in words: the store's error code and message when it answered, else what kept
/// the request from an answer (connection, TLS, timeout).
fn said<E, R>(e: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_s3::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            match (err.code(), err.message()) {
                (Some(code), Some(msg)) if !msg.is_empty() => format!("{code}: {msg}"),
                (Some(code), _) => code.to_owned(),
                _ => format!("{}", aws_sdk_s3::error::DisplayErrorContext(e)),
            }
        }
        SdkError::TimeoutError(_) => "no answer in time (timed out)".to_owned(),
        other => format!("{}", aws_sdk_s3::error::DisplayErrorContext(other)),
    }
}

/// The `[default]` keys of an AWS shared-credentials file's text (`aws_access_key_id`,
/// `aws_secret_access_key`, optionally `aws_session_token`). Only what is missing is said,
/// never a value.
fn parse_credentials(text: &str) -> Result<aws_sdk_s3::config::Credentials, String> {
    let mut section = String::new();
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        if section != "default" {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
            Ok(aws_sdk_s3::config::Credentials::new(id, secret, token, None, "nasbak-credentials-file"))
        }
        _ => Err("expected aws_access_key_id and aws_secret_access_key in its [default] section".to_owned()),
    }
}

/// The credentials file's text, once it is shown to be private: a regular file, owned by root
/// (or this process's user), not readable or writable by group or others.
fn read_credentials(path: &Path) -> Result<String, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!("{} is owned by uid {}; chown root {0}", path.display(), meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {:o}); chmod 600 {0}",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_credentials_file_others_can_read_is_refused_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        fs::write(&path, "[default]\naws_access_key_id = AKID\naws_secret_access_key = SECRETVALUE\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_credentials(&path).unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("SECRETVALUE"), "{e}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_credentials(&path).unwrap().contains("SECRETVALUE"));
        let target =
            ObjectTarget::new("t", "https://127.0.0.1:1", "bkt", None, S3Credentials::File(path.clone())).unwrap();
        let store = ObjectStore::connect(&target).unwrap();
        assert!(!format!("{store:?}").contains("SECRETVALUE"));
        assert!(read_credentials(dir.path()).unwrap_err().contains("not a regular file"));
        let keys = parse_credentials(
            "# lab\n[other]\naws_access_key_id = X\n[default]\naws_access_key_id = AKID\naws_secret_access_key = S\n",
        )
        .unwrap();
        assert_eq!(keys.access_key_id(), "AKID");
        assert!(!format!("{keys:?}").contains("= S"));
        let e = parse_credentials("[default]\naws_access_key_id = AKID\n").unwrap_err();
        assert!(e.contains("aws_secret_access_key"), "{e}");
    }
}
