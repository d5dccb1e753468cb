//! The test guest: Debian's kernel, busybox, the virtio/ext4 modules and qemu-ga in an
//! initramfs. It boots under TCG in about ten seconds and answers the guest agent.

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::CACHE;
use super::cpio;
use crate::exec::cmd;

const INIT: &str = include_str!("guest-init.sh");

/// Modules in dependency order; a missing one is skipped (it may be built in).
pub(super) const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc16",
    "crc32c_generic",
    "libcrc32c",
    "mbcache",
    "jbd2",
    "ext4",
];

/// A built guest.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// FNV-1a: a cache key that stays the same across Rust versions.
pub(super) fn fnv(parts: &[&str]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn package_version(package: &str) -> Result<String> {
    Ok(cmd("dpkg-query").args(["-W", "-f=${Version}", package]).run()?.stdout_text())
}

/// The kernel package `linux-image-amd64` points at, downloaded into the cache.
pub(super) fn kernel_deb() -> Result<PathBuf> {
    let debs = Path::new(CACHE).join("debs");
    fs::create_dir_all(&debs)?;
    let depends = cmd("apt-cache").args(["depends", "linux-image-amd64"]).run()?.stdout_text();
    let Some(package) =
        depends.lines().find_map(|l| l.trim().strip_prefix("Depends: ")).map(str::trim).map(str::to_owned)
    else {
        bail!("apt-cache knows no linux-image-amd64; run apt-get update");
    };
    let find = || -> Result<Option<PathBuf>> {
        Ok(fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))))
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    println!("lab: downloading {package}");
    let download = || cmd("apt-get").args(["download", "-q", &package]).current_dir(&debs).run();
    if download().is_err() {
        cmd("apt-get").args(["update", "-q"]).run().context("apt-get update")?;
        download().with_context(|| format!("downloading {package}"))?;
    }
    find()?.with_context(|| format!("apt-get download left no {package} .deb in {}", debs.display()))
}

pub(super) fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, name) {
                return Some(found);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn copy_into(root: &Path, from: &Path) -> Result<()> {
    let to = root.join(from.strip_prefix("/").unwrap_or(from));
    fs::create_dir_all(to.parent().expect("has a parent"))?;
    fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// The shared libraries `ldd` lists for `binary`.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd("ldd").arg(binary).run()?.stdout_text();
    Ok(out
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Returns the cached guest for the current inputs, building it when they changed.
pub fn ensure() -> Result<Guest> {
    let deb = kernel_deb()?;
    let deb_name = deb.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let key = fnv(&[
        &deb_name,
        &package_version("qemu-guest-agent")?,
        &package_version("busybox-static")?,
        INIT,
        &MODULES.join(" "),
    ]);
    let dir = Path::new(CACHE).join(format!("guest-{key:016x}"));
    let guest = Guest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    if guest.kernel.is_file() && guest.initrd.is_file() {
        return Ok(guest);
    }
    println!("lab: building the test guest from {deb_name}");
    let work = Path::new(CACHE).join(format!("build-{key:016x}"));
    let _ = fs::remove_dir_all(&work);
    let extract = work.join("kernel");
    let root = work.join("root");
    fs::create_dir_all(&extract)?;
    cmd("dpkg").arg("-x").arg(&deb).arg(&extract).run()?;
    let vmlinuz = fs::read_dir(extract.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("the kernel package has no /boot/vmlinuz-*")?;
    for d in ["bin", "sbin", "etc", "lib/modules", "proc", "sys", "dev", "run", "tmp", "data"] {
        fs::create_dir_all(root.join(d))?;
    }
    let mut order = Vec::new();
    for m in MODULES {
        match find_file(&extract.join("lib/modules"), &format!("{m}.ko")) {
            Some(ko) => {
                fs::copy(&ko, root.join("lib/modules").join(format!("{m}.ko")))?;
                order.push(*m);
            }
            None => println!("lab: module {m} not found as a file (built in?)"),
        }
    }
    fs::write(root.join("etc/modules-order"), order.join("\n") + "\n")?;
    fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying busybox (package busybox-static)")?;
    fs::write(root.join("init"), INIT)?;
    fs::write(root.join("sbin/shutdown"), "#!/bin/sh\nsync\npoweroff -f\n")?;
    for f in ["init", "sbin/shutdown", "bin/busybox"] {
        fs::set_permissions(root.join(f), fs::Permissions::from_mode(0o755))?;
    }
    let qga = Path::new("/usr/sbin/qemu-ga");
    copy_into(&root, qga)?;
    for lib in libraries(qga)? {
        copy_into(&root, &lib)?;
    }
    fs::create_dir_all(&dir)?;
    fs::set_permissions(CACHE, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let tmp = dir.join("initrd.img.tmp");
    let mut out = BufWriter::new(File::create(&tmp)?);
    cpio::write_tree(&root, &mut out)?;
    out.into_inner()?.sync_all()?;
    fs::copy(&vmlinuz, &guest.kernel)?;
    fs::rename(&tmp, &guest.initrd)?;
    for f in [&guest.kernel, &guest.initrd] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644))?;
    }
    let _ = fs::remove_dir_all(&work);
    Ok(guest)
}
