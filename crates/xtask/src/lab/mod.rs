//! The KVM lab: packages, daemons, the test guest.
//!
//! Paths: packages go where Debian puts them; the guest is cached under [`CACHE`]; disposable
//! test domains live under [`STATE`]`/run`; what `lab up` started is written to [`STARTED`] so
//! that `lab down` stops only that.

pub mod ceph;
mod cpio;
mod daemons;
mod guest;
pub mod nas;
pub mod packages;
pub mod s3;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::exec::cmd;

/// Cached build products (the guest kernel and initramfs, downloaded packages).
pub const CACHE: &str = "/var/cache/nasbak-lab";
/// Lab state: `guest.conf` (paths of the current guest) and `run/` (test domains' files).
pub const STATE: &str = "/var/lib/nasbak-lab";
/// What `lab up` started, one daemon name a line.
pub const STARTED: &str = "/run/nasbak-lab/started";
/// The libvirt URI of the lab.
pub const URI: &str = "qemu:///system";
/// Prefix of every disposable test domain.
pub const TEST_DOMAIN_PREFIX: &str = "nasbak-t-";

fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab needs root (it installs packages, starts libvirtd and mounts file systems); run as root");
    }
    Ok(())
}

/// `cargo xtask lab up`.
pub fn up() -> Result<()> {
    require_root()?;
    packages::ensure()?;
    nasbak_testlab::swtpm_local_ca_to_tss().context("giving swtpm's local CA to tss")?;
    make_root_shared()?;
    open_kvm()?;
    daemons::ensure()?;
    let (libvirt, qemu) = daemons::versions()?;
    println!("lab: libvirt {libvirt}, QEMU {qemu} answer on {URI}");
    for dir in [STATE.to_owned(), format!("{STATE}/run")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    }
    let guest = guest::ensure()?;
    let conf = format!("kernel={}\ninitrd={}\n", guest.kernel.display(), guest.initrd.display());
    fs::write(Path::new(STATE).join("guest.conf"), conf)?;
    println!("lab: test guest {} + {}", guest.kernel.display(), guest.initrd.display());
    println!("lab: up");
    Ok(())
}

/// `cargo xtask lab status`.
pub fn status() -> Result<()> {
    let missing = packages::missing();
    if missing.is_empty() {
        println!("packages: all installed");
    } else {
        println!("packages: missing {}", missing.join(" "));
    }
    println!(
        "root mount propagation: {}",
        if root_is_shared() { "shared" } else { "private (lab up makes it shared)" }
    );
    match daemons::versions() {
        Ok((l, q)) => println!("libvirt: up on {URI} (libvirt {l}, QEMU {q})"),
        Err(e) => println!("libvirt: not answering on {URI} ({e:#})"),
    }
    match fs::read_to_string(Path::new(STATE).join("guest.conf")) {
        Ok(conf) if conf.lines().all(|l| l.split_once('=').is_some_and(|(_, p)| Path::new(p).exists())) => {
            println!("test guest: built ({})", conf.trim().replace('\n', ", "))
        }
        _ => println!("test guest: not built"),
    }
    let leftovers = daemons::test_domains().unwrap_or_default();
    println!("test domains: {}", if leftovers.is_empty() { "none".to_owned() } else { leftovers.join(" ") });
    Ok(())
}

/// `cargo xtask lab down`.
pub fn down() -> Result<()> {
    require_root()?;
    for name in ["nasbak-demo", "nasbak-bench", "nasbak-nas"] {
        let running = cmd("virsh").args(["-c", URI, "destroy", name]).run().is_ok();
        let defined = cmd("virsh").args(["-c", URI, "undefine", name, "--checkpoints-metadata"]).run().is_ok();
        if running || defined {
            println!("lab: removed the domain {name}");
        }
    }
    for name in daemons::test_domains().unwrap_or_default() {
        let _ = cmd("virsh").args(["-c", URI, "destroy", &name]).run();
        let _ =
            cmd("virsh").args(["-c", URI, "undefine", &name, "--checkpoints-metadata", "--snapshots-metadata"]).run();
        let _ = fs::remove_dir_all(Path::new(STATE).join("run").join(&name));
        println!("lab: removed test domain {name}");
    }
    daemons::stop_started()?;
    s3::stop()?;
    ceph::stop()?;
    println!("lab: down");
    Ok(())
}

/// QEMU runs as libvirt-qemu. With a root-only /dev/kvm, libvirtd finds KVM unusable for it and
/// re-probes every QEMU binary on each call that needs capabilities (10 to 80 s per `virsh
/// define`, seen here). Opening /dev/kvm to all, as udev does on a desktop, keeps the
/// capabilities cache valid. Lab guests still boot with TCG (`type='qemu'`).
fn open_kvm() -> Result<()> {
    let kvm = Path::new("/dev/kvm");
    if let Ok(meta) = fs::metadata(kvm)
        && meta.permissions().mode() & 0o777 != 0o666
    {
        fs::set_permissions(kvm, fs::Permissions::from_mode(0o666)).context("chmod 666 /dev/kvm")?;
        println!("lab: made /dev/kvm usable by the QEMU user");
    }
    Ok(())
}

fn root_is_shared() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            t.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 6 && f[4] == "/" && f[6..].iter().take_while(|x| **x != "-").any(|x| x.starts_with("shared:"))
            })
        })
        .unwrap_or(false)
}

/// QEMU runs in its own mount namespace; with a private root, repositories mounted after a VM
/// started are invisible to it. Systemd hosts have a shared root; the lab makes it so.
fn make_root_shared() -> Result<()> {
    if !root_is_shared() {
        cmd("mount").args(["--make-rshared", "/"]).run().context("making / shared")?;
        println!("lab: made / a shared mount");
    }
    Ok(())
}

/// Stops the processes whose command line (NUL-separated, as in `/proc/PID/cmdline`) `matches`:
/// SIGTERM, up to 15 s, then SIGKILL. Whether there were any.
pub(crate) fn stop_processes(matches: impl Fn(&str) -> bool) -> bool {
    use nix::sys::signal::Signal;
    let signal_all = |sig: Signal| {
        let mut found = 0;
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else { continue };
            let zombie = fs::read_to_string(e.path().join("status")).is_ok_and(|s| s.contains("State:\tZ"));
            if matches(&String::from_utf8_lossy(&cmdline)) && !zombie {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                found += 1;
            }
        }
        found
    };
    if signal_all(Signal::SIGTERM) == 0 {
        return false;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if signal_all(Signal::SIGCONT) == 0 {
            return true;
        }
    }
    signal_all(Signal::SIGKILL);
    true
}
