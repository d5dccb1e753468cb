//! `nasbak`: back up and restore KVM/libvirt VMs to network-attached storage.
//!
//! Exit codes: 0 success, 1 failed, 2 usage (also: the input does not say enough to choose), 3 not
//! found, 4 refused (the VM is running, the backup does not match, another process holds the VM,
//! the destination exists, a configuration change would leave a dangling reference), 5 partially
//! failed (verify found bad data, a due schedule failed, a backup completed but the guest could
//! not be thawed), 6 a backup is damaged (its manifest
//! unreadable or invalid, or a file it lists missing), 7 verify could not read a file (an I/O
//! error), 130 cancelled (Ctrl-C, SIGTERM).

mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use nasbak::config::{Config, DEFAULT_CONFIG, DEFAULT_STATE, Offering, Refused, Schedule, ScheduleState};
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::{ImageFormat, QemuImg};
use nasbak::nasbak_repo::{
    BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, RetentionPolicy, SystemMounter,
};
use nasbak::schedule::{AT_FORMS, At, Every, parse_tz};
use nasbak::{BackupError, BackupKind, BackupRequest, Catalog, Engine, FileStatus, RunDue, VolumeRestoreRequest};
use serde_json::json;

use crate::progress::Reporter;

const RUNTIME: &str = "/run/nasbak";

#[derive(Parser)]
#[command(
    name = "nasbak",
    version,
    about = "Back up and restore KVM/libvirt VMs to network-attached storage",
    after_help = "Backup ids are REPO:VM/BACKUP-ID (REPO: may be left out when it is unambiguous).\n\
                  Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 refused, 5 partially failed, 6 damaged backup,\n\
                  7 unreadable file, 130 cancelled."
)]
struct Cli {
    /// The configuration file.
    #[arg(long, env = "NASBAK_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    /// Where run-due keeps when each schedule last ran.
    #[arg(long, env = "NASBAK_STATE", default_value = DEFAULT_STATE, global = true)]
    state: PathBuf,
    /// The libvirt URI.
    #[arg(short = 'c', long = "connect", default_value = "qemu:///system", global = true)]
    uri: String,
    /// One JSON document on stdout; progress as JSON lines on stderr.
    #[arg(long, global = true)]
    json: bool,
    /// More detail in errors.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

fn quiesce_arg(s: &str) -> Result<QuiescePolicy, String> {
    s.parse()
}

/// `90`, `90s`, `30m`, `2h`, `1d`.
fn duration_arg(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration; expected a number with an optional unit s, m, h or d (90, 30m, 2h)");
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).filter(|secs| *secs > 0).map(Duration::from_secs).ok_or_else(bad)
}

