//! Instant restore on the lab (issue 13, part 1): the lab guest runs from its backup while
//! libvirt block jobs copy the data onto its volumes; after the finish its disks are its own
//! volumes again (same paths and formats, no backing file, nothing of the repository or the
//! overlays in its definition), holding the backup's data and what the guest wrote meanwhile.
//! A restore outlives the engine that began it, is cancelled cleanly, and fails clearly when the
//! backup it reads from goes away.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nasbak::nasbak_libvirt::{CancelHandle, Hypervisor, LibvirtHypervisor};
use nasbak::nasbak_process::ExternalCommand;
use nasbak::nasbak_qemu_img::{QemuImg, ReadOnlyExport};
use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryMounts, SystemMounter};
use nasbak::{BackupRequest, CopyState, Engine, ErrorKind, InstantRestoreRequest, RESTORING_MARK, RestoreRequest};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
}

fn repo(dom: &LabDomain) -> BackupRepository {
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    BackupRepository::new("instant", kind, root.to_str().unwrap(), "", None).unwrap()
}

/// Writes `content` to `path` in the guest and flushes it to the disk (a freeze and thaw).
fn guest_write(dom: &LabDomain, path: &str, content: &[u8]) {
    guest_write_to(dom.name(), path, content);
}

/// Writes `content` to `path` in the guest of the domain `name` through its agent, and syncs
/// (a freeze and thaw).
fn guest_write_to(name: &str, path: &str, content: &[u8]) {
    let agent = |json: &str| {
        nasbak_testlab::virsh(&["qemu-agent-command", name, "--timeout", "30", json])
            .unwrap_or_else(|e| panic!("{json} on {name}: {e}"))
    };
    let open = agent(&format!(r#"{{"execute":"guest-file-open","arguments":{{"path":"{path}","mode":"w"}}}}"#));
    let handle: serde_json::Value = serde_json::from_str(open.trim()).unwrap();
    let h = handle["return"].as_i64().unwrap();
    let data = base64::engine::general_purpose::STANDARD.encode(content);
    agent(&format!(r#"{{"execute":"guest-file-write","arguments":{{"handle":{h},"buf-b64":"{data}"}}}}"#));
    agent(&format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#));
    agent(r#"{"execute":"guest-fsfreeze-freeze"}"#);
    agent(r#"{"execute":"guest-fsfreeze-thaw"}"#);
}

/// The content of `path` in the guest.
fn guest_read(dom: &LabDomain, path: &str) -> Vec<u8> {
    let open =
        dom.agent_command(&format!(r#"{{"execute":"guest-file-open","arguments":{{"path":"{path}","mode":"r"}}}}"#));
    let h = serde_json::from_str::<serde_json::Value>(&open).unwrap()["return"].as_i64().unwrap();
    let read =
        dom.agent_command(&format!(r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":65536}}}}"#));
    dom.agent_command(&format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#));
    let v: serde_json::Value = serde_json::from_str(&read).unwrap();
    base64::engine::general_purpose::STANDARD.decode(v["return"]["buf-b64"].as_str().unwrap()).unwrap()
}

fn zero(disk: &Path, format: &str) {
    ExternalCommand::new("qemu-io").args(["-f", format, "-c", "write -z 0 8M"]).arg(disk).run().unwrap();
}

fn info(image: &Path) -> serde_json::Value {
    let out = ExternalCommand::new("qemu-img").args(["info", "-U", "--output=json"]).arg(image).run().unwrap();
    serde_json::from_str(&out.stdout_text()).unwrap()
}

/// A shut-off lab guest with an agent: vda qcow2 ext4 (mounted on /data by the guest) holding
/// `known.txt`, vdb raw with pseudo-random data; backed up (full).
fn guest_with_backup(tag: &str) -> (LabDomain, BackupRepository, String) {
    let dom = DomainSpec::new(tag)
        .disk(DiskSpec::qcow2(64).ext4_with_files(&[("known.txt", b"from the backup")]))
        .disk(DiskSpec::raw(32))
        .agent(true)
        .create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[1].path, 32);
    let repo = repo(&dom);
    let e = engine(&dom.dir().join("runtime"));
    let out = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    (dom, repo, out.manifest.id)
}

#[test]
fn an_instant_restore_runs_the_vm_at_once_and_leaves_it_on_its_own_volumes() {
    // vda qcow2 ext4, vdb raw, vdc a block device: data in its first half, zeroes after.
    let dom = DomainSpec::new("instant")
        .disk(DiskSpec::qcow2(64).ext4_with_files(&[("known.txt", b"from the backup")]))
        .disk(DiskSpec::raw(32))
        .disk(DiskSpec::block(16))
        .agent(true)
        .create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[1].path, 32);
    nasbak_testlab::fill_pseudo_random(&dom.disks()[2].path, 8);
    let repo = repo(&dom);
    let e = engine(&dom.dir().join("runtime"));
    let id = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    let id = id.manifest.id;
    let want_vdb = fs::read(&dom.disks()[1].path).unwrap();
    let want_vdc = fs::read(&dom.disks()[2].path).unwrap();
    // The block device holds other data everywhere before the restore: its zeroes must return.
    fs::write(&dom.disks()[2].path, vec![0xff; 16 << 20]).unwrap();
    let inactive_before = e.hypervisor().inactive_xml(dom.name()).unwrap();
    zero(&dom.disks()[0].path, "qcow2");
    zero(&dom.disks()[1].path, "raw");
    let work = dom.dir().join("instant");
    let request = InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), dom.name(), &id)).with_work_dir(&work);
    let t = Instant::now();
    let state = e.instant_restore(&request, &CancelHandle::new()).unwrap();
    eprintln!("running {:?} after the call", t.elapsed());
    assert!(dom.is_running());
    assert_eq!(state.disks.len(), 3);
    let live = e.hypervisor().domain_xml(dom.name()).unwrap();
    assert!(live.contains(&*state.disks[0].overlay.to_string_lossy()), "runs on the overlay: {live}");
    // A second instant restore of the same VM is refused while this one is in flight.
    let err = e.instant_restore(&request, &CancelHandle::new()).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::DomainRunning | ErrorKind::Busy), "{err}");
    // The guest boots from the backup's data and writes while the copies run.
    dom.wait_for_agent(Duration::from_secs(120));
    assert_eq!(guest_read(&dom, "/data/known.txt"), b"from the backup");
    guest_write(&dom, "/data/during.txt", b"written during the restore");
    let listed = e.instant_restores(&work).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].running);
    // Nothing is copied until the finish: it copies the backup onto the volumes, then mirrors
    // what the guest wrote.
    assert!(listed[0].disks.iter().all(|d| matches!(d.state, CopyState::Pending)), "{listed:?}");
    let mut seen = Vec::new();
    // The guest writes while the finish copies and mirrors: whenever it lands, it is kept.
    let writer = {
        let name = dom.name().to_owned();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            guest_write_to(&name, "/data/during-finish.txt", b"written while the finish ran");
        })
    };
    let done = e
        .instant_finish(&work, dom.name(), Duration::from_secs(600), &CancelHandle::new(), &mut |p| {
            seen.push(p.clone())
        })
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    writer.join().unwrap();
    assert!(seen.iter().any(|p| p.phase == nasbak::Phase::Copy), "the backup copied by the finish");
    assert_eq!(done.restored.len(), 3);
    assert!(seen.last().is_some_and(|p| p.done == p.total && p.total > 0), "{:?}", seen.last());
    // The VM runs on its own volumes: same paths and formats, nothing of the overlays or the
    // repository, and its persistent definition is as it was.
    let live = e.hypervisor().domain_xml(dom.name()).unwrap();
    let root = repo.shared_path().unwrap();
    assert!(!live.contains(&*work.to_string_lossy()) && !live.contains(&*root.to_string_lossy()), "{live}");
    assert!(!live.contains("<backingStore type"), "self-contained: {live}");
    for d in dom.disks() {
        assert!(live.contains(&*d.path.to_string_lossy()), "{} in {live}", d.path.display());
    }
    assert_eq!(e.hypervisor().inactive_xml(dom.name()).unwrap(), inactive_before);
    assert_eq!(guest_read(&dom, "/data/during.txt"), b"written during the restore");
    dom.destroy();
    let vda = info(&dom.disks()[0].path);
    assert_eq!((vda["format"].as_str(), vda.get("backing-filename")), (Some("qcow2"), None), "{vda}");
    assert!(vda["actual-size"].as_u64().unwrap() < 16 << 20, "as sparse as the backup: {vda}");
    assert_eq!(dom.read_ext4_file(&dom.disks()[0].path, "known.txt").as_deref(), Some("from the backup"));
    assert_eq!(dom.read_ext4_file(&dom.disks()[0].path, "during.txt").as_deref(), Some("written during the restore"));
    assert_eq!(
        dom.read_ext4_file(&dom.disks()[0].path, "during-finish.txt").as_deref(),
        Some("written while the finish ran")
    );
    assert!(fs::read(&dom.disks()[1].path).unwrap() == want_vdb, "vdb holds the backup's data");
    assert!(fs::read(&dom.disks()[2].path).unwrap() == want_vdc, "vdc (block) too, its zeroes included");
    // Nothing left: no work files, no daemon, no mark; the backup verifies.
    assert!(!work.join(dom.name()).exists());
    assert!(nasbak_testlab::pids_with_cmdline(&work.to_string_lossy()).is_empty());
    let marks: Vec<PathBuf> = fs::read_dir(repo_vm_dir(&repo, &dom)).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!marks.iter().any(|m| m.to_string_lossy().contains(RESTORING_MARK)), "{marks:?}");
    let verify = e.catalog().verify(&repo, dom.name(), &id, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(verify.ok(), "{verify:?}");

    // The VM stopped before the finish (its writes gone with it): the finish copies nothing over
    // its volumes and says the restore can only be cancelled.
    let before = fs::read(&dom.disks()[0].path).unwrap();
    e.instant_restore(&request, &CancelHandle::new()).unwrap();
    dom.destroy();
    let err =
        e.instant_finish(&work, dom.name(), Duration::from_secs(60), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(nasbak::chain(&err).contains("can only be cancelled"), "{}", nasbak::chain(&err));
    assert!(fs::read(&dom.disks()[0].path).unwrap() == before, "vda untouched");
    e.instant_cancel(&work, dom.name()).unwrap();

    // Cancelled before the finish: the file volumes were never touched (their marks go, their
    // data is as it was); the block device keeps its mark (a finish writes it in place).
    e.instant_restore(&request, &CancelHandle::new()).unwrap();
    let cancelled = e.instant_cancel(&work, dom.name()).unwrap();
    assert_eq!(cancelled.partly_written, [dom.disks()[2].path.clone()]);
    assert!(fs::read(&dom.disks()[0].path).unwrap() == before, "vda untouched");
    let marks: Vec<String> = fs::read_dir(repo_vm_dir(&repo, &dom))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|m| m.contains(RESTORING_MARK))
        .collect();
    assert_eq!(marks, [format!("{RESTORING_MARK}vdc")]);
}

fn repo_vm_dir(repo: &BackupRepository, dom: &LabDomain) -> PathBuf {
    repo.shared_path().unwrap().join(dom.name())
}

#[test]
fn an_instant_restore_outlives_its_engine_and_is_cancelled_or_fails_clearly() {
    let (dom, repo, full) = guest_with_backup("instant2");
    // An incremental on the full (vda's changed clusters; vdb, raw, in full): the overlay reads
    // through the chain.
    dom.write_offline(0, 0x6b, "40M", "1M");
    let e = engine(&dom.dir().join("runtime"));
    let inc = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(inc.manifest.parent.as_deref(), Some(full.as_str()), "an incremental");
    let id = inc.manifest.id;
    zero(&dom.disks()[0].path, "qcow2");
    let work = dom.dir().join("instant");
    let request = InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), dom.name(), &id))
        .with_work_dir(&work)
        .with_bandwidth(16 << 20);
    // Begun by one engine, finished by another (as by another nasbak process).
    {
        let e = engine(&dom.dir().join("runtime"));
        e.instant_restore(&request, &CancelHandle::new()).unwrap();
    }
    let e = engine(&dom.dir().join("runtime"));
    let listed = e.instant_restores(&work).unwrap();
    assert!(matches!(listed[0].disks[0].state, CopyState::Copying { .. }), "still copying: {listed:?}");
    e.instant_finish(&work, dom.name(), Duration::from_secs(600), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    dom.destroy();
    // The incremental's clusters (the guest, which mounted vda, wrote elsewhere only).
    let got = fs::read(dom.raw_copy(0, "got-vda")).unwrap();
    assert!(got[40 << 20..41 << 20].iter().all(|b| *b == 0x6b), "vda restored through its chain");
    assert_eq!(dom.read_ext4_file(&dom.disks()[0].path, "known.txt").as_deref(), Some("from the backup"));

    // Cancelled: the VM stopped, nothing left but the marks of its partly written volumes, so
    // that a backup refuses until the VM is restored again.
    e.instant_restore(&request, &CancelHandle::new()).unwrap();
    let cancelled = e.instant_cancel(&work, dom.name()).unwrap();
    assert_eq!(cancelled.partly_written.len(), 2);
    assert!(!dom.is_running());
    assert!(!work.join(dom.name()).exists());
    assert!(nasbak_testlab::pids_with_cmdline(&work.to_string_lossy()).is_empty());
    let err = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HalfRestored, "{err}");
    e.restore(&RestoreRequest::new(repo.clone(), dom.name(), &id), &CancelHandle::new(), &mut |_| {}).unwrap();

    // The repository stops answering while the guest reads from it, and QEMU with it: the
    // export's daemon stopped (as reads stall on an NFS hard mount), a guest read of vdb blocks
    // the copy has not reached blocked on it, and the VM's QEMU stopped (what a vCPU thread
    // holding QEMU's global lock during a blocked read does to its monitor under TCG; stopped
    // here so that every run takes this path). Finish returns by its timeout with the restore in
    // flight and says QEMU does not answer; once both run again, finish completes.
    let state = e.instant_restore(&request, &CancelHandle::new()).unwrap();
    // The export's daemon only (QEMU's command line names the export too).
    let signal = |state: &nasbak::InstantRestore, disk: usize, s: nix::sys::signal::Signal| {
        let export = ReadOnlyExport::find(&state.disks[disk].export).expect("the export runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(export.pid as i32), s).unwrap();
    };
    dom.wait_for_agent(Duration::from_secs(120));
    let open = dom.agent_command(r#"{"execute":"guest-file-open","arguments":{"path":"/dev/vdb","mode":"r"}}"#);
    let h = serde_json::from_str::<serde_json::Value>(&open).unwrap()["return"].as_i64().unwrap();
    dom.agent_command(&format!(
        r#"{{"execute":"guest-file-seek","arguments":{{"handle":{h},"offset":{},"whence":"set"}}}}"#,
        24 << 20
    ));
    signal(&state, 1, nix::sys::signal::Signal::SIGSTOP);
    let name = dom.name().to_owned();
    let read = std::thread::spawn(move || {
        let cmd = format!(r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":65536}}}}"#);
        nasbak_testlab::virsh(&["qemu-agent-command", &name, "--timeout", "300", &cmd])
    });
    std::thread::sleep(Duration::from_secs(1));
    let frozen = dom.freeze_qemu();
    let t = Instant::now();
    let err =
        e.instant_finish(&work, dom.name(), Duration::from_secs(5), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(8), "finish returned after {took:?}, not by its 5 s timeout");
    assert!(!read.is_finished(), "the guest's read was blocked all along");
    assert_eq!(err.kind(), ErrorKind::Unresponsive, "{}", nasbak::chain(&err));
    let said = nasbak::chain(&err);
    assert!(said.contains("is not answering") && said.contains("stays in flight"), "{said}");
    assert!(dom.is_running());
    frozen.thaw();
    signal(&state, 1, nix::sys::signal::Signal::SIGCONT);
    let read = read.join().unwrap();
    assert!(read.as_ref().is_ok_and(|r| r.contains("buf-b64")), "the guest's read ends: {read:?}");
    e.instant_finish(&work, dom.name(), Duration::from_secs(600), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    dom.destroy();

    // The backup goes away for good (the export's daemon killed): the copy of that disk fails,
    // finish says so, cancel cleans up.
    let state = e.instant_restore(&request, &CancelHandle::new()).unwrap();
    signal(&state, 1, nix::sys::signal::Signal::SIGKILL);
    let err =
        e.instant_finish(&work, dom.name(), Duration::from_secs(120), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(nasbak::chain(&err).contains("disk vdb is gone"), "{}", nasbak::chain(&err));
    assert!(dom.is_running(), "the VM runs on (its reads of blocks not copied fail)");
    let listed = e.instant_restores(&work).unwrap();
    assert!(matches!(listed[0].disks[1].state, CopyState::Gone), "{listed:?}");
    e.instant_cancel(&work, dom.name()).unwrap();
    assert!(!dom.is_running() && !work.join(dom.name()).exists());
    assert!(nasbak_testlab::pids_with_cmdline(&work.to_string_lossy()).is_empty());
}

/// `instant_restore_and_finish`: the backup is copied beside the volumes while the VM starts,
/// the VM runs on its backup meanwhile, what the guest writes is kept through the pivot, and
/// nothing is left behind; from an incremental (its chain committed) too.
#[test]
fn an_instant_restore_in_one_call_copies_while_the_vm_starts_and_keeps_the_guests_writes() {
    let (dom, repo, full) = guest_with_backup("instant3");
    dom.write_offline(0, 0x5c, "40M", "1M");
    let e = engine(&dom.dir().join("runtime"));
    let inc = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(inc.manifest.parent.as_deref(), Some(full.as_str()), "an incremental");
    let want_vdb = fs::read(&dom.disks()[1].path).unwrap();
    zero(&dom.disks()[0].path, "qcow2");
    zero(&dom.disks()[1].path, "raw");
    let work = dom.dir().join("instant");
    let request = InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), dom.name(), &inc.manifest.id))
        .with_work_dir(&work);
    let (mut running, mut seen) = (0, Vec::new());
    let mut writer = None;
    let done = e
        .instant_restore_and_finish(
            &request,
            Duration::from_secs(600),
            &CancelHandle::new(),
            &mut |state| {
                running += 1;
                assert!(dom.is_running(), "told once the VM runs");
                assert!(state.disks.iter().all(|d| d.copy_at_finish));
                // The guest writes as soon as it is up: during the copy, the mirror or after.
                let name = dom.name().to_owned();
                writer = Some(std::thread::spawn(move || {
                    for _ in 0..240 {
                        let ping = nasbak_testlab::virsh(&[
                            "qemu-agent-command",
                            &name,
                            "--timeout",
                            "2",
                            r#"{"execute":"guest-ping"}"#,
                        ]);
                        if ping.is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    guest_write_to(&name, "/data/one-call.txt", b"kept through the pivot");
                }));
            },
            &mut |p| seen.push(p.clone()),
        )
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    writer.take().unwrap().join().unwrap();
    assert_eq!(running, 1);
    assert_eq!(done.restored.len(), 2);
    assert!(seen.iter().any(|p| p.phase == nasbak::Phase::Copy), "copied by nasbak: {seen:?}");
    assert!(seen.iter().any(|p| p.phase == nasbak::Phase::Mirror), "then mirrored: {seen:?}");
    assert_eq!(guest_read(&dom, "/data/one-call.txt"), b"kept through the pivot");
    let live = e.hypervisor().domain_xml(dom.name()).unwrap();
    assert!(!live.contains(&*work.to_string_lossy()) && !live.contains("<backingStore type"), "{live}");
    dom.destroy();
    assert_eq!(dom.read_ext4_file(&dom.disks()[0].path, "known.txt").as_deref(), Some("from the backup"));
    assert_eq!(dom.read_ext4_file(&dom.disks()[0].path, "one-call.txt").as_deref(), Some("kept through the pivot"));
    let got = fs::read(dom.raw_copy(0, "got-vda")).unwrap();
    assert!(got[40 << 20..41 << 20].iter().all(|b| *b == 0x5c), "vda restored through its chain");
    assert!(fs::read(&dom.disks()[1].path).unwrap() == want_vdb, "vdb holds the backup's data");
    assert!(!work.join(dom.name()).exists());
    let staged: Vec<_> = fs::read_dir(dom.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("nasbak-restore"))
        .map(|e| e.file_name())
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    let marks: Vec<PathBuf> = fs::read_dir(repo_vm_dir(&repo, &dom)).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!marks.iter().any(|m| m.to_string_lossy().contains(RESTORING_MARK)), "{marks:?}");
}
