//! Incremental backups through the facade on the lab: a full and two incrementals of a running
//! VM whose disk changes between them (written through QEMU's block layer, as a guest would),
//! each point restored exactly, the chain verified, and deletes and prunes that never leave a
//! kept backup without its parent.

use std::fs;
use std::path::Path;
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
use nasbak_testlab::{DiskSpec, DomainSpec, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
}

fn same(a: &Path, b: &Path) -> bool {
    ExternalCommand::new("qemu-img").args(["compare", "-U"]).arg(a).arg(b).run().is_ok()
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
    assert!(fs::metadata(&inc_file).unwrap().len() < 4 << 20, "about the 2 MiB changed");
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
    assert_eq!(hv.checkpoints(dom.name()).unwrap(), ["nasbak-2098.01.01.00.00.00"], "the other chain's stays");
    hv.delete_checkpoint(dom.name(), "nasbak-2098.01.01.00.00.00").unwrap();
    let point3 = dom.raw_copy(0, "point3");

    // Verify checks the whole chain: the third's files, and those it builds on.
    let report = e.catalog().verify(&repo, dom.name(), &third.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(report.files.iter().all(|f| f.status == FileStatus::Ok), "{report:?}");
    assert!(report.files.iter().any(|f| f.file.starts_with(&format!("../{}/", first.manifest.id))), "{report:?}");

    // Every point restores exactly, as a self-contained volume.
    let images = QemuImg::new(dom.dir());
    for (made, want) in [(&first, &point1), (&second, &point2), (&third, &point3)] {
        let to = dom.dir().join(format!("restored-{}.qcow2", made.manifest.id));
        let request = VolumeRestoreRequest::new(
            repo.clone(),
            dom.name(),
            made.manifest.id.as_str(),
            "vda",
            ImageLocation::Path(to.clone()),
        );
        e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(same(&to, want), "the point of {}", made.manifest.id);
        let info = images.info(&ImageLocation::Path(to)).unwrap();
        assert_eq!((info.len(), info[0].backing_file.clone()), (1, None), "self-contained");
    }

    // A parent is never deleted before the backups that build on it; prune keeps it.
    let err = e.catalog().delete(&repo, dom.name(), &second.manifest.id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HasDependents, "{err}");
    let report =
        e.catalog().prune(&repo, dom.name(), Some(&RetentionPolicy::keep_last(1)), &Default::default(), false).unwrap();
    assert!(report.decisions.iter().all(|d| d.keep), "{report:?}");
    assert!(report.decisions.iter().any(|d| d.reason.contains("builds on it")), "{report:?}");

    // The whole VM restored from the newest point of the chain.
    dom.destroy();
    let restored = e.restore(
        &RestoreRequest::new(repo.clone(), dom.name(), third.manifest.id.as_str()),
        &CancelHandle::new(),
        &mut |_| {},
    );
    let restored = restored.unwrap_or_else(|err: BackupError| panic!("{}", nasbak::chain(&err)));
    assert_eq!(restored.restored.len(), 2);
    assert!(same(&dom.disks()[0].path, &point3));
}
