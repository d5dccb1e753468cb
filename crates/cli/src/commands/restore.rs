//! `restore` and `restore-volume`.

use anyhow::Result;
use nasbak::config::Config;
use nasbak::nasbak_qemu_img::{ImageFormat, ImageLocation};
use nasbak::nasbak_repo::BackupRef;
use nasbak::{RestoreRequest, VolumeRestoreRequest};

use super::{cancel_on_interrupt, engine, repo_of};
use crate::args::Cli;
use crate::output::print_json;
use crate::progress::Reporter;

pub fn restore(cli: &Cli, config: &Config, id: &BackupRef, into: Option<&str>) -> Result<u8> {
    let r = repo_of(config, id)?;
    let mut request = RestoreRequest::new(r.clone(), id.vm.as_str(), id.id.to_string());
    if let Some(vm) = into {
        request = request.into_vm(vm);
    }
    let cancel = cancel_on_interrupt()?;
    let e = engine(&cli.uri)?;
    let mut reporter = Reporter::new(cli.json, &format!("restore {id}"));
    let outcome = e.restore(&request, &cancel, &mut |p| reporter.update(p));
    reporter.finish();
    let outcome = outcome?;
    if cli.json {
        print_json(&outcome)?;
    } else {
        for d in &outcome.restored {
            println!("restored {} -> {} ({})", d.target, d.location, d.format);
            if let Some(note) = &d.note {
                println!("  {note}");
            }
        }
    }
    Ok(0)
}

pub fn restore_volume(
    cli: &Cli,
    config: &Config,
    id: &BackupRef,
    disk: &str,
    to: &str,
    format: &str,
    attach: Option<&str>,
) -> Result<u8> {
    let r = repo_of(config, id)?;
    let format = format.parse::<ImageFormat>().unwrap_or_else(|never| match never {});
    let mut request =
        VolumeRestoreRequest::new(r.clone(), id.vm.as_str(), id.id.to_string(), disk, to.parse::<ImageLocation>()?)
            .with_format(format);
    if let Some(vm) = attach {
        request = request.attach_to(vm);
    }
    let cancel = cancel_on_interrupt()?;
    let e = engine(&cli.uri)?;
    let mut reporter = Reporter::new(cli.json, &format!("restore {disk} of {id}"));
    let restored = e.restore_volume(&request, &cancel, &mut |p| reporter.update(p));
    reporter.finish();
    let v = restored?;
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
