//! Off-site targets: `target add|list|show|remove|check`, `copy`, and `list`/`verify` with
//! `--target`.

use anyhow::{Result, anyhow};
use nasbak::nasbak_repo::{BackupRef, ObjectLock, ObjectTarget, S3Credentials};
use nasbak::objstore::ObjectStore;
use nasbak::{BackupError, CopyResult, CopySelection};
use nasbak_service::config::Config;

use super::{CatalogServices, cancel_on_interrupt, not_found, pick_repo, repo_of};
use crate::args::{Cli, TargetCommand};
use crate::output::{print_json, print_rows};
use crate::progress::Reporter;

/// The target called `name`, connected.
fn store(config: &Config, name: &str) -> Result<ObjectStore> {
    let target = config.target(name).ok_or_else(|| not_found(format!("target {name}")))?;
    Ok(ObjectStore::connect(target).map_err(BackupError::from)?)
}

pub fn target(cli: &Cli, config: &mut Config, cmd: &TargetCommand) -> Result<u8> {
    match cmd {
        TargetCommand::Add {
            name,
            kind: _,
            endpoint,
            bucket,
            prefix,
            credentials_file,
            lock,
            lock_days,
            ca_file,
            region,
        } => {
            if config.target(name).is_some() {
                return Err(anyhow!(nasbak_service::config::Refused(format!(
                    "a target named {name} exists already; remove it first"
                ))));
            }
            let credentials = match credentials_file {
                Some(path) => S3Credentials::File(path.clone()),
                None => S3Credentials::Environment,
            };
            let mut target = ObjectTarget::new(name, endpoint, bucket, prefix.as_deref(), credentials)?;
            if let (Some(mode), Some(days)) = (lock, lock_days) {
                target = target.with_lock(ObjectLock::new(*mode, *days)?);
            }
            if let Some(ca) = ca_file {
                target = target.with_ca_file(ca)?;
            }
            if let Some(region) = region {
                target = target.with_region(region)?;
            }
            // Checked before it is saved: a target that cannot take a copy is never configured.
            let check = ObjectStore::connect(&target).and_then(|s| s.check()).map_err(BackupError::from)?;
            config.add_target(target)?;
            config.save(&cli.config)?;
            if cli.json {
                print_json(&check)?;
            } else {
                println!("added target {name}: {}", check_line(&check));
            }
        }
        TargetCommand::List => {
            print_rows(cli.json, &config.targets, |t| t.to_string())?;
        }
        TargetCommand::Show { name } => {
            let t = config.target(name).ok_or_else(|| not_found(format!("target {name}")))?;
            if cli.json {
                print_json(t)?;
            } else {
                println!("{t}");
                if let Some(ca) = t.ca_file() {
                    println!("  CA file {}", ca.display());
                }
                println!("  region {}", t.region());
                let copying: Vec<&str> = config
                    .offerings
                    .iter()
                    .filter(|o| o.copy_to.as_deref() == Some(name))
                    .map(|o| o.name.as_str())
                    .collect();
                if !copying.is_empty() {
                    println!("  offerings copying to it: {}", copying.join(", "));
                }
            }
        }
        TargetCommand::Remove { name } => {
            config.remove_target(name)?;
            config.save(&cli.config)?;
            println!("removed target {name} (what was copied there stays there)");
        }
        TargetCommand::Check { name } => {
            let check = store(config, name)?.check().map_err(BackupError::from)?;
            if cli.json {
                print_json(&check)?;
            } else {
                println!("target {name}: {}", check_line(&check));
            }
        }
    }
    Ok(0)
}

fn check_line(c: &nasbak::objstore::TargetCheck) -> String {
    let lock = match c.lock_holds {
        Some(true) => "a locked probe's delete was refused: the lock holds",
        Some(false) => "the lock DOES NOT hold",
        None if c.bucket_lock => "the bucket has object lock; this target does not lock",
        None => "no object lock",
    };
    format!("wrote and read back {} KiB in {} ms; {lock}", c.probe_bytes >> 10, c.millis)
}

