//! The workflows' decisions and failure paths with mocked libvirt and qemu-img, on a `shared`
//! repository in a temporary directory (so nothing is mounted). The same behaviour runs for real
//! in the lab tests of this crate and of the CLI.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nasbak_agent::QuiescePolicy;
use nasbak_agent::fake::FakeAgent;
use nasbak_libvirt::{CancelHandle, DiskSource, DomainState, JobInfo, JobKind, LibvirtError, MockHypervisor};
use nasbak_process::CommandError;
use nasbak_qemu_img::{CheckReport, CheckVerdict, ImageError, ImageFormat, ImageInfo, ImageLocation, MockImageTool};
use nasbak_repo::{
    BackupRepository, Capacity, MockMounter, MountTimeouts, RepositoryKind, RepositoryMounts, StateKind,
};

use crate::engine::{Engine, MockAgentSource};
use crate::error::BackupError;

use crate::request::{BackupRequest, RestoreRequest, VolumeRestoreRequest};

/// Guest agents that answer (a fresh fake per call), and no thaw watchdog.
fn agents() -> MockAgentSource {
    let mut agents = MockAgentSource::new();
    agents.expect_agent_transport().returning(|_| Ok(FakeAgent::new(1)));
    agents.expect_watchdog_uri().returning(|| None);
    agents
}

type MockEngine = Engine<MockHypervisor, MockAgentSource, MockImageTool, MockMounter>;

const XML: &str = "<domain><name>vm1</name><devices>\
    <disk type='file' device='disk'><driver type='qcow2'/><source file='/v/root1.qcow2'/><target dev='vda' bus='virtio'/></disk>\
    <disk type='file' device='disk'><driver type='raw'/><source file='/v/data1.img'/><target dev='vdb' bus='virtio'/></disk>\
    </devices></domain>";

fn info(size: u64) -> Vec<ImageInfo> {
    let json = format!(r#"{{"filename":"x","format":"qcow2","virtual-size":{size},"actual-size":4096}}"#);
    nasbak_qemu_img::parse_info(&json).unwrap()
}

fn hypervisor(state: DomainState) -> MockHypervisor {
    hypervisor_of(state, XML.to_owned())
}

/// A hypervisor whose one VM is in `state` and defined as `xml`.
fn hypervisor_of(state: DomainState, xml: String) -> MockHypervisor {
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(move |_| Ok(state));
    let live = xml.clone();
    hv.expect_domain_xml().returning(move |_| Ok(live.clone()));
    hv.expect_inactive_xml().returning(move |_| Ok(xml.clone()));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    hv
}

/// A qemu-img whose convert writes a small file where it was asked to.
fn images() -> MockImageTool {
    let mut img = MockImageTool::new();
    img.expect_info().returning(|_| Ok(info(1 << 20)));
    img.expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    img.expect_add_bitmap().returning(|_, _| Ok(()));
    img.expect_remove_bitmap().returning(|_, _| Ok(()));
    img.expect_convert().returning(|r, progress| {
        progress(50.0);
        if let ImageLocation::Path(p) = &r.target {
            fs::write(p, b"image").unwrap();
        }
        progress(100.0);
        Ok(())
    });
    img
}

fn engine(hv: MockHypervisor, img: MockImageTool, dir: &Path) -> (MockEngine, BackupRepository) {
    let repo = dir.join("repo");
    fs::create_dir_all(&repo).unwrap();
    let r = BackupRepository::new("r", RepositoryKind::Shared, repo.to_str().unwrap(), "", None).unwrap();
    // A shared repository is never mounted: only probed and measured.
    let mut mounter = MockMounter::new();
    mounter.expect_mount().never();
    mounter.expect_probe().returning(|_, _| Ok(()));
    mounter.expect_capacity().returning(|_, _| Ok(Capacity { total: 1 << 40, used: 0, available: 1 << 40 }));
    let mounts = RepositoryMounts::new(mounter, dir.join("run"), MountTimeouts::default());
    let e = Engine::new(hv, agents(), img, mounts).with_agent_timeout(std::time::Duration::from_secs(1));
    (e.with_runtime_dir(dir.join("run")), r)
}

fn request(repo: &BackupRepository) -> BackupRequest {
    BackupRequest::new("vm1", repo.clone())
        .with_quiesce(QuiescePolicy::BestEffort)
        .with_timeout(std::time::Duration::from_secs(60))
        .with_schedule("vm1-daily")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_stopped_vm_backup_writes_files_then_the_manifest_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let mut seen = Vec::new();
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |p| seen.push(p.clone())).unwrap();
    let m = &out.manifest;
    assert_eq!(m.schedule.as_deref(), Some("vm1-daily"));
    assert_eq!(
        m.disks.iter().map(|d| d.file.as_str()).collect::<Vec<_>>(),
        ["root.root1.qcow2", "datadisk.data1.qcow2"]
    );
    let backup = dir.path().join("repo").join(&out.relative_dir);
    assert_eq!(entries(&backup), ["datadisk.data1.qcow2", "domain-config.xml", "manifest.json", "root.root1.qcow2"]);
    let converts: Vec<_> = seen.iter().filter(|p| p.phase == crate::Phase::Convert).collect();
    assert_eq!(converts.len(), 4, "two updates per disk, on the caller's thread: {seen:?}");
    assert_eq!((converts[1].disk.as_deref(), converts[1].done, converts[1].total), (Some("vda"), 1 << 20, 1 << 20));
    let sums = seen.iter().filter(|p| p.phase == crate::Phase::Checksum && p.done == p.total).count();
    assert_eq!(sums, 2, "each file's checksum told to its end: {seen:?}");
}

#[test]
fn a_failed_or_cancelled_copy_leaves_nothing() {
    for cancelled in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut img = MockImageTool::new();
        img.expect_info().returning(|_| Ok(info(1 << 20)));
        // The bitmap added for the next incremental goes again with the failed backup.
        img.expect_add_bitmap().times(1).returning(|_, _| Ok(()));
        img.expect_remove_bitmap().times(1).returning(|_, _| Ok(()));
        let cancel = CancelHandle::new();
        let trigger = cancel.clone();
        img.expect_convert().times(1).returning(move |r, _| {
            if let ImageLocation::Path(p) = &r.target {
                fs::write(p, b"half").unwrap();
            }
            if cancelled {
                trigger.cancel();
                return Err(ImageError::Command {
                    action: "convert",
                    source: CommandError::Cancelled { argv: "qemu-img convert".into() },
                });
            }
            Err(ImageError::Output { action: "convert", detail: "disk full".into() })
        });
        let (e, repo) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
        let err = e.backup(&request(&repo), &cancel, &mut |_| {}).unwrap_err();
        assert_eq!(matches!(err, BackupError::Cancelled), cancelled, "{err}");
        assert!(entries(&dir.path().join("repo/vm1")).is_empty(), "no partial directory, no lock");
    }
}

