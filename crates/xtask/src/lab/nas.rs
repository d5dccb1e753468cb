//! The NAS guest: a Debian root (debootstrap) with nfs-kernel-server, rpcbind, Samba, nfs-common
//! and cifs-utils, booted under TCG with Debian's kernel (which has nfs, nfsd and cifs as
//! modules), that serves NFS and SMB on its own loopback and runs `nasbak-repo`'s `tests/nas.rs`
//! against them. `cargo xtask lab nas` builds it (cached by its inputs), boots it with the test
//! binary on a work disk, and reads the results back from that disk.

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::guest::{MODULES, find_file, fnv, kernel_deb};
use super::{CACHE, STATE, URI, cpio};
use crate::exec::cmd;

const INITRD_INIT: &str = include_str!("nas-initrd-init.sh");
const NAS_INIT: &str = include_str!("nas-init.sh");
/// NFS and SMB servers and clients; nftables and ceph-common (mount.ceph) for the CephFS
/// client; qemu-utils for nasbak's own workflows on a CephFS repository; for `nasbak mount`
/// over device-mapper (`nas_mount.rs`): qemu-system-common (qemu-storage-daemon) and fuse3 for
/// its exports, dmsetup and cryptsetup for what it opens, and lvm2, thin-provisioning-tools
/// and fdisk to lay the test's disks out as installers do.
const PACKAGES: &str = "kmod,iproute2,nfs-kernel-server,rpcbind,nfs-common,samba,cifs-utils,nftables,ceph-common,\
                        qemu-utils,qemu-system-common,fuse3,lvm2,thin-provisioning-tools,cryptsetup-bin,fdisk";
const MIRROR: &str = "http://deb.debian.org/debian";
const DOMAIN: &str = "nasbak-nas";
/// The Samba user of the lab share. The password is a lab fixture, not a secret of anyone's.
const SMB_USER: &str = "nasbak";
const SMB_PASSWORD: &str = "lab-Pa55-smb";

const EXPORTS: &str = "/srv/nfs/open 127.0.0.1(rw,no_root_squash,no_subtree_check,insecure,fsid=1)\n\
                       /srv/nfs/squash 127.0.0.1(rw,root_squash,no_subtree_check,insecure,fsid=2)\n";

const SMB_CONF: &str = "[global]\n\
   interfaces = lo\n\
   bind interfaces only = yes\n\
   server role = standalone server\n\
   map to guest = never\n\
   server min protocol = SMB3_00\n\
   log file = /var/log/samba/log.%m\n\
   disable netbios = yes\n\
   smb ports = 445\n\
[backup]\n\
   path = /srv/smb\n\
   read only = no\n\
   valid users = nasbak\n\
   force user = nasbak\n";

/// A built NAS guest.
struct NasGuest {
    kernel: PathBuf,
    initrd: PathBuf,
    root: PathBuf,
}