/// `copy BACKUP|VM|--all --to TARGET`.
pub fn copy(
    cli: &Cli,
    config: &Config,
    what: Option<&str>,
    to: &str,
    repo: Option<&str>,
    bandwidth: Option<u64>,
) -> Result<u8> {
    let (repository, selection) = match what {
        Some(w) if w.contains('/') => {
            let id: BackupRef = w.parse()?;
            let r = match repo {
                Some(r) => pick_repo(config, Some(r))?,
                None => repo_of(config, &id)?,
            };
            (r, CopySelection::Backup { vm: id.vm.to_string(), id: id.id.to_string() })
        }
        Some(vm) => {
            let offering_repo = config.offering_of(vm).map(|o| o.repository.as_str());
            (pick_repo(config, repo.or(offering_repo))?, CopySelection::Vm(vm.to_owned()))
        }
        None => (pick_repo(config, repo)?, CopySelection::All),
    };
    let store = store(config, to)?;
    let cancel = cancel_on_interrupt()?;
    let services = CatalogServices::new();
    let mut reporter = Reporter::new(cli.json, &format!("copy to {to}"));
    let report = services.catalog().copy_to_target(
        repository,
        &store,
        &selection,
        bandwidth.map(|m| m << 20),
        &cancel,
        &mut |p| reporter.update(p),
    );
    reporter.finish();
    let report = report?;
    if cli.json {
        print_json(&report)?;
    } else {
        for b in &report.backups {
            let lock =
                b.locked_until.map(|t| format!(", locked until {}", t.format("%Y-%m-%d %H:%M"))).unwrap_or_default();
            match &b.result {
                CopyResult::Copied => println!(
                    "copied   {}  {} file(s), {} MiB sent, {} MiB already there{lock}",
                    b.backup,
                    b.files,
                    b.sent >> 20,
                    b.kept >> 20
                ),
                CopyResult::AlreadyCopied => println!("on {to}  {}{lock}", b.backup),
                CopyResult::Skipped { reason } => println!("SKIPPED  {}  {reason}", b.backup),
            }
        }
    }
    Ok(if report.backups.iter().any(|b| matches!(b.result, CopyResult::Skipped { .. })) { 4 } else { 0 })
}

/// `list --target T [VM]`.
pub fn list(cli: &Cli, config: &Config, target: &str, vm: Option<&str>) -> Result<u8> {
    let backups = nasbak::target_backups(&store(config, target)?, vm)?;
    print_rows(cli.json, &backups, |b| match (&b.manifest, &b.incomplete) {
        (Some(m), _) => format!(
            "{}  {} disk(s)  {} MiB  {}",
            b.backup,
            m.disks.len(),
            b.bytes >> 20,
            m.parent.as_ref().map_or_else(|| "full".to_owned(), |p| format!("incremental on {p}"))
        ),
        (None, reason) => format!("{}  INCOMPLETE: {}", b.backup, reason.as_deref().unwrap_or("")),
    })?;
    Ok(0)
}

/// `verify --target T ID|--all`.
pub fn verify(cli: &Cli, config: &Config, target: &str, id: Option<&BackupRef>) -> Result<u8> {
    let store = store(config, target)?;
    let cancel = cancel_on_interrupt()?;
    let mut reporter = Reporter::new(cli.json, &format!("verify {target}"));
    let reports = nasbak::verify_target(
        &store,
        id.map(|i| i.vm.as_str()),
        id.map(|i| i.id.to_string()).as_deref(),
        &cancel,
        &mut |p| reporter.update(p),
    );
    reporter.finish();
    super::catalog::print_verify(cli, &reports?)
}

/// `prune --target T [VM]`: each VM (given, or every assigned one) by its offering's retention.
pub fn prune(cli: &Cli, config: &Config, target: &str, vm: Option<&str>, dry_run: bool) -> Result<u8> {
    let store = store(config, target)?;
    let vms: Vec<String> = match vm {
        Some(v) => vec![v.to_owned()],
        None => config.assignments.keys().cloned().collect(),
    };
    let mut reports = Vec::new();
    for v in &vms {
        let report = nasbak_service::prune_target_vm(&store, config, v, dry_run)?;
        if !cli.json {
            for d in &report.decisions {
                let verb = match (d.keep, dry_run) {
                    (true, _) => "keep  ",
                    (false, true) => "would remove",
                    (false, false) => "removed",
                };
                println!("{verb}  {target}:{v}/{}  ({})", d.id, d.reason);
            }
        }
        reports.push(report);
    }
    if cli.json {
        print_json(&reports)?;
    }
    Ok(0)
}
