//! Incremental backups through the facade on the lab: a full and two incrementals of a running
//! VM whose disk changes between them (written through QEMU's block layer, as a guest would),
//! each point restored exactly, the chain verified, and deletes and prunes that never leave a
//! kept backup without its parent.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{
    CancelHandle, Domain, Hypervisor, JobOptions, LibvirtHypervisor, PushBackup, start_backup,
};
use nasbak::nasbak_process::ExternalCommand;
use nasbak::nasbak_qemu_img::{ImageLocation, ImageTool, QemuImg};
use nasbak::nasbak_repo::{
    BackupMode, BackupRepository, MountTimeouts, RepositoryMounts, RetentionPolicy, SystemMounter,
};
use nasbak::{
    BackupError, BackupOutcome, BackupRequest, Engine, ErrorKind, FileStatus, RestoreRequest, VolumeRestoreRequest,
};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
}

fn same(a: &Path, b: &Path) -> bool {
    let out = ExternalCommand::new("qemu-img").args(["compare", "-U"]).arg(a).arg(b).run_unchecked().unwrap();
    if !out.status.success() {
        eprintln!("qemu-img compare {} {}: {}", a.display(), b.display(), out.stdout_text());
    }
    out.status.success()
}

/// Disk `target` of backup `id` restored into a new qcow2 file in the domain's directory (its
/// path); panics with the error's chain when the restore fails.
fn restored(e: &LabEngine, repo: &BackupRepository, dom: &LabDomain, id: &str, target: &str) -> PathBuf {
    let to = dom.dir().join(format!("restored-{id}-{target}.qcow2"));
    let _ = fs::remove_file(&to);
    let request = VolumeRestoreRequest::new(repo.clone(), dom.name(), id, target, ImageLocation::Path(to.clone()));
    e.restore_volume(&request, &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{id} {target}: {}", nasbak::chain(&err)));
    to
}

#[test]
fn a_chain_of_incrementals_restores_every_point_and_survives_delete_and_prune() {
    let dom = DomainSpec::new("incchain").disk(DiskSpec::qcow2(32)).disk(DiskSpec::raw(8)).running(true).create();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("chain", kind, root.to_str().unwrap(), "", None).unwrap();
    let e = engine(&dom.dir().join("runtime"));
    let backup = |mode: ModeRequest| -> BackupOutcome {
        let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(mode);
        e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap()
    };

    dom.write_through_qemu(0, 0x11, "0", "1M");
    let first = backup(ModeRequest::Auto);
    assert_eq!((first.manifest.mode, first.manifest.parent.as_deref()), (BackupMode::Full, None));
    assert!(first.manifest.checkpoint.is_some(), "a running VM's full starts a chain");
    let point1 = dom.raw_copy(0, "point1");
    // Between backups the domain carries no nasbak checkpoint record (it can be undefined).
    assert!(e.hypervisor().checkpoints(dom.name()).unwrap().is_empty());
    // Another tool's checkpoint: never touched (and its bitmap keeps recording).
    let other = ["checkpoint-create-as", dom.name(), "other-tool", "--diskspec", "vda,checkpoint=bitmap"];
    nasbak_testlab::virsh(&[&other[..], &["--diskspec", "vdb,checkpoint=no"]].concat()).unwrap();

    dom.write_through_qemu(0, 0x22, "4M", "2M");
    let second = backup(ModeRequest::Incremental);
    let m = &second.manifest;
    assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Incremental, Some(first.manifest.id.as_str())));
    assert_eq!(m.disks[0].mode, BackupMode::Incremental);
    assert_eq!(
        m.disks[0].backing.as_deref(),
        Some(format!("../{}/{}", first.manifest.id, first.manifest.disks[0].file).as_str())
    );
    assert_eq!(m.disks[1].mode, BackupMode::Full, "the raw disk keeps no bitmap");
    assert!(m.disks[1].full_reason.as_deref().unwrap().contains("no dirty bitmap"), "{m:?}");
    let inc_file = root.join(&second.relative_dir).join(&m.disks[0].file);
    let len = fs::metadata(&inc_file).unwrap().len();
    assert!((2 << 20..4 << 20).contains(&len), "about the 2 MiB changed: {len}");
    let point2 = dom.raw_copy(0, "point2");

    // A run killed after its job started left its `.partial` and its checkpoint; another
    // repository's chain of this VM has a checkpoint too. The next backup removes the killed
    // run's and leaves the other repository's alone.
    let killed = "2099.01.01.00.00.00";
    fs::create_dir_all(root.join(dom.name()).join(format!("{killed}.partial"))).unwrap();
    let hv = e.hypervisor();
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    for (name, dir) in [(format!("nasbak-{killed}"), "killed"), ("nasbak-2098.01.01.00.00.00".to_owned(), "other")] {
        let out = dom.dir().join(dir);
        fs::create_dir_all(&out).unwrap();
        fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut job = PushBackup::for_domain(&domain, &out, |d| format!("{}.qcow2", d.target));
        job.checkpoint = Some(name);
        start_backup(hv, dom.name(), &job)
            .unwrap()
            .wait(JobOptions::default(), &CancelHandle::new(), &mut |_| {})
            .unwrap();
    }

    dom.write_through_qemu(0, 0x33, "8M", "1M");
    let third = backup(ModeRequest::Auto);
    assert_eq!(third.manifest.parent.as_deref(), Some(second.manifest.id.as_str()));
    assert!(third.cleaned.iter().any(|c| c.contains(&format!("checkpoint nasbak-{killed}"))), "{:?}", third.cleaned);
    let mut left = hv.checkpoints(dom.name()).unwrap();
    left.sort();
    assert_eq!(left, ["nasbak-2098.01.01.00.00.00", "other-tool"], "the other chain's and tool's stay");
    hv.delete_checkpoint(dom.name(), "nasbak-2098.01.01.00.00.00").unwrap();
    let point3 = dom.raw_copy(0, "point3");

    // Verify checks the whole chain: the third's files, and those it builds on.
    let report = e.catalog().verify(&repo, dom.name(), &third.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(report.files.iter().all(|f| f.status == FileStatus::Ok), "{report:?}");
    assert!(report.files.iter().any(|f| f.file.starts_with(&format!("../{}/", first.manifest.id))), "{report:?}");

    // Every point restores exactly, as a self-contained volume.
    let images = QemuImg::new(dom.dir());
    for (made, want) in [(&first, &point1), (&second, &point2), (&third, &point3)] {
        let to = restored(&e, &repo, &dom, &made.manifest.id, "vda");
        assert!(same(&to, want), "the point of {}", made.manifest.id);
        let info = images.info(&ImageLocation::Path(to)).unwrap();
        assert_eq!((info.len(), info[0].backing_file.clone()), (1, None), "self-contained");
    }

    // A parent is never deleted before the backups that build on it.
    let err = e.catalog().delete(&repo, dom.name(), &second.manifest.id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HasDependents, "{err}");
    // Prune keeping the newest only: its plan merges the third into a self-contained backup,
    // then removes the other two.
    let keep_last = RetentionPolicy::keep_last(1);
    let prune = |dry_run| e.catalog().prune(&repo, dom.name(), Some(&keep_last), &Default::default(), dry_run).unwrap();
    let plan = prune(true);
    let merges: Vec<(&str, Option<&str>, bool)> =
        plan.decisions.iter().map(|d| (d.id.as_str(), d.merge_over.as_deref(), d.keep)).collect();
    let (i1, i2, i3) = (first.manifest.id.as_str(), second.manifest.id.as_str(), third.manifest.id.as_str());
    assert_eq!(merges, [(i3, Some(i2), true), (i2, None, false), (i1, None, false)], "{plan:?}");
    // A changed byte in the parent's file: the merge refuses to bake it into a full, and prune
    // keeps the chain instead, saying why. Mended, the merge goes through.
    let parent_file = root.join(&second.relative_dir).join(&second.manifest.disks[0].file);
    let original = fs::read(&parent_file).unwrap();
    let mut flipped = original.clone();
    *flipped.last_mut().unwrap() ^= 0xff;
    fs::write(&parent_file, &flipped).unwrap();
    let refused = prune(false);
    assert!(refused.decisions.iter().all(|d| d.keep && d.merge_over.is_none()), "{refused:?}");
    assert!(refused.decisions[0].reason.contains("merging it failed"), "{refused:?}");
    assert_eq!(e.catalog().list(&repo, Some(dom.name())).unwrap().len(), 3);
    fs::write(&parent_file, &original).unwrap();
    let report = prune(false);
    assert!(report.executed && report.decisions[0].merge_over.is_some(), "{report:?}");
    let left = e.catalog().list(&repo, Some(dom.name())).unwrap();
    assert_eq!(left.len(), 1);
    let merged = e.catalog().entry(&repo, dom.name(), i3).unwrap();
    let nasbak::BackupKind::Nasbak(m) = &merged.kind else { panic!("{merged:?}") };
    assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Full, None));
    assert!(m.disks.iter().all(|d| d.mode == BackupMode::Full && d.backing.is_none()), "{m:?}");
    assert!(m.disks[0].full_reason.as_deref().unwrap_or_default().contains("merged"), "{m:?}");
    assert_eq!(m.checkpoint, third.manifest.checkpoint, "the chain goes on from it");
    let report = e.catalog().verify(&repo, dom.name(), i3, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(report.files.iter().all(|f| f.status == FileStatus::Ok && !f.file.starts_with("../")), "{report:?}");
    assert!(same(&restored(&e, &repo, &dom, i3, "vda"), &point3), "the merged backup gives the third point back");
    // The next incremental builds on the merged backup.
    dom.write_through_qemu(0, 0x44, "12M", "1M");
    let fourth = backup(ModeRequest::Auto);
    assert_eq!(fourth.manifest.parent.as_deref(), Some(i3), "{:?}", fourth.manifest);
    let point4 = dom.raw_copy(0, "point4");
    let to = restored(&e, &repo, &dom, &fourth.manifest.id, "vda");
    assert!(same(&to, &point4), "the incremental on the merged backup");
    // The newest deleted: its checkpoint's bitmaps are removed by the next backup, which is a
    // full (the parent's bitmap went when the deleted one was made) and says why.
    assert_eq!(dom.bitmaps(0), [format!("nasbak-{}", fourth.manifest.id), "other-tool".into()]);
    e.catalog().delete(&repo, dom.name(), &fourth.manifest.id).unwrap();
    let fifth = backup(ModeRequest::Auto);
    let removed = format!("removed the bitmaps of checkpoint nasbak-{}", fourth.manifest.id);
    assert!(fifth.cleaned.iter().any(|c| c.contains(&removed)), "{:?}", fifth.cleaned);
    assert_eq!(fifth.manifest.mode, BackupMode::Full);
    assert!(
        fifth.manifest.full_reason.as_deref().unwrap_or_default().contains("redefining it failed"),
        "{:?}",
        fifth.manifest
    );
    assert_eq!(dom.bitmaps(0), [format!("nasbak-{}", fifth.manifest.id), "other-tool".into()]);
    assert_eq!(e.hypervisor().checkpoints(dom.name()).unwrap(), ["other-tool"]);
    let point5 = dom.raw_copy(0, "point5");

    // The whole VM restored from the newest point of the chain.
    dom.destroy();
    let restored = e.restore(
        &RestoreRequest::new(repo.clone(), dom.name(), fifth.manifest.id.as_str()),
        &CancelHandle::new(),
        &mut |_| {},
    );
    let restored = restored.unwrap_or_else(|err: BackupError| panic!("{}", nasbak::chain(&err)));
    assert_eq!(restored.restored.len(), 2);
    assert!(same(&dom.disks()[0].path, &point5));
}

