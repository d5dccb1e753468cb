//! A backup mounted read-only: each disk (with its chain) shown as a raw image through a FUSE
//! export of qemu-storage-daemon, and its file systems mounted read-only beside it, without
//! restoring anything and without `/dev/nbd`.
//!
//! Under the directory `DIR` the user names (empty or new):
//!
//! ```text
//! DIR/.nasbak-mount.json     what is mounted (read by unmount)
//! DIR/vda/disk.raw           the disk's content, read-only, for tools that want blocks
//! DIR/vda/part1/ part2/ ...  each partition's file system, read-only
//! DIR/vdb/fs/                a disk without a partition table: its file system
//! ```
//!
//! The file systems are mounted through loop devices that mount(8) sets up over `disk.raw` (at
//! the partition's offset, read-only, cleared when unmounted), with `ro,nodev,nosuid,noexec`
//! and, for the journalling file systems, their option that replays nothing (ext3/ext4
//! `noload`, xfs `norecovery`, btrfs `rescue=nologreplay`, at the top of its tree:
//! `subvolid=5`). Nothing writes to the backup: the daemon opens every file of the chain
//! read-only and its export refuses writes.
//!
//! [`Catalog::unmount`] finds what is there again from the system (mounts and loop devices
//! under `DIR`, the daemons' pid files) rather than from memory, so it also cleans up after a
//! mount that was killed half-way; a failed mount cleans up the same way before it returns.
//! The repository stays mounted while a daemon serves files of it (the daemon inherits the
//! registration that keeps it mounted) and is unmounted by [`Catalog::unmount`] when no other
//! user is left.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak_process::{CancelHandle, ExternalCommand};
use nasbak_qemu_img::{ExportKind, ImageFormat, ImageLocation, ImageTool, ReadOnlyExport};
use nasbak_repo::{BackupId, Mounter, VmName};

use crate::devmap::DeviceMapper;
use crate::engine::Catalog;
use crate::error::{BackupError, Step, at};
use crate::lvm::Placement;
use crate::outcome::{MountedBackup, MountedDisk, MountedFilesystem, NotMounted, UnmountReport};
use crate::request::MountRequest;
use crate::store::backup_disks;
use crate::transfer::check_chain;
use nasbak_repo::store::VmLock;
use nasbak_repo::store::ancestors;

