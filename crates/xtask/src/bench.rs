//! `cargo xtask bench`: nasbak against the tools an operator would otherwise use, side by side
//! in one run on this machine, best of 3 (see docs/performance.md for the figures).
//!
//! A lab VM gets a 2 GiB qcow2 disk holding 1 GiB of pseudo-random data; backups go to a local
//! (`shared`) repository. Compared:
//! - running-VM backup: `nasbak backup` (checksums included) against the bare libvirt push job
//!   driven by `virsh backup-begin` and 50 ms polling of `virsh domjobinfo --completed`, and
//!   `virtnbdbackup -l copy` where it is installed;
//! - stopped-VM backup: `nasbak backup` against `qemu-img convert -O qcow2`;
//! - incremental backup of the running VM after it changed 20 MiB (1%): `nasbak backup --mode
//!   incremental` against nasbak's full backup, the bare libvirt incremental push job from a
//!   checkpoint, and `virtnbdbackup -l inc` where it is installed; the bytes the incremental
//!   wrote; the synthetic-full merge (`nasbak prune` with keep last=1) against a new full;
//! - restore: `nasbak restore` against `rsync -az` of the qcow2 and `cp --sparse=always`;
//! - the ways to restore, on this disk and on an 8 GiB disk holding 4 GiB of pseudo-random data
//!   (to show what grows with size): the full restore, the instant restore's time until the VM
//!   runs (`restore --instant --detach`) and its total (then `instant finish`), and the time to a
//!   mounted backup (`nasbak mount`);
//! - the peak RSS of the nasbak process (its own VmHWM, not qemu-img's);
//! - compressed and encrypted repositories (docs/encryption.md), on a 2 GiB disk holding 512 MiB
//!   of random data and 512 MiB of this host's `/usr` files: full backups of the running VM to a
//!   plain, a zstd, a LUKS and a zstd-in-LUKS repository (time, size against `qemu-img convert -c
//!   -o compression_type=zstd`), restore-volume from each, an encrypted incremental after 1%
//!   changed, and `key rotate` of a repository holding 20 encrypted backups;
//! - `cargo xtask bench chain`: every way to restore, from the end of a chain of ten incrementals
//!   (20 MiB changed each) against from its full: restore, instant restore, mount, boot
//!   verification.
//! - `cargo xtask bench rbd`: a running VM whose disk is an RBD image on the lab cluster, 2 GiB
//!   holding 1 GiB of pseudo-random data: the incremental backup after 1% of the image
//!   changed (20 scattered MiB, written through the guest's device) against a full, the bytes it
//!   wrote against those changed, and the whole-VM restore onto the image from that incremental
//!   against from the full.
//! - `cargo xtask bench night`: eight running VMs (1 GiB qcow2 disks holding 512 MiB of
//!   pseudo-random data each) due at once: `nasbak run-due` with the host's default limit (two
//!   per core) and with two at once, against the same run with `max_parallel = 1` (one after
//!   another); every backup full, all listed and verified after each run.
//!
//! - `cargo xtask bench big`: a 100 GiB disk holding 2 GiB of pseudo-random data against a
//!   2 GiB disk holding the same: full and incremental backups, restore, instant restore.
//! - `cargo xtask bench latency` (`latency.rs`): a guest's write latency during a backup to a
//!   repository behind a link shaped to 20 MiB/s, with and without scratch storage.
//!
//! Every run starts from a cold page cache and ends with its data on the disk (`sync`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::exec::{cargo, cmd};
use crate::lab::{STATE, URI};

const DOMAIN: &str = "nasbak-bench";

/// One timed run: wall time and, for nasbak, the process's peak RSS in KiB.
struct Run {
    secs: f64,
    peak_rss_kib: u64,
}

/// Writes dirty pages out and drops the page cache, so every run reads its source from the disk
/// as a backup of a VM that is not in the host's cache does.
fn cold_cache() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")?;
    Ok(())
}

/// Runs a command to completion from a cold cache, sampling its own VmHWM every 20 ms. The
/// time includes writing its output to the disk (`sync` at the end), as it would on a NAS.
fn timed(program: &str, args: &[&str]) -> Result<Run> {
    cold_cache()?;
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let deadline = start + Duration::from_secs(1800);
    let status = loop {
        if let Ok(text) = fs::read_to_string(&status_path)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{program} {} took more than 30 minutes", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    nix::unistd::sync();
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("{program} {} failed ({status}): {err}", args.join(" "));
    }
    Ok(Run { secs, peak_rss_kib: peak })
}

fn virsh(args: &[&str]) -> Result<String> {
    let mut all = vec!["-c", URI];
    all.extend_from_slice(args);
    Ok(cmd("virsh").args(&all).run()?.stdout_text())
}

/// The bare push job as a script would drive it: backup-begin, then 50 ms polling.
fn virsh_push(xml: &Path) -> Result<f64> {
    let _ = virsh(&["domjobinfo", DOMAIN, "--completed"]); // drop stats of an earlier job
    cold_cache()?;
    let start = Instant::now();
    virsh(&["backup-begin", DOMAIN, xml.to_str().context("utf-8")?])?;
    loop {
        let info = virsh(&["domjobinfo", DOMAIN, "--completed"]).unwrap_or_default();
        if info.contains("Completed") {
            nix::unistd::sync();
            return Ok(start.elapsed().as_secs_f64());
        }
        if info.contains("Failed") || info.contains("Cancelled") {
            bail!("the push job failed: {info}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ways to restore one backup, each round from a cold cache.
#[derive(Default)]
struct RestoreModes {
    full: Vec<f64>,
    to_running: Vec<f64>,
    instant_total: Vec<f64>,
    mount: Vec<f64>,
    /// MiB the guest wrote during each instant restore's finish.
    guest_mib: Vec<u64>,
}

/// Writes 4 MiB every 100 ms (about 40 MiB/s) into the running VM's disk through its own
/// device (HMP `qemu-io`, as the guest would), until `stop`: the guest at work during an
/// instant restore. Returns the MiB written.
fn guest_writer(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut written = 0;
        let mut at = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let info = virsh(&["qemu-monitor-command", DOMAIN, "--hmp", "info block"]).unwrap_or_default();
            if let Some(device) = info.lines().find_map(|l| l.trim().strip_prefix("Attached to:")).map(str::trim) {
                let command = format!("qemu-io -d {device} \"write -P 0x5a {}M 4M\"", 64 + at % 1900);
                if virsh(&["qemu-monitor-command", DOMAIN, "--hmp", &command]).is_ok_and(|o| o.trim().is_empty()) {
                    written += 4;
                }
            }
            at += 68;
            std::thread::sleep(Duration::from_millis(100));
        }
        written
    })
}

fn restore_modes(nasbak: &str, config: &str, id: &str, dir: &Path, rounds: usize) -> Result<RestoreModes> {
    let mut m = RestoreModes::default();
    let mnt = dir.join("mnt").to_string_lossy().into_owned();
    for round in 1..=rounds {
        m.full.push(timed(nasbak, &["--config", config, "restore", id])?.secs);
        // `restore --instant`: the time until it says the VM runs, then (the guest writing all
        // along, as a guest at work does) until it has switched the VM to its volumes.
        cold_cache()?;
        let start = Instant::now();
        let mut child = Command::new(nasbak)
            .args(["--config", config, "restore", id, "--instant"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("restore --instant")?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().context("stdout")?));
        let first = lines.next().transpose()?.unwrap_or_default();
        if !first.contains("runs on its backup") {
            let _ = child.kill();
            bail!("restore --instant said {first:?}");
        }
        m.to_running.push(start.elapsed().as_secs_f64());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = guest_writer(stop.clone());
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait()?;
        nix::unistd::sync();
        m.instant_total.push(start.elapsed().as_secs_f64());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mib = writer.join().map_err(|_| anyhow::anyhow!("the guest writer panicked"))?;
        if !status.success() {
            bail!("restore --instant failed ({status}): {}", rest.join("; "));
        }
        m.guest_mib.push(mib);
        virsh(&["destroy", DOMAIN])?;
        cold_cache()?;
        let start = Instant::now();
        cmd(nasbak).args(["--config", config, "mount", id, &mnt]).run()?;
        m.mount.push(start.elapsed().as_secs_f64());
        cmd(nasbak).args(["--config", config, "umount", &mnt]).run()?;
        println!(
            "bench: ways to restore, round {round}: full {:.2} s, instant running after {:.2} s and done after {:.2} s (the guest wrote {} MiB meanwhile), mounted after {:.2} s",
            m.full[round - 1],
            m.to_running[round - 1],
            m.instant_total[round - 1],
            m.guest_mib[round - 1],
            m.mount[round - 1]
        );
    }
    Ok(m)
}

/// A raw file of `size_mib` holding `data_mib` of pseudo-random data, converted to the qcow2
/// file `qcow2`.
fn make_disk(dir: &Path, qcow2: &Path, size_mib: u64, data_mib: usize) -> Result<()> {
    let raw = dir.join("disk.raw");
    fs::File::create(&raw)?.set_len(size_mib << 20)?;
    nasbak_testlab::fill_pseudo_random(&raw, data_mib);
    cmd("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(qcow2)
        .timeout(Duration::from_secs(3600))
        .run()?;
    fs::remove_file(&raw)?;
    Ok(())
}

fn domain_xml(dir: &Path, disk: &Path) -> Result<()> {
    let guest = fs::read_to_string(Path::new(STATE).join("guest.conf"))?;
    let get = |k: &str| guest.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_default().to_owned();
    fs::write(
        dir.join("domain.xml"),
        format!(
            "<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0</cmdline></os>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='vda' bus='virtio'/></disk>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='pty'/><console type='pty'/><memballoon model='none'/></devices></domain>",
            get("kernel"),
            get("initrd"),
            disk.display()
        ),
    )?;
    virsh(&["define", &dir.join("domain.xml").to_string_lossy()])?;
    Ok(())
}

fn best(runs: &[Run]) -> (f64, u64) {
    let secs = runs.iter().map(|r| r.secs).fold(f64::INFINITY, f64::min);
    (secs, runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0))
}

/// The lowest and highest of `v`, as `lo-hi s`.
fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{lo:.2}-{hi:.2} s")
}

