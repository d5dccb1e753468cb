//! Boot-verified backups: a throwaway domain made from a backup's saved definition is started on
//! overlays over the backup's files; the backup passes when the guest agent answers (and a check
//! command run through it succeeds, where one is given) within a timeout.
//!
//! The throwaway domain ([`nasbak_libvirt::throwaway_definition`]) has its own name and UUID, no
//! network interface, host device or shared file system, and only the backed-up disks, each a
//! qcow2 overlay (in the work directory) over a read-only FUSE export of the backup file and its
//! chain: nothing of the original VM, and nothing of the backup, is written. It is transient and
//! destroyed, and the overlays and exports removed, on every path out. The result is kept beside
//! the backup's manifest (`boot-verify.json`) and shown by `list` and `show`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nasbak_agent::GuestAgent;
use nasbak_libvirt::{
    CancelHandle, DiskEncryption, DiskSource, DiskSwap, DomainState, Hypervisor, Throwaway, has_agent_channel,
    throwaway_definition,
};
use nasbak_qemu_img::{ImageTool, ReadOnlyExport};
use nasbak_repo::model::layout::DOMAIN_CONFIG_FILE;
use nasbak_repo::{BackupId, Mounter, VmName};

use crate::engine::{AgentSource, Engine};
use crate::error::{BackupError, Step, at};
use crate::export::{Overlay, nbd_socket};
use crate::protect::TransientSecret;
use crate::request::BootVerifyRequest;
use crate::store::backup_disks;
use crate::transfer::check_chain;
use nasbak_repo::store::VmLock;
use nasbak_repo::store::{BootResult, BootVerification, ancestors, write_record};

/// The description of the transient secret holding a verification's overlay key, up to its
/// pid and `)`.
const BOOT_SECRET_PREFIX: &str = "nasbak: the overlay key of a boot verification (pid ";

