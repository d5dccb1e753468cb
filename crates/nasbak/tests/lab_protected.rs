//! Compressed and encrypted backups through the facade on the lab: a shut-off VM's full and
//! incremental backups stored as the repository says (zstd, LUKS, and both as a compressed qcow2
//! inside a LUKS container), every point restored exactly (one volume and the whole VM), no
//! sector of the guest's random data in plaintext on an encrypted repository, verify with and
//! without the key, a wrong key refused before anything is written, a protection change that
//! starts a new chain, and what this version refuses rather than do in plaintext.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak::chain::ModeRequest;
use nasbak::nasbak_libvirt::{CancelHandle, Hypervisor, LibvirtHypervisor};
use nasbak::nasbak_process::ExternalCommand;
use nasbak::nasbak_qemu_img::{CheckVerdict, ImageFormat, ImageLocation, ImageTool, QemuImg, StoredLayout};
use nasbak::nasbak_repo::{
    BackupMethod, BackupMode, BackupRepository, Compression, Encryption, FileFormat, KeySource, MountTimeouts,
    Protection, RepositoryKind, RepositoryMounts, SystemMounter,
};
use nasbak::{
    BackupOutcome, BackupRequest, Catalog, Engine, ErrorKind, FileStatus, InstantRestoreRequest, Phase, RestoreRequest,
    VolumeRestoreRequest,
};
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, URI};

type LabEngine = Engine<LibvirtHypervisor, LibvirtHypervisor, QemuImg, SystemMounter>;

fn engine(runtime: &Path) -> LabEngine {
    let libvirt = LibvirtHypervisor::connect(URI).unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    Engine::new(libvirt.clone(), libvirt, QemuImg::new(runtime), mounts)
        .with_agent_timeout(Duration::from_secs(10))
        .with_runtime_dir(runtime)
}

fn same(a: &Path, b: &Path) -> bool {
    ExternalCommand::new("qemu-img").args(["compare", "-U"]).arg(a).arg(b).run_unchecked().unwrap().status.success()
}

fn key_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, value).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn repository(
    name: &str,
    root: &Path,
    compression: Compression,
    encryption: Encryption,
    key: Option<&Path>,
) -> BackupRepository {
    fs::create_dir_all(root).unwrap();
    let key = key.map(|k| KeySource::File(k.to_owned()));
    BackupRepository::new(name, RepositoryKind::Shared, root.to_str().unwrap(), "", None)
        .unwrap()
        .with_protection(Protection::new(compression, encryption, key).unwrap())
}

/// 1 MiB of random data, written at offset 0 of the shut-off domain's first disk.
fn write_random(dom: &LabDomain) -> Vec<u8> {
    let data: Vec<u8> = (0..1u32 << 20)
        .scan(0x2545_f491_u32 ^ std::process::id(), |s, _| {
            *s ^= *s << 13;
            *s ^= *s >> 17;
            *s ^= *s << 5;
            Some((*s >> 24) as u8)
        })
        .collect();
    let file = dom.dir().join("random.bin");
    fs::write(&file, &data).unwrap();
    let disk = &dom.disks()[0];
    ExternalCommand::new("qemu-io")
        .args(["-f", disk.format, "-c", &format!("write -s {} 0 1M", file.display())])
        .arg(&disk.path)
        .run()
        .unwrap();
    data
}

/// How many 512-byte sectors of `data` any file under `root` holds, at any 512-byte offset.
fn plaintext_sectors(root: &Path, data: &[u8]) -> usize {
    let wanted: HashSet<&[u8]> = data.chunks(512).collect();
    let mut found = 0;
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                found += fs::read(&p).unwrap().chunks(512).filter(|c| wanted.contains(c)).count();
            }
        }
    }
    found
}

