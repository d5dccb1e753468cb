//! Boot-verified backups on the lab (issue 13, part 3): a guest that boots from its own disk
//! (extlinux, the lab kernel) is backed up; its backup boots in a throwaway VM whose agent
//! answers (and runs a check); a backup of the zeroed boot disk fails with the console's last
//! lines; a VM without an agent is unverifiable, not good. Nothing of the VM or the backup is
//! changed, and nothing of the throwaway VM is left.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{CancelHandle, Hypervisor, LibvirtHypervisor, Throwaway, throwaway_definition};
use nasbak::nasbak_qemu_img::{ExportKind, QemuImg, ReadOnlyExport};
use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryMounts, SystemMounter};
use nasbak::{BackupRequest, BootResult, BootVerifyRequest, Engine};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts)
}

fn repo(dom: &LabDomain) -> BackupRepository {
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = nasbak::nasbak_repo::RepositoryKind::from_parts("shared", None).unwrap();
    BackupRepository::new("boot", kind, root.to_str().unwrap(), "", None).unwrap()
}

fn throwaways() -> Vec<String> {
    nasbak_testlab::virsh(&["list", "--all", "--name"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("nasbak-verify-"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_backup_boots_a_broken_one_fails_with_its_console_and_one_without_agent_is_unverifiable() {
    let dom = DomainSpec::new("boot").disk(DiskSpec::raw(64).bootable()).agent(true).boot_from_disk(true).create();
    let repo = repo(&dom);
    let e = engine(&dom.dir().join("runtime"));
    let cancel = CancelHandle::new();
    let backup = || {
        let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(ModeRequest::Full);
        e.backup(&request, &cancel, &mut |_| {}).unwrap().manifest.id
    };
    let good = backup();
    let before = (e.hypervisor().inactive_xml(dom.name()).unwrap(), fs::read(&dom.disks()[0].path).unwrap());
    let work = dom.dir().join("verify");
    let verify = |id: &str, timeout: u64, check: Option<&str>| {
        let mut r = BootVerifyRequest::new(repo.clone(), dom.name(), id)
            .with_work_dir(&work)
            .with_timeout(Duration::from_secs(timeout));
        if let Some(c) = check {
            r = r.with_check(c);
        }
        e.verify_boot(&r, &cancel).unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)))
    };

    let v = verify(&good, 180, None);
    assert_eq!(v.result, BootResult::Passed, "{v:?}");
    assert!(v.detail.contains("agent answered"), "{v:?}");
    // The time to boot (start to the agent's first answer) is recorded, within the whole.
    let booted = v.boot_millis.expect("a passed boot has its time to boot");
    assert!(booted > 0 && booted <= v.millis, "{v:?}");
    // A check run through the agent: one that succeeds, one that fails with its code.
    let v = verify(&good, 180, Some("grep -q console=ttyS0 /proc/cmdline"));
    assert_eq!(v.result, BootResult::Passed, "{v:?}");
    let v = verify(&good, 180, Some("echo not ready; exit 3"));
    assert_eq!(v.result, BootResult::Failed, "{v:?}");
    assert!(v.detail.contains("exit 3") && v.detail.contains("not ready"), "{v:?}");
    // Recorded with the backup, shown by list.
    let listed = e.catalog().entry(&repo, dom.name(), &good).unwrap();
    assert_eq!(listed.boot_verified.as_ref(), Some(&v));

    // An offering that asks for it: run-due boot-verifies the scheduled backup it made.
    let config = nasbak_service::config::Config::parse(
        &format!(
            "[[repository]]\nname = \"boot\"\ntype = \"shared\"\naddress = \"{}\"\n\
             [[offering]]\nname = \"gold\"\nrepository = \"boot\"\nboot_verify = true\n\
             boot_check = \"test -r /proc/cmdline\"\n\
             [assignments]\n\"{vm}\" = \"gold\"\n\
             [[schedule]]\nid = \"{vm}-daily\"\nvm = \"{vm}\"\nevery = \"daily\"\nat = \"02:30\"\nkeep = 10\n\
             created = \"2026-11-26T12:00:00Z\"\n",
            repo.shared_path().unwrap().display(),
            vm = dom.name()
        ),
        Path::new("boot.toml"),
    )
    .unwrap();
    let t = chrono::DateTime::parse_from_rfc3339("2026-11-27T02:30:00Z").unwrap().to_utc();
    let scheduled = engine(&dom.dir().join("runtime")).with_clock(nasbak::ManualClock::new(t));
    let state = dom.dir().join("state/state.json");
    let ran = nasbak_service::run_due(&scheduled, &config, &state, &cancel, &mut |_| {}).unwrap();
    let nasbak_service::RunDue::Ran(runs) = ran;
    assert_eq!(runs.len(), 1);
    let v = runs[0].boot_verified.clone().expect("the offering asks").expect("it ran");
    assert_eq!(v.result, BootResult::Passed, "{v:?}");
    assert!(!runs[0].failed());

    // A verification whose process was killed (no guard ran) left its throwaway domain running,
    // an export and its directory: the next verification sweeps them away.
    let abandoned = work.join(format!("nasbak-verify-0badc0de-{}", dom.name()));
    fs::create_dir_all(&abandoned).unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    fs::write(abandoned.join("owner"), dead.id().to_string()).unwrap();
    let socket = work.join("abandoned.sock");
    let file = fs::read_dir(repo.shared_path().unwrap().join(dom.name()).join(&good))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .unwrap();
    let export =
        ReadOnlyExport::start_as(ExportKind::Nbd, &file, "qcow2", &socket, Duration::from_secs(30), None).unwrap();
    fs::write(abandoned.join("sockets"), socket.to_str().unwrap()).unwrap();
    let name = abandoned.file_name().unwrap().to_str().unwrap().to_owned();
    let uuid = "0badc0de-0000-4000-8000-000000000000";
    let console = abandoned.join("console.log");
    let t = Throwaway { name: &name, uuid, disks: &[], console_log: &console, agent: false, nvram: None };
    let xml = throwaway_definition(&e.hypervisor().inactive_xml(dom.name()).unwrap(), &t).unwrap();
    e.hypervisor().start_with_xml(&xml).unwrap();
    assert!(throwaways().contains(&name));
    verify(&good, 180, None);
    assert!(!throwaways().contains(&name), "the abandoned throwaway domain is gone");
    assert!(!abandoned.exists() && !socket.exists());
    assert!(!Path::new(&format!("/proc/{}", export.pid)).exists(), "its export's daemon is stopped");

    // The boot disk zeroed, backed up: the backup does not boot, and the console says why.
    let zeroes = vec![0u8; 1 << 20];
    fs::write(&dom.disks()[0].path, [zeroes.as_slice(); 64].concat()).unwrap();
    let broken = backup();
    // Given 300 s (the default), it fails as soon as the firmware gives up.
    let began = std::time::Instant::now();
    let v = verify(&broken, 300, None);
    let took = began.elapsed();
    assert_eq!(v.result, BootResult::Failed, "{v:?}");
    eprintln!("the zeroed boot disk failed after {took:?}: {}", v.detail);
    assert!(took < Duration::from_secs(30), "a boot that cannot succeed fails fast: {took:?} ({v:?})");
    assert!(v.detail.contains("No bootable device"), "the firmware's words are said: {}", v.detail);
    assert_eq!(v.boot_millis, None, "it never booted");
    let console = v.console.join("\n");
    assert!(console.to_lowercase().contains("boot"), "the firmware's lines: {console}");

    // Nothing of the VM changed (but the disk this test zeroed), no throwaway VM or file left,
    // the backups verify.
    assert!(!dom.is_running());
    assert_eq!(e.hypervisor().inactive_xml(dom.name()).unwrap(), before.0);
    assert!(throwaways().iter().all(|t| !t.ends_with(dom.name())), "{:?}", throwaways());
    assert_eq!(fs::read_dir(&work).unwrap().count(), 0, "no overlay, export or log left");
    assert!(nasbak_testlab::pids_with_cmdline(&work.to_string_lossy()).is_empty());
    for id in [&good, &broken] {
        let r = e.catalog().verify(&repo, dom.name(), id, &cancel, &mut |_| {}).unwrap();
        assert!(r.ok(), "{r:?}");
    }
    drop(before);

    // A VM without a guest agent: unverifiable, not good (and not booted).
    let plain = DomainSpec::new("noagent").disk(DiskSpec::qcow2(16)).create();
    let prepo = self::repo(&plain);
    let id = e.backup(&BackupRequest::new(plain.name(), prepo.clone()), &cancel, &mut |_| {}).unwrap().manifest.id;
    let v =
        e.verify_boot(&BootVerifyRequest::new(prepo.clone(), plain.name(), &id).with_work_dir(&work), &cancel).unwrap();
    assert_eq!(v.result, BootResult::Unverifiable, "{v:?}");
    assert!(v.detail.contains("no guest agent"), "{v:?}");
}

#[test]
fn an_encrypted_and_compressed_backup_boots_read_with_the_repository_key() {
    use nasbak::nasbak_repo::{Compression, Encryption, KeySource, Protection};
    use std::os::unix::fs::PermissionsExt;
    let dom = DomainSpec::new("bootenc").disk(DiskSpec::raw(64).bootable()).agent(true).boot_from_disk(true).create();
    let key = dom.dir().join("boot.key");
    fs::write(&key, "the key of the boot-verified repository, 0123456789").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let protection = Protection::new(Compression::Zstd, Encryption::Luks, Some(KeySource::File(key))).unwrap();
    let repo = repo(&dom).with_protection(protection);
    let e = engine(&dom.dir().join("runtime"));
    let cancel = CancelHandle::new();
    let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(ModeRequest::Full);
    let made = e.backup(&request, &cancel, &mut |_| {}).unwrap();
    assert!(made.manifest.disks.iter().all(|d| d.stored_as == nasbak::nasbak_repo::FileFormat::CompressedInLuks));
    let r = BootVerifyRequest::new(repo, dom.name(), made.manifest.id.as_str())
        .with_work_dir(dom.dir().join("verify"))
        .with_timeout(Duration::from_secs(180));
    let v = e.verify_boot(&r, &cancel).unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(v.result, BootResult::Passed, "{v:?}");
    let left: Vec<String> = throwaways().into_iter().filter(|t| t.ends_with(dom.name())).collect();
    assert!(left.is_empty(), "{left:?}");
}
