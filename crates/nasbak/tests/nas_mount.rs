//! `nasbak mount` of disks laid out with what only device-mapper shows, run by `cargo xtask lab
//! nas` inside the NAS lab guest, whose Debian kernel has device-mapper (dm-linear, striped,
//! thin, raid, snapshot, crypt) that the host's lacks. The disks are made in the guest with
//! LVM's and cryptsetup's own tools, as an installer makes them: a volume group over a
//! partition of one disk and the whole of another, with a volume spanning both, a striped one,
//! a thin volume in a pool, a RAID 1 volume and an old-style snapshot; a whole disk that is
//! LUKS2 holding ext4 next to them; and RHEL's encrypted layout (LUKS2 holding a physical
//! volume), while the machine's own volume group of the backup's group name is active. They
//! are backed up (a shut-off VM: real qemu-img; the
//! hypervisor is a mock, there is no libvirt in the guest), mounted with the LUKS key file,
//! read back by checksum, and unmounted with nothing left: no mounts, loop devices,
//! device-mapper devices or daemons; also after a mount killed half-way. Built only with the `nas-guest` feature. See
//! docs/testing.md.
#![cfg(feature = "nas-guest")]

mod nas_guest;

use std::fs;
use std::path::Path;
use std::process::Command;

use nasbak::mock::MockAgentSource;
use nasbak::nasbak_libvirt::CancelHandle;
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter};
use nasbak::{BackupRequest, Engine, MountRequest};
use nasbak_testlab::pseudo_random;

/// Runs `script` with bash, LVM and libdevmapper told that there is no udev (the guest runs
/// none); its stdout. Panics with its output when it fails.
fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{script}\nfailed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// What a mount could leave behind under `dir`: mounts, loop devices over its files,
/// device-mapper devices of nasbak's, processes naming it.
fn traces(dir: &Path) -> Vec<String> {
    let d = dir.to_str().unwrap();
    let mut found: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(d)))
        .map(|l| format!("mount: {l}"))
        .collect();
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && b.starts_with(d)
        {
            found.push(format!("loop: {b}"));
        }
    }
    for line in sh("dmsetup ls").lines() {
        if line.starts_with("nasbak-") {
            found.push(format!("device-mapper: {line}"));
        }
    }
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(d)
        {
            found.push(format!("process {}", e.file_name().to_string_lossy()));
        }
    }
    found
}

/// The environment variable that makes this test binary a mount to be killed (see
/// [`mount_in_a_child`]): `REPO_ROOT VM ID DIR KEY`, one per line.
const CHILD: &str = "NASBAK_TEST_CHILD_MOUNT";

/// In the child: mounts what the variable says and exits without unmounting.
fn child_mount(spec: &str) -> ! {
    let [root, vm, id, dir, key] = spec.lines().collect::<Vec<_>>()[..] else { panic!("{CHILD}: {spec:?}") };
    let runtime = Path::new(dir).with_extension("run");
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default());
    let engine = Engine::new(nas_guest::shut_off_vm(vm, &[]), MockAgentSource::new(), QemuImg::new(&runtime), mounts);
    let kind = RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("dm", kind, root, "", None).unwrap();
    let request = MountRequest::new(repo, vm, id, dir).open_luks_with(key);
    engine.catalog().mount(&request, &CancelHandle::new()).unwrap();
    std::process::exit(0)
}