fn chroot(root: &Path, args: &[&str]) -> Result<String> {
    Ok(cmd("chroot").arg(root).args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").run()?.stdout_text())
}

/// The cached NAS guest for the current inputs, built when they changed.
fn ensure() -> Result<NasGuest> {
    let deb = kernel_deb()?;
    let deb_name = deb.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let key = fnv(&[&deb_name, INITRD_INIT, NAS_INIT, PACKAGES, EXPORTS, SMB_CONF, SMB_USER, SMB_PASSWORD]);
    let dir = Path::new(CACHE).join(format!("nas-{key:016x}"));
    let guest = NasGuest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), root: dir.join("root.img") };
    if guest.kernel.is_file() && guest.initrd.is_file() && guest.root.is_file() {
        return Ok(guest);
    }
    super::packages::ensure_extra(&["debootstrap", "e2fsprogs"])?;
    // The debootstrap (the slow part) is kept across a failed build of the rest.
    let work = Path::new(CACHE).join(format!("nas-build-{:016x}", fnv(&[PACKAGES])));
    let root = work.join("root");
    let bootstrapped = work.join("debootstrap.done");
    if !bootstrapped.exists() {
        let _ = fs::remove_dir_all(&work);
        println!("lab: building the NAS guest: debootstrap bookworm with {PACKAGES} (a few minutes, once)");
        cmd("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), "bookworm"])
            .arg(&root)
            .arg(std::env::var("NASBAK_DEBIAN_MIRROR").unwrap_or_else(|_| MIRROR.to_owned()))
            .timeout(Duration::from_secs(3600))
            .run()
            .context("debootstrap of the NAS guest")?;
        chroot(&root, &["true"]).context("the debootstrapped root does not run programs")?;
        fs::write(&bootstrapped, "")?;
    }
    let _ = chroot(&root, &["userdel", SMB_USER]);
    // Debian's kernel with its whole module tree, so modprobe finds nfsd, nfs, cifs and their
    // dependencies. Extracted beside the root and copied in: `dpkg -x` into a merged-/usr root
    // would replace its /lib symlink with a directory.
    let kernel = work.join("kernel");
    let _ = fs::remove_dir_all(&kernel);
    fs::create_dir_all(&kernel)?;
    cmd("dpkg").arg("-x").arg(&deb).arg(&kernel).run()?;
    let version = fs::read_dir(kernel.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no /lib/modules/<version>")?;
    let modules = root.join("usr/lib/modules");
    let _ = fs::remove_dir_all(&modules);
    fs::create_dir_all(&modules)?;
    cmd("cp").args(["-a"]).arg(kernel.join("lib/modules").join(&version)).arg(&modules).run()?;
    cmd("depmod").arg("-b").arg(&root).arg(&version).run()?;
    fs::write(root.join("sbin/nas-init"), NAS_INIT)?;
    fs::set_permissions(root.join("sbin/nas-init"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("etc/exports"), EXPORTS)?;
    fs::write(root.join("etc/samba/smb.conf"), SMB_CONF)?;
    for d in ["srv/nfs/open", "srv/nfs/squash", "srv/smb", "var/log/samba"] {
        fs::create_dir_all(root.join(d))?;
    }
    chroot(&root, &["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", SMB_USER])?;
    chroot(&root, &["chown", SMB_USER, "/srv/smb"])?;
    let password = format!("{SMB_PASSWORD}\n{SMB_PASSWORD}\n");
    let script = format!("printf '{}' | smbpasswd -s -a {SMB_USER}", password.replace('\n', "\\n"));
    chroot(&root, &["sh", "-c", &script])?;
    // The initramfs: busybox and the virtio and ext4 modules, enough to mount the root disk.
    let initrd_root = work.join("initrd");
    for d in ["bin", "sbin", "etc", "lib/modules", "proc", "sys", "dev", "newroot"] {
        fs::create_dir_all(initrd_root.join(d))?;
    }
    let mut order = Vec::new();
    for m in MODULES {
        if let Some(ko) = find_file(&kernel.join("lib/modules"), &format!("{m}.ko")) {
            fs::copy(&ko, initrd_root.join("lib/modules").join(format!("{m}.ko")))?;
            order.push(*m);
        }
    }
    fs::write(initrd_root.join("etc/modules-order"), order.join("\n") + "\n")?;
    fs::copy("/bin/busybox", initrd_root.join("bin/busybox")).context("copying busybox (busybox-static)")?;
    fs::write(initrd_root.join("init"), INITRD_INIT)?;
    for f in ["init", "bin/busybox"] {
        fs::set_permissions(initrd_root.join(f), fs::Permissions::from_mode(0o755))?;
    }
    let vmlinuz = fs::read_dir(kernel.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("no /boot/vmlinuz-* in the kernel package")?;
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    fs::copy(&vmlinuz, &guest.kernel)?;
    let mut out = BufWriter::new(File::create(&guest.initrd)?);
    cpio::write_tree(&initrd_root, &mut out)?;
    out.into_inner()?.sync_all()?;
    let tmp = dir.join("root.img.tmp");
    File::create(&tmp)?.set_len(2 << 30)?;
    cmd("mkfs.ext4")
        .args(["-q", "-F", "-L", "nasroot", "-d"])
        .arg(&root)
        .arg(&tmp)
        .timeout(Duration::from_secs(900))
        .run()
        .context("making the NAS guest's root image")?;
    fs::rename(&tmp, &guest.root)?;
    for f in [&guest.kernel, &guest.initrd, &guest.root] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644))?;
    }
    // The debootstrapped root stays for the next rebuild; the kernel extract goes.
    let _ = fs::remove_dir_all(&kernel);
    Ok(guest)
}

/// The test binary `test` of `package`, built with its `nas-guest` feature for the guest.
fn test_binary(package: &str, test: &str) -> Result<PathBuf> {
    let built = crate::deadline::test_binaries(&["test", "-p", package, "--features", "nas-guest", "--test", test])?;
    built.into_iter().next().map(|b| b.path).context("cargo did not name the nas test executable")
}

fn virsh(args: &[&str]) -> Result<String> {
    let mut all = vec!["-c", URI];
    all.extend_from_slice(args);
    Ok(cmd("virsh").args(&all).run()?.stdout_text())
}

/// `cargo xtask lab nas`: boots the NAS guest, runs the NFS, SMB and CephFS tests inside it,
/// prints one line per test and `N passed, M failed`; fails on any failure.
pub fn run() -> Result<()> {
    crate::exec::conclude("NAS", run_tests()?)
}

