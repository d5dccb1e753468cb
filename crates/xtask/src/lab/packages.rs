//! Debian packages the lab needs, installed when missing.

use anyhow::{Context, Result};

use crate::exec::cmd;

/// Everything the lab and the tests use, except qemu-utils (see [`ensure`]).
const PACKAGES: &[&str] = &[
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "libvirt-dev",
    "pkg-config",
    "qemu-system-x86",
    "qemu-guest-agent",
    "busybox-static",
    "kmod",
    "e2fsprogs",
    "util-linux",
    "fdisk",
    "xfsprogs",
    // Guest layouts that mounted backups show: LVM (written with LVM's own tools, nothing
    // activated) and btrfs subvolumes.
    "lvm2",
    "btrfs-progs",
    "extlinux",
    "fuse3",
    "sshfs",
    "openssh-server",
    "openssh-client",
    // Backtraces of a test that exceeds its deadline (`cargo xtask test`).
    "gdb",
    // promtool, which lints the metrics file (`nasbak metrics`); its server is not run.
    "prometheus",
    // UEFI guests with an emulated TPM (their variable store and TPM state).
    "ovmf",
    "swtpm",
    "swtpm-tools",
];

fn installed(package: &str) -> bool {
    cmd("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .run()
        .map(|o| o.stdout_text().contains("install ok installed"))
        .unwrap_or(false)
}

/// Packages of the list that are not installed, plus qemu-utils when `qemu-img` is missing.
pub fn missing() -> Vec<String> {
    let mut m: Vec<String> = PACKAGES.iter().filter(|p| !installed(p)).map(|p| p.to_string()).collect();
    if which("qemu-img").is_none() {
        m.push("qemu-utils".into());
    }
    m
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    println!("lab: installing {}", packages.join(" "));
    cmd("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold"])
        .args(packages)
        .timeout(std::time::Duration::from_secs(1800))
        .run()
        .with_context(|| format!("installing {}", packages.join(" ")))?;
    Ok(())
}

/// Installs what is missing. Installing qemu-system-x86 from Debian 12 removes a newer
/// qemu-utils from backports (and with it `qemu-img`), so qemu-utils is installed afterwards,
/// in the version that matches the system emulator.
pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    let need_qemu_img = which("qemu-img").is_none();
    if missing.is_empty() && !need_qemu_img {
        return Ok(());
    }
    println!("lab: apt-get update");
    cmd("apt-get")
        .args(["update", "-q"])
        .timeout(std::time::Duration::from_secs(900))
        .run()
        .context("apt-get update")?;
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if missing.contains(&"prometheus") {
        // Only promtool is wanted: the server the package starts is stopped and stays off.
        let _ = cmd("systemctl")
            .args(["disable", "--now", "prometheus.service"])
            .timeout(std::time::Duration::from_secs(120))
            .run();
    }
    if which("qemu-img").is_none() {
        apt_install(&["qemu-utils"])?;
    }
    Ok(())
}

/// Installs `packages` (beyond the lab's own) when they are missing, e.g. `rsync` for the bench.
pub fn ensure_extra(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    cmd("apt-get")
        .args(["update", "-q"])
        .timeout(std::time::Duration::from_secs(900))
        .run()
        .context("apt-get update")?;
    apt_install(&missing)
}