/// Runs a mount of backup `id` under `dir` in a child process (this test binary again), kills
/// it with SIGKILL as soon as its first device-mapper device is there, and returns.
fn mount_in_a_child(root: &Path, vm: &str, id: &str, dir: &Path, key: &Path) {
    let spec = format!("{}\n{vm}\n{id}\n{}\n{}", root.display(), dir.display(), key.display());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "logical_volumes_of_every_kind_and_luks_volumes_are_mounted_read_only_and_leave_nothing"])
        .env(CHILD, spec)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        if sh("dmsetup ls").lines().any(|l| l.starts_with("nasbak-")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn logical_volumes_of_every_kind_and_luks_volumes_are_mounted_read_only_and_leave_nothing() {
    if let Ok(spec) = std::env::var(CHILD) {
        child_mount(&spec);
    }
    sh("for m in loop fuse dm_mod dm_thin_pool dm_snapshot dm_raid dm_crypt; do modprobe $m; done");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (vda, vdb, vdc, vdd) = (d.join("vda.raw"), d.join("vdb.raw"), d.join("vdc.raw"), d.join("vdd.raw"));
    let key = d.join("luks.key");
    fs::write(&key, b"lab-luks-passphrase").unwrap();
    let files: Vec<(&str, Vec<u8>)> = ["spread", "wide", "thin1", "mirror", "origin", "luks", "root", "secret"]
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, pseudo_random((3 << 20) + i * 4099, 2 * i as u64 + 1)))
        .collect();
    for (name, data) in &files {
        fs::write(d.join(format!("{name}.bin")), data).unwrap();
    }
    let boot = b"vmlinuz and friends\n";
    fs::write(d.join("boot.txt"), boot).unwrap();
    // vda: a boot partition and a physical volume; vdb: a physical volume on the whole disk;
    // vdc: LUKS2 on the whole disk, ext4 inside; vdd: RHEL's encrypted layout (a boot
    // partition, then LUKS2 holding a physical volume with root and swap). Then the guest's
    // own volume group named as the backup's, `tvg`, with a volume of the same name as one in
    // the backup, active.
    sh(&format!(
        "cd {d}
         truncate -s 160M vda.raw; truncate -s 128M vdb.raw; truncate -s 64M vdc.raw; truncate -s 96M vdd.raw
         printf 'label: gpt\\n,32M\\n,\\n' | sfdisk -q vda.raw
         A=$(losetup -P --find --show vda.raw); B=$(losetup --find --show vdb.raw)
         mkfs.ext4 -q ${{A}}p1; mkdir m; mount ${{A}}p1 m; cp boot.txt m/; umount m
         pvcreate -q ${{A}}p2 $B; vgcreate -q -s 4m tvg ${{A}}p2 $B
         lvcreate -q -y -Zn -L 12m -n spread tvg ${{A}}p2; lvextend -q -L +12m tvg/spread $B
         lvcreate -q -y -Zn -i 2 -I 64k -L 16m -n wide tvg
         lvcreate -q -y -Zn -L 24m -T tvg/pool; lvcreate -q -y -V 48m -T tvg/pool -n thin1
         lvcreate -q -y -Zn --type raid1 -m 1 --nosync -L 16m -n mirror tvg
         lvcreate -q -y -Zn -L 16m -n origin tvg
         for v in spread wide thin1 mirror origin; do
             mkfs.ext4 -q /dev/mapper/tvg-$v; mount /dev/mapper/tvg-$v m; cp $v.bin m/; umount m
         done
         lvcreate -q -y -s -L 8m -n snap tvg/origin
         mount /dev/mapper/tvg-origin m; echo after > m/after-the-snapshot; umount m
         vgchange -q -an tvg; losetup -d $A $B
         C=$(losetup --find --show vdc.raw)
         cryptsetup -q luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file luks.key $C
         cryptsetup open --key-file luks.key $C labluks; mkfs.ext4 -q /dev/mapper/labluks
         mount /dev/mapper/labluks m; cp luks.bin m/; umount m; cryptsetup close labluks; losetup -d $C
         printf 'label: dos\n,16M\n,\n' | sfdisk -q vdd.raw
         D=$(losetup -P --find --show vdd.raw); mkfs.ext4 -q ${{D}}p1
         cryptsetup -q luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file luks.key ${{D}}p2
         cryptsetup open --key-file luks.key ${{D}}p2 labpv; pvcreate -q /dev/mapper/labpv
         vgcreate -q -s 4m rhel /dev/mapper/labpv; lvcreate -q -y -Zn -L 16m -n root rhel; lvcreate -q -y -Zn -L 8m -n swap rhel
         mkfs.ext4 -q /dev/mapper/rhel-root; mkswap -q /dev/mapper/rhel-swap
         mount /dev/mapper/rhel-root m; cp root.bin m/; umount m
         lvcreate -q -y -Zn -L 24m -n secret rhel
         cryptsetup -q luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file luks.key /dev/mapper/rhel-secret
         cryptsetup open --key-file luks.key /dev/mapper/rhel-secret labsecret; mkfs.ext4 -q /dev/mapper/labsecret
         mount /dev/mapper/labsecret m; cp secret.bin m/; umount m; cryptsetup close labsecret
         vgchange -q -an rhel; cryptsetup close labpv; losetup -d $D
         truncate -s 64M host.raw; H=$(losetup --find --show host.raw); echo $H > host.loop
         pvcreate -q $H; vgcreate -q -s 4m tvg $H; lvcreate -q -y -Zn -L 8m -n spread tvg",
        d = d.display()
    ));
    let vm = format!("dm-vm-{}", std::process::id());
    let runtime = d.join("run");
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default());
    let disks: Vec<(&str, &str, &Path)> =
        vec![("vda", "raw", &vda), ("vdb", "raw", &vdb), ("vdc", "raw", &vdc), ("vdd", "raw", &vdd)];
    let engine =
        Engine::new(nas_guest::shut_off_vm(&vm, &disks), MockAgentSource::new(), QemuImg::new(&runtime), mounts);
    let root = d.join("repo");
    fs::create_dir_all(&root).unwrap();
    let kind = RepositoryKind::from_parts("shared", None).unwrap();
    let repo = BackupRepository::new("dm", kind, root.to_str().unwrap(), "", None).unwrap();
    let cancel = CancelHandle::new();
    let backup = engine.backup(&BackupRequest::new(&vm, repo.clone()), &cancel, &mut |_| {}).unwrap();
    let id = backup.manifest.id.clone();
    let catalog = engine.catalog();

    // A mount killed half-way (SIGKILL once its first device-mapper device is there): umount
    // finds what it left from the system and removes it all.
    let killed = d.join("killed");
    mount_in_a_child(&root, &vm, &id, &killed, &key);
    let report = catalog.unmount(&killed).unwrap();
    eprintln!("after a killed mount: {report:?}");
    assert_eq!(traces(&killed), Vec::<String>::new());
    assert!(!killed.exists());

    // A mount cancelled (as Ctrl-C cancels it) once its first device-mapper device is there:
    // it fails as cancelled, with everything it had made removed.
    let cancelled = d.join("cancelled");
    let handle = CancelHandle::new();
    let canceller = handle.clone();
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !sh("dmsetup ls").lines().any(|l| l.starts_with("nasbak-")) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        canceller.cancel();
    });
    let err = catalog.mount(&MountRequest::new(repo.clone(), &vm, &id, &cancelled).open_luks_with(&key), &handle);
    watcher.join().unwrap();
    assert!(matches!(err, Err(nasbak::BackupError::Cancelled)), "{err:?}");
    assert_eq!(traces(&cancelled), Vec::<String>::new());
    assert!(!cancelled.exists());

    // Without the key: the LUKS disk is listed with what to give.
    let plain = d.join("no-key");
    let mounted = catalog.mount(&MountRequest::new(repo.clone(), &vm, &id, &plain), &cancel).unwrap();
    let vdc_not = &mounted.disks[2].not_mounted;
    assert!(vdc_not.iter().any(|n| n.reason.contains("give --luks-key-file")), "{vdc_not:?}");
    catalog.unmount(&plain).unwrap();
    assert_eq!(traces(&plain), Vec::<String>::new());

    // A wrong key: the same, with cryptsetup's reason, and nothing left open.
    let wrong = d.join("wrong.key");
    fs::write(&wrong, b"not the passphrase").unwrap();
    let bad = d.join("wrong-key");
    let mounted =
        catalog.mount(&MountRequest::new(repo.clone(), &vm, &id, &bad).open_luks_with(&wrong), &cancel).unwrap();
    let vdc_not = &mounted.disks[2].not_mounted;
    assert!(vdc_not.iter().any(|n| n.reason.starts_with("encrypted (LUKS): opening it")), "{vdc_not:?}");
    catalog.unmount(&bad).unwrap();
    assert_eq!(traces(&bad), Vec::<String>::new());

    // With the key: everything.
    let at = d.join("mnt");
    let mounted = catalog.mount(&MountRequest::new(repo.clone(), &vm, &id, &at).open_luks_with(&key), &cancel).unwrap();
    eprintln!("{mounted:#?}");
    // The kernel's side of what device-mapper refused, if anything.
    eprintln!("{}", sh("dmesg | grep -i -E 'device-mapper|thin|snapshot|raid|crypt' | tail -30 || true"));
    let shown: Vec<String> = mounted
        .disks
        .iter()
        .flat_map(|disk| {
            disk.filesystems
                .iter()
                .map(move |f| format!("{}/{}", disk.target, f.path.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    for want in [
        "vda/part1",
        "vda/lv-tvg-spread",
        "vda/lv-tvg-wide",
        "vda/lv-tvg-thin1",
        "vda/lv-tvg-mirror",
        "vda/lv-tvg-origin",
        "vda/lv-tvg-snap",
        "vdc/fs",
        "vdd/part1",
        "vdd/lv-rhel-root",
        "vdd/lv-rhel-secret",
    ] {
        assert!(shown.iter().any(|s| s == want), "{want} not in {shown:?}");
    }
    assert_eq!(fs::read(at.join("vda/part1/boot.txt")).unwrap(), boot);
    for (name, data) in &files {
        let path = match *name {
            "luks" => at.join("vdc/fs/luks.bin"),
            "root" => at.join("vdd/lv-rhel-root/root.bin"),
            "secret" => at.join("vdd/lv-rhel-secret/secret.bin"),
            n => at.join(format!("vda/lv-tvg-{n}/{n}.bin")),
        };
        let read = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(read == *data, "{} differs from what was written", path.display());
    }
    // The snapshot shows the origin as it was when it was taken.
    assert!(at.join("vda/lv-tvg-origin/after-the-snapshot").exists());
    assert!(!at.join("vda/lv-tvg-snap/after-the-snapshot").exists());
    assert_eq!(fs::read(at.join("vda/lv-tvg-snap/origin.bin")).unwrap(), files[4].1);
    // Copied out as a file restore does, and read-only.
    let copy = d.join("thin.copy");
    sh(&format!("cp {} {}", at.join("vda/lv-tvg-thin1/thin1.bin").display(), copy.display()));
    assert_eq!(fs::read(&copy).unwrap(), files[2].1);
    assert!(fs::write(at.join("vda/lv-tvg-wide/new"), b"x").is_err(), "read-only");
    let vdd_not = &mounted.disks[3].not_mounted;
    assert!(vdd_not.iter().any(|n| n.logical_volume.as_deref() == Some("rhel/swap") && n.reason == "swap space"));
    // The backup's volume groups are activated nowhere: the only LVM device is the guest's own
    // tvg/spread, untouched.
    let lvm_devices = || -> Vec<String> {
        sh("dmsetup ls")
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| !n.starts_with("nasbak-"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(lvm_devices(), ["tvg-spread"]);
    let report = catalog.unmount(&at).unwrap();
    assert!(report.mappings.len() >= 10, "{report:?}");
    assert_eq!(traces(&at), Vec::<String>::new());
    assert!(!at.exists());
    assert_eq!(lvm_devices(), ["tvg-spread"]);
    sh(&format!("vgremove -q -f tvg; losetup -d $(cat {d}/host.loop)", d = d.display()));
    catalog.delete(&repo, &vm, &id).unwrap();
}