/// The file in a mount directory that says what is mounted there.
pub const MOUNT_STATE_FILE: &str = ".nasbak-mount.json";
/// The name of each disk's raw image in its directory.
pub const DISK_IMAGE_FILE: &str = "disk.raw";
/// How long one call of partx, blkid, mount, umount or losetup may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a busy file system is tried again before unmount gives up on it.
const BUSY_WAIT: Duration = Duration::from_secs(2);
/// How long a daemon has to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl<I: ImageTool + Sync, M: Mounter> Catalog<'_, I, M> {
    /// Shows a backup's disks read-only under `request.dir` (see the module's documentation):
    /// every file of each disk's chain is checked (`qemu-img check`, while the exports start)
    /// before any file system is mounted; a failure on the way leaves nothing behind. The mount lasts beyond this call, until [`Catalog::unmount`].
    pub fn mount(&self, request: &MountRequest, cancel: &CancelHandle) -> Result<MountedBackup, BackupError> {
        let vm = VmName::new(&request.vm)?;
        request.id.parse::<BackupId>()?;
        if let Some(key) = &request.luks_key_file
            && !key.is_file()
        {
            return Err(BackupError::NotFound {
                what: format!(
                    "the LUKS key file {} (--luks-key-file: the file that holds the passphrase of the guest's LUKS volumes)",
                    key.display()
                ),
            });
        }
        let dir = std::path::absolute(&request.dir).map_err(|source| BackupError::Io {
            action: "resolving",
            path: request.dir.clone(),
            source,
        })?;
        let created_dir = prepare_dir(&dir)?;
        let mut state = MountedBackup {
            backup: format!("{}:{}/{}", request.repository.name(), request.vm, request.id),
            dir: dir.clone(),
            repository: request.repository.name().to_string(),
            created_dir,
            disks: Vec::new(),
        };
        // The state first: from here on, the directory is known as nasbak's to unmount.
        if let Err(e) = write_state(&state) {
            if created_dir {
                let _ = fs::remove_dir(&dir);
            }
            return Err(e);
        }
        let mut undo =
            Undo { mounts: self.mounts(), dir: dir.clone(), repository: state.repository.clone(), armed: true };
        let mounted = self.mounts().acquire(&request.repository)?;
        let layout = mounted.layout();
        let (_, _, backup_dir) = layout.resolve_backup(&format!("{}/{}", request.vm, request.id))?;
        let disks = backup_disks(&backup_dir, &request.vm, &request.id, &|| None)?;
        let selected: Vec<_> = match &request.disk {
            None => disks.iter().collect(),
            Some(t) => vec![disks.iter().find(|d| &d.target == t).ok_or_else(|| BackupError::NotFound {
                what: format!(
                    "disk {t} in backup {}/{} (it has {})",
                    request.vm,
                    request.id,
                    disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>().join(", ")
                ),
            })?],
        };
        {
            // Held while the files are checked and opened: a prune or delete waits. Once the
            // daemons have the files open, they read them even if the backup is deleted.
            let _lock = VmLock::take(&layout.vm_dir(&vm), &request.vm)?;
            // Every file of every chain checked before any file system is mounted; an encrypted
            // one with the repository's key file.
            let key = match selected.iter().any(|d| d.stored_as.is_encrypted()) {
                true => crate::protect::file_key(request.repository.protection())?,
                false => None,
            };
            let shown = format!("{}:{}/{}", request.repository.name(), request.vm, request.id);
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let chains = selected
                .iter()
                .map(|disk| ancestors(&layout.vm_dir(&vm), &request.vm, &request.id, disk))
                .collect::<Result<Vec<_>, _>>()?;
            // The files are checked while the exports start (no file system is mounted before
            // both are done; a failure of either undoes the exports).
            std::thread::scope(|s| {
                let images = self.images();
                let checking = s.spawn(|| {
                    selected.iter().zip(&chains).try_for_each(|(disk, chain)| {
                        check_chain(images, (&backup_dir, disk), chain, key.as_ref(), &shown)
                    })
                });
                let exported = (|| {
                    for (disk, chain) in selected.iter().zip(&chains) {
                        let disk_dir = dir.join(&disk.target);
                        fs::create_dir(&disk_dir).map_err(|source| BackupError::Io {
                            action: "creating",
                            path: disk_dir.clone(),
                            source,
                        })?;
                        let image = disk_dir.join(DISK_IMAGE_FILE);
                        let format = disk.format.parse::<ImageFormat>().unwrap_or(ImageFormat::Qcow2);
                        let source = crate::protect::disk_image(&backup_dir, disk, chain, key.as_ref(), &shown)?;
                        let exported = match source {
                            ImageLocation::Stored(stored) => {
                                self.images().export_stored(ExportKind::Fuse, &stored, &image, mounted.registration())
                            }
                            _ => self.images().export_read_only(
                                ExportKind::Fuse,
                                &backup_dir.join(&disk.file),
                                &format,
                                &image,
                                mounted.registration(),
                            ),
                        };
                        exported.map_err(|e| at(Step::Export { disk: disk.target.clone() })(e.into()))?;
                        state.disks.push(MountedDisk {
                            target: disk.target.clone(),
                            size: fs::metadata(&image).map_or(0, |m| m.len()),
                            image,
                            files: chain.len() + 1,
                            filesystems: Vec::new(),
                            not_mounted: Vec::new(),
                        });
                        write_state(&state)?;
                    }
                    Ok(())
                })();
                let checked = checking.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                checked.map_err(at(Step::Check)).and(exported)
            })?;
        }
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let mut inside = Inside { dm: DeviceMapper::new(&dir), luks_key: request.luks_key_file.as_deref() };
        // Cancelled on the way (Ctrl-C), the undo removes what was mounted and opened so far.
        let found = mount_filesystems(&state.disks, &mut inside, cancel)?;
        for (disk, (filesystems, not_mounted)) in state.disks.iter_mut().zip(found) {
            disk.filesystems = filesystems;
            disk.not_mounted = not_mounted;
        }
        write_state(&state)?;
        // The daemons hold the repository now; this process lets go of it.
        drop(mounted);
        undo.armed = false;
        Ok(state)
    }

    /// Removes every trace of a backup mounted under `dir`: its file systems unmounted, loop
    /// devices detached, daemons stopped, the directories and files nasbak made removed (and
    /// `dir` itself when nasbak created it), and the repository unmounted when no other user is
    /// left. Also cleans up after a mount that was killed half-way. A file system still in use
    /// is an error that names it; nothing else is forced, and unmount can be run again.
    pub fn unmount(&self, dir: &Path) -> Result<UnmountReport, BackupError> {
        let dir = std::path::absolute(dir).map_err(|source| BackupError::Io {
            action: "resolving",
            path: dir.to_owned(),
            source,
        })?;
        let Some(state) = read_state(&dir) else {
            return Err(BackupError::NotFound {
                what: format!(
                    "a backup mounted by nasbak at {} (it has no readable {MOUNT_STATE_FILE})",
                    dir.display()
                ),
            });
        };
        let mut report = teardown(&dir)?;
        report.repository_unmounted =
            matches!(self.mounts().unmount_if_unused(&state.repository)?, nasbak_repo::ReleaseOutcome::Unmounted(_));
        if !report.repository_unmounted {
            report.repository_users = self.mounts().users(&state.repository);
        }
        Ok(report)
    }
}