fn keep_arg(s: &str) -> Result<RetentionPolicy, String> {
    s.parse().map_err(|e: nasbak::nasbak_repo::ParseError| e.to_string())
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
        for bad in ["", "0", "m", "5 m", "5w", "-1", "99999999999999999999d"] {
            assert!(duration_arg(bad).unwrap_err().contains("expected a number"), "{bad}");
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Backup repositories: add, list, show, remove, check, stats.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Offerings: tie VMs to a repository with a default quiesce policy and retention.
    #[command(subcommand)]
    Offering(OfferingCommand),
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
        #[arg(long, default_value = "24h", value_parser = duration_arg)]
        timeout: Duration,
    },
    /// List complete backups (also those the reference system wrote).
    List {
        /// Only this VM.
        vm: Option<String>,
        /// Only this repository.
        #[arg(long)]
        repo: Option<String>,
    },
    /// Show one backup's manifest.
    Show {
        /// The backup: REPO:VM/BACKUP-ID.
        id: String,
    },
    /// Check backups' files (qemu-img check and checksums): exit 5 bad data, 6 damaged, 7 unreadable.
    Verify {
        /// The backup: REPO:VM/BACKUP-ID.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every backup (of --repo, or of every repository).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// With --all: only this repository.
        #[arg(long, requires = "all")]
        repo: Option<String>,
    },
    /// Delete one backup (never a VM directory or the repository).
    Delete {
        /// The backup: REPO:VM/BACKUP-ID.
        id: String,
    },
    /// Restore every disk of a shut-off VM from a backup (disks matched by target and volume).
    Restore {
        /// The backup: REPO:VM/BACKUP-ID.
        id: String,
        /// Restore into this shut-off VM instead (disks matched by target only).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Restore one disk of a backup as a new volume, optionally attached to a VM.
    RestoreVolume {
        /// The backup: REPO:VM/BACKUP-ID.
        id: String,
        /// The disk, by its target in the backup (vda, vdb, ...).
        #[arg(long)]
        disk: String,
        /// A new file, an existing block device, or rbd:POOL/IMAGE.
        #[arg(long)]
        to: String,
        /// The format to write (RBD: raw).
        #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        /// Attach it to this VM (running or shut off) as the next free target.
        #[arg(long)]
        attach: Option<String>,
    },
    /// Remove backups the offering's retention and the schedules' limits do not keep.
    Prune {
        /// Only this VM (default: every assigned VM).
        vm: Option<String>,
        /// Print the plan; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Backup schedules: add, list, remove.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Run the schedules that are due, then prune (safe to call every minute from a timer).
    RunDue,
}

#[derive(Subcommand)]
enum RepoCommand {
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
enum OfferingCommand {
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
enum ScheduleCommand {
    /// Add a schedule for a VM assigned to an offering.
    #[command(after_help = format!("--at forms: {AT_FORMS}"))]
    Add {
        /// The VM.
        vm: String,
        /// hourly, daily, weekly or monthly.
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

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Refused>().is_some() {
        return 4;
    }
    match e.downcast_ref::<BackupError>() {
        Some(BackupError::NotFound { .. }) => 3,
        Some(
            BackupError::NotShutOff { .. }
            | BackupError::Mismatch { .. }
            | BackupError::Lock(_)
            | BackupError::Exists { .. }
            | BackupError::HalfRestored { .. },
        ) => 4,
        Some(BackupError::Ambiguous { .. }) => 2,
        Some(BackupError::DamagedBackup { .. }) => 6,
        Some(BackupError::Cancelled) => 130,
        Some(BackupError::RestoreIncomplete { source, .. }) if matches!(**source, BackupError::Cancelled) => 130,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if cli.json {
                let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
                eprintln!("{}", json!({"error": chain}));
            } else {
                eprintln!("nasbak: {e}");
                for cause in e.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
                if cli.verbose {
                    eprintln!("  detail: {e:?}");
                }
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn mounts() -> RepositoryMounts<SystemMounter> {
    RepositoryMounts::new(SystemMounter::new(RUNTIME), RUNTIME, MountTimeouts::default())
}

/// qemu-img and the mounts: all the catalog commands need (never libvirt).
struct CatalogServices {
    images: QemuImg,
    mounts: RepositoryMounts<SystemMounter>,
}

impl CatalogServices {
    fn new() -> Self {
        CatalogServices { images: QemuImg::new(RUNTIME), mounts: mounts() }
    }
    fn catalog(&self) -> Catalog<'_, QemuImg, SystemMounter> {
        Catalog::new(&self.images, &self.mounts)
    }
}

fn engine(uri: &str) -> Result<Engine<LibvirtHypervisor, QemuImg, SystemMounter>> {
    Ok(Engine {
        hypervisor: LibvirtHypervisor::connect(uri).with_context(|| format!("connecting to {uri}"))?,
        images: QemuImg::new(RUNTIME),
        mounts: mounts(),
        agent_timeout: Duration::from_secs(10),
    })
}

/// A cancel handle that Ctrl-C (and SIGTERM from systemd) triggers.
fn cancel_on_interrupt() -> Result<CancelHandle> {
    let cancel = CancelHandle::new();
    let handle = cancel.clone();
    ctrlc::set_handler(move || handle.cancel()).context("installing the Ctrl-C handler")?;
    Ok(cancel)
}

fn not_found(what: String) -> anyhow::Error {
    anyhow!(BackupError::NotFound { what })
}

fn pick_repo<'a>(config: &'a Config, name: Option<&str>) -> Result<&'a BackupRepository> {
    match name {
        Some(n) => config.repository(n).ok_or_else(|| not_found(format!("repository {n}"))),
        None if config.repositories.len() == 1 => Ok(&config.repositories[0]),
        None => Err(anyhow!(BackupError::Ambiguous {
            what: format!("which repository with REPO: or --repo (there are {})", config.repositories.len())
        })),
    }
}

/// REPO:VM/BACKUP-ID, or VM/BACKUP-ID when the VM's offering or the only repository says which.
fn parse_id<'a>(config: &'a Config, id: &'a str) -> Result<(&'a BackupRepository, &'a str, &'a str)> {
    let (repo, rest) = match id.split_once(':') {
        Some((r, rest)) => (Some(r), rest),
        None => (None, id),
    };
    let (vm, backup) = rest.split_once('/').ok_or_else(|| {
        anyhow!(BackupError::Ambiguous { what: format!("a backup id: {id:?} is not REPO:VM/BACKUP-ID") })
    })?;
    let repo = repo.or_else(|| config.offering_of(vm).map(|o| o.repository.as_str()));
    Ok((pick_repo(config, repo)?, vm, backup))
}

fn run(cli: &Cli) -> Result<u8> {
    let mut config = Config::load(&cli.config)?;
    let json = cli.json;
    match &cli.command {
        Command::Repo(cmd) => repo(cli, &mut config, cmd),
        Command::Offering(cmd) => offering(cli, &mut config, cmd),
        Command::Assign { vm, offering } => {
            config.assign(vm, offering)?;
            config.save(&cli.config)?;
            println!("assigned {vm} to offering {offering}");
            Ok(0)
        }
        Command::Unassign { vm } => {
            config.unassign(vm)?;
            config.save(&cli.config)?;
            println!("unassigned {vm}");
            Ok(0)
        }
        Command::Schedule(cmd) => schedule(cli, &mut config, cmd),
        Command::Backup { vm, offering, repo, quiesce, timeout } => {
            let p = nasbak::placement(&config, vm, repo.as_deref(), offering.as_deref(), *quiesce)?;
            let cancel = cancel_on_interrupt()?;
            let request = BackupRequest {
                vm: vm.clone(),
                repository: p.repository,
                quiesce: p.quiesce,
                timeout: *timeout,
                schedule: None,
            };
            let e = engine(&cli.uri)?;
            let mut reporter = Reporter::new(json, &format!("backup {vm}"));
            let outcome = e.backup(&request, &cancel, &mut |p| reporter.update(p));
            reporter.finish();
            let outcome = outcome?;
            let m = &outcome.manifest;
            if json {
                println!(
                    "{}",
                    json!({
                        "id": format!("{}:{}/{}", m.repository, m.vm, m.id), "repository": m.repository, "vm": m.vm,
                        "quiesced": m.quiesced, "quiesce_note": m.quiesce_note, "disks": m.disks,
                        "cleaned": outcome.cleaned, "skipped": outcome.skipped, "warnings": outcome.warnings,
                    })
                );
            } else {
                println!(
                    "backed up {} as {}:{}/{} ({} disk(s), quiesced: {})",
                    m.vm,
                    m.repository,
                    m.vm,
                    m.id,
                    m.disks.len(),
                    m.quiesced
                );
                if let Some(note) = &m.quiesce_note {
                    println!("  quiesce: {note}");
                }
                for (target, why) in &outcome.skipped {
                    println!("  skipped {target}: {why}");
                }
                for note in &outcome.cleaned {
                    println!("  {note}");
                }
            }
            // The backup is complete, but the operator must act: say so, and exit 5.
            for w in &outcome.warnings {
                eprintln!("nasbak: WARNING: {w}");
            }
            Ok(if outcome.warnings.is_empty() { 0 } else { 5 })
        }
        Command::List { vm, repo } => {
            let repos: Vec<&BackupRepository> = match repo {
                Some(r) => vec![pick_repo(&config, Some(r))?],
                None => config.repositories.iter().collect(),
            };
            let services = CatalogServices::new();
            let mut all = Vec::new();
            for r in repos {
                for b in services.catalog().list(r, vm.as_deref())? {
                    // The manifest's fields, as `backup --json` prints them; a reference-system
                    // backup has only its files; a damaged one its reason.
                    let (kind, quiesced, note, disks, schedule, damaged) = match &b.kind {
                        BackupKind::Nasbak(m) => (
                            "nasbak",
                            Some(m.quiesced),
                            m.quiesce_note.clone(),
                            json!(m.disks),
                            m.schedule.clone(),
                            None,
                        ),
                        BackupKind::Reference { files } => {
                            let files: Vec<_> = files.iter().map(|f| json!({"file": f})).collect();
                            ("reference", None, None, json!(files), None, None)
                        }
                        BackupKind::Damaged { reason } => {
                            ("unknown", None, None, json!([]), None, Some(reason.clone()))
                        }
                    };
                    all.push(json!({"id": format!("{}:{}/{}", r.name(), b.vm, b.id), "repository": r.name().as_str(),
                                    "vm": b.vm, "backup": b.id, "written_by": kind, "quiesced": quiesced,
                                    "quiesce_note": note, "disks": disks, "schedule": schedule,
                                    "damaged": damaged}));
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(all));
            } else {
                for b in &all {
                    match b["damaged"].as_str() {
                        Some(reason) => println!("{}  DAMAGED: {reason}", text(&b["id"])),
                        None => println!(
                            "{}  {} disk(s)  {}{}",
                            text(&b["id"]),
                            b["disks"].as_array().map_or(0, Vec::len),
                            text(&b["written_by"]),
                            b["schedule"].as_str().map(|s| format!("  schedule {s}")).unwrap_or_default()
                        ),
                    }
                }
            }
            Ok(0)
        }
        Command::Show { id } => {
            let (r, vm, backup) = parse_id(&config, id)?;
            let services = CatalogServices::new();
            let found = services.catalog().list(r, Some(vm))?.into_iter().find(|b| b.id == backup);
            let b = found.ok_or_else(|| not_found(format!("backup {id}")))?;
            match &b.kind {
                BackupKind::Nasbak(m) => println!("{}", if json { serde_json::to_string(m)? } else { m.to_json() }),
                BackupKind::Reference { files } => println!("{}", json!({"written_by": "reference", "files": files})),
                BackupKind::Damaged { reason } => {
                    return Err(anyhow!(BackupError::DamagedBackup {
                        backup: format!("{vm}/{backup}"),
                        reason: reason.clone()
                    }));
                }
            }
            Ok(0)
        }
        Command::Verify { id, all, repo } => {
            let services = CatalogServices::new();
            let catalog = services.catalog();
            let mut targets = Vec::new();
            if *all {
                let repos: Vec<&BackupRepository> = match repo {
                    Some(r) => vec![pick_repo(&config, Some(r))?],
                    None => config.repositories.iter().collect(),
                };
                for r in repos {
                    for b in catalog.list(r, None)? {
                        targets.push((r, b.vm, b.id));
                    }
                }
            } else {
                let (r, vm, backup) = parse_id(&config, id.as_deref().expect("clap requires ID without --all"))?;
                targets.push((r, vm.to_owned(), backup.to_owned()));
            }
            // The worst finding decides the exit code: damaged (6) over bad data (5) over
            // unreadable (7).
            let (mut damaged, mut bad, mut unreadable) = (0, 0, 0);
            let mut report = Vec::new();
            for (r, vm, backup) in targets {
                let name = format!("{}:{vm}/{backup}", r.name());
                let mut reporter = Reporter::new(json, &format!("verify {name}"));
                let verdicts = catalog.verify(r, &vm, &backup, &mut |p| reporter.update(p));
                reporter.finish();
                let verdicts = match verdicts {
                    Err(BackupError::DamagedBackup { reason, .. }) => {
                        damaged += 1;
                        if json {
                            report.push(json!({"id": name, "status": "damaged", "reason": reason, "ok": false}));
                        } else {
                            println!("DAMAGED  {name}  {reason}");
                        }
                        continue;
                    }
                    other => other?,
                };
                for v in verdicts {
                    match v.status {
                        FileStatus::Ok => {}
                        FileStatus::Missing => damaged += 1,
                        FileStatus::Unreadable => unreadable += 1,
                        FileStatus::Differs | FileStatus::Corrupt => bad += 1,
                    }
                    if json {
                        report.push(
                            json!({"id": name, "file": v.file, "status": v.status, "check": format!("{:?}", v.check),
                                           "checksum_ok": v.checksum_ok, "error": v.error, "ok": v.ok()}),
                        );
                    } else {
                        let checksum =
                            v.checksum_ok.map_or("not recorded", |ok| if ok { "matches" } else { "DIFFERS" });
                        let detail = match &v.error {
                            Some(e) => e.clone(),
                            None => format!("check {:?}, checksum {checksum}", v.check),
                        };
                        let verdict = if v.ok() { "ok " } else { "BAD" };
                        println!("{verdict}  {name}  {}  {}  {detail}", v.file, v.status);
                    }
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(report));
            }
            Ok(if damaged > 0 {
                6
            } else if bad > 0 {
                5
            } else if unreadable > 0 {
                7
            } else {
                0
            })
        }
        Command::Delete { id } => {
            let (r, vm, backup) = parse_id(&config, id)?;
            CatalogServices::new().catalog().delete(r, vm, backup)?;
            println!("deleted {}:{vm}/{backup}", r.name());
            Ok(0)
        }
        Command::Restore { id, vm } => {
            let (r, backup_vm, backup) = parse_id(&config, id)?;
            let cancel = cancel_on_interrupt()?;
            let e = engine(&cli.uri)?;
            let mut reporter = Reporter::new(json, &format!("restore {id}"));
            let restored = e.restore(r, backup_vm, backup, vm.as_deref(), &cancel, &mut |p| reporter.update(p));
            reporter.finish();
            let restored = restored?;
            if json {
                let disks: Vec<_> = restored
                    .iter()
                    .map(|d| json!({"target": d.target, "location": d.location, "format": d.format, "note": d.note}))
                    .collect();
                println!("{}", json!({"restored": disks}));
            } else {
                for d in &restored {
                    println!("restored {} -> {} ({})", d.target, d.location, d.format);
                    if let Some(note) = &d.note {
                        println!("  {note}");
                    }
                }
            }
            Ok(0)
        }
        Command::RestoreVolume { id, disk, to, format, attach } => {
            let (r, vm, backup) = parse_id(&config, id)?;
            let request = VolumeRestoreRequest {
                vm: vm.to_owned(),
                id: backup.to_owned(),
                disk: disk.clone(),
                to: nasbak::parse_destination(to)?,
                format: format.parse::<ImageFormat>().unwrap_or_else(|never| match never {}),
                attach: attach.clone(),
            };
            let cancel = cancel_on_interrupt()?;
            let e = engine(&cli.uri)?;
            let mut reporter = Reporter::new(json, &format!("restore {disk} of {id}"));
            let restored = e.restore_volume(r, &request, &cancel, &mut |p| reporter.update(p));
            reporter.finish();
            let v = restored?;
            if json {
                println!(
                    "{}",
                    json!({"location": v.location, "format": v.format,
                           "attached": v.attached.as_ref().map(|(vm, t)| json!({"vm": vm, "target": t}))})
                );
            } else {
                println!("restored {disk} of {id} to {} ({})", v.location, v.format);
                if let Some((vm, target)) = &v.attached {
                    println!("attached to {vm} as {target}");
                }
            }
            Ok(0)
        }
        Command::Prune { vm, dry_run } => {
            let vms: Vec<String> = match vm {
                Some(v) => vec![v.clone()],
                None => config.assignments.keys().cloned().collect(),
            };
            let services = CatalogServices::new();
            let mut reports = Vec::new();
            for v in &vms {
                let report = services.catalog().prune_vm(&config, v, *dry_run)?;
                if !json {
                    for d in &report.damaged {
                        println!(
                            "DAMAGED  {v}/{}  ({}): not counted, not removed; verify or delete it",
                            d.id, d.reason
                        );
                    }
                    for d in &report.decisions {
                        let verb = match (d.keep, *dry_run) {
                            (true, _) => "keep  ",
                            (false, true) => "would remove",
                            (false, false) => "removed",
                        };
                        println!("{verb}  {v}/{}  ({})", d.id, d.reason);
                    }
                }
                reports.push(report);
            }
            if json {
                println!("{}", serde_json::to_string(&reports)?);
            }
            Ok(0)
        }
        Command::RunDue => {
            let cancel = cancel_on_interrupt()?;
            let e = engine(&cli.uri)?;
            let now = chrono::Utc::now();
            let mut reporter: Option<(String, Reporter)> = None;
            let outcome = e.run_due(&config, &cli.state, now, &cancel, &mut |id, p| {
                if reporter.as_ref().is_none_or(|(current, _)| current != id) {
                    if let Some((_, r)) = reporter.take() {
                        r.finish();
                    }
                    reporter = Some((id.to_owned(), Reporter::new(json, &format!("schedule {id}"))));
                }
                if let Some((_, r)) = reporter.as_mut() {
                    r.update(p);
                }
            });
            if let Some((_, r)) = reporter.take() {
                r.finish();
            }
            match outcome? {
                RunDue::Busy(holder) => {
                    if json {
                        println!("{}", json!({"busy": holder}));
                    } else {
                        println!("another run-due is running ({holder}); nothing done");
                    }
                    Ok(0)
                }
                RunDue::Ran(runs) => {
                    let failed = runs.iter().filter(|r| r.result.is_err()).count();
                    if json {
                        println!("{}", serde_json::to_string(&runs)?);
                    } else {
                        if runs.is_empty() {
                            println!("nothing is due");
                        }
                        for r in &runs {
                            match &r.result {
                                Ok(id) => println!("{}: backed up {} as {id}", r.schedule, r.vm),
                                Err(e) => println!("{}: backup of {} FAILED: {e}", r.schedule, r.vm),
                            }
                            for p in &r.pruned {
                                println!("{}: pruned {}/{p}", r.schedule, r.vm);
                            }
                        }
                    }
                    Ok(if failed > 0 { 5 } else { 0 })
                }
            }
        }
    }
}

/// A JSON value as text for a table ("" when absent).
fn text(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Prints rows as one JSON array, or one line each.
fn print_rows(json: bool, rows: Vec<serde_json::Value>, line: impl Fn(&serde_json::Value) -> String) {
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        for r in &rows {
            println!("{}", line(r));
        }
    }
}

fn repo(cli: &Cli, config: &mut Config, cmd: &RepoCommand) -> Result<u8> {
    match cmd {
        RepoCommand::Add { name, kind, address, options, fstype, zone } => {
            let kind = RepositoryKind::from_parts(kind, fstype.as_deref())?;
            let r = BackupRepository::new(name, kind, address, options, zone.as_deref())?;
            if config.repository(name).is_some() {
                return Err(Refused(format!("a repository named {name} exists already; remove it first")).into());
            }
            config.repositories.push(r);
            config.save(&cli.config)?;
            println!("added repository {name}");
        }
        RepoCommand::List => {
            let rows = config
                .repositories
                .iter()
                .map(|r| {
                    json!({"name": r.name().as_str(), "type": r.kind().to_string(), "address": r.address().to_string(),
                                "options": r.mount_options().to_string(), "zone": r.zone()})
                })
                .collect();
            print_rows(cli.json, rows, |r| {
                format!("{}  {}  {}  {}", text(&r["name"]), text(&r["type"]), text(&r["address"]), text(&r["options"]))
            });
        }
        RepoCommand::Show { name } => {
            let r = pick_repo(config, Some(name))?;
            println!(
                "name: {}\ntype: {}\naddress: {}\noptions: {}\nzone: {}",
                r.name(),
                r.kind(),
                r.address(),
                r.mount_options(),
                r.zone().unwrap_or("-")
            );
            if let Some(plan) = r.mount_plan() {
                println!(
                    "mounts as: mount -t {} -o {} {} {}/mnt/{}",
                    plan.fstype,
                    plan.options,
                    plan.source,
                    RUNTIME,
                    r.name()
                );
            }
        }
        RepoCommand::Remove { name } => {
            pick_repo(config, Some(name))?;
            if let Some(o) = config.offerings.iter().find(|o| &o.repository == name) {
                return Err(Refused(format!("offering {} uses repository {name}; remove it first", o.name)).into());
            }
            config.repositories.retain(|r| r.name().as_str() != name);
            config.save(&cli.config)?;
            println!("removed repository {name} (its backups were not touched)");
        }
        RepoCommand::Check { name } | RepoCommand::Stats { name } => {
            let r = pick_repo(config, Some(name))?;
            // Needs no libvirt: only the repository layer.
            let mounts = mounts();
            let m = mounts.acquire(r)?;
            if matches!(cmd, RepoCommand::Check { .. }) {
                m.check_writable()?;
                if !cli.json {
                    println!("{name}: mount, write, read back, unmount: ok");
                }
            }
            let c = m.capacity()?;
            m.release()?;
            if cli.json {
                println!("{}", json!({"repository": name, "total": c.total, "used": c.used, "available": c.available}));
            } else {
                println!(
                    "{name}: total {} MiB, used {} MiB, available {} MiB",
                    c.total >> 20,
                    c.used >> 20,
                    c.available >> 20
                );
            }
        }
    }
    Ok(0)
}

fn offering(cli: &Cli, config: &mut Config, cmd: &OfferingCommand) -> Result<u8> {
    match cmd {
        OfferingCommand::Add { name, repo, zone, quiesce, keep } => {
            config.add_offering(Offering {
                name: name.clone(),
                repository: repo.clone(),
                zone: zone.clone(),
                quiesce: *quiesce,
                keep: *keep,
            })?;
            config.save(&cli.config)?;
            println!("added offering {name}");
        }
        OfferingCommand::List => {
            let rows: Vec<_> = config
                .offerings
                .iter()
                .map(|o| {
                    let vms: Vec<&str> =
                        config.assignments.iter().filter(|(_, x)| *x == &o.name).map(|(v, _)| v.as_str()).collect();
                    json!({"name": o.name, "repository": o.repository, "zone": o.zone, "quiesce": o.quiesce.to_string(),
                           "keep": o.keep.map(|k| k.to_string()), "vms": vms})
                })
                .collect();
            print_rows(cli.json, rows, |r| {
                let vms =
                    r["vms"].as_array().map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "));
                format!(
                    "{}  repo {}  quiesce {}  keep {}  vms: {}",
                    text(&r["name"]),
                    text(&r["repository"]),
                    text(&r["quiesce"]),
                    r["keep"].as_str().unwrap_or("everything"),
                    vms.unwrap_or_default()
                )
            });
        }
        OfferingCommand::Remove { name } => {
            config.remove_offering(name)?;
            config.save(&cli.config)?;
            println!("removed offering {name}");
        }
    }
    Ok(0)
}

fn schedule(cli: &Cli, config: &mut Config, cmd: &ScheduleCommand) -> Result<u8> {
    match cmd {
        ScheduleCommand::Add { vm, every, at, tz, keep, quiesce } => {
            let parsed = At::parse(*every, at).map_err(|e| anyhow!(BackupError::Ambiguous { what: e }))?;
            parse_tz(tz).map_err(|e| anyhow!(BackupError::Ambiguous { what: e }))?;
            let id = config.next_schedule_id(vm, *every);
            config.add_schedule(Schedule {
                id: id.clone(),
                vm: vm.clone(),
                every: *every,
                at: parsed.to_string(),
                tz: tz.clone(),
                keep: *keep,
                quiesce: *quiesce,
                created: chrono::Utc::now(),
            })?;
            config.save(&cli.config)?;
            println!("added schedule {id}: {every} at {parsed} {tz}, keep {keep}");
        }
        ScheduleCommand::List => {
            let state = ScheduleState::load(&cli.state)?;
            let outcomes = &state.last_outcome;
            let rows: Vec<_> = config
                .schedules
                .iter()
                .map(|s| {
                    json!({"id": s.id, "vm": s.vm, "every": s.every.to_string(), "at": s.at, "tz": s.tz,
                           "keep": s.keep, "quiesce": s.quiesce.to_string(), "last_run": state.last_run.get(&s.id),
                           "last_outcome": state.last_outcome.get(&s.id)})
                })
                .collect();
            print_rows(cli.json, rows, |r| {
                format!(
                    "{}  {}  {} at {} {}  keep {}  quiesce {}  last run {}{}",
                    text(&r["id"]),
                    text(&r["vm"]),
                    text(&r["every"]),
                    text(&r["at"]),
                    text(&r["tz"]),
                    r["keep"],
                    text(&r["quiesce"]),
                    r["last_run"].as_str().unwrap_or("never"),
                    outcomes.get(text(&r["id"])).map(|o| format!(" ({o})")).unwrap_or_default()
                )
            });
        }
        ScheduleCommand::Remove { id } => {
            config.remove_schedule(id)?;
            config.save(&cli.config)?;
            println!("removed schedule {id}");
        }
    }
    Ok(0)
}