#[test]
fn restore_refuses_a_running_vm_and_a_mismatch_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let id = out.manifest.id.clone();
    // Running: refused, nothing converted.
    let mut img = MockImageTool::new();
    img.expect_convert().never();
    let (running, repo) = engine(hypervisor(DomainState::Running), img, dir.path());
    let err = running
        .restore(&RestoreRequest::new(repo.clone(), "vm1", id.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, BackupError::NotShutOff { .. }), "{err}");
    // The VM's vdb is now another volume: refused, nothing converted.
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|_| Ok(DomainState::ShutOff));
    hv.expect_domain_xml().returning(|_| Ok(XML.replace("data1.img", "data2.img")));
    hv.expect_inactive_xml().returning(|_| Ok(XML.replace("data1.img", "data2.img")));
    let mut img = MockImageTool::new();
    img.expect_convert().never();
    let (moved, repo) = engine(hv, img, dir.path());
    let err = moved
        .restore(&RestoreRequest::new(repo.clone(), "vm1", id.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("vdb of the VM is volume data2"), "{err}");
}

/// A shut-off UEFI VM with an emulated TPM, its volume, NVRAM and TPM state under `dir`.
fn uefi_hypervisor(dir: &Path) -> MockHypervisor {
    let xml = format!(
        "<domain><name>vm1</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os><type>hvm</type>\
         <nvram>{0}/vm1_VARS.fd</nvram></os><devices>\
         <disk type='file' device='disk'><driver type='qcow2'/><source file='{0}/root1.qcow2'/><target dev='vda'/></disk>\
         <tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='dir' path='{0}/tpm2'/></backend></tpm>\
         </devices></domain>",
        dir.display()
    );
    hypervisor_of(DomainState::ShutOff, xml)
}

