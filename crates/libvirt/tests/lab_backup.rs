//! Backups against the real libvirtd, QEMU and guest agent of the lab.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nasbak_agent::{FreezeStatus, GuestAgent, LibvirtAgentTransport, QuiescePolicy, quiesce};
use nasbak_libvirt::{
    CancelHandle, DiskSource, Domain, DomainState, Hypervisor, JobError, JobKind, JobOptions, LibvirtHypervisor,
    PushBackup, check_versions, start_backup,
};
use nasbak_process::ExternalCommand;
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageLocation, ImageTool, QemuImg};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI, fill_pseudo_random, shared_agent_guest};

fn hv() -> LibvirtHypervisor {
    LibvirtHypervisor::connect(URI).expect("libvirtd answers (run `cargo xtask lab up`)")
}

fn out_dir(dom: &LabDomain, name: &str) -> PathBuf {
    let d = dom.dir().join(name);
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn same_content(a: &Path, b: &Path) -> bool {
    QemuImg::new(std::env::temp_dir()).compare(&ImageLocation::Path(a.into()), &ImageLocation::Path(b.into())).unwrap()
}

fn assert_no_job(hv: &LibvirtHypervisor, name: &str) {
    assert_eq!(hv.current_job(name).unwrap().kind, JobKind::None, "a job is left on {name}");
}

fn source_path(d: &nasbak_libvirt::Disk) -> PathBuf {
    match &d.source {
        Some(DiskSource::File(p) | DiskSource::Block(p)) => p.clone(),
        other => panic!("unexpected source {other:?}"),
    }
}

#[test]
fn a_quiesced_push_backup_of_a_running_guest_equals_its_disks() {
    let hv = hv();
    check_versions(hv.versions().unwrap()).unwrap();
    let dom = DomainSpec::new("push")
        .disk(DiskSpec::qcow2(64).ext4_with_files(&[("hello.txt", b"known content")]))
        .disk(DiskSpec::raw(16))
        .disk(DiskSpec::cdrom())
        .agent(true)
        .running(true)
        .create();
    dom.wait_for_agent(Duration::from_secs(90));
    assert_eq!(hv.domain_state(dom.name()).unwrap(), DomainState::Running);
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let out = out_dir(&dom, "backup");
    let backup = PushBackup::for_domain(&domain, &out, |d| format!("{}.qcow2", d.target));
    assert_eq!(backup.targets.iter().map(|t| t.disk.as_str()).collect::<Vec<_>>(), ["vda", "vdb"]);
    assert_eq!(backup.excluded, ["hdc"], "the cdrom is skipped");
    let agent = GuestAgent::new(LibvirtAgentTransport::new(hv.lookup(dom.name()).unwrap()), Duration::from_secs(10));
    let tool = QemuImg::new(std::env::temp_dir());

    // The product's flow: freeze, start, thaw at once, wait.
    let (guard, outcome) = quiesce(&agent, QuiescePolicy::Required, None).unwrap();
    assert!(outcome.quiesced);
    assert_eq!(outcome.frozen_filesystems, 1);
    assert_eq!(agent.status().unwrap(), FreezeStatus::Frozen);
    let job = start_backup(&hv, dom.name(), &backup).unwrap();
    drop(guard);
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed, "thawed right after the start");
    let mut reports = 0;
    let summary = job.wait(JobOptions::default(), &CancelHandle::new(), &mut |_| reports += 1).unwrap();
    assert!(reports >= 1);
    assert!(summary.total > 0, "{summary:?}");
    assert_no_job(&hv, dom.name());
    for t in &backup.targets {
        let info = tool.info(&ImageLocation::Path(t.file.clone())).unwrap();
        assert_eq!(info[0].format, ImageFormat::Qcow2);
        assert_eq!(info[0].backing_file, None);
    }
    // The ext4 in the backup is clean without a journal replay (the freeze made it consistent)
    // and holds the file the guest had.
    let raw = out.join("vda.raw");
    let mut r = ConvertRequest::new(backup.targets[0].file.clone(), raw.clone(), ImageFormat::Raw);
    r.source_format = Some(ImageFormat::Qcow2);
    tool.convert(&r, Arc::new(|_| {})).unwrap();
    let fsck = ExternalCommand::new("e2fsck").args(["-f", "-n"]).arg(&raw).run_unchecked().unwrap();
    assert!(fsck.status.success(), "e2fsck: {} {}", fsck.stdout_text(), fsck.stderr_text());
    let cat = ExternalCommand::new("debugfs").args(["-R", "cat /hello.txt"]).arg(&raw).run().unwrap();
    assert_eq!(cat.stdout_text(), "known content");
    // The raw disk, which the guest never writes, equals its source.
    let vdb = &backup.targets[1];
    assert!(same_content(&source_path(domain.disk("vdb").unwrap()), &vdb.file));

    // Content equality for the mounted disk too: thawing rewrites the ext4 superblock, so here
    // the guest stays frozen until the comparison is done.
    let again = out_dir(&dom, "frozen");
    let backup = PushBackup::for_domain(&domain, &again, |d| format!("{}.qcow2", d.target));
    let (guard, _) = quiesce(&agent, QuiescePolicy::Required, None).unwrap();
    start_backup(&hv, dom.name(), &backup)
        .unwrap()
        .wait(JobOptions::default(), &CancelHandle::new(), &mut |_| {})
        .unwrap();
    for t in &backup.targets {
        let source = source_path(domain.disk(&t.disk).unwrap());
        assert!(same_content(&source, &t.file), "{} differs from {}", t.file.display(), source.display());
    }
    drop(guard);
    assert_no_job(&hv, dom.name());
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
}

