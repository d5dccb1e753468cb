//! A backup mounted read-only on the lab (issue 13, part 2): the backup of a shut-off VM whose
//! disks hold a GPT with ext4, swap and xfs partitions and a whole-disk ext4 is mounted; known
//! files are read back with their checksums; nothing can be written; unmount leaves no mount,
//! loop device, daemon or directory; verify passes afterwards. An incremental is read through
//! its chain, and a damaged file fails clearly with nothing left behind. A disk laid out as a
//! RHEL-family installer lays it out (a boot partition, then LVM with root and swap) shows its
//! linear logical volumes, without activating anything on the host.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{BackupMode, BackupRepository, MountTimeouts, RepositoryMounts, SystemMounter};
use nasbak::{BackupRequest, Engine, ErrorKind, MOUNT_STATE_FILE, MountRequest};
use nasbak_testlab::{DiskSpec, DomainSpec, LogicalVolumeSpec, PartitionSpec, URI, pseudo_random};

/// What is on the system under `dir`: mount points, loop devices backed by files there, live
/// qemu-storage-daemons serving files there.
fn traces(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let dir = dir.to_str().unwrap();
    for line in fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if line.split(' ').nth(4).is_some_and(|m| m.starts_with(dir)) {
            found.push(format!("mount: {line}"));
        }
    }
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && b.starts_with(dir)
        {
            found.push(format!("loop: {b}"));
        }
    }
    for pid in nasbak_testlab::pids_with_cmdline(dir) {
        found.push(format!("process {pid}"));
    }
    found
}

/// Whether the file at `path` holds exactly `expected` (compared by checksum, printed short).
fn holds(path: &Path, expected: &[u8]) -> bool {
    let actual = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sum = |d: &[u8]| blake3::hash(d).to_hex().to_string();
    if sum(&actual) != sum(expected) {
        eprintln!(
            "{}: {} bytes, blake3 {}; expected {} bytes",
            path.display(),
            actual.len(),
            sum(&actual),
            expected.len()
        );
    }
    actual == expected
}

