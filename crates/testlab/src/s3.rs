//! The lab's S3 endpoint (`cargo xtask lab s3 up`: radosgw over the lab Ceph cluster, HTTPS with
//! the lab's own CA), as its env file describes it.

use std::fs;
use std::path::PathBuf;

/// Where `cargo xtask lab s3 up` describes the endpoint.
pub const ENV_FILE: &str = "/var/lib/nasbak-lab/s3/env";

/// The lab's S3 endpoint: its URL, a bucket with object lock and one without, the lab user's
/// credentials file (AWS shared-credentials format) and the CA that signed the endpoint's
/// certificate.
#[derive(Debug, Clone)]
pub struct LabS3 {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created with object lock enabled.
    pub bucket_locked: String,
    /// The bucket without object lock.
    pub bucket_plain: String,
    /// The lab user's credentials file (0600).
    pub credentials: PathBuf,
    /// The lab CA's certificate (PEM).
    pub ca_file: PathBuf,
}

impl LabS3 {
    /// Reads the env file; panics, saying what to run, when the gateway was never brought up.
    pub fn get() -> LabS3 {
        let text = fs::read_to_string(ENV_FILE)
            .unwrap_or_else(|e| panic!("{ENV_FILE}: {e}; bring the lab's S3 gateway up: cargo xtask lab s3 up"));
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
                .unwrap_or_else(|| panic!("{ENV_FILE} has no {name}"))
                .trim()
                .to_owned()
        };
        LabS3 {
            endpoint: var("S3_ENDPOINT"),
            bucket_locked: var("S3_BUCKET_LOCKED"),
            bucket_plain: var("S3_BUCKET_PLAIN"),
            credentials: var("S3_CREDENTIALS").into(),
            ca_file: var("S3_CA_FILE").into(),
        }
    }

    /// Stops the gateway at once (SIGKILL, as a crash or a pulled cable would), and waits
    /// until it is gone.
    pub fn stop_gateway(&self) {
        let pid_file = std::path::Path::new(ENV_FILE).with_file_name("radosgw.pid");
        let pid: i32 = fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
            .trim()
            .parse()
            .expect("a pid");
        // SAFETY: kill(2) on the gateway's pid, which this lab started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < deadline, "radosgw {pid} does not go away");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Starts the gateway again (as `cargo xtask lab s3 up` did) and waits until it answers.
    pub fn start_gateway(&self) {
        let script = std::path::Path::new(ENV_FILE).with_file_name("start");
        let status = std::process::Command::new("sh").arg(&script).status().expect("sh");
        assert!(status.success(), "{} failed: {status}", script.display());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while self.aws(&["s3api", "list-buckets"]).is_err() {
            assert!(std::time::Instant::now() < deadline, "the lab gateway does not answer after a restart");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }

    /// The lab user's secret key (for tests that prove it is shown nowhere).
    pub fn secret_key(&self) -> String {
        let text = fs::read_to_string(&self.credentials).unwrap();
        text.lines()
            .find_map(|l| {
                l.split_once('=').filter(|(k, _)| k.trim() == "aws_secret_access_key").map(|(_, v)| v.trim().to_owned())
            })
            .expect("a secret key in the lab credentials")
    }

    /// Debian's awscli against the endpoint as the lab user (see docs/lab.md): its stdout, or
    /// its stderr as the error.
    pub fn aws(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("/usr/bin/aws")
            .args(["--endpoint-url", &self.endpoint, "--region", "us-east-1"])
            .args(args)
            .env("AWS_SHARED_CREDENTIALS_FILE", &self.credentials)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_CA_BUNDLE", &self.ca_file)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
            .env("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}
