//! Data-safety regressions on the lab (real libvirt, QEMU, qemu-img, ext4 repositories): odd disk
//! layouts, damaged backups, cancellation and the VM lock. Each test failed before its fix.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_process::ExternalCommand;
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryMounts, RetentionPolicy, SystemMounter};
use nasbak::{BackupError, BackupKind, BackupRequest, Engine, FileStatus, Phase, RestoreRequest, VmLock};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

fn engine(runtime: &Path) -> Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter> {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
}

/// A `shared` repository: a directory of the domain's, never mounted.
fn repository(dom: &LabDomain) -> (BackupRepository, PathBuf, PathBuf) {
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("safety", kind, root.to_str().unwrap(), "", None).unwrap();
    (repo, root, dom.dir().join("runtime"))
}

fn request(vm: &str, repo: &BackupRepository) -> BackupRequest {
    BackupRequest::new(vm, repo.clone()).with_quiesce(QuiescePolicy::Off).with_timeout(Duration::from_secs(300))
}

fn zero(disk: &nasbak_testlab::LabDisk) {
    ExternalCommand::new("qemu-io").args(["-f", disk.format, "-c", "write -z 0 8M"]).arg(&disk.path).run().unwrap();
}

/// Defects 1 and 2: two data disks with one file name in two directories, and two qcow2 volumes
/// sharing a stem in one directory (`disk.qcow2`, `disk.img`). Each disk gets its own backup
/// file, and a restore gives each disk its own content back, of a running VM (push job) and of
/// a shut-off one (qemu-img).
#[test]
fn disks_with_colliding_names_are_each_backed_up_and_restored() {
    let contents = ["root disk", "disk in a", "disk in b", "same stem qcow2", "same stem img"];
    let dom = DomainSpec::new("collide")
        .disk(DiskSpec::qcow2(16).ext4_with_files(&[("f.txt", contents[0].as_bytes())]).named("root.qcow2"))
        .disk(DiskSpec::qcow2(16).ext4_with_files(&[("f.txt", contents[1].as_bytes())]).named("a/data.qcow2"))
        .disk(DiskSpec::qcow2(16).ext4_with_files(&[("f.txt", contents[2].as_bytes())]).named("b/data.qcow2"))
        .disk(DiskSpec::qcow2(16).ext4_with_files(&[("f.txt", contents[3].as_bytes())]).named("disk.qcow2"))
        .disk(DiskSpec::qcow2(16).ext4_with_files(&[("f.txt", contents[4].as_bytes())]).named("disk.img"))
        .create();
    let (repo, root, runtime) = repository(&dom);
    let e = engine(&runtime);
    for running in [true, false] {
        if running {
            dom.start();
        }
        let backup = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
        dom.destroy();
        let files: Vec<&str> = backup.manifest.disks.iter().map(|d| d.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "root.root.qcow2",
                "datadisk.data@vdb.qcow2",
                "datadisk.data@vdc.qcow2",
                "datadisk.disk@vdd.qcow2",
                "datadisk.disk@vde.qcow2"
            ],
            "running: {running}"
        );
        let dir = root.join(&backup.relative_dir);
        for d in &backup.manifest.disks {
            assert!(dir.join(&d.file).is_file(), "{} was written", d.file);
        }
        let verdicts = e
            .catalog()
            .verify(&repo, dom.name(), &backup.manifest.id, &CancelHandle::new(), &mut |_| {})
            .unwrap()
            .files;
        assert!(verdicts.iter().all(|v| v.ok()), "{verdicts:?}");
        for disk in dom.disks() {
            zero(disk);
        }
        let restored = e
            .restore(
                &RestoreRequest::new(repo.clone(), dom.name(), &backup.manifest.id),
                &CancelHandle::new(),
                &mut |_| {},
            )
            .unwrap()
            .restored;
        assert_eq!(restored.len(), 5);
        for (disk, want) in dom.disks().iter().zip(contents) {
            assert_eq!(
                dom.read_ext4_file(&disk.path, "f.txt").as_deref(),
                Some(want),
                "{} (running: {running})",
                disk.target
            );
        }
        // Nothing staged is left beside the volumes.
        for d in [dom.dir().to_owned(), dom.dir().join("a"), dom.dir().join("b")] {
            let staged: Vec<_> = fs::read_dir(&d)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("nasbak-restore"))
                .collect();
            assert!(staged.is_empty(), "{staged:?}");
        }
    }
    // A manifest in which two disks share a file is refused by verify and restore.
    let backup = e.catalog().list(&repo, Some(dom.name())).unwrap().pop().unwrap();
    let manifest = root.join(dom.name()).join(&backup.id).join("manifest.json");
    let text = fs::read_to_string(&manifest).unwrap().replace("datadisk.data@vdc.qcow2", "datadisk.data@vdb.qcow2");
    fs::write(&manifest, text).unwrap();
    let err = e.catalog().verify(&repo, dom.name(), &backup.id, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(&err, BackupError::DamagedBackup { reason, .. } if reason.contains("share this file")), "{err}");
    let err = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &backup.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, BackupError::DamagedBackup { .. }), "{err}");
}

