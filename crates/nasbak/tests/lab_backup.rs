//! The backup workflow end to end on the lab: a real repository (ext4 on a loop device), real
//! libvirt, QEMU, qemu-img and guest agent.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_process::ExternalCommand;
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{
    BackupMethod, BackupRepository, Manifest, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter,
};
use nasbak::{BackupError, BackupRequest, Engine, RestoreRequest, checksum_file, sha256_file};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

fn engine(runtime: &Path) -> Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter> {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
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
    BackupRequest::new(vm, repo.clone()).with_quiesce(QuiescePolicy::Required).with_timeout(Duration::from_secs(300))
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
    assert_eq!(running.cleaned, ["removed the unfinished backup 2020.01.01.00.00.00.partial"]);
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
                let sum = d.checksum.as_ref().unwrap();
                assert_eq!(sum.algorithm, "blake3");
                assert_eq!(checksum_file(&path, "blake3").unwrap(), sum.value);
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
    assert!(matches!(err, BackupError::Cancelled), "{err}");
    let mount_point = e.mounts().mount_point(&repo);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*mount_point.to_string_lossy()), "the repository is still mounted");
    inspect(&repo, &runtime, |root| {
        let vm_dir = root.join(dom.name());
        assert_eq!(fs::read_dir(&vm_dir).unwrap().count(), 0, "something was left in {}", vm_dir.display());
    });
}

#[test]
fn restore_after_damage_gives_the_original_content_and_refuses_what_it_must() {
    let dom = DomainSpec::new("wfrestore")
        .disk(DiskSpec::qcow2(32).ext4_with_files(&[("a.txt", b"original")]))
        .disk(DiskSpec::raw(8).ext4_with_files(&[("b.txt", b"raw original")]))
        .create();
    let (repo, runtime) = repository(&dom);
    let e = engine(&runtime);
    let backup = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    // Damage both disks: their guest-visible content becomes zeros (the qcow2 stays a qcow2).
    for (disk, file) in dom.disks().iter().zip(["a.txt", "b.txt"]) {
        ExternalCommand::new("qemu-io").args(["-f", disk.format, "-c", "write -z 0 8M"]).arg(&disk.path).run().unwrap();
        assert_eq!(dom.read_ext4_file(&disk.path, file), None, "the damage did not take");
    }
    // A running VM is refused, with nothing written.
    dom.start();
    let err = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &backup.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, BackupError::NotShutOff { .. }), "{err}");
    dom.destroy();
    let restored = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &backup.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap()
        .restored;
    assert_eq!(restored.len(), 2);
    for (disk, file) in dom.disks().iter().zip(["a.txt", "b.txt"]) {
        let content = dom.read_ext4_file(&disk.path, file).unwrap_or_default();
        assert!(content.ends_with("original"), "{file}: {content:?}");
    }
    let info = ExternalCommand::new("qemu-img").args(["info"]).arg(&dom.disks()[0].path).run().unwrap().stdout_text();
    assert!(info.contains("file format: qcow2") && !info.contains("backing file"), "{info}");
    // A backup id that is not a backup, or outside the VM, is refused.
    assert!(
        e.restore(
            &RestoreRequest::new(repo.clone(), dom.name(), "2020.01.01.00.00.00"),
            &CancelHandle::new(),
            &mut |_| {}
        )
        .is_err()
    );
    assert!(
        e.restore(&RestoreRequest::new(repo.clone(), dom.name(), "../x"), &CancelHandle::new(), &mut |_| {}).is_err()
    );
}

