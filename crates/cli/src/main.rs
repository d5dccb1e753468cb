//! `nasbak`: back up and restore KVM/libvirt VMs to network-attached storage.
//!
//! Exit codes: 0 success, 1 failed, 2 usage, 3 not found, 4 refused (the VM is running, the
//! backup does not match, another process holds the VM), 5 partially failed (verify found bad
//! files).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use nasbak::config::{Config, DEFAULT_CONFIG};
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::QemuImg;
use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter};
use nasbak::{BackupError, BackupKind, BackupProgress, BackupRequest, Engine};
use serde_json::json;

const RUNTIME: &str = "/run/nasbak";

#[derive(Parser)]
#[command(name = "nasbak", version, about = "Back up and restore KVM/libvirt VMs to network-attached storage")]
struct Cli {
    /// The configuration file.
    #[arg(long, env = "NASBAK_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
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

#[derive(Subcommand)]
enum Command {
    /// Backup repositories.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Back up a VM (running: push job with quiesce; shut off: qemu-img).
    Backup {
        /// The VM (libvirt domain name).
        vm: String,
        /// The repository to write to (may be left out when there is only one).
        #[arg(long)]
        repo: Option<String>,
        /// Freeze the guest's file systems around the job start.
        #[arg(long, default_value = "best-effort", value_parser = ["required", "best-effort", "off"])]
        quiesce: String,
        /// Abort the copy after this many seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        timeout: u64,
    },
    /// List complete backups (also those the reference system wrote).
    List {
        /// Only this VM.
        vm: Option<String>,
        /// Only this repository.
        #[arg(long)]
        repo: Option<String>,
    },
    /// Show one backup: ID is REPO:VM/BACKUP-ID (REPO: may be left out with one repository).
    Show {
        /// The backup.
        id: String,
    },
    /// Check a backup's files (qemu-img check and checksums).
    Verify {
        /// The backup.
        id: String,
    },
    /// Delete one backup.
    Delete {
        /// The backup.
        id: String,
    },
    /// Restore every disk of a shut-off VM from a backup.
    Restore {
        /// The backup.
        id: String,
        /// Restore into this VM instead of the one the backup is of.
        #[arg(long)]
        vm: Option<String>,
    },
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
    /// Mount, write, read back and unmount.
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

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<BackupError>() {
        Some(BackupError::NotFound { .. }) => 3,
        Some(BackupError::NotShutOff { .. } | BackupError::Mismatch { .. } | BackupError::Lock(_)) => 4,
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
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn engine(uri: &str) -> Result<Engine<LibvirtHypervisor, QemuImg, SystemMounter>> {
    Ok(Engine {
        hypervisor: LibvirtHypervisor::connect(uri).with_context(|| format!("connecting to {uri}"))?,
        images: QemuImg::new(RUNTIME),
        mounts: RepositoryMounts::new(SystemMounter::new(RUNTIME), RUNTIME, MountTimeouts::default()),
        agent_timeout: Duration::from_secs(10),
    })
}

fn pick_repo<'a>(config: &'a Config, name: Option<&str>) -> Result<&'a BackupRepository> {
    match name {
        Some(n) => {
            config.repository(n).ok_or_else(|| anyhow!(BackupError::NotFound { what: format!("repository {n}") }))
        }
        None if config.repositories.len() == 1 => Ok(&config.repositories[0]),
        None => bail!("say which repository with --repo (there are {})", config.repositories.len()),
    }
}

/// REPO:VM/BACKUP-ID, or VM/BACKUP-ID with one repository.
fn parse_id<'a>(config: &'a Config, id: &'a str) -> Result<(&'a BackupRepository, &'a str, &'a str)> {
    let (repo, rest) = match id.split_once(':') {
        Some((r, rest)) => (Some(r), rest),
        None => (None, id),
    };
    let (vm, backup) =
        rest.split_once('/').ok_or_else(|| anyhow!("{id:?} is not a backup id; expected REPO:VM/BACKUP-ID"))?;
    Ok((pick_repo(config, repo)?, vm, backup))
}