/// Undoes a mount that did not finish: everything under the directory, then the repository
/// when no user is left (this process's own registration, dropped after, unmounts it otherwise).
struct Undo<'a, M: Mounter> {
    mounts: &'a nasbak_repo::RepositoryMounts<M>,
    dir: PathBuf,
    repository: String,
    armed: bool,
}

impl<M: Mounter> Drop for Undo<'_, M> {
    fn drop(&mut self) {
        if self.armed {
            let _ = teardown(&self.dir);
            let _ = self.mounts.unmount_if_unused(&self.repository);
        }
    }
}

/// Makes sure `dir` is a new or empty directory; whether it was created.
fn prepare_dir(dir: &Path) -> Result<bool, BackupError> {
    let bad = |problem: String| BackupError::Directory { path: dir.to_owned(), problem };
    match fs::read_dir(dir).map(|mut e| e.next().is_none()) {
        Ok(true) => Ok(false),
        Ok(false) if dir.join(MOUNT_STATE_FILE).exists() => {
            Err(bad("already holds a mounted backup; unmount it first, or use another directory".into()))
        }
        Ok(false) => Err(bad("is not empty; mount a backup on an empty or new directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(dir).map_err(|source| BackupError::Io {
                action: "creating",
                path: dir.to_owned(),
                source,
            })?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(bad("is not a directory".into())),
        Err(source) => Err(BackupError::Io { action: "reading", path: dir.to_owned(), source }),
    }
}

fn write_state(state: &MountedBackup) -> Result<(), BackupError> {
    let path = state.dir.join(MOUNT_STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("the state serialises");
    nasbak_repo::store::write_atomic(&path, text.as_bytes(), 0o600).map_err(|source| BackupError::Io {
        action: "writing",
        path,
        source,
    })
}

fn read_state(dir: &Path) -> Option<MountedBackup> {
    serde_json::from_str(&fs::read_to_string(dir.join(MOUNT_STATE_FILE)).ok()?).ok()
}

fn tool(action: &str, command: ExternalCommand) -> Result<nasbak_process::CommandOutput, BackupError> {
    command.timeout(TOOL_TIMEOUT).run().map_err(|source| BackupError::Tool { action: action.to_owned(), source })
}

/// A region of a disk image, or of a device standing on one, that may hold a file system.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    /// The partition number; `None` for the whole disk.
    partition: Option<u32>,
    /// The disk's image, or the block device (an opened LUKS volume, a logical volume's
    /// device-mapper device) the region is in.
    source: PathBuf,
    offset: u64,
    size: u64,
}

/// The partitions `partx` finds in the raw image (`NR START SECTORS`, in 512-byte sectors), or
/// the whole disk when it finds no partition table; partx's error when it could not read one.
fn regions(image: &Path, size: u64) -> Result<Vec<Region>, String> {
    let out = ExternalCommand::new("partx")
        .args(["--bytes", "--noheadings", "--raw", "--output", "NR,START,SECTORS"])
        .arg(image)
        .timeout(TOOL_TIMEOUT)
        .run_unchecked()
        .map_err(|e| e.to_string())?;
    let whole = vec![Region { partition: None, source: image.to_owned(), offset: 0, size }];
    if !out.status.success() {
        let why = out.stderr_text();
        return if why.contains("failed to read partition table") { Ok(whole) } else { Err(why.trim().to_owned()) };
    }
    let parsed = parse_partx(&out.stdout_text(), image);
    Ok(if parsed.is_empty() { whole } else { parsed })
}

fn parse_partx(text: &str, image: &Path) -> Vec<Region> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u64>);
            let (nr, start, sectors) = (f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?);
            let partition = Some(u32::try_from(nr).ok()?);
            Some(Region { partition, source: image.to_owned(), offset: start * 512, size: sectors * 512 })
        })
        .collect()
}

/// What blkid says a region holds: its `TYPE` and `USAGE`, if anything.
fn probe(region: &Region) -> Option<(String, String)> {
    let out = ExternalCommand::new("blkid")
        .args(["--probe", "--output", "export", "--offset"])
        .arg(region.offset.to_string())
        .arg("--size")
        .arg(region.size.to_string())
        .arg(&region.source)
        .timeout(TOOL_TIMEOUT)
        .run_unchecked()
        .ok()?;
    parse_blkid(&out.stdout_text())
}

fn parse_blkid(text: &str) -> Option<(String, String)> {
    let value = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned));
    Some((value("TYPE")?, value("USAGE").unwrap_or_default()))
}