#[test]
fn a_uefi_vms_nvram_and_tpm_state_go_beside_its_disks_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm");
    fs::create_dir_all(vm.join("tpm2")).unwrap();
    fs::write(vm.join("root1.qcow2"), b"volume").unwrap();
    fs::write(vm.join("vm1_VARS.fd"), b"the variables").unwrap();
    fs::write(vm.join("tpm2").join("tpm2-00.permall"), b"the TPM's seeds").unwrap();
    let (e, repo) = engine(uefi_hypervisor(&vm), images(), dir.path());
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let m = &out.manifest;
    let kept: Vec<(StateKind, &str, u64)> = m.state.iter().map(|s| (s.kind, s.file.as_str(), s.size)).collect();
    assert_eq!(kept, [(StateKind::Nvram, "state.nvram", 13), (StateKind::Tpm, "state.tpm.tpm2-00.permall", 15)]);
    assert_eq!(m.state_note, None);
    let backup = dir.path().join("repo").join(&out.relative_dir);
    assert_eq!(fs::read(backup.join("state.nvram")).unwrap(), b"the variables");
    // Both lost, then restored with the disk.
    fs::remove_file(vm.join("vm1_VARS.fd")).unwrap();
    fs::remove_dir_all(vm.join("tpm2")).unwrap();
    let restored =
        e.restore(&RestoreRequest::new(repo.clone(), "vm1", m.id.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(restored.state.len(), 2, "{restored:?}");
    assert_eq!(fs::read(vm.join("vm1_VARS.fd")).unwrap(), b"the variables");
    assert_eq!(fs::read(vm.join("tpm2").join("tpm2-00.permall")).unwrap(), b"the TPM's seeds");
    // A state file changed on the repository: the restore refuses before the volume changes.
    fs::write(backup.join("state.nvram"), b"the variablez").unwrap();
    fs::write(vm.join("root1.qcow2"), b"changed since").unwrap();
    let err = e
        .restore(&RestoreRequest::new(repo.clone(), "vm1", m.id.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    assert!(crate::chain(&err).contains("state.nvram is damaged"), "{}", crate::chain(&err));
    assert_eq!(fs::read(vm.join("root1.qcow2")).unwrap(), b"changed since", "nothing written");
    // A VM without either: no state, and nothing said about it.
    let (plain, _) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let m = plain.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap().manifest;
    assert!(m.state.is_empty() && m.state_note.is_none() && !m.to_json().contains("state"));
}

#[test]
fn restore_volume_checks_everything_first_and_attaches_as_the_next_free_target() {
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let id = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap().manifest.id;
    let volume = |repo: &BackupRepository, to: ImageLocation, format: ImageFormat, attach: Option<&str>| {
        let r = VolumeRestoreRequest::new(repo.clone(), "vm1", id.clone(), "vdb", to).with_format(format);
        match attach {
            Some(vm) => r.attach_to(vm),
            None => r,
        }
    };
    // RBD in qcow2 and an existing file are refused before anything is read or written.
    let mut img = MockImageTool::new();
    img.expect_convert().never();
    img.expect_check().never();
    let (strict, repo) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let rbd: ImageLocation = "rbd:pool/img".parse().unwrap();
    let err = strict.restore_volume(&volume(&repo, rbd, ImageFormat::Qcow2, None), &CancelHandle::new(), &mut |_| {});
    assert!(matches!(err, Err(BackupError::Unsupported { .. })));
    let existing = dir.path().join("exists.qcow2");
    fs::write(&existing, b"keep me").unwrap();
    let err = strict.restore_volume(
        &volume(&repo, ImageLocation::Path(existing.clone()), ImageFormat::Qcow2, None),
        &CancelHandle::new(),
        &mut |_| {},
    );
    assert!(matches!(err, Err(BackupError::Exists { .. })));
    assert_eq!(fs::read(&existing).unwrap(), b"keep me");
    // Attached live to a running VM that has vda and vdb: as vdc, virtio, both live and config.
    let mut hv = hypervisor(DomainState::Running);
    hv.expect_attach_disk()
        .withf(|vm, xml, live| {
            vm == "vm2" && *live && xml.contains("dev='vdc' bus='virtio'") && xml.contains("type='qcow2'")
        })
        .times(1)
        .returning(|_, _, _| Ok(()));
    let (e, repo) = engine(hv, images(), dir.path());
    let to = dir.path().join("new.qcow2");
    let v = e
        .restore_volume(
            &volume(&repo, ImageLocation::Path(to.clone()), ImageFormat::Qcow2, Some("vm2")),
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap();
    let attached = v.attached.unwrap();
    assert_eq!((attached.vm.as_str(), attached.target.as_str()), ("vm2", "vdc"));
    assert!(to.exists() && !dir.path().join("new.qcow2.nasbak-partial").exists());
    // An attach that fails says the volume is there.
    let mut hv = hypervisor(DomainState::Running);
    hv.expect_attach_disk().returning(|_, _, _| Err(LibvirtError::new("no hotplug")));
    let (e, repo) = engine(hv, images(), dir.path());
    let to = dir.path().join("other.qcow2");
    let err = e
        .restore_volume(
            &volume(&repo, ImageLocation::Path(to.clone()), ImageFormat::Qcow2, Some("vm2")),
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("it is complete and stays there") && to.exists(), "{err}");
}

const RBD_XML: &str = "<domain><name>vm1</name><devices>\
    <disk type='network' device='disk'><driver type='raw'/>\
    <source protocol='rbd' name='vms/vm1-root'><host name='mon1' port='6789'/><host name='mon2'/></source>\
    <auth username='backup'><secret type='ceph' usage='client.backup'/></auth>\
    <target dev='vda' bus='virtio'/></disk></devices></domain>";

#[test]
fn rbd_disks_are_read_from_snapshots_built_on_by_their_diff_and_restored_through_qemu_img() {
    use nasbak_qemu_img::{RbdImageFacts, RbdSnapshot};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let mut hv = hypervisor(DomainState::ShutOff);
    hv.checkpoint();
    hv.expect_domain_state().returning(|_| Ok(DomainState::ShutOff));
    hv.expect_domain_xml().returning(|_| Ok(RBD_XML.to_owned()));
    hv.expect_inactive_xml().returning(|_| Ok(RBD_XML.to_owned()));
    // The key comes from the libvirt secret the disk's <auth> names.
    hv.expect_secret_value()
        .withf(|a| a.secret_usage.as_deref() == Some("client.backup") && a.secret_type.as_deref() == Some("ceph"))
        .returning(|_| Ok(nasbak_process::Secret::new("AQBkey==")));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    let mut img = images();
    img.checkpoint();
    img.expect_info().returning(|_| Ok(info(1 << 20)));
    img.expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    // The image's snapshots, as the mock cluster keeps them.
    let snaps = Arc::new(Mutex::new(Vec::<RbdSnapshot>::new()));
    let listed = Arc::clone(&snaps);
    img.expect_rbd_image().returning(move |_| {
        Ok(RbdImageFacts { id: "img1".into(), size: 1 << 20, snapshots: listed.lock().unwrap().clone() })
    });
    let taken = Arc::clone(&snaps);
    img.expect_rbd_snapshot_create()
        .withf(|s, name| s.image == "vm1-root" && s.snapshot.is_none() && name.starts_with("nasbak-"))
        .times(2)
        .returning(move |_, name| {
            let mut v = taken.lock().unwrap();
            let id = v.len() as u64 + 10;
            v.push(RbdSnapshot { id, name: name.into(), size: 1 << 20 });
            Ok(id)
        });
    let removed = Arc::clone(&snaps);
    img.expect_rbd_snapshot_remove().returning(move |_, name| {
        removed.lock().unwrap().retain(|s| s.name != name);
        Ok(())
    });
    // Backup: the source is the RBD image's new snapshot with the domain's monitors and client id.
    img.expect_convert()
        .withf(|r, _| match &r.source {
            ImageLocation::Rbd(s) => {
                s.pool == "vms"
                    && s.image == "vm1-root"
                    && s.snapshot.as_deref().is_some_and(|n| n.starts_with("nasbak-"))
                    && s.mon_hosts == ["mon1:6789", "mon2"]
                    && s.id.as_deref() == Some("backup")
                    && matches!(&s.auth, nasbak_qemu_img::RbdAuth::Key(k) if k.expose() == "AQBkey==")
                    && r.source_format == Some(ImageFormat::Raw)
            }
            _ => false,
        })
        .times(1)
        .returning(|r, _| {
            if let ImageLocation::Path(p) = &r.target {
                fs::write(p, b"image").unwrap();
            }
            Ok(())
        });
    // Restore: raw, into the existing image (-n).
    img.expect_convert()
        .withf(|r, _| {
            matches!(&r.target, ImageLocation::Rbd(s) if s.image == "vm1-root"
                && matches!(&s.auth, nasbak_qemu_img::RbdAuth::Key(_)))
                && r.target_exists
                && r.target_format == ImageFormat::Raw
        })
        .times(1)
        .returning(|_, _| Ok(()));
    // The second backup: what changed since the first's snapshot, into a file backed by the
    // first's.
    img.expect_create_protected().times(1).returning(|p, _, backing, _| {
        assert!(backing.as_deref().is_some_and(|b| b.starts_with("../")), "{backing:?}");
        fs::write(p, b"").unwrap();
        Ok(())
    });
    img.expect_copy_rbd_diff()
        .withf(|c, _| c.from.starts_with("nasbak-") && c.image.snapshot.as_deref().is_some_and(|s| *s != c.from))
        .times(1)
        .returning(|c, _| {
            fs::write(&c.target, b"changes").unwrap();
            Ok(7)
        });
    img.expect_set_backing().returning(|_, _, _| Ok(()));
    let (e, repo) = engine(hv, img, dir.path());
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(out.manifest.disks[0].volume, "vm1-root");
    let first = out.manifest.disks[0].rbd_snapshot.clone().expect("the snapshot recorded");
    assert_eq!(
        (first.name.as_str(), first.id, first.image_id.as_str()),
        (&*format!("nasbak-{}", out.manifest.id), 10, "img1")
    );
    let second = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(second.manifest.mode, nasbak_repo::BackupMode::Incremental, "{:?}", second.manifest);
    assert_eq!(second.manifest.parent.as_deref(), Some(out.manifest.id.as_str()));
    assert_eq!(second.manifest.disks[0].rbd_snapshot.as_ref().map(|r| r.id), Some(11));
    // The first's snapshot went once the second was in place; the second's stays.
    let left: Vec<String> = snaps.lock().unwrap().iter().map(|s| s.name.clone()).collect();
    assert_eq!(left, [format!("nasbak-{}", second.manifest.id)]);
    assert!(second.cleaned.iter().any(|c| c.contains("removed the RBD snapshot")), "{:?}", second.cleaned);
    let restored = e
        .restore(&RestoreRequest::new(repo.clone(), "vm1", out.manifest.id.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap();
    let restored = restored.restored;
    assert!(restored[0].location.starts_with("rbd:vms/vm1-root"), "{restored:?}");
    assert_eq!(restored[0].format, "raw");
}

#[test]
fn a_restore_that_fails_after_changing_volumes_says_which_changed() {
    const RAW2: &str = "<domain><name>vm1</name><devices>\
        <disk type='file' device='disk'><driver type='raw'/><source file='/v/a.img'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='disk'><driver type='raw'/><source file='/v/b.img'/><target dev='vdb' bus='virtio'/></disk>\
        <disk type='file' device='disk'><driver type='raw'/><source file='/v/c.img'/><target dev='vdc' bus='virtio'/></disk>\
        </devices></domain>";
    let dir = tempfile::tempdir().unwrap();
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|_| Ok(DomainState::ShutOff));
    hv.expect_domain_xml().returning(|_| Ok(RAW2.to_owned()));
    hv.expect_inactive_xml().returning(|_| Ok(RAW2.to_owned()));
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    let mut img = images();
    img.checkpoint();
    img.expect_info().returning(|_| Ok(info(1 << 20)));
    img.expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    // Backup writes the files; restore writes vda in place and fails on vdb.
    img.expect_convert().returning(|r, _| match &r.target {
        ImageLocation::Path(p) if p.starts_with("/v") && p.ends_with("b.img") => {
            Err(ImageError::Output { action: "convert", detail: "No space left on device".into() })
        }
        ImageLocation::Path(p) if p.starts_with("/v") => Ok(()),
        ImageLocation::Path(p) => {
            fs::write(p, b"image").unwrap();
            Ok(())
        }
        ImageLocation::Rbd(_) | ImageLocation::Stored(_) => unreachable!(),
    });
    let (e, repo) = engine(hv, img, dir.path());
    let b = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let err = e
        .restore(&RestoreRequest::new(repo.clone(), "vm1", b.manifest.id.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_err();
    match &err {
        BackupError::RestoreIncomplete { restored, partly_written, untouched, .. } => {
            assert_eq!(restored, &["vda"]);
            assert_eq!(partly_written.as_deref(), Some("vdb"));
            assert_eq!(untouched, &["vdc"]);
        }
        other => panic!("{other}"),
    }
    let text = crate::error::chain(&err);
    assert!(text.contains("restored vda; partly written (restore again): vdb; unchanged: vdc"), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
}

#[test]
fn errors_say_their_case_and_the_step_that_failed() {
    use crate::error::{ErrorKind, Step};
    let dir = tempfile::tempdir().unwrap();
    // No such domain: found while reading the VM.
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|d| Err(LibvirtError::no_such_domain(d)));
    let (e, repo) = engine(hv, MockImageTool::new(), dir.path());
    let err = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!((err.kind(), err.step()), (ErrorKind::NoSuchDomain, Some(Step::Inspect)), "{err}");
    assert!(crate::error::chain(&err).contains("reading the VM failed: libvirt: Domain not found"), "{err}");
    // A copy that fails: the step is the copy, the cause is kept.
    let mut img = MockImageTool::new();
    img.expect_info().returning(|_| Ok(info(1 << 20)));
    img.expect_add_bitmap().returning(|_, _| Ok(()));
    img.expect_remove_bitmap().returning(|_, _| Ok(()));
    img.expect_convert().returning(|_, _| Err(ImageError::Output { action: "convert", detail: "disk full".into() }));
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let err = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!((err.kind(), err.step()), (ErrorKind::Other, Some(Step::Convert)), "{err}");
    assert!(crate::error::chain(&err).contains("disk full"), "{err}");
    // No space: the step is the space check.
    let mut img = MockImageTool::new();
    let huge = r#"{"filename":"x","format":"qcow2","virtual-size":1,"actual-size":9007199254740992}"#;
    img.expect_info().returning(move |_| Ok(nasbak_qemu_img::parse_info(huge).unwrap()));
    img.expect_convert().never();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let err = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!((err.kind(), err.step()), (ErrorKind::NoSpace, Some(Step::Space)), "{err}");
    // A running VM is not restored into; no message names a command of a tool.
    let id = {
        let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
        e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap().manifest.id
    };
    let (e, repo) = engine(hypervisor(DomainState::Running), images(), dir.path());
    let err = e.restore(&RestoreRequest::new(repo, "vm1", id), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DomainRunning);
    assert!(!err.to_string().contains("virsh") && !err.to_string().contains('`'), "{err}");
}

#[test]
fn the_clock_decides_backup_ids_without_sleeping() {
    use crate::clock::ManualClock;
    let dir = tempfile::tempdir().unwrap();
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T02:30:00Z").unwrap().to_utc();
    let clock = ManualClock::new(t);
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let e = e.with_clock(clock.clone());
    // Two backups in one second: the second id is that second's -2.
    let a = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let b = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!((a.manifest.id.as_str(), b.manifest.id.as_str()), ("2026.11.27.02.30.00", "2026.11.27.02.30.00-2"));
    assert_eq!((a.manifest.started, a.manifest.finished), (t, t));
    // Another repository in that second: its id (and so its checkpoint's and bitmaps' names on
    // the VM) follows the last one this host gave the VM, not only the ids in that repository.
    let other_root = dir.path().join("other");
    fs::create_dir_all(&other_root).unwrap();
    let other = BackupRepository::new("o", RepositoryKind::Shared, other_root.to_str().unwrap(), "", None).unwrap();
    let c = e.backup(&request(&other), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(c.manifest.id.as_str(), "2026.11.27.02.30.00-3");
}

/// Makes `second` (in `dir`'s repository) into an incremental on `first` for its first disk, as
/// a running VM's backup is; returns its manifest's path.
fn make_incremental(dir: &Path, first: &crate::BackupOutcome, second: &crate::BackupOutcome) -> std::path::PathBuf {
    use nasbak_repo::{BackupMode, Manifest, backing_path};
    let path = dir.join("repo").join(&second.relative_dir).join("manifest.json");
    let mut m = Manifest::from_json(&fs::read_to_string(&path).unwrap()).unwrap();
    m.mode = BackupMode::Incremental;
    m.parent = Some(first.manifest.id.clone());
    m.disks[0].mode = BackupMode::Incremental;
    m.disks[0].backing = Some(backing_path(&first.manifest.id.parse().unwrap(), &first.manifest.disks[0].file));
    m.version = m.required_version();
    fs::write(&path, m.to_json()).unwrap();
    path
}

#[test]
fn an_incremental_backup_is_restored_through_its_chain_and_a_broken_chain_is_refused() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let first = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let second = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    // The second made into an incremental on the first (vda), as a running VM's backup is.
    make_incremental(dir.path(), &first, &second);
    let converted = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&converted);
    let mut img = MockImageTool::new();
    img.expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    // Plain files: the chain's files copied beside the target as the repository lays them out,
    // the incremental committed into the full's copy, which becomes the volume.
    img.expect_convert().never();
    img.expect_commit().returning(move |top, base, _, _| {
        seen.lock().unwrap().push((top.to_owned(), base.to_owned(), fs::read(top).unwrap()));
        Ok(())
    });
    let (strict, repo) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let to = dir.path().join("restored.qcow2");
    let request = VolumeRestoreRequest::new(
        repo.clone(),
        "vm1",
        second.manifest.id.clone(),
        "vda",
        ImageLocation::Path(to.clone()),
    );
    strict.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
    let calls = converted.lock().unwrap().clone();
    let (top, base, top_bytes) = &calls[0];
    let file = |m: &crate::BackupOutcome| dir.path().join("repo").join(&m.relative_dir).join(&m.manifest.disks[0].file);
    assert!(top.ends_with(format!("{}/{}", second.manifest.id, second.manifest.disks[0].file)), "{calls:?}");
    assert!(base.ends_with(format!("{}/{}", first.manifest.id, first.manifest.disks[0].file)), "{calls:?}");
    assert_eq!(top.parent().unwrap().parent(), base.parent().unwrap().parent(), "one workspace");
    assert_eq!(*top_bytes, fs::read(file(&second)).unwrap(), "the incremental's copy");
    assert_eq!(fs::read(&to).unwrap(), fs::read(file(&first)).unwrap(), "the full's copy, committed into");
    assert!(!top.exists() && entries(dir.path()).iter().all(|f| !f.contains("nasbak-restore")), "nothing left");
    // The incremental fails qemu-img check (while the files are copied): said, never committed,
    // nothing left.
    let mut img = MockImageTool::new();
    let bad = second.manifest.disks[0].file.clone();
    let bad_id = second.manifest.id.clone();
    img.expect_check().returning(move |at, _| {
        let corrupt = at.to_string().contains(&bad_id) && at.to_string().ends_with(&bad);
        let verdict = if corrupt { CheckVerdict::Corrupt } else { CheckVerdict::Clean };
        Ok(CheckReport { verdict, corruptions: u64::from(corrupt), leaks: 0, check_errors: 0 })
    });
    img.expect_commit().never();
    let (failing, _) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let to = dir.path().join("failed.qcow2");
    let request = VolumeRestoreRequest::new(
        repo.clone(),
        "vm1",
        second.manifest.id.clone(),
        "vda",
        ImageLocation::Path(to.clone()),
    );
    let err = failing.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    let text = crate::chain(&err);
    assert!(err.kind() == crate::ErrorKind::CorruptFile && text.contains(&second.manifest.disks[0].file), "{text}");
    assert!(!to.exists() && entries(dir.path()).iter().all(|f| !f.contains("nasbak-restore")), "nothing left");
    // Its parent gone: the chain is broken, the restore refused before anything is written.
    fs::remove_dir_all(dir.path().join("repo").join(&first.relative_dir)).unwrap();
    converted.lock().unwrap().clear();
    let to = ImageLocation::Path(dir.path().join("again.qcow2"));
    let request = VolumeRestoreRequest::new(repo, "vm1", second.manifest.id.clone(), "vda", to);
    let err = strict.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, BackupError::DamagedBackup { .. }) && err.to_string().contains("chain is broken"), "{err}");
    assert!(converted.lock().unwrap().is_empty());
}

#[test]
fn prune_merges_a_kept_incremental_and_keeps_its_chain_when_the_merge_fails() {
    use nasbak_repo::{BackupMode, Manifest, RetentionPolicy};
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let first = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let second = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let path = make_incremental(dir.path(), &first, &second);
    let keep = RetentionPolicy::keep_last(1);
    let ids = |e: &MockEngine| -> Vec<String> {
        e.catalog().list(&repo, Some("vm1")).unwrap().into_iter().map(|b| b.id).collect()
    };

    // The parent's file fails qemu-img check: the merge is refused, the chain kept, said so.
    let first_file = first.manifest.disks[0].file.clone();
    let mut img = MockImageTool::new();
    img.expect_check().returning(move |at, _| {
        let bad = at.to_string().ends_with(&first_file) && !at.to_string().contains("merging");
        let verdict = if bad { CheckVerdict::Corrupt } else { CheckVerdict::Clean };
        Ok(CheckReport { verdict, corruptions: u64::from(bad), leaks: 0, check_errors: 0 })
    });
    img.expect_convert().never();
    let (strict, _) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let report = strict.catalog().prune(&repo, "vm1", Some(&keep), &Default::default(), false).unwrap();
    assert!(report.decisions.iter().all(|d| d.keep && d.merge_over.is_none()), "{report:?}");
    assert!(report.decisions[0].reason.contains("merging it failed"), "{report:?}");
    assert!(report.decisions[1].reason.contains("builds on it"), "{report:?}");
    assert_eq!(ids(&strict).len(), 2);

    // A clean chain: merged into a self-contained backup, then the parent goes.
    let report = e.catalog().prune(&repo, "vm1", Some(&keep), &Default::default(), false).unwrap();
    assert_eq!(report.decisions[0].merge_over.as_deref(), Some(first.manifest.id.as_str()), "{report:?}");
    assert_eq!(ids(&e), std::slice::from_ref(&second.manifest.id));
    let m = Manifest::from_json(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((m.mode, m.parent, m.version), (BackupMode::Full, None, 1));
    assert_eq!((m.disks[0].mode, m.disks[0].backing.as_deref()), (BackupMode::Full, None));
    let entries: Vec<String> = entries(&dir.path().join("repo").join(&second.relative_dir));
    assert!(entries.iter().all(|f| !f.ends_with(".merging")), "{entries:?}");
}

#[test]
fn a_shut_off_vms_incremental_copy_that_fails_becomes_a_full_with_the_reason() {
    use nasbak_repo::BackupMode;
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let first = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let bitmap = first.manifest.checkpoint.clone().expect("a shut-off VM's qcow2 disk starts a chain").name;
    // The image now carries the first backup's bitmap; the offline copy fails.
    let mut img = images_with_bitmap(Arc::new(Mutex::new(bitmap)));
    img.expect_copy_dirty().times(1).returning(|_, _| {
        Err(ImageError::Daemon { action: "copying a bitmap's dirty clusters", detail: "no daemon here".into() })
    });
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let second = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let m = &second.manifest;
    assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Full, None), "{m:?}");
    let reason = m.full_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("vda: its incremental copy failed") && reason.contains("no daemon here"), "{reason}");
    assert!(m.disks.iter().all(|d| d.mode == BackupMode::Full && d.backing.is_none()));
}

/// [`images`], whose images carry the persistent bitmap named in `bitmap`.
fn images_with_bitmap(bitmap: std::sync::Arc<std::sync::Mutex<String>>) -> MockImageTool {
    let mut img = MockImageTool::new();
    img.expect_info().returning(move |_| {
        let name = bitmap.lock().unwrap().clone();
        let json = format!(
            r#"{{"filename":"x","format":"qcow2","virtual-size":1048576,"actual-size":4096,
            "format-specific":{{"type":"qcow2","data":{{"bitmaps":[{{"name":"{name}","granularity":65536,"flags":["auto"]}}]}}}}}}"#
        );
        Ok(nasbak_qemu_img::parse_info(&json).unwrap())
    });
    img.expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    img.expect_add_bitmap().returning(|_, _| Ok(()));
    img.expect_remove_bitmap().returning(|_, _| Ok(()));
    img.expect_convert().returning(|r, _| {
        if let ImageLocation::Path(p) = &r.target {
            fs::write(p, b"image").unwrap();
        }
        Ok(())
    });
    img
}

