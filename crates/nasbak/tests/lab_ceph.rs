//! VMs with Ceph RBD disks against the lab's live cluster (`cargo xtask lab ceph`, which runs
//! these tests with the `ceph-lab` feature): real libvirt, QEMU with librbd, qemu-img and the
//! `rbd` tool. The disks reach the cluster as `client.nasbak-vm` through the lab's libvirt
//! secret; nasbak finds the key there by itself (the tests read and write the images as the
//! admin, so they never hand nasbak a key).
#![cfg(feature = "ceph-lab")]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nasbak::chain::ModeRequest;
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, Hypervisor, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::{ImageFormat, ImageLocation, QemuImg};
use nasbak::nasbak_repo::{
    BackupMethod, BackupMode, BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter,
};
use nasbak::{
    BackupError, BackupOutcome, BackupRequest, BootResult, BootVerifyRequest, Engine, InstantRestoreRequest,
    RestoreRequest, VolumeRestoreRequest,
};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI, ceph};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts).with_agent_timeout(Duration::from_secs(10))
}

fn repo(dom: &LabDomain) -> (BackupRepository, PathBuf) {
    let root = dom.dir().join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = RepositoryKind::from_parts("shared", None).unwrap();
    (BackupRepository::new("ceph", kind, root.to_str().unwrap(), "", None).unwrap(), dom.dir().join("runtime"))
}

/// A VM with a qcow2 root disk (vda) and a 64 MiB RBD data disk (vdb) full of pseudo-random
/// bytes; neither is mounted by the guest, so a backup must equal them byte for byte.
fn rbd_vm(tag: &str) -> LabDomain {
    // ACPI: a running VM hot-plugs a restored volume.
    let dom = DomainSpec::new(tag).disk(DiskSpec::qcow2(32)).disk(DiskSpec::rbd(64)).acpi(true).create();
    let seed = &dom.disks()[1].path;
    nasbak_testlab::fill_pseudo_random(seed, 64);
    ceph::import(seed, &rbd_image(&dom));
    dom
}

fn rbd_image(dom: &LabDomain) -> String {
    dom.disks()[1].rbd.as_deref().unwrap().trim_start_matches("vms/").to_owned()
}

fn backup(e: &LabEngine, dom: &LabDomain, repo: &BackupRepository, mode: ModeRequest) -> BackupOutcome {
    let request = BackupRequest::new(dom.name(), repo.clone())
        .with_quiesce(QuiescePolicy::Off)
        .with_mode(mode)
        .with_timeout(Duration::from_secs(300));
    e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap_or_else(|e| panic!("{e:#?}"))
}

/// `qemu-img compare` of a backup file (qcow2) with an RBD image read as the admin.
fn same_as_rbd(backup_file: &Path, pool_image: &str) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(backup_file)
        .arg(ceph::admin_filename(pool_image))
        .status()
        .unwrap();
    out.success()
}

/// `qemu-img compare` of a raw file with an RBD image read as the admin.
fn raw_same_as_rbd(raw: &Path, pool_image: &str) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(raw)
        .arg(ceph::admin_filename(pool_image))
        .status()
        .unwrap()
        .success()
}

fn backup_file(repo: &BackupRepository, outcome: &BackupOutcome, target: &str) -> PathBuf {
    let disk = outcome.manifest.disks.iter().find(|d| d.target == target).unwrap();
    repo.shared_path().unwrap().join(&outcome.relative_dir).join(&disk.file)
}

/// The nasbak snapshots on `pool/image`, by name.
fn nasbak_snapshots(pool_image: &str) -> Vec<String> {
    let out = ceph::rbd(&["snap", "ls", "--format", "json", pool_image]).unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.iter().filter_map(|s| s["name"].as_str()).filter(|n| n.starts_with("nasbak-")).map(str::to_owned).collect()
}