/// The read-only mount options for a file system of `fstype`, or why it is not mounted.
fn mount_options(fstype: &str, usage: &str, kernel: &str) -> Result<String, String> {
    let known = |t: &str| kernel.lines().any(|l| l.split_whitespace().last() == Some(t));
    let replay = match fstype {
        "swap" => return Err("swap space".into()),
        "crypto_LUKS" => return Err("encrypted (LUKS): give --luks-key-file to open it read-only".into()),
        "linux_raid_member" => return Err("part of a software RAID: not mounted".into()),
        _ if usage != "filesystem" => return Err(format!("{fstype} ({usage}), not a file system")),
        _ if !known(fstype) => return Err(format!("{fstype}: this kernel does not mount it")),
        "ext3" | "ext4" => ",noload",
        "xfs" => ",norecovery",
        // The top of the tree, whatever subvolume is the default: every subvolume is a
        // directory in it (`@`, `@home`, snapshots).
        "btrfs" => ",rescue=nologreplay,subvolid=5",
        _ => "",
    };
    Ok(format!("ro,nodev,nosuid,noexec{replay}"))
}

/// What mounting the file systems of a backup's disks needs besides the disks: where device-mapper
/// devices are made, and the key of the guest's LUKS volumes.
struct Inside<'a> {
    dm: DeviceMapper,
    luks_key: Option<&'a Path>,
}

/// A region still to look into: on which disk, and the logical volume it is, if one.
type Pending = (usize, Region, Option<String>);

/// What one disk shows: the file systems mounted, and what is not mounted with the reason.
type Shown = (Vec<MountedFilesystem>, Vec<NotMounted>);

/// Where a physical volume's first extent is reached: a block device and a sector on it.
type Reached = Result<(PathBuf, u64), String>;

/// A physical volume found: on which disk, where, and what its label and metadata say.
struct FoundPv {
    disk: usize,
    region: Region,
    pv: crate::lvm::PhysicalVolume,
}

/// Mounts what each region of each disk's image holds: partitions (or the whole disk), LUKS
/// volumes opened read-only with the key, and the logical volumes of the LVM physical volumes
/// found on any of the disks (read from their metadata, nothing activated on the host; one
/// range of a disk through a loop device, the others through device-mapper where the host has
/// it). What is not mounted is listed with the reason, on its disk.
fn mount_filesystems(
    disks: &[MountedDisk],
    inside: &mut Inside<'_>,
    cancel: &CancelHandle,
) -> Result<Vec<Shown>, BackupError> {
    let kernel = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut out: Vec<Shown> = vec![(Vec::new(), Vec::new()); disks.len()];
    let mut queue: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    for (d, disk) in disks.iter().enumerate() {
        match regions(&disk.image, disk.size) {
            Ok(r) => queue.extend(r.into_iter().map(|r| (d, r, None))),
            Err(why) => out[d].1.push(NotMounted {
                partition: None,
                logical_volume: None,
                reason: format!("its partition table could not be read: {why}"),
            }),
        }
    }
    let mut pvs: Vec<FoundPv> = Vec::new();
    let mut groups_read = false;
    loop {
        while let Some((d, region, lv)) = queue.pop_front() {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let skip = |reason: String| NotMounted { partition: region.partition, logical_volume: lv.clone(), reason };
            let Some((fstype, usage)) = probe(&region) else {
                out[d].1.push(skip("no file system found".into()));
                continue;
            };
            if fstype == "LVM2_member" {
                if groups_read {
                    out[d].1.push(skip("an LVM physical volume inside a logical volume: not read".into()));
                    continue;
                }
                match read_physical_volume(&region) {
                    Ok(pv) => pvs.push(FoundPv { disk: d, region, pv }),
                    Err(why) => {
                        out[d].1.push(skip(format!("an LVM physical volume whose metadata could not be read: {why}")))
                    }
                }
                continue;
            }
            if fstype == "crypto_LUKS"
                && let Some(key) = inside.luks_key
            {
                let name = format!("luks-{}-{}", disks[d].target, region_name(&region, lv.as_deref()));
                match open_luks(inside, &name, &region, key) {
                    Ok(inner) => queue.push_back((d, inner, lv)),
                    Err(why) => out[d].1.push(skip(format!("encrypted (LUKS): {why}"))),
                }
                continue;
            }
            let options = match mount_options(&fstype, &usage, &kernel) {
                Ok(o) => o,
                Err(reason) => {
                    out[d].1.push(skip(reason));
                    continue;
                }
            };
            let path = disks[d].image.with_file_name(region_name(&region, lv.as_deref()));
            fs::create_dir(&path).map_err(|source| BackupError::Io {
                action: "creating",
                path: path.clone(),
                source,
            })?;
            let loop_options = format!("{options},loop,offset={},sizelimit={}", region.offset, region.size);
            let result = ExternalCommand::new("mount")
                .args(["-t", &fstype, "-o", &loop_options])
                .arg(&region.source)
                .arg(&path)
                .timeout(TOOL_TIMEOUT)
                .run();
            match result {
                Ok(_) => out[d].0.push(MountedFilesystem {
                    partition: region.partition,
                    logical_volume: lv.clone(),
                    path,
                    fstype,
                    options,
                }),
                Err(e) => {
                    let _ = fs::remove_dir(&path);
                    let why = e.stderr().trim().to_owned();
                    out[d].1.push(skip(format!(
                        "{fstype}: mounting it read-only failed: {}",
                        if why.is_empty() { e.to_string() } else { why }
                    )));
                }
            }
        }
        if groups_read || pvs.is_empty() {
            break;
        }
        groups_read = true;
        place_volume_groups(&pvs, inside, &mut queue, &mut out);
    }
    Ok(out)
}

