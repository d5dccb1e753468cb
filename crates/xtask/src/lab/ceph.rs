//! `cargo xtask lab ceph`: a one-node Ceph cluster on this machine (issue 12), from Debian's
//! packages, bootstrapped by hand (no systemd here): a monitor on 127.0.0.1 (msgr v2 and v1), a
//! manager, one OSD whose store is in memory, an MDS; a pool `vms` for VM disks (RBD), a CephFS
//! `labfs`; cephx users `client.nasbak-vm` (RBD on `vms`) and `client.nasbak-fs` (the file
//! system), their keyrings 0600; a libvirt secret holding the VM user's key.
//!
//! Everything lives in `/var/lib/nasbak-lab/ceph` (configuration, keyrings, daemon data, logs,
//! run directory); `cargo xtask lab down` stops the daemons. Facts found on the way are in
//! `shared/reference/incremental-facts.md` and docs/lab.md.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::exec::cmd;
use crate::lab::STATE;

/// The packages (without recommends).
const PACKAGES: &[&str] =
    &["ceph-mon", "ceph-mgr", "ceph-osd", "ceph-mds", "ceph-common", "ceph-fuse", "qemu-block-extra"];
/// The monitors: three, so that clients are given several and a quorum survives one down.
const MONS: &[(&str, &str)] = &[
    ("a", "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]"),
    ("b", "[v2:127.0.0.1:3301,v1:127.0.0.1:6790]"),
    ("c", "[v2:127.0.0.1:3302,v1:127.0.0.1:6791]"),
];
/// The libvirt secret's usage name for the VM user's key.
pub const SECRET_USAGE: &str = "nasbak-lab client.nasbak-vm";

/// The lab cluster's directory.
pub fn dir() -> PathBuf {
    Path::new(STATE).join("ceph")
}

/// `cargo xtask lab ceph`: the cluster up, then the Ceph tests with a closing
/// `N passed, M failed`; fails on any failure.
pub fn run() -> Result<()> {
    crate::exec::conclude("Ceph", run_tests()?)
}

/// Brings the cluster up and runs the Ceph tests (`tests/lab_ceph.rs` of nasbak, built with
/// its `ceph-lab` feature); how many passed and failed (an error when none ran).
pub fn run_tests() -> Result<(u64, u64)> {
    up()?;
    // Under the deadline every test binary has (see deadline.rs).
    let binaries =
        crate::deadline::test_binaries(&["test", "-p", "nasbak", "--features", "ceph-lab", "--test", "lab_ceph"])?;
    let (passed, failed) = crate::deadline::run_all(&binaries, crate::deadline::Limits::from_env()?)?;
    if passed + failed == 0 {
        bail!("no Ceph test ran");
    }
    Ok((passed, failed))
}