#[test]
fn a_mount_that_fails_half_way_leaves_nothing_and_says_which_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let mut img = images();
    let exported = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = exported.clone();
    img.expect_export_read_only().returning(move |kind, image, format, file, hold| {
        assert_eq!(kind, nasbak_qemu_img::ExportKind::Fuse, "a mount shows files");
        assert_eq!(format, &ImageFormat::Qcow2);
        assert!(hold.is_none(), "a shared repository is not mounted by nasbak: nothing to hold");
        seen.lock().unwrap().push(image.file_name().unwrap().to_string_lossy().into_owned());
        if image.ends_with("datadisk.data1.qcow2") {
            return Err(nasbak_qemu_img::ImageError::Daemon {
                action: "exporting an image read-only",
                detail: "no".into(),
            });
        }
        fs::write(file, b"").unwrap();
        Ok(nasbak_qemu_img::ReadOnlyExport { file: file.to_owned(), pid: 0 })
    });
    let (e, _) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    let target = dir.path().join("browse");
    let request = crate::MountRequest::new(repo.clone(), "vm1", &out.manifest.id, &target);
    let err = e.catalog().mount(&request, &CancelHandle::new()).unwrap_err();
    assert_eq!(err.step(), Some(crate::Step::Export { disk: "vdb".into() }), "{err}");
    assert_eq!(*exported.lock().unwrap(), ["root.root1.qcow2", "datadisk.data1.qcow2"]);
    assert!(!target.exists(), "the directory it created, and everything in it, is gone");
    // Only the disk asked for; a check that fails (while the export starts) leaves nothing.
    let mut img = MockImageTool::new();
    img.expect_check().returning(|_, _| {
        Ok(CheckReport { verdict: CheckVerdict::Corrupt, corruptions: 1, leaks: 0, check_errors: 0 })
    });
    img.expect_export_read_only().times(..=1).returning(|_, _, _, file, _| {
        fs::write(file, b"").unwrap();
        Ok(nasbak_qemu_img::ReadOnlyExport { file: file.to_owned(), pid: 0 })
    });
    let (e, _) = engine(hypervisor(DomainState::ShutOff), img, dir.path());
    fs::create_dir(&target).unwrap();
    let err = e.catalog().mount(&request.clone().only_disk("vdb"), &CancelHandle::new()).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::CorruptFile, "{err}");
    assert!(err.to_string().contains("checking the backup"), "{err}");
    assert_eq!(entries(&target), Vec::<String>::new(), "the user's directory stays, empty");
}