#[test]
fn a_backup_is_mounted_read_only_read_back_and_unmounted_without_a_trace() {
    let small = b"a known file\n".to_vec();
    let big = pseudo_random(3 << 20, 7);
    let xfs_file = pseudo_random(1 << 20, 9);
    let whole = pseudo_random(100_000, 11);
    let dom = DomainSpec::new("mount")
        .disk(DiskSpec::qcow2(512).partitions(vec![
            PartitionSpec::new("ext4", 32, &[("hello.txt", &small), ("big.bin", &big)]),
            PartitionSpec::new("swap", 8, &[]),
            PartitionSpec::new("xfs", 0, &[("x.bin", &xfs_file)]),
        ]))
        .disk(DiskSpec::qcow2(64).ext4_with_files(&[("whole.bin", &whole)]))
        .create();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("browse", kind, root.to_str().unwrap(), "", None).unwrap();
    let runtime = dom.dir().join("runtime");
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default());
    let e = Engine::new(libvirt.clone(), libvirt, QemuImg::new(&runtime), mounts);
    let cancel = CancelHandle::new();
    let backup = |mode| {
        e.backup(&BackupRequest::new(dom.name(), repo.clone()).with_mode(mode), &cancel, &mut |_| {}).unwrap().manifest
    };
    let full = backup(ModeRequest::Auto);
    let catalog = e.catalog();

    // Mounted under a directory that does not exist yet (its parent does).
    fs::create_dir(dom.dir().join("browse")).unwrap();
    let dir = dom.dir().join("browse/m1");
    let mounted = catalog.mount(&MountRequest::new(repo.clone(), dom.name(), &full.id, &dir), &cancel).unwrap();
    assert_eq!(mounted.disks.len(), 2);
    let vda = &mounted.disks[0];
    assert_eq!((vda.target.as_str(), vda.size, vda.files), ("vda", 512 << 20, 1));
    let fs_of =
        |d: &nasbak::MountedDisk| d.filesystems.iter().map(|f| (f.partition, f.fstype.clone())).collect::<Vec<_>>();
    assert_eq!(fs_of(vda), [(Some(1), "ext4".to_owned()), (Some(3), "xfs".to_owned())]);
    assert_eq!(vda.not_mounted.len(), 1, "{:?}", vda.not_mounted);
    assert_eq!((vda.not_mounted[0].partition, vda.not_mounted[0].reason.as_str()), (Some(2), "swap space"));
    assert_eq!(fs_of(&mounted.disks[1]), [(None, "ext4".to_owned())]);
    // The known files, read back.
    assert_eq!(fs::read(dir.join("vda/part1/hello.txt")).unwrap(), small);
    assert!(holds(&dir.join("vda/part1/big.bin"), &big));
    assert!(holds(&dir.join("vda/part3/x.bin"), &xfs_file));
    assert!(holds(&dir.join("vdb/fs/whole.bin"), &whole));
    assert!(dir.join(MOUNT_STATE_FILE).exists());
    // Nothing can be written: not the file systems, not the image.
    assert!(fs::write(dir.join("vda/part1/new.txt"), b"x").is_err());
    let written = fs::OpenOptions::new().write(true).open(dir.join("vda/disk.raw")).and_then(|mut f| f.write_all(b"x"));
    assert!(written.is_err(), "the image refuses writes");
    // The image, for tools that want blocks: the GPT's signature at LBA 1.
    let mut raw = fs::File::open(dir.join("vda/disk.raw")).unwrap();
    let mut sig = [0u8; 8];
    raw.seek(SeekFrom::Start(512)).unwrap();
    raw.read_exact(&mut sig).unwrap();
    assert_eq!(&sig, b"EFI PART");
    drop(raw);
    // A directory in use, or not empty, is refused, and left as it was.
    let again = catalog.mount(&MountRequest::new(repo.clone(), dom.name(), &full.id, &dir), &cancel).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::InvalidInput, "{again}");
    assert!(again.to_string().contains("already holds a mounted backup"), "{again}");
    let busy = dom.dir().join("browse/full");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("mine"), b"keep").unwrap();
    let err = catalog.mount(&MountRequest::new(repo.clone(), dom.name(), &full.id, &busy), &cancel).unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");
    assert_eq!(fs::read(busy.join("mine")).unwrap(), b"keep");
    // A disk the backup does not have.
    let other = dom.dir().join("browse/m2");
    let err = catalog
        .mount(&MountRequest::new(repo.clone(), dom.name(), &full.id, &other).only_disk("vdz"), &cancel)
        .unwrap_err();
    assert!(err.to_string().contains("disk vdz in backup") && err.to_string().contains("vda, vdb"), "{err}");
    assert!(!other.exists(), "a failed mount leaves no directory it created");

    // A process with its working directory inside: unmount says which file system is busy.
    let mut shell = std::process::Command::new("sleep").arg("60").current_dir(dir.join("vda/part1")).spawn().unwrap();
    let err = catalog.unmount(&dir).unwrap_err();
    assert!(nasbak::chain(&err).contains("part1"), "{}", nasbak::chain(&err));
    shell.kill().unwrap();
    shell.wait().unwrap();
    let report = catalog.unmount(&dir).unwrap();
    assert_eq!(report.exports.len(), 2, "{report:?}");
    assert!(report.left.is_empty(), "{report:?}");
    assert!(!dir.exists(), "the directory nasbak created is gone");
    assert!(traces(&dom.dir().join("browse")).is_empty(), "{:?}", traces(&dom.dir().join("browse")));
    let err = catalog.unmount(&dir).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // The backup was never written.
    let verify = catalog.verify(&repo, dom.name(), &full.id, &cancel, &mut |_| {}).unwrap();
    assert!(verify.ok(), "{verify:?}");

    // An incremental, read through its chain: one disk only, on an existing empty directory.
    dom.write_offline(1, 0x5a, "48M", "1M");
    let inc = backup(ModeRequest::Incremental);
    assert_eq!(inc.mode, BackupMode::Incremental);
    let dir = dom.dir().join("browse/m3");
    fs::create_dir_all(&dir).unwrap();
    let mounted =
        catalog.mount(&MountRequest::new(repo.clone(), dom.name(), &inc.id, &dir).only_disk("vdb"), &cancel).unwrap();
    assert_eq!(mounted.disks.len(), 1);
    assert_eq!(mounted.disks[0].files, 2, "read through the full");
    let mut raw = fs::File::open(dir.join("vdb/disk.raw")).unwrap();
    let mut block = vec![0u8; 4096];
    raw.seek(SeekFrom::Start(48 << 20)).unwrap();
    raw.read_exact(&mut block).unwrap();
    assert!(block.iter().all(|b| *b == 0x5a), "the incremental's data");
    drop(raw);
    assert!(holds(&dir.join("vdb/fs/whole.bin"), &whole), "the full's data");
    catalog.unmount(&dir).unwrap();
    assert!(dir.exists(), "a directory the user made stays");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "and is empty again");
    assert!(traces(&dir).is_empty(), "{:?}", traces(&dir));

    // A damaged file (an L1 entry pointing at a misaligned L2 table): refused, nothing left.
    let damaged = backup(ModeRequest::Full);
    let file: PathBuf = root.join(dom.name()).join(&damaged.id).join(&damaged.disks[0].file);
    {
        let mut f = fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        let mut b = [0u8; 8];
        f.seek(SeekFrom::Start(40)).unwrap();
        f.read_exact(&mut b).unwrap();
        let l1 = u64::from_be_bytes(b);
        f.seek(SeekFrom::Start(l1)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(l1)).unwrap();
        f.write_all(&(u64::from_be_bytes(b) + 0x200).to_be_bytes()).unwrap();
    }
    let dir = dom.dir().join("browse/m4");
    let err = catalog.mount(&MountRequest::new(repo.clone(), dom.name(), &damaged.id, &dir), &cancel).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptFile, "{}", nasbak::chain(&err));
    assert!(nasbak::chain(&err).contains(&damaged.disks[0].file), "{}", nasbak::chain(&err));
    assert!(!dir.exists() && traces(&dom.dir().join("browse")).is_empty());
}