/// `cargo xtask lab ceph up`: brings the cluster up (or checks the running one) and prints
/// where its configuration and keys are.
pub fn up() -> Result<()> {
    crate::lab::up()?; // libvirtd, for the secret
    crate::lab::packages::ensure_extra(PACKAGES)?;
    let started = Instant::now();
    let d = dir();
    let layout = layout();
    let same_layout = fs::read_to_string(d.join("layout")).is_ok_and(|l| l == layout);
    if same_layout && health(&d).is_ok_and(|h| h.starts_with("HEALTH_OK")) {
        libvirt_secret(&d.join("ceph.conf").to_string_lossy())?;
        println!("lab ceph: up (HEALTH_OK), {}", d.display());
        return Ok(());
    }
    stop()?;
    let _ = fs::remove_dir_all(&d);
    for sub in ["mon/ceph-a", "mgr/ceph-x", "osd/ceph-0", "mds/ceph-a", "run", "log"] {
        fs::create_dir_all(d.join(sub))?;
    }
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
    let fsid = uuid::Uuid::new_v4().to_string();
    let conf = d.join("ceph.conf");
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    fs::write(
        &conf,
        format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon host = {mon_host}\n\
             mon initial members = a,b,c\n\
             auth cluster required = cephx\n\
             auth service required = cephx\n\
             auth client required = cephx\n\
             auth allow insecure global id reclaim = false\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             mon allow pool size one = true\n\
             mon warn on pool no redundancy = false\n\
             mon data avail warn = 2\n\
             mon data avail crit = 1\n\
             osd crush chooseleaf type = 0\n\
             run dir = {run}\n\
             log file = {log}/$name.log\n\
             admin socket = {run}/$name.asok\n\
             keyring = {d}/$name.keyring\n\
             [mon]\n\
             mon data = {d}/mon/ceph-$id\n\
             keyring = {d}/mon/ceph-$id/keyring\n\
             [mgr]\n\
             mgr data = {d}/mgr/ceph-$id\n\
             [osd]\n\
             osd data = {d}/osd/ceph-$id\n\
             osd objectstore = memstore\n\
             memstore device bytes = 17179869184\n\
             osd memory target = 536870912\n\
             [mds]\n\
             mds data = {d}/mds/ceph-$id\n\
             [client]\n\
             pid file =\n\
             admin socket = {run}/$name.$pid.asok\n",
            mon_host = MONS.iter().map(|(_, a)| *a).collect::<Vec<_>>().join(","),
            run = p("run"),
            log = p("log"),
            d = d.display()
        ),
    )?;
    let c = conf.to_string_lossy().into_owned();
    // Keys: the monitor's, the admin's (imported into the monitor's keyring).
    let mon_keyring = p("mon.keyring");
    let admin_keyring = p("client.admin.keyring");
    tool("ceph-authtool", &["--create-keyring", &mon_keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])?;
    tool(
        "ceph-authtool",
        &[
            "--create-keyring",
            &admin_keyring,
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mds",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        ],
    )?;
    tool("ceph-authtool", &[&mon_keyring, "--import-keyring", &admin_keyring])?;
    let monmap = p("monmap");
    let mut args = vec!["--create"];
    for (id, addrs) in MONS {
        args.extend(["--addv", id, addrs]);
    }
    args.extend(["--fsid", &fsid, &monmap]);
    tool("monmaptool", &args)?;
    for (id, _) in MONS {
        fs::create_dir_all(d.join(format!("mon/ceph-{id}")))?;
        tool("ceph-mon", &["-c", &c, "--mkfs", "-i", id, "--monmap", &monmap, "--keyring", &mon_keyring])?;
        daemon("ceph-mon", &c, id)?;
    }
    // The manager.
    ceph(
        &c,
        &[
            "auth",
            "get-or-create",
            "mgr.x",
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "mds",
            "allow *",
            "-o",
            &p("mgr.x.keyring"),
        ],
    )?;
    daemon("ceph-mgr", &c, "x")?;
    // The OSD.
    let osd_uuid = uuid::Uuid::new_v4().to_string();
    let secret = tool("ceph-authtool", &["--gen-print-key"])?.trim().to_owned();
    let json = p("osd.json");
    fs::write(&json, format!("{{\"cephx_secret\": \"{secret}\"}}"))?;
    let id = ceph(&c, &["osd", "new", &osd_uuid, "-i", &json])?.trim().to_owned();
    fs::remove_file(&json)?;
    if id != "0" {
        bail!("the new OSD got id {id}, expected 0");
    }
    tool("ceph-authtool", &["--create-keyring", &p("osd.0.keyring"), "--name", "osd.0", "--add-key", &secret])?;
    tool("ceph-osd", &["-c", &c, "-i", "0", "--mkfs", "--osd-uuid", &osd_uuid])?;
    daemon("ceph-osd", &c, "0")?;
    // Pools, the file system and its MDS.
    ceph(&c, &["osd", "pool", "create", "vms", "8"])?;
    tool("rbd", &["-c", &c, "pool", "init", "vms"])?;
    ceph(&c, &["osd", "pool", "create", "cephfs_data", "8"])?;
    ceph(&c, &["osd", "pool", "create", "cephfs_metadata", "8"])?;
    ceph(&c, &["fs", "new", "labfs", "cephfs_metadata", "cephfs_data"])?;
    ceph(
        &c,
        &[
            "auth",
            "get-or-create",
            "mds.a",
            "mon",
            "allow profile mds",
            "osd",
            "allow rwx",
            "mds",
            "allow",
            "mgr",
            "allow profile mds",
            "-o",
            &p("mds.a.keyring"),
        ],
    )?;
    daemon("ceph-mds", &c, "a")?;
    // The users nasbak's tests run as.
    ceph(
        &c,
        &[
            "auth",
            "get-or-create",
            "client.nasbak-vm",
            "mon",
            "profile rbd",
            "osd",
            "profile rbd pool=vms",
            "mgr",
            "profile rbd pool=vms",
            "-o",
            &p("client.nasbak-vm.keyring"),
        ],
    )?;
    ceph(&c, &["fs", "authorize", "labfs", "client.nasbak-fs", "/", "rw", "-o", &p("client.nasbak-fs.keyring")])?;
    // `ceph auth get-or-create -o` writes keyrings world-readable.
    for e in fs::read_dir(&d)?.flatten() {
        if e.file_name().to_string_lossy().ends_with(".keyring") {
            fs::set_permissions(e.path(), fs::Permissions::from_mode(0o600))?;
        }
    }
    libvirt_secret(&c)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = health(&d).unwrap_or_default();
        if h.starts_with("HEALTH_OK") && ceph(&c, &["fs", "status", "labfs"]).is_ok_and(|s| s.contains("active")) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the lab Ceph cluster is not healthy after 2 minutes: {h}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    fs::write(d.join("layout"), layout)?;
    println!("lab ceph: up in {:.1} s, HEALTH_OK, {}", started.elapsed().as_secs_f64(), d.display());
    Ok(())
}