/// How many of the console's last lines a failed verification keeps.
const CONSOLE_LINES: usize = 20;
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl<H, A, I, M> Engine<H, A, I, M>
where
    H: Hypervisor,
    A: AgentSource,
    I: ImageTool + Sync,
    M: Mounter,
{
    /// Boots a throwaway copy of the backup's VM (see the module's documentation) and records
    /// the result beside the backup. A boot that fails is a [`BootResult::Failed`] verification,
    /// not an error; errors are what kept the verification from running (no such backup, a
    /// damaged file, the repository).
    pub fn verify_boot(
        &self,
        request: &BootVerifyRequest,
        cancel: &CancelHandle,
    ) -> Result<BootVerification, BackupError> {
        let (vm, id) = (request.vm.as_str(), request.id.as_str());
        let vm_name = VmName::new(vm)?;
        id.parse::<BackupId>()?;
        let mounted = self.mounts.acquire(&request.repository)?;
        let layout = mounted.layout();
        let (_, _, dir) = layout.resolve_backup(&format!("{vm}/{id}"))?;
        // A reference-system backup of a shut-off VM saved no definition: its volumes are found
        // among the VM's disks as it is defined now, if it is.
        let current = || self.hypervisor.inactive_xml(vm).ok().and_then(|x| nasbak_libvirt::Domain::parse(&x).ok());
        let disks = backup_disks(&dir, vm, id, &current)?;
        let reference = format!("{}:{vm}/{id}", request.repository.name());
        let saved = fs::read_to_string(dir.join(DOMAIN_CONFIG_FILE)).map_err(|_| BackupError::Unsupported {
            what: format!("booting backup {vm}/{id}: it has no saved domain definition ({DOMAIN_CONFIG_FILE})"),
        })?;
        let started = Instant::now();
        // `booted`: how long the guest took to answer, when it did.
        let record = |result: BootResult,
                      detail: String,
                      console: Vec<String>,
                      booted: Option<Duration>|
         -> Result<BootVerification, BackupError> {
            let mut v = BootVerification::new(reference.clone(), result, self.clock.now(), detail);
            v.millis = started.elapsed().as_millis() as u64;
            v.console = console;
            v.boot_millis = booted.map(|b| b.as_millis() as u64);
            write_record(&dir, &v)?;
            Ok(v)
        };
        if !has_agent_channel(&saved) {
            return record(
                BootResult::Unverifiable,
                "the VM has no guest agent channel: a booted guest cannot be told from a hung one".into(),
                Vec::new(),
                None,
            );
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        let name = format!("nasbak-verify-{}-{}", &uuid[..8], vm);
        let work = request.work_dir.join(&name);
        sweep_abandoned(&self.hypervisor, &request.work_dir);
        fs::create_dir_all(&request.work_dir)
            .and_then(|()| fs::create_dir(&work))
            .and_then(|()| fs::write(work.join(OWNER_FILE), std::process::id().to_string()))
            .map_err(|source| BackupError::Io { action: "creating", path: work.clone(), source })?;
        let mut guard = BootGuard {
            hypervisor: &self.hypervisor,
            name: name.clone(),
            dir: work.clone(),
            sockets: Vec::new(),
            started: false,
            tpm_dir: None,
            secret: None,
        };
        let mut swaps = Vec::new();
        let kept = crate::store::backup_state(&dir, vm, id);
        let mut state = Vec::new();
        {
            let _lock = VmLock::take(&layout.vm_dir(&vm_name), vm)?;
            // An encrypted backup is read with the repository's key.
            let key = match disks.iter().any(|b| b.stored_as.is_encrypted())
                || kept.iter().any(|s| s.stored_as.is_encrypted())
            {
                true => {
                    crate::protect::resolve_key(&self.hypervisor, request.repository.protection(), &self.runtime_dir)?
                }
                false => None,
            };
            let mut chains = Vec::new();
            for b in &disks {
                let chain = ancestors(&layout.vm_dir(&vm_name), vm, id, b)?;
                check_chain(&self.images, (&dir, b), &chain, key.as_ref(), &reference).map_err(at(Step::Check))?;
                chains.push(chain);
            }
            // A disk whose volume is itself encrypted (its saved definition says so) boots on an
            // overlay encrypted with a one-off key: what the guest writes while it boots is never
            // plaintext on this host either. QEMU gets the key from a transient libvirt secret,
            // undefined when the check ends (one a killed check left, here).
            let saved_disks = nasbak_libvirt::Domain::parse(&saved)?.disks;
            let encrypted = |target: &str| saved_disks.iter().any(|d| d.target == target && d.encryption.is_some());
            let overlay_key = match disks.iter().any(|b| encrypted(&b.target)) {
                true => {
                    crate::protect::remove_leaked_secrets(&self.hypervisor, BOOT_SECRET_PREFIX);
                    let (key, value) = crate::protect::one_off_key(&self.runtime_dir)?;
                    let secret = TransientSecret::define(&self.hypervisor, BOOT_SECRET_PREFIX, &value)?;
                    let encryption = DiskEncryption {
                        format: "luks".into(),
                        secret_uuid: Some(secret.uuid.clone()),
                        secret_usage: None,
                    };
                    guard.secret = Some(secret);
                    Some((key, encryption))
                }
                false => None,
            };
            for (b, chain) in disks.iter().zip(&chains) {
                let overlay_key = overlay_key.as_ref().filter(|_| encrypted(&b.target));
                let export = nbd_socket(&self.runtime_dir)?;
                guard.add_socket(&export)?;
                let overlay = work.join(format!("{}.overlay.qcow2", b.target));
                let source = crate::protect::disk_image(&dir, b, chain, key.as_ref(), &reference)?;
                let over = Overlay {
                    source: &source,
                    size: b.virtual_size,
                    socket: &export,
                    file: &overlay,
                    key: overlay_key.map(|(k, _)| k.path()),
                };
                over.make(&self.images, mounted.registration()).map_err(at(Step::Export { disk: b.target.clone() }))?;
                swaps.push(DiskSwap {
                    target: b.target.clone(),
                    source: DiskSource::File(overlay),
                    format: "qcow2".into(),
                    encryption: overlay_key.map(|(_, e)| e.clone()),
                });
            }
            // The backup's NVRAM and TPM state, checked, for copies the throwaway VM uses.
            for s in &kept {
                let bytes =
                    crate::vmstate::read_state(&self.images, &dir, s, key.as_ref(), cancel).map_err(at(Step::Check))?;
                state.push((s.clone(), bytes));
            }
        }
        let console_log = work.join("console.log");
        let nvram = work.join("nvram.fd");
        let has_nvram = state.iter().any(|(s, _)| s.kind == nasbak_repo::StateKind::Nvram);
        let xml = throwaway_definition(
            &saved,
            &Throwaway {
                name: &name,
                uuid: &uuid,
                disks: &swaps,
                console_log: &console_log,
                agent: true,
                nvram: has_nvram.then_some(nvram.as_path()),
            },
        )?;
        // The copies in the throwaway VM's places: its NVRAM in the work directory, its TPM's
        // state where libvirt keeps it for its UUID (removed with it).
        let throwaway = nasbak_libvirt::Domain::parse(&xml)?;
        let kept_state: Vec<nasbak_repo::ManifestState> = state.iter().map(|(s, _)| s.clone()).collect();
        let places = crate::vmstate::placements(&kept_state, &throwaway)
            .map_err(|problems| BackupError::Mismatch { vm: name.clone(), problems })?;
        if let Some(dir) =
            throwaway.tpm_state_dir().filter(|_| kept_state.iter().any(|s| s.kind == nasbak_repo::StateKind::Tpm))
        {
            guard.add_tpm_dir(dir.parent().unwrap_or(&dir))?;
        }
        let files: Vec<_> = places.into_iter().zip(state).map(|((s, place), (_, bytes))| (s, place, bytes)).collect();
        crate::vmstate::put_back(&files).map_err(at(Step::State))?;
        if let Err(e) = self.hypervisor.start_with_xml(&xml) {
            return record(
                BootResult::Failed,
                format!("the throwaway VM did not start: {e}"),
                tail(&console_log),
                None,
            );
        }
        guard.started = true;
        crate::fault::point("boot-started");
        let booting = Instant::now();
        let (result, detail, answered) = self.wait_for_agent(&name, request, (booting, &console_log), cancel)?;
        let console = if result == BootResult::Passed { Vec::new() } else { tail(&console_log) };
        drop(guard);
        record(result, detail, console, answered)
    }

    /// Waits until the throwaway VM `name`'s guest agent answers (and the request's check
    /// passes), it stops, its console (`console_log`) shows that the boot failed (see
    /// [`BOOT_FAILED`]), or the request's timeout: the result and what happened, in words.
    fn wait_for_agent(
        &self,
        name: &str,
        request: &BootVerifyRequest,
        (started, console_log): (Instant, &Path),
        cancel: &CancelHandle,
    ) -> Result<(BootResult, String, Option<Duration>), BackupError> {
        let deadline = Instant::now() + request.timeout;
        let mut answered_after = None;
        // Every libvirt call of the wait ends by the timeout, whatever the throwaway's QEMU does.
        let _scope = nasbak_libvirt::deadline::scope(deadline);
        let did_not_answer = || format!("the guest agent did not answer within {} s", request.timeout.as_secs());
        let outcome = loop {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break (BootResult::Failed, did_not_answer());
            }
            match self.hypervisor.domain_state(name) {
                Ok(DomainState::Running) => {}
                Err(_) if Instant::now() >= deadline => break (BootResult::Failed, did_not_answer()),
                Err(e) if e.is_timeout() => break (BootResult::Failed, format!("the throwaway VM: {e}")),
                _ => {
                    break (
                        BootResult::Failed,
                        "the throwaway VM stopped (crashed, or powered off) before its agent answered".to_owned(),
                    );
                }
            }
            // The firmware (or the kernel) said it gave up: waiting longer shows nothing more.
            if let Some(line) = boot_failed(console_log) {
                break (
                    BootResult::Failed,
                    format!(
                        "the boot failed after {:.1} s: the console says {line:?}",
                        started.elapsed().as_secs_f64()
                    ),
                );
            }
            // Each ping ends by the deadline too (the agent's calls have their own).
            let ping = left.min(Duration::from_secs(5));
            let agent = self.agents.agent_transport(name).map(|t| GuestAgent::new(t, ping));
            if let Ok(agent) = agent
                && agent.ping().is_ok()
            {
                let answered = started.elapsed();
                answered_after = Some(answered);
                break match &request.check {
                    None => {
                        (BootResult::Passed, format!("the guest agent answered after {:.1} s", answered.as_secs_f64()))
                    }
                    Some(check) => run_check(&agent, check, deadline, cancel)?,
                };
            }
            cancel.sleep(Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())));
        };
        Ok((outcome.0, outcome.1, answered_after))
    }
}