#[test]
fn shut_off_backups_are_stored_as_the_repository_says_and_every_point_restores() {
    let dom = DomainSpec::new("protected").disk(DiskSpec::qcow2(32)).disk(DiskSpec::raw(8)).create();
    let e = engine(&dom.dir().join("runtime"));
    let catalog = Catalog::new(e.images(), e.mounts());
    let key = key_file(dom.dir(), "backup.key", "7bq0C4HzJ8yQ2yT1c2V9m0sXr5kLwP3aNfGd6hEiUoA=");
    let other = key_file(dom.dir(), "other.key", "an entirely different key, of enough length");
    let cases = [
        ("zstd", Compression::Zstd, Encryption::None, FileFormat::Compressed),
        ("luks", Compression::None, Encryption::Luks, FileFormat::Encrypted),
        ("both", Compression::Zstd, Encryption::Luks, FileFormat::CompressedInLuks),
    ];
    for (name, compression, encryption, format) in cases {
        let root = dom.dir().join(format!("repo-{name}"));
        let k = (encryption == Encryption::Luks).then_some(key.as_path());
        let repo = repository(name, &root, compression, encryption, k);
        let backup = |repo: &BackupRepository| {
            let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(ModeRequest::Auto);
            e.backup(&request, &CancelHandle::new(), &mut |_| {})
        };
        let random = write_random(&dom);
        dom.write_offline(0, 0x11, "8M", "4M");
        let full: BackupOutcome = backup(&repo).unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
        assert_eq!(full.manifest.mode, BackupMode::Full);
        assert_eq!(full.manifest.version, 3, "{name}: older nasbak refuses a protected backup");
        assert!(full.manifest.disks.iter().all(|d| d.stored_as == format), "{name}: {:?}", full.manifest.disks);
        let p1 = dom.raw_copy(0, &format!("{name}-p1"));
        let p1b = dom.raw_copy(1, &format!("{name}-p1b"));
        dom.write_offline(0, 0x22, "4M", "2M");
        dom.write_offline(1, 0x33, "0", "1M");
        let inc = backup(&repo).unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
        let m = &inc.manifest;
        assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Incremental, Some(full.manifest.id.as_str())), "{m:?}");
        assert_eq!(m.disks[0].mode, BackupMode::Incremental, "{name}");
        assert!(m.disks.iter().all(|d| d.stored_as == format), "{name}: a chain is stored one way");
        let inc_file = root.join(&inc.relative_dir).join(&m.disks[0].file);
        let on_disk = fs::metadata(&inc_file).unwrap().blocks_on_disk();
        assert!(on_disk < 6 << 20, "{name}: the incremental holds about the 2 MiB changed: {on_disk}");
        let p2 = dom.raw_copy(0, &format!("{name}-p2"));

        // Every point of each disk, as a new volume.
        for (id, want) in [(&full.manifest.id, &p1), (&inc.manifest.id, &p2)] {
            let to = dom.dir().join(format!("{name}-{id}.qcow2"));
            let request = VolumeRestoreRequest::new(
                repo.clone(),
                dom.name(),
                id.as_str(),
                "vda",
                ImageLocation::Path(to.clone()),
            );
            let mut phases = Vec::new();
            e.restore_volume(&request, &CancelHandle::new(), &mut |p| phases.push(p.phase))
                .unwrap_or_else(|err| panic!("{name} {id}: {}", nasbak::chain(&err)));
            assert!(same(&to, want), "{name}: the point of {id}");
            // Decoded by nasbak itself (the full alone, or the chain of full and incremental),
            // each file read once as a copy is; never converted by qemu-img.
            assert!(phases.contains(&Phase::Copy), "{name} {id}: {phases:?}");
            assert!(!phases.contains(&Phase::Convert), "{name} {id}: {phases:?}");
            let info = ExternalCommand::new("qemu-img").args(["info", "-U"]).arg(&to).run().unwrap().stdout_text();
            assert!(
                !info.contains("encrypted: yes") && !info.contains("backing file"),
                "{name}: a plain volume: {info}"
            );
            // Into a new raw file, and onto a block device holding other data: decoded too.
            let raw = dom.dir().join(format!("{name}-{id}.raw"));
            let request = VolumeRestoreRequest::new(
                repo.clone(),
                dom.name(),
                id.as_str(),
                "vda",
                ImageLocation::Path(raw.clone()),
            )
            .with_format(ImageFormat::Raw);
            let mut phases = Vec::new();
            e.restore_volume(&request, &CancelHandle::new(), &mut |p| phases.push(p.phase))
                .unwrap_or_else(|err| panic!("{name} {id} raw: {}", nasbak::chain(&err)));
            assert!(same(&raw, want), "{name}: the point of {id} as a raw file");
            assert!(!phases.contains(&Phase::Convert), "{name} {id} raw: {phases:?}");
            let device = LoopDevice::over(&dom.dir().join(format!("{name}-{id}.device")), 40 << 20);
            let request = VolumeRestoreRequest::new(
                repo.clone(),
                dom.name(),
                id.as_str(),
                "vda",
                ImageLocation::Path(device.path()),
            );
            let mut phases = Vec::new();
            e.restore_volume(&request, &CancelHandle::new(), &mut |p| phases.push(p.phase))
                .unwrap_or_else(|err| panic!("{name} {id} device: {}", nasbak::chain(&err)));
            assert!(!phases.contains(&Phase::Convert), "{name} {id} device: {phases:?}");
            let head = dom.dir().join(format!("{name}-{id}.device-head"));
            ExternalCommand::new("qemu-img")
                .args(["convert", "-U", "-O", "raw", "--image-opts"])
                .arg(format!("driver=raw,size={},file.filename={}", 32u64 << 20, device.path().display()))
                .arg(&head)
                .run()
                .unwrap();
            assert!(same(&head, want), "{name}: the point of {id} on a device");
        }
        // A damaged full (one byte of its data changed): the decoding restore reads it to its
        // end, finds the checksum wrong, and leaves no volume, staged or in place.
        let full_file = root.join(&full.relative_dir).join(&full.manifest.disks[0].file);
        let original = fs::read(&full_file).unwrap();
        let mut damaged = original.clone();
        let at = original.len() / 2 + original.len() / 7;
        damaged[at] ^= 0x40;
        fs::write(&full_file, &damaged).unwrap();
        let to = dom.dir().join(format!("{name}-damaged.qcow2"));
        let request = VolumeRestoreRequest::new(
            repo.clone(),
            dom.name(),
            full.manifest.id.as_str(),
            "vda",
            ImageLocation::Path(to.clone()),
        );
        let err = e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::CorruptFile | ErrorKind::DamagedBackup),
            "{name}: {}",
            nasbak::chain(&err)
        );
        let left: Vec<_> = fs::read_dir(dom.dir())
            .unwrap()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().starts_with(&format!("{name}-damaged")))
            .map(|f| f.file_name())
            .collect();
        assert!(left.is_empty(), "{name}: nothing left of the refused restore: {left:?}");
        fs::write(&full_file, &original).unwrap();
        // Verify: with the key every image opens and is consistent.
        let report = catalog.verify(&repo, dom.name(), &inc.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(report.ok(), "{name}: {report:?}");
        if encryption == Encryption::Luks {
            assert!(report.files.iter().all(|f| f.check == CheckVerdict::Clean), "{name}: {report:?}");
            assert_eq!(plaintext_sectors(&root, &random), 0, "{name}: no sector of the data in plaintext");
            // Without the key: the checksums of what is stored, the images not opened.
            let keyless =
                BackupRepository::new(name, RepositoryKind::Shared, root.to_str().unwrap(), "", None).unwrap();
            let report =
                catalog.verify(&keyless, dom.name(), &inc.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
            assert!(report.ok(), "{name}: {report:?}");
            assert!(report.files.iter().all(|f| f.check == CheckVerdict::Unsupported && f.checksum_ok == Some(true)));
            // A wrong key: refused before anything is written, naming the backup; restore too.
            let wrong = repository(name, &root, compression, encryption, Some(&other));
            let before = fs::read_dir(root.join(dom.name())).unwrap().count();
            dom.write_offline(0, 0x44, "12M", "1M");
            let err = backup(&wrong).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::KeyRejected, "{name}: {}", nasbak::chain(&err));
            assert!(err.to_string().contains(&inc.manifest.id), "{err}");
            assert_eq!(fs::read_dir(root.join(dom.name())).unwrap().count(), before, "{name}: nothing written");
            let err =
                catalog.verify(&wrong, dom.name(), &inc.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::KeyRejected, "{name}: {}", nasbak::chain(&err));
            let untouched = dom.raw_copy(1, &format!("{name}-untouched"));
            let err = e
                .restore(
                    &RestoreRequest::new(wrong.clone(), dom.name(), inc.manifest.id.as_str()),
                    &CancelHandle::new(),
                    &mut |_| {},
                )
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::KeyRejected, "{name}: {}", nasbak::chain(&err));
            assert!(same(&dom.disks()[1].path, &untouched), "{name}: nothing restored with a wrong key");
        } else {
            assert!(plaintext_sectors(&root, &random) > 0, "{name}: the scan finds plaintext where there is some");
        }

        // The repository's protection changed: the next backup starts a new chain, stored the
        // new way, the reason recorded.
        let plain = repository(name, &root, Compression::None, Encryption::None, None);
        let next = backup(&plain).unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
        assert_eq!(next.manifest.mode, BackupMode::Full, "{name}: {:?}", next.manifest);
        assert!(next.manifest.full_reason.as_deref().unwrap_or_default().contains("new chain"), "{:?}", next.manifest);
        assert!(next.manifest.disks.iter().all(|d| d.stored_as == FileFormat::Plain));
        if encryption == Encryption::Luks {
            // Read in place with the key: the incremental mounted (its disk's raw image is the
            // point), and restored instantly (the VM runs on overlays over the encrypted chain,
            // the copies finish, the disk holds the point).
            let mnt = dom.dir().join(format!("{name}-mnt"));
            let mounted = catalog
                .mount(
                    &nasbak::MountRequest::new(repo.clone(), dom.name(), inc.manifest.id.as_str(), &mnt),
                    &CancelHandle::new(),
                )
                .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
            let shown = mounted.disks.iter().find(|d| d.target == "vda").unwrap();
            assert!(same(&shown.image, &p2), "{name}: the mounted disk is the point");
            catalog.unmount(&mnt).unwrap();
            let instant =
                InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), dom.name(), inc.manifest.id.as_str()))
                    .with_work_dir(dom.dir().join("instant"));
            e.instant_restore(&instant, &CancelHandle::new())
                .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
            e.instant_finish(
                &dom.dir().join("instant"),
                dom.name(),
                Duration::from_secs(300),
                &CancelHandle::new(),
                &mut |_| {},
            )
            .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
            dom.destroy();
            assert!(same(&dom.disks()[0].path, &p2), "{name}: the instantly restored disk is the point");
        }
        // The whole VM back to the protected full: its qcow2 disk and its raw disk.
        e.restore(
            &RestoreRequest::new(repo.clone(), dom.name(), full.manifest.id.as_str()),
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
        assert!(same(&dom.disks()[0].path, &p1), "{name}: vda is the full's point again");
        assert!(same(&dom.disks()[1].path, &p1b), "{name}: vdb is the full's point again");
    }

    // A key file others may read is refused before anything else.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let repo = repository("loose", &dom.dir().join("repo-loose"), Compression::None, Encryption::Luks, Some(&key));
    let err = e.backup(&BackupRequest::new(dom.name(), repo), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", nasbak::chain(&err));
    assert!(err.to_string().contains("mode 0644"), "{err}");
}

