//! nasbak's own workflows on a CephFS repository, run by `cargo xtask lab nas` inside the NAS
//! lab guest, whose Debian kernel has the CephFS client the host's lacks: a shut-off VM's disk
//! backed up to the lab cluster's file system (three monitors, `name=` and `secret=`), damaged,
//! restored from it and verified. Real qemu-img, mount.ceph and kernel client; the hypervisor
//! is a mock (no libvirt in the guest) that describes a VM with one qcow2 disk. Built only with
//! the `nas-guest` feature. See docs/testing.md.
#![cfg(feature = "nas-guest")]

mod nas_guest;

use std::fs;
use std::process::Command;
use std::time::Duration;

use nasbak::mock::MockAgentSource;
use nasbak::nasbak_libvirt::CancelHandle;
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{
    BackupMethod, BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter,
};
use nasbak::{BackupRequest, Engine, RestoreRequest};

const CEPHFS: &str = "127.0.0.1:6789,127.0.0.1:6790,127.0.0.1:6791:/";

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

#[test]
fn a_vm_is_backed_up_to_cephfs_and_restored_from_it() {
    let key = std::env::var("NASBAK_CEPH_FS_KEY").expect("the NAS guest sets NASBAK_CEPH_FS_KEY");
    let dir = tempfile::tempdir().unwrap();
    let vm = format!("cephfs-vm-{}", std::process::id());
    let disk = dir.path().join("vda.qcow2");
    let d = disk.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", d, "64M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0x33 40M 4M", d]);
    let original = dir.path().join("original.qcow2");
    fs::copy(&disk, &original).unwrap();
    let runtime = dir.path().join("run");
    let timeouts = MountTimeouts { mount: Duration::from_secs(30), ..MountTimeouts::default() };
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, timeouts);
    let engine = Engine::new(
        nas_guest::shut_off_vm(&vm, &[("vda", "qcow2", &disk)]),
        MockAgentSource::new(),
        QemuImg::new(&runtime),
        mounts,
    );
    let repo =
        BackupRepository::new("cephwf", RepositoryKind::CephFs, CEPHFS, &format!("name=nasbak-fs,secret={key}"), None)
            .unwrap();
    let backup = engine
        .backup(&BackupRequest::new(&vm, repo.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(backup.manifest.method, BackupMethod::QemuImg);
    let mount_point = engine.mounts().mount_point(&repo);
    let mounted = || fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&*mount_point.to_string_lossy());
    assert!(!mounted(), "the repository stays mounted after the backup");
    // Listed and verified from the repository, then the damaged disk restored from it.
    let catalog = engine.catalog();
    let listed = catalog.list(&repo, Some(&vm)).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(listed.len(), 1);
    let verified = catalog.verify(&repo, &vm, &backup.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(verified.ok(), "{verified:?}");
    run("qemu-io", &["-f", "qcow2", "-c", "write -z 0 64M", d]);
    engine
        .restore(&RestoreRequest::new(repo.clone(), &vm, &backup.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{e:#?}"));
    run("qemu-img", &["compare", "-q", d, original.to_str().unwrap()]);
    assert!(!mounted(), "the repository stays mounted after the restore");
    // The test's backup goes again.
    catalog.delete(&repo, &vm, &backup.manifest.id).unwrap_or_else(|e| panic!("{e:#?}"));
}
