//! Backups of running VMs staged in local scratch storage (`Engine::with_scratch`), on the lab:
//! the push job writes the backup's files (already compressed or encrypted as the repository
//! says) to the scratch directory and nasbak copies them to the repository afterwards; a
//! repository that stops answering never holds up the guest's writes; a scratch that fills
//! aborts the job cleanly with the guest running on.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_process::ExternalCommand;
use nasbak::nasbak_qemu_img::{ImageLocation, QemuImg};
use nasbak::nasbak_repo::{
    BackupMethod, BackupMode, BackupRepository, Compression, Encryption, FileFormat, KeySource, MountTimeouts,
    Protection, RepositoryKind, RepositoryMounts, SystemMounter,
};
use nasbak::{BackupRequest, Catalog, Engine, ErrorKind, Phase, Scratch, VolumeRestoreRequest};
use nasbak_testlab::{DiskSpec, DomainSpec, SshServer, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path, scratch: Scratch) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts)
        .with_agent_timeout(Duration::from_secs(10))
        .with_runtime_dir(runtime)
        .with_scratch(scratch)
}

fn same(a: &Path, b: &Path) -> bool {
    ExternalCommand::new("qemu-img").args(["compare", "-U"]).arg(a).arg(b).run_unchecked().unwrap().status.success()
}

/// A file in the scratch directory and its first bytes.
type Staged = (PathBuf, Vec<u8>);

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn staged_backups_are_stored_as_the_repository_says_and_every_point_restores() {
    let dom = DomainSpec::new("scratchrun").disk(DiskSpec::qcow2(32)).disk(DiskSpec::raw(8)).running(true).create();
    let scratch = dom.dir().join("scratch");
    let e = engine(&dom.dir().join("runtime"), Scratch::new(&scratch, 1 << 30));
    let catalog = Catalog::new(e.images(), e.mounts());
    let key = dom.dir().join("backup.key");
    fs::write(&key, "the key of the staged backups, 0123456789").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    for (name, compression, encryption, format) in [
        ("plain", Compression::None, Encryption::None, FileFormat::Plain),
        ("zstd", Compression::Zstd, Encryption::None, FileFormat::Compressed),
        ("luks", Compression::None, Encryption::Luks, FileFormat::Encrypted),
        ("both", Compression::Zstd, Encryption::Luks, FileFormat::CompressedInLuks),
    ] {
        let root = dom.dir().join(format!("repo-{name}"));
        fs::create_dir_all(&root).unwrap();
        let k = (encryption == Encryption::Luks).then(|| KeySource::File(key.clone()));
        let repo = BackupRepository::new(name, RepositoryKind::Shared, root.to_str().unwrap(), "", None)
            .unwrap()
            .with_protection(Protection::new(compression, encryption, k).unwrap());
        let backup = || {
            // As the job ends (its last report): its files are in the scratch directory,
            // stored as the repository says (never plaintext where it encrypts), none yet on the
            // repository.
            let mut seen: Option<(Vec<Staged>, Vec<PathBuf>)> = None;
            let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(ModeRequest::Auto);
            let made = e
                .backup(&request, &CancelHandle::new(), &mut |p| {
                    if p.phase == Phase::Job {
                        let staged = files_under(&scratch)
                            .into_iter()
                            .map(|f| {
                                let head = fs::read(&f).map(|b| b[..b.len().min(64)].to_vec()).unwrap_or_default();
                                (f, head)
                            })
                            .collect();
                        seen = Some((staged, files_under(&root.join(dom.name()))));
                    }
                })
                .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
            (made, seen)
        };
        dom.write_through_qemu(0, 0x11, "0", "4M");
        let (full, seen) = backup();
        if let Some((staged, on_repo)) = seen {
            let disks: Vec<&Staged> = staged.iter().filter(|(f, _)| f.to_string_lossy().ends_with(".qcow2")).collect();
            assert_eq!(disks.len(), 2, "{name}: {staged:?}");
            assert!(!on_repo.iter().any(|f| f.to_string_lossy().ends_with(".qcow2")), "{name}: {on_repo:?}");
            for (f, head) in disks {
                // A qcow2 header: the magic, then the encryption method at byte 32 (2: LUKS).
                let qcow2 = head.starts_with(b"QFI\xfb");
                let crypt = head.get(32..36).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match format {
                    FileFormat::CompressedInLuks => {
                        assert!(head.starts_with(b"LUKS\xba\xbe"), "{name}: {f:?} is a LUKS container")
                    }
                    FileFormat::Encrypted => {
                        assert!(qcow2 && crypt == Some(2), "{name}: {f:?} is LUKS-encrypted qcow2")
                    }
                    _ => assert!(qcow2 && crypt == Some(0), "{name}: {f:?}"),
                }
            }
        }
        assert!(files_under(&scratch).is_empty(), "{name}: the scratch is empty after the backup");
        assert!(full.manifest.disks.iter().all(|d| d.stored_as == format), "{name}: {:?}", full.manifest.disks);
        let p1 = dom.raw_copy(0, &format!("{name}-r1"));
        dom.write_through_qemu(0, 0x22, "8M", "2M");
        let (inc, _) = backup();
        let m = &inc.manifest;
        assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Incremental, Some(full.manifest.id.as_str())), "{m:?}");
        assert_eq!(m.disks[0].mode, BackupMode::Incremental, "{name}");
        let p2 = dom.raw_copy(0, &format!("{name}-r2"));
        for (id, want) in [(&full.manifest.id, &p1), (&inc.manifest.id, &p2)] {
            let to = dom.dir().join(format!("{name}-{id}.qcow2"));
            let request = VolumeRestoreRequest::new(
                repo.clone(),
                dom.name(),
                id.as_str(),
                "vda",
                ImageLocation::Path(to.clone()),
            );
            e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
            assert!(same(&to, want), "{name}: {id} restores what the disk held");
        }
        for report in catalog.verify_all(&repo, Some(dom.name()), &CancelHandle::new(), &mut |_| {}).unwrap() {
            assert!(report.ok(), "{name}: {report:?}");
        }
    }
}