/// A loop device over a new file of `size` bytes of old data (0x5a), detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn over(file: &Path, size: usize) -> LoopDevice {
        fs::write(file, vec![0x5au8; size]).unwrap();
        let out = ExternalCommand::new("losetup").args(["-f", "--show"]).arg(file).run().unwrap();
        LoopDevice(PathBuf::from(out.stdout_text().trim()))
    }

    fn path(&self) -> PathBuf {
        self.0.clone()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = ExternalCommand::new("losetup").arg("-d").arg(&self.0).run();
    }
}

trait OnDisk {
    fn blocks_on_disk(&self) -> u64;
}

impl OnDisk for fs::Metadata {
    fn blocks_on_disk(&self) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(self) * 512
    }
}

#[test]
fn a_file_of_each_kind_reads_with_stock_qemu_img_as_the_docs_say() {
    // The commands of docs/encryption.md, run as an operator would, without nasbak.
    let dom = DomainSpec::new("stockread").disk(DiskSpec::qcow2(16)).create();
    let e = engine(&dom.dir().join("runtime"));
    let key = key_file(dom.dir(), "k", "a key for the stock qemu-img check, 0123456789");
    dom.write_offline(0, 0x5a, "0", "3M");
    let want = dom.raw_copy(0, "want");
    for (name, compression, encryption) in
        [("luks", Compression::None, Encryption::Luks), ("both", Compression::Zstd, Encryption::Luks)]
    {
        let root = dom.dir().join(format!("repo-{name}"));
        let repo = repository(name, &root, compression, encryption, Some(&key));
        let made = e.backup(&BackupRequest::new(dom.name(), repo), &CancelHandle::new(), &mut |_| {}).unwrap();
        let file = root.join(&made.relative_dir).join(&made.manifest.disks[0].file);
        let out = dom.dir().join(format!("{name}.raw"));
        let opts = match encryption {
            Encryption::Luks if compression == Compression::Zstd => {
                format!("driver=qcow2,file.driver=luks,file.key-secret=k0,file.file.filename={}", file.display())
            }
            _ => format!("driver=qcow2,encrypt.key-secret=k0,file.filename={}", file.display()),
        };
        ExternalCommand::new("qemu-img")
            .args(["convert", "--object", &format!("secret,id=k0,file={}", key.display()), "--image-opts", &opts])
            .args(["-O", "raw"])
            .arg(&out)
            .run()
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(same(&out, &want), "{name}: stock qemu-img reads the backup");
    }
    let _ = FileStatus::Ok;
}