/// Defect 3: a backup whose manifest is damaged stays visible: listed as damaged with the
/// reason, verified as damaged, deletable, and neither counted nor removed by prune.
#[test]
fn a_backup_with_a_damaged_manifest_is_listed_verified_pruned_around_and_deleted() {
    let dom = DomainSpec::new("damaged").disk(DiskSpec::qcow2(16)).create();
    let (repo, root, runtime) = repository(&dom);
    let e = engine(&runtime);
    // Three independent full backups (how prune treats chains is lab_incremental's).
    let full = request(dom.name(), &repo).with_mode(nasbak::chain::ModeRequest::Full);
    let ids: Vec<String> =
        (0..3).map(|_| e.backup(&full, &CancelHandle::new(), &mut |_| {}).unwrap().manifest.id).collect();
    fs::write(root.join(dom.name()).join(&ids[0]).join("manifest.json"), b"\x00\x01 not a manifest").unwrap();
    // A directory named like a backup with nothing in it (a copy that never finished).
    fs::create_dir(root.join(dom.name()).join("2020.01.01.00.00.00")).unwrap();
    let listed = e.catalog().list(&repo, Some(dom.name())).unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(matches!(&listed[0].kind, BackupKind::Damaged { reason } if reason.contains("neither")), "{listed:?}");
    assert!(matches!(&listed[1].kind, BackupKind::Damaged { reason } if reason.contains("manifest is invalid")));
    let err = e.catalog().verify(&repo, dom.name(), &ids[0], &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, BackupError::DamagedBackup { .. }), "{err}");
    // Prune with keep-last 1: the damaged ones are reported, not counted, not removed.
    let report = e.catalog().prune(&repo, dom.name(), Some(&RetentionPolicy::keep_last(1)), &Default::default(), false);
    let report = report.unwrap();
    let damaged: Vec<&str> = report.damaged.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(damaged, ["2020.01.01.00.00.00", ids[0].as_str()]);
    let kept: Vec<&str> = report.decisions.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
    assert_eq!(kept, [ids[2].as_str()]);
    assert_eq!(e.catalog().list(&repo, Some(dom.name())).unwrap().len(), 3);
    e.catalog().delete(&repo, dom.name(), &ids[0]).unwrap();
    e.catalog().delete(&repo, dom.name(), "2020.01.01.00.00.00").unwrap();
    let left: Vec<String> = e.catalog().list(&repo, Some(dom.name())).unwrap().into_iter().map(|b| b.id).collect();
    assert_eq!(left, [ids[2].clone()]);
    let names: Vec<String> =
        fs::read_dir(root.join(dom.name())).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, [ids[2].clone()], "nothing else is left in the VM directory");
}

