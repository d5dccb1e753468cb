//! `restore` (also `--instant`), `instant` and `restore-volume`.

use anyhow::Result;
use nasbak::nasbak_qemu_img::{ImageFormat, ImageLocation};
use nasbak::nasbak_repo::{BackupRef, BackupRepository, Protection};
use nasbak::objview::TargetView;
use nasbak_service::config::Config;
use std::time::Duration;

use nasbak::{
    BackupError, CopyState, DEFAULT_INSTANT_DIR, InstantFinished, InstantRestoreRequest, RestoreRequest,
    VolumeRestoreRequest,
};

use super::{LibvirtEngine, cancel_on_interrupt, engine, not_found, repo_of};
use crate::args::{Cli, InstantCommand};
use crate::output::print_json;
use crate::progress::Reporter;

/// Restoring backup `id` of `repository` into its own VM, or into `into`.
fn restore_request(repository: BackupRepository, id: &BackupRef, into: Option<&str>) -> RestoreRequest {
    let request = RestoreRequest::new(repository, id.vm.as_str(), id.id.to_string());
    match into {
        Some(vm) => request.into_vm(vm),
        None => request,
    }
}

/// Where a restore reads `id`: its repository, or with `from` a view of that target (kept
/// mounted while the returned view lives). A backup's key is its repository's, where one is
/// configured.
fn source(
    config: &Config,
    e: &LibvirtEngine,
    id: &BackupRef,
    from: Option<&str>,
) -> Result<(BackupRepository, Option<TargetView>)> {
    let Some(name) = from else { return Ok((repo_of(config, id)?.clone(), None)) };
    let target = config.target(name).ok_or_else(|| not_found(format!("target {name}")))?;
    let protection = match repo_of(config, id) {
        Ok(r) => r.protection().clone(),
        // Named but not configured: a mistake to say, not a key to go without.
        Err(e) if id.repository.is_some() => return Err(e),
        Err(_) => Protection::default(),
    };
    let view = e.target_view(target, id.vm.as_str())?;
    Ok((view.repository(protection), Some(view)))
}

/// A failed restore's error, with what the target said when a read from it failed.
fn with_target_failure(e: BackupError, view: Option<&TargetView>) -> anyhow::Error {
    match view.and_then(TargetView::failure) {
        Some(f) => anyhow::Error::from(e).context(format!("reading the backup from the target failed: {f}")),
        None => e.into(),
    }
}

pub fn restore(cli: &Cli, config: &Config, id: &BackupRef, into: Option<&str>, from: Option<&str>) -> Result<u8> {
    let cancel = cancel_on_interrupt()?;
    let e = engine(cli)?;
    let (repository, view) = source(config, &e, id, from)?;
    let request = restore_request(repository, id, into);
    let mut reporter = Reporter::new(cli.json, &format!("restore {id}"));
    let outcome = e.restore(&request, &cancel, &mut |p| reporter.update(p));
    reporter.finish();
    let outcome = outcome.map_err(|e| with_target_failure(e, view.as_ref()))?;
    if cli.json {
        print_json(&outcome)?;
    } else {
        for d in &outcome.restored {
            println!("restored {} -> {} ({})", d.target, d.location, d.format);
            if let Some(note) = &d.note {
                println!("  {note}");
            }
        }
        for s in &outcome.state {
            println!("restored the {} -> {}", s.kind, s.path);
        }
        for note in &outcome.notes {
            println!("  {note}");
        }
    }
    Ok(0)
}

pub fn restore_volume(
    cli: &Cli,
    config: &Config,
    id: &BackupRef,
    (disk, to, format): (&str, &str, Option<&str>),
    (attach, bandwidth, from): (Option<&str>, Option<u64>, Option<&str>),
) -> Result<u8> {
    let location = to.parse::<ImageLocation>()?;
    let cancel = cancel_on_interrupt()?;
    let e = engine(cli)?;
    let (repository, view) = source(config, &e, id, from)?;
    let mut request = VolumeRestoreRequest::new(repository, id.vm.as_str(), id.id.to_string(), disk, location);
    if let Some(format) = format {
        request = request.with_format(format.parse::<ImageFormat>().unwrap_or_else(|never| match never {}));
    }
    if let Some(vm) = attach {
        request = request.attach_to(vm);
    }
    if let Some(mib) = bandwidth {
        request = request.with_bandwidth(mib.saturating_mul(1 << 20));
    }
    let mut reporter = Reporter::new(cli.json, &format!("restore {disk} of {id}"));
    let restored = e.restore_volume(&request, &cancel, &mut |p| reporter.update(p));
    reporter.finish();
    let v = restored.map_err(|e| with_target_failure(e, view.as_ref()))?;
    if cli.json {
        print_json(&v)?;
    } else {
        println!("restored {disk} of {id} to {} ({})", v.location, v.format);
        if let Some(a) = &v.attached {
            println!("attached to {} as {}", a.vm, a.target);
        }
    }
    Ok(0)
}