#[test]
fn a_key_rotation_changes_headers_only_and_a_killed_one_is_finished_by_the_next() {
    use nasbak::nasbak_qemu_img::StoredFile;
    let dom = DomainSpec::new("rotate").disk(DiskSpec::qcow2(16)).create();
    let e = engine(&dom.dir().join("runtime"));
    let catalog = Catalog::new(e.images(), e.mounts());
    let old = key_file(dom.dir(), "old.key", "the old key of this repository, 0123456789");
    let new = key_file(dom.dir(), "new.key", "the new key of this repository, 9876543210");
    let mut made = Vec::new();
    for (name, compression) in [("luks", Compression::None), ("both", Compression::Zstd)] {
        let root = dom.dir().join(format!("repo-{name}"));
        let repo = repository(name, &root, compression, Encryption::Luks, Some(&old));
        dom.write_offline(0, 0x11, "0", "2M");
        let full = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
        dom.write_offline(0, 0x22, "4M", "1M");
        let inc = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
        assert_eq!(inc.manifest.mode, BackupMode::Incremental, "{:?}", inc.manifest.full_reason);
        made.push((repo, root, full, inc, dom.raw_copy(0, &format!("{name}-point"))));
    }
    for (repo, root, full, inc, point) in &made {
        let files: Vec<(PathBuf, StoredFile)> = [full, inc]
            .iter()
            .map(|b| {
                let d = &b.manifest.disks[0];
                let layout = match d.stored_as {
                    FileFormat::Encrypted => StoredLayout::Qcow2Luks,
                    _ => StoredLayout::Qcow2InLuks,
                };
                let path = root.join(&b.relative_dir).join(&d.file);
                (path.clone(), StoredFile { path, layout })
            })
            .collect();
        let before: Vec<Vec<u8>> = files.iter().map(|(p, _)| fs::read(p).unwrap()).collect();
        assert!(catalog.check_key(repo, None).unwrap().ok());
        let check = catalog.check_key(repo, Some(&new)).unwrap();
        assert!(!check.ok() && check.backups.iter().all(|b| b.encrypted && !b.opens), "{check:?}");
        // Every file gets the new key and loses the old one. (A run killed half-way is the
        // fault matrix's `rotate-kill` row.)
        let done = catalog.rotate_key(repo, &new, &CancelHandle::new()).unwrap();
        assert_eq!((done.files, done.rotated, done.already), (2, 2, 0), "{done:?}");
        assert!(!root.join(&full.relative_dir).join(".nasbak-key-rotation.json").exists(), "no journal left");
        for (_, f) in &files {
            assert!(e.images().opens_with(f, &new).unwrap());
            assert!(!e.images().opens_with(f, &old).unwrap(), "the old key no longer reads the data");
        }
        // Only headers changed: the bytes past the LUKS header are the same.
        for ((path, _), was) in files.iter().zip(&before) {
            let now = fs::read(path).unwrap();
            assert_eq!(now.len(), was.len());
            let changed = now.iter().zip(was).filter(|(a, b)| a != b).count();
            assert!(changed <= 1 << 20, "{}: {changed} bytes changed", path.display());
        }
        // A third run finds nothing to do; the repository with the new key restores the chain.
        let again = catalog.rotate_key(repo, &new, &CancelHandle::new()).unwrap();
        assert_eq!((again.rotated, again.already), (0, 2), "nothing left to do: {again:?}");
        let repo_new = repo.clone().with_protection(
            Protection::new(repo.protection().compression(), Encryption::Luks, Some(KeySource::File(new.clone())))
                .unwrap(),
        );
        assert!(catalog.check_key(&repo_new, None).unwrap().ok());
        // The manifests have the new checksums: verify passes with the new key, and without it.
        let report =
            catalog.verify(&repo_new, dom.name(), &inc.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(report.ok() && report.files.iter().all(|f| f.check == CheckVerdict::Clean), "{report:?}");
        let to = dom.dir().join(format!("{}-rotated.qcow2", repo.name()));
        let request = VolumeRestoreRequest::new(
            repo_new.clone(),
            dom.name(),
            inc.manifest.id.as_str(),
            "vda",
            ImageLocation::Path(to.clone()),
        );
        e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(same(&to, point));
        // The old key, and the same key given as new, are refused with the reason.
        let err = catalog.rotate_key(&repo_new, &new, &CancelHandle::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::KeyRejected, "{}", nasbak::chain(&err));
    }
}

#[test]
fn running_backups_are_read_from_a_pull_job_and_written_by_nasbak_and_every_point_restores() {
    let dom = DomainSpec::new("protrun").disk(DiskSpec::qcow2(32)).disk(DiskSpec::raw(8)).running(true).create();
    let e = engine(&dom.dir().join("runtime"));
    let catalog = Catalog::new(e.images(), e.mounts());
    let key = key_file(dom.dir(), "backup.key", "the key of the running VM's repository, 0123456789");
    for (name, compression, encryption, format) in [
        ("zstd", Compression::Zstd, Encryption::None, FileFormat::Compressed),
        ("luks", Compression::None, Encryption::Luks, FileFormat::Encrypted),
        ("both", Compression::Zstd, Encryption::Luks, FileFormat::CompressedInLuks),
    ] {
        let root = dom.dir().join(format!("repo-{name}"));
        let k = (encryption == Encryption::Luks).then_some(key.as_path());
        let repo = repository(name, &root, compression, encryption, k);
        let backup = || {
            let request = BackupRequest::new(dom.name(), repo.clone()).with_mode(ModeRequest::Auto);
            e.backup(&request, &CancelHandle::new(), &mut |_| {})
                .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)))
        };
        dom.write_through_qemu(0, 0x11, "0", "4M");
        // A pull job: QEMU exports the disks, nasbak reads and encodes them (no export daemon,
        // no secret given to libvirt), its socket and scratch gone once it is done.
        let ephemeral = || nasbak_testlab::virsh(&["secret-list", "--ephemeral"]).unwrap().lines().count();
        let secrets_before = ephemeral();
        // This test's own exports only: other tests of this binary run beside it, and some of
        // theirs go through qemu-storage-daemon.
        let exports = dom.dir().join("runtime").join("exports").to_string_lossy().into_owned();
        let (full, seen) = watching_processes(&[&exports], backup);
        assert!(!seen[0], "{name}: no qemu-storage-daemon ran");
        assert_eq!(full.manifest.method, BackupMethod::PullJob, "{name}");
        assert_eq!(ephemeral(), secrets_before, "{name}: no secret was given to libvirt");
        assert!(full.manifest.disks.iter().all(|d| d.stored_as == format), "{name}: {:?}", full.manifest.disks);
        // The sockets' directory is `<runtime>/p`, or a short root where that path is long.
        let mine = format!("{}-", std::process::id());
        let left: Vec<_> = [dom.dir().join("runtime").join("p"), PathBuf::from(nasbak::SHORT_PULL_SOCKET_ROOT)]
            .iter()
            .flat_map(|root| fs::read_dir(root).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{name}: the job's socket directory is gone: {left:?}");
        let scratch = Path::new(nasbak::DEFAULT_PULL_SCRATCH).join(dom.name());
        let left: Vec<_> = fs::read_dir(&scratch).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "{name}: the job's scratch is gone: {left:?}");
        let p1 = dom.raw_copy(0, &format!("{name}-r1"));
        dom.write_through_qemu(0, 0x22, "8M", "2M");
        // Zeroes over data the full holds: the incremental must say so, not fall through to it.
        dom.write_through_qemu(0, 0x00, "0", "1M");
        let inc = backup();
        let m = &inc.manifest;
        assert_eq!((m.mode, m.parent.as_deref()), (BackupMode::Incremental, Some(full.manifest.id.as_str())), "{m:?}");
        assert_eq!(m.disks[0].mode, BackupMode::Incremental);
        assert_eq!(m.method, BackupMethod::PullJob, "{name}");
        assert!(m.disks.iter().all(|d| d.stored_as == format), "{name}");
        let allocated = fs::metadata(root.join(&inc.relative_dir).join(&m.disks[0].file)).unwrap().blocks_on_disk();
        assert!(allocated < 8 << 20, "{name}: the incremental holds about the 3 MiB changed: {allocated}");
        // Hashed while it was written, not read again: each checksum is the one a read of the
        // complete file gives, by the algorithm the manifest names.
        for outcome in [&full, &inc] {
            for d in &outcome.manifest.disks {
                let path = root.join(&outcome.relative_dir).join(&d.file);
                let kept = d.checksum.clone().expect("a checksum");
                let layout = match format {
                    FileFormat::Encrypted => StoredLayout::Qcow2Luks,
                    FileFormat::CompressedInLuks => StoredLayout::Qcow2InLuks,
                    _ => StoredLayout::Qcow2,
                };
                assert_eq!(kept.algorithm, nasbak::checksum_algorithm_for(&path, layout), "{name} {}", d.file);
                assert_eq!(kept.value, nasbak::checksum_file(&path, &kept.algorithm).unwrap(), "{name} {}", d.file);
            }
        }
        // The incremental names its parent for stock qemu-img (nasbak wrote it so).
        if format == FileFormat::Compressed {
            let file = root.join(&inc.relative_dir).join(&m.disks[0].file);
            let info = e.images().info(&ImageLocation::Path(file)).unwrap();
            let parent = root.join(&full.relative_dir).join(&full.manifest.disks[0].file);
            let named = info[0].backing_file.as_ref().map(|b| fs::canonicalize(b).unwrap());
            assert_eq!(named, Some(fs::canonicalize(&parent).unwrap()), "{name}: {info:?}");
            assert_eq!(info.len(), 2, "{name}: the chain opens with its parent: {info:?}");
        }
        let p2 = dom.raw_copy(0, &format!("{name}-r2"));
        for (id, want) in [(&full.manifest.id, &p1), (&inc.manifest.id, &p2)] {
            let to = dom.dir().join(format!("{name}-run-{id}.qcow2"));
            let request = VolumeRestoreRequest::new(
                repo.clone(),
                dom.name(),
                id.as_str(),
                "vda",
                ImageLocation::Path(to.clone()),
            );
            let mut phases = Vec::new();
            e.restore_volume(&request, &CancelHandle::new(), &mut |p| phases.push(p.phase))
                .unwrap_or_else(|err| panic!("{name} {id}: {}", nasbak::chain(&err)));
            assert!(same(&to, want), "{name}: the point of {id}");
            // Decoded by nasbak itself (the full alone, or the chain of full and incremental),
            // each file read once as a copy is; never converted by qemu-img.
            assert!(phases.contains(&Phase::Copy), "{name} {id}: {phases:?}");
            assert!(!phases.contains(&Phase::Convert), "{name} {id}: {phases:?}");
        }
        let report = catalog.verify(&repo, dom.name(), &inc.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(report.ok(), "{name}: {report:?}");
        // The exports are gone: nothing left mounted under the runtime directory.
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&dom.dir().join("runtime").join("exports").to_string_lossy().to_string()), "{name}");
    }
}

#[test]
fn a_pull_job_left_by_a_dead_nasbak_is_aborted_by_the_next_backup() {
    let dom = DomainSpec::new("pullorphan").disk(DiskSpec::qcow2(32)).running(true).create();
    let runtime = dom.dir().join("runtime");
    let e = engine(&runtime);
    // A pull job as a killed nasbak (pid 0x7ffffffe, which never exists) would leave it, had no
    // watchdog aborted it: its socket in a directory of ours named by that pid.
    let sockets = nasbak::pull_socket_root(&runtime).join("2147483646-0");
    let _ = fs::remove_dir_all(&sockets);
    fs::create_dir_all(&sockets).unwrap();
    fs::set_permissions(&sockets, fs::Permissions::from_mode(0o777)).unwrap();
    let scratch = dom.dir().join("orphan-scratch");
    fs::create_dir_all(&scratch).unwrap();
    fs::set_permissions(&scratch, fs::Permissions::from_mode(0o755)).unwrap();
    let xml = dom.dir().join("pull.xml");
    fs::write(
        &xml,
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks><disk name='vda' backup='yes' type='file' exportname='vda'><driver type='qcow2'/><scratch file='{}'/></disk></disks></domainbackup>",
            sockets.join("s").display(),
            scratch.join("vda.scratch").display()
        ),
    )
    .unwrap();
    nasbak_testlab::virsh(&["backup-begin", dom.name(), xml.to_str().unwrap()]).unwrap();
    assert!(nasbak_testlab::virsh(&["domjobinfo", dom.name()]).unwrap().contains("Backup"));
    let key = key_file(dom.dir(), "backup.key", "the key of the orphaned job's repository, 0123456");
    let repo = repository("orphan", &dom.dir().join("repo"), Compression::Zstd, Encryption::Luks, Some(&key));
    let made = e
        .backup(&BackupRequest::new(dom.name(), repo), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert!(made.cleaned.iter().any(|c| c.contains("aborted the backup job")), "{:?}", made.cleaned);
    assert_eq!(made.manifest.method, BackupMethod::PullJob);
    assert!(nasbak_testlab::virsh(&["domjobinfo", dom.name()]).unwrap().contains("None"));
    let _ = fs::remove_dir_all(&sockets);
}