/// An instant restore of `vm1`'s backup `id` working in `work`.
fn instant_request(repo: &BackupRepository, id: &str, work: &Path) -> crate::InstantRestoreRequest {
    crate::InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), "vm1", id)).with_work_dir(work)
}

#[test]
fn an_instant_restore_that_cannot_start_the_vm_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    let mut hv = hypervisor(DomainState::ShutOff);
    hv.expect_inactive_xml().returning(|_| Ok(XML.to_owned()));
    hv.expect_start_with_xml().times(1).returning(|xml| {
        assert!(xml.contains("vda.overlay.qcow2") && xml.contains("vdb.overlay.qcow2"), "{xml}");
        assert!(!xml.contains("/v/root1.qcow2"), "{xml}");
        Err(LibvirtError::new("Cannot access storage file"))
    });
    hv.expect_block_copy().never();
    hv.expect_destroy().never();
    let mut img = images();
    img.expect_export_read_only().times(2).returning(|kind, _, format, file, _| {
        assert_eq!(kind, nasbak_qemu_img::ExportKind::Nbd, "QEMU reads the backup through NBD");
        assert_eq!(format, &ImageFormat::Qcow2);
        Ok(nasbak_qemu_img::ReadOnlyExport { file: file.to_owned(), pid: 0 })
    });
    img.expect_create().never();
    img.expect_create_overlay().times(2).returning(|at, _, backing, format, key| {
        assert!(backing.starts_with("nbd+unix:///image?socket=/") && backing.contains("/run/nbd/"), "{backing}");
        assert_eq!(format, &ImageFormat::Raw);
        assert!(key.is_none(), "a plain volume's overlay is plain");
        fs::write(at, b"").unwrap();
        Ok(())
    });
    let (e, _) = engine(hv, img, dir.path());
    let work = dir.path().join("instant");
    let instant = instant_request(&repo, &out.manifest.id, &work);
    let err = e.instant_restore(&instant, &CancelHandle::new()).unwrap_err();
    assert_eq!(err.step(), Some(crate::Step::Start), "{err}");
    assert_eq!(entries(&work), Vec::<String>::new(), "overlays, exports and state removed");
    let vm_dir = dir.path().join("repo/vm1");
    assert!(!entries(&vm_dir).iter().any(|f| f.starts_with(crate::RESTORING_MARK)), "no volume was touched");
    // A running VM is refused before anything is made.
    let mut hv = hypervisor(DomainState::Running);
    hv.expect_inactive_xml().returning(|_| Ok(XML.to_owned()));
    hv.expect_start_with_xml().never();
    let (e, _) = engine(hv, MockImageTool::new(), dir.path());
    let err = e.instant_restore(&instant, &CancelHandle::new()).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::DomainRunning, "{err}");
}

