//! The command line: every command, argument and value parser (clap), and nothing that runs.

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nasbak::chain::ModeRequest;
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_repo::{BackupRef, Compression, Encryption, KeySource, LockMode, RetentionPolicy};
use nasbak_service::config::{DEFAULT_CONFIG, DEFAULT_STATE};
use nasbak_service::schedule::{AT_FORMS, Every};

#[derive(Parser)]
#[command(
    name = "nasbak",
    version,
    about = "Back up and restore KVM/libvirt VMs to network-attached storage",
    after_help = "Backup ids are REPO:VM/BACKUP-ID (REPO: may be left out when it is unambiguous).\n\
                  Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 refused, 5 partially failed, 6 damaged backup,\n\
                  7 unreadable file, 130 cancelled."
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, env = "NASBAK_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    pub config: PathBuf,
    /// Where run-due keeps when each schedule last ran.
    #[arg(long, env = "NASBAK_STATE", default_value = DEFAULT_STATE, global = true)]
    pub state: PathBuf,
    /// The libvirt URI.
    #[arg(short = 'c', long = "connect", default_value = "qemu:///system", global = true)]
    pub uri: String,
    /// The longest one libvirt call may take before the operation fails: a VM's QEMU or
    /// libvirtd that stops answering never hangs nasbak.
    #[arg(long, global = true, default_value = &**CALL_TIMEOUT, value_parser = duration_arg)]
    pub libvirt_timeout: Duration,
    /// One JSON document on stdout; progress as JSON lines on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail in errors.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The library's defaults, as the help shows them (never spelled again here).
static CALL_TIMEOUT: LazyLock<String> = LazyLock::new(|| text(nasbak::nasbak_libvirt::deadline::DEFAULT_CALL_TIMEOUT));
static BACKUP_TIMEOUT: LazyLock<String> = LazyLock::new(|| text(nasbak::DEFAULT_BACKUP_TIMEOUT));
static BOOT_TIMEOUT: LazyLock<String> = LazyLock::new(|| text(nasbak::DEFAULT_BOOT_TIMEOUT));
static FINISH_TIMEOUT: LazyLock<String> = LazyLock::new(|| text(nasbak::DEFAULT_FINISH_TIMEOUT));

fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub fn quiesce_arg(s: &str) -> Result<QuiescePolicy, String> {
    s.parse()
}

/// `90` (seconds), or what humantime reads: `90s`, `30m`, `2h`, `1d`, `1h 30m`; above zero.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("{s:?} is not a duration; expected a number of seconds or a number with a unit (90, 30m, 2h, 1d)");
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|_| bad())?,
    };
    if d.is_zero() { Err(bad()) } else { Ok(d) }
}

pub fn keep_arg(s: &str) -> Result<RetentionPolicy, String> {
    s.parse().map_err(|e: nasbak::nasbak_repo::ParseError| e.to_string())
}

/// `zstd` or `none`.
pub fn compression_arg(s: &str) -> Result<Compression, String> {
    s.parse().map_err(|e: nasbak::nasbak_repo::ParseError| e.to_string())
}

/// `luks` or `none`.
pub fn encryption_arg(s: &str) -> Result<Encryption, String> {
    s.parse().map_err(|e: nasbak::nasbak_repo::ParseError| e.to_string())
}

/// A key file's path (made absolute).
pub fn key_file_arg(s: &str) -> Result<KeySource, String> {
    // A path relative to where the command runs is kept as the absolute path it names: the
    // configuration outlives the working directory.
    let absolute = match std::path::Path::new(s).is_relative() && !s.is_empty() {
        true => std::env::current_dir().map_err(|e| format!("key file {s:?}: {e}"))?.join(s),
        false => std::path::PathBuf::from(s),
    };
    KeySource::file(&absolute.to_string_lossy()).map_err(|e| e.to_string())
}

/// A UUID.
pub fn key_secret_arg(s: &str) -> Result<KeySource, String> {
    KeySource::libvirt_secret(s).map_err(|e| e.to_string())
}