/// Every way a chain breaks between backups ends in a correct backup and a stated reason: the
/// domain redefined, a disk's bitmap deleted, a disk resized, a disk added, a parent file
/// damaged, the VM crashed (its bitmaps inconsistent). The guest writes known data through its
/// guest agent between backups, and every point restores exactly.
#[test]
fn every_break_in_a_chain_ends_in_a_correct_backup_and_a_stated_reason() {
    let mut dom = DomainSpec::new("incbreak")
        .disk(DiskSpec::qcow2(32))
        .disk(DiskSpec::qcow2(16))
        .agent(true)
        .acpi(true) // PCI hotplug, for the disk added
        .running(true)
        .create();
    dom.wait_for_agent(Duration::from_secs(120));
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("breaks", kind, root.to_str().unwrap(), "", None).unwrap();
    let e = engine(&dom.dir().join("runtime"));
    let name = dom.name().to_owned();
    let backup = |mode: ModeRequest| -> BackupOutcome {
        let request = BackupRequest::new(&name, repo.clone()).with_mode(mode);
        e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)))
    };
    let disk_of = |o: &BackupOutcome, target: &str| {
        o.manifest.disks.iter().find(|d| d.target == target).cloned().unwrap_or_else(|| panic!("{target} in {o:?}"))
    };
    // Each point: the backup and the content of each of its disks then.
    let mut points: Vec<(BackupOutcome, Vec<(String, std::path::PathBuf)>)> = Vec::new();
    let mut keep = |o: &BackupOutcome, dom: &LabDomain| {
        let copies = (0..dom.disks().len())
            .map(|i| (dom.disks()[i].target.clone(), dom.raw_copy(i, &format!("{}-{i}", o.manifest.id))))
            .collect();
        points.push((o.clone(), copies));
    };

    dom.write_through_agent("vda", 0x11, 0, 256 << 10);
    dom.write_through_agent("vdb", 0x12, 0, 256 << 10);
    let first = backup(ModeRequest::Auto);
    assert_eq!(first.manifest.mode, BackupMode::Full);
    keep(&first, &dom);

    // The domain redefined (its definition and any checkpoint metadata gone, then defined again):
    // the chain goes on, the parent's checkpoint redefined from the repository.
    let definition = dom.dir().join("redefined.xml");
    fs::write(&definition, nasbak_testlab::virsh(&["dumpxml", "--inactive", dom.name()]).unwrap()).unwrap();
    // No nasbak checkpoint metadata is left between backups, so a plain undefine works.
    nasbak_testlab::virsh(&["undefine", dom.name()]).unwrap();
    nasbak_testlab::virsh(&["define", definition.to_str().unwrap()]).unwrap();
    dom.write_through_agent("vda", 0x21, 1 << 20, 512 << 10);
    let redefined = backup(ModeRequest::Auto);
    assert_eq!(redefined.manifest.mode, BackupMode::Incremental, "{:?}", redefined.manifest);
    assert!(redefined.manifest.disks.iter().all(|d| d.mode == BackupMode::Incremental), "{:?}", redefined.manifest);
    let inc = root.join(&redefined.relative_dir).join(&disk_of(&redefined, "vda").file);
    let len = fs::metadata(&inc).unwrap().len();
    assert!((512 << 10..2 << 20).contains(&len), "about the 512 KiB the guest changed: {len}");
    keep(&redefined, &dom);

    // vdb's bitmap deleted: vdb in full with the reason, vda still incremental.
    dom.remove_bitmap(1, &format!("nasbak-{}", redefined.manifest.id));
    dom.write_through_agent("vda", 0x31, 2 << 20, 256 << 10);
    dom.write_through_agent("vdb", 0x32, 1 << 20, 256 << 10);
    let no_bitmap = backup(ModeRequest::Auto);
    assert_eq!(no_bitmap.manifest.mode, BackupMode::Incremental, "{:?}", no_bitmap.manifest);
    assert_eq!(disk_of(&no_bitmap, "vda").mode, BackupMode::Incremental);
    let vdb = disk_of(&no_bitmap, "vdb");
    assert_eq!(vdb.mode, BackupMode::Full);
    assert!(vdb.full_reason.as_deref().unwrap_or_default().contains("bitmap"), "{vdb:?}");
    keep(&no_bitmap, &dom);

    // vda resized: vda in full (its size said), vdb incremental again.
    dom.resize(0, 48);
    dom.write_through_qemu(0, 0x41, "40M", "1M");
    dom.write_through_agent("vdb", 0x42, 2 << 20, 256 << 10);
    let resized = backup(ModeRequest::Auto);
    let vda = disk_of(&resized, "vda");
    assert_eq!(vda.mode, BackupMode::Full);
    assert!(vda.full_reason.as_deref().unwrap_or_default().contains("resized"), "{vda:?}");
    assert_eq!(disk_of(&resized, "vdb").mode, BackupMode::Incremental);
    keep(&resized, &dom);

    // A disk added: it is copied in full, the others incremental.
    dom.attach_qcow2("vdc", 8);
    dom.write_through_qemu(2, 0x51, "1M", "1M");
    dom.write_through_agent("vda", 0x52, 3 << 20, 256 << 10);
    let added = backup(ModeRequest::Auto);
    let vdc = disk_of(&added, "vdc");
    assert_eq!(vdc.mode, BackupMode::Full);
    assert!(vdc.full_reason.as_deref().unwrap_or_default().contains("new"), "{vdc:?}");
    assert_eq!(disk_of(&added, "vda").mode, BackupMode::Incremental);
    assert_eq!(disk_of(&added, "vdb").mode, BackupMode::Incremental);
    keep(&added, &dom);

    // The parent's vdb file damaged (cut short): vdb in full, the reason names the file.
    let damaged = root.join(&added.relative_dir).join(&disk_of(&added, "vdb").file);
    let len = fs::metadata(&damaged).unwrap().len();
    fs::OpenOptions::new().write(true).open(&damaged).unwrap().set_len(len / 2).unwrap();
    dom.write_through_agent("vdb", 0x61, 3 << 20, 256 << 10);
    let after_damage = backup(ModeRequest::Auto);
    let vdb = disk_of(&after_damage, "vdb");
    assert_eq!(vdb.mode, BackupMode::Full);
    assert!(vdb.full_reason.as_deref().unwrap_or_default().contains("manifest says"), "{vdb:?}");
    assert_eq!(disk_of(&after_damage, "vda").mode, BackupMode::Incremental);
    keep(&after_damage, &dom);

    // The VM powered off (QEMU stops in order and stores its bitmaps) and started again: the
    // chain goes on.
    dom.destroy();
    dom.start();
    dom.wait_for_agent(Duration::from_secs(120));
    dom.write_through_agent("vda", 0x71, 4 << 20, 256 << 10);
    let restarted = backup(ModeRequest::Auto);
    assert_eq!(restarted.manifest.mode, BackupMode::Incremental, "{:?}", restarted.manifest);
    keep(&restarted, &dom);

    // The host crashed (QEMU killed: its bitmaps were never stored, they are inconsistent): a
    // full, with libvirt's reason.
    dom.crash();
    dom.start();
    dom.wait_for_agent(Duration::from_secs(120));
    dom.write_through_agent("vda", 0x72, 4 << 20, 256 << 10);
    let crashed = backup(ModeRequest::Incremental);
    assert_eq!(crashed.manifest.mode, BackupMode::Full, "{:?}", crashed.manifest);
    assert!(crashed.manifest.full_reason.as_deref().unwrap_or_default().contains("bitmap"), "{:?}", crashed.manifest);
    keep(&crashed, &dom);
    // And the chain starts again from it.
    dom.write_through_agent("vda", 0x81, 5 << 20, 256 << 10);
    let again = backup(ModeRequest::Auto);
    assert_eq!(again.manifest.mode, BackupMode::Incremental, "{:?}", again.manifest);
    keep(&again, &dom);

    // Each point restores exactly, disk by disk (but for the file damaged on purpose).
    for (made, copies) in &points {
        for (target, want) in copies {
            if made.manifest.id == added.manifest.id && target == "vdb" {
                continue;
            }
            let to = restored(&e, &repo, &dom, &made.manifest.id, target);
            assert!(same(&to, want), "{target} at {}: {:?}", made.manifest.id, made.manifest.disks);
            let _ = fs::remove_file(&to);
        }
    }
    // Only the newest backup's bitmap is left on the disks: the others (the broken ones
    // included) went with their checkpoints.
    let newest = format!("nasbak-{}", again.manifest.id);
    for i in 0..dom.disks().len() {
        assert_eq!(dom.bitmaps(i), std::slice::from_ref(&newest), "disk {i}");
    }
    assert!(e.hypervisor().checkpoints(dom.name()).unwrap().is_empty());

    // Prune keeping the newest three: the oldest kept (an incremental of full and incremental
    // disks on the damaged backup's successor) is merged; every kept point still restores.
    let keep_last = RetentionPolicy::keep_last(3);
    let report = e.catalog().prune(&repo, dom.name(), Some(&keep_last), &Default::default(), false).unwrap();
    let merged: Vec<&str> = report.decisions.iter().filter(|d| d.merge_over.is_some()).map(|d| d.id.as_str()).collect();
    assert_eq!(merged, [restarted.manifest.id.as_str()], "{report:?}");
    for (made, copies) in
        points.iter().filter(|(o, _)| report.decisions.iter().any(|d| d.keep && d.id == o.manifest.id))
    {
        for (target, want) in copies {
            let to = restored(&e, &repo, &dom, &made.manifest.id, target);
            assert!(same(&to, want), "{target} at {} after the merge", made.manifest.id);
            let _ = fs::remove_file(&to);
        }
    }
}

