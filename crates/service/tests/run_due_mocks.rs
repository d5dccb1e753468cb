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
use nasbak_service::config::{Config, RunOutcome};
use nasbak_service::{RunDue, run_due};

type MockEngine = Engine<MockHypervisor, MockAgentSource, MockImageTool, MockMounter>;

const XML: &str = "<domain><name>vm1</name><devices>\
    <disk type='file' device='disk'><driver type='qcow2'/><source file='/v/root1.qcow2'/><target dev='vda'/></disk>\
    </devices></domain>";

/// A qemu-img that reads every image as a 1 MiB qcow2, finds it clean and takes any bitmap;
/// its `convert` is the caller's.
fn images() -> MockImageTool {
    let mut images = MockImageTool::new();
    let info = r#"{"filename":"x","format":"qcow2","virtual-size":1048576,"actual-size":4096}"#;
    images.expect_info().returning(move |_| Ok(parse_info(info).unwrap()));
    images
        .expect_check()
        .returning(|_, _| Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 }));
    images.expect_add_bitmap().returning(|_, _| Ok(()));
    images.expect_remove_bitmap().returning(|_, _| Ok(()));
    images
}

/// An engine whose VM `vm1` is shut off, whose qemu-img writes a small file where asked, and
/// whose repositories are `shared` (never mounted).
fn engine(dir: &Path, hv: MockHypervisor) -> MockEngine {
    let mut images = images();
    images.expect_convert().returning(|r, _| {
        if let ImageLocation::Path(p) = &r.target {
            fs::write(p, b"image").unwrap();
        }
        Ok(())
    });
    engine_with(dir, hv, images)
}

/// [`engine`] with its own qemu-img.
fn engine_with(dir: &Path, hv: MockHypervisor, images: MockImageTool) -> MockEngine {
    let mut agents = MockAgentSource::new();
    agents.expect_agent_transport().returning(|_| Ok(FakeAgent::new(1)));
    agents.expect_watchdog_uri().returning(|| None);
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
    hv.expect_inactive_xml().returning(|_| Ok(XML.to_owned()));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    hv
}

#[test]
fn a_vm_whose_earlier_run_still_goes_is_skipped_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("repo")).unwrap();
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T02:30:00Z").unwrap().to_utc();
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let e = counting_engine(dir.path(), &most).with_clock(ManualClock::new(t));
    let config = four_schedules(dir.path(), Some(2), None);
    let state = dir.path().join("state/state.json");
    // vm1's backup by another run-due still goes (its lease is held).
    let running = dir.path().join("state/running/vm1");
    fs::create_dir_all(&running).unwrap();
    let held = VmLock::take(&running, "vm1").unwrap();
    let RunDue::Ran(runs) = run_due(&e, &config, &state, &CancelHandle::new(), &mut |_| {}).unwrap();
    let by = |id: &str| runs.iter().find(|r| r.schedule == id).unwrap_or_else(|| panic!("{id} in {runs:?}")).clone();
    for id in ["vm1-daily", "vm1-hourly"] {
        let RunOutcome::Skipped(why) = by(id).outcome else { panic!("{id}: {runs:?}") };
        assert!(why.contains("still goes") && why.contains("pid"), "{why}");
    }
    assert!(matches!(by("vm2-daily").outcome, RunOutcome::Succeeded(_)), "the others run meanwhile: {runs:?}");
    // Skipped is not run: once the earlier run ends, the next run-due runs them.
    drop(held);
    let RunDue::Ran(runs) = run_due(&e, &config, &state, &CancelHandle::new(), &mut |_| {}).unwrap();
    let ids: Vec<&str> = runs.iter().map(|r| r.schedule.as_str()).collect();
    assert_eq!(ids, ["vm1-daily", "vm1-hourly"], "{runs:?}");
    assert!(runs.iter().all(|r| matches!(r.outcome, RunOutcome::Succeeded(_))), "{runs:?}");
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
    };
    assert_eq!(ran(&e), 1);
    clock.advance(chrono::TimeDelta::hours(23));
    assert_eq!(ran(&e), 0, "not due again the same day");
    clock.advance(chrono::TimeDelta::hours(1));
    assert_eq!(ran(&e), 1, "due again a day later");
}

