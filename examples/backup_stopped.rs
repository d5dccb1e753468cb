//! Backup of every backed-up disk of a shut-off domain into OUTDIR through qemu-img (parallel,
//! out-of-order conversion to qcow2). Progress goes to stderr; the last line of stdout is one
//! JSON object describing the result.
//!
//! ```text
//! cargo run --example backup_stopped -- DOMAIN OUTDIR [--connect URI]
//! ```

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use nasbak_libvirt::{DiskSource, Domain, DomainState, Hypervisor, LibvirtHypervisor};
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageLocation, ImageTool, QemuImg};
use serde_json::json;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (domain_name, outdir, uri) = match args.as_slice() {
        [d, o] => (d.clone(), PathBuf::from(o), "qemu:///system".to_owned()),
        [d, o, flag, uri] if flag == "--connect" => (d.clone(), PathBuf::from(o), uri.clone()),
        _ => bail!("usage: backup_stopped DOMAIN OUTDIR [--connect URI]"),
    };
    let hv = LibvirtHypervisor::connect(&uri)?;
    if hv.domain_state(&domain_name)? != DomainState::ShutOff {
        bail!("{domain_name} is not shut off; use the backup_running example for a running domain");
    }
    let domain = Domain::parse(&hv.domain_xml(&domain_name)?)?;
    fs::create_dir_all(&outdir).with_context(|| format!("creating {}", outdir.display()))?;
    let (chosen, skipped) = domain.backup_selection();
    for s in skipped {
        eprintln!("skipping {}: {}", s.target, s.reason);
    }
    let tool = QemuImg::new(std::env::temp_dir());
    let mut disks = Vec::new();
    for disk in chosen {
        let source = match &disk.source {
            Some(DiskSource::File(p) | DiskSource::Block(p)) => p.clone(),
            other => bail!("disk {} has a source this example cannot read: {other:?}", disk.target),
        };
        let file = outdir.join(format!("{}.qcow2", disk.target));
        let mut request = ConvertRequest::new(source.clone(), file.clone(), ImageFormat::Qcow2);
        request.source_format = disk.format.as_deref().map(|f| f.parse().unwrap_or_else(|never| match never {}));
        let target = disk.target.clone();
        tool.convert(&request, Arc::new(move |p| eprintln!("{target}: {p:.1}%")))?;
        let info = tool.info(&ImageLocation::Path(file.clone()))?;
        disks.push(json!({
            "target": disk.target, "source": source, "file": file, "format": "qcow2",
            "virtual_size": info.first().map(|i| i.virtual_size),
        }));
    }
    println!(
        "{}",
        json!({"domain": domain_name, "quiesced": false, "quiesce_note": "the domain is shut off", "disks": disks})
    );
    Ok(())
}
