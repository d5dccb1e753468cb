//! run-due over an engine of `nasbak::mock`'s mocks (a shut-off VM, a `shared` repository in a
//! temporary directory): the clock decides which schedules are due, a second run while one
//! holds the lock does nothing, and an offering's boot verification is recorded with each run.
//! The same runs for real in `nasbak`'s `tests/lab_boot.rs` and the CLI's tests.

use std::fs;
use std::path::Path;

use nasbak::mock::{FakeAgent, MockAgentSource, MockHypervisor, MockImageTool, MockMounter};
use nasbak::nasbak_libvirt::{CancelHandle, DomainState, JobInfo, JobKind, LibvirtError};
use nasbak::nasbak_qemu_img::{CheckReport, CheckVerdict, ImageLocation, parse_info};
use nasbak::nasbak_repo::{Capacity, MountTimeouts, RepositoryMounts};
use nasbak::{BootResult, Engine, ManualClock, VmLock};
use nasbak_service::config::Config;
use nasbak_service::{RunDue, run_due};

type MockEngine = Engine<MockHypervisor, MockAgentSource, MockImageTool, MockMounter>;

const XML: &str = "<domain><name>vm1</name><devices>\
    <disk type='file' device='disk'><driver type='qcow2'/><source file='/v/root1.qcow2'/><target dev='vda'/></disk>\
    </devices></domain>";

/// An engine whose VM `vm1` is shut off, whose qemu-img writes a small file where asked, and
/// whose repositories are `shared` (never mounted).
fn engine(dir: &Path, hv: MockHypervisor) -> MockEngine {
    let mut agents = MockAgentSource::new();
    agents.expect_agent_transport().returning(|_| Ok(FakeAgent::new(1)));
    agents.expect_watchdog_uri().returning(|| None);
    let mut images = MockImageTool::new();
    let info = r#"{"filename":"x","format":"qcow2","virtual-size":1048576,"actual-size":4096}"#;
    images.expect_info().returning(move |_| Ok(parse_info(info).unwrap()));
    images
        .expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    images.expect_add_bitmap().returning(|_, _| Ok(()));
    images.expect_remove_bitmap().returning(|_, _| Ok(()));
    images.expect_convert().returning(|r, _| {
        if let ImageLocation::Path(p) = &r.target {
            fs::write(p, b"image").unwrap();
        }
        Ok(())
    });
    let mut mounter = MockMounter::new();
    mounter.expect_mount().never();
    mounter.expect_probe().returning(|_, _| Ok(()));
    mounter.expect_capacity().returning(|_, _| Ok(Capacity { total: 1 << 40, used: 0, available: 1 << 40 }));
    let mounts = RepositoryMounts::new(mounter, dir.join("run"), MountTimeouts::default());
    Engine::new(hv, agents, images, mounts)
}

fn shut_off_vm() -> MockHypervisor {
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|_| Ok(DomainState::ShutOff));
    hv.expect_domain_xml().returning(|_| Ok(XML.to_owned()));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    hv
}

#[test]
fn run_due_does_nothing_while_another_run_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().never();
    let e = engine(dir.path(), hv);
    let state = dir.path().join("state/state.json");
    fs::create_dir_all(dir.path().join("state")).unwrap();
    let _held = VmLock::take(&dir.path().join("state"), "run-due").unwrap();
    let r = run_due(&e, &Config::default(), &state, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(matches!(r, RunDue::Busy(_)), "{r:?}");
}

#[test]
fn the_clock_decides_which_schedules_are_due_without_sleeping() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("repo")).unwrap();
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T02:30:00Z").unwrap().to_utc();
    let clock = ManualClock::new(t);
    let e = engine(dir.path(), shut_off_vm()).with_clock(clock.clone());
    // A daily schedule at 02:30 created the day before: due now, not again until tomorrow.
    let config = Config::parse(
        &format!(
            r#"
[[repository]]
name = "r"
type = "shared"
address = "{}"
[[offering]]
name = "gold"
repository = "r"
boot_verify = true
[assignments]
vm1 = "gold"
[[schedule]]
id = "vm1-daily"
vm = "vm1"
every = "daily"
at = "02:30"
keep = 0
created = "2026-11-26T12:00:00Z"
"#,
            dir.path().join("repo").display()
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let state = dir.path().join("state/state.json");
    let ran = |e: &MockEngine| match run_due(e, &config, &state, &CancelHandle::new(), &mut |_| {}).unwrap() {
        RunDue::Ran(runs) => {
            // The offering asks for boot verification: this VM has no guest agent, so each
            // scheduled backup is recorded as unverifiable (never as good), and the run fails.
            for r in &runs {
                let v = r.boot_verified.clone().expect("verified").expect("ran");
                assert_eq!(v.result, BootResult::Unverifiable);
                assert!(r.failed());
            }
            runs.len()
        }
        RunDue::Busy(holder) => panic!("busy: {holder}"),
    };
    assert_eq!(ran(&e), 1);
    clock.advance(chrono::TimeDelta::hours(23));
    assert_eq!(ran(&e), 0, "not due again the same day");
    clock.advance(chrono::TimeDelta::hours(1));
    assert_eq!(ran(&e), 1, "due again a day later");
}
