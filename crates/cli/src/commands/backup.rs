//! `backup`, `run-due` and `verify --boot` (the commands that run a VM).

use std::time::Duration;

use anyhow::Result;
use nasbak::chain::ModeRequest;
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::{BackupRequest, BootResult, BootVerifyRequest};
use nasbak_service::RunDue;
use nasbak_service::config::{Config, RunOutcome};

use super::{backup_engine, cancel_on_interrupt, engine};
use crate::args::Cli;
use crate::output::print_json;
use crate::progress::Reporter;

pub fn backup(
    cli: &Cli,
    config: &Config,
    vm: &str,
    (offering, repo): (Option<&str>, Option<&str>),
    quiesce: Option<QuiescePolicy>,
    timeout: Duration,
    mode: ModeRequest,
) -> Result<u8> {
    let p = nasbak_service::placement(config, vm, repo, offering, quiesce)?;
    let cancel = cancel_on_interrupt()?;
    let request = BackupRequest::new(vm, p.repository.clone())
        .with_quiesce(p.quiesce)
        .with_timeout(timeout)
        .with_mode(mode)
        .with_full_every(p.full_every);
    let e = backup_engine(cli, config)?;
    let mut reporter = Reporter::new(cli.json, &format!("backup {vm}"));
    let outcome = e.backup(&request, &cancel, &mut |p| reporter.update(p));
    reporter.finish();
    let outcome = outcome?;
    let m = &outcome.manifest;
    // The offering's copy to its off-site target follows: its failure is the run's (exit 5),
    // the backup stays.
    let copied = p
        .copy_to
        .as_deref()
        .map(|target| nasbak_service::copy_offsite(&e, config, &p.repository, (vm, &m.id), target, &cancel));
    if cli.json {
        let mut shown = serde_json::to_value(&outcome)?;
        if let (Some(copied), Some(map)) = (&copied, shown.as_object_mut()) {
            map.insert(
                "copied".into(),
                match copied {
                    Ok(c) => serde_json::to_value(c)?,
                    Err(e) => serde_json::json!({ "error": e }),
                },
            );
        }
        print_json(&shown)?;
    } else {
        let chain = match &m.parent {
            Some(parent) => format!("incremental on {parent}"),
            None => "full".to_owned(),
        };
        println!("backed up {} as {} ({chain}, {} disk(s), quiesced: {})", m.vm, outcome.id, m.disks.len(), m.quiesced);
        if let Some(why) = &m.full_reason {
            println!("  full because {why}");
        }
        for d in m.disks.iter().filter(|d| d.full_reason.is_some()) {
            println!("  {} copied in full: {}", d.target, d.full_reason.as_deref().unwrap_or_default());
        }
        if let Some(note) = &m.quiesce_note {
            println!("  quiesce: {note}");
        }
        if !m.state.is_empty() {
            let kept: Vec<String> = m.state.iter().map(|s| format!("{} {}", s.kind, s.name)).collect();
            println!("  kept the VM's {}", kept.join(", "));
        }
        if let Some(note) = &m.state_note {
            println!("  VM state: {note}");
        }
        for s in &outcome.skipped {
            println!("  skipped {}: {}", s.target, s.reason);
        }
        for note in &outcome.cleaned {
            println!("  {note}");
        }
    }
    match &copied {
        Some(Ok(c)) if !cli.json => println!(
            "  copied to {}: {} ({} MiB sent)",
            c.target,
            if c.copied.is_empty() { "already there".to_owned() } else { c.copied.join(", ") },
            c.sent >> 20
        ),
        Some(Err(e)) => eprintln!("nasbak: WARNING: the copy to the offering's off-site target failed: {e}"),
        _ => {}
    }
    // The backup is complete, but the operator must act: say so, and exit 5.
    for w in &outcome.warnings {
        eprintln!("nasbak: WARNING: {w}");
    }
    Ok(if outcome.warnings.is_empty() && !matches!(copied, Some(Err(_))) { 0 } else { 5 })
}

