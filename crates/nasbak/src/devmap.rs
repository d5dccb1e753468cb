//! The block devices a mounted backup may stand on besides its exports: read-only loop devices
//! over parts of an export, and device-mapper devices (logical volumes that are not one range of
//! a disk, LUKS volumes opened read-only). Each device-mapper device's name starts with a
//! prefix made from the mount directory ([`prefix_for`]), so that unmounting finds them again
//! from the system ([`remove_all`]) after a mount that was killed half-way.
//!
//! Nothing here asks the host's LVM: tables are built from the guest's metadata
//! ([`crate::lvm`]), and each physical volume is reached through a loop device that begins at
//! its first extent, so that the host never sees a device that begins with the guest's LVM
//! label.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nasbak_process::ExternalCommand;

/// How long one call of dmsetup, cryptsetup, losetup or modprobe may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The file a table is written to for dmsetup, in the mount directory, removed once read (and
/// by unmount, after a mount killed in between).
pub(crate) const TABLE_FILE: &str = ".nasbak-dm-table";
/// How many rounds of removal unmounting tries (a device stands on at most this many others).
const REMOVE_ROUNDS: usize = 12;

/// The prefix of every device-mapper name a mount under `dir` makes: `nasbak-` and 16 hex
/// digits of a hash of the directory's path.
pub(crate) fn prefix_for(dir: &Path) -> String {
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("nasbak-{h:016x}-")
}

fn run(action: &str, command: ExternalCommand) -> Result<String, String> {
    match command.timeout(TOOL_TIMEOUT).run() {
        Ok(out) => Ok(out.stdout_text()),
        Err(e) => {
            let why = e.stderr().trim().to_owned();
            Err(format!("{action}: {}", if why.is_empty() { e.to_string() } else { why }))
        }
    }
}

/// A read-only loop device over `size` bytes at `offset` of `file` (an export's image or a
/// block device); its path.
pub(crate) fn loop_device(file: &Path, offset: u64, size: u64) -> Result<PathBuf, String> {
    let out = run(
        &format!("setting up a read-only loop device over {}", file.display()),
        ExternalCommand::new("losetup")
            .args(["--read-only", "--find", "--show", "--offset"])
            .arg(offset.to_string())
            .arg("--sizelimit")
            .arg(size.to_string())
            .arg(file),
    )?;
    Ok(PathBuf::from(out.trim()))
}

/// The device-mapper devices of one mount: created on demand, once each.
pub(crate) struct DeviceMapper {
    prefix: String,
    /// Where a table is written for dmsetup to read (the mount directory).
    dir: PathBuf,
    /// Whether device-mapper can be used here, once asked.
    available: Option<Result<(), String>>,
    /// The names created so far (without the prefix).
    made: Vec<String>,
}