fn best_secs(secs: &[f64]) -> f64 {
    secs.iter().copied().fold(f64::INFINITY, f64::min)
}

fn backup_id(config: &str, nasbak: &str) -> Result<String> {
    let out = cmd(nasbak).args(["--config", config, "--json", "list"]).run()?.stdout_text();
    // The last one listed is the newest.
    let list: serde_json::Value = serde_json::from_str(&out).context("nasbak list --json")?;
    let id =
        list.as_array().and_then(|l| l.last()).and_then(|b| b["id"].as_str()).context("a backup in nasbak list")?;
    Ok(id.to_owned())
}

/// How much the guest changes between a full and an incremental: 1% of the 2 GiB disk.
const CHANGED_MIB: u64 = 20;

/// The incremental rounds' figures.
struct Incremental {
    full: Vec<f64>,
    incremental: Vec<f64>,
    bare: Vec<f64>,
    merge: Vec<f64>,
    vnb: Vec<f64>,
    /// The incremental file's size, each round.
    written: Vec<u64>,
    peak_rss_kib: u64,
}

/// Writes `CHANGED_MIB` MiB of `pattern` at `offset_mib` of the running VM's disk through QEMU's
/// block layer (HMP `qemu-io`), as the guest would: the dirty bitmaps record it.
fn change_in_guest(pattern: u8, offset_mib: u64) -> Result<()> {
    let info = virsh(&["qemu-monitor-command", DOMAIN, "--hmp", "info block"])?;
    // The guest's own device (a second user of the node would be refused write access).
    let device = info
        .lines()
        .skip_while(|l| !l.contains("disk.qcow2"))
        .find_map(|l| l.trim().strip_prefix("Attached to:"))
        .context("the disk's device")?
        .trim()
        .to_owned();
    let command = format!("qemu-io -d {device} \"write -P {pattern:#x} {offset_mib}M {CHANGED_MIB}M\"");
    let out = virsh(&["qemu-monitor-command", DOMAIN, "--hmp", &command])?;
    if !out.trim().is_empty() {
        bail!("{command}: {out}");
    }
    Ok(())
}

/// Each round: a full backup, a checkpoint for the bare job (and virtnbdbackup's full where it
/// is installed), `CHANGED_MIB` MiB changed, then the incremental three ways (nasbak, the bare
/// libvirt push job from the checkpoint, virtnbdbackup), then prune merging the incremental over
/// the full (keep last=1).
fn incremental_rounds(nasbak: &str, config: &str, dir: &Path, vm_dir: &Path, rounds: usize) -> Result<Incremental> {
    let mut r = Incremental {
        full: Vec::new(),
        incremental: Vec::new(),
        bare: Vec::new(),
        merge: Vec::new(),
        vnb: Vec::new(),
        written: Vec::new(),
        peak_rss_kib: 0,
    };
    let has_vnb = crate::lab::packages::which("virtnbdbackup").is_some();
    cmd(nasbak)
        .args(["--config", config, "offering", "add", "bench-inc", "--repo", "bench", "--keep", "last=1"])
        .run()?;
    cmd(nasbak).args(["--config", config, "assign", DOMAIN, "bench-inc"]).run()?;
    let backup = |mode: &'static str| ["--config", config, "backup", DOMAIN, "--quiesce", "off", "--mode", mode];
    for round in 1..=rounds {
        if vm_dir.exists() {
            fs::remove_dir_all(vm_dir)?;
        }
        let full = timed(nasbak, &backup("full"))?;
        println!("bench: incremental, round {round}: full backup {:.2} s", full.secs);
        let _ = virsh(&["checkpoint-delete", DOMAIN, "bench-cp"]);
        virsh(&["checkpoint-create-as", DOMAIN, "bench-cp"])?;
        change_in_guest(0x40 + round as u8, 100 + 150 * round as u64)?;
        let inc = timed(nasbak, &backup("incremental"))?;
        println!("bench: incremental, round {round}: nasbak incremental {:.2} s", inc.secs);
        let id = backup_id(config, nasbak)?;
        let inc_dir = vm_dir.join(id.rsplit('/').next().context("id")?);
        let manifest = fs::read_to_string(inc_dir.join("manifest.json"))?;
        let mode = serde_json::from_str::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|m| m["mode"].as_str().map(str::to_owned));
        if mode.as_deref() != Some("incremental") {
            bail!("the incremental round {round} made no incremental backup: {manifest}");
        }
        let file = fs::read_dir(&inc_dir)?
            .flatten()
            .map(|e| e.path())
            .find(|f| f.extension().is_some_and(|x| x == "qcow2"))
            .context("the incremental's qcow2")?;
        r.written.push(fs::metadata(&file)?.len());
        let target = dir.join(format!("bare-inc-{round}.qcow2"));
        let xml = dir.join("backup-inc.xml");
        fs::write(
            &xml,
            format!(
                "<domainbackup mode='push'><incremental>bench-cp</incremental><disks><disk name='vda' backup='yes' type='file'>\
                 <driver type='qcow2'/><target file='{}'/></disk></disks></domainbackup>",
                target.display()
            ),
        )?;
        let bare = virsh_push(&xml)?;
        println!("bench: incremental, round {round}: bare incremental push job {bare:.2} s");
        fs::remove_file(&target)?;
        virsh(&["checkpoint-delete", DOMAIN, "bench-cp"])?;
        let merge = timed(nasbak, &["--config", config, "prune", DOMAIN])?;
        println!("bench: incremental, round {round}: prune merging the incremental {:.2} s", merge.secs);
        // virtnbdbackup refuses checkpoints it did not create: its own full, the same amount
        // changed, its incremental, then its checkpoints removed.
        if has_vnb {
            let vnb_dir = dir.join(format!("vnb-inc-{round}"));
            let _ = fs::remove_dir_all(&vnb_dir);
            timed("virtnbdbackup", &["-d", DOMAIN, "-l", "full", "-o", &vnb_dir.to_string_lossy()])?;
            change_in_guest(0x80 + round as u8, 1000 + 150 * round as u64)?;
            let t = timed("virtnbdbackup", &["-d", DOMAIN, "-l", "inc", "-o", &vnb_dir.to_string_lossy()])?;
            println!("bench: incremental, round {round}: virtnbdbackup incremental {:.2} s", t.secs);
            r.vnb.push(t.secs);
            fs::remove_dir_all(&vnb_dir)?;
            let mut theirs: Vec<String> = virsh(&["checkpoint-list", DOMAIN, "--name"])?
                .lines()
                .filter(|l| l.starts_with("virtnbdbackup"))
                .map(str::to_owned)
                .collect();
            theirs.sort();
            for c in theirs.iter().rev() {
                virsh(&["checkpoint-delete", DOMAIN, c])?;
            }
        }
        r.peak_rss_kib = r.peak_rss_kib.max(full.peak_rss_kib).max(inc.peak_rss_kib).max(merge.peak_rss_kib);
        r.full.push(full.secs);
        r.incremental.push(inc.secs);
        r.bare.push(bare);
        r.merge.push(merge.secs);
    }
    Ok(r)
}