#[test]
fn an_encrypted_volume_runs_on_an_encrypted_overlay_and_is_never_written_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (e, repo) = engine(hypervisor(DomainState::ShutOff), images(), dir.path());
    let out = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap();
    // The VM's vda is now a LUKS qcow2 whose passphrase is a libvirt secret.
    let secret = "6c2e5a8f-1d3b-4c7e-9a0f-2b4d6e8f0a1c";
    let encrypted = XML.replace(
        "<source file='/v/root1.qcow2'/>",
        &format!("<source file='/v/root1.qcow2'><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption></source>"),
    );
    let mut hv = hypervisor_of(DomainState::ShutOff, encrypted.clone());
    hv.expect_secret_value()
        .withf(move |a| a.secret_uuid.as_deref() == Some(secret) && a.secret_type.as_deref() == Some("passphrase"))
        .times(1)
        .returning(|_| Ok(nasbak_process::Secret::new("the volume's passphrase")));
    hv.expect_start_with_xml().times(1).returning(move |xml| {
        // vda runs on its overlay, which QEMU opens with the volume's secret; vdb stays plain.
        let d = nasbak_libvirt::Domain::parse(xml).unwrap();
        let vda = d.disks.iter().find(|d| d.target == "vda").unwrap();
        assert!(matches!(&vda.source, Some(DiskSource::File(p)) if p.ends_with("vda.overlay.qcow2")), "{xml}");
        assert_eq!(vda.encryption.as_ref().and_then(|e| e.secret_uuid.as_deref()), Some(secret), "{xml}");
        assert_eq!(xml.matches("<encryption").count(), 1, "{xml}");
        Err(LibvirtError::new("Cannot access storage file"))
    });
    hv.expect_block_copy().never();
    let mut img = images();
    img.expect_export_read_only()
        .times(2)
        .returning(|_, _, _, file, _| Ok(nasbak_qemu_img::ReadOnlyExport { file: file.to_owned(), pid: 0 }));
    img.expect_create().never();
    let keys = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = keys.clone();
    img.expect_create_overlay().times(2).returning(move |at, _, _, _, key| {
        // The key is a 0600 file holding the passphrase, there while the overlay is made.
        let held = key.map(|k| {
            assert_eq!(fs::metadata(k).unwrap().permissions().mode() & 0o777, 0o600);
            fs::read_to_string(k).unwrap()
        });
        seen.lock().unwrap().push((at.file_name().unwrap().to_string_lossy().into_owned(), held));
        fs::write(at, b"").unwrap();
        Ok(())
    });
    let (e, _) = engine(hv, img, dir.path());
    let work = dir.path().join("instant");
    let instant = instant_request(&repo, &out.manifest.id, &work);
    let err = e.instant_restore(&instant, &CancelHandle::new()).unwrap_err();
    assert_eq!(err.step(), Some(crate::Step::Start), "{err}");
    assert_eq!(
        *keys.lock().unwrap(),
        [
            ("vda.overlay.qcow2".to_owned(), Some("the volume's passphrase".to_owned())),
            ("vdb.overlay.qcow2".to_owned(), None)
        ]
    );
    assert_eq!(entries(&work), Vec::<String>::new(), "overlays, exports and state removed");
    assert_eq!(entries(&dir.path().join("run/private")), Vec::<String>::new(), "the passphrase's file removed");
    // On a block device, the volume would be written in place: refused before anything is made.
    let on_block = encrypted.replace(
        "type='file' device='disk'><driver type='qcow2'/><source file='/v/root1.qcow2'>",
        "type='block' device='disk'><driver type='qcow2'/><source dev='/dev/vg0/root1'>",
    );
    assert!(on_block.contains("/dev/vg0/root1"));
    let mut hv = hypervisor_of(DomainState::ShutOff, on_block);
    hv.expect_start_with_xml().never();
    hv.expect_secret_value().never();
    let mut img = images();
    img.expect_create_overlay().never();
    img.expect_export_read_only().never();
    let (e, _) = engine(hv, img, dir.path());
    let err = e.instant_restore(&instant, &CancelHandle::new()).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("encrypted disk vda in place (/dev/vg0/root1)"), "{err}");
    assert_eq!(entries(&work), Vec::<String>::new());
}