pub fn run_due(cli: &Cli, config: &Config) -> Result<u8> {
    let cancel = cancel_on_interrupt()?;
    let e = backup_engine(cli, config)?;
    // Several backups run at once: one bar (or line of log) for each schedule running.
    let group = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let mut reporters: std::collections::BTreeMap<String, Reporter> = std::collections::BTreeMap::new();
    let outcome = nasbak_service::run_due(&e, config, &cli.state, &cancel, &mut |p| {
        let id = p.schedule.as_deref().unwrap_or_default();
        reporters
            .entry(id.to_owned())
            .or_insert_with(|| Reporter::in_group(&group, cli.json, &format!("schedule {id}")))
            .update(p);
    });
    for r in reporters.into_values() {
        r.finish();
    }
    // After a cancel nasbak exits at once: no repository is mounted to refresh the metrics.
    if !cancel.is_cancelled() {
        let ran = match &outcome {
            Ok(RunDue::Ran(runs)) => runs.iter().any(|r| !matches!(r.outcome, RunOutcome::Skipped(_))),
            Err(_) => true,
        };
        super::catalog::refresh_metrics(config, &cli.state, ran);
    }
    let outcome = outcome?;
    if cli.json {
        print_json(&outcome)?;
    }
    match outcome {
        RunDue::Ran(runs) => {
            if !cli.json {
                if runs.is_empty() {
                    println!("nothing is due");
                }
                for r in &runs {
                    match &r.outcome {
                        RunOutcome::Succeeded(id) => println!("{}: backed up {} as {id}", r.schedule, r.vm),
                        RunOutcome::Failed(e) => println!("{}: backup of {} FAILED: {e}", r.schedule, r.vm),
                        RunOutcome::Cancelled => println!("{}: backup of {} cancelled", r.schedule, r.vm),
                        RunOutcome::Skipped(why) => println!("{}: skipped: {why}", r.schedule),
                    }
                    for p in &r.pruned {
                        println!("{}: pruned {}/{p}", r.schedule, r.vm);
                    }
                    if let Some(e) = &r.prune_error {
                        println!("{}: prune of {} FAILED: {e}", r.schedule, r.vm);
                    }
                    match &r.boot_verified {
                        Some(Ok(v)) => {
                            println!("{}: boot verification of {}: {:?}: {}", r.schedule, r.vm, v.result, v.detail)
                        }
                        Some(Err(e)) => println!("{}: boot verification of {} could not run: {e}", r.schedule, r.vm),
                        None => {}
                    }
                    match &r.copied {
                        Some(Ok(c)) => println!(
                            "{}: copied to {}: {} ({} MiB sent)",
                            r.schedule,
                            c.target,
                            if c.copied.is_empty() { "already there".to_owned() } else { c.copied.join(", ") },
                            c.sent >> 20
                        ),
                        Some(Err(e)) => println!("{}: copy of {} to its target FAILED: {e}", r.schedule, r.vm),
                        None => {}
                    }
                }
            }
            Ok(if runs.iter().any(nasbak_service::DueRun::failed) { 5 } else { 0 })
        }
    }
}

/// `verify --boot`: needs libvirt, unlike the other verify.
pub fn verify_boot(
    cli: &Cli,
    config: &Config,
    id: &nasbak::nasbak_repo::BackupRef,
    timeout: Duration,
    check: Option<&str>,
) -> Result<u8> {
    let r = super::repo_of(config, id)?;
    let mut request = BootVerifyRequest::new(r.clone(), id.vm.as_str(), id.id.to_string()).with_timeout(timeout);
    if let Some(c) = check {
        request = request.with_check(c);
    }
    let cancel = cancel_on_interrupt()?;
    let e = engine(cli)?;
    let v = e.verify_boot(&request, &cancel)?;
    if cli.json {
        print_json(&v)?;
    } else {
        let word = match v.result {
            BootResult::Passed => "BOOTS",
            BootResult::Failed => "DOES NOT BOOT",
            _ => "UNVERIFIABLE",
        };
        println!("{word}  {}  {} ({:.1} s)", v.backup, v.detail, v.millis as f64 / 1000.0);
        for line in &v.console {
            println!("  console: {line}");
        }
    }
    Ok(match v.result {
        BootResult::Passed => 0,
        BootResult::Failed => 5,
        _ => 4,
    })
}