#[test]
fn a_stopped_domain_is_backed_up_through_qemu_img() {
    let hv = hv();
    let dom = DomainSpec::new("stopped")
        .disk(DiskSpec::qcow2(32).ext4())
        .disk(DiskSpec::block(16))
        .disk(DiskSpec::cdrom())
        .create();
    assert_eq!(hv.domain_state(dom.name()).unwrap(), DomainState::ShutOff);
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let (chosen, skipped) = domain.backup_selection();
    assert_eq!(skipped.len(), 1);
    let out = out_dir(&dom, "backup");
    let tool = QemuImg::new(std::env::temp_dir());
    for disk in chosen {
        let source = source_path(disk);
        let file = out.join(format!("{}.qcow2", disk.target));
        let mut r = ConvertRequest::new(source.clone(), file.clone(), ImageFormat::Qcow2);
        r.source_format = Some(disk.format.as_deref().unwrap().parse().unwrap());
        tool.convert(&r, Arc::new(|_| {})).unwrap();
        assert!(same_content(&source, &file));
    }
}

#[test]
fn cancel_and_timeout_abort_the_job_and_leave_none_running() {
    let hv = hv();
    let dom = DomainSpec::new("abort").disk(DiskSpec::raw(768)).create();
    fill_pseudo_random(&dom.disks()[0].path, 768);
    dom.start();
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    // Cancelled right after the start.
    let backup = PushBackup::for_domain(&domain, &out_dir(&dom, "cancelled"), |d| format!("{}.qcow2", d.target));
    let cancel = CancelHandle::new();
    let job = start_backup(&hv, dom.name(), &backup).unwrap();
    cancel.cancel();
    let e = job.wait(JobOptions::default(), &cancel, &mut |_| {}).unwrap_err();
    assert!(matches!(e, JobError::Cancelled { .. }), "{e}");
    assert_no_job(&hv, dom.name());
    // A timeout does the same.
    let backup = PushBackup::for_domain(&domain, &out_dir(&dom, "timeout"), |d| format!("{}.qcow2", d.target));
    let options = JobOptions { timeout: Duration::from_millis(1), ..JobOptions::default() };
    let job = start_backup(&hv, dom.name(), &backup).unwrap();
    let e = job.wait(options, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, JobError::TimedOut { .. }), "{e}");
    assert_no_job(&hv, dom.name());
    // A second job while one runs is refused with a clear error, and the first is not disturbed.
    let backup = PushBackup::for_domain(&domain, &out_dir(&dom, "first"), |d| format!("{}.qcow2", d.target));
    let first = start_backup(&hv, dom.name(), &backup).unwrap();
    let running = PushBackup::parse(&hv.backup_xml(dom.name()).unwrap()).unwrap();
    assert_eq!(running.targets, backup.targets, "libvirt's view of the running job");
    let other = PushBackup::for_domain(&domain, &out_dir(&dom, "second"), |d| format!("{}.qcow2", d.target));
    let e = start_backup(&hv, dom.name(), &other).map(|_| ()).unwrap_err();
    assert!(matches!(e, JobError::Busy { is_backup: true, .. }), "{e}");
    drop(first); // dropping a started job aborts it
    assert_no_job(&hv, dom.name());
}