impl DeviceMapper {
    /// The devices of the mount under `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        DeviceMapper { prefix: prefix_for(dir), dir: dir.to_owned(), available: None, made: Vec::new() }
    }

    /// Whether this host can create device-mapper devices (its kernel's device-mapper, loaded
    /// when it is a module, and dmsetup), or why not.
    pub(crate) fn available(&mut self) -> Result<(), String> {
        self.available.get_or_insert_with(check_available).clone()
    }

    /// The path of the device `name` (without the prefix).
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        Path::new("/dev/mapper").join(format!("{}{name}", self.prefix))
    }

    /// Whether `name` was made by this mount already.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.made.iter().any(|m| m == name)
    }

    /// Creates the device `name` (without the prefix) with `table`, read-only unless its
    /// target refuses a read-only table (`thin-pool`, which then gets its own `read_only`
    /// argument: nothing in the pool's metadata changes); its path.
    pub(crate) fn create(&mut self, name: &str, table: &str) -> Result<PathBuf, String> {
        self.available()?;
        let full = format!("{}{name}", self.prefix);
        let file = self.dir.join(TABLE_FILE);
        nasbak_repo::store::write_atomic(&file, table.as_bytes(), 0o600)
            .map_err(|e| format!("writing {}: {e}", file.display()))?;
        let always_writable = table.lines().any(|l| l.split_whitespace().nth(2) == Some("thin-pool"));
        let mut command = ExternalCommand::new("dmsetup").arg("create");
        if !always_writable {
            command = command.arg("--readonly");
        }
        let made = run(&format!("creating the device-mapper device {full}"), command.arg(&full).arg(&file));
        let _ = fs::remove_file(&file);
        made?;
        self.made.push(name.to_owned());
        self.node(name)
    }

    /// The path of the device `name` (without the prefix), its node made by dmsetup where udev
    /// did not make it (a host without udev).
    fn node(&self, name: &str) -> Result<PathBuf, String> {
        let path = self.path(name);
        if !path.exists() {
            let full = format!("{}{name}", self.prefix);
            run(&format!("making the node of {full}"), ExternalCommand::new("dmsetup").args(["mknodes", &full]))?;
        }
        if !path.exists() {
            return Err(format!("{} did not appear", path.display()));
        }
        Ok(path)
    }

    /// Opens the LUKS volume on `device` read-only as `name` (without the prefix), with the
    /// passphrase in `key_file`; the path of its plaintext device.
    pub(crate) fn open_luks(&mut self, name: &str, device: &Path, key_file: &Path) -> Result<PathBuf, String> {
        self.available()?;
        let full = format!("{}{name}", self.prefix);
        run(
            "opening it read-only with the key file (cryptsetup)",
            ExternalCommand::new("cryptsetup")
                .args(["open", "--readonly", "--type", "luks", "--key-file"])
                .arg(key_file)
                .arg(device)
                .arg(&full),
        )?;
        self.made.push(name.to_owned());
        self.node(name)
    }
}

fn check_available() -> Result<(), String> {
    let control = Path::new("/dev/mapper/control");
    if !control.exists() {
        let _ = ExternalCommand::new("modprobe").arg("dm_mod").timeout(TOOL_TIMEOUT).run_unchecked();
        if fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper")) && !control.exists() {
            let _ = ExternalCommand::new("dmsetup").arg("mknodes").timeout(TOOL_TIMEOUT).run_unchecked();
        }
    }
    if !control.exists() {
        return Err(
            "this host has no device-mapper (no /dev/mapper/control, and modprobe dm_mod did not add it)".into()
        );
    }
    run("dmsetup (Debian's dmsetup package) does not run", ExternalCommand::new("dmsetup").arg("version")).map(|_| ())
}

/// The device-mapper devices whose names start with `prefix`.
fn listed(prefix: &str) -> Vec<String> {
    if !Path::new("/dev/mapper/control").exists() {
        return Vec::new();
    }
    let out = ExternalCommand::new("dmsetup")
        .args(["ls"])
        .timeout(TOOL_TIMEOUT)
        .run_unchecked()
        .map(|o| o.stdout_text())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Removes every device-mapper device of the mount under `dir`, those standing on others
/// first; their names. A device still in use after every round is an error that names it.
pub(crate) fn remove_all(dir: &Path) -> Result<Vec<String>, String> {
    let prefix = prefix_for(dir);
    let mut removed = Vec::new();
    for _ in 0..REMOVE_ROUNDS {
        let left = listed(&prefix);
        if left.is_empty() {
            return Ok(removed);
        }
        for name in left {
            // One that others stand on fails this round and goes in a later one.
            if ExternalCommand::new("dmsetup").args(["remove", &name]).timeout(TOOL_TIMEOUT).run().is_ok() {
                removed.push(name);
            }
        }
    }
    let left = listed(&prefix);
    if left.is_empty() {
        return Ok(removed);
    }
    Err(format!("device-mapper devices still in use: {}", left.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_has_its_own_prefix_that_device_mapper_accepts() {
        let a = prefix_for(Path::new("/mnt/a"));
        let b = prefix_for(Path::new("/mnt/b"));
        assert_ne!(a, b);
        assert_eq!(a, prefix_for(Path::new("/mnt/a")));
        assert!(a.len() < 32 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
    }
}
