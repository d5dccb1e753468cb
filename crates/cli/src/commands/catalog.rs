//! `list`, `show`, `verify`, `delete`, `prune`, `mount` and `umount`: the catalog, which never
//! needs libvirt.

use anyhow::{Result, anyhow};
use nasbak::nasbak_repo::{BackupRef, KeySource};
use nasbak::{BackupError, BackupKind, FileStatus, MountRequest, VerifyReport};
use nasbak_service::config::Config;

use super::{CatalogServices, cancel_on_interrupt, repo_of, repos};
use crate::args::Cli;
use crate::output::print_json;
use crate::progress::Reporter;

pub fn list(cli: &Cli, config: &Config, vm: Option<&str>, repo: Option<&str>) -> Result<u8> {
    let services = CatalogServices::new();
    let mut all = Vec::new();
    for r in repos(config, repo)? {
        all.extend(services.catalog().list(r, vm)?);
    }
    if cli.json {
        print_json(&all)?;
        return Ok(0);
    }
    for b in &all {
        match &b.kind {
            BackupKind::Damaged { reason } => println!("{}  DAMAGED: {reason}", b.reference()),
            BackupKind::Nasbak(m) => println!(
                "{}  {} disk(s)  nasbak  {}{}{}",
                b.reference(),
                m.disks.len(),
                m.parent.as_ref().map_or_else(|| "full".to_owned(), |p| format!("incremental on {p}")),
                m.schedule.as_ref().map(|s| format!("  schedule {s}")).unwrap_or_default(),
                boot_note(b)
            ),
            BackupKind::Reference { files } => {
                println!("{}  {} disk(s)  reference{}", b.reference(), files.len(), boot_note(b))
            }
        }
    }
    Ok(0)
}

/// The last boot verification, for `list`.
fn boot_note(b: &nasbak::BackupEntry) -> String {
    b.boot_verified.as_ref().map_or_else(String::new, |v| {
        let word = match v.result {
            nasbak::BootResult::Passed => "boots",
            nasbak::BootResult::Failed => "DOES NOT BOOT",
            _ => "boot unverifiable",
        };
        format!("  {word} (verified {})", v.at.format("%Y-%m-%d %H:%M"))
    })
}

pub fn show(cli: &Cli, config: &Config, id: &BackupRef) -> Result<u8> {
    let r = repo_of(config, id)?;
    let b = CatalogServices::new().catalog().entry(r, id.vm.as_str(), &id.id.to_string())?;
    match &b.kind {
        BackupKind::Damaged { reason } => {
            Err(anyhow!(BackupError::DamagedBackup { backup: id.relative(), reason: reason.clone() }))
        }
        BackupKind::Nasbak(m) if !cli.json => {
            println!("{}", m.to_json());
            if let Some(v) = &b.boot_verified {
                println!("boot verification:{}  {}", boot_note(&b), v.detail);
            }
            Ok(0)
        }
        _ => {
            print_json(&b)?;
            Ok(0)
        }
    }
}

pub fn verify(cli: &Cli, config: &Config, id: Option<&BackupRef>, all: bool, repo: Option<&str>) -> Result<u8> {
    let services = CatalogServices::new();
    let catalog = services.catalog();
    let cancel = cancel_on_interrupt()?;
    let mut reports: Vec<VerifyReport> = Vec::new();
    if all {
        for r in repos(config, repo)? {
            let mut reporter = Reporter::new(cli.json, &format!("verify {}", r.name()));
            let found = catalog.verify_all(r, None, &cancel, &mut |p| reporter.update(p));
            reporter.finish();
            reports.extend(found?);
        }
    } else {
        let id = id.expect("clap requires ID without --all");
        let r = repo_of(config, id)?;
        let mut reporter = Reporter::new(cli.json, &format!("verify {id}"));
        let report = catalog.verify(r, id.vm.as_str(), &id.id.to_string(), &cancel, &mut |p| reporter.update(p));
        reporter.finish();
        reports.push(match report {
            Err(BackupError::DamagedBackup { reason, .. }) => {
                VerifyReport::of_damaged(format!("{}:{}", r.name(), id.relative()), reason)
            }
            other => other?,
        });
    }
    print_verify(cli, &reports)
}