/// The key of `client.<user>` (base64), from its keyring in the lab directory.
pub fn key(user: &str) -> Result<String> {
    let keyring = dir().join(format!("client.{user}.keyring"));
    let text = fs::read_to_string(&keyring).with_context(|| format!("reading {}", keyring.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .map(|k| k.trim().to_owned())
        .with_context(|| format!("no key in {}", keyring.display()))
}

/// What the cluster is made of: a running cluster of another layout (an older lab) is rebuilt.
fn layout() -> String {
    let mons: Vec<String> = MONS.iter().map(|(id, addrs)| format!("mon.{id} {addrs}")).collect();
    // The memstore's size is part of it: `bench rbd` needs more than the default 1 GiB.
    format!("{}; pool vms; fs labfs; client.nasbak-vm, client.nasbak-fs; memstore 16 GiB\n", mons.join(", "))
}

/// `ceph health` with the admin key.
fn health(d: &Path) -> Result<String> {
    ceph(&d.join("ceph.conf").to_string_lossy(), &["health"])
}

pub(crate) fn tool(program: &str, args: &[&str]) -> Result<String> {
    Ok(cmd(program).args(args).timeout(Duration::from_secs(60)).run()?.stdout_text())
}

pub(crate) fn ceph(conf: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-c", conf, "--connect-timeout", "20"];
    all.extend_from_slice(args);
    tool("ceph", &all)
}

/// Starts a daemon in the background (it daemonizes itself and writes its pid file).
fn daemon(program: &str, conf: &str, id: &str) -> Result<()> {
    let status = Command::new(program)
        .args(["-c", conf, "-i", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} -i {id} failed to start ({status}); see {}", dir().join("log").display());
    }
    Ok(())
}

/// The libvirt secret holding client.nasbak-vm's key (defined afresh: a secret outlives a
/// rebuilt cluster).
fn libvirt_secret(conf: &str) -> Result<()> {
    let d = dir();
    let virsh = |args: &[&str]| -> Result<String> {
        let mut all = vec!["-c", crate::lab::URI];
        all.extend_from_slice(args);
        tool("virsh", &all)
    };
    for line in virsh(&["secret-list"])?.lines() {
        if line.contains(SECRET_USAGE)
            && let Some(uuid) = line.split_whitespace().next()
        {
            virsh(&["secret-undefine", uuid])?;
        }
    }
    let xml = d.join("secret.xml");
    fs::write(
        &xml,
        // Not private: nasbak reads the key from libvirt for qemu-img (a private secret leaves
        // it the client's keyring on the host, see docs/ceph.md).
        format!("<secret ephemeral='no' private='no'><usage type='ceph'><name>{SECRET_USAGE}</name></usage></secret>"),
    )?;
    let out = virsh(&["secret-define", &xml.to_string_lossy()])?;
    let uuid = out.split_whitespace().find(|w| w.len() == 36).context("the secret's UUID")?.to_owned();
    let key = ceph(conf, &["auth", "print-key", "client.nasbak-vm"])?;
    let key_file = d.join("client.nasbak-vm.key");
    fs::write(&key_file, key.trim())?;
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600))?;
    virsh(&["secret-set-value", &uuid, "--file", &key_file.to_string_lossy()])?;
    fs::write(d.join("secret.uuid"), &uuid)?;
    Ok(())
}

/// Stops the lab cluster's daemons (those whose command line names its configuration).
pub fn stop() -> Result<()> {
    let conf = dir().join("ceph.conf").to_string_lossy().into_owned();
    if crate::lab::stop_processes(|cmdline| cmdline.starts_with("ceph-") && cmdline.contains(&conf)) {
        println!("lab ceph: stopped");
    }
    Ok(())
}