/// The directory name of a region's file system: `part2`, `fs` (a whole disk), `lv-VG-LV`.
fn region_name(region: &Region, lv: Option<&str>) -> String {
    match (lv, region.partition) {
        (Some(lv), _) => format!("{LV_DIR_PREFIX}{}", safe_name(lv)),
        (None, Some(n)) => format!("part{n}"),
        (None, None) => "fs".to_owned(),
    }
}

/// Opens the LUKS volume in `region` read-only as `name`: the region of its plaintext device.
fn open_luks(inside: &mut Inside<'_>, name: &str, region: &Region, key: &Path) -> Result<Region, String> {
    inside.dm.available()?;
    // On a disk's image: a loop device over the export (unmount detaches it). On a block device
    // (a logical volume reached through its physical volume's loop device): the device, or a
    // device-mapper range of it, which unmount removes with the rest (a loop device over a
    // loop device would be nobody's to detach).
    let device = match (is_block_device(&region.source), region.offset) {
        (true, 0) => region.source.clone(),
        (true, offset) => inside.dm.create(
            &format!("{name}-area"),
            &format!("0 {} linear {} {}\n", region.size / 512, region.source.display(), offset / 512),
        )?,
        (false, _) => crate::devmap::loop_device(&region.source, region.offset, region.size)?,
    };
    let plain = inside.dm.open_luks(name, &device, key)?;
    let size = device_size(&plain)?;
    Ok(Region { partition: region.partition, source: plain, offset: 0, size })
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// A block device's size in bytes (`/sys/dev/block/MAJOR:MINOR/size`, in sectors).
fn device_size(device: &Path) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(device).map_err(|e| format!("{}: {e}", device.display()))?.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let text = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .map_err(|e| format!("the size of {}: {e}", device.display()))?;
    text.trim().parse::<u64>().map(|s| s * 512).map_err(|_| format!("the size of {}: {text:?}", device.display()))
}