#[test]
fn a_scratch_that_fills_aborts_the_job_and_the_guest_runs_on() {
    let dom = DomainSpec::new("scratchfull").disk(DiskSpec::raw(256)).running(true).create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 200);
    let scratch = dom.dir().join("scratch");
    // The push job's staged files, and a pull job's (a compressing repository): its scratch
    // files and the files nasbak writes, together against the limit.
    for (name, compression) in [("plain", Compression::None), ("zstd", Compression::Zstd)] {
        let root = dom.dir().join(format!("repo-{name}"));
        fs::create_dir_all(&root).unwrap();
        let repo = BackupRepository::new(name, RepositoryKind::Shared, root.to_str().unwrap(), "", None)
            .unwrap()
            .with_protection(Protection::new(compression, Encryption::None, None).unwrap());
        let e = engine(&dom.dir().join("runtime"), Scratch::new(&scratch, 4 << 20));
        let err =
            e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap_err();
        let said = nasbak::chain(&err);
        assert_eq!(err.kind(), ErrorKind::NoSpace, "{name}: {said}");
        assert!(said.contains("scratch directory") && said.contains("limit of 4 MiB"), "{name}: {said}");
        assert!(dom.is_running(), "the guest runs on");
        assert_eq!(nasbak_testlab::virsh(&["domstate", dom.name()]).unwrap().trim(), "running");
        assert!(files_under(&scratch).is_empty(), "{name}: nothing left in the scratch: {:?}", files_under(&scratch));
        assert!(Catalog::new(e.images(), e.mounts()).list(&repo, None).unwrap().is_empty(), "no backup listed");
        assert!(
            files_under(&root).iter().all(|f| !f.to_string_lossy().ends_with(".qcow2")),
            "{:?}",
            files_under(&root)
        );
        // No job is left behind: the next backup, with room, is made.
        let e = engine(&dom.dir().join("runtime"), Scratch::new(&scratch, 1 << 30));
        let made = e.backup(&BackupRequest::new(dom.name(), repo), &CancelHandle::new(), &mut |_| {}).unwrap();
        let method = if compression == Compression::Zstd { BackupMethod::PullJob } else { BackupMethod::PushJob };
        assert_eq!(made.manifest.method, method, "{name}");
    }
}

/// The repository (sshfs to a local sshd, its keepalives off so that it waits rather than give
/// up) stops answering as soon as the job runs; the guest writes to the disk being backed up,
/// where the job has not copied yet (each write first saves the old data), and those writes
/// complete while the repository is stalled; the VM is never paused. Once the repository
/// answers again the backup completes and verifies.
#[test]
fn a_stalled_repository_never_holds_up_the_guests_writes() {
    let dom = DomainSpec::new("scratchstall")
        .disk(DiskSpec::qcow2(64).ext4())
        .disk(DiskSpec::raw(768))
        .agent(true)
        .running(true)
        .create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[1].path, 640);
    dom.wait_for_agent(Duration::from_secs(120));
    let server = SshServer::start();
    let export = dom.dir().join("export");
    fs::create_dir_all(&export).unwrap();
    let options = format!(
        "port={},IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,allow_other",
        server.port(),
        server.client_key().display()
    );
    let kind = RepositoryKind::from_parts("custom", Some("fuse.sshfs")).unwrap();
    let repo =
        BackupRepository::new("stall", kind, &format!("root@127.0.0.1:{}", export.display()), &options, None).unwrap();
    let e = engine(&dom.dir().join("runtime"), Scratch::new(dom.dir().join("scratch"), 4 << 30));
    let (started_tx, started_rx) = mpsc::channel();
    let result = std::thread::scope(|s| {
        let backup = s.spawn(|| {
            let request = BackupRequest::new(dom.name(), repo.clone()).with_timeout(Duration::from_secs(600));
            let mut told = false;
            e.backup(&request, &CancelHandle::new(), &mut |p| {
                if p.phase == Phase::Job && !told {
                    told = true;
                    server.signal_sessions(nix::sys::signal::Signal::SIGSTOP);
                    let _ = started_tx.send(());
                }
            })
        });
        started_rx.recv_timeout(Duration::from_secs(120)).expect("the job ran");
        let stalled = Instant::now();
        // Guest writes at the end of the data disk, which the job copies last.
        let writer = s.spawn(|| {
            for i in 0..4u64 {
                dom.write_through_agent("vdb", 0x70 + i as u8, (700 + i) << 20, 1 << 20);
            }
        });
        while !writer.is_finished() && stalled.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let wrote = writer.is_finished();
        let state = nasbak_testlab::virsh(&["domstate", dom.name()]).unwrap();
        server.signal_sessions(nix::sys::signal::Signal::SIGCONT);
        assert!(wrote, "the guest's writes waited on the stalled repository");
        writer.join().unwrap();
        assert_eq!(state.trim(), "running", "the VM was never paused");
        backup.join().unwrap()
    });
    let made = result.unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(made.manifest.disks.len(), 2);
    let catalog = Catalog::new(e.images(), e.mounts());
    let report = catalog.verify(&repo, dom.name(), &made.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(report.ok(), "{report:?}");
}
