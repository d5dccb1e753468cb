//! The configuration: `repo`, `offering`, `assign`/`unassign` and `schedule`.

use anyhow::{Result, anyhow};
use nasbak::BackupError;
use nasbak::nasbak_repo::store::check_key_file;
use nasbak::nasbak_repo::{BackupRepository, Encryption, KeySource, Protection, RepositoryKind};
use nasbak_service::config::{Config, Offering, Refused, Schedule, ScheduleState};
use nasbak_service::schedule::{At, parse_tz};

use super::{CatalogServices, RUNTIME, cancel_on_interrupt, engine, pick_repo};
use crate::args::{Cli, KeyCommand, OfferingCommand, ProtectionArgs, RepoCommand, ScheduleCommand};
use crate::output::{print_json, print_rows};

pub fn assign(cli: &Cli, config: &mut Config, vm: &str, offering: &str) -> Result<u8> {
    config.assign(vm, offering)?;
    config.save(&cli.config)?;
    println!("assigned {vm} to offering {offering}");
    Ok(0)
}

pub fn unassign(cli: &Cli, config: &mut Config, vm: &str) -> Result<u8> {
    config.unassign(vm)?;
    config.save(&cli.config)?;
    println!("unassigned {vm}");
    Ok(0)
}

/// `current` changed by what `args` give: an unset flag keeps its setting, `--encrypt none` drops
/// the key, and a new key replaces the old. A key file is checked (root-owned, 0600) here, so a
/// bad one is refused before any backup is tried.
fn protection_of(current: &Protection, args: &ProtectionArgs) -> Result<Protection> {
    let compression = args.compression.unwrap_or(current.compression());
    let encryption = args.encryption.unwrap_or(current.encryption());
    let given = args.key_file.clone().or_else(|| args.key_secret.clone());
    let key = match encryption {
        Encryption::None if given.is_none() => None,
        Encryption::None => given,
        Encryption::Luks => given.or_else(|| current.key().cloned()),
    };
    if let Some(path) = key.as_ref().and_then(KeySource::path) {
        check_key_file(path).map_err(BackupError::from)?;
    }
    Ok(Protection::new(compression, encryption, key)?)
}

/// `key rotate`: every encrypted file given the new key and the old one removed, the repository
/// switched to the new key, then once more for files a backup wrote with the old key meanwhile.
/// `key check`: which backups open with the key.
pub fn key(cli: &Cli, config: &mut Config, cmd: &KeyCommand) -> Result<u8> {
    let services = CatalogServices::new();
    let catalog = services.catalog();
    match cmd {
        KeyCommand::Rotate { repo, new_key_file, new_key_secret } => {
            let current = pick_repo(config, Some(repo))?.clone();
            let new_key = new_key_file.clone().or_else(|| new_key_secret.clone()).expect("clap requires one");
            let cancel = cancel_on_interrupt()?;
            // Key files alone need no libvirt; a libvirt secret is read through it.
            let libvirt =
                !matches!((current.protection().key(), &new_key), (Some(KeySource::File(_)), KeySource::File(_)));
            let engine = if libvirt { Some(engine(cli)?) } else { None };
            let rotate = |repository: &BackupRepository| match (&engine, &new_key) {
                (Some(e), _) => e.rotate_key(repository, &new_key, &cancel),
                (None, KeySource::File(path)) => catalog.rotate_key(repository, path, &cancel),
                (None, KeySource::LibvirtSecret(_)) => unreachable!("a libvirt secret goes through libvirt"),
            };
            let first = rotate(&current)?;
            let p = current.protection();
            let switched = Protection::new(p.compression(), p.encryption(), Some(new_key.clone()))?;
            let r = config.repositories.iter_mut().find(|r| r.name().as_str() == repo).expect("picked above");
            *r = current.clone().with_protection(switched);
            config.save(&cli.config)?;
            // Files a backup wrote with the old key while the first pass ran.
            let second = rotate(&current)?;
            let rotated = first.rotated + second.rotated;
            if cli.json {
                return print_json(&serde_json::json!({
                    "repository": repo, "files": first.files.max(second.files), "rotated": rotated,
                    "already": first.already
                }))
                .map(|()| 0);
            }
            println!(
                "repository {repo}: {rotated} files rotated to {new_key} ({} already were); it uses the new key from now on",
                first.already
            );
            Ok(0)
        }
        KeyCommand::Check { repo, key_file, key_secret } => {
            let r = pick_repo(config, Some(repo))?;
            let given = key_file.clone().or_else(|| key_secret.clone());
            let report = match (&given, r.protection().key()) {
                (Some(KeySource::File(path)), _) => catalog.check_key(r, Some(path))?,
                (None, Some(KeySource::File(_)) | None) => catalog.check_key(r, None)?,
                _ => engine(cli)?.check_key(r, given.as_ref())?,
            };
            if cli.json {
                print_json(&report)?;
            } else {
                for b in &report.backups {
                    let said = match (b.encrypted, b.opens) {
                        (false, _) => "not encrypted".to_owned(),
                        (true, true) => "opens".to_owned(),
                        (true, false) => format!("does not open ({})", b.not_opening.join(", ")),
                    };
                    println!("{}  {said}", b.backup);
                }
            }
            Ok(if report.ok() { 0 } else { 1 })
        }
    }
}

