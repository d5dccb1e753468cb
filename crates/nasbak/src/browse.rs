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
/// How long a daemon has to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl<I: ImageTool + Sync, M: Mounter> Catalog<'_, I, M> {
    /// Shows a backup's disks read-only under `request.dir` (see the module's documentation):
    /// every file of each disk's chain is checked (`qemu-img check`, while the exports start)
    /// before any file system is mounted; a failure on the way leaves nothing behind. The mount lasts beyond this call, until [`Catalog::unmount`].
    pub fn mount(&self, request: &MountRequest, cancel: &CancelHandle) -> Result<MountedBackup, BackupError> {
        let vm = VmName::new(&request.vm)?;
        request.id.parse::<BackupId>()?;
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
        for i in 0..state.disks.len() {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let (filesystems, not_mounted) = mount_filesystems(&state.disks[i])?;
            state.disks[i].filesystems = filesystems;
            state.disks[i].not_mounted = not_mounted;
            write_state(&state)?;
        }
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

/// A region of a disk image that may hold a file system.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    /// The partition number; `None` for the whole disk.
    partition: Option<u32>,
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
    let whole = vec![Region { partition: None, offset: 0, size }];
    if !out.status.success() {
        let why = out.stderr_text();
        return if why.contains("failed to read partition table") { Ok(whole) } else { Err(why.trim().to_owned()) };
    }
    let parsed = parse_partx(&out.stdout_text());
    Ok(if parsed.is_empty() { whole } else { parsed })
}

fn parse_partx(text: &str) -> Vec<Region> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u64>);
            let (nr, start, sectors) = (f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?);
            Some(Region { partition: Some(u32::try_from(nr).ok()?), offset: start * 512, size: sectors * 512 })
        })
        .collect()
}

/// What blkid says a region holds: its `TYPE` and `USAGE`, if anything.
fn probe(image: &Path, region: &Region) -> Option<(String, String)> {
    let out = ExternalCommand::new("blkid")
        .args(["--probe", "--output", "export", "--offset"])
        .arg(region.offset.to_string())
        .arg("--size")
        .arg(region.size.to_string())
        .arg(image)
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
        "crypto_LUKS" => return Err("encrypted (LUKS): not mounted".into()),
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

/// Mounts what each region of `disk`'s image holds; the linear logical volumes of an LVM
/// physical volume are regions too (read from its metadata, nothing activated on the host).
fn mount_filesystems(disk: &MountedDisk) -> Result<(Vec<MountedFilesystem>, Vec<NotMounted>), BackupError> {
    let kernel = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let (mut mounted, mut not) = (Vec::new(), Vec::new());
    let mut regions: Vec<(Region, Option<String>)> = match regions(&disk.image, disk.size) {
        Ok(r) => r.into_iter().map(|r| (r, None)).collect(),
        Err(why) => {
            not.push(NotMounted {
                partition: None,
                logical_volume: None,
                reason: format!("its partition table could not be read: {why}"),
            });
            Vec::new()
        }
    };
    let mut i = 0;
    while i < regions.len() {
        let (region, lv) = regions[i].clone();
        i += 1;
        let skip = |reason: String| NotMounted { partition: region.partition, logical_volume: lv.clone(), reason };
        let Some((fstype, usage)) = probe(&disk.image, &region) else {
            not.push(skip("no file system found".into()));
            continue;
        };
        if fstype == "LVM2_member" && lv.is_none() {
            match physical_volume(&disk.image, &region) {
                Ok(lvs) if lvs.is_empty() => not.push(skip("an LVM physical volume without logical volumes".into())),
                Ok(lvs) => {
                    for v in lvs {
                        let name = Some(format!("{}/{}", v.vg, v.name));
                        match v.placement {
                            Placement::Range { offset, size } => {
                                let inner =
                                    Region { partition: region.partition, offset: region.offset + offset, size };
                                regions.push((inner, name));
                            }
                            Placement::NotMountable(reason) => {
                                not.push(NotMounted { partition: region.partition, logical_volume: name, reason });
                            }
                        }
                    }
                }
                Err(why) => not.push(skip(format!("an LVM physical volume whose metadata could not be read: {why}"))),
            }
            continue;
        }
        let options = match mount_options(&fstype, &usage, &kernel) {
            Ok(o) => o,
            Err(reason) => {
                not.push(skip(reason));
                continue;
            }
        };
        let name = match (&lv, region.partition) {
            (Some(lv), _) => format!("{LV_DIR_PREFIX}{}", safe_name(lv)),
            (None, Some(n)) => format!("part{n}"),
            (None, None) => "fs".to_owned(),
        };
        let path = disk.image.with_file_name(name);
        fs::create_dir(&path).map_err(|source| BackupError::Io { action: "creating", path: path.clone(), source })?;
        let loop_options = format!("{options},loop,offset={},sizelimit={}", region.offset, region.size);
        let result = ExternalCommand::new("mount")
            .args(["-t", &fstype, "-o", &loop_options])
            .arg(&disk.image)
            .arg(&path)
            .timeout(TOOL_TIMEOUT)
            .run();
        match result {
            Ok(_) => mounted.push(MountedFilesystem {
                partition: region.partition,
                logical_volume: lv.clone(),
                path,
                fstype,
                options,
            }),
            Err(e) => {
                let _ = fs::remove_dir(&path);
                let why = e.stderr().trim().to_owned();
                not.push(skip(format!(
                    "{fstype}: mounting it read-only failed: {}",
                    if why.is_empty() { e.to_string() } else { why }
                )));
            }
        }
    }
    Ok((mounted, not))
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

/// The logical volumes of the LVM physical volume in `region` of `image`.
fn physical_volume(image: &Path, region: &Region) -> Result<Vec<crate::lvm::LogicalVolume>, String> {
    use std::os::unix::fs::FileExt;
    let file = fs::File::open(image).map_err(|e| format!("opening {}: {e}", image.display()))?;
    crate::lvm::logical_volumes(&mut |offset, buf| file.read_exact_at(buf, region.offset + offset), region.size)
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
    // 1. The file systems, deepest first (not the exports: their daemons end those).
    let mut mounts: Vec<PathBuf> = mount_points().into_iter().filter(|p| under(p) && !exports.contains(p)).collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        tool(
            &format!("unmounting {} (a process may have files open there)", m.display()),
            ExternalCommand::new("umount").arg(&m),
        )?;
        report.unmounted.push(m);
    }
    // 2. Loop devices over the images that mount(8) did not clear.
    for (device, backing) in loop_devices() {
        if exports.contains(&backing) {
            tool(&format!("detaching {device}"), ExternalCommand::new("losetup").args(["--detach", &device]))?;
            report.loop_devices.push(device);
        }
    }
    // 3. The daemons (a FUSE mount left by a daemon that died is detached).
    for file in &exports {
        if ReadOnlyExport::stop_at(file, STOP_TIMEOUT).map_err(|e| at(Step::Unmount)(e.into()))? {
            report.exports.push(file.clone());
        }
    }
    // 4. What nasbak made: empty directories, empty image files, pid files, the state.
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
    let _ = fs::remove_file(dir.join(MOUNT_STATE_FILE));
    if created_dir {
        let _ = fs::remove_dir(dir);
    }
    Ok(report)
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
        let r = parse_partx("1 2048 65536\n2 67584 978944\n");
        assert_eq!(r[0], Region { partition: Some(1), offset: 2048 * 512, size: 65536 * 512 });
        assert_eq!(r[1].offset, 67584 * 512);
        assert!(parse_partx("").is_empty());
        assert!(parse_partx("garbage line\n").is_empty());
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
