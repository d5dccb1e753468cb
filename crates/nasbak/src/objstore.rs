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
use std::path::{Path, PathBuf};
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
use nasbak_process::CancelHandle;

pub use crate::error::TargetError;
use nasbak_repo::{ObjectTarget, S3Credentials};
use serde::Serialize;

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

/// A ranged read in flight (see [`ObjectStore::spawn_read_range`]); dropping it lets it run
/// out, [`ReadTask::abort`] stops it.
#[derive(Debug)]
pub(crate) struct ReadTask(tokio::task::JoinHandle<Result<Vec<u8>, TargetError>>);

impl ReadTask {
    /// Stops the read.
    pub(crate) fn abort(&self) {
        self.0.abort();
    }
}

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
        ObjectStore::connect_with(target, 0)
    }

    /// [`ObjectStore::connect`], with `workers` runtime threads that run reads spawned by
    /// [`ObjectStore::spawn_read_range`] while no caller waits (0: the caller's thread alone).
    pub(crate) fn connect_with(target: &ObjectTarget, workers: usize) -> Result<ObjectStore, TargetError> {
        let err = |action: &str, detail: String| TargetError {
            target: target.name().to_string(),
            action: action.to_owned(),
            detail,
        };
        let runtime = match workers {
            0 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            n => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .thread_name("nasbak-s3")
                .enable_all()
                .build(),
        }
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

    /// A full key of the bucket, relative to the target's prefix.
    fn relative(&self, full: &str) -> String {
        full.strip_prefix(self.target.key("").as_str()).unwrap_or(full).trim_start_matches('/').to_owned()
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

    /// Every version (and delete marker) of every object under `relative`: (key relative to the
    /// prefix, version id; `null` in a bucket that never kept versions).
    pub fn versions(&self, relative: &str) -> Result<Vec<(String, String)>, TargetError> {
        let full = self.target.key(relative);
        let strip = |k: &str| self.relative(k);
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .runtime
                .block_on(
                    self.client
                        .list_object_versions()
                        .bucket(self.target.bucket())
                        .prefix(&full)
                        .set_key_marker(key_marker.take())
                        .set_version_id_marker(version_marker.take())
                        .send(),
                )
                .map_err(|e| self.err(format!("listing the versions under {full}"), said(&e)))?;
            for v in page.versions() {
                if let Some(key) = v.key() {
                    out.push((strip(key), v.version_id().unwrap_or("null").to_owned()));
                }
            }
            for m in page.delete_markers() {
                if let Some(key) = m.key() {
                    out.push((strip(key), m.version_id().unwrap_or("null").to_owned()));
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Until when one version of `key` is locked (seconds since the epoch); `None` when it is
    /// not locked (or is gone).
    pub fn locked_until(&self, key: &str, version: &str) -> Result<Option<i64>, TargetError> {
        let full = self.target.key(key);
        let request = self
            .client
            .head_object()
            .bucket(self.target.bucket())
            .key(&full)
            .set_version_id((version != "null").then(|| version.to_owned()));
        match self.runtime.block_on(request.send()) {
            Ok(out) => Ok(out.object_lock_retain_until_date().map(|d| d.secs())),
            // A delete marker has no head (405), a version gone none (404).
            Err(e) if e.raw_response().is_some_and(|r| matches!(r.status().as_u16(), 404 | 405)) => Ok(None),
            Err(e) => Err(self.err(format!("reading the lock of {full}"), said(&e))),
        }
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
                let _ = self.delete(&self.relative(key), Some(id));
            }
        }
        for m in listed.delete_markers() {
            if let (Some(key), Some(id)) = (m.key(), m.version_id()) {
                let _ = self.delete(&self.relative(key), Some(id));
            }
        }
    }
}

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ListedObject {
    /// Its key, relative to the target's prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What the store says of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ObjectHead {
    /// Its size in bytes.
    pub size: u64,
    /// The checksum nasbak recorded on it at upload ([`CHECKSUM_META`]): `ALGORITHM:HEX`.
    pub checksum: Option<String>,
    /// Its version id, where the bucket keeps versions.
    pub version: Option<String>,
    /// Until when its lock holds (seconds since the epoch), when it has one.
    pub locked_until: Option<i64>,
}

/// The user metadata key (`x-amz-meta-nasbak-checksum`) where every uploaded object carries
/// the checksum of its bytes, `ALGORITHM:HEX` (the manifest's algorithm for a file the manifest
/// lists, else `blake3`).
pub const CHECKSUM_META: &str = "nasbak-checksum";

/// Files up to this size go up in one request; larger ones as a multipart upload.
pub const SINGLE_PUT_MAX: u64 = 16 << 20;
/// The smallest part of a multipart upload nasbak writes (the last part may be smaller).
pub const MIN_PART: u64 = 16 << 20;
/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Parts in flight at once (memory: this many parts).
const PARTS_IN_FLIGHT: usize = 4;

/// The part size of a multipart upload of `size` bytes: [`MIN_PART`], or more (whole MiB) for a
/// file that would otherwise need more than 10,000 parts. It depends on the size alone, so an
/// upload resumed later cuts the file the same way.
pub fn part_size(size: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    needed.max(MIN_PART)
}

/// How a file is uploaded.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct UploadOptions {
    /// At most this many bytes per second, on average over each part (none: as fast as the
    /// store takes them).
    pub bandwidth: Option<u64>,
    /// Lock the object until then (the target's lock mode); none: no lock.
    pub locked_until: Option<std::time::SystemTime>,
    /// Where multipart uploads are journaled (see [`ObjectStore::upload_file`]); none: every
    /// resumed part is checked against the file.
    pub journal: Option<PathBuf>,
}

impl UploadOptions {
    /// Options with a bandwidth limit and a lock date.
    pub fn new(bandwidth: Option<u64>, locked_until: Option<std::time::SystemTime>) -> Self {
        UploadOptions { bandwidth, locked_until, journal: None }
    }

    /// With multipart uploads journaled in `dir` (a directory of this host's, such as the
    /// runtime directory's `uploads/`).
    pub fn with_journal(mut self, dir: impl Into<PathBuf>) -> Self {
        self.journal = Some(dir.into());
        self
    }
}

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Uploaded {
    /// The bytes sent in this run.
    pub sent: u64,
    /// The bytes an earlier, interrupted upload had already sent and this one kept (their MD5
    /// checked against the parts' ETags).
    pub resumed: u64,
    /// The object's version id, where the bucket keeps versions.
    pub version: Option<String>,
}

/// The lowercase hex MD5 of `data` (an S3 part's ETag without its quotes).
fn md5_hex(data: &[u8]) -> String {
    md5::Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn md5_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

/// Reads up to `len` bytes of `file` at `offset`.
fn read_at(file: &fs::File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

impl ObjectStore {
    /// The objects under `relative` (a key prefix under the target's prefix; `""` for all),
    /// every page of the listing, keys relative to the target's prefix.
    pub fn list(&self, relative: &str) -> Result<Vec<ListedObject>, TargetError> {
        let full = self.target.key(relative);
        let strip = |k: &str| self.relative(k);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .runtime
                .block_on(
                    self.client
                        .list_objects_v2()
                        .bucket(self.target.bucket())
                        .prefix(&full)
                        .set_continuation_token(token.take())
                        .send(),
                )
                .map_err(|e| self.err(format!("listing {full}"), said(&e)))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push(ListedObject { key: strip(key), size: o.size().unwrap_or(0).max(0) as u64 });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// What the store says of the object `key`; `None` when there is none.
    pub fn head(&self, key: &str) -> Result<Option<ObjectHead>, TargetError> {
        let full = self.target.key(key);
        match self.runtime.block_on(self.client.head_object().bucket(self.target.bucket()).key(&full).send()) {
            Ok(out) => Ok(Some(ObjectHead {
                size: out.content_length().unwrap_or(0).max(0) as u64,
                checksum: out.metadata().and_then(|m| m.get(CHECKSUM_META)).cloned(),
                version: out.version_id().map(str::to_owned),
                locked_until: out.object_lock_retain_until_date().map(|d| d.secs()),
            })),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(self.err(format!("looking up {full}"), said(&e))),
        }
    }

    /// Streams the object `key` to `consume`, chunk by chunk as it arrives (no local copy);
    /// `consume` returns false to stop early. Returns the bytes read.
    pub fn read_object(
        &self,
        key: &str,
        consume: &mut dyn FnMut(&[u8]) -> bool,
        cancel: &CancelHandle,
    ) -> Result<u64, TargetError> {
        let full = self.target.key(key);
        self.runtime.block_on(async {
            let mut out = self
                .client
                .get_object()
                .bucket(self.target.bucket())
                .key(&full)
                .send()
                .await
                .map_err(|e| self.err(format!("reading {full}"), said(&e)))?;
            let mut read = 0u64;
            while let Some(chunk) = out.body.next().await {
                let chunk = chunk.map_err(|e| self.err(format!("reading {full}"), e.to_string()))?;
                read += chunk.len() as u64;
                if cancel.is_cancelled() {
                    return Err(self.err(format!("reading {full}"), "cancelled"));
                }
                if !consume(&chunk) {
                    break;
                }
            }
            Ok(read)
        })
    }

    /// Starts reading `len` bytes of the object `key` from `start` (fewer at its end) on the
    /// store's runtime; [`ObjectStore::wait`] gives the bytes.
    pub(crate) fn spawn_read_range(&self, key: &str, start: u64, len: u64) -> ReadTask {
        let (client, bucket, full) = (self.client.clone(), self.target.bucket().to_owned(), self.target.key(key));
        let name = self.target.name().to_string();
        ReadTask(self.runtime.spawn(async move {
            let err = |detail: String| TargetError {
                target: name.clone(),
                action: format!("reading {full} at byte {start}"),
                detail,
            };
            let range = format!("bytes={start}-{}", start + len.max(1) - 1);
            let out =
                client.get_object().bucket(bucket).key(&full).range(range).send().await.map_err(|e| err(said(&e)))?;
            let body = out.body.collect().await.map_err(|e| err(e.to_string()))?;
            Ok(body.into_bytes().to_vec())
        }))
    }

    /// The bytes of a read begun by [`ObjectStore::spawn_read_range`], once they are all in.
    pub(crate) fn wait(&self, task: ReadTask) -> Result<Vec<u8>, TargetError> {
        self.runtime.block_on(task.0).unwrap_or_else(|e| {
            // The read's task was stopped or failed before it answered: said as a failed read.
            Err(TargetError {
                target: self.target.name().to_string(),
                action: "reading a range of an object".into(),
                detail: format!("the read stopped before it answered ({e})"),
            })
        })
    }

    /// Uploads the file at `path` as the object `key`, with `checksum` (`ALGORITHM:HEX`, see
    /// [`CHECKSUM_META`]) in its metadata and the target's lock until `options.locked_until`.
    ///
    /// A file of up to [`SINGLE_PUT_MAX`] bytes goes in one request. A larger one goes as a
    /// multipart upload of [`part_size`] parts, four in flight. An earlier upload of the same
    /// key that was cut off (a kill, a network cut) is resumed: each of its parts whose ETag is
    /// the MD5 of the file's bytes there is kept, and the rest is sent; an earlier upload that
    /// does not match the file is aborted. `progress` is told the bytes done (kept or sent).
    pub fn upload_file(
        &self,
        key: &str,
        path: &Path,
        checksum: &str,
        options: &UploadOptions,
        cancel: &CancelHandle,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Uploaded, TargetError> {
        let full = self.target.key(key);
        let local = |e: std::io::Error| self.err(format!("uploading {full}"), format!("{}: {e}", path.display()));
        let file = fs::File::open(path).map_err(local)?;
        let size = file.metadata().map_err(local)?.len();
        let lock = self.target.lock().zip(options.locked_until);
        let started = Instant::now();
        if size <= SINGLE_PUT_MAX {
            let bytes = read_at(&file, 0, size).map_err(local)?;
            let mut put = self
                .client
                .put_object()
                .bucket(self.target.bucket())
                .key(&full)
                .metadata(CHECKSUM_META, checksum)
                .content_md5(md5_base64(&bytes))
                .body(ByteStream::from(bytes));
            if let Some((lock, until)) = lock {
                put = put
                    .object_lock_mode(ObjectLockMode::from(lock.mode.s3_name()))
                    .object_lock_retain_until_date(DateTime::from(until));
            }
            let out = self.runtime.block_on(put.send()).map_err(|e| self.err(format!("uploading {full}"), said(&e)))?;
            progress(size);
            pace(options.bandwidth, size, started, cancel);
            return Ok(Uploaded { sent: size, resumed: 0, version: out.version_id().map(str::to_owned) });
        }
        let part = part_size(size);
        let count = size.div_ceil(part);
        // The upload this host began of this very file (same checksum, size and part size):
        // its parts are the file's, and are kept without reading the file again.
        let journal = options.journal.as_ref().map(|d| self.journal_path(d, &full));
        let what = format!("{checksum}\n{size}\n{part}");
        let trusted = journal.as_ref().and_then(|j| fs::read_to_string(j).ok()).and_then(|text| {
            text.split_once('\n').filter(|(_, rest)| rest.trim_end() == what).map(|(id, _)| id.to_owned())
        });
        let (upload_id, mut done_parts) = match self.resumable(&full, &file, (size, part), trusted.as_deref())? {
            Some(found) => found,
            None => {
                let mut create = self
                    .client
                    .create_multipart_upload()
                    .bucket(self.target.bucket())
                    .key(&full)
                    .metadata(CHECKSUM_META, checksum);
                if let Some((lock, until)) = lock {
                    create = create
                        .object_lock_mode(ObjectLockMode::from(lock.mode.s3_name()))
                        .object_lock_retain_until_date(DateTime::from(until));
                }
                let out = self
                    .runtime
                    .block_on(create.send())
                    .map_err(|e| self.err(format!("starting the upload of {full}"), said(&e)))?;
                let id = out
                    .upload_id()
                    .map(str::to_owned)
                    .ok_or_else(|| self.err(format!("starting the upload of {full}"), "the store gave no upload id"))?;
                if let Some(j) = &journal {
                    // Best effort: without it a resume checks each part against the file.
                    let _ = j.parent().map(fs::create_dir_all);
                    let _ = nasbak_repo::store::write_atomic(j, format!("{id}\n{what}\n").as_bytes(), 0o600);
                }
                (id, std::collections::BTreeMap::new())
            }
        };
        let part_len = |n: u64| part.min(size - (n - 1) * part);
        let resumed: u64 = done_parts.keys().map(|n| part_len(*n)).sum();
        let mut done = resumed;
        progress(done);
        let todo: Vec<u64> = (1..=count).filter(|n| !done_parts.contains_key(n)).collect();
        let mut sent = 0u64;
        let result: Result<(), TargetError> = self.runtime.block_on(async {
            let mut in_flight = tokio::task::JoinSet::new();
            let mut next = todo.iter();
            loop {
                while in_flight.len() < PARTS_IN_FLIGHT {
                    let Some(&n) = next.next() else { break };
                    if cancel.is_cancelled() {
                        return Err(self.err(format!("uploading {full}"), "cancelled"));
                    }
                    let bytes = read_at(&file, (n - 1) * part, part_len(n)).map_err(local)?;
                    let request = self
                        .client
                        .upload_part()
                        .bucket(self.target.bucket())
                        .key(&full)
                        .upload_id(&upload_id)
                        .part_number(n as i32)
                        .content_md5(md5_base64(&bytes))
                        .body(ByteStream::from(bytes));
                    in_flight.spawn(async move { (n, request.send().await) });
                }
                let Some(joined) = in_flight.join_next().await else { break };
                let (n, answer) = joined.map_err(|e| self.err(format!("uploading {full}"), e.to_string()))?;
                let out = answer.map_err(|e| self.err(format!("uploading part {n} of {full}"), said(&e)))?;
                let etag = out.e_tag().unwrap_or_default().to_owned();
                done_parts.insert(n, etag);
                done += part_len(n);
                sent += part_len(n);
                progress(done);
                if let Some(rate) = options.bandwidth {
                    let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            Ok(())
        });
        result?;
        if cancel.is_cancelled() {
            return Err(self.err(format!("uploading {full}"), "cancelled"));
        }
        let parts = done_parts
            .iter()
            .map(|(n, etag)| {
                aws_sdk_s3::types::CompletedPart::builder().part_number(*n as i32).e_tag(etag.clone()).build()
            })
            .collect();
        let out = self
            .runtime
            .block_on(
                self.client
                    .complete_multipart_upload()
                    .bucket(self.target.bucket())
                    .key(&full)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        aws_sdk_s3::types::CompletedMultipartUpload::builder().set_parts(Some(parts)).build(),
                    )
                    .send(),
            )
            .map_err(|e| self.err(format!("completing the upload of {full}"), said(&e)))?;
        if let Some(j) = &journal {
            let _ = fs::remove_file(j);
        }
        let version = out.version_id().map(str::to_owned);
        if let Some((lock, until)) = lock {
            self.ensure_retention(&full, version.as_deref(), lock, until)?;
        }
        Ok(Uploaded { sent, resumed, version })
    }

    /// The journal of uploads of `full` to this target, in `dir`.
    fn journal_path(&self, dir: &Path, full: &str) -> PathBuf {
        let name = format!("{}\n{}\n{full}", self.target.endpoint().as_str(), self.target.bucket());
        dir.join(format!("{}.upload", md5_hex(name.as_bytes())))
    }

    /// An earlier upload of `full` to resume: its id and the parts to keep (number to ETag),
    /// each checked against the file's bytes, or only by its size for the upload `trusted`
    /// (journaled by this host for this very file). The other uploads of the key, and one whose
    /// parts do not match the file, are aborted.
    #[allow(clippy::type_complexity)]
    fn resumable(
        &self,
        full: &str,
        file: &fs::File,
        (size, part): (u64, u64),
        trusted: Option<&str>,
    ) -> Result<Option<(String, std::collections::BTreeMap<u64, String>)>, TargetError> {
        let uploads = self
            .runtime
            .block_on(self.client.list_multipart_uploads().bucket(self.target.bucket()).prefix(full).send())
            .map_err(|e| self.err(format!("looking for an unfinished upload of {full}"), said(&e)))?;
        let mut best: Option<(String, std::collections::BTreeMap<u64, String>)> = None;
        for u in uploads.uploads() {
            let (Some(key), Some(id)) = (u.key(), u.upload_id()) else { continue };
            if key != full {
                continue;
            }
            let mut parts = std::collections::BTreeMap::new();
            let mut matches = true;
            let mut marker: Option<String> = None;
            'pages: loop {
                let page = self
                    .runtime
                    .block_on(
                        self.client
                            .list_parts()
                            .bucket(self.target.bucket())
                            .key(full)
                            .upload_id(id)
                            .set_part_number_marker(marker.take())
                            .send(),
                    )
                    .map_err(|e| self.err(format!("listing the parts of an unfinished upload of {full}"), said(&e)))?;
                for p in page.parts() {
                    let (Some(n), Some(etag)) = (p.part_number(), p.e_tag()) else { continue };
                    let n = n.max(1) as u64;
                    let expected = part.min(size.saturating_sub((n - 1) * part));
                    let whole = p.size() == Some(expected as i64) && expected > 0;
                    let same = match (whole, trusted == Some(id)) {
                        (false, _) => false,
                        (true, true) => true,
                        (true, false) => {
                            read_at(file, (n - 1) * part, expected).is_ok_and(|b| md5_hex(&b) == etag.trim_matches('"'))
                        }
                    };
                    if !same {
                        matches = false;
                        break 'pages;
                    }
                    parts.insert(n, etag.to_owned());
                }
                match page.next_part_number_marker() {
                    Some(m) if page.is_truncated() == Some(true) => marker = Some(m.to_owned()),
                    _ => break,
                }
            }
            let better = best.as_ref().is_none_or(|(_, b)| parts.len() > b.len());
            if matches && better {
                if let Some((old, _)) = best.take() {
                    self.abort(full, &old);
                }
                best = Some((id.to_owned(), parts));
            } else {
                self.abort(full, id);
            }
        }
        Ok(best)
    }

    /// Locks one version of the object `key` (under the target's prefix) until `until` in the
    /// target's mode, when the target locks and the version carries no lock yet: an object that
    /// was already on the target (copied before the target locked, or whose lock could not be
    /// set) is not kept unlocked. Nothing is done for a target without lock.
    pub fn ensure_locked(
        &self,
        key: &str,
        version: Option<&str>,
        until: std::time::SystemTime,
    ) -> Result<(), TargetError> {
        match self.target.lock() {
            Some(lock) => self.ensure_retention(&self.target.key(key), version, lock, until),
            None => Ok(()),
        }
    }

    /// Makes sure the completed object `full` carries its lock: some stores (radosgw 16) drop
    /// the lock a multipart upload was started with, so a version without retention gets it
    /// through `PutObjectRetention`.
    fn ensure_retention(
        &self,
        full: &str,
        version: Option<&str>,
        lock: nasbak_repo::ObjectLock,
        until: std::time::SystemTime,
    ) -> Result<(), TargetError> {
        let head = self
            .runtime
            .block_on(
                self.client
                    .head_object()
                    .bucket(self.target.bucket())
                    .key(full)
                    .set_version_id(version.map(str::to_owned))
                    .send(),
            )
            .map_err(|e| self.err(format!("reading the lock of {full}"), said(&e)))?;
        if head.object_lock_retain_until_date().is_some() {
            return Ok(());
        }
        let retention = aws_sdk_s3::types::ObjectLockRetention::builder()
            .mode(aws_sdk_s3::types::ObjectLockRetentionMode::from(lock.mode.s3_name()))
            .retain_until_date(DateTime::from(until))
            .build();
        self.runtime
            .block_on(
                self.client
                    .put_object_retention()
                    .bucket(self.target.bucket())
                    .key(full)
                    .set_version_id(version.map(str::to_owned))
                    .retention(retention)
                    .send(),
            )
            .map(drop)
            .map_err(|e| self.err(format!("locking {full}"), said(&e)))
    }

    fn abort(&self, full: &str, upload_id: &str) {
        let _ = self.runtime.block_on(
            self.client.abort_multipart_upload().bucket(self.target.bucket()).key(full).upload_id(upload_id).send(),
        );
    }

    /// The unfinished multipart uploads under `relative`: (key relative to the prefix, upload id).
    pub fn unfinished_uploads(&self, relative: &str) -> Result<Vec<(String, String)>, TargetError> {
        let full = self.target.key(relative);
        let out = self
            .runtime
            .block_on(self.client.list_multipart_uploads().bucket(self.target.bucket()).prefix(&full).send())
            .map_err(|e| self.err(format!("listing unfinished uploads under {full}"), said(&e)))?;
        Ok(out.uploads().iter().filter_map(|u| Some((self.relative(u.key()?), u.upload_id()?.to_owned()))).collect())
    }
}

/// Sleeps until `sent` bytes since `started` are within `rate` bytes per second.
fn pace(rate: Option<u64>, sent: u64, started: Instant, cancel: &CancelHandle) {
    if let Some(rate) = rate {
        let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            cancel.sleep(wait);
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
    fn parts_depend_on_the_size_alone_and_stay_within_ten_thousand() {
        assert_eq!(part_size(1), MIN_PART);
        assert_eq!(part_size(MIN_PART * 10_000), MIN_PART);
        for size in [MIN_PART * 10_000 + 1, 200 << 30, 5 << 40] {
            let p = part_size(size);
            assert!(p > MIN_PART && p.is_multiple_of(1 << 20), "{size}: {p}");
            assert!(size.div_ceil(p) <= 10_000, "{size}: {} parts", size.div_ceil(p));
        }
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_base64(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
    }

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