/// Runs `check` through the agent until it ends or `deadline`.
fn run_check<T: nasbak_agent::AgentTransport>(
    agent: &GuestAgent<T>,
    check: &str,
    deadline: Instant,
    cancel: &CancelHandle,
) -> Result<(BootResult, String), BackupError> {
    let pid = match agent.exec("/bin/sh", &["-c", check]) {
        Ok(pid) => pid,
        Err(e) => return Ok((BootResult::Failed, format!("the check `{check}` could not be started: {e}"))),
    };
    loop {
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        match agent.exec_status(pid) {
            Ok(s) if s.exited => {
                let out = [s.out_data, s.err_data]
                    .into_iter()
                    .flatten()
                    .filter_map(|b| base64_decode(&b))
                    .collect::<Vec<_>>()
                    .join("");
                let out = out.trim();
                return Ok(match (s.exitcode, s.signal) {
                    (Some(0), _) => (BootResult::Passed, format!("the guest agent answered and `{check}` exited 0")),
                    (code, signal) => (
                        BootResult::Failed,
                        format!(
                            "the check `{check}` failed ({}){}",
                            code.map_or_else(|| format!("signal {}", signal.unwrap_or(0)), |c| format!("exit {c}")),
                            if out.is_empty() { String::new() } else { format!(": {out}") }
                        ),
                    ),
                });
            }
            Ok(_) => {}
            Err(e) => return Ok((BootResult::Failed, format!("the check `{check}` could not be followed: {e}"))),
        }
        if Instant::now() > deadline {
            return Ok((BootResult::Failed, format!("the check `{check}` did not end in time")));
        }
        cancel.sleep(Duration::from_millis(500));
    }
}