/// A shut-off VM's backups form chains too, from the persistent bitmaps in its qcow2 images
/// (copied offline by qemu-storage-daemon), and a chain goes on across the VM starting and
/// stopping; a raw disk is copied in full with the reason; a VM that crashed (its bitmaps
/// marked in use) gets a full with the reason. Every point restores exactly.
#[test]
fn a_shut_off_vm_gets_incrementals_from_its_bitmaps_across_starts_and_stops() {
    let dom = DomainSpec::new("incoff").disk(DiskSpec::qcow2(32)).disk(DiskSpec::raw(8)).create();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("offline", kind, root.to_str().unwrap(), "", None).unwrap();
    let e = engine(&dom.dir().join("runtime"));
    let backup = |mode: ModeRequest| -> BackupOutcome {
        let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(mode);
        e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)))
    };
    let bitmap_names = |dom: &LabDomain| -> Vec<String> { dom.stored_bitmaps(0).into_iter().map(|(n, _)| n).collect() };
    let mut points = Vec::new();

    dom.write_offline(0, 0x11, "0", "1M");
    let first = backup(ModeRequest::Auto);
    assert_eq!(first.manifest.mode, BackupMode::Full);
    let name = |o: &BackupOutcome| format!("nasbak-{}", o.manifest.id);
    assert_eq!(first.manifest.checkpoint.as_ref().map(|c| c.name.clone()), Some(name(&first)));
    assert_eq!(bitmap_names(&dom), [name(&first)], "the chain starts with a bitmap in the image");
    points.push((first.clone(), dom.raw_copy(0, "p1")));

    dom.write_offline(0, 0x22, "4M", "2M");
    let second = backup(ModeRequest::Auto);
    let m = &second.manifest;
    assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Incremental, Some(first.manifest.id.as_str())), "{m:?}");
    assert_eq!(m.disks[0].mode, BackupMode::Incremental);
    assert!(m.disks[1].full_reason.as_deref().unwrap_or_default().contains("no dirty bitmap"), "{m:?}");
    let inc = root.join(&second.relative_dir).join(&m.disks[0].file);
    let len = fs::metadata(&inc).unwrap().len();
    assert!((2 << 20..4 << 20).contains(&len), "about the 2 MiB changed: {len}");
    assert_eq!(bitmap_names(&dom), [name(&second)], "the parent's bitmap went, the new one stays");
    points.push((second.clone(), dom.raw_copy(0, "p2")));

    // Started: the running VM's backup builds on the shut-off VM's (its checkpoint redefined
    // from the definition nasbak wrote).
    dom.start();
    dom.write_through_qemu(0, 0x33, "8M", "1M");
    let third = backup(ModeRequest::Auto);
    assert_eq!(third.manifest.parent.as_deref(), Some(second.manifest.id.as_str()), "{:?}", third.manifest);
    points.push((third.clone(), dom.raw_copy(0, "p3")));

    // Stopped in order (QEMU stores the bitmaps): the next shut-off backup builds on it.
    dom.destroy();
    dom.write_offline(0, 0x44, "12M", "1M");
    // A run killed while the VM was shut off left its `.partial` and its bitmap in the image:
    // the next backup removes both.
    let killed = "2099.01.01.00.00.00";
    fs::create_dir_all(root.join(dom.name()).join(format!("{killed}.partial"))).unwrap();
    ExternalCommand::new("qemu-img")
        .args(["bitmap", "--add", "-f", "qcow2"])
        .arg(&dom.disks()[0].path)
        .arg(format!("nasbak-{killed}"))
        .run()
        .unwrap();
    let fourth = backup(ModeRequest::Auto);
    assert!(fourth.cleaned.iter().any(|c| c.contains(&format!("nasbak-{killed}"))), "{:?}", fourth.cleaned);
    assert_eq!(fourth.manifest.parent.as_deref(), Some(third.manifest.id.as_str()), "{:?}", fourth.manifest);
    assert_eq!(fourth.manifest.disks[0].mode, BackupMode::Incremental);
    assert_eq!(bitmap_names(&dom), [name(&fourth)]);
    points.push((fourth.clone(), dom.raw_copy(0, "p4")));

    // Crashed while running: the bitmap is marked in use, so a full with the reason.
    dom.start();
    dom.write_through_qemu(0, 0x55, "16M", "1M");
    dom.crash();
    let crashed = backup(ModeRequest::Incremental);
    assert_eq!(crashed.manifest.mode, BackupMode::Full, "{:?}", crashed.manifest);
    assert!(
        crashed.manifest.full_reason.as_deref().unwrap_or_default().contains("inconsistent"),
        "{:?}",
        crashed.manifest
    );
    assert_eq!(bitmap_names(&dom), [name(&crashed)], "the broken bitmap went too");
    points.push((crashed.clone(), dom.raw_copy(0, "p5")));

    for (made, want) in &points {
        let to = restored(&e, &repo, &dom, &made.manifest.id, "vda");
        assert!(same(&to, want), "the point of {}", made.manifest.id);
    }
}