#[test]
fn an_orphaned_job_that_ends_by_itself_before_the_abort_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("vm1");
    let target = vm_dir.join("2026.01.01.00.00.00.partial").join("root.qcow2");
    let mut hv = MockHypervisor::new();
    let mut seq = mockall::Sequence::new();
    hv.expect_current_job().times(1).in_sequence(&mut seq).returning(|_| {
        Ok(JobInfo { kind: JobKind::Active, is_backup: true, processed: 1, total: 2, error: None, elapsed: None })
    });
    let xml = format!(
        "<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'><target file='{}'/></disk></disks></domainbackup>",
        target.display()
    );
    hv.expect_backup_xml().times(1).in_sequence(&mut seq).returning(move |_| Ok(xml.clone()));
    hv.expect_abort_job()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Err(LibvirtError::new("Requested operation is not valid: no job is active on the domain")));
    hv.expect_current_job().times(1).in_sequence(&mut seq).returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_completed_job().returning(|_| Err(LibvirtError::new("none")));
    let (e, _) = engine(hv, images(), dir.path());
    assert!(!e.abort_orphaned_job("vm1", &vm_dir).unwrap(), "nothing was aborted");
}

#[test]
fn an_orphaned_job_writing_through_a_protected_export_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("repo/vm1");
    let runtime = dir.path().join("runtime");
    let job = |kind| Ok(JobInfo { kind, is_backup: true, processed: 1, total: 2, error: None, elapsed: None });
    let xml_into = |target: &Path| {
        format!(
            "<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'><driver type='raw'/><target file='{}'/></disk></disks></domainbackup>",
            target.display()
        )
    };
    // This VM's export: aborted.
    let ours = xml_into(&runtime.join("exports/vm1/2026.01.01.00.00.00.partial-vda.raw"));
    let mut hv = MockHypervisor::new();
    let mut seq = mockall::Sequence::new();
    hv.expect_current_job().times(1).in_sequence(&mut seq).returning(move |_| job(JobKind::Active));
    hv.expect_backup_xml().times(1).in_sequence(&mut seq).returning(move |_| Ok(ours.clone()));
    hv.expect_abort_job().times(1).in_sequence(&mut seq).returning(|_| Ok(()));
    hv.expect_current_job().returning(move |_| job(JobKind::None));
    hv.expect_completed_job().returning(|_| Err(LibvirtError::new("none")));
    let (e, _) = engine(hv, images(), dir.path());
    let e = e.with_runtime_dir(&runtime);
    assert!(e.abort_orphaned_job("vm1", &vm_dir).unwrap(), "aborted");
    // Another VM's export: never touched.
    let theirs = xml_into(&runtime.join("exports/vm10/2026.01.01.00.00.00.partial-vda.raw"));
    let mut hv = MockHypervisor::new();
    hv.expect_current_job().returning(move |_| job(JobKind::Active));
    hv.expect_backup_xml().returning(move |_| Ok(theirs.clone()));
    hv.expect_abort_job().never();
    let (e, _) = engine(hv, images(), dir.path());
    let e = e.with_runtime_dir(&runtime);
    assert!(!e.abort_orphaned_job("vm1", &vm_dir).unwrap());
}

