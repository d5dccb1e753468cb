//! `cargo xtask lab s3 up`: an S3 endpoint on this machine (issue 25): Debian's `radosgw` (the
//! Ceph Object Gateway, the same Ceph version as the lab cluster it stores into), serving HTTPS on
//! 127.0.0.1 with a certificate of the lab's own CA (so clients verify TLS, as they must in
//! production); a user, and two buckets: one created with object lock enabled, one without.
//!
//! It writes the file [`env_file`] names, a shell file that sets `S3_ENDPOINT`, `S3_BUCKET_LOCKED`,
//! `S3_BUCKET_PLAIN`, `S3_CREDENTIALS` (the user's credentials file, in the AWS
//! shared-credentials format, 0600) and `S3_CA_FILE` (the lab CA's certificate), so that other
//! tools (rclone, awscli, the tests) can use the lab. Everything lives in
//! `/var/lib/nasbak-lab/s3`; `cargo xtask lab down` stops the gateway.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::exec::cmd;
use crate::lab::STATE;
use crate::lab::ceph::{ceph, tool};

/// The packages: the gateway, and awscli (an independent S3 client: the lab's buckets are made
/// with it, and tests check through it what nasbak did), rclone (the benchmark's peer).
const PACKAGES: &[&str] = &["radosgw", "awscli", "rclone", "openssl"];
/// Where the gateway listens (HTTPS).
pub const ENDPOINT: &str = "https://127.0.0.1:7443";
const LISTEN: &str = "127.0.0.1:7443";
/// The bucket with object lock enabled, and the one without.
pub const BUCKET_LOCKED: &str = "nasbak-locked";
pub const BUCKET_PLAIN: &str = "nasbak-plain";
/// The lab user.
const USER: &str = "nasbak-lab";

/// The gateway's directory.
pub fn dir() -> PathBuf {
    Path::new(STATE).join("s3")
}

/// The shell file describing the lab endpoint.
pub fn env_file() -> PathBuf {
    dir().join("env")
}