/// `cargo xtask bench [ROUNDS]`: best of `rounds` (3 by default).
pub fn bench(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    crate::lab::packages::ensure_extra(&["rsync"])?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench");
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("repo"))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    println!("bench: a 2 GiB qcow2 disk holding 1 GiB of pseudo-random data");
    make_disk(&dir, &dir.join("disk.qcow2"), 2048, 1024)?;
    domain_xml(&dir, &dir.join("disk.qcow2"))?;
    let config = p("nasbak.toml");
    cmd(&nasbak)
        .args(["--config", &config, "repo", "add", "bench", "--type", "shared", "--address", &p("repo")])
        .run()?;
    let vm_dir = dir.join("repo").join(DOMAIN);
    let clear_backups = || -> Result<()> {
        if vm_dir.exists() {
            fs::remove_dir_all(&vm_dir)?;
        }
        Ok(())
    };
    let backup_args = ["--config", config.as_str(), "backup", DOMAIN, "--quiesce", "off", "--mode", "full"];

    // Running VM.
    virsh(&["start", DOMAIN])?;
    let mut nasbak_running = Vec::new();
    let mut virsh_running = Vec::new();
    let mut vnb = Vec::new();
    let has_vnb = crate::lab::packages::which("virtnbdbackup").is_some();
    for round in 1..=rounds {
        clear_backups()?;
        let r = timed(&nasbak, &backup_args)?;
        println!("bench: running-VM backup, round {round}: nasbak {:.2} s", r.secs);
        nasbak_running.push(r);
        let target = dir.join(format!("virsh-{round}.qcow2"));
        let xml = dir.join("backup.xml");
        fs::write(
            &xml,
            format!(
                "<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'>\
                 <driver type='qcow2'/><target file='{}'/></disk></disks></domainbackup>",
                target.display()
            ),
        )?;
        let s = virsh_push(&xml)?;
        println!("bench: running-VM backup, round {round}: virsh push job {s:.2} s");
        virsh_running.push(s);
        fs::remove_file(&target)?;
        if has_vnb {
            let out = dir.join(format!("vnb-{round}"));
            let r = timed("virtnbdbackup", &["-d", DOMAIN, "-l", "copy", "-o", &out.to_string_lossy()])?;
            println!("bench: running-VM backup, round {round}: virtnbdbackup {:.2} s", r.secs);
            vnb.push(r.secs);
            fs::remove_dir_all(&out)?;
        }
    }
    let inc = incremental_rounds(&nasbak, &config, &dir, &vm_dir, rounds)?;
    virsh(&["destroy", DOMAIN])?;

    // Stopped VM.
    let mut nasbak_stopped = Vec::new();
    let mut convert = Vec::new();
    for round in 1..=rounds {
        clear_backups()?;
        let r = timed(&nasbak, &backup_args)?;
        println!("bench: stopped-VM backup, round {round}: nasbak {:.2} s", r.secs);
        nasbak_stopped.push(r);
        let out = p("convert.qcow2");
        let r = timed("qemu-img", &["convert", "-O", "qcow2", &p("disk.qcow2"), &out])?;
        println!("bench: stopped-VM backup, round {round}: qemu-img convert {:.2} s", r.secs);
        convert.push(r.secs);
        fs::remove_file(&out)?;
    }

    // Restore of the last backup, against copying its qcow2 file.
    let id = backup_id(&config, &nasbak)?;
    let backup_dir = vm_dir.join(id.rsplit('/').next().context("id")?);
    let backup_file = fs::read_dir(&backup_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|f| f.extension().is_some_and(|x| x == "qcow2"))
        .context("the backup's qcow2")?;
    let backup_file = backup_file.to_string_lossy().into_owned();
    let mut nasbak_restore = Vec::new();
    let mut rsync = Vec::new();
    let mut cp = Vec::new();
    for round in 1..=rounds {
        let r = timed(&nasbak, &["--config", &config, "restore", &id])?;
        println!("bench: restore, round {round}: nasbak {:.2} s", r.secs);
        nasbak_restore.push(r);
        let target = p("copy.qcow2");
        let _ = fs::remove_file(&target);
        let r = timed("rsync", &["-az", &backup_file, &target])?;
        println!("bench: restore, round {round}: rsync -az {:.2} s", r.secs);
        rsync.push(r.secs);
        fs::remove_file(&target)?;
        let r = timed("cp", &["--sparse=always", &backup_file, &target])?;
        println!("bench: restore, round {round}: cp --sparse=always {:.2} s", r.secs);
        cp.push(r.secs);
        fs::remove_file(&target)?;
    }
    let modes2 = restore_modes(&nasbak, &config, &id, &dir, rounds)?;
    // The same on an 8 GiB disk holding 4 GiB.
    println!("bench: an 8 GiB qcow2 disk holding 4 GiB of pseudo-random data");
    clear_backups()?;
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    fs::remove_file(dir.join("disk.qcow2"))?;
    make_disk(&dir, &dir.join("disk8.qcow2"), 8192, 4096)?;
    domain_xml(&dir, &dir.join("disk8.qcow2"))?;
    cmd(&nasbak).args(backup_args).timeout(Duration::from_secs(3600)).run()?;
    let id8 = backup_id(&config, &nasbak)?;
    let modes8 = restore_modes(&nasbak, &config, &id8, &dir, rounds)?;
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);

    let (nr, nr_rss) = best(&nasbak_running);
    let (ns, ns_rss) = best(&nasbak_stopped);
    let (nre, nre_rss) = best(&nasbak_restore);
    let cpu = fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let versions = virsh(&["version"])?
        .lines()
        .filter(|l| l.contains("library") || l.contains("hypervisor"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    println!();
    println!("bench: {cpu}, {} cores; {versions}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!("bench: best of {rounds}, 2 GiB qcow2 disk holding 1 GiB of pseudo-random data, local repository");
    println!("| operation | nasbak | peer | nasbak / peer | target |");
    println!("|---|---|---|---|---|");
    let row = |op: &str, n: f64, peer: &str, s: f64, target: &str| {
        println!("| {op} | {n:.2} s | {peer} {s:.2} s | {:.2}x | {target} |", n / s);
    };
    row("running-VM backup", nr, "virsh backup-begin + 50 ms polling", best_secs(&virsh_running), "<= 1.10x");
    if has_vnb {
        row("running-VM backup", nr, "virtnbdbackup -l copy", best_secs(&vnb), "(comparison)");
    } else {
        println!("| running-VM backup | {nr:.2} s | virtnbdbackup: not installed | - | (comparison) |");
    }
    row("stopped-VM backup", ns, "qemu-img convert -O qcow2", best_secs(&convert), "<= 0.65x");
    row("restore", nre, "rsync -az", best_secs(&rsync), "<= 0.2x");
    row("restore", nre, "cp --sparse=always", best_secs(&cp), "<= 1.3x");
    let changed = CHANGED_MIB as f64;
    let (full, incr, bare, merge) =
        (best_secs(&inc.full), best_secs(&inc.incremental), best_secs(&inc.bare), best_secs(&inc.merge));
    let written = inc.written.iter().copied().min().unwrap_or(0) as f64 / f64::from(1 << 20);
    row(&format!("incremental backup, {CHANGED_MIB} MiB changed"), incr, "full backup (nasbak)", full, "<= 0.25x");
    row(&format!("incremental backup, {CHANGED_MIB} MiB changed"), incr, "bare incremental push job", bare, "<= 1.2x");
    println!(
        "| incremental file written | {written:.1} MiB | changed {changed:.0} MiB | {:.2}x | <= 2x |",
        written / changed
    );
    row("synthetic-full merge (prune)", merge, "new full backup (nasbak)", full, "(comparison)");
    println!(
        "bench: ranges over {rounds} rounds: full {}, incremental {}, bare incremental job {}, merge {}",
        range(&inc.full),
        range(&inc.incremental),
        range(&inc.bare),
        range(&inc.merge)
    );
    if has_vnb {
        println!("bench: virtnbdbackup incremental (same change): best {:.2} s", best_secs(&inc.vnb));
    }
    for (size, m) in [("2 GiB disk, 1 GiB data", &modes2), ("8 GiB disk, 4 GiB data", &modes8)] {
        let full = best_secs(&m.full);
        row(
            &format!("instant restore: VM running ({size})"),
            best_secs(&m.to_running),
            "full restore",
            full,
            "<= 0.25x",
        );
        row(&format!("instant restore: done ({size})"), best_secs(&m.instant_total), "full restore", full, "<= 1.2x");
        row(&format!("backup mounted ({size})"), best_secs(&m.mount), "full restore", full, "(comparison)");
        println!(
            "bench: ranges over {rounds} rounds ({size}): full restore {}, instant running {}, instant done {}, mounted {}",
            range(&m.full),
            range(&m.to_running),
            range(&m.instant_total),
            range(&m.mount)
        );
    }
    let rss = nr_rss.max(ns_rss).max(nre_rss).max(inc.peak_rss_kib);
    println!("| peak RSS of nasbak | {:.1} MiB | | | <= 30 MiB |", rss as f64 / 1024.0);
    protected_rounds(&nasbak, rounds)
}

/// `cargo xtask bench protected`: only the compressed and encrypted repositories' part.
pub fn protected(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    protected_rounds(&nasbak, rounds)
}

/// The repositories of the protected rounds: name and `repo add` flags.
const PROTECTED: [(&str, &[&str]); 4] = [
    ("plain", &[]),
    ("zstd", &["--compress", "zstd"]),
    ("luks", &["--encrypt", "luks"]),
    ("both", &["--compress", "zstd", "--encrypt", "luks"]),
];

/// A 2 GiB disk holding a realistic mix: 512 MiB of pseudo-random data, 512 MiB of this host's
/// own files from `/usr` (binaries, libraries, text) one after the other, the rest zero.
fn make_mixed_disk(dir: &Path, qcow2: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let raw = dir.join("mix.raw");
    fs::File::create(&raw)?.set_len(2048 << 20)?;
    nasbak_testlab::fill_pseudo_random(&raw, 512);
    let mut f = fs::OpenOptions::new().write(true).open(&raw)?;
    f.seek(SeekFrom::Start(512 << 20))?;
    let (mut written, mut dirs) = (0u64, vec![Path::new("/usr").to_path_buf()]);
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let (path, kind) = (e.path(), e.file_type()?);
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() && written < 512 << 20 {
                let data = fs::read(&path).unwrap_or_default();
                let take = data.len().min(((512u64 << 20) - written) as usize);
                f.write_all(&data[..take])?;
                written += take as u64;
            }
        }
    }
    drop(f);
    cmd("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(qcow2).run()?;
    fs::remove_file(&raw)?;
    Ok(())
}

/// The bytes the qcow2 files under `dir` take on the disk.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

/// Compressed and encrypted backups (docs/encryption.md): the running VM's full backup to a plain,
/// a zstd, a LUKS and a zstd-in-LUKS repository (time and size), against `qemu-img convert -c -o
/// compression_type=zstd` of the same disk; restore-volume from each; an encrypted incremental
/// after 1% changed; and `key rotate` of a repository with 20 encrypted backups.
fn protected_rounds(nasbak: &str, rounds: usize) -> Result<()> {
    let dir = Path::new(STATE).join("bench-protected");
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    println!("bench: protected repositories, a 2 GiB disk holding 512 MiB of random data and 512 MiB of /usr");
    make_mixed_disk(&dir, &dir.join("disk.qcow2"))?;
    domain_xml(&dir, &dir.join("disk.qcow2"))?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let key = dir.join("repo.key");
    let random = cmd("head").args(["-c", "32", "/dev/urandom"]).run()?.stdout;
    use base64::Engine as _;
    fs::write(&key, base64::engine::general_purpose::STANDARD.encode(random))?;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
    let config = p("nasbak.toml");
    for (name, flags) in PROTECTED {
        let root = p(&format!("repo-{name}"));
        fs::create_dir_all(&root)?;
        let mut args = vec!["--config", &config, "repo", "add", name, "--type", "shared", "--address", &root];
        args.extend_from_slice(flags);
        let key = key.to_string_lossy().into_owned();
        if name == "luks" || name == "both" {
            cmd(nasbak).args(&args).args(["--key-file", &key]).run()?;
        } else {
            cmd(nasbak).args(&args).run()?;
        }
    }
    let vm_dir = |name: &str| dir.join(format!("repo-{name}")).join(DOMAIN);
    virsh(&["start", DOMAIN])?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); PROTECTED.len()];
    let mut sizes = vec![0u64; PROTECTED.len()];
    let (mut restores, mut incrementals): (Vec<Vec<f64>>, Vec<f64>) = (vec![Vec::new(); PROTECTED.len()], Vec::new());
    let mut peers: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, (name, _)) in PROTECTED.iter().enumerate() {
            let _ = fs::remove_dir_all(vm_dir(name));
            let args = ["--config", &config, "backup", DOMAIN, "--repo", name, "--quiesce", "off", "--mode", "full"];
            let r = timed(nasbak, &args)?;
            let backup =
                fs::read_dir(vm_dir(name))?.flatten().map(|e| e.path()).find(|d| d.is_dir()).context("a backup")?;
            sizes[i] = allocated(&backup);
            println!("bench: protected, round {round}: {name} full {:.2} s, {} MiB", r.secs, sizes[i] >> 20);
            times[i].push(r.secs);
            let id = format!("{name}:{DOMAIN}/{}", backup.file_name().unwrap_or_default().to_string_lossy());
            let to = p(&format!("restored-{name}.qcow2"));
            let _ = fs::remove_file(&to);
            let r = timed(nasbak, &["--config", &config, "restore-volume", &id, "--disk", "vda", "--to", &to])?;
            println!("bench: protected, round {round}: {name} restore {:.2} s", r.secs);
            restores[i].push(r.secs);
            fs::remove_file(&to)?;
        }
        // The peers: qemu-img writing the same disk zstd-compressed, and into a LUKS qcow2 (what
        // QEMU's own encryption costs: the floor of an encrypted backup while QEMU encrypts).
        let (zstd_peer, luks_peer) = (p("peer-zstd.qcow2"), p("peer-luks.qcow2"));
        let _ = fs::remove_file(&zstd_peer);
        let r = timed(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-W",
                "-m",
                "16",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
                &p("disk.qcow2"),
                &zstd_peer,
            ],
        )?;
        peers[0].push(r.secs);
        let secret = format!("secret,id=k,file={}", key.display());
        let mut made = cmd("qemu-img")
            .args(["create", "-q", "--object", &secret, "-f", "qcow2", "-o"])
            .args(["encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=20", &luks_peer, "2G"])
            .run();
        for _ in 0..30 {
            if made.is_ok() {
                break;
            }
            made = cmd("qemu-img")
                .args(["create", "-q", "--object", &secret, "-f", "qcow2", "-o"])
                .args(["encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=20", &luks_peer, "2G"])
                .run();
        }
        made?;
        let target = format!("driver=qcow2,encrypt.key-secret=k,file.filename={luks_peer}");
        let r = timed(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-n",
                "-W",
                "-m",
                "16",
                "--object",
                &secret,
                &p("disk.qcow2"),
                "--target-image-opts",
                &target,
            ],
        )?;
        peers[1].push(r.secs);
        println!(
            "bench: protected, round {round}: qemu-img zstd {:.2} s, qemu-img into LUKS {:.2} s",
            peers[0][round - 1],
            r.secs
        );
        fs::remove_file(&luks_peer)?;
        change_in_guest(0x40 + round as u8, 1024 + 32 * round as u64)?;
        let args =
            ["--config", &config, "backup", DOMAIN, "--repo", "luks", "--quiesce", "off", "--mode", "incremental"];
        let r = timed(nasbak, &args)?;
        println!("bench: protected, round {round}: luks incremental ({CHANGED_MIB} MiB changed) {:.2} s", r.secs);
        incrementals.push(r.secs);
    }
    let zstd_file = p("qemu-img-zstd.qcow2");
    cmd("qemu-img")
        .args(["convert", "-U", "-c", "-O", "qcow2", "-o", "compression_type=zstd", &p("disk.qcow2"), &zstd_file])
        .run()?;
    let qemu_zstd = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&zstd_file)?) * 512;
    virsh(&["destroy", DOMAIN])?;
    // Key rotation of a repository holding 20 encrypted backups (a full and 19 incrementals of
    // the shut-off VM).
    let _ = fs::remove_dir_all(vm_dir("luks"));
    for _ in 0..20 {
        cmd(nasbak).args(["--config", &config, "backup", DOMAIN, "--repo", "luks", "--quiesce", "off"]).run()?;
    }
    let files: Vec<std::path::PathBuf> = fs::read_dir(vm_dir("luks"))?
        .flatten()
        .flat_map(|b| fs::read_dir(b.path()).into_iter().flatten().flatten().map(|f| f.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    let before: Vec<Vec<u8>> = files.iter().map(fs::read).collect::<Result<_, _>>()?;
    let new_key = dir.join("repo.new.key");
    fs::write(
        &new_key,
        base64::engine::general_purpose::STANDARD.encode(cmd("head").args(["-c", "32", "/dev/urandom"]).run()?.stdout),
    )?;
    fs::set_permissions(&new_key, fs::Permissions::from_mode(0o600))?;
    let r =
        timed(nasbak, &["--config", &config, "key", "rotate", "luks", "--new-key-file", &new_key.to_string_lossy()])?;
    let changed = files
        .iter()
        .zip(&before)
        .map(|(f, was)| fs::read(f).map(|now| now.iter().zip(was).filter(|(a, b)| a != b).count()).unwrap_or(0))
        .max()
        .unwrap_or(0);

    println!();
    println!("bench: best of {rounds}, protected repositories (2 GiB disk: 512 MiB random, 512 MiB of /usr)");
    println!("| operation | nasbak | compared with | ratio | target |");
    println!("|---|---|---|---|---|");
    let t = |i: usize| best_secs(&times[i]);
    let rt = |i: usize| best_secs(&restores[i]);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "| compressed full backup, size | {:.0} MiB | qemu-img convert -c zstd {:.0} MiB | {:.2}x | <= 1.05x |",
        mib(sizes[1]),
        mib(qemu_zstd),
        sizes[1] as f64 / qemu_zstd as f64
    );
    println!(
        "| compressed full backup, time | {:.2} s | uncompressed full {:.2} s | {:.2}x | <= 1.5x |",
        t(1),
        t(0),
        t(1) / t(0)
    );
    println!(
        "| encrypted full backup, time | {:.2} s | unencrypted full {:.2} s | {:.2}x | <= 1.25x |",
        t(2),
        t(0),
        t(2) / t(0)
    );
    println!(
        "| qemu-img convert -c zstd of the disk, time | {:.2} s | uncompressed full {:.2} s | {:.2}x | (peer) |",
        best_secs(&peers[0]),
        t(0),
        best_secs(&peers[0]) / t(0)
    );
    println!(
        "| qemu-img convert into a LUKS qcow2, time | {:.2} s | unencrypted full {:.2} s | {:.2}x | (peer: QEMU's encryption) |",
        best_secs(&peers[1]),
        t(0),
        best_secs(&peers[1]) / t(0)
    );
    println!(
        "| compressed and encrypted full, time | {:.2} s | unencrypted full {:.2} s | {:.2}x | (comparison) |",
        t(3),
        t(0),
        t(3) / t(0)
    );
    println!("| encrypted restore | {:.2} s | plain restore {:.2} s | {:.2}x | <= 1.3x |", rt(2), rt(0), rt(2) / rt(0));
    println!(
        "| compressed restore | {:.2} s | plain restore {:.2} s | {:.2}x | <= 1.3x |",
        rt(1),
        rt(0),
        rt(1) / rt(0)
    );
    let ib = best_secs(&incrementals);
    println!(
        "| encrypted incremental, 1% changed | {ib:.2} s | encrypted full {:.2} s | {:.2}x | <= 0.3x |",
        t(2),
        ib / t(2)
    );
    println!(
        "| encrypted full backup, size | {:.0} MiB | unencrypted full {:.0} MiB | {:.3}x | <= 1.01x |",
        mib(sizes[2]),
        mib(sizes[0]),
        sizes[2] as f64 / sizes[0] as f64
    );
    println!(
        "| key rotation, 20 backups ({} files) | {:.2} s, at most {:.2} MiB changed per file | | | < 2 s, <= 1 MiB per file |",
        files.len(),
        r.secs,
        changed as f64 / f64::from(1 << 20)
    );
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    Ok(())
}

