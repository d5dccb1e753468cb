//! Push backup of every backed-up disk of a running domain into OUTDIR, with guest-agent quiesce.
//! Progress goes to stderr; the last line of stdout is one JSON object describing the result.
//!
//! ```text
//! cargo run --example backup_running -- DOMAIN OUTDIR [--quiesce required|best-effort|off] [--connect URI]
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nasbak_agent::{GuestAgent, LibvirtAgentTransport, QuiescePolicy, quiesce};
use nasbak_libvirt::{
    CancelHandle, Domain, DomainState, Hypervisor, JobOptions, LibvirtHypervisor, PushBackup, check_versions,
    start_backup,
};
use nasbak_qemu_img::{ImageLocation, ImageTool, QemuImg};
use serde_json::json;

struct Args {
    domain: String,
    outdir: PathBuf,
    quiesce: QuiescePolicy,
    uri: String,
}

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let usage = "usage: backup_running DOMAIN OUTDIR [--quiesce required|best-effort|off] [--connect URI]";
    let (Some(domain), Some(outdir)) = (it.next(), it.next()) else { bail!(usage) };
    let mut a =
        Args { domain, outdir: outdir.into(), quiesce: QuiescePolicy::BestEffort, uri: "qemu:///system".into() };
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value; {usage}"))?;
        match flag.as_str() {
            "--quiesce" => a.quiesce = value.parse().map_err(anyhow::Error::msg)?,
            "--connect" => a.uri = value,
            _ => bail!("unknown option {flag}; {usage}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = args()?;
    let hv = LibvirtHypervisor::connect(&a.uri)?;
    check_versions(hv.versions()?)?;
    if hv.domain_state(&a.domain)? != DomainState::Running {
        bail!("{} is not running; use the backup_stopped example for a shut-off domain", a.domain);
    }
    let domain = Domain::parse(&hv.domain_xml(&a.domain)?)?;
    fs::create_dir_all(&a.outdir).with_context(|| format!("creating {}", a.outdir.display()))?;
    fs::set_permissions(&a.outdir, fs::Permissions::from_mode(0o755))?;
    let backup = PushBackup::for_domain(&domain, &a.outdir, |d| format!("{}.qcow2", d.target));
    for skipped in domain.backup_selection().1 {
        eprintln!("skipping {}: {}", skipped.target, skipped.reason);
    }
    let agent = GuestAgent::new(LibvirtAgentTransport::new(hv.lookup(&a.domain)?), Duration::from_secs(10));
    let (guard, outcome) = quiesce(&agent, a.quiesce, None)?;
    let started = start_backup(&hv, &a.domain, &backup);
    drop(guard); // thaw right after the job started, or failed to
    let job = started?;
    let summary = job.wait(JobOptions::default(), &CancelHandle::new(), &mut |p| {
        eprintln!("progress: {} / {} bytes", p.processed, p.total);
    })?;
    eprintln!("completed: {} bytes", summary.processed);
    let tool = QemuImg::new(std::env::temp_dir());
    let mut disks = Vec::new();
    for t in &backup.targets {
        let disk = domain.disk(&t.disk).expect("targets come from the domain");
        let info = tool.info(&ImageLocation::Path(t.file.clone()))?;
        disks.push(json!({
            "target": t.disk, "source": disk.source.as_ref().map(ToString::to_string).unwrap_or_default(), "file": t.file, "format": "qcow2",
            "virtual_size": info.first().map(|i| i.virtual_size),
        }));
    }
    println!(
        "{}",
        json!({"domain": a.domain, "quiesced": outcome.quiesced, "quiesce_note": outcome.note, "disks": disks})
    );
    Ok(())
}