/// `cargo xtask lab s3 up`: the Ceph cluster, then the gateway, its user and buckets (or checks
/// the running ones), and the env file.
pub fn up() -> Result<()> {
    crate::lab::ceph::up()?;
    crate::lab::packages::ensure_extra(PACKAGES)?;
    let started = Instant::now();
    let d = dir();
    fs::create_dir_all(d.join("log"))?;
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
    if answers(&d) && d.join("start").is_file() {
        write_env(&d)?;
        println!("lab s3: up, {ENDPOINT}, {}", env_file().display());
        return Ok(());
    }
    stop()?;
    certificates(&d)?;
    let conf = crate::lab::ceph::dir().join("ceph.conf").to_string_lossy().into_owned();
    // Small placement groups: the gateway makes about seven pools on the one OSD.
    ceph(&conf, &["config", "set", "global", "osd_pool_default_pg_num", "8"])?;
    ceph(&conf, &["config", "set", "global", "osd_pool_default_pgp_num", "8"])?;
    ceph(&conf, &["config", "set", "global", "mon_max_pg_per_osd", "1000"])?;
    let keyring = d.join("client.rgw.lab.keyring");
    ceph(
        &conf,
        &[
            "auth",
            "get-or-create",
            "client.rgw.lab",
            "mon",
            "allow rw",
            "osd",
            "allow rwx",
            "mgr",
            "allow rw",
            "-o",
            &keyring.to_string_lossy(),
        ],
    )?;
    fs::set_permissions(&keyring, fs::Permissions::from_mode(0o600))?;
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let frontends =
        format!("beast ssl_endpoint={LISTEN} ssl_certificate={} ssl_private_key={}", p("server.pem"), p("server.key"));
    fs::create_dir_all(d.join("data"))?;
    let argv: Vec<String> = [
        "radosgw".to_owned(),
        "-c".into(),
        conf.clone(),
        "-n".into(),
        "client.rgw.lab".into(),
        "--keyring".into(),
        keyring.to_string_lossy().into_owned(),
        format!("--rgw-frontends={frontends}"),
        "--rgw-data".into(),
        p("data"),
        "--log-file".into(),
        p("log/radosgw.log"),
        "--pid-file".into(),
        p("radosgw.pid"),
        "--admin-socket".into(),
        p("radosgw.asok"),
        "--rgw-enable-usage-log=false".into(),
    ]
    .into();
    // The same command as a script, so that tests can start the gateway again after stopping
    // it (no secret in it: the keyring is a file).
    let quoted: Vec<String> = argv.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    fs::write(d.join("start"), format!("#!/bin/sh\nexec {} </dev/null >/dev/null 2>&1\n", quoted.join(" ")))?;
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("starting radosgw")?;
    if !status.success() {
        bail!("radosgw failed to start ({status}); see {}", p("log/radosgw.log"));
    }
    // The user (radosgw-admin as the cluster's admin), with keys of its own.
    let access = random_hex(10).to_uppercase();
    let secret = random_hex(20);
    let _ = tool(
        "radosgw-admin",
        &["-c", &conf, "-n", "client.admin", "user", "rm", &format!("--uid={USER}"), "--purge-data"],
    );
    tool(
        "radosgw-admin",
        &[
            "-c",
            &conf,
            "-n",
            "client.admin",
            "user",
            "create",
            &format!("--uid={USER}"),
            "--display-name=nasbak lab",
            &format!("--access-key={access}"),
            &format!("--secret-key={secret}"),
        ],
    )?;
    let credentials = d.join("credentials");
    fs::write(&credentials, format!("[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"))?;
    fs::set_permissions(&credentials, fs::Permissions::from_mode(0o600))?;
    // The gateway answers once its pools are made.
    let deadline = Instant::now() + Duration::from_secs(120);
    while aws(&d, &["s3api", "list-buckets"]).is_err() {
        if Instant::now() > deadline {
            bail!("the lab S3 gateway does not answer on {ENDPOINT} after 2 minutes; see {}", p("log/radosgw.log"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    aws(&d, &["s3api", "create-bucket", "--bucket", BUCKET_LOCKED, "--object-lock-enabled-for-bucket"])?;
    aws(&d, &["s3api", "create-bucket", "--bucket", BUCKET_PLAIN])?;
    let lock = aws(&d, &["s3api", "get-object-lock-configuration", "--bucket", BUCKET_LOCKED])?;
    if !lock.contains("Enabled") {
        bail!("the bucket {BUCKET_LOCKED} has no object lock: {lock}");
    }
    write_env(&d)?;
    println!("lab s3: up in {:.1} s, {ENDPOINT}, {}", started.elapsed().as_secs_f64(), env_file().display());
    Ok(())
}

/// Whether the gateway answers the lab user with both buckets (over verified TLS).
fn answers(d: &Path) -> bool {
    d.join("credentials").is_file()
        && aws(d, &["s3api", "list-buckets", "--query", "Buckets[].Name", "--output", "text"])
            .is_ok_and(|b| b.contains(BUCKET_LOCKED) && b.contains(BUCKET_PLAIN))
}

/// awscli against the lab endpoint as the lab user, verifying TLS with the lab CA.
pub fn aws(d: &Path, args: &[&str]) -> Result<String> {
    let mut all = vec!["--endpoint-url", ENDPOINT, "--region", "us-east-1"];
    all.extend_from_slice(args);
    // Debian's awscli by its path: a newer one from pip earlier on PATH sends the flexible
    // checksums (aws-chunked uploads) that this gateway does not know, and its puts vanish.
    Ok(cmd("/usr/bin/aws")
        .args(all)
        .env("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        .env("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        .env("AWS_SHARED_CREDENTIALS_FILE", d.join("credentials"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_CA_BUNDLE", d.join("ca.pem"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .timeout(Duration::from_secs(60))
        .run()?
        .stdout_text())
}

/// The lab CA and the gateway's certificate for 127.0.0.1 (kept while they exist).
fn certificates(d: &Path) -> Result<()> {
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    if d.join("server.pem").is_file() && d.join("ca.pem").is_file() {
        return Ok(());
    }
    let openssl = |args: &[&str]| tool("openssl", args);
    openssl(&["genrsa", "-out", &p("ca.key"), "2048"])?;
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("ca.key"),
        "-sha256",
        "-days",
        "3650",
        "-subj",
        "/CN=nasbak lab CA",
        "-out",
        &p("ca.pem"),
    ])?;
    openssl(&["genrsa", "-out", &p("server.key"), "2048"])?;
    openssl(&["req", "-new", "-key", &p("server.key"), "-subj", "/CN=127.0.0.1", "-out", &p("server.csr")])?;
    fs::write(d.join("server.ext"), "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "3650",
        "-sha256",
        "-extfile",
        &p("server.ext"),
        "-out",
        &p("server.pem"),
    ])?;
    for key in ["ca.key", "server.key"] {
        fs::set_permissions(d.join(key), fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn write_env(d: &Path) -> Result<()> {
    let text = format!(
        "# The lab S3 endpoint (cargo xtask lab s3 up).\n\
         S3_ENDPOINT={ENDPOINT}\n\
         S3_BUCKET_LOCKED={BUCKET_LOCKED}\n\
         S3_BUCKET_PLAIN={BUCKET_PLAIN}\n\
         S3_CREDENTIALS={}\n\
         S3_CA_FILE={}\n",
        d.join("credentials").display(),
        d.join("ca.pem").display()
    );
    fs::write(env_file(), text)?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let _ = fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf));
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stops the lab gateway (the radosgw whose command line names the lab's rgw user).
pub fn stop() -> Result<()> {
    if crate::lab::stop_processes(|cmdline| cmdline.starts_with("radosgw") && cmdline.contains("client.rgw.lab")) {
        println!("lab s3: stopped");
    }
    Ok(())
}