#[test]
fn an_orphaned_pull_job_of_a_dead_nasbak_is_aborted_and_a_live_ones_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("repo/vm1");
    let runtime = dir.path().join("runtime");
    let job = |kind| Ok(JobInfo { kind, is_backup: true, processed: 1, total: 2, error: None, elapsed: None });
    let pull = |socket: std::path::PathBuf| {
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks><disk name='vda' backup='yes' type='file' exportname='vda'><driver type='qcow2'/><scratch file='/var/lib/nasbak/scratch/vm1/1-pull-x/vda.scratch'/></disk></disks></domainbackup>",
            socket.display()
        )
    };
    let root = crate::pull::socket_root(&runtime);
    // pid 0x7ffffffe never exists: its job is aborted.
    let dead = pull(root.join("2147483646-0/s"));
    let mut hv = MockHypervisor::new();
    let mut seq = mockall::Sequence::new();
    hv.expect_current_job().times(1).in_sequence(&mut seq).returning(move |_| job(JobKind::Active));
    hv.expect_backup_xml().times(1).in_sequence(&mut seq).returning(move |_| Ok(dead.clone()));
    hv.expect_abort_job().times(1).in_sequence(&mut seq).returning(|_| Ok(()));
    hv.expect_current_job().returning(move |_| job(JobKind::None));
    hv.expect_completed_job().returning(|_| Err(LibvirtError::new("none")));
    let (e, _) = engine(hv, images(), dir.path());
    let e = e.with_runtime_dir(&runtime);
    assert!(e.abort_orphaned_job("vm1", &vm_dir).unwrap(), "aborted");
    // A live process's (this one's): never touched.
    let live = pull(root.join(format!("{}-0/s", std::process::id())));
    let mut hv = MockHypervisor::new();
    hv.expect_current_job().returning(move |_| job(JobKind::Active));
    hv.expect_backup_xml().returning(move |_| Ok(live.clone()));
    hv.expect_abort_job().never();
    let (e, _) = engine(hv, images(), dir.path());
    let e = e.with_runtime_dir(&runtime);
    assert!(!e.abort_orphaned_job("vm1", &vm_dir).unwrap());
}

#[test]
fn a_running_vms_qemu_that_stops_answering_mid_job_fails_unresponsive_and_leaves_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let begun = Arc::new(AtomicBool::new(false));
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|_| Ok(DomainState::Running));
    hv.expect_domain_xml().returning(|_| Ok(XML.to_owned()));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    let b = Arc::clone(&begun);
    hv.expect_current_job().returning(move |_| {
        if b.load(Ordering::SeqCst) {
            Err(LibvirtError::timeout("virDomainGetJobStats timed out: the QEMU of domain 'vm1' is not answering"))
        } else {
            Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
        }
    });
    let b = Arc::clone(&begun);
    hv.expect_backup_begin().returning(move |_, _, _, _| {
        b.store(true, Ordering::SeqCst);
        Ok(())
    });
    hv.expect_abort_job().times(1).returning(|_| Err(LibvirtError::timeout("not answering")));
    hv.expect_completed_job().never();
    let (e, repo) = engine(hv, images(), dir.path());
    let err = e.backup(&request(&repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Unresponsive, "{}", crate::error::chain(&err));
    assert!(crate::error::chain(&err).contains("is not answering"), "{}", crate::error::chain(&err));
    assert_eq!(entries(&dir.path().join("repo/vm1")), Vec::<String>::new(), "no .partial, no backup");
}
