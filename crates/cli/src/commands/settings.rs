//! The configuration: `repo`, `offering`, `assign`/`unassign` and `schedule`.

use anyhow::{Result, anyhow};
use nasbak::BackupError;
use nasbak::nasbak_repo::{BackupRepository, RepositoryKind};
use nasbak_service::config::{Config, Offering, Refused, Schedule, ScheduleState};
use nasbak_service::schedule::{At, parse_tz};

use super::{CatalogServices, RUNTIME, pick_repo};
use crate::args::{Cli, OfferingCommand, RepoCommand, ScheduleCommand};
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

pub fn repo(cli: &Cli, config: &mut Config, cmd: &RepoCommand) -> Result<u8> {
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
            let rows: Vec<_> = config.repositories.iter().map(BackupRepository::summary).collect();
            print_rows(cli.json, &rows, |r| format!("{}  {}  {}  {}", r.name, r.kind, r.address, r.options))?;
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
        OfferingCommand::Add { name, repo, zone, quiesce, keep, full_every, boot_verify, boot_check } => {
            config.add_offering(Offering {
                name: name.clone(),
                repository: repo.clone(),
                zone: zone.clone(),
                quiesce: *quiesce,
                keep: *keep,
                full_every: *full_every,
                boot_verify: *boot_verify,
                boot_check: boot_check.clone(),
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