/// Groups the physical volumes found by volume group (the newest metadata of each), places
/// each group's logical volumes on them, and queues what can be mounted; the rest is listed
/// with the reason, on the disk of the group's first physical volume.
fn place_volume_groups(
    pvs: &[FoundPv],
    inside: &mut Inside<'_>,
    queue: &mut std::collections::VecDeque<Pending>,
    out: &mut [Shown],
) {
    let mut groups: Vec<(String, u64, Vec<&FoundPv>)> = Vec::new();
    for found in pvs {
        let (id, seqno) = found.pv.group.clone().unwrap_or_else(|| (found.pv.uuid.clone(), 0));
        match groups.iter_mut().find(|(g, _, _)| *g == id) {
            Some((_, newest, members)) => {
                members.push(found);
                *newest = (*newest).max(seqno);
            }
            None => groups.push((id, seqno, vec![found])),
        }
    }
    // The device each physical volume is reached through for device-mapper tables, from its
    // first extent (made when a table needs it).
    let mut reached: std::collections::BTreeMap<String, Reached> = Default::default();
    for (_, newest, members) in groups {
        let first = members[0];
        let text = members
            .iter()
            .find(|m| m.pv.group.as_ref().is_some_and(|(_, s)| *s == newest))
            .unwrap_or(&first)
            .pv
            .text
            .clone();
        let found: std::collections::BTreeMap<String, u64> =
            members.iter().map(|m| (m.pv.uuid.clone(), m.region.size)).collect();
        let group = match crate::lvm::volume_group(&text, &found) {
            Ok(g) => g,
            Err(why) => {
                for m in &members {
                    out[m.disk].1.push(NotMounted {
                        partition: m.region.partition,
                        logical_volume: None,
                        reason: format!("an LVM physical volume whose metadata could not be read: {why}"),
                    });
                }
                continue;
            }
        };
        if group.lvs.is_empty() {
            for m in &members {
                out[m.disk].1.push(NotMounted {
                    partition: m.region.partition,
                    logical_volume: None,
                    reason: "an LVM physical volume without logical volumes".into(),
                });
            }
        }
        let member = |uuid: &str| members.iter().find(|m| m.pv.uuid == uuid).copied().unwrap_or(first);
        let mut reach = |uuid: &str| -> Reached {
            reached
                .entry(uuid.to_owned())
                .or_insert_with(|| {
                    let start = group.pe_start.get(uuid).copied().unwrap_or(0);
                    reach_physical_volume(&member(uuid).region, start)
                })
                .clone()
        };
        for lv in group.lvs {
            let name = format!("{}/{}", lv.vg, lv.name);
            match lv.placement {
                Placement::Range { pv, offset, size } => {
                    // Through the volume's own loop device (mount(8) refuses a loop device
                    // that overlaps another over the same file), which needs no device-mapper.
                    let m = member(&pv);
                    match reach(&pv) {
                        Ok((device, base)) => {
                            let region = Region {
                                partition: m.region.partition,
                                source: device,
                                offset: base * 512 + offset,
                                size,
                            };
                            queue.push_back((m.disk, region, Some(name)));
                        }
                        Err(why) => out[m.disk].1.push(NotMounted {
                            partition: m.region.partition,
                            logical_volume: Some(name),
                            reason: why,
                        }),
                    }
                }
                Placement::Mapped(mappings) => {
                    let mapped = map_volume(&mut inside.dm, &lv.vg, &mappings, &mut reach)
                        .and_then(|device| device_size(&device).map(|size| (device, size)));
                    match mapped {
                        Ok((device, size)) => {
                            let region = Region { partition: first.region.partition, source: device, offset: 0, size };
                            queue.push_back((first.disk, region, Some(name)));
                        }
                        Err(why) => out[first.disk].1.push(NotMounted {
                            partition: first.region.partition,
                            logical_volume: Some(name),
                            reason: why,
                        }),
                    }
                }
                Placement::NotMountable(reason) => out[first.disk].1.push(NotMounted {
                    partition: first.region.partition,
                    logical_volume: Some(name),
                    reason,
                }),
            }
        }
    }
}

/// The block device and sector a physical volume's first extent is at: a read-only loop device
/// beginning there over a disk's image (so that the host never sees the guest's LVM label), or
/// the block device it is on (an opened LUKS volume) and the sector.
fn reach_physical_volume(region: &Region, pe_start: u64) -> Reached {
    if is_block_device(&region.source) {
        return Ok((region.source.clone(), (region.offset + pe_start) / 512));
    }
    let size = region.size.checked_sub(pe_start).ok_or("its first extent is past its end")?;
    Ok((crate::devmap::loop_device(&region.source, region.offset + pe_start, size)?, 0))
}

/// Creates the device-mapper devices of one logical volume of group `vg` (those it stands on
/// first, each once per mount); the path of its own. Why not, when device-mapper is not here
/// or a table is refused.
fn map_volume(
    dm: &mut DeviceMapper,
    vg: &str,
    mappings: &[crate::lvm::Mapping],
    reach: &mut dyn FnMut(&str) -> Reached,
) -> Result<PathBuf, String> {
    use crate::lvm::Target;
    dm.available().map_err(|why| format!("it needs device-mapper: {why}"))?;
    let dev_name = |mapping: &str| safe_name(&format!("{vg}/{mapping}"));
    let mut last = PathBuf::new();
    for m in mappings {
        let name = dev_name(&m.name);
        if dm.has(&name) {
            last = dm.path(&name);
            continue;
        }
        let mut table = String::new();
        for line in &m.lines {
            let args = match &line.target {
                Target::Linear { pv, sector } => {
                    let (device, base) = reach(pv)?;
                    format!("linear {} {}", device.display(), base + sector)
                }
                Target::Over { mapping, sector } => {
                    format!("linear {} {sector}", dm.path(&dev_name(mapping)).display())
                }
                Target::Striped { chunk, stripes } => {
                    let mut s = format!("striped {} {chunk}", stripes.len());
                    for (pv, sector) in stripes {
                        let (device, base) = reach(pv)?;
                        s.push_str(&format!(" {} {}", device.display(), base + sector));
                    }
                    s
                }
                Target::ThinPool { meta, data, block } => format!(
                    "thin-pool {} {} {block} 0 1 read_only",
                    dm.path(&dev_name(meta)).display(),
                    dm.path(&dev_name(data)).display()
                ),
                Target::Thin { pool, id } => format!("thin {} {id}", dm.path(&dev_name(pool)).display()),
                Target::Snapshot { origin, cow, chunk } => format!(
                    "snapshot {} {} P {chunk}",
                    dm.path(&dev_name(origin)).display(),
                    dm.path(&dev_name(cow)).display()
                ),
            };
            table.push_str(&format!("{} {} {args}\n", line.start, line.len));
        }
        last = dm.create(&name, &table)?;
    }
    Ok(last)
}

