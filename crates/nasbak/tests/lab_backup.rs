//! The backup workflow end to end on the lab: a real repository (ext4 on a loop device), real
//! libvirt, QEMU, qemu-img and guest agent.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::mount::command::ExternalCommand;
use nasbak::nasbak_repo::{
    BackupMethod, BackupRepository, Manifest, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter,
};
use nasbak::{BackupError, BackupRequest, Engine, sha256_file};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

fn engine(runtime: &Path) -> Engine<LibvirtHypervisor, QemuImg, SystemMounter> {
    Engine {
        hypervisor: LibvirtHypervisor::connect(URI).unwrap(),
        images: QemuImg::new(runtime),
        mounts: RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default()),
        agent_timeout: Duration::from_secs(10),
    }
}

/// A 256 MiB ext4 image repository and a runtime directory QEMU can traverse.
fn repository(dom: &LabDomain) -> (BackupRepository, PathBuf) {
    let image = dom.dir().join("repo.img");
    fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();
    ExternalCommand::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).run().unwrap();
    let kind = RepositoryKind::from_parts("custom", Some("ext4")).unwrap();
    let repo = BackupRepository::new("labrepo", kind, image.to_str().unwrap(), "", None).unwrap();
    (repo, dom.dir().join("runtime"))
}

/// Mounts the repository read-only again to look at what the workflow left there.
fn inspect(repo: &BackupRepository, runtime: &Path, f: impl FnOnce(&Path)) {
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    let m = mounts.acquire(repo).unwrap();
    f(m.root());
}

fn request(vm: &str, repo: &BackupRepository) -> BackupRequest {
    BackupRequest {
        vm: vm.into(),
        repository: repo.clone(),
        quiesce: QuiescePolicy::Required,
        timeout: Duration::from_secs(300),
    }
}

#[test]
fn a_running_and_then_a_stopped_vm_are_backed_up_with_manifests_and_checksums() {
    let dom = DomainSpec::new("wf")
        .disk(DiskSpec::qcow2(32).ext4_with_files(&[("a.txt", b"alpha")]))
        .disk(DiskSpec::raw(8))
        .disk(DiskSpec::cdrom())
        .agent(true)
        .running(true)
        .create();
    dom.wait_for_agent(Duration::from_secs(90));
    let (repo, runtime) = repository(&dom);
    let e = engine(&runtime);
    // A leftover of a run that was killed mid-job.
    inspect(&repo, &runtime, |root| {
        fs::create_dir_all(root.join(dom.name()).join("2020.01.01.00.00.00.partial")).unwrap()
    });

    let mut reports = 0;
    let running = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| reports += 1).unwrap();
    assert!(reports >= 1);
    assert!(running.manifest.quiesced);
    assert_eq!(running.manifest.method, BackupMethod::PushJob);
    assert_eq!(running.skipped.len(), 1, "the cdrom");
    dom.destroy();
    let stopped = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(stopped.manifest.method, BackupMethod::QemuImg);
    assert!(!stopped.manifest.quiesced);
    assert_ne!(stopped.manifest.id, running.manifest.id);

    inspect(&repo, &runtime, |root| {
        let vm_dir = root.join(dom.name());
        let names: Vec<String> =
            fs::read_dir(&vm_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.ends_with(".partial") || n.starts_with(".nasbak-lock")), "{names:?}");
        assert_eq!(names.len(), 2, "{names:?}");
        for outcome in [&running, &stopped] {
            let dir = root.join(&outcome.relative_dir);
            let manifest = Manifest::from_json(&fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(&manifest, &outcome.manifest);
            assert!(fs::read_to_string(dir.join("domain-config.xml")).unwrap().contains(dom.name()));
            let files: Vec<&str> = manifest.disks.iter().map(|d| d.file.as_str()).collect();
            assert!(files[0].starts_with("root.") && files[1].starts_with("datadisk."), "{files:?}");
            for d in &manifest.disks {
                let path = dir.join(&d.file);
                assert_eq!(sha256_file(&path).unwrap(), d.checksum.as_ref().unwrap().value);
                assert_eq!(fs::metadata(&path).unwrap().len(), d.size);
            }
        }
    });
}

#[test]
fn a_cancelled_backup_leaves_nothing_that_looks_complete_and_unmounts() {
    let dom = DomainSpec::new("wfcancel").disk(DiskSpec::qcow2(16)).running(true).create();
    let (repo, runtime) = repository(&dom);
    let e = engine(&runtime);
    let cancel = CancelHandle::new();
    cancel.cancel();
    let mut req = request(dom.name(), &repo);
    req.quiesce = QuiescePolicy::BestEffort;
    let err = e.backup(&req, &cancel, &mut |_| {}).unwrap_err();
    assert!(matches!(err, BackupError::Job(_)), "{err}");
    let mount_point = e.mounts.mount_point(&repo);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*mount_point.to_string_lossy()), "the repository is still mounted");
    inspect(&repo, &runtime, |root| {
        let vm_dir = root.join(dom.name());
        assert_eq!(fs::read_dir(&vm_dir).unwrap().count(), 0, "something was left in {}", vm_dir.display());
    });
}