/// Runs the NAS guest's tests and returns how many passed and failed (an error when none ran).
pub fn run_tests() -> Result<(u64, u64)> {
    super::up()?;
    // The CephFS tests reach the host's lab cluster.
    super::ceph::up()?;
    let ceph_key = super::ceph::key("nasbak-fs")?;
    let guest = ensure()?;
    // nasbak-repo's mount tests (NFS, SMB, CephFS), nasbak's workflows on CephFS, and nasbak's
    // mount over device-mapper: (package, test, name on the work disk). `NASBAK_NAS_ONLY`
    // keeps those whose test name contains it (to run one suite while working on it).
    let only = std::env::var("NASBAK_NAS_ONLY").unwrap_or_default();
    let suites: Vec<(&str, &str, &str)> = [
        ("nasbak-repo", "nas", "nas-tests"),
        ("nasbak", "nas_cephfs", "nasbak-tests"),
        ("nasbak", "nas_mount", "mount-tests"),
    ]
    .into_iter()
    .filter(|(_, test, _)| test.contains(only.as_str()))
    .collect();
    if suites.is_empty() {
        bail!("NASBAK_NAS_ONLY={only} names none of the NAS suites (nas, nas_cephfs, nas_mount)");
    }
    let built = suites.iter().map(|(package, test, _)| test_binary(package, test)).collect::<Result<Vec<_>>>()?;
    let dir = Path::new(STATE).join("nas");
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("work"))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    // The root disk is an overlay, so the cached image is never changed.
    let overlay = dir.join("root.qcow2");
    cmd("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&guest.root).arg(&overlay).run()?;
    let mut script = format!(
        "#!/bin/bash\nexport NASBAK_SMB_USER={SMB_USER} NASBAK_SMB_PASSWORD={SMB_PASSWORD} RUST_BACKTRACE=1\n\
         export NASBAK_CEPH_FS_KEY={ceph_key}\n"
    );
    for ((_, _, name), binary) in suites.iter().zip(&built) {
        let target = dir.join("work").join(name);
        fs::copy(binary, &target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
        script.push_str(&format!("/work/{name} --test-threads=1 --show-output\n"));
    }
    fs::write(dir.join("work/run-tests"), script)?;
    fs::set_permissions(dir.join("work/run-tests"), fs::Permissions::from_mode(0o755))?;
    let work_img = dir.join("work.img");
    File::create(&work_img)?.set_len(512 << 20)?;
    cmd("mkfs.ext4").args(["-q", "-F", "-d"]).arg(dir.join("work")).arg(&work_img).run()?;
    let console = dir.join("console.log");
    let xml = format!(
        "<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>1024</memory><vcpu>2</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 panic=-1</cmdline></os><on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>\
         <on_crash>destroy</on_crash><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>\
         <interface type='user'><model type='virtio'/></interface>\
         <serial type='file'><source path='{}'/><target port='0'/></serial><memballoon model='none'/></devices></domain>",
        guest.kernel.display(),
        guest.initrd.display(),
        overlay.display(),
        work_img.display(),
        console.display()
    );
    fs::write(dir.join("domain.xml"), xml)?;
    let start = Instant::now();
    println!("lab nas: booting the NAS guest");
    virsh(&["create", &dir.join("domain.xml").to_string_lossy()])?;
    // It takes about 130 s; 15 minutes keep a hung NAS test from eating CI's hour.
    let deadline = start + Duration::from_secs(15 * 60);
    let mut shown = 0;
    loop {
        let text = fs::read_to_string(&console).unwrap_or_default();
        for line in text.lines().skip(shown) {
            if line.starts_with("nas-guest:") || line.starts_with("test ") {
                println!("  {}", line.trim_end());
            }
        }
        shown = text.lines().count();
        let running = virsh(&["domstate", DOMAIN]).map(|s| s.contains("running")).unwrap_or(false);
        if !running {
            break;
        }
        if Instant::now() > deadline {
            let _ = virsh(&["destroy", DOMAIN]);
            bail!("the NAS guest did not finish within 15 minutes; see {}", console.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let results = cmd("debugfs").args(["-R", "cat /results.txt"]).arg(&work_img).run()?.stdout_text();
    let (mut passed, mut failed) = (0u64, 0u64);
    println!("lab nas: results ({:.0} s):", start.elapsed().as_secs_f64());
    // One line per test as libtest wrote it (a test's own output may follow its name), and the
    // counts from each binary's `test result:` line.
    for line in results.lines() {
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, verdict)) = rest.split_once(" ... ")
        {
            println!("{name}: {verdict}");
        }
        if let Some((p, f)) = crate::deadline::closing_counts(line) {
            passed += p;
            failed += f;
        }
    }
    // A binary that died before its summary (a panic outside a test, a killed guest).
    let binaries = suites.len();
    if results.lines().filter(|l| l.starts_with("test result: ")).count() < binaries {
        failed += 1;
        println!("lab nas: a test binary ended without its summary line");
    }
    if failed > 0 || passed == 0 {
        println!("{results}");
    }
    if passed == 0 {
        bail!("no NAS test ran; see {} and {}", console.display(), dir.join("work.img").display());
    }
    Ok((passed, failed))
}
