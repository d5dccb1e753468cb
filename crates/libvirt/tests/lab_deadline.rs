//! Every libvirt call under a deadline, against a real QEMU that stops answering (SIGSTOP):
//! the calls that need the VM's QEMU return by their deadline with an error that says whose
//! silence it is, the calls libvirtd answers alone still work, and a call whose operation's
//! deadline has passed is never sent.

use std::time::{Duration, Instant};

use std::fs;
use std::os::unix::fs::PermissionsExt;

use nasbak_libvirt::{
    CancelHandle, Domain, DomainState, Hypervisor, JobError, JobKind, JobOptions, LibvirtHypervisor, PushBackup,
    deadline, start_backup,
};
use nasbak_testlab::{DiskSpec, DomainSpec, URI};

fn hv() -> LibvirtHypervisor {
    LibvirtHypervisor::connect(URI).expect("libvirtd answers (run `cargo xtask lab up`)")
}

/// Runs `f`, returning its result and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

#[test]
fn a_frozen_qemu_never_holds_a_libvirt_call_past_its_deadline() {
    let dom = DomainSpec::new("frozen").disk(DiskSpec::raw(16)).running(true).create();
    let hv = hv().with_call_timeout(Duration::from_secs(2));
    // Answered by QEMU while it runs.
    assert_eq!(hv.block_size(dom.name(), "vda").unwrap().capacity, 16 << 20);

    let frozen = dom.freeze_qemu();
    // A call that needs QEMU: the call timeout ends it, and the error says QEMU is silent.
    let (r, took) = timed(|| hv.block_size(dom.name(), "vda"));
    let err = r.expect_err("a frozen QEMU cannot answer");
    assert!(err.is_timeout(), "{err}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(6), "returned after {took:?}");
    let text = err.to_string();
    assert!(text.contains("virDomainGetBlockInfo on domain") && text.contains("(disk vda)"), "{text}");
    assert!(text.contains("QEMU of domain") && text.contains("libvirtd is"), "whose silence: {text}");
    assert!(text.contains("left in flight"), "{text}");

    // The operation's deadline ends a call before the call timeout does.
    let patient = hv.clone().with_call_timeout(Duration::from_secs(600));
    let (r, took) = timed(|| {
        let _scope = deadline::scope(Instant::now() + Duration::from_secs(1));
        patient.block_job(dom.name(), "vda")
    });
    assert!(r.expect_err("frozen").is_timeout());
    assert!(took < Duration::from_secs(4), "the scope's 1 s, not the call's 600 s: {took:?}");

    // A deadline already passed: nothing is sent.
    let (r, took) = timed(|| {
        let _scope = deadline::scope(Instant::now());
        patient.abort_job(dom.name())
    });
    let err = r.expect_err("not sent");
    assert!(err.is_timeout() && err.is_past_deadline() && err.to_string().contains("was not sent"), "{err}");
    assert!(took < Duration::from_millis(100), "{took:?}");

    // libvirtd alone still answers what it knows without QEMU.
    let (state, took) = timed(|| patient.domain_state(dom.name()));
    assert_eq!(state.unwrap(), DomainState::Running);
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Once QEMU runs again, so do the calls.
    frozen.thaw();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match hv.block_size(dom.name(), "vda") {
            Ok(size) => break assert_eq!(size.capacity, 16 << 20),
            // libvirt may still be finishing the calls left in flight.
            Err(e) if Instant::now() < deadline => eprintln!("not yet: {e}"),
            Err(e) => panic!("QEMU runs again, yet: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn connecting_where_no_libvirtd_listens_fails_at_once_naming_the_socket() {
    // No daemon listens on this socket: connecting fails at once (a refusal, not a hang).
    let (r, took) = timed(|| LibvirtHypervisor::connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock"));
    let err = r.expect_err("nothing listens");
    assert!(err.to_string().contains("/nonexistent/libvirt-sock"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_job_whose_operation_ran_out_of_time_times_out_and_is_aborted() {
    // A push job followed under a deadline that has passed: its poll is never sent, the wait
    // says the job timed out (not that QEMU stopped answering), and the abort gets a budget of
    // its own: no job is left.
    let dom = DomainSpec::new("pastdeadline").disk(DiskSpec::raw(256)).running(true).create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 200);
    let hv = hv();
    let out = dom.dir().join("out");
    fs::create_dir_all(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
    let domain = Domain::parse(&hv.domain_xml(dom.name()).unwrap()).unwrap();
    let backup = PushBackup::for_domain(&domain, &out, |d| format!("{}.qcow2", d.target));
    let job = start_backup(&hv, dom.name(), &backup).unwrap();
    let err = {
        let _scope = deadline::scope(Instant::now());
        job.wait(JobOptions::default(), &CancelHandle::new(), &mut |_| {}).unwrap_err()
    };
    assert!(matches!(err, JobError::TimedOut { .. }), "{err}");
    assert_eq!(hv.current_job(dom.name()).unwrap().kind, JobKind::None, "no job is left");
}