/// `cargo xtask bench chain [ROUNDS]`: every way to restore, from the end of a chain against
/// from its full. The 2 GiB disk holding 1 GiB of the main bench gets a full backup of the
/// running VM and then ten incrementals of `CHANGED_MIB` MiB each (1 % of the disk, at ten
/// places); then, each round from a cold cache, the full (depth 0) and the tenth incremental
/// (depth 10) are restored (`nasbak restore`), instantly restored (until the VM runs, and in
/// all), mounted, and boot-verified (`verify --boot`).
pub fn chain(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench-chain");
    println!("bench: chain, a 2 GiB qcow2 disk holding 1 GiB of pseudo-random data, a full and ten incrementals");
    let config = fresh_vm(&nasbak, &dir, 2048, 1024)?;
    virsh(&["start", DOMAIN])?;
    let backup = |mode: &'static str| -> Result<String> {
        cmd(&nasbak)
            .args(["--config", &config, "backup", DOMAIN, "--quiesce", "off", "--mode", mode])
            .timeout(Duration::from_secs(600))
            .run()?;
        backup_id(&config, &nasbak)
    };
    let full = backup("full")?;
    let mut top = full.clone();
    for k in 1..=10u64 {
        change_in_guest(0x60 + k as u8, 100 + 90 * k)?;
        top = backup("incremental")?;
    }
    let manifest = fs::read_to_string(
        dir.join("repo").join(DOMAIN).join(top.rsplit('/').next().context("id")?).join("manifest.json"),
    )?;
    if !manifest.contains("\"incremental\"") {
        bail!("the tenth backup is not an incremental: {manifest}");
    }
    virsh(&["destroy", DOMAIN])?;
    let mut boot: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut modes = [RestoreModes::default(), RestoreModes::default()];
    for round in 1..=rounds {
        for (depth, id) in [full.as_str(), top.as_str()].into_iter().enumerate() {
            let m = restore_modes(&nasbak, &config, id, &dir, 1)?;
            let b = timed(&nasbak, &["--config", &config, "verify", id, "--boot"])?.secs;
            println!("bench: chain, round {round}, depth {}: boot verification {b:.2} s", depth * 10);
            boot[depth].push(b);
            modes[depth].full.extend(m.full);
            modes[depth].to_running.extend(m.to_running);
            modes[depth].instant_total.extend(m.instant_total);
            modes[depth].mount.extend(m.mount);
        }
    }
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    println!("\n| operation | depth 10 | depth 0 | depth 10 / depth 0 | target | range (depth 10; depth 0) |");
    println!("|---|---|---|---|---|---|");
    let rows: [(&str, &[f64], &[f64]); 5] = [
        ("restore", &modes[1].full, &modes[0].full),
        ("instant restore: VM running", &modes[1].to_running, &modes[0].to_running),
        ("instant restore: done", &modes[1].instant_total, &modes[0].instant_total),
        ("backup mounted", &modes[1].mount, &modes[0].mount),
        ("boot verification", &boot[1], &boot[0]),
    ];
    for (what, deep, base) in rows {
        let (d, b) = (best_secs(deep), best_secs(base));
        println!("| {what} | {d:.2} s | {b:.2} s | {:.2}x | <= 1.2x | {}; {} |", d / b, range(deep), range(base));
    }
    Ok(())
}