/// Prints verify's reports; the worst finding decides the exit code: damaged (6) over bad data
/// (5) over unreadable (7).
pub(super) fn print_verify(cli: &Cli, reports: &[VerifyReport]) -> Result<u8> {
    let (mut damaged, mut bad, mut unreadable) = (0, 0, 0);
    for report in reports {
        if let Some(reason) = &report.damaged {
            damaged += 1;
            if !cli.json {
                println!("DAMAGED  {}  {reason}", report.backup);
            }
        }
        for v in &report.files {
            match v.status {
                FileStatus::Ok => {}
                FileStatus::Missing => damaged += 1,
                FileStatus::Unreadable => unreadable += 1,
                FileStatus::Differs | FileStatus::Corrupt => bad += 1,
            }
            if !cli.json {
                let checksum = v.checksum_ok.map_or("not recorded", |ok| if ok { "matches" } else { "DIFFERS" });
                let detail = match &v.error {
                    Some(e) => e.clone(),
                    None => format!("check {:?}, checksum {checksum}", v.check),
                };
                let verdict = if v.ok() { "ok " } else { "BAD" };
                println!("{verdict}  {}  {}  {}  {detail}", report.backup, v.file, v.status);
            }
        }
    }
    if cli.json {
        print_json(reports)?;
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

pub fn delete(config: &Config, id: &BackupRef) -> Result<u8> {
    let r = repo_of(config, id)?;
    CatalogServices::new().catalog().delete(r, id.vm.as_str(), &id.id.to_string())?;
    println!("deleted {}:{}", r.name(), id.relative());
    Ok(0)
}

pub fn prune(cli: &Cli, config: &Config, vm: Option<&str>, dry_run: bool) -> Result<u8> {
    let vms: Vec<String> = match vm {
        Some(v) => vec![v.to_owned()],
        None => config.assignments.keys().cloned().collect(),
    };
    let services = CatalogServices::new();
    // A repository whose key is a libvirt secret: its encrypted chains are merged with the key
    // read through libvirt (connected only then).
    let secret_keyed = |v: &str| {
        config
            .offering_of(v)
            .and_then(|o| config.repository(&o.repository))
            .is_some_and(|r| matches!(r.protection().key(), Some(KeySource::LibvirtSecret(_))))
    };
    let libvirt = if !dry_run && vms.iter().any(|v| secret_keyed(v)) { Some(super::engine(cli)?) } else { None };
    let mut reports = Vec::new();
    for v in &vms {
        let report = match &libvirt {
            Some(e) if secret_keyed(v) => nasbak_service::prune_vm_with(e, config, v, dry_run)?,
            _ => nasbak_service::prune_vm(&services.catalog(), config, v, dry_run)?,
        };
        if !cli.json {
            for d in &report.damaged {
                println!("DAMAGED  {v}/{}  ({}): not counted, not removed; verify or delete it", d.id, d.reason);
            }
            for d in &report.decisions {
                let verb = match (d.keep, dry_run) {
                    (true, true) if d.merge_over.is_some() => "would merge",
                    (true, false) if d.merge_over.is_some() => "merged",
                    (true, _) => "keep  ",
                    (false, true) => "would remove",
                    (false, false) => "removed",
                };
                println!("{verb}  {v}/{}  ({})", d.id, d.reason);
            }
        }
        reports.push(report);
    }
    if cli.json {
        print_json(&reports)?;
    }
    Ok(0)
}

pub fn mount(
    cli: &Cli,
    config: &Config,
    id: &BackupRef,
    dir: &std::path::Path,
    disk: Option<&str>,
    luks_key_file: Option<&std::path::Path>,
) -> Result<u8> {
    let r = repo_of(config, id)?;
    let mut request = MountRequest::new(r.clone(), id.vm.as_str(), id.id.to_string(), dir);
    if let Some(t) = disk {
        request = request.only_disk(t);
    }
    if let Some(k) = luks_key_file {
        request = request.open_luks_with(k);
    }
    let cancel = cancel_on_interrupt()?;
    let mounted = CatalogServices::new().catalog().mount(&request, &cancel)?;
    if cli.json {
        print_json(&mounted)?;
        return Ok(0);
    }
    println!("mounted {} read-only at {}", mounted.backup, mounted.dir.display());
    for d in &mounted.disks {
        let chain = if d.files > 1 { format!(", read through a chain of {} files", d.files) } else { String::new() };
        println!("{}  {} ({} bytes{chain})", d.target, d.image.display(), d.size);
        for f in &d.filesystems {
            let place = where_in(f.partition, f.logical_volume.as_deref());
            println!("  {place}  {}  ({}, {})", f.path.display(), f.fstype, f.options);
        }
        for n in &d.not_mounted {
            println!("  {}  not mounted: {}", where_in(n.partition, n.logical_volume.as_deref()), n.reason);
        }
    }
    println!("unmount with: nasbak umount {}", mounted.dir.display());
    Ok(0)
}

fn part_name(partition: Option<u32>) -> String {
    partition.map_or_else(|| "whole disk".to_owned(), |n| format!("partition {n}"))
}

/// A partition, or a logical volume in it: `partition 2, logical volume rhel/root`.
fn where_in(partition: Option<u32>, logical_volume: Option<&str>) -> String {
    match logical_volume {
        Some(lv) => format!("{}, logical volume {lv}", part_name(partition)),
        None => part_name(partition),
    }
}

pub fn umount(cli: &Cli, dir: &std::path::Path) -> Result<u8> {
    let report = CatalogServices::new().catalog().unmount(dir)?;
    if cli.json {
        print_json(&report)?;
        return Ok(0);
    }
    println!(
        "unmounted {}: {} file system(s), {} device-mapper device(s), {} export(s){}",
        report.dir.display(),
        report.unmounted.len(),
        report.mappings.len(),
        report.exports.len(),
        if report.repository_unmounted { ", and the repository" } else { "" }
    );
    if !report.repository_unmounted && !report.repository_users.is_empty() {
        let users: Vec<String> = report.repository_users.iter().map(ToString::to_string).collect();
        println!("  the repository stays mounted, used by {}", users.join(", "));
    }
    for p in &report.left {
        println!("  left {} (not nasbak's)", p.display());
    }
    Ok(0)
}

/// The status of every assigned VM (from the repositories and the schedule state) at this
/// moment; repositories are mounted where they must be, never libvirt.
fn gather_status(config: &Config, state_path: &std::path::Path) -> Result<nasbak_service::status::StatusReport> {
    let state = nasbak_service::config::ScheduleState::load(state_path)?;
    let services = CatalogServices::new();
    Ok(nasbak_service::status::status(&services.catalog(), config, &state, chrono::Utc::now()))
}

/// `2d 3h`, `3h 05m`, `4m 10s`: an age for people.
fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

pub fn status(cli: &Cli, config: &Config) -> Result<u8> {
    use nasbak_service::status::RpoState;
    let report = gather_status(config, &cli.state)?;
    if cli.json {
        print_json(&report)?;
    } else {
        if report.vms.is_empty() {
            println!("no VM is assigned to an offering or scheduled");
        }
        for vm in &report.vms {
            let rpo = match vm.rpo.state {
                RpoState::Met => "RPO met",
                RpoState::Missed => "RPO MISSED",
                RpoState::Pending => "RPO pending (no occurrence of its schedules has passed yet)",
                RpoState::Unscheduled => "no schedule",
                _ => "UNKNOWN",
            };
            let newest = match &vm.newest {
                Some(n) => format!(
                    "newest {} ({} old, {}, chain of {})",
                    n.backup,
                    age(n.age_seconds),
                    if n.mode == nasbak::nasbak_repo::BackupMode::Full { "full" } else { "incremental" },
                    vm.chain_length.unwrap_or(1)
                ),
                None if vm.error.is_none() => "no good backup".to_owned(),
                None => String::new(),
            };
            println!("{}: {rpo}{}{newest}", vm.vm, if newest.is_empty() { "" } else { ", " });
            if let (RpoState::Missed, Some(since)) = (vm.rpo.state, vm.rpo.required_since) {
                println!(
                    "  needs a backup begun at or after {} (schedule {})",
                    since.format("%Y-%m-%d %H:%M UTC"),
                    vm.rpo.schedule.as_deref().unwrap_or("-")
                );
            }
            if let Some(e) = &vm.error {
                println!("  ERROR: {e}");
            }
            if let Some(f) = &vm.last_failure {
                let state = if vm.consecutive_failures > 0 {
                    format!("FAILING ({} run(s) in a row)", vm.consecutive_failures)
                } else {
                    "since succeeded".to_owned()
                };
                println!(
                    "  last failure {} ({}, {state}): {}",
                    f.at.format("%Y-%m-%d %H:%M UTC"),
                    f.schedule,
                    f.reason.lines().next().unwrap_or_default()
                );
            }
            if let Some(v) = &vm.boot_verified {
                println!("  boot verified {}: {:?} ({})", v.at.format("%Y-%m-%d %H:%M UTC"), v.result, v.backup);
            }
        }
        for r in &report.repositories {
            match (&r.capacity, &r.error) {
                (Some(c), _) => println!(
                    "repository {}: {} GiB total, {} GiB used, {} GiB available ({} %)",
                    r.repository,
                    c.total >> 30,
                    c.used >> 30,
                    c.available >> 30,
                    (c.available * 100).checked_div(c.total).unwrap_or(0)
                ),
                (None, e) => println!("repository {}: UNREACHABLE: {}", r.repository, e.as_deref().unwrap_or("-")),
            }
        }
    }
    Ok(if report.needs_attention() { 5 } else { 0 })
}

pub fn metrics(config: &Config, state_path: &std::path::Path, textfile: Option<&std::path::Path>) -> Result<u8> {
    let report = gather_status(config, state_path)?;
    match textfile {
        Some(path) => nasbak_service::metrics::write_textfile(path, &report)?,
        None => print!("{}", nasbak_service::metrics::render(&report)),
    }
    Ok(0)
}

/// After `run-due`: the metrics file the configuration names, when a backup ran or the file is
/// older than five minutes (a timer calls `run-due` every minute; the ages stay current without
/// mounting every repository each minute). A failure is a warning: the backups stand.
pub fn refresh_metrics(config: &Config, state_path: &std::path::Path, ran: bool) {
    let Some(path) = &config.metrics_textfile else { return };
    let fresh = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(300));
    if fresh && !ran {
        return;
    }
    if let Err(e) = gather_status(config, state_path)
        .and_then(|r| nasbak_service::metrics::write_textfile(path, &r).map_err(anyhow::Error::from))
    {
        eprintln!("nasbak: WARNING: the metrics file {} was not written: {e:#}", path.display());
    }
}