/// Writes `pattern` over `len` bytes at `offset` of `pool/image` as the admin (the VM shut
/// off).
fn write_rbd(pool_image: &str, pattern: u8, offset: &str, len: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P {pattern:#x} {offset} {len}")])
        .arg(ceph::admin_filename(pool_image))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn disk_of(outcome: &BackupOutcome, target: &str) -> nasbak::nasbak_repo::ManifestDisk {
    outcome.manifest.disks.iter().find(|d| d.target == target).unwrap().clone()
}

#[test]
fn an_rbd_disk_is_backed_up_from_snapshots_running_and_shut_off_and_incrementals_hold_only_the_changes() {
    let dom = rbd_vm("rbdbk");
    let image = rbd_image(&dom);
    let pool_image = format!("vms/{image}");
    let (repo, runtime) = repo(&dom);
    let e = engine(&runtime);
    dom.start();
    // Running: the qcow2 disk through the push job, the RBD disk from a snapshot taken as the
    // job starts, which stays on the image for the next incremental.
    let first = backup(&e, &dom, &repo, ModeRequest::Auto);
    assert_eq!(first.manifest.method, BackupMethod::PushJob);
    assert_eq!(first.manifest.disks.len(), 2);
    assert!(same_as_rbd(&backup_file(&repo, &first, "vdb"), &pool_image), "the RBD backup differs from the image");
    let vdb = disk_of(&first, "vdb");
    assert!(vdb.source.starts_with("rbd:vms/"), "{vdb:?}");
    let snapshot = vdb.rbd_snapshot.clone().expect("the snapshot recorded");
    assert_eq!(snapshot.name, format!("nasbak-{}", first.manifest.id));
    assert_eq!(nasbak_snapshots(&pool_image), [format!("nasbak-{}", first.manifest.id)]);
    // 1 MiB written by the guest on each disk: both incremental; the RBD disk's file holds
    // that MiB, not the 64 MiB image.
    dom.write_through_qemu(0, 0x5a, "0", "1M");
    dom.write_through_qemu(1, 0x5b, "8M", "1M");
    let second = backup(&e, &dom, &repo, ModeRequest::Auto);
    assert_eq!(second.manifest.mode, BackupMode::Incremental, "{:?}", second.manifest);
    assert_eq!(disk_of(&second, "vda").mode, BackupMode::Incremental);
    let vdb = disk_of(&second, "vdb");
    assert_eq!(vdb.mode, BackupMode::Incremental, "{vdb:?}");
    assert!(vdb.size < 8 << 20, "the incremental RBD file is {} bytes", vdb.size);
    assert!(same_as_rbd(&backup_file(&repo, &second, "vdb"), &pool_image), "the chain differs from the image");
    // The first's snapshot went once the second was in place.
    assert_eq!(nasbak_snapshots(&pool_image), [format!("nasbak-{}", second.manifest.id)]);
    // Shut off: the same snapshots, read with the key libvirt keeps, which is never on a
    // command line (rbd and qemu-img get it in a keyring file). The domain redefined first (as
    // an orchestrator does at every start): the chain goes on, the snapshot is on the image.
    dom.destroy();
    let xml = nasbak_testlab::virsh(&["dumpxml", "--inactive", dom.name()]).unwrap();
    let file = dom.dir().join("redefined.xml");
    fs::write(&file, xml).unwrap();
    nasbak_testlab::virsh(&["undefine", dom.name(), "--checkpoints-metadata"]).unwrap();
    nasbak_testlab::virsh(&["define", file.to_str().unwrap()]).unwrap();
    write_rbd(&pool_image, 0x33, "20M", "2M");
    write_rbd(&pool_image, 0x00, "8M", "512k");
    let key = ceph::key("nasbak-vm");
    let (third, seen) = nasbak_testlab::watching_argv(&key, || backup(&e, &dom, &repo, ModeRequest::Auto));
    assert!(!seen, "the key appeared on a command line");
    assert_eq!(third.manifest.method, BackupMethod::QemuImg);
    let vdb = disk_of(&third, "vdb");
    assert_eq!(vdb.mode, BackupMode::Incremental, "{vdb:?}");
    assert!(vdb.size < 8 << 20, "the incremental RBD file is {} bytes", vdb.size);
    assert!(same_as_rbd(&backup_file(&repo, &third, "vdb"), &pool_image), "the shut-off chain differs");
    let keyrings: Vec<_> = fs::read_dir(runtime.join("private")).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(keyrings.iter().all(|e: &fs::DirEntry| !e.file_name().to_string_lossy().contains("keyring")));
    // Restored from the end of that chain, after the image was damaged.
    write_rbd(&pool_image, 0x77, "0", "64M");
    e.restore(&RestoreRequest::new(repo.clone(), dom.name(), &third.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(same_as_rbd(&backup_file(&repo, &third, "vdb"), &pool_image), "the chain was not restored");
    // The snapshot removed by hand: a full, saying why.
    ceph::rbd(&["snap", "rm", "--no-progress", &format!("{pool_image}@nasbak-{}", third.manifest.id)]).unwrap();
    let fourth = backup(&e, &dom, &repo, ModeRequest::Auto);
    let vdb = disk_of(&fourth, "vdb");
    assert_eq!(vdb.mode, BackupMode::Full);
    let reason = vdb.full_reason.or(fourth.manifest.full_reason.clone()).unwrap_or_default();
    assert!(reason.contains("no longer holds the snapshot"), "{reason}");
    // The image replaced under its name (removed, created again): a full, saying why.
    let raw = dom.dir().join("again.raw");
    ceph::export(&pool_image, &raw);
    ceph::rbd(&["snap", "purge", "--no-progress", &pool_image]).unwrap();
    ceph::remove(&image);
    ceph::import(&raw, &image);
    let fifth = backup(&e, &dom, &repo, ModeRequest::Auto);
    let vdb = disk_of(&fifth, "vdb");
    assert_eq!(vdb.mode, BackupMode::Full);
    let reason = vdb.full_reason.or(fifth.manifest.full_reason.clone()).unwrap_or_default();
    assert!(reason.contains("replaced"), "{reason}");
    assert!(same_as_rbd(&backup_file(&repo, &fifth, "vdb"), &pool_image));
    assert_eq!(nasbak_snapshots(&pool_image), [format!("nasbak-{}", fifth.manifest.id)]);
    // A backup cancelled while it copies the RBD disk: its snapshot goes with it, the last
    // backup's stays, and the next builds on that one.
    write_rbd(&pool_image, 0x44, "40M", "1M");
    let cancel = CancelHandle::new();
    let request = BackupRequest::new(dom.name(), repo.clone()).with_quiesce(QuiescePolicy::Off);
    let err = e
        .backup(&request, &cancel, &mut |p| {
            if p.disk.as_deref() == Some("vdb") {
                cancel.cancel();
            }
        })
        .unwrap_err();
    assert!(matches!(err, BackupError::Cancelled), "{err:#?}");
    assert_eq!(nasbak_snapshots(&pool_image), [format!("nasbak-{}", fifth.manifest.id)]);
    let sixth = backup(&e, &dom, &repo, ModeRequest::Auto);
    assert_eq!(disk_of(&sixth, "vdb").mode, BackupMode::Incremental);
    assert!(same_as_rbd(&backup_file(&repo, &sixth, "vdb"), &pool_image));
    // What a killed backup leaves (its `.partial` directory and its snapshot on the image): the
    // next backup removes both, and builds on the last complete one.
    let killed = format!("{}-9", sixth.manifest.id);
    fs::create_dir(repo.shared_path().unwrap().join(dom.name()).join(format!("{killed}.partial"))).unwrap();
    ceph::rbd(&["snap", "create", "--no-progress", &format!("{pool_image}@nasbak-{killed}")]).unwrap();
    write_rbd(&pool_image, 0x45, "44M", "1M");
    let seventh = backup(&e, &dom, &repo, ModeRequest::Auto);
    assert_eq!(seventh.manifest.parent.as_deref(), Some(sixth.manifest.id.as_str()));
    assert!(seventh.cleaned.iter().any(|c| c.contains(&format!("nasbak-{killed}"))), "{:?}", seventh.cleaned);
    assert_eq!(nasbak_snapshots(&pool_image), [format!("nasbak-{}", seventh.manifest.id)]);
    assert!(same_as_rbd(&backup_file(&repo, &seventh, "vdb"), &pool_image));
}

/// Writes `pattern` over `len` bytes at `offset` of the running domain `vm`'s disk whose node
/// reads `needle` (a path, an image name), through the guest's own device (HMP `qemu-io`).
fn write_via_device(vm: &str, needle: &str, pattern: u8, offset: &str, len: &str) {
    let info = nasbak_testlab::virsh(&["qemu-monitor-command", vm, "--hmp", "info block"]).unwrap();
    let device = info
        .lines()
        .skip_while(|l| !l.contains(needle))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .find_map(|l| l.trim().strip_prefix("Attached to:"))
        .unwrap_or_else(|| panic!("no device for {needle} in {info}"))
        .trim()
        .to_owned();
    let command = format!("qemu-io -d {device} \"write -P {pattern:#x} {offset} {len}\"");
    let out = nasbak_testlab::virsh(&["qemu-monitor-command", vm, "--hmp", &command]).unwrap();
    assert!(out.trim().is_empty(), "{command}: {out}");
}

#[test]
fn an_rbd_vm_is_boot_verified_without_the_cluster_and_restored_instantly_onto_a_new_image() {
    let dom = DomainSpec::new("rbdinstant").disk(DiskSpec::qcow2(32)).disk(DiskSpec::rbd(64)).agent(true).create();
    let seed = &dom.disks()[1].path;
    nasbak_testlab::fill_pseudo_random(seed, 64);
    let image = rbd_image(&dom);
    let pool_image = format!("vms/{image}");
    ceph::import(seed, &image);
    let (repo, runtime) = repo(&dom);
    let e = engine(&runtime);
    let saved = backup(&e, &dom, &repo, ModeRequest::Full);
    let id = saved.manifest.id.clone();
    // The image gone (its snapshot too): boot verification runs on overlays over the backup
    // and never needs the cluster.
    ceph::rbd(&["snap", "purge", "--no-progress", &pool_image]).unwrap();
    ceph::remove(&image);
    assert!(!ceph::exists(&pool_image));
    let work = dom.dir().join("verify");
    let v = e
        .verify_boot(
            &BootVerifyRequest::new(repo.clone(), dom.name(), &id)
                .with_work_dir(&work)
                .with_timeout(Duration::from_secs(180)),
            &CancelHandle::new(),
        )
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(v.result, BootResult::Passed, "{v:?}");
    assert!(!ceph::exists(&pool_image), "boot verification created nothing on the cluster");
    // Instant restore: the VM runs on overlays at once; the finish makes the image anew from the
    // backup and mirrors what the guest wrote meanwhile onto it.
    let work = dom.dir().join("instant");
    let request = InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), dom.name(), &id)).with_work_dir(&work);
    let state =
        e.instant_restore(&request, &CancelHandle::new()).unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert!(dom.is_running());
    let vdb = state.disks.iter().find(|d| d.target == "vdb").unwrap();
    assert_eq!(vdb.rbd.as_deref(), Some(pool_image.as_str()), "{vdb:?}");
    write_via_device(dom.name(), "vdb.overlay", 0x5c, "4M", "1M");
    let done = e
        .instant_finish(&work, dom.name(), Duration::from_secs(300), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(done.restored.len(), 2);
    let live = e.hypervisor().domain_xml(dom.name()).unwrap();
    assert!(live.contains(&pool_image) && !live.contains(&*work.to_string_lossy()), "{live}");
    assert!(live.contains(ceph::SECRET_USAGE), "reached with its <auth>: {live}");
    // Written after the pivot, the guest's writes go to the image itself.
    write_via_device(dom.name(), &image, 0x5d, "8M", "1M");
    dom.destroy();
    // The image holds the backup, the write made before the pivot, and the one after.
    let want = dom.dir().join("want.raw");
    let made = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(backup_file(&repo, &saved, "vdb"))
        .arg(&want)
        .status()
        .unwrap();
    assert!(made.success());
    for (pattern, offset) in [(0x5c, "4M"), (0x5d, "8M")] {
        let w = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {pattern:#x} {offset} 1M")])
            .arg(&want)
            .output()
            .unwrap();
        assert!(w.status.success());
    }
    assert!(raw_same_as_rbd(&want, &pool_image), "the image is not the backup with the guest's writes");
    assert!(!work.join(dom.name()).exists(), "nothing left of the instant restore");
    // Paths out, as for a block device: the VM stopped before the finish (its writes gone with
    // it) gets nothing copied over its image and can only be cancelled; a cancel stops the VM,
    // leaves the image as it was and marked (a finish writes it in place), and nothing behind.
    let image_before = dom.dir().join("image-before.raw");
    ceph::export(&pool_image, &image_before);
    e.instant_restore(&request, &CancelHandle::new()).unwrap();
    dom.destroy();
    let err =
        e.instant_finish(&work, dom.name(), Duration::from_secs(60), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(nasbak::chain(&err).contains("can only be cancelled"), "{}", nasbak::chain(&err));
    e.instant_restore(&request, &CancelHandle::new()).unwrap_err();
    let cancelled = e.instant_cancel(&work, dom.name()).unwrap();
    assert!(
        cancelled.partly_written.iter().any(|p| p.to_string_lossy() == format!("rbd:{pool_image}")),
        "{cancelled:?}"
    );
    assert!(!dom.is_running() && !work.join(dom.name()).exists());
    assert!(raw_same_as_rbd(&image_before, &pool_image), "the image changed although nothing was finished");
}

#[test]
fn the_reference_systems_backups_of_an_rbd_vm_are_verified_and_restored_and_never_written() {
    let dom = rbd_vm("rbdref");
    let image = rbd_image(&dom);
    let pool_image = format!("vms/{image}");
    let (repo, runtime) = repo(&dom);
    let e = engine(&runtime);
    let root = repo.shared_path().unwrap().to_owned();
    // As the script names them: the root disk by its file's name, the RBD disk by its image's.
    let root_stem = dom.disks()[0].path.file_stem().unwrap().to_string_lossy().into_owned();
    let files = [("vda", format!("root.{root_stem}.qcow2")), ("vdb", format!("datadisk.{image}.qcow2"))];
    // Running: the push job (4.22 restores these onto RBD).
    dom.start();
    let running = root.join(dom.name()).join("2026.02.01.00.00.00");
    nasbak_testlab::reference::push_backup(&dom, &running, &files, None, None);
    dom.destroy();
    let image_then = dom.dir().join("image-then.raw");
    ceph::export(&pool_image, &image_then);
    // Shut off: qemu-img convert from the rbd: filename, and no domain-config.xml.
    write_rbd(&pool_image, 0x66, "16M", "1M");
    let stopped = root.join(dom.name()).join("2026.02.02.00.00.00");
    nasbak_testlab::reference::convert(&dom.disks()[0].path.to_string_lossy(), &stopped, &files[0].1);
    nasbak_testlab::reference::convert(&ceph::admin_filename(&pool_image), &stopped, &files[1].1);
    let image_later = dom.dir().join("image-later.raw");
    ceph::export(&pool_image, &image_later);
    let before = fs::read_dir(root.join(dom.name()))
        .unwrap()
        .flatten()
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten().map(|f| f.path()).collect::<Vec<_>>())
        .map(|p| (p.clone(), nasbak::sha256_file(&p).unwrap()))
        .collect::<Vec<_>>();
    for id in ["2026.02.01.00.00.00", "2026.02.02.00.00.00"] {
        let report = e.catalog().verify(&repo, dom.name(), id, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(report.ok(), "{id}: {report:?}");
    }
    // The running VM's backup restored whole onto the RBD image in place.
    write_rbd(&pool_image, 0x77, "0", "64M");
    e.restore(&RestoreRequest::new(repo.clone(), dom.name(), "2026.02.01.00.00.00"), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert!(raw_same_as_rbd(&image_then, &pool_image), "the image is not the backup's");
    // The shut-off VM's backup (no saved definition: the volume found among the VM's disks)
    // restored as a new RBD image.
    let new_image = format!("{image}-ref");
    let to = ImageLocation::Rbd(nasbak::nasbak_qemu_img::RbdSpec::new("vms", &new_image));
    let request = VolumeRestoreRequest::new(repo.clone(), dom.name(), "2026.02.02.00.00.00", "vdb", to);
    let restored = e.restore_volume(&request, &CancelHandle::new(), &mut |_| {});
    let same = restored.is_ok() && raw_same_as_rbd(&image_later, &format!("vms/{new_image}"));
    ceph::remove(&new_image);
    assert!(same, "{:?}", restored.map_err(|e| nasbak::chain(&e)));
    // nasbak's first backup of the VM: a full, saying why; theirs as they were.
    let ours = backup(&e, &dom, &repo, ModeRequest::Auto);
    assert_eq!(ours.manifest.mode, BackupMode::Full);
    assert!(ours.manifest.full_reason.clone().unwrap_or_default().contains("reference system"), "{:?}", ours.manifest);
    for (path, digest) in &before {
        assert_eq!(&nasbak::sha256_file(path).unwrap(), digest, "{} was written", path.display());
    }
}

#[test]
fn rbd_incrementals_on_compressed_and_encrypted_repositories_restore_equal() {
    use nasbak::nasbak_repo::{Compression, Encryption, KeySource, Protection};
    use std::os::unix::fs::PermissionsExt;
    let dom = rbd_vm("rbdprot");
    let pool_image = format!("vms/{}", rbd_image(&dom));
    let key = dom.dir().join("key");
    fs::write(&key, "a-long-enough-passphrase-for-the-lab-0123456789").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let e = engine(&dom.dir().join("runtime"));
    let layouts = [
        (Compression::Zstd, Encryption::None),
        (Compression::None, Encryption::Luks),
        (Compression::Zstd, Encryption::Luks),
    ];
    for (i, (compression, encryption)) in layouts.into_iter().enumerate() {
        let root = dom.dir().join(format!("repo{i}"));
        fs::create_dir_all(&root).unwrap();
        let k = (encryption == Encryption::Luks).then(|| KeySource::File(key.clone()));
        let repo = BackupRepository::new(&format!("p{i}"), RepositoryKind::Shared, root.to_str().unwrap(), "", None)
            .unwrap()
            .with_protection(Protection::new(compression, encryption, k).unwrap());
        backup(&e, &dom, &repo, ModeRequest::Full);
        write_rbd(&pool_image, 0x20 + i as u8, "4M", "1M");
        write_rbd(&pool_image, 0x30 + i as u8, "9000k", "3k");
        let second = backup(&e, &dom, &repo, ModeRequest::Auto);
        let vdb = disk_of(&second, "vdb");
        assert_eq!(vdb.mode, BackupMode::Incremental, "{compression:?}/{encryption:?}: {vdb:?}");
        // Allocated, not apparent: a LUKS container is sparse and sized for the worst case.
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&fs::metadata(backup_file(&repo, &second, "vdb")).unwrap()) * 512;
        assert!(allocated < 8 << 20, "{compression:?}/{encryption:?}: {allocated} bytes");
        let to = dom.dir().join(format!("restored{i}.raw"));
        let request = VolumeRestoreRequest::new(
            repo.clone(),
            dom.name(),
            &second.manifest.id,
            "vdb",
            ImageLocation::Path(to.clone()),
        )
        .with_format(ImageFormat::Raw);
        e.restore_volume(&request, &CancelHandle::new(), &mut |_| {})
            .unwrap_or_else(|err| panic!("{compression:?}/{encryption:?}: {}", nasbak::chain(&err)));
        assert!(raw_same_as_rbd(&to, &pool_image), "{compression:?}/{encryption:?}: the restored chain differs");
    }
}

#[test]
fn a_whole_vm_restore_writes_the_rbd_disk_in_place() {
    let dom = rbd_vm("rbdrestore");
    let image = rbd_image(&dom);
    let pool_image = format!("vms/{image}");
    let (repo, runtime) = repo(&dom);
    let e = engine(&runtime);
    let saved = backup(&e, &dom, &repo, ModeRequest::Full);
    // Damaged: zeroes over the image.
    let zeroes = dom.dir().join("zeroes.raw");
    fs::File::create(&zeroes).unwrap().set_len(64 << 20).unwrap();
    ceph::import(&zeroes, &image);
    assert!(!same_as_rbd(&backup_file(&repo, &saved, "vdb"), &pool_image));
    let outcome = e
        .restore(&RestoreRequest::new(repo.clone(), dom.name(), &saved.manifest.id), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{e:#?}"));
    let vdb = outcome.restored.iter().find(|d| d.target == "vdb").unwrap();
    assert!(vdb.location.starts_with("rbd:vms/"), "{vdb:?}");
    assert!(same_as_rbd(&backup_file(&repo, &saved, "vdb"), &pool_image), "the RBD disk was not restored");
    // The domain still reaches the same image the same way, and starts.
    let xml = nasbak_testlab::virsh(&["dumpxml", "--inactive", dom.name()]).unwrap();
    assert!(xml.contains(&format!("name='{pool_image}'")) && xml.contains("usage='nasbak-lab"), "{xml}");
    dom.start();
}

#[test]
fn a_volume_restored_to_a_new_rbd_image_is_attached_and_a_failed_one_leaves_none() {
    // Declared before the domain, so dropped after it: an attached image cannot be removed.
    let images = Images::default();
    let dom = rbd_vm("rbdvol");
    let (repo, runtime) = repo(&dom);
    let e = engine(&runtime);
    let saved = backup(&e, &dom, &repo, ModeRequest::Full);
    dom.start();
    let new_image = format!("{}-restored", rbd_image(&dom));
    let to: ImageLocation = format!("rbd:vms/{new_image}").parse().unwrap();
    let request = VolumeRestoreRequest::new(repo.clone(), dom.name(), &saved.manifest.id, "vdb", to.clone())
        .with_format(ImageFormat::Raw)
        .attach_to(dom.name());
    images.0.borrow_mut().push(new_image.clone());
    let restored = e.restore_volume(&request, &CancelHandle::new(), &mut |_| {});
    let restored = restored.unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(restored.attached.as_ref().map(|a| a.target.as_str()), Some("vdc"));
    assert!(same_as_rbd(&backup_file(&repo, &saved, "vdb"), &format!("vms/{new_image}")));
    // Attached live, reaching the cluster as the VM's other RBD disk does.
    let live = nasbak_testlab::virsh(&["dumpxml", dom.name()]).unwrap();
    let disk = live.split("<disk ").find(|d| d.contains(&new_image)).unwrap_or_else(|| panic!("{live}"));
    assert!(disk.contains("username='nasbak-vm'") && disk.contains("127.0.0.1"), "{disk}");
    // Attached to no VM: reached the way the backed-up disk was (its saved definition).
    let loose_image = format!("{}-loose", rbd_image(&dom));
    images.0.borrow_mut().push(loose_image.clone());
    let loose: ImageLocation = format!("rbd:vms/{loose_image}").parse().unwrap();
    let alone = VolumeRestoreRequest::new(repo.clone(), dom.name(), &saved.manifest.id, "vdb", loose);
    let restored_alone =
        e.restore_volume(&alone, &CancelHandle::new(), &mut |_| {}).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!((restored_alone.format.as_str(), restored_alone.attached.as_ref()), ("raw", None));
    assert!(same_as_rbd(&backup_file(&repo, &saved, "vdb"), &format!("vms/{loose_image}")));
    // An image that exists is never written over.
    let err = e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, BackupError::Exists { .. }), "{err}");
    assert!(ceph::exists(&format!("vms/{new_image}")), "the existing image was removed");
    // Cancelled once the copy has begun (slowed to 8 MiB/s, so it runs for seconds): the
    // image it created is removed.
    let failed_image = format!("{}-failed", rbd_image(&dom));
    images.0.borrow_mut().push(failed_image.clone());
    let to: ImageLocation = format!("rbd:vms/{failed_image}").parse().unwrap();
    let request = VolumeRestoreRequest::new(repo.clone(), dom.name(), &saved.manifest.id, "vdb", to)
        .with_format(ImageFormat::Raw)
        .attach_to(dom.name())
        .with_bandwidth(8 << 20);
    let cancel = CancelHandle::new();
    let created = Arc::new(AtomicBool::new(false));
    let err = {
        let (cancel, created) = (cancel.clone(), Arc::clone(&created));
        let image = format!("vms/{failed_image}");
        e.restore_volume(&request, &cancel.clone(), &mut move |p| {
            if p.phase == nasbak::Phase::Convert && !created.load(Ordering::SeqCst) && ceph::exists(&image) {
                created.store(true, Ordering::SeqCst);
                cancel.cancel();
            }
        })
        .unwrap_err()
    };
    assert!(created.load(Ordering::SeqCst), "the image was never seen created");
    assert!(matches!(err, BackupError::Cancelled), "{err:#?}");
    assert!(!ceph::exists(&format!("vms/{failed_image}")), "the half-written image was left");
    let live = nasbak_testlab::virsh(&["dumpxml", dom.name()]).unwrap();
    assert!(!live.contains(&failed_image), "{live}");
}

/// RBD images `vms/<name>` a test makes through nasbak, removed when dropped (a test that
/// fails must not leave them).
#[derive(Default)]
struct Images(std::cell::RefCell<Vec<String>>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in self.0.borrow().iter() {
            ceph::remove(image);
        }
    }
}

/// A libvirt secret defined `private='yes'` holding `client.nasbak-vm`'s key, undefined when
/// dropped.
struct PrivateSecret {
    uuid: String,
    usage: String,
}

impl PrivateSecret {
    fn new(tag: &str) -> Self {
        let usage = format!("nasbak-lab private {tag}");
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("secret.xml");
        fs::write(
            &xml,
            format!("<secret ephemeral='no' private='yes'><usage type='ceph'><name>{usage}</name></usage></secret>"),
        )
        .unwrap();
        let out = nasbak_testlab::virsh(&["secret-define", xml.to_str().unwrap()]).unwrap();
        let uuid = out.split_whitespace().find(|w| w.len() == 36).unwrap().to_owned();
        let key_file = ceph::dir().join("client.nasbak-vm.key");
        nasbak_testlab::virsh(&["secret-set-value", &uuid, "--file", key_file.to_str().unwrap()]).unwrap();
        PrivateSecret { uuid, usage }
    }
}

impl Drop for PrivateSecret {
    fn drop(&mut self) {
        let _ = nasbak_testlab::virsh(&["secret-undefine", &self.uuid]);
    }
}

#[test]
fn a_private_secret_still_backs_up_a_running_vm_and_names_the_fix_when_shut_off() {
    let dom = rbd_vm("rbdprivate");
    let secret = PrivateSecret::new(dom.name());
    assert!(nasbak_testlab::virsh(&["secret-get-value", &secret.uuid]).is_err(), "libvirt keeps it private");
    // The domain's RBD disk names the private secret.
    let xml = nasbak_testlab::virsh(&["dumpxml", "--inactive", dom.name()]).unwrap();
    let xml = xml.replace(ceph::SECRET_USAGE, &secret.usage);
    let file = dom.dir().join("private.xml");
    fs::write(&file, xml).unwrap();
    nasbak_testlab::virsh(&["define", file.to_str().unwrap()]).unwrap();
    let pool_image = format!("vms/{}", rbd_image(&dom));
    let (repo, runtime) = repo(&dom);
    let e = engine(&runtime);
    // Running: QEMU has the key; libvirt measures the disk; nothing needs it from nasbak.
    dom.start();
    let running = backup(&e, &dom, &repo, ModeRequest::Auto);
    assert_eq!(running.manifest.method, BackupMethod::PushJob);
    assert!(same_as_rbd(&backup_file(&repo, &running, "vdb"), &pool_image));
    let vdb = running.manifest.disks.iter().find(|d| d.target == "vdb").unwrap();
    assert_eq!(vdb.virtual_size, 64 << 20, "measured by libvirt");
    // Shut off: no key to give qemu-img, and the error says what to do.
    dom.destroy();
    let request = BackupRequest::new(dom.name(), repo.clone()).with_quiesce(QuiescePolicy::Off);
    let err = e.backup(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
    let text = nasbak::chain(&err);
    assert!(matches!(err.kind(), nasbak::ErrorKind::Configuration), "{text}");
    assert!(
        text.contains("client.nasbak-vm") && text.contains("private='no'") && text.contains(&secret.usage),
        "{text}"
    );
}