/// A libvirt secret of usage `volume`, undefined on drop.
struct VolumeSecret(String);

impl VolumeSecret {
    fn define(dir: &Path, volume: &Path, value_file: &Path, private: bool) -> VolumeSecret {
        let xml = dir.join("secret.xml");
        let private = if private { "yes" } else { "no" };
        fs::write(
            &xml,
            format!(
                "<secret ephemeral='no' private='{private}'><description>nasbak test</description><usage type='volume'><volume>{}</volume></usage></secret>",
                volume.display()
            ),
        )
        .unwrap();
        let out = nasbak_testlab::virsh(&["secret-define", xml.to_str().unwrap()]).unwrap();
        let uuid = out.split_whitespace().find(|w| w.len() == 36 && w.matches('-').count() == 4).unwrap().to_owned();
        nasbak_testlab::virsh(&["secret-set-value", &uuid, "--file", value_file.to_str().unwrap(), "--plain"]).unwrap();
        VolumeSecret(uuid)
    }
}

impl Drop for VolumeSecret {
    fn drop(&mut self) {
        let _ = nasbak_testlab::virsh(&["secret-undefine", &self.0]);
    }
}

/// The shut-off `dom`'s first disk made a LUKS qcow2 holding what it held, whose passphrase (in
/// the file `passphrase`) is a libvirt volume secret named in the domain's definition, as the
/// reference system's volume encryption makes them: the secret, and the definition's file.
fn luks_volume(dom: &LabDomain, images: &QemuImg, passphrase: &Path) -> (VolumeSecret, PathBuf) {
    use nasbak::nasbak_qemu_img::TargetProtection;
    let disk = dom.disks()[0].path.clone();
    let secret = VolumeSecret::define(dom.dir(), &disk, passphrase, false);
    let plain = dom.dir().join("plain-volume.qcow2");
    fs::rename(&disk, &plain).unwrap();
    // The LUKS header made by nasbak: qemu-img times its PBKDF, and gives up on a loaded host
    // ("Unable to get accurate CPU usage").
    let size = images.info(&ImageLocation::Path(plain.clone())).unwrap()[0].virtual_size;
    let luks = TargetProtection::new(StoredLayout::Qcow2Luks, false, Some(passphrase.to_owned()));
    images.create_protected(&disk, size, None, &luks).unwrap();
    ExternalCommand::new("qemu-img")
        .args(["convert", "-q", "-n", "--object", &format!("secret,id=v0,file={}", passphrase.display())])
        .args(["-f", "qcow2"])
        .arg(&plain)
        .arg("--target-image-opts")
        .arg(format!("driver=qcow2,encrypt.key-secret=v0,file.filename={}", disk.display()))
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    fs::remove_file(&plain).unwrap();
    let xml = nasbak_testlab::virsh(&["dumpxml", "--inactive", dom.name()]).unwrap();
    let source = format!("<source file='{}'", disk.display());
    let at = xml.find(&source).expect("the disk's source");
    let end = at + xml[at..].find("/>").unwrap();
    let encrypted = format!(
        "{}><encryption format='luks'><secret type='passphrase' uuid='{}'/></encryption></source>{}",
        &xml[..end],
        secret.0,
        &xml[end + 2..]
    );
    let defined = dom.dir().join("encrypted.xml");
    fs::write(&defined, encrypted).unwrap();
    nasbak_testlab::virsh(&["define", defined.to_str().unwrap()]).unwrap();
    (secret, defined)
}