/// What is left beside `path` by a restore: staged files and chain workspaces.
fn staged_beside(path: &Path) -> Vec<String> {
    let dir = path.parent().unwrap();
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".nasbak-restore"))
        .collect()
}

/// A restore from deep in a chain reads each backup file once: the full is copied (its checksum
/// checked as it is copied) and the incrementals are committed into the copy. Its progress is
/// the bytes written; a damaged file, a cancel and a killed run's leftovers leave nothing behind.
#[test]
fn a_restore_from_deep_in_a_chain_reads_each_file_once_and_leaves_nothing_behind() {
    let dom = DomainSpec::new("incdeep").disk(DiskSpec::qcow2(48)).running(true).create();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("deep", kind, root.to_str().unwrap(), "", None).unwrap();
    let e = engine(&dom.dir().join("runtime"));
    dom.write_through_qemu(0, 0x11, "0", "16M");
    let mut made = Vec::new();
    // A full, then five incrementals: new data, data over data, zeros over data, data at the end.
    for (i, (pattern, offset, len)) in [
        (0x11, "0", "1M"),
        (0x22, "2M", "1M"),
        (0x33, "2M", "512K"),
        (0x00, "8M", "2M"),
        (0x44, "47M", "1M"),
        (0x55, "20M", "3M"),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            dom.write_through_qemu(0, pattern, offset, len);
        }
        let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(ModeRequest::Auto);
        let out = e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert_eq!(out.manifest.mode, if i == 0 { BackupMode::Full } else { BackupMode::Incremental });
        made.push(out);
    }
    let point = dom.raw_copy(0, "deep-top");
    let top = made.last().unwrap();
    let files: Vec<u64> = made
        .iter()
        .map(|m| fs::metadata(root.join(&m.relative_dir).join(&m.manifest.disks[0].file)).unwrap().len())
        .collect();
    let incrementals: u64 = files[1..].iter().sum();

    // Progress: the bytes written (every file copied, the incrementals' again), never going back.
    let to = dom.dir().join("deep.qcow2");
    let request =
        VolumeRestoreRequest::new(repo.clone(), dom.name(), &top.manifest.id, "vda", ImageLocation::Path(to.clone()));
    let mut seen = Vec::new();
    e.restore_volume(&request, &CancelHandle::new(), &mut |p| seen.push(p.clone()))
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert!(same(&to, &point), "the top of the chain restored exactly");
    let info = QemuImg::new(dom.dir()).info(&ImageLocation::Path(to.clone())).unwrap();
    assert_eq!(info.len(), 1, "self-contained: {info:?}");
    let total = files.iter().sum::<u64>() + incrementals;
    assert!(seen.iter().all(|p| p.total == total && p.phase == nasbak::Phase::Copy), "{total}: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "{seen:?}");
    assert_eq!(seen.last().map(|p| p.done), Some(total), "{seen:?}");
    assert!(seen.iter().any(|p| p.done > files.iter().sum::<u64>()), "the commit's bytes are told: {seen:?}");
    assert!(staged_beside(&to).is_empty(), "{:?}", staged_beside(&to));

    // A cancel while the full is copied: nothing written, nothing left.
    let to2 = dom.dir().join("deep2.qcow2");
    let request2 =
        VolumeRestoreRequest::new(repo.clone(), dom.name(), &top.manifest.id, "vda", ImageLocation::Path(to2.clone()));
    let cancel = CancelHandle::new();
    let err = e.restore_volume(&request2, &cancel, &mut |_| cancel.cancel()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{}", nasbak::chain(&err));
    assert!(!to2.exists() && staged_beside(&to2).is_empty(), "{:?}", staged_beside(&to2));

    // A damaged incremental in the middle: named, nothing written, nothing left.
    let middle = root.join(&made[2].relative_dir).join(&made[2].manifest.disks[0].file);
    let saved = fs::read(&middle).unwrap();
    let mut bad = saved.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0xff;
    fs::write(&middle, &bad).unwrap();
    let err = e.restore_volume(&request2, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    let text = nasbak::chain(&err);
    assert!(text.contains(&made[2].manifest.disks[0].file) && text.contains("manifest says"), "{text}");
    assert!(!to2.exists() && staged_beside(&to2).is_empty(), "{:?}", staged_beside(&to2));
    fs::write(&middle, &saved).unwrap();

    // The whole VM: a killed restore's workspace beside the volume is removed, the volume is
    // the top's point.
    dom.destroy();
    let volume = &dom.disks()[0].path;
    let name = volume.file_name().unwrap().to_string_lossy().into_owned();
    let stale = volume.with_file_name(format!(".{name}.999999999-0.nasbak-restore.chain"));
    fs::create_dir_all(stale.join("2026.01.01.00.00.00")).unwrap();
    fs::write(stale.join("2026.01.01.00.00.00").join("vda.qcow2"), b"left by a killed restore").unwrap();
    let out = e.restore(
        &RestoreRequest::new(repo.clone(), dom.name(), top.manifest.id.as_str()),
        &CancelHandle::new(),
        &mut |_| {},
    );
    out.unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert!(same(volume, &point));
    assert!(staged_beside(volume).is_empty(), "{:?}", staged_beside(volume));
}

/// How the reference system's script (4.23) names a volume's file: `<role>.<volume>.qcow2`,
/// the volume being the last part of its path (a CloudStack volume path is a UUID without an
/// extension; the lab's disk files have one, left out here).
fn reference_file(dom: &LabDomain, index: usize) -> String {
    let stem = dom.disks()[index].path.file_stem().unwrap().to_string_lossy().into_owned();
    format!("{}.{stem}.qcow2", if index == 0 { "root" } else { "datadisk" })
}

/// A backup of the running `dom` into `<root>/<vm>/<ts>/` as the reference script writes it
/// (see `nasbak_testlab::reference`), an incremental's files re-pointed at their parents by a
/// path relative to the backup's directory, or (`absolute`) by the path they had under a
/// temporary mount point of the script's (`/tmp/csbackup.XXXXX`), which does not exist here.
fn reference_backup(
    dom: &LabDomain,
    root: &Path,
    ts: &str,
    (checkpoint, parent): (&str, Option<(&str, &str)>),
    absolute: bool,
) {
    let dest = root.join(dom.name()).join(ts);
    let disks = [("vda", reference_file(dom, 0)), ("vdb", reference_file(dom, 1))];
    nasbak_testlab::reference::push_backup(dom, &dest, &disks, Some(checkpoint), parent.map(|p| p.0));
    if let Some((_, parent_ts)) = parent {
        for (_, name) in &disks {
            let backing = if absolute {
                format!("/tmp/csbackup.Q7x2p/{}/{parent_ts}/{name}", dom.name())
            } else {
                format!("../{parent_ts}/{name}")
            };
            nasbak_testlab::reference::rebase(&dest.join(name), &backing);
        }
    }
}

/// Every file under `dir`, with its bytes' digest.
fn digests(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut all = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            all.extend(digests(&e.path()));
        } else {
            all.push((e.path(), nasbak::sha256_file(&e.path()).unwrap()));
        }
    }
    all.sort();
    all
}

