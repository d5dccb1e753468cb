//! A UEFI VM's whole identity on the lab: its variable store (NVRAM, written by OVMF on its first
//! boot) and its emulated TPM's state (written by swtpm on its first start) are kept in every
//! backup, running and shut off, plain and encrypted, and come back byte for byte with their
//! owner and mode: into the VM after both were deleted, and into another VM. A boot
//! verification boots on copies of them; a backup made before they existed restores as before
//! and says so.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{CancelHandle, Domain, Hypervisor, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{
    BackupRepository, Compression, Encryption, FileFormat, KeySource, Manifest, MountTimeouts, Protection,
    RepositoryKind, RepositoryMounts, StateKind, SystemMounter,
};
use nasbak::{
    BackupRequest, BootResult, BootVerifyRequest, Catalog, Engine, FileStatus, InstantRestoreRequest, RestoreRequest,
};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

const BOOT: Duration = Duration::from_secs(240);

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts)
        .with_agent_timeout(Duration::from_secs(30))
        .with_runtime_dir(runtime)
}

fn repo(dom: &LabDomain, name: &str, key: Option<&Path>) -> BackupRepository {
    let root = dom.dir().join(format!("repo-{name}"));
    fs::create_dir_all(&root).unwrap();
    let repo = BackupRepository::new(name, RepositoryKind::Shared, root.to_str().unwrap(), "", None).unwrap();
    match key {
        Some(k) => repo.with_protection(
            Protection::new(Compression::Zstd, Encryption::Luks, Some(KeySource::File(k.to_owned()))).unwrap(),
        ),
        None => repo,
    }
}

/// The VM's NVRAM file and TPM state directory, as its definition names them.
fn places(hv: &LibvirtHypervisor, vm: &str) -> (PathBuf, PathBuf) {
    let d = Domain::parse(&hv.inactive_xml(vm).unwrap()).unwrap();
    (PathBuf::from(&d.nvram.as_ref().unwrap().path), d.tpm_state_dir().unwrap())
}

/// Each state file's bytes, mode and owner: the NVRAM, then the TPM's files by name.
fn snapshot(nvram: &Path, tpm: &Path) -> Vec<(String, Vec<u8>, u32, u32, u32)> {
    let one = |name: String, p: &Path| {
        let m = fs::metadata(p).unwrap();
        (name, fs::read(p).unwrap(), m.mode() & 0o7777, m.uid(), m.gid())
    };
    let mut out = vec![one("nvram".into(), nvram)];
    let mut names: Vec<String> = fs::read_dir(tpm)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    out.extend(names.into_iter().map(|n| one(n.clone(), &tpm.join(&n))));
    out
}

/// A backup's directory in one of the test's repositories (see `repo`).
fn backup_dir(dom: &LabDomain, repo: &BackupRepository, vm: &str, m: &Manifest) -> PathBuf {
    dom.dir().join(format!("repo-{}", repo.name())).join(vm).join(&m.id)
}