/// `cargo xtask bench restores [ROUNDS]`: only the ways to restore (full, instant with the guest
/// writing during the finish, mount), on the 2 GiB disk holding 1 GiB and the 8 GiB disk
/// holding 4 GiB.
pub fn restores(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench-restores");
    let mut lines = Vec::new();
    for (size_mib, data_mib) in [(2048u64, 1024u64), (8192, 4096)] {
        println!("bench: restores, a {size_mib} MiB qcow2 disk holding {data_mib} MiB of pseudo-random data");
        let config = fresh_vm(&nasbak, &dir, size_mib, data_mib as usize)?;
        cmd(&nasbak)
            .args(["--config", &config, "backup", DOMAIN, "--quiesce", "off", "--mode", "full"])
            .timeout(Duration::from_secs(3600))
            .run()?;
        let id = backup_id(&config, &nasbak)?;
        let m = restore_modes(&nasbak, &config, &id, &dir, rounds)?;
        let full = best_secs(&m.full);
        let size = format!("{} GiB disk", size_mib / 1024);
        let guest =
            format!("{}-{} MiB", m.guest_mib.iter().min().unwrap_or(&0), m.guest_mib.iter().max().unwrap_or(&0));
        for (what, v, target) in [
            ("instant restore: VM running", &m.to_running, "<= 0.25x"),
            ("instant restore: done", &m.instant_total, "<= 1.2x"),
        ] {
            let b = best_secs(v);
            lines.push(format!(
                "| {what}, {size} | {b:.2} s | full restore {full:.2} s | {:.2}x | {target} | {}; {} | {guest} |",
                b / full,
                range(v),
                range(&m.full)
            ));
        }
        let mount = best_secs(&m.mount);
        lines.push(format!(
            "| backup mounted, {size} | {mount:.2} s | full restore {full:.2} s | {:.2}x | (comparison) | {} | |",
            mount / full,
            range(&m.mount)
        ));
    }
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    println!("\n| operation | nasbak | against | ratio | target | range (nasbak; full restore) | guest wrote |");
    println!("|---|---|---|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `cargo xtask bench rbd [ROUNDS]`: incremental backups of an RBD disk (see the module
/// documentation).
pub fn rbd(rounds: usize) -> Result<()> {
    crate::lab::ceph::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    // One size: the lab cluster keeps its objects in RAM (memstore), snapshots and restores
    // included; three rounds of a 6 GiB image holding 3 GiB got its OSD killed for memory (24
    // GiB).
    let lines = rbd_rounds(&nasbak, 2048, 1024, rounds)?;
    println!("\n| operation | nasbak | against | ratio | target | range (nasbak; against) |");
    println!("|---|---|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `bench rbd` on an RBD image of `size_mib` MiB holding `data_mib` MiB: its table rows.
fn rbd_rounds(nasbak: &str, size_mib: u64, data_mib: usize, rounds: usize) -> Result<Vec<String>> {
    let dir = Path::new(STATE).join("bench-rbd");
    let image = "nasbak-bench-rbd";
    let pool_image = format!("vms/{image}");
    println!(
        "bench: rbd, a running VM whose disk is a {size_mib} MiB RBD image holding {data_mib} MiB of pseudo-random data"
    );
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = nasbak_testlab::ceph::rbd(&["snap", "purge", "--no-progress", &pool_image]);
    nasbak_testlab::ceph::remove(image);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("repo"))?;
    let raw = dir.join("disk.raw");
    fs::File::create(&raw)?.set_len(size_mib << 20)?;
    nasbak_testlab::fill_pseudo_random(&raw, data_mib);
    // Into the image as the admin, with the time a large image takes (`ceph::import` allows
    // two minutes).
    cmd("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&raw)
        .arg(nasbak_testlab::ceph::admin_filename(&pool_image))
        .timeout(Duration::from_secs(1800))
        .run()?;
    fs::remove_file(&raw)?;
    // The bench domain's XML with the RBD disk in place of its file disk.
    domain_xml(&dir, &dir.join("unused.qcow2"))?;
    let xml = fs::read_to_string(dir.join("domain.xml"))?;
    let start = xml.find("<disk").context("a disk")?;
    let end = xml.find("</disk>").context("a disk's end")? + "</disk>".len();
    let xml = format!("{}{}{}", &xml[..start], nasbak_testlab::ceph::disk_xml(&pool_image, "vda"), &xml[end..]);
    fs::write(dir.join("domain.xml"), xml)?;
    virsh(&["undefine", DOMAIN])?;
    virsh(&["define", &dir.join("domain.xml").to_string_lossy()])?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let config = p("nasbak.toml");
    cmd(nasbak)
        .args(["--config", &config, "repo", "add", "bench", "--type", "shared", "--address", &p("repo")])
        .run()?;
    let backup = |mode: &'static str| {
        timed(nasbak, &["--config", &config, "backup", DOMAIN, "--quiesce", "off", "--mode", mode]).map(|r| r.secs)
    };
    let (mut full, mut incremental, mut written) = (Vec::new(), Vec::new(), Vec::new());
    let (mut restore_full, mut restore_incremental) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        virsh(&["start", DOMAIN])?;
        full.push(backup("full")?);
        let full_id = backup_id(&config, nasbak)?;
        // 1% of the image, in 20 places, as the guest would write it.
        let info = virsh(&["qemu-monitor-command", DOMAIN, "--hmp", "info block"])?;
        let device = info
            .lines()
            .skip_while(|l| !l.contains(image))
            .find_map(|l| l.trim().strip_prefix("Attached to:"))
            .context("the RBD disk's device")?
            .trim()
            .to_owned();
        for k in 0..CHANGED_MIB {
            let command = format!("qemu-io -d {device} \"write -P {:#x} {}M 1M\"", 0x40 + round as u64, 37 + k * 97);
            let out = virsh(&["qemu-monitor-command", DOMAIN, "--hmp", &command])?;
            if !out.trim().is_empty() {
                bail!("{command}: {out}");
            }
        }
        incremental.push(backup("incremental")?);
        let inc_id = backup_id(&config, nasbak)?;
        let manifest: serde_json::Value = serde_json::from_str(&fs::read_to_string(
            dir.join("repo").join(DOMAIN).join(inc_id.rsplit('/').next().context("id")?).join("manifest.json"),
        )?)?;
        let disk = &manifest["disks"][0];
        if disk["mode"] != "incremental" {
            bail!("the RBD disk's backup is not incremental: {disk}");
        }
        written.push(disk["size"].as_u64().unwrap_or(0));
        virsh(&["destroy", DOMAIN])?;
        // Alternately first: a restore over objects the other one just wrote is faster on the
        // lab's memstore.
        let restore = |id: &str| timed(nasbak, &["--config", &config, "restore", id]).map(|r| r.secs);
        if round % 2 == 1 {
            restore_full.push(restore(&full_id)?);
            restore_incremental.push(restore(&inc_id)?);
        } else {
            restore_incremental.push(restore(&inc_id)?);
            restore_full.push(restore(&full_id)?);
        }
        println!(
            "bench: rbd, round {round}: full {:.2} s, incremental {:.2} s ({} KiB written), restore full {:.2} s, restore incremental {:.2} s",
            full[round - 1],
            incremental[round - 1],
            written[round - 1] >> 10,
            restore_full[round - 1],
            restore_incremental[round - 1]
        );
    }
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = nasbak_testlab::ceph::rbd(&["snap", "purge", "--no-progress", &pool_image]);
    nasbak_testlab::ceph::remove(image);
    let changed = CHANGED_MIB << 20;
    let most = written.iter().copied().max().unwrap_or(0);
    let size = format!("{} GiB image", size_mib / 1024);
    let (i, f) = (best_secs(&incremental), best_secs(&full));
    let (ri, rf) = (best_secs(&restore_incremental), best_secs(&restore_full));
    Ok(vec![
        format!(
            "| incremental RBD backup after {CHANGED_MIB} MiB changed, {size} | {i:.2} s | full RBD backup {f:.2} s | {:.2}x | <= 0.25x | {}; {} |",
            i / f,
            range(&incremental),
            range(&full)
        ),
        format!(
            "| bytes written by that incremental (largest), {size} | {:.1} MiB | changed {CHANGED_MIB} MiB | {:.2}x | <= 2x | |",
            most as f64 / 1048576.0,
            most as f64 / changed as f64
        ),
        format!(
            "| restore of the incremental point onto RBD, {size} | {ri:.2} s | full restore {rf:.2} s | {:.2}x | <= 1.2x | {}; {} |",
            ri / rf,
            range(&restore_incremental),
            range(&restore_full)
        ),
    ])
}

/// `cargo xtask bench night [ROUNDS]`: see the module documentation.
pub fn night(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench-night");
    const VMS: usize = 8;
    let names: Vec<String> = (0..VMS).map(|i| format!("nasbak-night-{i}")).collect();
    for n in names.iter().map(String::as_str).chain([DOMAIN]) {
        let _ = virsh(&["destroy", n]);
        let _ = virsh(&["undefine", n, "--checkpoints-metadata"]);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("repo"))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    println!("bench: night, {VMS} running VMs with 1 GiB qcow2 disks holding 512 MiB of pseudo-random data each");
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    for n in &names {
        let disk = dir.join(format!("{n}.qcow2"));
        make_disk(&dir, &disk, 1024, 512)?;
        domain_xml(&dir, &disk)?;
        let xml = fs::read_to_string(dir.join("domain.xml"))?
            .replace(&format!("<name>{DOMAIN}</name>"), &format!("<name>{n}</name>"));
        virsh(&["undefine", DOMAIN])?;
        fs::write(dir.join(format!("{n}.xml")), xml)?;
        virsh(&["define", &p(&format!("{n}.xml"))])?;
        virsh(&["start", n])?;
    }
    let config = p("nasbak.toml");
    cmd(&nasbak)
        .args(["--config", &config, "repo", "add", "bench", "--type", "shared", "--address", &p("repo")])
        .run()?;
    // Every backup full, so that each run does the same work.
    cmd(&nasbak)
        .args([
            "--config",
            &config,
            "offering",
            "add",
            "night",
            "--repo",
            "bench",
            "--quiesce",
            "off",
            "--full-every",
            "1",
        ])
        .run()?;
    let minute = (chrono::Utc::now() - chrono::Duration::minutes(1)).format("%M").to_string();
    for n in &names {
        cmd(&nasbak).args(["--config", &config, "assign", n, "night"]).run()?;
        cmd(&nasbak)
            .args(["--config", &config, "schedule", "add", n, "--every", "hourly", "--at", &minute, "--keep", "1"])
            .run()?;
    }
    let text = fs::read_to_string(&config)?;
    let earlier = format!("created = \"{}\"", (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339());
    let text: Vec<String> =
        text.lines().map(|l| if l.starts_with("created = ") { earlier.clone() } else { l.to_owned() }).collect();
    let base = text.join("\n");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let modes: [(String, Option<usize>); 3] = [
        ("one after another".into(), Some(1)),
        (format!("host default ({cores} at once)"), None),
        ("four at once".into(), Some(4)),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 1..=rounds {
        for (i, (what, limit)) in modes.iter().enumerate() {
            let text = match limit {
                Some(n) => format!("max_parallel = {n}\n{base}"),
                None => base.clone(),
            };
            fs::write(&config, text)?;
            let state = dir.join(format!("state-{round}-{i}.json"));
            let secs = timed_env(
                &nasbak,
                &["--config", &config, "run-due"],
                &[("NASBAK_STATE", state.to_string_lossy().as_ref())],
            )?;
            // Every VM's backup of this run is there and verifies (keep 1: the newest of each).
            let listed: serde_json::Value =
                serde_json::from_str(&cmd(&nasbak).args(["--config", &config, "--json", "list"]).run()?.stdout_text())?;
            let count = listed.as_array().map_or(0, Vec::len);
            if count != VMS {
                bail!("{what}: {count} backups listed, not {VMS}");
            }
            cmd(&nasbak).args(["--config", &config, "verify", "--all"]).timeout(Duration::from_secs(1800)).run()?;
            println!("bench: night, round {round}, {what}: {secs:.2} s");
            times[i].push(secs);
        }
    }
    for n in &names {
        let _ = virsh(&["destroy", n]);
        let _ = virsh(&["undefine", n, "--checkpoints-metadata"]);
    }
    let one = best_secs(&times[0]);
    println!("\n| run-due of {VMS} VMs due at once | wall time | against one after another | ratio | target | range |");
    println!("|---|---|---|---|---|---|");
    for (i, (what, _)) in modes.iter().enumerate() {
        let b = best_secs(&times[i]);
        println!("| {what} | {b:.2} s | {one:.2} s | {:.2}x | <= 0.5x | {} |", b / one, range(&times[i]));
    }
    Ok(())
}

/// Runs a command from a cold cache with `env` added (a variable given as "" is removed).
fn timed_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<f64> {
    cold_cache()?;
    let start = Instant::now();
    let mut command = Command::new(program);
    for (k, v) in env {
        if v.is_empty() {
            command.env_remove(k);
        } else {
            command.env(k, v);
        }
    }
    let status = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    nix::unistd::sync();
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The bench VM made afresh in `dir` (anything of an earlier run removed): a qcow2 disk of
/// `size_mib` MiB holding `data_mib` MiB of pseudo-random data, defined (shut off), and a
/// `shared` repository `bench` in `dir/repo`. Returns the nasbak configuration file.
fn fresh_vm(nasbak: &str, dir: &Path, size_mib: u64, data_mib: usize) -> Result<String> {
    let _ = virsh(&["destroy", DOMAIN]);
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("repo"))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    make_disk(dir, &dir.join("disk.qcow2"), size_mib, data_mib)?;
    domain_xml(dir, &dir.join("disk.qcow2"))?;
    let config = p("nasbak.toml");
    cmd(nasbak)
        .args(["--config", &config, "repo", "add", "bench", "--type", "shared", "--address", &p("repo")])
        .run()?;
    Ok(config)
}

/// `cargo xtask bench big [ROUNDS]`: a big sparse disk against a full one holding the same data.
/// A 100 GiB qcow2 disk holding 2 GiB of pseudo-random data and a 2 GiB disk holding the same
/// 2 GiB: on each (the VM running), a full backup, an incremental after 200 MiB changed (a tenth
/// of the data), then the whole-VM restore and the instant restore of that incremental (the
/// guest writing, see `restore_modes`). Also the bytes the full backup's file takes on the
/// repository. Holes cost nothing when the ratios stay near 1.
pub fn big(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench-big");
    const DATA_MIB: u64 = 2048;
    let mut results = Vec::new();
    for size_mib in [DATA_MIB, 100 << 10] {
        println!("bench: big, a {} GiB qcow2 disk holding {DATA_MIB} MiB of pseudo-random data", size_mib >> 10);
        let config = fresh_vm(&nasbak, &dir, size_mib, DATA_MIB as usize)?;
        virsh(&["start", DOMAIN])?;
        let (mut full, mut incremental, mut stored) = (Vec::new(), Vec::new(), 0u64);
        let mut last = String::new();
        for round in 1..=rounds {
            let backup = |mode: &str| {
                timed(&nasbak, &["--config", &config, "backup", DOMAIN, "--quiesce", "off", "--mode", mode])
            };
            full.push(backup("full")?.secs);
            let full_id = backup_id(&config, &nasbak)?;
            // A tenth of the data changed, in ten places spread over it.
            for k in 0..10u64 {
                change_in_guest(0x30 + round as u8, 10 + k * (DATA_MIB - 40) / 10)?;
            }
            incremental.push(backup("incremental")?.secs);
            let inc_id = backup_id(&config, &nasbak)?;
            let vm_dir = dir.join("repo").join(DOMAIN);
            stored = dir_allocated(&vm_dir.join(full_id.rsplit('/').next().unwrap_or_default()));
            println!(
                "bench: big, {} GiB, round {round}: full {:.2} s ({} MiB stored), incremental {:.2} s",
                size_mib >> 10,
                full[round - 1],
                stored >> 20,
                incremental[round - 1]
            );
            if round < rounds {
                for id in [&inc_id, &full_id] {
                    cmd(&nasbak).args(["--config", &config, "delete", id]).run()?;
                }
            }
            last = inc_id;
        }
        virsh(&["destroy", DOMAIN])?;
        let m = restore_modes(&nasbak, &config, &last, &dir, rounds)?;
        results.push((size_mib, full, incremental, m, stored));
    }
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    let _ = fs::remove_dir_all(&dir);
    let (small, large) = (&results[0], &results[1]);
    println!(
        "\n| operation, {DATA_MIB} MiB of data | 100 GiB disk | {} GiB disk | ratio | target | range (100 GiB; {} GiB) |",
        DATA_MIB >> 10,
        DATA_MIB >> 10
    );
    println!("|---|---|---|---|---|---|");
    for (what, a, b) in [
        ("full backup (running VM)", &large.1, &small.1),
        ("incremental after 200 MiB changed", &large.2, &small.2),
        ("whole-VM restore of the incremental", &large.3.full, &small.3.full),
        ("instant restore, done (guest writing)", &large.3.instant_total, &small.3.instant_total),
        ("instant restore, VM running", &large.3.to_running, &small.3.to_running),
    ] {
        let (x, y) = (best_secs(a), best_secs(b));
        println!("| {what} | {x:.2} s | {y:.2} s | {:.2}x | <= 1.2x | {}; {} |", x / y, range(a), range(b));
    }
    println!(
        "| full backup's files on the repository | {} MiB | {} MiB | {:.2}x | (holes not written) | |",
        large.4 >> 20,
        small.4 >> 20,
        large.4 as f64 / small.4.max(1) as f64
    );
    Ok(())
}

/// The bytes the files under `dir` take on the disk (their allocated blocks).
fn dir_allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

/// `cargo xtask bench s3 [ROUNDS]`: copies to the lab's S3 gateway (docs/offsite.md). The bench
/// disk (2 GiB holding 1 GiB of pseudo-random data) backed up once (shut off); then each round,
/// to a prefix of its own in the bucket without lock: `nasbak copy` of the backup against
/// `rclone copy` of the same directory (Debian's rclone, same endpoint, same CA), and the rest
/// of a `nasbak copy` killed (SIGKILL) at half of the disk file against a whole copy.
pub fn s3(rounds: usize) -> Result<()> {
    crate::lab::s3::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench-s3");
    let config = fresh_vm(&nasbak, &dir, 2048, 1024)?;
    cmd(&nasbak)
        .args(["--config", &config, "backup", DOMAIN, "--quiesce", "off", "--mode", "full"])
        .timeout(Duration::from_secs(3600))
        .run()?;
    let id = backup_id(&config, &nasbak)?;
    let relative = id.split_once(':').map_or(id.as_str(), |(_, r)| r).to_owned();
    let s3dir = crate::lab::s3::dir();
    let creds = fs::read_to_string(s3dir.join("credentials"))?;
    let key = |name: &str| {
        creds
            .lines()
            .find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_owned()))
            .with_context(|| format!("{name} in the lab credentials"))
    };
    let (access, secret) = (key("aws_access_key_id")?, key("aws_secret_access_key")?);
    let ca = s3dir.join("ca.pem").to_string_lossy().into_owned();
    let bucket = crate::lab::s3::BUCKET_PLAIN;
    let run = uuid_like();
    let (mut ours, mut theirs, mut rest, mut whole) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut from, mut fetched) = (Vec::new(), Vec::new());
    let env = [
        ("RCLONE_CONFIG_LAB_TYPE", "s3"),
        ("RCLONE_CONFIG_LAB_PROVIDER", "Ceph"),
        ("RCLONE_CONFIG_LAB_ENDPOINT", crate::lab::s3::ENDPOINT),
        ("RCLONE_CONFIG_LAB_ACCESS_KEY_ID", &access),
        ("RCLONE_CONFIG_LAB_SECRET_ACCESS_KEY", &secret),
        // rclone 1.60 fails to start with it set ("unable to load custom CA bundle"); the
        // lab CA goes by --ca-cert.
        ("AWS_CA_BUNDLE", ""),
    ];
    let restored = dir.join("restored.qcow2");
    for round in 0..rounds {
        println!("bench: s3 round {} of {rounds}", round + 1);
        let target = |what: &str| -> Result<String> {
            let name = format!("b{round}{what}");
            cmd(&nasbak)
                .args(["--config", &config, "target", "add", &name, "--type", "s3", "--endpoint"])
                .args([crate::lab::s3::ENDPOINT, "--bucket", bucket, "--prefix"])
                .arg(format!("bench/{run}/{round}-{what}"))
                .args(["--credentials-file", &s3dir.join("credentials").to_string_lossy(), "--ca-file", &ca])
                .run()?;
            Ok(name)
        };
        let t = target("nasbak")?;
        ours.push(timed(&nasbak, &["--config", &config, "copy", &id, "--to", &t])?.secs);
        let src = dir.join("repo").join(&relative).to_string_lossy().into_owned();
        let dst = format!("lab:{bucket}/bench/{run}/{round}-rclone/{relative}");
        theirs.push(timed_env("rclone", &["copy", &src, &dst, "--ca-cert", &ca], &env)?);
        // A restore of the disk straight from the target, against rclone's download of the
        // backup followed by a restore from the downloaded copy.
        let _ = fs::remove_file(&restored);
        let to = restored.to_string_lossy().into_owned();
        from.push(
            timed(&nasbak, &["--config", &config, "restore-volume", &id, "--disk", "vda", "--to", &to, "--from", &t])?
                .secs,
        );
        let _ = fs::remove_file(&restored);
        let local = dir.join(format!("download-{round}"));
        let _ = fs::remove_dir_all(&local);
        let down = local.join(&relative).to_string_lossy().into_owned();
        let took = timed_env("rclone", &["copy", &dst, &down, "--ca-cert", &ca], &env)?;
        let repo = format!("dl{round}");
        cmd(&nasbak)
            .args(["--config", &config, "repo", "add", &repo, "--type", "shared", "--address"])
            .arg(&local)
            .run()?;
        let downloaded = format!("{repo}:{relative}");
        let then = timed(&nasbak, &["--config", &config, "restore-volume", &downloaded, "--disk", "vda", "--to", &to])?;
        fetched.push(took + then.secs);
        let _ = fs::remove_file(&restored);
        let _ = fs::remove_dir_all(&local);
        // Killed at half of the disk file, then the rest; against a whole copy.
        let t = target("killed")?;
        let mut child = Command::new(&nasbak)
            .args(["--config", &config, "--json", "copy", &id, "--to", &t])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("the copy's stderr")?;
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let v: serde_json::Value = serde_json::from_str(&line?).unwrap_or_default();
            if v["disk"].as_str().is_some_and(|d| d.ends_with(".qcow2")) && v["percent"].as_f64() > Some(50.0) {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        rest.push(timed(&nasbak, &["--config", &config, "copy", &id, "--to", &t])?.secs);
        let t = target("whole")?;
        whole.push(timed(&nasbak, &["--config", &config, "copy", &id, "--to", &t])?.secs);
        // The round's objects go, and the gateway frees their space now (its garbage collection
        // would wait two hours): 4 GiB a round would fill the lab's OSD in a few.
        release(&s3dir, &format!("s3://{bucket}/bench/{run}/{round}-"))?;
    }
    let _ = virsh(&["undefine", DOMAIN, "--checkpoints-metadata"]);
    println!("\n| operation | nasbak | against | ratio | target | range (nasbak; against) |");
    println!("|---|---|---|---|---|---|");
    let (o, r) = (best_secs(&ours), best_secs(&theirs));
    println!(
        "| copy of one backup (1 GiB of data) | {o:.2} s | rclone copy {r:.2} s | {:.2}x | <= 1.0x | {}; {} |",
        o / r,
        range(&ours),
        range(&theirs)
    );
    let (f, d) = (best_secs(&from), best_secs(&fetched));
    println!(
        "| restore-volume --from the target | {f:.2} s | rclone download + restore-volume {d:.2} s | {:.2}x | <= 0.7x | {}; {} |",
        f / d,
        range(&from),
        range(&fetched)
    );
    let (k, w) = (best_secs(&rest), best_secs(&whole));
    println!(
        "| the rest of a copy killed at 50% | {k:.2} s | a whole copy {w:.2} s | {:.2}x | <= 0.6x | {}; {} |",
        k / w,
        range(&rest),
        range(&whole)
    );
    Ok(())
}

/// Removes the objects under `prefix` (an `s3://` URL; every name that starts with it) and has
/// the gateway free their space at once.
fn release(s3dir: &Path, prefix: &str) -> Result<()> {
    let (url, start) = prefix.rsplit_once('/').context("an s3:// prefix")?;
    crate::lab::s3::aws(
        s3dir,
        &["s3", "rm", "--recursive", &format!("{url}/"), "--exclude", "*", "--include", &format!("{start}*")],
    )?;
    let conf = crate::lab::ceph::dir().join("ceph.conf").to_string_lossy().into_owned();
    crate::lab::ceph::tool("radosgw-admin", &["-c", &conf, "-n", "client.admin", "gc", "process", "--include-all"])?;
    Ok(())
}

/// A name for this run's objects (time-based: two runs never share one).
fn uuid_like() -> String {
    format!(
        "{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
    )
}