fn base64_decode(text: &str) -> Option<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// What a console shows when a boot has failed for good: the firmware found nothing to boot
/// after trying every device (SeaBIOS, OVMF), a boot sector's own last words, or the kernel gave
/// up. Matched case-insensitively. Not "Boot failed: ..." alone: SeaBIOS says it of each device
/// it cannot boot (an empty CD-ROM drive) before it tries the next.
const BOOT_FAILED: &[&str] = &[
    "no bootable device",
    "no bootable option or device was found",
    "operating system not found",
    "missing operating system",
    "kernel panic - not syncing",
];

/// The first console line showing the boot failed (see [`BOOT_FAILED`]), if any.
fn boot_failed(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    // The last 64 KiB are enough: a firmware that gave up prints it last, and retries.
    let mut file = fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .find(|l| {
            let lower = l.to_lowercase();
            BOOT_FAILED.iter().any(|m| lower.contains(m))
        })
        .map(|l| l.trim().to_owned())
}

/// The console's last lines, control characters dropped.
fn tail(log: &Path) -> Vec<String> {
    let bytes = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control() || *c == '\t').collect::<String>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(CONSOLE_LINES)..].to_vec()
}

/// In a verification's directory: the pid of the process running it.
const OWNER_FILE: &str = "owner";
/// In a verification's directory: the NBD sockets of its exports, a line each.
const SOCKETS_FILE: &str = "sockets";
/// In a verification's directory: the TPM state directory made for its throwaway VM.
const TPM_DIR_FILE: &str = "tpm-dir";

/// Removes a TPM state directory made for a throwaway VM (`/var/lib/libvirt/swtpm/<uuid>`),
/// only one of that shape.
fn remove_tpm_dir(dir: &Path) {
    let ours = dir.parent() == Some(Path::new("/var/lib/libvirt/swtpm"))
        && dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| uuid::Uuid::parse_str(n).is_ok());
    if ours {
        let _ = fs::remove_dir_all(dir);
    }
}