#[test]
fn a_uefi_vms_nvram_and_tpm_state_are_kept_restored_and_booted() {
    let dom =
        DomainSpec::new("uefistate").disk(DiskSpec::qcow2(16)).agent(true).uefi_with_tpm(true).running(true).create();
    dom.wait_for_agent(BOOT);
    let e = engine(&dom.dir().join("runtime"));
    let catalog = Catalog::new(e.images(), e.mounts());
    let hv = e.hypervisor();
    let cancel = CancelHandle::new();
    let key = dom.dir().join("backup.key");
    fs::write(&key, "the key of the UEFI VM's backups, 0123456789").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let (plain, sealed) = (repo(&dom, "plain", None), repo(&dom, "sealed", Some(&key)));
    let (nvram, tpm) = places(hv, dom.name());
    let backup = |repo: &BackupRepository, vm: &str| {
        let request = BackupRequest::new(vm, repo.clone()).with_mode(ModeRequest::Full);
        e.backup(&request, &cancel, &mut |_| {}).unwrap().manifest
    };

    // Running: both kept, read as the job started; plain beside the disks, encrypted (a LUKS
    // qcow2 stock qemu-img opens with the key) where the repository encrypts.
    let live = backup(&plain, dom.name());
    let kinds: Vec<(StateKind, &str)> = live.state.iter().map(|s| (s.kind, s.file.as_str())).collect();
    assert_eq!(kinds, [(StateKind::Nvram, "state.nvram"), (StateKind::Tpm, "state.tpm.tpm2-00.permall")]);
    let dir = backup_dir(&dom, &plain, dom.name(), &live);
    assert_eq!(fs::read(dir.join("state.nvram")).unwrap(), fs::read(&nvram).unwrap(), "no firmware write since boot");
    assert_eq!(fs::metadata(dir.join("state.tpm.tpm2-00.permall")).unwrap().mode() & 0o777, 0o600);
    let sealed_live = backup(&sealed, dom.name());
    assert!(sealed_live.state.iter().all(|s| s.stored_as == FileFormat::Encrypted), "{:?}", sealed_live.state);
    let sealed_dir = backup_dir(&dom, &sealed, dom.name(), &sealed_live);
    let stored = fs::read(sealed_dir.join("state.nvram")).unwrap();
    assert_eq!(&stored[..4], b"QFI\xfb", "a qcow2");
    // OVMF's variables are named in UTF-16: the VM's boot order is in its store, never in the
    // encrypted copy.
    let name: Vec<u8> = "BootOrder".encode_utf16().flat_map(u16::to_le_bytes).collect();
    let has = |bytes: &[u8]| bytes.windows(name.len()).any(|w| w == name.as_slice());
    assert!(has(&fs::read(&nvram).unwrap()), "the firmware wrote its boot order");
    assert!(!has(&stored), "the encrypted copy holds no variable in the clear");
    let info = nasbak::nasbak_process::ExternalCommand::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(sealed_dir.join("state.tpm.tpm2-00.permall"))
        .run()
        .unwrap()
        .stdout;
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("\"encrypted\": true"), "{info}");
    for (repo, m) in [(&plain, &live), (&sealed, &sealed_live)] {
        let report = catalog.verify(repo, dom.name(), &m.id, &cancel, &mut |_| {}).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.files.iter().filter(|f| f.file.starts_with("state.")).count(), 2, "{report:?}");
    }

    // Shut off: read before the disks, byte for byte what the VM left.
    dom.destroy();
    let before = snapshot(&nvram, &tpm);
    let off = backup(&plain, dom.name());
    let off_dir = backup_dir(&dom, &plain, dom.name(), &off);
    assert_eq!(fs::read(off_dir.join("state.nvram")).unwrap(), before[0].1);
    assert_eq!(fs::read(off_dir.join("state.tpm.tpm2-00.permall")).unwrap(), before[1].1);

    // A damaged state file is found by verify, and refused by a restore before anything changes.
    let permall = off_dir.join("state.tpm.tpm2-00.permall");
    let good = fs::read(&permall).unwrap();
    let mut bad = good.clone();
    bad[10] ^= 0xff;
    fs::write(&permall, &bad).unwrap();
    let report = catalog.verify(&plain, dom.name(), &off.id, &cancel, &mut |_| {}).unwrap();
    let verdict = report.files.iter().find(|f| f.file == "state.tpm.tpm2-00.permall").unwrap();
    assert_eq!(verdict.status, FileStatus::Differs, "{report:?}");
    let disk_before = fs::read(&dom.disks()[0].path).unwrap();
    let err = e.restore(&RestoreRequest::new(plain.clone(), dom.name(), &off.id), &cancel, &mut |_| {}).unwrap_err();
    let said = nasbak::chain(&err);
    assert!(said.contains("state.tpm.tpm2-00.permall is damaged"), "{said}");
    assert_eq!(fs::read(&dom.disks()[0].path).unwrap(), disk_before, "nothing written");
    fs::write(&permall, &good).unwrap();

    // Both deleted, then restored: byte for byte, owner and mode; the VM starts with them.
    fs::remove_file(&nvram).unwrap();
    fs::remove_dir_all(tpm.parent().unwrap()).unwrap();
    let restored = e.restore(&RestoreRequest::new(plain.clone(), dom.name(), &off.id), &cancel, &mut |_| {}).unwrap();
    assert_eq!(restored.state.len(), 2, "{restored:?}");
    assert!(restored.notes.is_empty(), "{:?}", restored.notes);
    assert_eq!(snapshot(&nvram, &tpm), before, "the NVRAM and the TPM state back as they were");
    dom.start();
    dom.wait_for_agent(BOOT);
    dom.destroy();

    // From the encrypted running backup: what it kept, decrypted.
    let restored =
        e.restore(&RestoreRequest::new(sealed.clone(), dom.name(), &sealed_live.id), &cancel, &mut |_| {}).unwrap();
    assert_eq!(restored.state.len(), 2);
    for s in &sealed_live.state {
        let path = if s.kind == StateKind::Nvram { nvram.clone() } else { tpm.join(&s.name) };
        assert_eq!(blake3::hash(&fs::read(&path).unwrap()).to_hex().to_string(), s.checksum.value, "{}", s.file);
    }

    // The key rotated: the state files with the disks; they then open with the new key only.
    let new_key = dom.dir().join("new.key");
    fs::write(&new_key, "the next key of the UEFI VM's backups, 98765").unwrap();
    fs::set_permissions(&new_key, fs::Permissions::from_mode(0o600)).unwrap();
    let rotated = catalog.rotate_key(&sealed, &new_key, &cancel).unwrap();
    assert_eq!((rotated.files, rotated.rotated), (3, 3), "one disk and two state files: {rotated:?}");
    let rekeyed = repo(&dom, "sealed", Some(&new_key));
    let report = catalog.verify(&rekeyed, dom.name(), &sealed_live.id, &cancel, &mut |_| {}).unwrap();
    assert!(report.ok() && report.files.iter().all(|f| f.checksum_ok == Some(true)), "{report:?}");
    let old_key = catalog.check_key(&rekeyed, Some(&key)).unwrap();
    assert!(old_key.backups[0].not_opening.iter().any(|f| f == "state.nvram"), "{old_key:?}");

    // Another UEFI VM, defined and never started: its backup has no state (made before it
    // existed) and says why; a restore of it keeps the state the VM has by then, and says so.
    let other = DomainSpec::new("uefiother").disk(DiskSpec::qcow2(16)).agent(true).uefi_with_tpm(true).create();
    let early = backup(&plain, other.name());
    assert!(early.state.is_empty(), "{:?}", early.state);
    let note = early.state_note.clone().unwrap_or_default();
    assert!(note.contains("does not exist yet") && note.contains("no state yet"), "{note}");
    // Restored into it: the original's identity, in the other VM's own places.
    let into = RestoreRequest::new(plain.clone(), dom.name(), &off.id).into_vm(other.name());
    let restored = e.restore(&into, &cancel, &mut |_| {}).unwrap();
    assert_eq!(restored.state.len(), 2);
    let (other_nvram, other_tpm) = places(hv, other.name());
    assert_ne!(other_tpm, tpm);
    assert_eq!(fs::read(&other_nvram).unwrap(), before[0].1);
    assert_eq!(fs::read(other_tpm.join("tpm2-00.permall")).unwrap(), before[1].1);
    other.start();
    other.wait_for_agent(BOOT);
    other.destroy();
    let own = fs::read(&other_nvram).unwrap();
    let old = e.restore(&RestoreRequest::new(plain.clone(), other.name(), &early.id), &cancel, &mut |_| {}).unwrap();
    assert!(old.state.is_empty());
    assert!(old.notes.iter().any(|n| n.contains("holds no NVRAM or TPM state")), "{:?}", old.notes);
    assert_eq!(fs::read(&other_nvram).unwrap(), own, "the VM's own NVRAM left as it was");

    // Boot verification: the throwaway boots on copies of the backup's NVRAM and TPM state;
    // neither the backup's files nor the VM's change, and its TPM state directory goes.
    let kept = fs::read(off_dir.join("state.nvram")).unwrap();
    let vm_now = snapshot(&nvram, &tpm);
    let swtpm_dirs = || -> std::collections::BTreeSet<String> {
        fs::read_dir("/var/lib/libvirt/swtpm")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let dirs_before = swtpm_dirs();
    let request = BootVerifyRequest::new(plain.clone(), dom.name(), &off.id)
        .with_work_dir(dom.dir().join("verify"))
        .with_timeout(BOOT);
    let verified = e.verify_boot(&request, &cancel).unwrap();
    assert_eq!(verified.result, BootResult::Passed, "{verified:?}");
    assert_eq!(fs::read(off_dir.join("state.nvram")).unwrap(), kept, "the backup is never written");
    assert_eq!(snapshot(&nvram, &tpm), vm_now, "the VM's own state untouched");
    // The other test of this binary defines and removes VMs meanwhile: a directory that is new
    // must belong to a VM still defined, never to the throwaway (undefined by now).
    let defined = nasbak_testlab::virsh(&["list", "--all", "--uuid"]).unwrap();
    let left: Vec<String> =
        swtpm_dirs().difference(&dirs_before).filter(|d| !defined.contains(d.as_str())).cloned().collect();
    assert!(left.is_empty(), "the throwaway's TPM state removed with it: {left:?} left");
}