pub fn instant(
    cli: &Cli,
    config: &Config,
    id: &BackupRef,
    into: Option<&str>,
    (detach, timeout, bandwidth): (bool, Duration, Option<u64>),
) -> Result<u8> {
    let request = restore_request(repo_of(config, id)?.clone(), id, into);
    let cancel = cancel_on_interrupt()?;
    let e = engine(cli)?;
    let started = std::time::Instant::now();
    let mut request = InstantRestoreRequest::new(request);
    if let Some(mib) = bandwidth {
        request = request.with_bandwidth(mib.saturating_mul(1 << 20));
    }
    let running = |state: &nasbak::InstantRestore| {
        if !cli.json {
            // Detached, a copy left to the finish has not begun.
            let copying = !detach || state.disks.iter().any(|d| !d.copy_at_finish);
            println!(
                "{} runs on its backup {} ({:.1} s){}",
                state.vm,
                state.backup,
                started.elapsed().as_secs_f64(),
                if copying { "; copying its disks" } else { "" }
            );
        }
    };
    if !detach {
        // Copied from the start (beside the volumes while the VM starts), then finished.
        let mut reporter = None;
        let mut vm = String::new();
        let finished = e.instant_restore_and_finish(
            &request,
            timeout,
            &cancel,
            &mut |state| {
                running(state);
                vm.clone_from(&state.vm);
            },
            &mut |p| {
                reporter
                    .get_or_insert_with(|| Reporter::new(cli.json, &format!("instant restore of {}", p.vm)))
                    .update(p)
            },
        );
        if let Some(r) = reporter {
            r.finish();
        }
        return report_finished(cli, &vm, finished);
    }
    let state = e.instant_restore(&request, &cancel)?;
    running(&state);
    let vm = state.vm.clone();
    let at_finish = state.disks.iter().any(|d| d.copy_at_finish);
    {
        if cli.json {
            print_json(&state)?;
        } else if at_finish {
            println!(
                "`nasbak instant finish {vm}` copies the backup onto its volumes, mirrors what the guest wrote meanwhile and switches {vm} to them"
            );
        } else {
            println!("the copies go on without nasbak: `nasbak instant list`, then `nasbak instant finish {vm}`");
        }
        Ok(0)
    }
}

fn finish(
    cli: &Cli,
    e: &super::LibvirtEngine,
    vm: &str,
    timeout: Duration,
    cancel: &nasbak::nasbak_libvirt::CancelHandle,
) -> Result<u8> {
    let mut reporter = Reporter::new(cli.json, &format!("instant restore of {vm}"));
    let finished = e.instant_finish(DEFAULT_INSTANT_DIR.as_ref(), vm, timeout, cancel, &mut |p| reporter.update(p));
    reporter.finish();
    report_finished(cli, vm, finished)
}

/// What a finish says: the volumes restored, or (cancelled) that the restore is in flight.
fn report_finished(cli: &Cli, vm: &str, finished: Result<InstantFinished, nasbak::BackupError>) -> Result<u8> {
    let done: InstantFinished = match finished {
        Err(err) if matches!(err.kind(), nasbak::ErrorKind::Cancelled) && !vm.is_empty() => {
            eprintln!("{vm} runs on (its restore in flight): `nasbak instant finish {vm}` completes the restore");
            return Err(err.into());
        }
        other => other?,
    };
    if cli.json {
        print_json(&done)?;
    } else {
        for d in &done.restored {
            println!("restored {} -> {} ({})", d.target, d.location, d.format);
        }
        println!("{vm} runs on its own volumes");
    }
    Ok(0)
}

pub fn instant_command(cli: &Cli, cmd: &InstantCommand) -> Result<u8> {
    let e = engine(cli)?;
    match cmd {
        InstantCommand::List => {
            let all = e.instant_restores(DEFAULT_INSTANT_DIR.as_ref())?;
            if cli.json {
                print_json(&all)?;
                return Ok(0);
            }
            for s in &all {
                let state = if s.running { "running" } else { "NOT RUNNING" };
                println!("{}  from {}  since {}  {state}", s.restore.vm, s.restore.backup, s.restore.started);
                for d in &s.disks {
                    let copy = match &d.state {
                        CopyState::Copying { done, total } => {
                            format!("copying {:.0} %", *done as f64 * 100.0 / (*total).max(1) as f64)
                        }
                        CopyState::Ready { .. } => "ready to finish".to_owned(),
                        CopyState::Pending => "runs on its backup; `nasbak instant finish` copies it".to_owned(),
                        CopyState::Gone => "NO COPY (cancel it, then restore again)".to_owned(),
                        CopyState::Unknown { error } => format!("UNKNOWN: {error}"),
                        _ => "unknown".to_owned(),
                    };
                    println!("  {}  {copy}", d.target);
                }
            }
            Ok(0)
        }
        InstantCommand::Finish { vm, timeout } => finish(cli, &e, vm, *timeout, &cancel_on_interrupt()?),
        InstantCommand::Cancel { vm } => {
            let c = e.instant_cancel(DEFAULT_INSTANT_DIR.as_ref(), vm)?;
            if cli.json {
                print_json(&c)?;
            } else {
                println!("{} stopped; its instant restore is undone", c.vm);
                for v in &c.partly_written {
                    println!("  {} is partly written: restore {} again", v.display(), c.vm);
                }
            }
            Ok(0)
        }
    }
}