fn progress_printer(json: bool) -> impl FnMut(BackupProgress) {
    let tty = std::io::stderr().is_terminal();
    move |p| match (json, p) {
        (true, BackupProgress::Bytes { processed, total }) => {
            eprintln!("{}", json!({"processed": processed, "total": total}))
        }
        (true, BackupProgress::Disk { target, percent }) => {
            eprintln!("{}", json!({"disk": target, "percent": percent}))
        }
        (false, BackupProgress::Bytes { processed, total }) => {
            let pct = if total > 0 { processed as f64 * 100.0 / total as f64 } else { 0.0 };
            let end = if tty { "\r" } else { "\n" };
            eprint!("  {pct:5.1}%  {} / {} MiB{end}", processed >> 20, total >> 20);
        }
        (false, BackupProgress::Disk { target, percent }) => eprintln!("  {target}: {percent:.1}%"),
    }
}

fn run(cli: &Cli) -> Result<u8> {
    let mut config = Config::load(&cli.config)?;
    match &cli.command {
        Command::Repo(cmd) => repo(cli, &mut config, cmd),
        Command::Backup { vm, repo, quiesce, timeout } => {
            let repository = pick_repo(&config, repo.as_deref())?.clone();
            let cancel = CancelHandle::new();
            let handle = cancel.clone();
            ctrlc::set_handler(move || handle.cancel()).context("installing the Ctrl-C handler")?;
            let request = BackupRequest {
                vm: vm.clone(),
                repository,
                quiesce: quiesce.parse::<QuiescePolicy>().map_err(|e| anyhow!(e))?,
                timeout: Duration::from_secs(*timeout),
            };
            let e = engine(&cli.uri)?;
            let outcome = e.backup(&request, &cancel, &mut progress_printer(cli.json))?;
            let m = &outcome.manifest;
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "id": format!("{}:{}/{}", m.repository, m.vm, m.id), "repository": m.repository, "vm": m.vm,
                        "quiesced": m.quiesced, "quiesce_note": m.quiesce_note, "disks": m.disks, "cleaned": outcome.cleaned,
                    })
                );
            } else {
                eprintln!();
                println!(
                    "backed up {} as {}:{}/{} ({} disk(s), quiesced: {})",
                    m.vm,
                    m.repository,
                    m.vm,
                    m.id,
                    m.disks.len(),
                    m.quiesced
                );
                for (target, why) in &outcome.skipped {
                    println!("  skipped {target}: {why}");
                }
                for note in &outcome.cleaned {
                    println!("  {note}");
                }
            }
            Ok(0)
        }
        Command::List { vm, repo } => {
            let repos: Vec<&BackupRepository> = match repo {
                Some(r) => vec![pick_repo(&config, Some(r))?],
                None => config.repositories.iter().collect(),
            };
            let e = engine(&cli.uri)?;
            let mut all = Vec::new();
            for r in repos {
                for b in e.list(r, vm.as_deref())? {
                    let (kind, quiesced, disks) = match &b.kind {
                        BackupKind::Nasbak(m) => ("nasbak", Some(m.quiesced), m.disks.len()),
                        BackupKind::Reference { files } => ("reference", None, files.len()),
                    };
                    all.push(json!({"id": format!("{}:{}/{}", r.name(), b.vm, b.id), "repository": r.name().as_str(),
                                    "vm": b.vm, "backup": b.id, "written_by": kind, "quiesced": quiesced, "disks": disks}));
                }
            }
            if cli.json {
                println!("{}", serde_json::Value::Array(all));
            } else {
                for b in &all {
                    println!(
                        "{}  {} disk(s)  {}",
                        b["id"].as_str().unwrap_or_default(),
                        b["disks"],
                        b["written_by"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Command::Show { id } => {
            let (r, vm, backup) = parse_id(&config, id)?;
            let e = engine(&cli.uri)?;
            let found = e.list(r, Some(vm))?.into_iter().find(|b| b.id == backup);
            let b = found.ok_or_else(|| anyhow!(BackupError::NotFound { what: format!("backup {id}") }))?;
            match &b.kind {
                BackupKind::Nasbak(m) => println!("{}", if cli.json { serde_json::to_string(m)? } else { m.to_json() }),
                BackupKind::Reference { files } => println!("{}", json!({"written_by": "reference", "files": files})),
            }
            Ok(0)
        }
        Command::Verify { id } => {
            let (r, vm, backup) = parse_id(&config, id)?;
            let verdicts = engine(&cli.uri)?.verify(r, vm, backup)?;
            let bad = verdicts.iter().filter(|v| !v.ok()).count();
            for v in &verdicts {
                if cli.json {
                    println!(
                        "{}",
                        json!({"file": v.file, "check": format!("{:?}", v.check), "checksum_ok": v.checksum_ok, "ok": v.ok()})
                    );
                } else {
                    println!(
                        "{}  {}  check {:?}, checksum {}",
                        if v.ok() { "ok " } else { "BAD" },
                        v.file,
                        v.check,
                        v.checksum_ok.map_or("not recorded", |ok| if ok { "matches" } else { "DIFFERS" })
                    );
                }
            }
            Ok(if bad > 0 { 5 } else { 0 })
        }
        Command::Delete { id } => {
            let (r, vm, backup) = parse_id(&config, id)?;
            engine(&cli.uri)?.delete(r, vm, backup)?;
            println!("deleted {id}");
            Ok(0)
        }
        Command::Restore { id, vm } => {
            let (r, backup_vm, backup) = parse_id(&config, id)?;
            if vm.as_deref().is_some_and(|v| v != backup_vm) {
                bail!("restoring into another VM is not supported yet; restore-volume will do that");
            }
            let restored = engine(&cli.uri)?.restore(r, backup_vm, backup)?;
            for d in &restored {
                println!("restored {} -> {} ({})", d.target, d.path.display(), d.format);
            }
            Ok(0)
        }
    }
}

fn repo(cli: &Cli, config: &mut Config, cmd: &RepoCommand) -> Result<u8> {
    match cmd {
        RepoCommand::Add { name, kind, address, options, fstype, zone } => {
            let kind = RepositoryKind::from_parts(kind, fstype.as_deref())?;
            let r = BackupRepository::new(name, kind, address, options, zone.as_deref())?;
            if config.repository(name).is_some() {
                bail!("a repository named {name} exists already; remove it first");
            }
            config.repositories.push(r);
            config.save(&cli.config)?;
            println!("added repository {name}");
        }
        RepoCommand::List => {
            for r in &config.repositories {
                println!("{}  {}  {}  {}", r.name(), r.kind(), r.address(), r.mount_options());
            }
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
            config.repositories.retain(|r| r.name().as_str() != name);
            config.save(&cli.config)?;
            println!("removed repository {name} (its backups were not touched)");
        }
        RepoCommand::Check { name } | RepoCommand::Stats { name } => {
            let r = pick_repo(config, Some(name))?;
            let mounts = RepositoryMounts::new(SystemMounter::new(RUNTIME), RUNTIME, MountTimeouts::default());
            let m = mounts.acquire(r)?;
            if matches!(cmd, RepoCommand::Check { .. }) {
                let probe = m.root().join(".nasbak-check");
                std::fs::write(&probe, b"nasbak")
                    .with_context(|| format!("writing {} (is the repository writable by root?)", probe.display()))?;
                let back = std::fs::read(&probe)?;
                std::fs::remove_file(&probe)?;
                if back != b"nasbak" {
                    bail!("read back different bytes from {}", probe.display());
                }
                println!("{name}: mount, write, read back: ok");
            }
            let c = m.capacity()?;
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
            m.release()?;
        }
    }
    Ok(0)
}
