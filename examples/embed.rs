//! Embedding nasbak: what an orchestration tool writes to back up and restore through the facade,
//! with its own progress printer and a cancel from a second thread.
//!
//! ```text
//! cargo run -p nasbak --example embed -- DOMAIN REPOSITORY_DIR RESTORED_FILE [--connect URI]
//! ```
//!
//! 1. backs DOMAIN up (running: push job; shut off: qemu-img) into a `shared` repository at
//!    REPOSITORY_DIR, printing one line per phase and disk every 25 %;
//! 2. starts a second backup and cancels it from another thread once its copy is under way,
//!    and measures how long the backup took to stop after the cancel;
//! 3. restores the first backup's first disk as a new qcow2 file RESTORED_FILE;
//! 4. verifies the first backup.
//!
//! The last line of stdout is one JSON object with what happened.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use nasbak::nasbak_libvirt::{CancelHandle, LibvirtHypervisor};
use nasbak::nasbak_qemu_img::{ImageLocation, QemuImg};
use nasbak::nasbak_repo::{BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter};
use nasbak::{BackupRequest, Engine, ErrorKind, Phase, Progress, VolumeRestoreRequest};
use serde_json::json;

/// The program's own progress printer: a line when a phase or disk starts and every 25 %.
#[derive(Default)]
struct Printer {
    current: Option<(Phase, Option<String>)>,
    quarter: u64,
}

impl Printer {
    fn show(&mut self, p: &Progress) {
        let key = (p.phase, p.disk.clone());
        if self.current.as_ref() != Some(&key) {
            self.current = Some(key);
            self.quarter = 0;
        }
        let quarter = (p.percent() / 25.0) as u64;
        if quarter >= self.quarter {
            eprintln!("{} {} {}: {:.0} %", p.vm, p.phase, p.disk.as_deref().unwrap_or("all disks"), p.percent());
            self.quarter = quarter + 1;
        }
    }
}

fn main() -> Result<()> {
    let mut positional = Vec::new();
    let mut flags = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.strip_prefix("--") {
            Some(flag) => {
                flags.insert(flag.to_owned(), args.next().with_context(|| format!("--{flag} needs a value"))?);
            }
            None => positional.push(a),
        }
    }
    let [domain, repository_dir, restored_file] = positional.as_slice() else {
        bail!("usage: embed DOMAIN REPOSITORY_DIR RESTORED_FILE [--connect URI]");
    };
    let uri = flags.get("connect").map_or(nasbak::nasbak_libvirt::DEFAULT_URI, String::as_str);

    // The services: libvirt (hypervisor and guest agents), qemu-img, the repository mounts.
    let runtime = PathBuf::from(format!("{repository_dir}.runtime"));
    let libvirt = LibvirtHypervisor::connect(uri)?;
    let mounts = RepositoryMounts::new(SystemMounter::new(&runtime), &runtime, MountTimeouts::default());
    let engine = Engine::new(libvirt.clone(), libvirt, QemuImg::new(&runtime), mounts);
    std::fs::create_dir_all(repository_dir)?;
    let repository = BackupRepository::new("embed", RepositoryKind::Shared, repository_dir, "", None)?;
    let request = BackupRequest::new(domain.as_str(), repository.clone());

    // 1. A backup with our own progress printer.
    let mut printer = Printer::default();
    let first = engine.backup(&request, &CancelHandle::new(), &mut |p| printer.show(p))?;
    eprintln!("backed up {} ({} disks)", first.id, first.manifest.disks.len());

    // 2. A second backup, cancelled from another thread as soon as its copy is under way.
    let cancel = CancelHandle::new();
    let trigger = cancel.clone();
    let (go, started) = mpsc::channel::<()>();
    let (done, cancelled) = mpsc::channel::<Instant>();
    let canceller = thread::spawn(move || {
        if started.recv().is_ok() {
            let at = Instant::now();
            trigger.cancel();
            let _ = done.send(at);
        }
    });
    let mut cancelled_at = None;
    let second = engine.backup(&request, &cancel, &mut |p| {
        if cancelled_at.is_none() && matches!(p.phase, Phase::Job | Phase::Convert) {
            let _ = go.send(());
            // Until the other thread has cancelled, so the cancel lands inside the copy.
            cancelled_at = cancelled.recv().ok();
        }
    });
    let stopped = Instant::now();
    drop(go);
    canceller.join().expect("the canceller thread");
    let latency_ms = match (&second, cancelled_at) {
        (Err(e), Some(at)) if e.kind() == ErrorKind::Cancelled => {
            let ms = stopped.duration_since(at).as_secs_f64() * 1000.0;
            eprintln!("the second backup stopped {ms:.1} ms after the cancel");
            ms
        }
        (Err(e), None) => bail!("the second backup ended before its copy began: {}", nasbak::chain(e)),
        (Err(e), _) => bail!("the cancelled backup failed otherwise: {}", nasbak::chain(e)),
        (Ok(b), _) => bail!("the cancelled backup completed as {}", b.id),
    };

    // 3. One disk of the first backup restored as a new volume.
    let disk = &first.manifest.disks[0];
    let to = ImageLocation::Path(PathBuf::from(restored_file));
    let volume =
        VolumeRestoreRequest::new(repository.clone(), domain.as_str(), first.manifest.id.as_str(), &disk.target, to);
    let mut printer = Printer::default();
    let restored = engine.restore_volume(&volume, &CancelHandle::new(), &mut |p| printer.show(p))?;
    eprintln!("restored {} to {}", restored.disk, restored.location);

    // 4. The first backup verified (the catalog needs no hypervisor).
    let report = engine
        .catalog()
        .verify(&repository, domain, &first.manifest.id, &CancelHandle::new(), &mut |p| printer.show(p))?;
    println!(
        "{}",
        json!({"backup": first, "cancelled": true, "cancel_latency_ms": latency_ms,
               "restored": restored, "verified": report})
    );
    Ok(())
}