/// An engine over VMs `vm1`.. (all shut off; `vm3`'s state cannot be read) whose qemu-img
/// copies take 300 ms and count how many backups are in flight meanwhile (VMs whose lock is
/// held on the repository; the mock's calls themselves run one at a time), the highest count
/// in `most`.
fn counting_engine(dir: &Path, most: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> MockEngine {
    use std::sync::atomic::Ordering;
    let mut hv = MockHypervisor::new();
    hv.expect_domain_state().returning(|vm| match vm {
        "vm3" => Err(LibvirtError::new("vm3 is gone")),
        _ => Ok(DomainState::ShutOff),
    });
    hv.expect_domain_xml().returning(|vm| Ok(XML.replace("vm1", vm).replace("root1", vm)));
    hv.expect_inactive_xml().returning(|vm| Ok(XML.replace("vm1", vm).replace("root1", vm)));
    hv.expect_current_job().returning(|_| {
        Ok(JobInfo { kind: JobKind::None, is_backup: false, processed: 0, total: 0, error: None, elapsed: None })
    });
    hv.expect_versions().returning(|| Err(LibvirtError::new("mock")));
    hv.expect_checkpoints().returning(|_| Ok(Vec::new()));
    let most = std::sync::Arc::clone(most);
    let repo = dir.join("repo");
    let mut images = images();
    images.expect_convert().returning(move |r, _| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let locked = |vm_dir: &Path| {
            fs::read_dir(vm_dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(nasbak::LOCK_FILE))
        };
        let in_flight = fs::read_dir(&repo).unwrap().flatten().filter(|e| locked(&e.path())).count();
        most.fetch_max(in_flight, Ordering::SeqCst);
        if let ImageLocation::Path(p) = &r.target {
            fs::write(p, b"image").unwrap();
        }
        Ok(())
    });
    engine_with(dir, hv, images)
}

fn four_schedules(dir: &Path, host: Option<u32>, repository: Option<u32>) -> Config {
    let mut text = String::new();
    if let Some(n) = host {
        text.push_str(&format!("max_parallel = {n}\n"));
    }
    text.push_str(&format!(
        "[[repository]]\nname = \"r\"\ntype = \"shared\"\naddress = \"{}\"\n",
        dir.join("repo").display()
    ));
    if let Some(n) = repository {
        text.push_str(&format!("max_parallel = {n}\n"));
    }
    text.push_str("[[offering]]\nname = \"gold\"\nrepository = \"r\"\n[assignments]\n");
    for vm in ["vm1", "vm2", "vm3", "vm4"] {
        text.push_str(&format!("{vm} = \"gold\"\n"));
    }
    for (id, vm, every, at) in [
        ("vm1-daily", "vm1", "daily", "02:30"),
        ("vm2-daily", "vm2", "daily", "02:30"),
        ("vm3-daily", "vm3", "daily", "02:30"),
        ("vm1-hourly", "vm1", "hourly", "30"),
        ("vm4-daily", "vm4", "daily", "02:30"),
    ] {
        text.push_str(&format!(
            "[[schedule]]\nid = \"{id}\"\nvm = \"{vm}\"\nevery = \"{every}\"\nat = \"{at}\"\nkeep = 0\ncreated = \"2026-11-26T12:00:00Z\"\n"
        ));
    }
    Config::parse(&text, Path::new("t.toml")).unwrap()
}

#[test]
fn due_backups_run_at_once_within_the_hosts_and_the_repositorys_limits() {
    use std::sync::atomic::Ordering;
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T02:30:00Z").unwrap().to_utc();
    for (host, repository, want) in [(Some(2), None, 2), (Some(3), Some(1), 1), (Some(1), None, 1)] {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("repo")).unwrap();
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let e = counting_engine(dir.path(), &most).with_clock(ManualClock::new(t));
        let config = four_schedules(dir.path(), host, repository);
        // The saved file keeps both limits.
        let saved = dir.path().join("saved.toml");
        config.save(&saved).unwrap();
        assert_eq!(Config::load(&saved).unwrap(), config);
        let state = dir.path().join("state/state.json");
        let mut seen = Vec::new();
        let RunDue::Ran(runs) =
            run_due(&e, &config, &state, &CancelHandle::new(), &mut |p| seen.push(p.schedule.clone())).unwrap();
        // Every due schedule ran, listed in configuration order; vm3's failure stopped nothing.
        let ids: Vec<&str> = runs.iter().map(|r| r.schedule.as_str()).collect();
        assert_eq!(ids, ["vm1-daily", "vm2-daily", "vm3-daily", "vm1-hourly", "vm4-daily"]);
        let failed: Vec<&str> = runs.iter().filter(|r| r.failed()).map(|r| r.schedule.as_str()).collect();
        assert_eq!(failed, ["vm3-daily"], "{runs:?}");
        assert_eq!(most.load(Ordering::SeqCst), want, "host {host:?}, repository {repository:?}");
        assert!(seen.iter().any(|s| s.as_deref() == Some("vm4-daily")), "progress of every backup");
    }
}
