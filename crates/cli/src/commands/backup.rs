//! `backup` and `run-due`.

use std::time::Duration;

use anyhow::Result;
use nasbak::chain::ModeRequest;
use nasbak::config::{Config, RunOutcome};
use nasbak::nasbak_agent::QuiescePolicy;
use nasbak::{BackupRequest, RunDue};

use super::{cancel_on_interrupt, engine};
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
    let p = nasbak::placement(config, vm, repo, offering, quiesce)?;
    let cancel = cancel_on_interrupt()?;
    let request = BackupRequest::new(vm, p.repository)
        .with_quiesce(p.quiesce)
        .with_timeout(timeout)
        .with_mode(mode)
        .with_full_every(p.full_every);
    let e = engine(&cli.uri)?;
    let mut reporter = Reporter::new(cli.json, &format!("backup {vm}"));
    let outcome = e.backup(&request, &cancel, &mut |p| reporter.update(p));
    reporter.finish();
    let outcome = outcome?;
    let m = &outcome.manifest;
    if cli.json {
        print_json(&outcome)?;
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
        for s in &outcome.skipped {
            println!("  skipped {}: {}", s.target, s.reason);
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

pub fn run_due(cli: &Cli, config: &Config) -> Result<u8> {
    let cancel = cancel_on_interrupt()?;
    let e = engine(&cli.uri)?;
    let mut reporter: Option<(String, Reporter)> = None;
    let outcome = e.run_due(config, &cli.state, &cancel, &mut |p| {
        let id = p.schedule.as_deref().unwrap_or_default();
        if reporter.as_ref().is_none_or(|(current, _)| current != id) {
            if let Some((_, r)) = reporter.take() {
                r.finish();
            }
            reporter = Some((id.to_owned(), Reporter::new(cli.json, &format!("schedule {id}"))));
        }
        if let Some((_, r)) = reporter.as_mut() {
            r.update(p);
        }
    });
    if let Some((_, r)) = reporter.take() {
        r.finish();
    }
    let outcome = outcome?;
    if cli.json {
        print_json(&outcome)?;
    }
    match outcome {
        RunDue::Busy(holder) => {
            if !cli.json {
                println!("another run-due is running ({holder}); nothing done");
            }
            Ok(0)
        }
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
                    }
                    for p in &r.pruned {
                        println!("{}: pruned {}/{p}", r.schedule, r.vm);
                    }
                    if let Some(e) = &r.prune_error {
                        println!("{}: prune of {} FAILED: {e}", r.schedule, r.vm);
                    }
                }
            }
            Ok(if runs.iter().any(nasbak::DueRun::failed) { 5 } else { 0 })
        }
    }
}