/// What LVM on the host sees: its volume groups, and device-mapper devices.
fn host_lvm() -> (String, Vec<String>) {
    let vgs = nasbak::nasbak_process::ExternalCommand::new("vgs")
        .args(["--noheadings", "-o", "vg_name,vg_uuid"])
        .run_unchecked()
        .map(|o| o.stdout_text())
        .unwrap_or_default();
    let dm = fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dm-"))
        .collect();
    (vgs, dm)
}

#[test]
fn an_installers_lvm_layout_is_mounted_read_only_without_touching_the_hosts_lvm() {
    let boot = b"vmlinuz and friends\n".to_vec();
    let etc = b"root:x:0:0:root:/root:/bin/bash\n".to_vec();
    let big = pseudo_random(3 << 20, 21);
    let dom = DomainSpec::new("lvm")
        .disk(DiskSpec::qcow2(160).partitions(vec![
            PartitionSpec::new("ext4", 32, &[("boot.txt", &boot)]),
            PartitionSpec::lvm(
                0,
                "rhel",
                vec![
                    // Extended after the others were made: two pieces.
                    LogicalVolumeSpec::new("data", "none", 8, &[]).extended(8),
                    LogicalVolumeSpec::new("root", "ext4", 48, &[("passwd", &etc), ("big.bin", &big)]),
                    LogicalVolumeSpec::new("swap", "swap", 8, &[]),
                ],
            ),
        ]))
        .create();
    let before = host_lvm();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("lvm", kind, root.to_str().unwrap(), "", None).unwrap();
    let runtime = dom.dir().join("runtime");
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default());
    let e = Engine::new(libvirt.clone(), libvirt, QemuImg::new(&runtime), mounts);
    let cancel = CancelHandle::new();
    let full = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &cancel, &mut |_| {}).unwrap().manifest;
    let catalog = e.catalog();
    let dir = dom.dir().join("lvm-mount");
    let mounted = catalog.mount(&MountRequest::new(repo.clone(), dom.name(), &full.id, &dir), &cancel).unwrap();
    let vda = &mounted.disks[0];
    let fs_of: Vec<_> =
        vda.filesystems.iter().map(|f| (f.partition, f.logical_volume.clone(), f.fstype.clone())).collect();
    assert_eq!(
        fs_of,
        [(Some(1), None, "ext4".to_owned()), (Some(2), Some("rhel/root".to_owned()), "ext4".to_owned())],
        "{mounted:?}"
    );
    assert!(vda.filesystems[1].path.ends_with("vda/lv-rhel-root"), "{:?}", vda.filesystems[1].path);
    assert_eq!(fs::read(dir.join("vda/part1/boot.txt")).unwrap(), boot);
    assert_eq!(fs::read(dir.join("vda/lv-rhel-root/passwd")).unwrap(), etc);
    assert!(holds(&dir.join("vda/lv-rhel-root/big.bin"), &big));
    // Copied out, as a file restore does.
    let copy = dom.dir().join("big.copy");
    let status = std::process::Command::new("cp").arg(dir.join("vda/lv-rhel-root/big.bin")).arg(&copy).status();
    assert!(status.unwrap().success());
    assert!(holds(&copy, &big));
    assert!(fs::write(dir.join("vda/lv-rhel-root/new"), b"x").is_err(), "read-only");
    let not: Vec<_> = vda.not_mounted.iter().map(|n| (n.logical_volume.clone(), n.reason.clone())).collect();
    assert!(not.iter().any(|(lv, why)| lv.as_deref() == Some("rhel/swap") && why == "swap space"), "{not:?}");
    assert!(
        not.iter().any(|(lv, why)| lv.as_deref() == Some("rhel/data") && why.contains("it needs device-mapper")),
        "{not:?}"
    );
    // Nothing activated on the host: its volume groups and device-mapper devices as they were.
    assert_eq!(host_lvm(), before);
    let report = catalog.unmount(&dir).unwrap();
    assert_eq!(report.unmounted.len(), 2, "{report:?}");
    assert!(!dir.exists() && traces(&dom.dir().join("lvm-mount")).is_empty());
    assert_eq!(host_lvm(), before);
}

