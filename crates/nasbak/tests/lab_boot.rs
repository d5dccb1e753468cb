//! Boot-verified backups on the lab (issue 13, part 3): a guest that boots from its own disk
//! (extlinux, the lab kernel) is backed up; its backup boots in a throwaway VM whose agent
//! answers (and runs a check); a backup of the zeroed boot disk fails with the console's last
//! lines; a VM without an agent is unverifiable, not good. Nothing of the VM or the backup is
//! changed, and nothing of the throwaway VM is left.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{CancelHandle, Hypervisor, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::QemuImg;
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
    // A check run through the agent: one that succeeds, one that fails with its code.
    let v = verify(&good, 180, Some("grep -q console=ttyS0 /proc/cmdline"));
    assert_eq!(v.result, BootResult::Passed, "{v:?}");
    let v = verify(&good, 180, Some("echo not ready; exit 3"));
    assert_eq!(v.result, BootResult::Failed, "{v:?}");
    assert!(v.detail.contains("exit 3") && v.detail.contains("not ready"), "{v:?}");
    // Recorded with the backup, shown by list.
    let listed = e.catalog().entry(&repo, dom.name(), &good).unwrap();
    assert_eq!(listed.boot_verified.as_ref(), Some(&v));

    // The boot disk zeroed, backed up: the backup does not boot, and the console says why.
    let zeroes = vec![0u8; 1 << 20];
    fs::write(&dom.disks()[0].path, [zeroes.as_slice(); 64].concat()).unwrap();
    let broken = backup();
    let v = verify(&broken, 40, None);
    assert_eq!(v.result, BootResult::Failed, "{v:?}");
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