#[test]
fn restore_refuses_a_backup_whose_disks_do_not_match_and_writes_nothing() {
    let dom = DomainSpec::new("wfmismatch").disk(DiskSpec::qcow2(16)).create();
    let (repo, runtime) = repository(&dom);
    let e = engine(&runtime);
    let backup = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    // The VM's disk is replaced by another volume under the same target.
    let other = dom.dir().join("other.qcow2");
    ExternalCommand::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&other).arg("16M").run().unwrap();
    let xml = nasbak_testlab::virsh(&["dumpxml", dom.name()])
        .unwrap()
        .replace(&*dom.disks()[0].path.to_string_lossy(), &other.to_string_lossy());
    let xml_path = dom.dir().join("changed.xml");
    fs::write(&xml_path, xml).unwrap();
    nasbak_testlab::virsh(&["define", xml_path.to_str().unwrap()]).unwrap();
    let before = sha256_file(&other).unwrap();
    let err = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &backup.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, BackupError::Mismatch { .. }) && err.to_string().contains("is volume other"), "{err}");
    assert_eq!(sha256_file(&other).unwrap(), before, "something was written");
}

#[test]
fn list_verify_and_delete_see_our_backups_and_the_reference_systems() {
    use nasbak::BackupKind;
    let dom = DomainSpec::new("wfcatalog").disk(DiskSpec::qcow2(16).ext4()).create();
    let (repo, runtime) = repository(&dom);
    let e = engine(&runtime);
    let first = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    // A second, independent full (chains are lab_incremental's).
    let full = request(dom.name(), &repo).with_mode(nasbak::chain::ModeRequest::Full);
    let second = e.backup(&full, &CancelHandle::new(), &mut |_| {}).unwrap();
    // A backup as the reference system writes it, and a leftover partial directory.
    inspect(&repo, &runtime, |root| {
        let vm_dir = root.join(dom.name());
        let reference = vm_dir.join("2020.05.01.10.00.00");
        fs::create_dir_all(&reference).unwrap();
        fs::copy(
            root.join(&first.relative_dir).join(&first.manifest.disks[0].file),
            reference.join("root.vol-7.qcow2"),
        )
        .unwrap();
        fs::write(reference.join("domain-config.xml"), "<domain/>").unwrap();
        fs::create_dir_all(vm_dir.join("2021.01.01.00.00.00.partial")).unwrap();
    });
    let list = e.catalog().list(&repo, None).unwrap();
    let ids: Vec<&str> = list.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["2020.05.01.10.00.00", first.manifest.id.as_str(), second.manifest.id.as_str()]);
    assert_eq!(list[0].kind, BackupKind::Reference { files: vec!["root.vol-7.qcow2".into()] });
    assert!(matches!(&list[1].kind, BackupKind::Nasbak(m) if **m == first.manifest));
    for b in &list {
        let verdicts = e.catalog().verify(&repo, &b.vm, &b.id, &CancelHandle::new(), &mut |_| {}).unwrap().files;
        assert!(!verdicts.is_empty() && verdicts.iter().all(|v| v.ok()), "{verdicts:?}");
    }
    // One flipped byte in the data of a backup file: the checksum says so.
    inspect(&repo, &runtime, |root| {
        let path = root.join(&second.relative_dir).join(&second.manifest.disks[0].file);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
    });
    let verdicts =
        e.catalog().verify(&repo, dom.name(), &second.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap().files;
    assert_eq!(verdicts[0].checksum_ok, Some(false), "{verdicts:?}");
    assert!(!verdicts[0].ok());
    // Delete: only a real backup, never the repository or the VM directory.
    for (vm, id) in [
        ("", ""),
        (dom.name(), ""),
        (dom.name(), ".."),
        ("..", "2020.05.01.10.00.00"),
        (dom.name(), "2019.01.01.00.00.00"),
    ] {
        assert!(e.catalog().delete(&repo, vm, id).is_err(), "{vm:?}/{id:?} was accepted");
    }
    e.catalog().delete(&repo, dom.name(), "2020.05.01.10.00.00").unwrap();
    e.catalog().delete(&repo, dom.name(), &first.manifest.id).unwrap();
    let left: Vec<String> = e.catalog().list(&repo, Some(dom.name())).unwrap().into_iter().map(|b| b.id).collect();
    assert_eq!(left, std::slice::from_ref(&second.manifest.id));
}