/// A btrfs root laid out as openSUSE and Ubuntu lay it out (subvolumes `@` and `@home`, `@` the
/// default one) shows every subvolume, not only the default one.
#[test]
fn every_btrfs_subvolume_is_shown_whatever_the_default_one() {
    let root_file = b"PRETTY_NAME=test\n".to_vec();
    let home_file = pseudo_random(1 << 20, 33);
    let dom = DomainSpec::new("btrfs")
        .disk(DiskSpec::qcow2(192).partitions(vec![PartitionSpec::new(
            "btrfs",
            0,
            &[("@/os-release", &root_file), ("@home/user.bin", &home_file), ("top.txt", b"top")],
        )]))
        .create();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("btrfs", kind, root.to_str().unwrap(), "", None).unwrap();
    let runtime = dom.dir().join("runtime");
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default());
    let e = Engine::new(libvirt.clone(), libvirt, QemuImg::new(&runtime), mounts);
    let cancel = CancelHandle::new();
    let full = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &cancel, &mut |_| {}).unwrap().manifest;
    let dir = dom.dir().join("btrfs-mount");
    let mounted = e.catalog().mount(&MountRequest::new(repo.clone(), dom.name(), &full.id, &dir), &cancel).unwrap();
    let fs0 = &mounted.disks[0].filesystems[0];
    assert_eq!(fs0.fstype, "btrfs");
    assert!(fs0.options.contains("subvolid=5"), "{fs0:?}");
    assert_eq!(fs::read(dir.join("vda/part1/@/os-release")).unwrap(), root_file);
    assert!(holds(&dir.join("vda/part1/@home/user.bin"), &home_file));
    assert_eq!(fs::read(dir.join("vda/part1/top.txt")).unwrap(), b"top");
    e.catalog().unmount(&dir).unwrap();
    assert!(!dir.exists() && traces(&dom.dir().join("btrfs-mount")).is_empty());
}