#[test]
fn a_target_qemu_cannot_write_gives_an_error_that_says_what_to_do() {
    let hv = hv();
    let dom = shared_agent_guest();
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let private = tempfile_dir_0700();
    let backup = PushBackup::for_domain(&domain, &private, |d| format!("{}.qcow2", d.target));
    let e = start_backup(&hv, dom.name(), &backup).map(|_| ()).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, JobError::BeginFailed { .. })
            && text.contains("Permission denied")
            && text.contains("libvirt-qemu"),
        "{text}"
    );
    assert_no_job(&hv, dom.name());
    let _ = fs::remove_dir_all(&private);
}

fn tempfile_dir_0700() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nasbak-private-{}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// Unmounts (lazily) what a test mounted, on every path out.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = ExternalCommand::new("umount").arg("-l").arg(p).run();
        }
    }
}

#[test]
fn a_target_mounted_after_the_vm_started_in_a_private_subtree_is_explained() {
    let hv = hv();
    let dom = DomainSpec::new("ns").disk(DiskSpec::raw(8)).create();
    // A private subtree, as on a host whose / is not shared: later mounts in it do not reach
    // the QEMU process's mount namespace.
    let private = out_dir(&dom, "private");
    let sub = private.join("repo");
    fs::create_dir_all(&sub).unwrap();
    let mut mounted = Unmount(Vec::new());
    ExternalCommand::new("mount").args(["--bind"]).arg(&private).arg(&private).run().unwrap();
    mounted.0.push(private.clone());
    ExternalCommand::new("mount").args(["--make-private"]).arg(&private).run().unwrap();
    dom.start();
    ExternalCommand::new("mount").args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"]).arg(&sub).run().unwrap();
    mounted.0.push(sub.clone());
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let backup = PushBackup::for_domain(&domain, &sub, |d| format!("{}.qcow2", d.target));
    let e = start_backup(&hv, dom.name(), &backup).map(|_| ()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("No such file or directory") && text.contains("mount namespace") && text.contains("make-rshared"),
        "{text}"
    );
    assert_no_job(&hv, dom.name());
    dom.destroy();
    drop(mounted);
}

#[test]
fn a_backup_with_a_checkpoint_leaves_a_checkpoint_that_can_be_deleted() {
    let hv = hv();
    let dom = DomainSpec::new("checkpoint").disk(DiskSpec::qcow2(16)).running(true).create();
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let mut backup = PushBackup::for_domain(&domain, &out_dir(&dom, "full"), |d| format!("{}.qcow2", d.target));
    backup.checkpoint = Some("nasbak-1".into());
    start_backup(&hv, dom.name(), &backup)
        .unwrap()
        .wait(JobOptions::default(), &CancelHandle::new(), &mut |_| {})
        .unwrap();
    assert_eq!(hv.checkpoints(dom.name()).unwrap(), ["nasbak-1"]);
    // (QEMU writes persistent bitmaps into the qcow2 only when it closes the image, so they are
    // not visible to `qemu-img info` while the guest runs.)
    hv.delete_checkpoint(dom.name(), "nasbak-1").unwrap();
    assert!(hv.checkpoints(dom.name()).unwrap().is_empty());
    assert!(hv.delete_checkpoint(dom.name(), "nasbak-1").unwrap_err().message.contains("nasbak-1"));
}