/// How a repository protects its future backup files.
#[derive(Args, Debug, Clone, Default)]
pub struct ProtectionArgs {
    /// Compress new backup files: zstd or none.
    #[arg(long = "compress", value_name = "zstd|none", value_parser = compression_arg)]
    pub compression: Option<Compression>,
    /// Encrypt new backup files: luks or none (luks needs --key-file or --key-secret).
    #[arg(long = "encrypt", value_name = "luks|none", value_parser = encryption_arg)]
    pub encryption: Option<Encryption>,
    /// The passphrase's file: root-owned, mode 0600 (its value never leaves it but to QEMU).
    #[arg(long, value_name = "PATH", value_parser = key_file_arg, conflicts_with = "key_secret")]
    pub key_file: Option<KeySource>,
    /// The passphrase as a libvirt secret, by UUID.
    #[arg(long, value_name = "UUID", value_parser = key_secret_arg)]
    pub key_secret: Option<KeySource>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_arg("90"), Ok(Duration::from_secs(90)));
        assert_eq!(duration_arg("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(duration_arg("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(duration_arg("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(duration_arg("1h 30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "0", "0s", "m", "5x", "-1", "99999999999999999999d"] {
            assert!(duration_arg(bad).unwrap_err().contains("expected a number"), "{bad}");
        }
        // The library's defaults, as the help shows them, read back as themselves.
        for (shown, value) in [
            (&*CALL_TIMEOUT, nasbak::nasbak_libvirt::deadline::DEFAULT_CALL_TIMEOUT),
            (&*BACKUP_TIMEOUT, nasbak::DEFAULT_BACKUP_TIMEOUT),
            (&*BOOT_TIMEOUT, nasbak::DEFAULT_BOOT_TIMEOUT),
            (&*FINISH_TIMEOUT, nasbak::DEFAULT_FINISH_TIMEOUT),
        ] {
            assert_eq!(duration_arg(shown), Ok(value), "{shown}");
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Backup repositories: add, set, list, show, remove, check, stats.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// The key of an encrypted repository: rotate, check.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Offerings: tie VMs to a repository with a default quiesce policy and retention.
    #[command(subcommand)]
    Offering(OfferingCommand),
    /// Off-site targets (S3-compatible object stores): add, list, show, remove, check.
    #[command(subcommand)]
    Target(TargetCommand),
    /// Copy backups to an off-site target: each backup's files, then its manifest; parents
    /// before children; a backup already there is skipped, an interrupted copy resumed.
    #[command(group = clap::ArgGroup::new("what").required(true).args(["backup", "all"]))]
    Copy {
        /// A backup (REPO:VM/BACKUP-ID or VM/BACKUP-ID), or a VM (every backup of it).
        backup: Option<String>,
        /// Every backup of the repository.
        #[arg(long)]
        all: bool,
        /// The target.
        #[arg(long)]
        to: String,
        /// The repository [default: the backup's, the VM's offering's, or the only one].
        #[arg(long)]
        repo: Option<String>,
        /// Upload at most this fast, in MiB/s (on average over each 16 MiB part).
        #[arg(long, value_name = "MIB_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
        bandwidth: Option<u64>,
    },
    /// Assign a VM to an offering (its backups, schedules and prune follow the offering).
    Assign {
        /// The VM (libvirt domain name).
        vm: String,
        /// The offering.
        offering: String,
    },
    /// Remove a VM's assignment (refused while it has schedules).
    Unassign {
        /// The VM.
        vm: String,
    },
    /// Back up a VM (running: push job with quiesce; shut off: qemu-img).
    Backup {
        /// The VM (libvirt domain name).
        vm: String,
        /// Use this offering's repository and quiesce policy.
        #[arg(long, conflicts_with = "repo")]
        offering: Option<String>,
        /// Write to this repository (default: the VM's offering's, or the only one).
        #[arg(long)]
        repo: Option<String>,
        /// Freeze the guest's file systems around the job start [default: the offering's, else best-effort].
        #[arg(long, value_parser = quiesce_arg)]
        quiesce: Option<QuiescePolicy>,
        /// Abort the copy after this long (90, 90s, 30m, 2h, 1d).
        #[arg(long, default_value = &**BACKUP_TIMEOUT, value_parser = duration_arg)]
        timeout: Duration,
        /// full, incremental (a full, with the reason, where an incremental cannot be proven
        /// correct) or auto (incremental on a valid chain shorter than the offering's full-every).
        #[arg(long, default_value = "auto")]
        mode: ModeRequest,
    },
    /// List complete backups (also those the reference system wrote).
    List {
        /// Only this VM.
        vm: Option<String>,
        /// Only this repository.
        #[arg(long)]
        repo: Option<String>,
        /// The backups on this off-site target instead (and its interrupted copies).
        #[arg(long, conflicts_with = "repo")]
        target: Option<String>,
    },
    /// Show one backup's manifest.
    Show {
        /// The backup: REPO:VM/BACKUP-ID.
        id: BackupRef,
    },
    /// Check backups' files (qemu-img check and checksums): exit 5 bad data, 6 damaged, 7 unreadable.
    Verify {
        /// The backup: REPO:VM/BACKUP-ID.
        #[arg(required_unless_present = "all")]
        id: Option<BackupRef>,
        /// Every backup (of --repo, or of every repository).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// With --all: only this repository.
        #[arg(long, requires = "all")]
        repo: Option<String>,
        /// Verify the copies on this off-site target instead: each object streamed and checked
        /// against its checksums (nothing written locally).
        #[arg(long, conflicts_with_all = ["repo", "boot"])]
        target: Option<String>,
        /// Boot a throwaway copy of the VM from the backup (no network, disks on overlays):
        /// passes when its guest agent answers (exit 0), fails with the console's last lines
        /// (exit 5); a VM without a guest agent is unverifiable (exit 4).
        #[arg(long, conflicts_with = "all")]
        boot: bool,
        /// With --boot: how long the guest has to answer.
        #[arg(long, default_value = &**BOOT_TIMEOUT, value_parser = duration_arg, requires = "boot")]
        timeout: Duration,
        /// With --boot: also run this command in the guest (`/bin/sh -c`); it must exit 0.
        #[arg(long, requires = "boot")]
        check: Option<String>,
    },
    /// Delete one backup (never a VM directory or the repository).
    Delete {
        /// The backup: REPO:VM/BACKUP-ID.
        id: BackupRef,
    },
    /// Restore every disk of a shut-off VM from a backup (disks matched by target and volume).
    Restore {
        /// The backup: REPO:VM/BACKUP-ID.
        id: BackupRef,
        /// Restore into this shut-off VM instead (disks matched by target only).
        #[arg(long)]
        vm: Option<String>,
        /// Start the VM within seconds on overlays over the backup while the backup is copied
        /// onto its volumes, then mirror what the guest wrote and switch the VM to them, unless
        /// --detach.
        #[arg(long)]
        instant: bool,
        /// With --instant: return once the VM runs; `nasbak instant finish` copies and switches.
        #[arg(long, requires = "instant")]
        detach: bool,
        /// With --instant: give up after this long (the VM runs on; finish it later).
        #[arg(long, default_value = &**FINISH_TIMEOUT, value_parser = duration_arg, requires = "instant")]
        timeout: Duration,
        /// With --instant: copy each disk at most this fast, in MiB/s (spares the NAS; the whole
        /// disk then goes through a libvirt block copy that starts with the VM).
        #[arg(long, value_name = "MIB_PER_S", requires = "instant")]
        bandwidth: Option<u64>,
        /// Read the backup straight from this off-site target (`nasbak target add`), chains
        /// resolved there, with no local copy: for when the repository is gone. The key of an
        /// encrypted backup is REPO's, or the VM's offering's repository's.
        #[arg(long, value_name = "TARGET", conflicts_with = "instant")]
        from: Option<String>,
    },
    /// Instant restores in flight: list them, finish them, or cancel them.
    #[command(subcommand)]
    Instant(InstantCommand),
    /// Restore one disk of a backup as a new volume, optionally attached to a VM.
    RestoreVolume {
        /// The backup: REPO:VM/BACKUP-ID.
        id: BackupRef,
        /// The disk, by its target in the backup (vda, vdb, ...).
        #[arg(long)]
        disk: String,
        /// A new file, an existing block device, or rbd:POOL/IMAGE.
        #[arg(long)]
        to: String,
        /// The format to write [default: qcow2, raw for rbd:POOL/IMAGE (RBD images are raw)].
        #[arg(long, value_parser = ["qcow2", "raw"])]
        format: Option<String>,
        /// Attach it to this VM (running or shut off) as the next free target.
        #[arg(long)]
        attach: Option<String>,
        /// Write at most this fast, in MiB/s (spares the storage it goes to).
        #[arg(long, value_name = "MIB_PER_S")]
        bandwidth: Option<u64>,
        /// Read the backup straight from this off-site target, as `restore --from`.
        #[arg(long, value_name = "TARGET")]
        from: Option<String>,
    },
    /// Show a backup's disks read-only under DIR (no restore): each disk's raw image and its
    /// file systems mounted read-only, until `nasbak umount DIR`.
    Mount {
        /// The backup: REPO:VM/BACKUP-ID.
        id: BackupRef,
        /// An empty directory (created if missing).
        dir: std::path::PathBuf,
        /// Only this disk, by its target in the backup (vda, vdb, ...).
        #[arg(long)]
        disk: Option<String>,
        /// Open LUKS volumes inside the guest read-only with this key file (the whole file is
        /// the passphrase, as `cryptsetup --key-file` reads it); needs device-mapper.
        #[arg(long, value_name = "PATH")]
        luks_key_file: Option<std::path::PathBuf>,
    },
    /// Remove every trace of a backup mounted under DIR (file systems, loop devices, daemons,
    /// and the repository's mount when nothing else uses it).
    Umount {
        /// The directory the backup is mounted under.
        dir: std::path::PathBuf,
    },
    /// Remove backups the offering's retention and the schedules' limits do not keep.
    Prune {
        /// Only this VM (default: every assigned VM).
        vm: Option<String>,
        /// Print the plan; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Prune the copies on this off-site target instead (nothing merged; a copy still
        /// locked is kept and said).
        #[arg(long)]
        target: Option<String>,
    },
    /// Backup schedules: add, list, remove.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Run the schedules that are due, then prune (safe to call every minute from a timer); then
    /// write the metrics file when the configuration names one (`metrics_textfile`).
    RunDue,
    /// Each assigned VM against its schedules (RPO met or missed), its last failure, chain and
    /// boot verification, and each repository's capacity: exit 5 when a VM needs attention.
    Status,
    /// The status as metrics for node_exporter's textfile collector (Prometheus text format).
    Metrics {
        /// Write them to this file atomically [default: stdout].
        #[arg(long, value_name = "PATH")]
        textfile: Option<std::path::PathBuf>,
    },
    /// Shell completions on stdout (`nasbak completions bash > /etc/bash_completion.d/nasbak`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff) on stdout; `cargo xtask man` writes it to `target/man/nasbak.1`.
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
pub enum RepoCommand {
    /// Add a repository (validated; use `repo check` to try it).
    Add {
        /// Its name.
        name: String,
        /// nfs, cifs, cephfs, shared or custom.
        #[arg(long = "type")]
        kind: String,
        /// host:/export, //host/share, mon1,mon2:/path, /path, or a mount(8) source.
        #[arg(long)]
        address: String,
        /// Mount options (secrets go to a credentials file at mount time).
        #[arg(long, default_value = "")]
        options: String,
        /// The file system type, for a custom repository.
        #[arg(long)]
        fstype: Option<String>,
        /// The zone.
        #[arg(long)]
        zone: Option<String>,
        #[command(flatten)]
        protection: ProtectionArgs,
        /// At most this many scheduled backups at once on it (`run-due`; 1 to 64).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        max_parallel: Option<u32>,
    },
    /// Change how a repository protects its future backups (earlier backups keep theirs), or
    /// how many scheduled backups go to it at once.
    Set {
        /// Its name.
        name: String,
        #[command(flatten)]
        protection: ProtectionArgs,
        /// At most this many scheduled backups at once on it (`run-due`; 1 to 64).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        max_parallel: Option<u32>,
    },
    /// List repositories.
    List,
    /// Show one repository and how it is mounted.
    Show {
        /// Its name.
        name: String,
    },
    /// Remove a repository from the configuration (its backups stay where they are).
    Remove {
        /// Its name.
        name: String,
    },
    /// Mount, write, read back and unmount; says so when root may not write (root_squash).
    Check {
        /// Its name.
        name: String,
    },
    /// Capacity: total, used, available.
    Stats {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Give every encrypted backup of the repository the new key and remove the old one (LUKS
    /// keyslots changed in place, no data rewritten); the repository then uses the new key.
    /// Run it again to finish a rotation that was interrupted.
    #[command(group = clap::ArgGroup::new("new_key").required(true).args(["new_key_file", "new_key_secret"]))]
    Rotate {
        /// The repository (its key a file or a libvirt secret).
        repo: String,
        /// The new key's file: root-owned, mode 0600, at least 32 bytes.
        #[arg(long, value_name = "PATH", value_parser = key_file_arg)]
        new_key_file: Option<KeySource>,
        /// The new key as a libvirt secret (by UUID) of at least 32 bytes.
        #[arg(long, value_name = "UUID", value_parser = key_secret_arg)]
        new_key_secret: Option<KeySource>,
    },
    /// Say which backups of the repository open with its key (or with --key-file or
    /// --key-secret).
    Check {
        /// The repository.
        repo: String,
        /// Check this key file instead of the repository's key.
        #[arg(long, value_name = "PATH", value_parser = key_file_arg, conflicts_with = "key_secret")]
        key_file: Option<KeySource>,
        /// Check this libvirt secret (by UUID) instead of the repository's key.
        #[arg(long, value_name = "UUID", value_parser = key_secret_arg)]
        key_secret: Option<KeySource>,
    },
}

#[derive(Subcommand)]
pub enum OfferingCommand {
    /// Add an offering.
    Add {
        /// Its name.
        name: String,
        /// The repository its backups go to.
        #[arg(long)]
        repo: String,
        /// Its zone (must be the repository's when both are set).
        #[arg(long)]
        zone: Option<String>,
        /// The default quiesce policy.
        #[arg(long, default_value = "best-effort", value_parser = quiesce_arg)]
        quiesce: QuiescePolicy,
        /// Retention for prune: last=N,hourly=N,daily=N,weekly=N,monthly=N,yearly=N.
        #[arg(long, value_parser = keep_arg)]
        keep: Option<RetentionPolicy>,
        /// The longest chain (a full and its incrementals) before `auto` takes a full again [default: 7].
        #[arg(long)]
        full_every: Option<u32>,
        /// Boot-verify each scheduled backup right after it is made (run-due).
        #[arg(long)]
        boot_verify: bool,
        /// With --boot-verify: a command the guest must run with exit 0 (`/bin/sh -c`).
        #[arg(long, requires = "boot_verify")]
        boot_check: Option<String>,
        /// Compress this offering's backups (zstd|none), whatever the repository says.
        #[arg(long = "compress", value_name = "zstd|none", value_parser = compression_arg)]
        compression: Option<Compression>,
        /// Encrypt this offering's backups (luks|none) with the repository's key.
        #[arg(long = "encrypt", value_name = "luks|none", value_parser = encryption_arg)]
        encryption: Option<Encryption>,
        /// Copy each backup to this off-site target right after it is made.
        #[arg(long)]
        copy_to: Option<String>,
    },
    /// List offerings and the VMs assigned to them.
    List,
    /// Remove an offering (refused while VMs are assigned to it).
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TargetCommand {
    /// Add a target after checking it (write, read back, and the object lock when asked for):
    /// wrong credentials, an untrusted certificate, a missing bucket, or a lock asked for on a
    /// bucket without object lock are refused.
    Add {
        /// Its name.
        name: String,
        /// s3 (any S3-compatible object store).
        #[arg(long = "type", value_parser = ["s3"])]
        kind: String,
        /// https://HOST[:PORT] (http:// only on loopback).
        #[arg(long)]
        endpoint: String,
        /// The bucket.
        #[arg(long)]
        bucket: String,
        /// A key prefix in the bucket (several hosts may share a bucket under their own).
        #[arg(long)]
        prefix: Option<String>,
        /// A root-owned 0600 file in the AWS shared-credentials format ([default] section)
        /// [default: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, then the AWS profile].
        #[arg(long, value_name = "PATH")]
        credentials_file: Option<std::path::PathBuf>,
        /// Lock every copied object: governance or compliance (the bucket needs object lock).
        #[arg(long, value_parser = lock_arg, requires = "lock_days")]
        lock: Option<LockMode>,
        /// With --lock: for this many days from its upload.
        #[arg(long, requires = "lock")]
        lock_days: Option<u32>,
        /// A CA certificate (PEM) the endpoint's certificate is checked against, besides the
        /// system's.
        #[arg(long, value_name = "PATH")]
        ca_file: Option<std::path::PathBuf>,
        /// The region requests are signed for [default: us-east-1].
        #[arg(long)]
        region: Option<String>,
    },
    /// List targets.
    List,
    /// Show one target.
    Show {
        /// Its name.
        name: String,
    },
    /// Remove a target from the configuration (what was copied there stays).
    Remove {
        /// Its name.
        name: String,
    },
    /// Write, read back and (with a lock) try to delete a locked probe, which must be refused.
    Check {
        /// Its name.
        name: String,
    },
}

fn lock_arg(s: &str) -> Result<LockMode, String> {
    s.parse().map_err(|e: nasbak::nasbak_repo::ParseError| e.to_string())
}

#[derive(Subcommand)]
pub enum InstantCommand {
    /// Each instant restore in flight, with its copies' progress.
    List,
    /// Complete VM's instant restore: copy the backup onto its volumes (checksums checked) if
    /// not done yet, mirror what the guest wrote, switch the VM to its own volumes and remove
    /// the overlays.
    Finish {
        /// The VM.
        vm: String,
        /// Give up after this long (the VM runs on; run finish again).
        #[arg(long, default_value = &**FINISH_TIMEOUT, value_parser = duration_arg)]
        timeout: Duration,
    },
    /// Stop VM and abandon its instant restore (volumes already written are left marked:
    /// restore it again).
    Cancel {
        /// The VM.
        vm: String,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule for a VM assigned to an offering.
    #[command(after_help = format!("--at forms: {AT_FORMS}"))]
    Add {
        /// The VM.
        vm: String,
        /// 5m, 10m, 15m, 20m, 30m, hourly, daily, weekly or monthly.
        #[arg(long)]
        every: Every,
        /// When in the interval (see below).
        #[arg(long)]
        at: String,
        /// The time zone of --at (an IANA name).
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Keep at most this many backups made by this schedule (0: no limit).
        #[arg(long)]
        keep: u32,
        /// The quiesce policy.
        #[arg(long, default_value = "best-effort", value_parser = quiesce_arg)]
        quiesce: QuiescePolicy,
    },
    /// List schedules with their last run.
    List,
    /// Remove a schedule.
    Remove {
        /// Its id.
        id: String,
    },
}