/// An instant restore runs the VM on the backup's NVRAM and TPM state (put in its places before
/// it starts); a cancel gives the VM back its own, byte for byte; a finish leaves it the
/// backup's and nothing of its own set aside.
#[test]
fn an_instant_restore_runs_on_the_backups_state_and_a_cancel_gives_the_vms_own_back() {
    let dom =
        DomainSpec::new("uefiinst").disk(DiskSpec::qcow2(16)).agent(true).uefi_with_tpm(true).running(true).create();
    dom.wait_for_agent(BOOT);
    dom.destroy();
    let e = engine(&dom.dir().join("runtime"));
    let cancel = CancelHandle::new();
    let plain = repo(&dom, "plain", None);
    let request = BackupRequest::new(dom.name(), plain.clone()).with_mode(ModeRequest::Full);
    let m = e.backup(&request, &cancel, &mut |_| {}).unwrap().manifest;
    let (nvram, tpm) = places(e.hypervisor(), dom.name());
    let kept = snapshot(&nvram, &tpm);
    // Since the backup the VM's own state became something else entirely.
    fs::write(&nvram, vec![0x5a; kept[0].1.len()]).unwrap();
    fs::write(tpm.join("tpm2-00.permall"), b"the VM's own TPM state").unwrap();
    let own = snapshot(&nvram, &tpm);
    let work = dom.dir().join("instant");
    let instant =
        InstantRestoreRequest::new(RestoreRequest::new(plain.clone(), dom.name(), &m.id)).with_work_dir(&work);

    e.instant_restore(&instant, &cancel).unwrap();
    let running = snapshot(&nvram, &tpm);
    assert_ne!(running[0].1, own[0].1, "the VM started on the backup's NVRAM");
    assert_ne!(running[1].1, own[1].1, "and on its TPM state");
    dom.wait_for_agent(BOOT);
    e.instant_cancel(&work, dom.name()).unwrap();
    assert_eq!(snapshot(&nvram, &tpm), own, "cancelled: the VM's own state back as it was");

    e.instant_restore(&instant, &cancel).unwrap();
    dom.wait_for_agent(BOOT);
    e.instant_finish(&work, dom.name(), BOOT, &cancel, &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    let finished = snapshot(&nvram, &tpm);
    assert_ne!(finished[0].1, own[0].1, "finished: the VM keeps the backup's NVRAM");
    assert!(!work.join(dom.name()).exists(), "nothing of the VM's own state left aside");
    dom.destroy();
}