/// Where a logical volume's file system is mounted in its disk's directory: `lv-VG-LV`.
const LV_DIR_PREFIX: &str = "lv-";

/// `VG/LV` as one directory name the way device-mapper names it: `VG-LV`, each `-` in a name
/// doubled (`my-vg/root` is `my--vg-root`, never the same as `my/vg-root`); anything but
/// letters, digits and `+_.-` made `_` (the names are the guest's).
fn safe_name(lv: &str) -> String {
    let clean = |part: &str| -> String {
        part.chars()
            .map(|c| match c {
                '-' => "--".to_owned(),
                c if c.is_ascii_alphanumeric() || "+_.".contains(c) => c.to_string(),
                _ => "_".to_owned(),
            })
            .collect()
    };
    match lv.split_once('/') {
        Some((vg, name)) => format!("{}-{}", clean(vg), clean(name)),
        None => clean(lv),
    }
}

/// The label and metadata of the LVM physical volume in `region`.
fn read_physical_volume(region: &Region) -> Result<crate::lvm::PhysicalVolume, String> {
    use std::os::unix::fs::FileExt;
    let file = fs::File::open(&region.source).map_err(|e| format!("opening {}: {e}", region.source.display()))?;
    crate::lvm::physical_volume(&mut |offset, buf| file.read_exact_at(buf, region.offset + offset), region.size)
}

/// Everything under `dir` (a directory holding the state file) that a mount made, found from
/// the system, removed; the state file last, and `dir` when the state says nasbak created it.
fn teardown(dir: &Path) -> Result<UnmountReport, BackupError> {
    let created_dir = read_state(dir).is_some_and(|s| s.created_dir);
    let mut report = UnmountReport { dir: dir.to_owned(), ..UnmountReport::default() };
    let under = |p: &Path| p.starts_with(dir) && p != dir;
    let disk_dirs: Vec<PathBuf> = fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.is_dir() && !is_mount_point(p)).collect())
        .unwrap_or_default();
    let exports: Vec<PathBuf> = disk_dirs.iter().map(|d| d.join(DISK_IMAGE_FILE)).collect();
    // 0. Tools a killed mount left running (its mount, losetup, dmsetup or cryptsetup run in
    //    their own process group and outlive it) finish first, or what they make after the
    //    look below would stay.
    wait_for_tools(dir);
    // 1. The file systems, deepest first (not the exports: their daemons end those).
    let mut mounts: Vec<PathBuf> = mount_points().into_iter().filter(|p| under(p) && !exports.contains(p)).collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        // A file system that is busy for a moment (a scanner that opened a file there) is
        // tried again for up to BUSY_WAIT; one a process keeps open is an error naming it.
        let started = std::time::Instant::now();
        loop {
            let result = tool(
                &format!("unmounting {} (a process may have files open there)", m.display()),
                ExternalCommand::new("umount").arg(&m),
            );
            match result {
                Ok(_) => break,
                Err(BackupError::Tool { source, .. })
                    if source.stderr().contains("busy") && started.elapsed() < BUSY_WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
        report.unmounted.push(m);
    }
    // 2. Device-mapper devices (logical volumes, opened LUKS volumes), those standing on
    //    others first.
    report.mappings = crate::devmap::remove_all(dir).map_err(|why| BackupError::Directory {
        path: dir.to_owned(),
        problem: format!("{why}; close what uses them and run umount again"),
    })?;
    // 3. Loop devices over the images (mount(8) clears its own; those under device-mapper
    //    devices and LUKS volumes are nasbak's).
    for (device, backing) in loop_devices() {
        if exports.contains(&backing) {
            tool(&format!("detaching {device}"), ExternalCommand::new("losetup").args(["--detach", &device]))?;
            report.loop_devices.push(device);
        }
    }
    // 4. The daemons (a FUSE mount left by a daemon that died is detached).
    for file in &exports {
        if ReadOnlyExport::stop_at(file, STOP_TIMEOUT).map_err(|e| at(Step::Unmount)(e.into()))? {
            report.exports.push(file.clone());
        }
    }
    // 5. What nasbak made: empty directories, empty image files, pid files, the state.
    for d in &disk_dirs {
        for entry in fs::read_dir(d).map(|r| r.flatten().collect::<Vec<_>>()).unwrap_or_default() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = (name == DISK_IMAGE_FILE && p.metadata().is_ok_and(|m| m.len() == 0))
                || name == format!(".{DISK_IMAGE_FILE}.pid")
                || (p.is_dir()
                    && (name == "fs" || name.starts_with("part") || name.starts_with(LV_DIR_PREFIX))
                    && fs::remove_dir(&p).is_ok());
            if ours && p.exists() {
                let _ = fs::remove_file(&p);
            }
            if p.exists() {
                report.left.push(p);
            }
        }
        let _ = fs::remove_dir(d);
    }
    let _ = fs::remove_file(dir.join(crate::devmap::TABLE_FILE));
    let _ = fs::remove_file(dir.join(MOUNT_STATE_FILE));
    if created_dir {
        let _ = fs::remove_dir(dir);
    }
    Ok(report)
}

