//! What an embedder's own tests do with the `mock` feature: an engine over `nasbak::mock`'s
//! mocks of every seam, outside this crate, backing up a shut-off VM into a `shared` repository
//! (a temporary directory) and restoring one of its disks.

use std::fs;

use nasbak::mock::{FakeAgent, MockAgentSource, MockHypervisor, MockImageTool, MockMounter};
use nasbak::nasbak_libvirt::{CancelHandle, DomainState, JobInfo, JobKind, LibvirtError};
use nasbak::nasbak_qemu_img::{CheckReport, CheckVerdict, ImageLocation, parse_info};
use nasbak::nasbak_repo::{BackupRepository, Capacity, MountTimeouts, RepositoryKind, RepositoryMounts};
use nasbak::{BackupRequest, Engine, ErrorKind, ManualClock, Phase, VolumeRestoreRequest};

const XML: &str = "<domain><name>vm1</name><devices>\
    <disk type='file' device='disk'><driver type='qcow2'/><source file='/v/root1.qcow2'/><target dev='vda'/></disk>\
    </devices></domain>";

#[test]
fn an_embedder_drives_the_engine_over_the_exported_mocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|name| match name {
        "vm1" => Ok(DomainState::ShutOff),
        other => Err(LibvirtError::no_such_domain(other)),
    });
    hv.expect_domain_xml().returning(|_| Ok(XML.to_owned()));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    let mut agents = MockAgentSource::new();
    agents.expect_agent_transport().returning(|_| Ok(FakeAgent::new(1)));
    let mut images = MockImageTool::new();
    let info = r#"{"filename":"x","format":"qcow2","virtual-size":1048576,"actual-size":4096}"#;
    images.expect_info().returning(move |_| Ok(parse_info(info).unwrap()));
    images
        .expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    // A shut-off VM's qcow2 disk gets the backup's dirty bitmap (the base of the next
    // incremental); one that fails is removed again.
    images.expect_add_bitmap().times(1).returning(|_, _| Ok(()));
    images.expect_remove_bitmap().returning(|_, _| Ok(()));
    images.expect_convert().returning(|r, progress| {
        progress(100.0);
        if let ImageLocation::Path(p) = &r.target {
            fs::write(p, b"image").unwrap();
        }
        Ok(())
    });
    let mut mounter = MockMounter::new();
    mounter.expect_probe().returning(|_, _| Ok(()));
    mounter.expect_capacity().returning(|_, _| Ok(Capacity { total: 1 << 40, used: 0, available: 1 << 40 }));
    let mounts = RepositoryMounts::new(mounter, dir.path().join("run"), MountTimeouts::default());
    let t = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().to_utc();
    let engine = Engine::new(hv, agents, images, mounts)
        .with_clock(ManualClock::new(t))
        .with_runtime_dir(dir.path().join("run"));
    fs::create_dir_all(dir.path().join("repo")).unwrap();
    let repo = BackupRepository::new("r", RepositoryKind::Shared, dir.path().join("repo").to_str().unwrap(), "", None)
        .unwrap();

    let mut phases = Vec::new();
    let made = engine
        .backup(&BackupRequest::new("vm1", repo.clone()), &CancelHandle::new(), &mut |p| phases.push(p.phase))
        .unwrap();
    assert_eq!(made.id.to_string(), "r:vm1/2026.12.01.10.00.00");
    assert!(phases.contains(&Phase::Convert) && phases.contains(&Phase::Checksum), "{phases:?}");
    let json = serde_json::to_value(&made).unwrap();
    assert_eq!(json["manifest"]["disks"][0]["target"], "vda");

    let to = dir.path().join("restored.qcow2");
    let request = VolumeRestoreRequest::new(
        repo.clone(),
        "vm1",
        made.manifest.id.as_str(),
        "vda",
        ImageLocation::Path(to.clone()),
    );
    let restored = engine.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!((restored.disk.as_str(), fs::read(&to).unwrap()), ("vda", b"image".to_vec()));

    let missing = engine.backup(&BackupRequest::new("vm9", repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NoSuchDomain, "{missing}");
}