pub fn repo(cli: &Cli, config: &mut Config, cmd: &RepoCommand) -> Result<u8> {
    match cmd {
        RepoCommand::Add { name, kind, address, options, fstype, zone, protection, max_parallel } => {
            let kind = RepositoryKind::from_parts(kind, fstype.as_deref())?;
            let r = BackupRepository::new(name, kind, address, options, zone.as_deref())?
                .with_protection(protection_of(&Protection::none(), protection)?);
            if config.repository(name).is_some() {
                return Err(Refused(format!("a repository named {name} exists already; remove it first")).into());
            }
            let shown = r.protection().to_string();
            config.repositories.push(r);
            if let Some(n) = max_parallel {
                config.repository_max_parallel.insert(name.clone(), *n);
            }
            config.save(&cli.config)?;
            println!("added repository {name} ({shown})");
        }
        RepoCommand::Set { name, protection, max_parallel } => {
            let current = pick_repo(config, Some(name))?.clone();
            let changed = protection_of(current.protection(), protection)?;
            let shown = changed.to_string();
            let r = config.repositories.iter_mut().find(|r| r.name().as_str() == name).expect("picked above");
            *r = current.with_protection(changed);
            if let Some(n) = max_parallel {
                config.repository_max_parallel.insert(name.clone(), *n);
            }
            config.save(&cli.config)?;
            println!("repository {name}: {shown}, for backups from now on (earlier backups keep theirs)");
            if let Some(n) = max_parallel {
                println!("repository {name}: at most {n} scheduled backups at once");
            }
        }
        RepoCommand::List => {
            let rows: Vec<_> = config.repositories.iter().map(BackupRepository::summary).collect();
            print_rows(cli.json, &rows, |r| format!("{}  {}  {}  {}", r.name, r.kind, r.address, r.options))?;
        }
        RepoCommand::Show { name } => {
            let r = pick_repo(config, Some(name))?;
            if cli.json {
                return print_json(&r.summary()).map(|()| 0);
            }
            let p = r.protection();
            println!(
                "name: {}\ntype: {}\naddress: {}\noptions: {}\nzone: {}\ncompression: {}\nencryption: {}\nkey: {}",
                r.name(),
                r.kind(),
                r.address(),
                r.mount_options(),
                r.zone().unwrap_or("-"),
                p.compression(),
                p.encryption(),
                p.key().map(ToString::to_string).unwrap_or_else(|| "-".into())
            );
            match config.repository_max_parallel.get(name.as_str()) {
                Some(n) => println!("max_parallel: {n} scheduled backups at once"),
                None => println!("max_parallel: - (the host's limit only)"),
            }
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
            config.repository_max_parallel.remove(name.as_str());
            config.save(&cli.config)?;
            println!("removed repository {name} (its backups were not touched)");
        }
        RepoCommand::Check { name } | RepoCommand::Stats { name } => {
            let r = pick_repo(config, Some(name))?;
            // Needs no libvirt: only the repository layer.
            let services = CatalogServices::new();
            let c = if matches!(cmd, RepoCommand::Check { .. }) {
                let c = services.catalog().check(r)?;
                if !cli.json {
                    println!("{name}: mount, write, read back, unmount: ok");
                }
                c
            } else {
                services.catalog().capacity(r)?
            };
            if cli.json {
                print_json(&c)?;
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

pub fn offering(cli: &Cli, config: &mut Config, cmd: &OfferingCommand) -> Result<u8> {
    match cmd {
        OfferingCommand::Add {
            name,
            repo,
            zone,
            quiesce,
            keep,
            full_every,
            boot_verify,
            boot_check,
            compression,
            encryption,
            copy_to,
        } => {
            config.add_offering(Offering {
                name: name.clone(),
                repository: repo.clone(),
                zone: zone.clone(),
                quiesce: *quiesce,
                keep: *keep,
                full_every: *full_every,
                boot_verify: *boot_verify,
                boot_check: boot_check.clone(),
                compression: *compression,
                encryption: *encryption,
                copy_to: copy_to.clone(),
            })?;
            config.save(&cli.config)?;
            println!("added offering {name}");
        }
        OfferingCommand::List => {
            print_rows(cli.json, &config.offering_summaries(), |o| {
                format!(
                    "{}  repo {}  quiesce {}  keep {}  full every {}{}  vms: {}",
                    o.name,
                    o.repository,
                    o.quiesce,
                    o.keep.as_deref().unwrap_or("everything"),
                    o.full_every,
                    if o.boot_verify { "  boot-verified" } else { "" },
                    o.vms.join(", ")
                )
            })?;
        }
        OfferingCommand::Remove { name } => {
            config.remove_offering(name)?;
            config.save(&cli.config)?;
            println!("removed offering {name}");
        }
    }
    Ok(0)
}

pub fn schedule(cli: &Cli, config: &mut Config, cmd: &ScheduleCommand) -> Result<u8> {
    match cmd {
        ScheduleCommand::Add { vm, every, at, tz, keep, quiesce } => {
            let parsed = At::parse(*every, at).map_err(|e| anyhow!(BackupError::Ambiguous { what: e }))?;
            parse_tz(tz).map_err(|e| anyhow!(BackupError::Ambiguous { what: e }))?;
            if config.offering_of(vm).is_none() {
                return Err(Refused(format!(
                    "{vm} has no offering; `nasbak assign {vm} OFFERING` first (the offering names the repository)"
                ))
                .into());
            }
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
            print_rows(cli.json, &config.schedule_summaries(&state), |s| {
                format!(
                    "{}  {}  {} at {} {}  keep {}  quiesce {}  last run {}{}",
                    s.id,
                    s.vm,
                    s.every,
                    s.at,
                    s.tz,
                    s.keep,
                    s.quiesce,
                    s.last_run
                        .map_or_else(|| "never".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                    s.last_outcome.as_ref().map(|o| format!(" ({o})")).unwrap_or_default()
                )
            })?;
        }
        ScheduleCommand::Remove { id } => {
            config.remove_schedule(id)?;
            config.save(&cli.config)?;
            println!("removed schedule {id}");
        }
    }
    Ok(0)
}