/// The tools a mount runs that may outlive it when it is killed.
const MOUNT_TOOLS: &[&str] = &["mount", "losetup", "dmsetup", "cryptsetup", "blkid", "partx"];

/// Waits up to [`TOOL_TIMEOUT`] for the mount's tools ([`MOUNT_TOOLS`]) whose arguments name
/// `dir` or its device-mapper prefix to end, then kills those left. Nothing else is waited for
/// or killed (a shell in the directory, the process that runs this, the export daemons).
fn wait_for_tools(dir: &Path) {
    let (dir_text, prefix) = (dir.to_string_lossy().into_owned(), crate::devmap::prefix_for(dir));
    let me = std::process::id().to_string();
    let running = || -> Vec<i32> {
        let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_string_lossy().into_owned();
                let argv = fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<String> =
                    argv.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                let tool =
                    args.first().and_then(|a| Path::new(a).file_name()).map(|n| n.to_string_lossy().into_owned());
                let ours = args.iter().any(|a| a.starts_with(&dir_text) || a.starts_with(&prefix));
                let mounts_tool = tool.is_some_and(|t| MOUNT_TOOLS.contains(&t.as_str()));
                (ours && mounts_tool && pid != me).then(|| pid.parse().ok()).flatten()
            })
            .collect()
    };
    let started = std::time::Instant::now();
    while !running().is_empty() && started.elapsed() < TOOL_TIMEOUT {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in running() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    while !running().is_empty() && started.elapsed() < TOOL_TIMEOUT + STOP_TIMEOUT {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    nasbak_repo::model::mountinfo::parse_mountinfo(&text).into_iter().map(|m| m.mount_point).collect()
}

fn is_mount_point(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

/// Each loop device and its backing file (`/sys/block/loopN/loop/backing_file`).
fn loop_devices() -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Some((format!("/dev/{name}"), PathBuf::from(backing.trim_end_matches('\n'))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_read_from_partx_in_sectors() {
        let image = Path::new("/m/vda/disk.raw");
        let r = parse_partx("1 2048 65536\n2 67584 978944\n", image);
        let source = image.to_owned();
        assert_eq!(r[0], Region { partition: Some(1), source, offset: 2048 * 512, size: 65536 * 512 });
        assert_eq!(r[1].offset, 67584 * 512);
        assert!(parse_partx("", image).is_empty());
        assert!(parse_partx("garbage line\n", image).is_empty());
    }

    #[test]
    fn blkid_output_gives_type_and_usage() {
        let text = "DEVNAME=x\nUUID=b4\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(parse_blkid(text), Some(("ext4".into(), "filesystem".into())));
        assert_eq!(parse_blkid("PTTYPE=gpt\n"), None, "a partition table is no file system");
        assert_eq!(parse_blkid(""), None);
    }

    #[test]
    fn logical_volumes_get_device_mapper_style_names_that_cannot_collide_or_escape() {
        assert_eq!(safe_name("rhel/root"), "rhel-root");
        assert_eq!(safe_name("my-vg/root"), "my--vg-root");
        assert_ne!(safe_name("my-vg/root"), safe_name("my/vg-root"));
        assert_eq!(safe_name("vg/../x"), "vg-.._x");
        assert!(!safe_name("a/b/c").contains('/'));
    }

    #[test]
    fn journals_are_never_replayed_and_what_cannot_be_mounted_says_why() {
        let kernel = "\text4\n\txfs\n\tbtrfs\nnodev\ttmpfs\n";
        assert_eq!(mount_options("ext4", "filesystem", kernel).unwrap(), "ro,nodev,nosuid,noexec,noload");
        assert_eq!(mount_options("xfs", "filesystem", kernel).unwrap(), "ro,nodev,nosuid,noexec,norecovery");
        assert!(mount_options("btrfs", "filesystem", kernel).unwrap().ends_with("rescue=nologreplay,subvolid=5"));
        assert_eq!(mount_options("swap", "other", kernel).unwrap_err(), "swap space");
        assert!(mount_options("LVM2_member", "raid", kernel).unwrap_err().contains("LVM"));
        assert!(mount_options("vfat", "filesystem", kernel).unwrap_err().contains("does not mount"));
        assert!(mount_options("ext3", "filesystem", kernel).is_err(), "ext3 is not in this kernel's list");
    }
}
