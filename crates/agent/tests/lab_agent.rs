//! Quiesce against the real guest agent of a lab guest (an ext4 file system on /data).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nasbak_agent::{AgentError, FreezeGuard, FreezeStatus, GuestAgent, LibvirtAgentTransport, QuiescePolicy, quiesce};
use nasbak_process::ExternalCommand;
use nasbak_testlab::{DiskSpec, DomainSpec, URI, example, shared_agent_guest};

/// The shared guest has one freeze state: tests that freeze take turns.
static GUEST: Mutex<()> = Mutex::new(());

fn agent_of(name: &str) -> GuestAgent<LibvirtAgentTransport> {
    let conn = virt::connect::Connect::open(Some(URI)).expect("libvirtd answers (run `cargo xtask lab up`)");
    let domain = conn.lookup_domain_by_name(name).expect("the domain exists");
    GuestAgent::new(LibvirtAgentTransport::new(domain), Duration::from_secs(10))
}

#[test]
fn the_guard_freezes_a_real_file_system_and_thaws_it() {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let agent = agent_of(shared_agent_guest().name());
    let fs = agent.fsinfo().unwrap();
    assert!(fs.iter().any(|f| f.mountpoint == "/data" && f.fstype == "ext4"), "{fs:?}");
    let guard = FreezeGuard::freeze(&agent, None).unwrap();
    assert_eq!(guard.frozen(), 1);
    assert_eq!(agent.status().unwrap(), FreezeStatus::Frozen);
    assert_eq!(guard.thaw().unwrap(), 1);
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
    // By mount point, and thawed by drop.
    let guard = FreezeGuard::freeze(&agent, Some(&["/data"])).unwrap();
    assert_eq!(guard.frozen(), 1);
    drop(guard);
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
}

#[test]
fn a_panic_while_frozen_still_thaws_the_guest() {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let agent = agent_of(shared_agent_guest().name());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_guard, outcome) = quiesce(&agent, QuiescePolicy::Required, None).unwrap();
        assert!(outcome.quiesced);
        assert_eq!(agent.status().unwrap(), FreezeStatus::Frozen);
        panic!("the backup job failed to start");
    }));
    assert!(result.is_err());
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
}

#[test]
fn freezing_a_frozen_guest_is_refused_and_the_first_guard_still_thaws() {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let agent = agent_of(shared_agent_guest().name());
    let guard = FreezeGuard::freeze(&agent, None).unwrap();
    let e = agent.freeze().unwrap_err();
    assert!(matches!(e, AgentError::Refused { .. }), "{e}");
    drop(guard);
    assert_eq!(agent.status().unwrap(), FreezeStatus::Thawed);
}

#[test]
fn without_an_agent_required_fails_fast_and_best_effort_records_why() {
    let dom = DomainSpec::new("noagent").disk(DiskSpec::raw(8)).running(true).create();
    let agent = agent_of(dom.name());
    let start = Instant::now();
    let e = quiesce(&agent, QuiescePolicy::Required, None).map(|_| ()).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(text.contains("quiesce was required") && text.contains("not available"), "{text}");
    let (guard, outcome) = quiesce(&agent, QuiescePolicy::BestEffort, None).unwrap();
    assert!(guard.is_none());
    assert!(!outcome.quiesced);
    assert!(outcome.note.as_deref().unwrap_or_default().contains("crash-consistent"), "{outcome:?}");
}

#[test]
fn the_quiesce_example_freezes_and_thaws() {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dom = shared_agent_guest();
    let out = ExternalCommand::new(example("quiesce")).arg(dom.name()).run().unwrap().stdout_text();
    assert!(out.contains("froze 1 file system(s); status: Frozen"), "{out}");
    assert!(out.contains("thawed 1 file system(s); status: Thawed"), "{out}");
}