#[test]
fn an_incremental_push_job_rebased_onto_its_parent_gives_each_point_back() {
    let hv = hv();
    let tool = QemuImg::new(std::env::temp_dir());
    let dom = DomainSpec::new("incr").disk(DiskSpec::qcow2(32)).running(true).create();
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let backup = |dir: &str, from: Option<&str>, checkpoint: &str| {
        let mut b = PushBackup::for_domain(&domain, &out_dir(&dom, dir), |d| format!("{}.qcow2", d.target));
        b.checkpoint = Some(checkpoint.into());
        b.targets[0].incremental = from.map(str::to_owned);
        start_backup(&hv, dom.name(), &b)
            .unwrap()
            .wait(JobOptions::default(), &CancelHandle::new(), &mut |_| {})
            .unwrap();
        b.targets[0].file.clone()
    };
    dom.write_through_qemu(0, 0x11, "0", "1M");
    let full = backup("full", None, "c1");
    let point1 = dom.raw_copy(0, "point1");
    dom.write_through_qemu(0, 0x22, "4M", "2M");
    let inc = backup("inc1", Some("c1"), "c2");
    let point2 = dom.raw_copy(0, "point2");
    // libvirt names the live disk as the incremental's backing file: point it at the parent,
    // relative, so the chain resolves wherever the repository is mounted.
    let header = tool.info(&ImageLocation::Path(inc.clone())).unwrap();
    assert_eq!(header[0].backing_file.as_deref(), Some(dom.disks()[0].path.to_str().unwrap()), "{header:?}");
    tool.set_backing(&ImageLocation::Path(inc.clone()), "../full/vda.qcow2", &ImageFormat::Qcow2).unwrap();
    let chain = tool.info(&ImageLocation::Path(inc.clone())).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    // The incremental holds about the changed data only (2 MiB written).
    assert!(fs::metadata(&inc).unwrap().len() < 4 << 20, "{} bytes", fs::metadata(&inc).unwrap().len());
    assert!(same_content(&full, &point1), "the full is the first point");
    assert!(same_content(&inc, &point2), "the chain is the second point");
    // libvirt's record of the checkpoints lost (a redefined domain, another host) and brought
    // back from their definitions, oldest first, validated: the chain goes on.
    let xml: Vec<String> = ["c1", "c2"].iter().map(|c| hv.checkpoint_xml(dom.name(), c).unwrap()).collect();
    hv.forget_checkpoint(dom.name(), "c2").unwrap();
    hv.forget_checkpoint(dom.name(), "c1").unwrap();
    assert!(hv.checkpoints(dom.name()).unwrap().is_empty());
    for x in &xml {
        hv.redefine_checkpoint(dom.name(), x, true).unwrap();
    }
    let mut names = hv.checkpoints(dom.name()).unwrap();
    names.sort();
    assert_eq!(names, ["c1", "c2"]);
    dom.write_through_qemu(0, 0x33, "8M", "1M");
    let inc2 = backup("inc2", Some("c2"), "c3");
    tool.set_backing(&ImageLocation::Path(inc2.clone()), "../inc1/vda.qcow2", &ImageFormat::Qcow2).unwrap();
    let point3 = dom.raw_copy(0, "point3");
    assert!(same_content(&inc2, &point3), "the third point, through a redefined checkpoint");
    assert_no_job(&hv, dom.name());
}

/// A UEFI guest (OVMF under TCG, the lab kernel booted directly) with an emulated TPM 2.0: the
/// model finds its variable store and its TPM state where libvirt and swtpm really keep them,
/// both written by their first start (the firmware's variables, swtpm's permanent state).
#[test]
fn a_uefi_guests_variable_store_and_tpm_state_are_found_where_they_are() {
    let dom =
        DomainSpec::new("uefitpm").disk(DiskSpec::qcow2(16)).agent(true).uefi_with_tpm(true).running(true).create();
    dom.wait_for_agent(Duration::from_secs(180));
    let hv = hv();
    for xml in [hv.domain_xml(dom.name()).unwrap(), hv.inactive_xml(dom.name()).unwrap()] {
        let d = Domain::parse(&xml).unwrap();
        let nvram = d.nvram.as_ref().expect("the variable store");
        assert_eq!(Path::new(&nvram.path), dom.dir().join("nvram.fd"));
        assert_eq!(nvram.template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS_4M.fd"));
        let state = d.tpm_state_dir().expect("the TPM's state directory");
        assert!(state.join("tpm2-00.permall").is_file(), "swtpm's state in {}", state.display());
        assert_eq!(d.tpm.as_ref().unwrap().version, "2.0");
    }
    // The store was made from the template, and the firmware has written its variables since.
    let store = fs::read(dom.dir().join("nvram.fd")).unwrap();
    let template = fs::read("/usr/share/OVMF/OVMF_VARS_4M.fd").unwrap();
    assert_eq!(store.len(), template.len());
    assert_ne!(store, template, "the firmware wrote its variables on the first boot");
}