/// Defect 6: verify tells a missing file, an unreadable one and one whose data differs apart.
#[test]
fn verify_tells_missing_unreadable_and_differing_files_apart() {
    let dom = DomainSpec::new("verifykinds")
        .disk(DiskSpec::qcow2(16).ext4())
        .disk(DiskSpec::qcow2(16))
        .disk(DiskSpec::qcow2(16))
        .disk(DiskSpec::qcow2(16))
        .create();
    let (repo, root, runtime) = repository(&dom);
    let e = engine(&runtime);
    let b = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let dir = root.join(&b.relative_dir);
    let file = |i: usize| dir.join(&b.manifest.disks[i].file);
    fs::remove_file(file(1)).unwrap();
    // A directory where the file was: opening works, reading fails with an I/O error (EISDIR).
    fs::remove_file(file(2)).unwrap();
    fs::create_dir(file(2)).unwrap();
    let mut bytes = fs::read(file(3)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(file(3), bytes).unwrap();
    let v = e.catalog().verify(&repo, dom.name(), &b.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap().files;
    let statuses: Vec<FileStatus> = v.iter().map(|v| v.status).collect();
    assert_eq!(statuses, [FileStatus::Ok, FileStatus::Missing, FileStatus::Unreadable, FileStatus::Differs], "{v:?}");
    assert!(v[2].error.as_deref().unwrap_or_default().contains("directory"), "{v:?}");
}

/// Defect 4: a running-VM backup cancelled while its push job runs is `Cancelled`, the job is
/// gone from the domain and nothing is left on the repository.
#[test]
fn a_backup_cancelled_during_the_push_job_is_cancelled_not_failed() {
    let dom = DomainSpec::new("canceljob").disk(DiskSpec::raw(512)).create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 512);
    dom.start();
    let (repo, root, runtime) = repository(&dom);
    let e = engine(&runtime);
    let cancel = CancelHandle::new();
    let mut saw_job = false;
    let err = e
        .backup(&request(dom.name(), &repo), &cancel, &mut |p| {
            if p.phase == Phase::Job {
                saw_job = true;
                cancel.cancel();
            }
        })
        .unwrap_err();
    assert!(saw_job);
    assert!(matches!(err, BackupError::Cancelled), "{err}");
    let info = nasbak_testlab::virsh(&["domjobinfo", dom.name()]).unwrap();
    assert!(info.contains("None"), "no job is left: {info}");
    assert_eq!(fs::read_dir(root.join(dom.name())).unwrap().count(), 0, "nothing is left");
    // The next backup succeeds.
    e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
}

/// Defect 7 on a repository: a second backup of a VM is refused at once naming the holder;
/// a claim of a process that no longer runs is taken over, and the backup says so.
#[test]
fn a_held_lock_refuses_at_once_and_a_dead_holders_lock_is_taken_over() {
    let dom = DomainSpec::new("lockvm").disk(DiskSpec::qcow2(16)).create();
    let (repo, root, runtime) = repository(&dom);
    let e = engine(&runtime);
    let vm_dir = root.join(dom.name());
    fs::create_dir_all(&vm_dir).unwrap();
    let held = VmLock::take(&vm_dir, dom.name()).unwrap();
    let start = std::time::Instant::now();
    let err = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "refused at once: {:?}", start.elapsed());
    assert!(matches!(err, BackupError::Lock(_)), "{err}");
    assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
    drop(held);
    // A nasbak that was killed: its process is gone, its claim is still there.
    let mut child = std::process::Command::new("sleep").arg("0").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let host = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
    let claim = format!(r#"{{"host":"{host}","pid":{dead},"since":"2026-01-01T00:00:00Z","lease_secs":60}}"#);
    fs::write(vm_dir.join(format!(".nasbak-lock.{host}.{dead}.1")), claim).unwrap();
    let outcome = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(
        outcome.cleaned.iter().any(|c| c.contains(&format!("pid {dead}")) && c.contains("no longer runs")),
        "{:?}",
        outcome.cleaned
    );
}

/// Defect 2, the report: a restore that fails after it began to change volumes says which
/// disks were restored, which one is partly written and which are unchanged; the disk that
/// failed is marked, so a backup refuses until a restore has rewritten it.
#[test]
fn a_restore_that_fails_midway_says_which_volumes_changed() {
    let dom = DomainSpec::new("midway")
        .disk(DiskSpec::raw(16).ext4_with_files(&[("f.txt", b"first")]))
        .disk(DiskSpec::raw(16).ext4_with_files(&[("f.txt", b"second")]))
        .disk(DiskSpec::raw(16).ext4_with_files(&[("f.txt", b"third")]))
        .create();
    let (repo, _root, runtime) = repository(&dom);
    let e = engine(&runtime);
    let backup = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    for disk in dom.disks() {
        zero(disk);
    }
    // The second volume cannot be written (immutable, even for root).
    let second = &dom.disks()[1].path;
    ExternalCommand::new("chattr").arg("+i").arg(second).run().unwrap();
    let err = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &backup.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    ExternalCommand::new("chattr").arg("-i").arg(second).run().unwrap();
    match &err {
        BackupError::RestoreIncomplete { restored, partly_written, untouched, .. } => {
            assert_eq!((restored.as_slice(), partly_written.as_deref()), (&["vda".to_owned()][..], Some("vdb")));
            assert_eq!(untouched, &["vdc"]);
        }
        other => panic!("{other}"),
    }
    assert_eq!(dom.read_ext4_file(&dom.disks()[0].path, "f.txt").as_deref(), Some("first"));
    assert_eq!(dom.read_ext4_file(&dom.disks()[2].path, "f.txt"), None, "vdc was not touched");
    let refused = e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(refused, BackupError::HalfRestored { .. }), "{refused}");
    let restored = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &backup.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap()
        .restored;
    assert!(restored[1].note.as_deref().unwrap_or_default().contains("had been interrupted"), "{restored:?}");
    for (disk, want) in dom.disks().iter().zip(["first", "second", "third"]) {
        assert_eq!(dom.read_ext4_file(&disk.path, "f.txt").as_deref(), Some(want));
    }
    e.backup(&request(dom.name(), &repo), &CancelHandle::new(), &mut |_| {}).unwrap();
}