#[test]
fn a_backup_of_an_encrypted_volume_boots_on_an_encrypted_overlay() {
    let dom =
        DomainSpec::new("luksboot").disk(DiskSpec::qcow2(64).bootable()).agent(true).boot_from_disk(true).create();
    let e = engine(&dom.dir().join("runtime"));
    let passphrase = key_file(dom.dir(), "volume.pass", "the bootable volume's passphrase, 0123456789");
    let (_secret, _) = luks_volume(&dom, e.images(), &passphrase);
    let key = key_file(dom.dir(), "repo.key", "the repository's key, not the volume's, 0123456789");
    let repo = repository("boot", &dom.dir().join("repo"), Compression::None, Encryption::Luks, Some(&key));
    // Backed up shut off (qemu-img reads the volume with its passphrase).
    let made = e
        .backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    // The check writes 1 MiB of 'Q' onto the guest's disk past what it uses, and waits while
    // the overlay is looked at from here.
    let work = dom.dir().join("verify");
    let check =
        "head -c 1048576 /dev/zero | tr '\\000' Q | dd of=/dev/vda bs=65536 seek=800 conv=fsync 2>/dev/null && sleep 4";
    let request = nasbak::BootVerifyRequest::new(repo.clone(), dom.name(), made.manifest.id.as_str())
        .with_work_dir(&work)
        .with_timeout(Duration::from_secs(240))
        .with_check(check);
    let needles =
        ["the bootable volume's passphrase, 0123456789", "the repository's key, not the volume's, 0123456789"];
    let ((verified, looked), seen) = watching_processes(&needles, || {
        std::thread::scope(|scope| {
            let running = scope.spawn(|| e.verify_boot(&request, &CancelHandle::new()));
            // (whether the overlay said it is encrypted, the most 'Q' sectors seen in it, whether a
            // look came after it had grown by the check's MiB)
            let (mut encrypted, mut plaintext, mut grown) = (None, 0usize, false);
            let mut first_len = None;
            while !running.is_finished() {
                let overlay = fs::read_dir(&work)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|d| d.path().join("vda.overlay.qcow2"))
                    .find(|p| p.exists());
                if let Some(overlay) = overlay {
                    // Once it is a qcow2: its header is written last, over a file already there.
                    if encrypted.is_none() {
                        let info = ExternalCommand::new("qemu-img").args(["info", "-U"]).arg(&overlay).run_unchecked();
                        let text = info.map(|i| i.stdout_text()).unwrap_or_default();
                        encrypted = text.contains("file format: qcow2").then(|| text.contains("encrypted: yes"));
                    }
                    if let Ok(bytes) = fs::read(&overlay) {
                        let len = *first_len.get_or_insert(bytes.len());
                        grown |= bytes.len() >= len + (1 << 20);
                        plaintext = plaintext.max(bytes.chunks(512).filter(|c| c.iter().all(|b| *b == b'Q')).count());
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (running.join().unwrap(), (encrypted, plaintext, grown))
        })
    });
    assert_eq!(seen, [false, false], "a key was seen on a command line or in an environment");
    let verified = verified.unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(verified.result, nasbak::BootResult::Passed, "{verified:?}");
    assert_eq!(looked.0, Some(true), "the overlay is encrypted: {looked:?}");
    assert!(looked.2, "the overlay was looked at after the guest's MiB reached it");
    assert_eq!(looked.1, 0, "nothing the guest wrote is plaintext in the overlay");
    // The one-off key's secret is gone with the throwaway VM, and so is its key file.
    let ours = format!("nasbak: the overlay key of a boot verification (pid {})", std::process::id());
    let left = e.hypervisor().transient_secrets("nasbak: the overlay key").unwrap();
    assert!(!left.iter().any(|(_, d)| *d == ours), "{left:?}");
    assert!(!work.read_dir().is_ok_and(|mut d| d.next().is_some()), "nothing of the check is left");
    let private = dom.dir().join("runtime/private");
    assert!(!private.read_dir().is_ok_and(|mut d| d.next().is_some()), "no key file is left");
}

/// The first 2 MiB of the LUKS qcow2 `image` (opened with `key`) overwritten with 0x99: what a
/// restore must undo.
fn overwrite_luks(image: &Path, key: &Path) {
    ExternalCommand::new("qemu-io")
        .args(["--object", &format!("secret,id=v0,file={}", key.display()), "--image-opts"])
        .arg(format!("driver=qcow2,encrypt.key-secret=v0,file.filename={}", image.display()))
        .args(["-c", "write -P 0x99 0 2M"])
        .run()
        .unwrap();
}

/// The guest-visible content of the LUKS qcow2 `image`, as raw, opened with `key`.
fn decrypted(image: &Path, key: &Path, to: &Path) -> PathBuf {
    let opts = format!("driver=qcow2,encrypt.key-secret=v0,file.filename={}", image.display());
    ExternalCommand::new("qemu-img")
        .args(["convert", "-U", "--object", &format!("secret,id=v0,file={}", key.display()), "--image-opts", &opts])
        .args(["-O", "raw"])
        .arg(to)
        .run()
        .unwrap();
    to.to_owned()
}

#[test]
fn an_encrypted_volume_is_never_stored_or_restored_as_plaintext() {
    let dom = DomainSpec::new("luksvol").disk(DiskSpec::qcow2(32)).create();
    let e = engine(&dom.dir().join("runtime"));
    let disk = dom.disks()[0].path.clone();
    let passphrase = key_file(dom.dir(), "volume.pass", "the volume's own passphrase, 0123456789abc");
    let (secret, defined) = luks_volume(&dom, e.images(), &passphrase);
    dom.start();
    let (random, qdev) = {
        let file = dom.dir().join("random.bin");
        let data: Vec<u8> =
            (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i >> 3) as u8).collect();
        fs::write(&file, &data).unwrap();
        dom.write_through_qemu(0, 0x31, "4M", "1M");
        // 1 MiB of the file through the guest's own device: qemu-io -s reads the pattern file.
        let device = nasbak_testlab::virsh(&["qemu-monitor-command", dom.name(), "--hmp", "info block"]).unwrap();
        let qdev = device
            .lines()
            .skip_while(|l| !l.contains(disk.to_str().unwrap()))
            .find_map(|l| l.trim().strip_prefix("Attached to:"))
            .unwrap()
            .trim()
            .to_owned();
        let cmd = format!("qemu-io -d {qdev} \"write -s {} 0 1M\"", file.display());
        let said = nasbak_testlab::virsh(&["qemu-monitor-command", dom.name(), "--hmp", &cmd]).unwrap();
        assert!(said.trim().is_empty(), "{said}");
        (data, qdev)
    };
    // A repository that does not encrypt: refused, nothing written.
    let plain_root = dom.dir().join("repo-plain");
    let plain = repository("plain", &plain_root, Compression::Zstd, Encryption::None, None);
    let err = e.backup(&BackupRequest::new(dom.name(), plain), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{}", nasbak::chain(&err));
    assert!(err.to_string().contains("encrypted volume") && err.to_string().contains("vda"), "{err}");
    assert!(!plain_root.join(dom.name()).exists());
    // An encrypting repository: running (the push job reads through QEMU's decryption) and shut
    // off (qemu-img reads with the volume's passphrase); the repository's key, never plaintext.
    let key = key_file(dom.dir(), "repo.key", "the repository's key, not the volume's, 0123456789");
    let root = dom.dir().join("repo-enc");
    let repo = repository("enc", &root, Compression::None, Encryption::Luks, Some(&key));
    let running = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    // Such a volume is read by the push job, never a pull job, whose scratch file would keep
    // what the guest overwrites as plaintext: on a repository that also compresses, the job
    // writes through an export.
    assert_eq!(running.manifest.method, BackupMethod::PushJob);
    let both_root = dom.dir().join("repo-both");
    let both = repository("both", &both_root, Compression::Zstd, Encryption::Luks, Some(&key));
    let exported = e.backup(&BackupRequest::new(dom.name(), both.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert_eq!(exported.manifest.method, BackupMethod::PushJob);
    assert!(exported.manifest.disks.iter().all(|d| d.stored_as == FileFormat::CompressedInLuks));
    dom.destroy();
    let point = decrypted(&disk, &passphrase, &dom.dir().join("point.raw"));
    let stopped = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
    assert!(stopped.manifest.disks.iter().all(|d| d.stored_as == FileFormat::Encrypted));
    assert_eq!(plaintext_sectors(&root, &random), 0, "no sector of the volume's data in plaintext");
    assert_eq!(plaintext_sectors(&both_root, &random), 0, "no sector of the volume's data in plaintext");
    // The volume is overwritten, then the whole VM restored: the volume is LUKS again, with its
    // own passphrase, holding the point.
    for (repo, made) in [(&repo, &running), (&repo, &stopped), (&both, &exported)] {
        overwrite_luks(&disk, &passphrase);
        e.restore(
            &RestoreRequest::new(repo.clone(), dom.name(), made.manifest.id.as_str()),
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
        let info = ExternalCommand::new("qemu-img").args(["info", "-U"]).arg(&disk).run().unwrap().stdout_text();
        assert!(info.contains("encrypted: yes"), "the restored volume is encrypted: {info}");
        let back = decrypted(&disk, &passphrase, &dom.dir().join("back.raw"));
        assert!(same(&back, &point), "the restored volume opens with its own passphrase and holds the point");
    }
    // The VM starts on its restored volume (libvirt opens it with the secret).
    dom.start();
    dom.destroy();
    // An instant restore: the VM runs at once on an overlay encrypted with the volume's own
    // passphrase, so what the guest writes meanwhile is never plaintext; QEMU copies the point
    // onto a new LUKS volume, encrypting, and the VM ends on it.
    overwrite_luks(&disk, &passphrase);
    let work = dom.dir().join("instant");
    let instant =
        InstantRestoreRequest::new(RestoreRequest::new(repo.clone(), dom.name(), running.manifest.id.as_str()))
            .with_work_dir(&work);
    // Neither key on any command line or in any environment meanwhile.
    let needles = ["the volume's own passphrase, 0123456789abc", "the repository's key, not the volume's, 0123456789"];
    let (state, seen) = watching_processes(&needles, || e.instant_restore(&instant, &CancelHandle::new()));
    let state = state.unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(seen, [false, false], "a key was seen on a command line or in an environment");
    assert!(state.disks[0].encrypted, "{state:?}");
    let info = ExternalCommand::new("qemu-img").args(["info", "-U"]).arg(&state.disks[0].overlay).run().unwrap();
    assert!(info.stdout_text().contains("encrypted: yes"), "the overlay is encrypted: {}", info.stdout_text());
    // The guest writes the random MiB again, at 8 MiB, while it runs on the overlay.
    let cmd = format!("qemu-io -d {qdev} \"write -s {} 8M 1M\"", dom.dir().join("random.bin").display());
    let said = nasbak_testlab::virsh(&["qemu-monitor-command", dom.name(), "--hmp", &cmd]).unwrap();
    assert!(said.trim().is_empty(), "{said}");
    assert_eq!(plaintext_sectors(&work, &random), 0, "nothing the guest wrote is plaintext in the overlay");
    let (finished, seen) = watching_processes(&needles, || {
        e.instant_finish(&work, dom.name(), Duration::from_secs(300), &CancelHandle::new(), &mut |_| {})
    });
    finished.unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(seen, [false, false], "a key was seen on a command line or in an environment");
    let live = nasbak_testlab::virsh(&["dumpxml", dom.name()]).unwrap();
    // The VM runs on its volume, which QEMU opens with the volume's secret.
    let d = nasbak::nasbak_libvirt::Domain::parse(&live).unwrap();
    assert_eq!(d.disks[0].source, Some(nasbak::nasbak_libvirt::DiskSource::File(disk.clone())), "{live}");
    assert_eq!(
        d.disks[0].encryption.as_ref().and_then(|e| e.secret_uuid.as_deref()),
        Some(secret.0.as_str()),
        "{live}"
    );
    dom.destroy();
    let info = ExternalCommand::new("qemu-img").args(["info", "-U"]).arg(&disk).run().unwrap().stdout_text();
    assert!(info.contains("encrypted: yes"), "the instantly restored volume is encrypted: {info}");
    let mut expected = fs::read(&point).unwrap();
    expected[8 << 20..9 << 20].copy_from_slice(&random);
    let back = decrypted(&disk, &passphrase, &dom.dir().join("instant.raw"));
    assert!(fs::read(&back).unwrap() == expected, "the volume holds the point and what the guest wrote");
    let stored = fs::read(&disk).unwrap();
    let wanted: HashSet<&[u8]> = random.chunks(512).collect();
    assert_eq!(stored.chunks(512).filter(|c| wanted.contains(c)).count(), 0, "the volume holds no plaintext");
    assert!(!work.join(dom.name()).exists(), "the restore's overlay and state are gone");
    // A private secret cannot be read by any client: a shut-off copy says so, and what works.
    drop(secret);
    let _private = VolumeSecret::define(dom.dir(), &disk, &passphrase, true);
    let xml = fs::read_to_string(&defined).unwrap();
    let uuid_at = xml.find("secret type='passphrase' uuid='").unwrap() + "secret type='passphrase' uuid='".len();
    fs::write(&defined, format!("{}{}{}", &xml[..uuid_at], _private.0, &xml[uuid_at + 36..])).unwrap();
    nasbak_testlab::virsh(&["define", defined.to_str().unwrap()]).unwrap();
    let err = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap_err();
    let said = nasbak::chain(&err);
    assert!(said.contains("private libvirt secret") && said.contains("while the VM runs"), "{said}");
    // An instant restore needs the passphrase for the overlay and the new volume: refused
    // before anything changes.
    let before = fs::read(&disk).unwrap();
    let err = e.instant_restore(&instant, &CancelHandle::new()).unwrap_err();
    let said = nasbak::chain(&err);
    assert!(said.contains("private libvirt secret") && said.contains("private='no'"), "{said}");
    assert!(fs::read(&disk).unwrap() == before, "the volume is untouched");
    assert!(!work.join(dom.name()).exists(), "nothing made for the restore");
    assert_eq!(nasbak_testlab::virsh(&["domstate", dom.name()]).unwrap().trim(), "shut off");
}

/// Whether any process's command line or environment holds each of `needles` while `f` runs.
fn watching_processes<T>(needles: &[&str], f: impl FnOnce() -> T) -> (T, Vec<bool>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Vec<AtomicBool>> = Arc::new(needles.iter().map(|_| AtomicBool::new(false)).collect());
    let watcher = {
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
        let needles: Vec<String> = needles.iter().map(|n| n.to_string()).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for e in fs::read_dir("/proc").unwrap().flatten() {
                    for part in ["cmdline", "environ"] {
                        if let Ok(bytes) = fs::read(e.path().join(part)) {
                            let text = String::from_utf8_lossy(&bytes);
                            for (i, n) in needles.iter().enumerate() {
                                if text.contains(n.as_str()) {
                                    seen[i].store(true, Ordering::SeqCst);
                                }
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    (out, seen.iter().map(|s| s.load(Ordering::SeqCst)).collect())
}

#[test]
fn the_key_is_never_on_a_command_line_or_in_an_environment() {
    let dom = DomainSpec::new("keyargv").disk(DiskSpec::qcow2(32)).running(true).create();
    let e = engine(&dom.dir().join("runtime"));
    let catalog = Catalog::new(e.images(), e.mounts());
    let value = "argv-watch-secret-value-0123456789abcdef";
    let key = key_file(dom.dir(), "watched.key", value);
    let new_value = "argv-watch-new-secret-value-9876543210fedcba";
    let new = key_file(dom.dir(), "watched.new.key", new_value);
    let root = dom.dir().join("repo");
    let repo = repository("watched", &root, Compression::Zstd, Encryption::Luks, Some(&key));
    let path = key.to_string_lossy().into_owned();
    let needles = [value, new_value, path.as_str()];
    let (ids, seen) = watching_processes(&needles, || {
        dom.write_through_qemu(0, 0x11, "0", "2M");
        let running =
            e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
        dom.destroy();
        dom.write_offline(0, 0x22, "4M", "1M");
        let stopped =
            e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
        let to = dom.dir().join("watched.qcow2");
        let request = VolumeRestoreRequest::new(
            repo.clone(),
            dom.name(),
            stopped.manifest.id.as_str(),
            "vda",
            ImageLocation::Path(to),
        );
        e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(
            catalog.verify(&repo, dom.name(), &stopped.manifest.id, &CancelHandle::new(), &mut |_| {}).unwrap().ok()
        );
        catalog.rotate_key(&repo, &new, &CancelHandle::new()).unwrap();
        (running.manifest.id, stopped.manifest.id)
    });
    assert!(!seen[0] && !seen[1], "a key's value was on a command line or in an environment: {seen:?}");
    // The watch works: the key file's path, which qemu-img and qemu-storage-daemon are given, was seen.
    assert!(seen[2], "the watch saw no command line naming the key file");
    assert_ne!(ids.0, ids.1);
}

#[test]
fn prune_merges_a_protected_chain_into_a_full_stored_the_same_way() {
    use nasbak::nasbak_repo::RetentionPolicy;
    let dom = DomainSpec::new("protmerge").disk(DiskSpec::qcow2(32)).create();
    let e = engine(&dom.dir().join("runtime"));
    let catalog = Catalog::new(e.images(), e.mounts());
    let key = key_file(dom.dir(), "merge.key", "the key of the merged chains, 0123456789abcdef");
    for (name, compression, encryption, format) in [
        ("luks", Compression::None, Encryption::Luks, FileFormat::Encrypted),
        ("both", Compression::Zstd, Encryption::Luks, FileFormat::CompressedInLuks),
    ] {
        let root = dom.dir().join(format!("repo-{name}"));
        let repo = repository(name, &root, compression, encryption, Some(&key));
        let backup =
            || e.backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {}).unwrap();
        dom.write_offline(0, 0x11, "0", "4M");
        let full = backup();
        dom.write_offline(0, 0x22, "8M", "2M");
        let inc = backup();
        assert_eq!(inc.manifest.parent.as_deref(), Some(full.manifest.id.as_str()));
        let point = dom.raw_copy(0, &format!("{name}-merge"));
        let report = catalog
            .prune(&repo, dom.name(), Some(&RetentionPolicy::keep_last(1)), &Default::default(), false)
            .unwrap_or_else(|err| panic!("{name}: {}", nasbak::chain(&err)));
        assert!(report.decisions.iter().any(|d| d.id == full.manifest.id && !d.keep), "{name}: {report:?}");
        let left = catalog.list(&repo, Some(dom.name())).unwrap();
        assert_eq!(left.len(), 1, "{name}: {left:?}");
        let nasbak::BackupKind::Nasbak(m) = &left[0].kind else { panic!("{left:?}") };
        assert_eq!(m.mode, BackupMode::Full, "{name}: merged");
        assert!(m.disks.iter().all(|d| d.stored_as == format), "{name}: stored as before: {:?}", m.disks);
        assert!(catalog.verify(&repo, dom.name(), &m.id, &CancelHandle::new(), &mut |_| {}).unwrap().ok());
        let to = dom.dir().join(format!("{name}-merged.qcow2"));
        let request =
            VolumeRestoreRequest::new(repo.clone(), dom.name(), m.id.as_str(), "vda", ImageLocation::Path(to.clone()));
        e.restore_volume(&request, &CancelHandle::new(), &mut |_| {}).unwrap();
        assert!(same(&to, &point), "{name}: the merged full holds the incremental's point");
    }
}

#[test]
fn a_key_kept_as_a_libvirt_secret_rotates_to_another_secret_and_to_a_file() {
    let dom = DomainSpec::new("rotsecret").disk(DiskSpec::qcow2(16)).create();
    let e = engine(&dom.dir().join("runtime"));
    let cancel = CancelHandle::new();
    let value = |name: &str, v: &str| key_file(dom.dir(), name, v);
    let first = VolumeSecret::define(
        dom.dir(),
        &dom.dir().join("key-1"),
        &value("v1", "the first secret of this repository 0123"),
        false,
    );
    let second = VolumeSecret::define(
        dom.dir(),
        &dom.dir().join("key-2"),
        &value("v2", "the second secret of this repository 4567"),
        false,
    );
    let secret = |s: &VolumeSecret| KeySource::libvirt_secret(&s.0).unwrap();
    let root = dom.dir().join("repo");
    let with_key = |key: KeySource| {
        repository("sec", &root, Compression::None, Encryption::None, None)
            .with_protection(Protection::new(Compression::None, Encryption::Luks, Some(key)).unwrap())
    };
    let repo = with_key(secret(&first));
    dom.write_offline(0, 0x31, "0", "2M");
    let full = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &cancel, &mut |_| {}).unwrap();
    dom.write_offline(0, 0x32, "4M", "1M");
    let inc = e.backup(&BackupRequest::new(dom.name(), repo.clone()), &cancel, &mut |_| {}).unwrap();
    assert_eq!((full.manifest.disks[0].stored_as, inc.manifest.mode), (FileFormat::Encrypted, BackupMode::Incremental));
    let point = dom.raw_copy(0, "secret-point");

    // Without libvirt, a secret cannot be read: the catalog says where to go.
    let catalog = Catalog::new(e.images(), e.mounts());
    let err = catalog.rotate_key(&repo, &dom.dir().join("v2"), &cancel).unwrap_err();
    assert!(nasbak::chain(&err).contains("libvirt secret"), "{}", nasbak::chain(&err));

    assert!(e.check_key(&repo, None).unwrap().ok());
    assert!(!e.check_key(&repo, Some(&secret(&second))).unwrap().ok());
    let done = e.rotate_key(&repo, &secret(&second), &cancel).unwrap();
    assert_eq!((done.files, done.rotated, done.already), (2, 2, 0), "{done:?}");
    let repo = with_key(secret(&second));
    assert!(e.check_key(&repo, None).unwrap().ok());
    assert!(!e.check_key(&repo, Some(&secret(&first))).unwrap().ok(), "the first secret no longer opens them");

    // From a secret to a key file; the chain restores with it, and verify passes.
    let file = value("k3", "a key file for this repository now, 89ab");
    let done = e.rotate_key(&repo, &KeySource::File(file.clone()), &cancel).unwrap();
    assert_eq!(done.rotated, 2, "{done:?}");
    let repo = with_key(KeySource::File(file));
    assert!(catalog.check_key(&repo, None).unwrap().ok());
    let report = catalog.verify(&repo, dom.name(), &inc.manifest.id, &cancel, &mut |_| {}).unwrap();
    assert!(report.ok() && report.files.iter().all(|f| f.check == CheckVerdict::Clean), "{report:?}");
    let to = dom.dir().join("secret-restored.qcow2");
    let request = VolumeRestoreRequest::new(
        repo.clone(),
        dom.name(),
        inc.manifest.id.as_str(),
        "vda",
        ImageLocation::Path(to.clone()),
    );
    e.restore_volume(&request, &cancel, &mut |_| {}).unwrap();
    assert!(same(&to, &point));

    // A secret too short to be a repository key is refused before anything changes.
    let short = VolumeSecret::define(dom.dir(), &dom.dir().join("key-4"), &value("v4", "short"), false);
    let err = e.rotate_key(&repo, &secret(&short), &cancel).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KeyRejected, "{}", nasbak::chain(&err));
    assert!(nasbak::chain(&err).contains("at least 32"), "{}", nasbak::chain(&err));
    assert!(catalog.check_key(&repo, None).unwrap().ok());

    // Back to a secret; prune merges the chain with it through the engine. The catalog alone
    // cannot read the secret: its merge fails and keeps the chain, the reason said.
    let done = e.rotate_key(&repo, &secret(&second), &cancel).unwrap();
    assert_eq!(done.rotated, 2, "{done:?}");
    let repo = with_key(secret(&second));
    let keep = nasbak::nasbak_repo::RetentionPolicy::keep_last(1);
    let kept = catalog.prune(&repo, dom.name(), Some(&keep), &Default::default(), false).unwrap();
    assert!(kept.decisions.iter().all(|d| d.keep), "the chain is kept whole: {kept:?}");
    assert_eq!(catalog.list(&repo, Some(dom.name())).unwrap().len(), 2);
    let merged = e.prune(&repo, dom.name(), Some(&keep), &Default::default(), false).unwrap();
    assert!(merged.decisions.iter().any(|d| d.id == full.manifest.id && !d.keep), "{merged:?}");
    let left = catalog.list(&repo, Some(dom.name())).unwrap();
    let nasbak::BackupKind::Nasbak(m) = &left[0].kind else { panic!("{left:?}") };
    assert_eq!((left.len(), m.mode, m.disks[0].stored_as), (1, BackupMode::Full, FileFormat::Encrypted), "{left:?}");
    let to = dom.dir().join("secret-merged.qcow2");
    let request =
        VolumeRestoreRequest::new(repo.clone(), dom.name(), m.id.as_str(), "vda", ImageLocation::Path(to.clone()));
    e.restore_volume(&request, &cancel, &mut |_| {}).unwrap();
    assert!(same(&to, &point), "the merged full holds the incremental's point");
}

#[test]
fn a_vm_whose_name_has_a_dot_and_two_disks_is_pulled_and_each_disk_restores() {
    let dom = DomainSpec::new("pull.dot").disk(DiskSpec::qcow2(16)).disk(DiskSpec::qcow2(24)).running(true).create();
    let e = engine(&dom.dir().join("runtime"));
    let key = key_file(dom.dir(), "backup.key", "the key of the dotted VM's repository, 0123456789");
    let repo = repository("dotted", &dom.dir().join("repo"), Compression::Zstd, Encryption::Luks, Some(&key));
    dom.write_through_qemu(0, 0x41, "1M", "2M");
    dom.write_through_qemu(1, 0x42, "3M", "2M");
    let made = e
        .backup(&BackupRequest::new(dom.name(), repo.clone()), &CancelHandle::new(), &mut |_| {})
        .unwrap_or_else(|err| panic!("{}", nasbak::chain(&err)));
    assert_eq!(made.manifest.method, BackupMethod::PullJob);
    assert_eq!(made.manifest.disks.len(), 2);
    for (i, disk) in ["vda", "vdb"].into_iter().enumerate() {
        let want = dom.raw_copy(i, &format!("dot-{disk}"));
        let to = dom.dir().join(format!("restored-{disk}.qcow2"));
        let request = VolumeRestoreRequest::new(
            repo.clone(),
            dom.name(),
            made.manifest.id.as_str(),
            disk,
            ImageLocation::Path(to.clone()),
        );
        e.restore_volume(&request, &CancelHandle::new(), &mut |_| {})
            .unwrap_or_else(|err| panic!("{disk}: {}", nasbak::chain(&err)));
        assert!(same(&to, &want), "{disk}: the disk's own data");
    }
}