#[test]
fn the_reference_systems_incremental_chains_are_listed_verified_and_restored_never_written() {
    let dom = DomainSpec::new("incref").disk(DiskSpec::qcow2(32)).disk(DiskSpec::qcow2(16)).running(true).create();
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("ref", kind, root.to_str().unwrap(), "", None).unwrap();
    let e = engine(&dom.dir().join("runtime"));
    // A full, an incremental re-pointed relatively, one re-pointed by the script's mount point.
    let ts = ["2026.03.01.00.00.00", "2026.03.02.00.00.00", "2026.03.03.00.00.00"];
    dom.write_through_qemu(0, 0x31, "0", "1M");
    reference_backup(&dom, &root, ts[0], ("backup-1", None), false);
    let points = [dom.raw_copy(0, "ref0"), PathBuf::new(), PathBuf::new()];
    dom.write_through_qemu(0, 0x32, "2M", "1M");
    dom.write_through_qemu(1, 0x42, "1M", "1M");
    reference_backup(&dom, &root, ts[1], ("backup-2", Some(("backup-1", ts[0]))), false);
    let points = [points[0].clone(), dom.raw_copy(0, "ref1"), PathBuf::new()];
    let data1 = dom.raw_copy(1, "ref1-data");
    dom.write_through_qemu(0, 0x33, "4M", "1M");
    reference_backup(&dom, &root, ts[2], ("backup-3", Some(("backup-2", ts[1]))), true);
    let points = [points[0].clone(), points[1].clone(), dom.raw_copy(0, "ref2")];
    let before = digests(&root.join(dom.name()));

    // Listed as the reference system's; verified with their chains (the mount-point name is
    // resolved in the repository, never opened).
    let list = e.catalog().list(&repo, Some(dom.name())).unwrap();
    assert_eq!(list.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), ts);
    assert!(list.iter().all(|b| matches!(b.kind, nasbak::BackupKind::Reference { .. })));
    for id in ts {
        let report = e.catalog().verify(&repo, dom.name(), id, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(report.ok(), "{id}: {report:?}");
    }
    let last = e.catalog().verify(&repo, dom.name(), ts[2], &CancelHandle::new(), &mut |_| {}).unwrap();
    let shown: Vec<&str> = last.files.iter().map(|f| f.file.as_str()).collect();
    assert!(shown.contains(&&*format!("../{}/{}", ts[0], reference_file(&dom, 0))), "{shown:?}");
    // Every point restores exactly, the data disk too.
    for (id, want) in ts.iter().zip(&points) {
        assert!(same(&restored(&e, &repo, &dom, id, "vda"), want), "vda of {id}");
    }
    assert!(same(&restored(&e, &repo, &dom, ts[1], "vdb"), &data1), "vdb of {}", ts[1]);
    // A whole-VM restore from the end of the chain.
    dom.destroy();
    dom.write_offline(0, 0x99, "0", "8M");
    e.restore(&RestoreRequest::new(repo.clone(), dom.name(), ts[2]), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert!(same(&dom.disks()[0].path, &points[2]), "the whole-VM restore");
    // The chain's base cannot be deleted while an incremental builds on it.
    let err = e.catalog().delete(&repo, dom.name(), ts[1]).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::HasDependents), "{}", nasbak::chain(&err));
    // nasbak's first backup of the VM is a full, saying why, and nothing of theirs changed.
    dom.start();
    let ours = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(ours.manifest.mode, BackupMode::Full);
    let reason = ours.manifest.full_reason.clone().unwrap_or_default();
    assert!(reason.contains("reference system"), "{reason}");
    let after: Vec<(PathBuf, String)> =
        digests(&root.join(dom.name())).into_iter().filter(|(p, _)| before.iter().any(|(b, _)| b == p)).collect();
    assert_eq!(after, before, "a reference backup was written");
    // A reference file whose backing name leads out of the VM's backups: said, never followed.
    let stray = root.join(dom.name()).join("2026.03.04.00.00.00");
    fs::create_dir_all(&stray).unwrap();
    let file = stray.join(reference_file(&dom, 0));
    ExternalCommand::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
        .arg(&dom.disks()[0].path)
        .arg(&file)
        .arg("32M")
        .run()
        .unwrap();
    let report =
        e.catalog().verify(&repo, dom.name(), "2026.03.04.00.00.00", &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(!report.ok(), "{report:?}");
    let said = format!("{report:?}");
    assert!(said.contains("backing file") && said.contains(&*dom.disks()[0].path.to_string_lossy()), "{said}");
    let to = dom.dir().join("stray.qcow2");
    let request = VolumeRestoreRequest::new(
        repo.clone(),
        dom.name(),
        "2026.03.04.00.00.00",
        "vda",
        ImageLocation::Path(to.clone()),
    );
    let err = e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(nasbak::chain(&err).contains("backing file"), "{}", nasbak::chain(&err));
    assert!(!to.exists());
}