/// What verifications whose process died (killed, so that no guard ran) left under
/// `work_dir`: their throwaway domain (named like the directory) destroyed, their exports
/// stopped, their directory removed.
fn sweep_abandoned<H: Hypervisor>(hypervisor: &H, work_dir: &Path) {
    let Ok(entries) = fs::read_dir(work_dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = fs::read_to_string(e.path().join(OWNER_FILE)).ok().and_then(|p| p.trim().parse::<u32>().ok());
        let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !name.starts_with("nasbak-verify-") || alive {
            continue;
        }
        let _ = hypervisor.destroy(&name);
        for socket in fs::read_to_string(e.path().join(SOCKETS_FILE)).unwrap_or_default().lines() {
            let _ = ReadOnlyExport::stop_at(Path::new(socket), STOP_TIMEOUT);
        }
        if let Ok(tpm) = fs::read_to_string(e.path().join(TPM_DIR_FILE)) {
            remove_tpm_dir(Path::new(tpm.trim()));
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

/// The throwaway domain destroyed, its exports stopped and its directory removed, on every path
/// out.
struct BootGuard<'a, H: Hypervisor> {
    hypervisor: &'a H,
    name: String,
    dir: PathBuf,
    sockets: Vec<PathBuf>,
    started: bool,
    /// The TPM state directory made for the throwaway VM.
    tpm_dir: Option<PathBuf>,
    /// The secret an encrypted overlay's key is in: undefined after the domain is destroyed
    /// (a field drops after the guard's own drop).
    secret: Option<TransientSecret<'a, H>>,
}

impl<H: Hypervisor> BootGuard<'_, H> {
    /// Records the TPM state directory made for the throwaway VM (here and in the directory).
    fn add_tpm_dir(&mut self, dir: &Path) -> Result<(), BackupError> {
        self.tpm_dir = Some(dir.to_owned());
        let path = self.dir.join(TPM_DIR_FILE);
        fs::write(&path, dir.to_string_lossy().as_bytes()).map_err(|source| BackupError::Io {
            action: "writing",
            path,
            source,
        })
    }

    /// Records an export's socket (here and in the directory, for a sweep after a kill).
    fn add_socket(&mut self, socket: &Path) -> Result<(), BackupError> {
        self.sockets.push(socket.to_owned());
        let list: Vec<String> = self.sockets.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let path = self.dir.join(SOCKETS_FILE);
        fs::write(&path, list.join("\n")).map_err(|source| BackupError::Io { action: "writing", path, source })
    }
}

impl<H: Hypervisor> Drop for BootGuard<'_, H> {
    fn drop(&mut self) {
        if self.started {
            // Destroying needs no answer from the throwaway's QEMU (libvirt kills it), but it
            // gets a budget of its own after the verification's deadline.
            let _scope = nasbak_libvirt::deadline::scope(
                Instant::now() + nasbak_libvirt::deadline::CLEANUP_BUDGET + Duration::from_secs(30),
            );
            let _ = self.hypervisor.destroy(&self.name);
        }
        for socket in &self.sockets {
            let _ = ReadOnlyExport::stop_at(socket, STOP_TIMEOUT);
        }
        if let Some(dir) = &self.tpm_dir {
            remove_tpm_dir(dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod console_tests {
    use super::*;

    #[test]
    fn a_console_shows_a_failed_boot_only_when_nothing_is_left_to_try() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        assert_eq!(boot_failed(&log), None, "no console yet");
        let tried = "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\nBooting from DVD/CD...\r\n\
                     Boot failed: Could not read from CDROM (code 0003)\r\nBooting from Hard Disk...\r\n";
        fs::write(&log, tried).unwrap();
        assert_eq!(boot_failed(&log), None, "one device failing is no failed boot");
        fs::write(
            &log,
            format!("{tried}Boot failed: not a bootable disk\r\n\r\nNo bootable device.  Retrying in 60 seconds.\r\n"),
        )
        .unwrap();
        assert_eq!(boot_failed(&log).as_deref(), Some("No bootable device.  Retrying in 60 seconds."));
        fs::write(&log, "[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n").unwrap();
        assert!(boot_failed(&log).unwrap().starts_with("[    1.2] Kernel panic"));
        // Only the last 64 KiB are read: an old failure scrolled far back is not the boot's.
        let mut long = String::from("No bootable device.\n");
        long.push_str(&"x".repeat(70 << 10));
        fs::write(&log, long).unwrap();
        assert_eq!(boot_failed(&log), None);
    }
}
