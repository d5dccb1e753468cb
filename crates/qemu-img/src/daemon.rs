//! Copying what a dirty bitmap marks, from an image no VM has open: qemu-storage-daemon opens the
//! source read-only and runs QEMU's backup job (`sync=bitmap`, the bitmap left as it is) into a
//! new qcow2 file, driven over its QMP socket. This is what libvirt's incremental push job does
//! for a running VM, for a shut-off one.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nasbak_process::CancelHandle;
use serde_json::{Value, json};

use crate::error::{ImageError, ProgressFn};
use crate::stored::{
    KEY_SECRET_ID, StoredImage, StoredLayout, TARGET_KEY_SECRET_ID, TargetProtection, escape_opt, key_object_args,
};

/// A copy of the clusters a bitmap marks dirty.
#[derive(Debug, Clone)]
pub struct DirtyCopy {
    /// The qcow2 image (its VM shut off), opened read-only.
    pub source: PathBuf,
    /// The persistent bitmap whose dirty clusters are copied.
    pub bitmap: String,
    /// The new qcow2 file (created by the copy, of the source's virtual size); the clusters not
    /// copied stay unallocated, to be read from a backing file.
    pub target: PathBuf,
    /// Cancelling it cancels the job and stops the daemon.
    pub cancel: CancelHandle,
    /// How the target is written (compressed clusters, encrypted, both); none: plain.
    pub protection: Option<TargetProtection>,
}

/// Runs `copy` with `qemu-storage-daemon` (its QMP socket in `runtime_dir`) into its target,
/// already created as an empty qcow2 of the source's size; tells progress in percent; gives up
/// after `timeout`.
pub(crate) fn copy_dirty(
    copy: &DirtyCopy,
    runtime_dir: &Path,
    timeout: Duration,
    progress: &ProgressFn,
) -> Result<(), ImageError> {
    let err = |detail: String| ImageError::Daemon { action: "copying a bitmap's dirty clusters", detail };
    if copy.cancel.is_cancelled() {
        return Err(err("cancelled".into()));
    }
    std::fs::create_dir_all(runtime_dir).map_err(|e| err(format!("creating {}: {e}", runtime_dir.display())))?;
    let socket = runtime_dir.join(format!("qsd-{}-{}.sock", std::process::id(), unique()));
    let _ = std::fs::remove_file(&socket);
    let source = json!({
        "driver": "qcow2", "node-name": "src", "read-only": true,
        "file": {"driver": "file", "filename": copy.source, "read-only": true}
    });
    let mut target = target_node(&copy.target, copy.protection.as_ref().map(|p| p.layout));
    target["node-name"] = json!("tgt");
    let compress = copy.protection.as_ref().is_some_and(|p| p.compressed);
    let key = copy.protection.as_ref().and_then(|p| p.key.as_deref());
    let mut command = Command::new("qemu-storage-daemon");
    // SAFETY: between fork and exec the closure only makes the prctl system call, which is
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            // Should nasbak die (SIGKILL included), the daemon goes with it rather than keep the
            // VM's image open.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut daemon = Daemon(
        command
            .arg("--chardev")
            .arg(format!("socket,id=qmp,path={},server=on,wait=off", socket.display()))
            .args(["--monitor", "chardev=qmp"])
            .args(key_object_args(TARGET_KEY_SECRET_ID, key))
            .arg("--blockdev")
            .arg(source.to_string())
            .arg("--blockdev")
            .arg(target.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("starting qemu-storage-daemon: {e}")))?,
        socket.clone(),
    );
    let mut qmp = Qmp::connect(&socket, &mut daemon.0).map_err(err)?;
    let result = (|| {
        qmp.execute(
            "blockdev-backup",
            json!({"job-id": "copy", "device": "src", "target": "tgt", "sync": "bitmap",
                   "bitmap": copy.bitmap, "bitmap-mode": "never", "auto-dismiss": false,
                   "compress": compress}),
        )?;
        qmp.wait_job("copy", Instant::now() + timeout, &copy.cancel, progress)
    })();
    let _ = qmp.execute("quit", json!({}));
    let exited = daemon.wait(Duration::from_secs(30));
    result.map_err(|detail: String| {
        if copy.cancel.is_cancelled() {
            err("cancelled".into())
        } else {
            err(format!("{detail}{}", exited.err().map(|e| format!("; {e}")).unwrap_or_default()))
        }
    })
}

/// The block node of a new qcow2 file at `path` written as `layout` says (plain without one), its
/// key the target key.
fn target_node(path: &Path, layout: Option<StoredLayout>) -> Value {
    let file = json!({"driver": "file", "filename": path});
    match layout {
        None | Some(StoredLayout::Qcow2) => json!({"driver": "qcow2", "file": file}),
        Some(StoredLayout::Qcow2Luks) => json!({
            "driver": "qcow2", "file": file,
            "encrypt": {"format": "luks", "key-secret": TARGET_KEY_SECRET_ID}
        }),
        Some(StoredLayout::Qcow2InLuks) => json!({
            "driver": "qcow2",
            "file": {"driver": "luks", "key-secret": TARGET_KEY_SECRET_ID, "file": file}
        }),
    }
}

/// A new protected qcow2 file written as a plain raw file: qemu-storage-daemon opens the target
/// (as its protection says, with the chain it builds on) and exports it writable over FUSE at a
/// mount point, so that a writer that knows only raw files, libvirt's push job, writes it
/// compressed (through QEMU's `compress` filter), encrypted, or both.
///
/// The daemon dies with this process (SIGKILL included); the writer then gets write errors,
/// never a file that looks complete. [`WritableExport::finish`] flushes and stops it: only then
/// is the target complete.
pub struct WritableExport {
    daemon: Daemon,
    qmp: Qmp,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for WritableExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritableExport").field("mountpoint", &self.mountpoint).finish_non_exhaustive()
    }
}

impl WritableExport {
    /// Exports `target` (an existing, empty protected qcow2, see `ImageTool::create_protected`)
    /// writable at `mountpoint` (created as an empty file, mode 0600, readable by others through
    /// the export for QEMU), its backing chain `backing` given when it builds on one. The QMP
    /// socket goes in `runtime_dir`.
    pub fn start(
        target: &Path,
        protection: &TargetProtection,
        backing: Option<&StoredImage>,
        mountpoint: &Path,
        runtime_dir: &Path,
    ) -> Result<WritableExport, ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "exporting a backup target", detail };
        std::fs::create_dir_all(runtime_dir).map_err(|e| err(format!("creating {}: {e}", runtime_dir.display())))?;
        if fs_mounted(mountpoint) {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        std::fs::write(mountpoint, b"").map_err(|e| err(format!("creating {}: {e}", mountpoint.display())))?;
        let socket = runtime_dir.join(format!("qsd-{}-{}.sock", std::process::id(), unique()));
        let _ = std::fs::remove_file(&socket);
        let mut node = target_node(target, Some(protection.layout));
        if let Some(b) = backing {
            node["backing"] = b.json(true);
        }
        node["node-name"] = json!("tgt");
        let mut blockdevs = vec![node.to_string()];
        let exported = if protection.compressed {
            blockdevs.push(json!({"driver": "compress", "node-name": "out", "file": "tgt"}).to_string());
            "out"
        } else {
            "tgt"
        };
        let mut command = Command::new("qemu-storage-daemon");
        // SAFETY: as in `copy_dirty`: only the async-signal-safe prctl between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        command
            .arg("--chardev")
            .arg(format!("socket,id=qmp,path={},server=on,wait=off", socket.display()))
            .args(["--monitor", "chardev=qmp"])
            .args(key_object_args(KEY_SECRET_ID, backing.and_then(|b| b.key.as_deref())))
            .args(key_object_args(TARGET_KEY_SECRET_ID, protection.key.as_deref()));
        for b in &blockdevs {
            command.arg("--blockdev").arg(b);
        }
        let mut daemon = Daemon(
            command
                .arg("--export")
                .arg(format!(
                    "type=fuse,id=out,node-name={exported},mountpoint={},writable=on,allow-other=on",
                    escape_opt(&mountpoint.to_string_lossy())
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| err(format!("starting qemu-storage-daemon: {e}")))?,
            socket,
        );
        // The greeting comes once the daemon has processed its options: the export is mounted.
        let qmp = Qmp::connect(&daemon.1.clone(), &mut daemon.0).map_err(err)?;
        if !fs_mounted(mountpoint) {
            return Err(err(format!("the export at {} is not mounted", mountpoint.display())));
        }
        Ok(WritableExport { daemon, qmp, mountpoint: mountpoint.to_owned() })
    }

    /// The raw file the writer writes.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Flushes the target and stops the daemon, within `timeout`: the target is complete when
    /// this returns `Ok`.
    pub fn finish(mut self, timeout: Duration) -> Result<(), ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "finishing a backup target", detail };
        if let Err(e) = self.qmp.execute("quit", json!({})) {
            // The daemon went away before it was asked to: say how it ended, not only that
            // its socket closed.
            let ended = match self.daemon.wait(Duration::from_secs(2)) {
                Ok(()) => "qemu-storage-daemon had exited with success".to_owned(),
                Err(how) => how,
            };
            return Err(err(format!("{e}; {ended}")));
        }
        self.daemon.wait(timeout).map_err(err)
    }
}

impl Drop for WritableExport {
    fn drop(&mut self) {
        if self.daemon.0.try_wait().ok().flatten().is_none() {
            let _ = self.daemon.0.kill();
            let _ = self.daemon.0.wait();
        }
        if fs_mounted(&self.mountpoint) {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_file(&self.mountpoint);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The daemon process, killed and its socket removed on drop.
struct Daemon(Child, PathBuf);

impl Daemon {
    /// Waits up to `limit` for the daemon to exit (after `quit`); its stderr when it failed.
    fn wait(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut text = String::new();
                    if let Some(mut e) = self.0.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut text);
                    }
                    return Err(format!("qemu-storage-daemon exited with {status}: {}", text.trim()));
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return Err("qemu-storage-daemon did not exit".into()),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        let _ = std::fs::remove_file(&self.1);
    }
}

/// A QMP connection: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects once the daemon listens (up to 10 s), reads the greeting, negotiates.
    fn connect(socket: &Path, child: &mut Child) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline && child.try_wait().ok().flatten().is_none() => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let mut text = String::new();
                    if let Some(mut stderr) = child.stderr.take()
                        && child.try_wait().ok().flatten().is_some()
                    {
                        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
                    }
                    return Err(format!("its QMP socket {} does not answer: {e} {}", socket.display(), text.trim()));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the QMP connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("unreadable QMP reply {line:?}: {e}")),
            Err(e) => Err(format!("reading from QMP: {e}")),
        }
    }

    /// Runs one command; its `return`, or its error's description.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut message = json!({"execute": command});
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            message["arguments"] = arguments;
        }
        writeln!(self.writer, "{message}").map_err(|e| format!("writing to QMP: {e}"))?;
        loop {
            let reply = self.read()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(format!("{command}: {}", e["desc"].as_str().unwrap_or("failed")));
            }
            // An event: skipped.
        }
    }

    /// Waits for job `id` to conclude (polled every 20 ms), telling progress; cancels it at a
    /// cancel or the deadline. Dismisses it.
    fn wait_job(
        &mut self,
        id: &str,
        deadline: Instant,
        cancel: &CancelHandle,
        progress: &ProgressFn,
    ) -> Result<(), String> {
        let mut cancelled = None;
        loop {
            let jobs = self.execute("query-jobs", json!({}))?;
            let job = jobs.as_array().and_then(|j| j.iter().find(|j| j["id"] == id)).cloned();
            let Some(job) = job else { return Err(format!("job {id} disappeared")) };
            let total = job["total-progress"].as_f64().unwrap_or(0.0);
            if total > 0.0 {
                progress(job["current-progress"].as_f64().unwrap_or(0.0) / total * 100.0);
            }
            if job["status"] == "concluded" {
                let _ = self.execute("job-dismiss", json!({"id": id}));
                if let Some(why) = cancelled {
                    return Err(why);
                }
                if cancel.is_cancelled() {
                    return Err("cancelled".into());
                }
                return match job.get("error").and_then(Value::as_str) {
                    Some(e) => Err(format!("job {id}: {e}")),
                    None => Ok(()),
                };
            }
            if cancelled.is_none() && (cancel.is_cancelled() || Instant::now() > deadline) {
                let why = if cancel.is_cancelled() { "cancelled".to_owned() } else { format!("job {id} timed out") };
                let _ = self.execute("job-cancel", json!({"id": id}));
                cancelled = Some(why);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How a read-only export shows an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportKind {
    /// A raw file (FUSE): for tools that read files (loop devices, mount, partx).
    Fuse,
    /// An NBD server on a unix socket, export name `image`: for QEMU, whose NBD client never
    /// blocks its main loop (reads of a FUSE file stuck on an unreachable repository would).
    Nbd,
}

/// A disk image (with its backing chain) shown read-only through an export of a
/// qemu-storage-daemon that runs on its own, beyond the process that started it, until
/// [`ReadOnlyExport::stop`]: a raw file (FUSE) or an NBD unix socket. Nothing is ever written
/// to the image: the daemon opens it, and every file of its chain, read-only, and the export
/// refuses writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOnlyExport {
    /// The file showing the image's guest-visible content (its virtual size, raw), or the NBD
    /// server's unix socket.
    pub file: PathBuf,
    /// The daemon's process id.
    pub pid: u32,
}

/// The NBD URI of the export served on `socket` (for a backing file name), or `None` when the
/// path holds characters a URI would need escaped.
pub fn nbd_uri(socket: &Path) -> Option<String> {
    let s = socket.to_str()?;
    s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)).then(|| format!("nbd+unix:///image?socket={s}"))
}

/// How long a daemon sent SIGKILL is given to end before stopping it is an error.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl ReadOnlyExport {
    /// Exports `image` (of `format`, `qcow2` or `raw`) read-only at `file`, a new or empty
    /// regular file (created if missing); returns once the export is up, or fails within
    /// `timeout`. The daemon's pid is kept beside the file, so that another process can find
    /// the export again ([`ReadOnlyExport::find`]).
    ///
    /// The daemon keeps `hold` open for as long as it runs: a lock on it (a shared `flock`
    /// registering a user of the repository the image is on) lasts as long as the export.
    pub fn start(
        image: &Path,
        format: &str,
        file: &Path,
        timeout: Duration,
        hold: Option<&std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError> {
        ReadOnlyExport::start_as(ExportKind::Fuse, image, format, file, timeout, hold)
    }

    /// As [`ReadOnlyExport::start`], shown as `kind`: for [`ExportKind::Nbd`], `file` is the
    /// unix socket to create (it must not exist), opened to every local user (QEMU runs as its
    /// own user).
    pub fn start_as(
        kind: ExportKind,
        image: &Path,
        format: &str,
        file: &Path,
        timeout: Duration,
        hold: Option<&std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "exporting an image read-only", detail };
        // The daemon leaves the working directory: it is given absolute paths.
        let absolute = |p: &Path| std::path::absolute(p).map_err(|e| err(format!("{}: {e}", p.display())));
        let (image, file) = (&absolute(image)?, &absolute(file)?);
        if !matches!(format, "qcow2" | "raw") {
            return Err(err(format!("{format:?} is not an image format nasbak exports; expected qcow2 or raw")));
        }
        Self::check_export_file(kind, file)?;
        let node = json!({
            "driver": format, "node-name": "image", "read-only": true,
            "file": {"driver": "file", "filename": image, "read-only": true}
        });
        Self::start_node(kind, node, Vec::new(), file, timeout, hold)
    }

    /// [`ReadOnlyExport::start_as`] of a stored chain (compressed, encrypted or both), opened
    /// file by file with its key (read by the daemon as it starts).
    pub fn start_stored(
        kind: ExportKind,
        image: &StoredImage,
        file: &Path,
        timeout: Duration,
        hold: Option<&std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "exporting an image read-only", detail };
        let file = &std::path::absolute(file).map_err(|e| err(format!("{}: {e}", file.display())))?;
        Self::check_export_file(kind, file)?;
        let mut node = image.json(true);
        node["node-name"] = json!("image");
        node["read-only"] = json!(true);
        let objects = if image.needs_key() { key_object_args(KEY_SECRET_ID, image.key.as_deref()) } else { Vec::new() };
        Self::start_node(kind, node, objects, file, timeout, hold)
    }

    /// `file` may take an export of `kind`: an empty file for FUSE (created when missing), a
    /// path with nothing at it for an NBD socket.
    fn check_export_file(kind: ExportKind, file: &Path) -> Result<(), ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "exporting an image read-only", detail };
        match (kind, std::fs::metadata(file)) {
            (ExportKind::Fuse, Ok(m)) if m.is_file() && m.len() == 0 => Ok(()),
            (ExportKind::Fuse, Ok(_)) => Err(err(format!("{} exists and is not an empty file", file.display()))),
            (ExportKind::Fuse, Err(_)) => {
                std::fs::File::create(file).map(drop).map_err(|e| err(format!("creating {}: {e}", file.display())))
            }
            (_, Ok(_)) => Err(err(format!("{} exists", file.display()))),
            (_, Err(_)) => Ok(()),
        }
    }

    /// Starts the daemon exporting block node `node` (named `image`) at `file`.
    fn start_node(
        kind: ExportKind,
        node: Value,
        objects: Vec<String>,
        file: &Path,
        timeout: Duration,
        hold: Option<&std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "exporting an image read-only", detail };
        let pid_file = pid_file(file);
        let _ = std::fs::remove_file(&pid_file);
        let export = match kind {
            ExportKind::Fuse => json!({
                "type": "fuse", "id": "export", "node-name": "image", "mountpoint": file, "writable": false
            }),
            _ => json!({"type": "nbd", "id": "export", "node-name": "image", "name": "image", "writable": false}),
        };
        let server = json!({"addr": {"type": "unix", "path": file}});
        // A duplicate of `hold` (the same open file, so the same lock) that the daemon inherits:
        // the only descriptor made inheritable, closed here once the daemon runs.
        let inherited = match hold {
            Some(f) => {
                let dup = f.try_clone().map_err(|e| err(format!("duplicating the file to hold: {e}")))?;
                nix::fcntl::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&dup),
                    nix::fcntl::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map_err(|e| err(format!("making the file to hold inheritable: {e}")))?;
                Some(dup)
            }
            None => None,
        };
        let mut command = nasbak_process::ExternalCommand::new("qemu-storage-daemon")
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(&pid_file)
            .args(objects)
            .arg("--blockdev")
            .arg(node.to_string());
        if kind == ExportKind::Nbd {
            command = command.arg("--nbd-server").arg(server.to_string());
        }
        let started = command.arg("--export").arg(export.to_string()).timeout(timeout).run();
        drop(inherited);
        started.map_err(|e| err(e.to_string()))?;
        if kind == ExportKind::Nbd {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o666))
                .map_err(|e| err(format!("opening {} to QEMU: {e}", file.display())))?;
        }
        ReadOnlyExport::find(file).ok_or_else(|| err(format!("the daemon exporting {} is not running", file.display())))
    }

    /// The export at `file` whose daemon still runs (found by the pid kept beside it, and
    /// checked to be a qemu-storage-daemon exporting that file).
    pub fn find(file: &Path) -> Option<ReadOnlyExport> {
        let file = &std::path::absolute(file).ok()?;
        let pid: u32 = std::fs::read_to_string(pid_file(file)).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let file_json = serde_json::to_string(&file.to_string_lossy()).ok()?;
        (cmdline.contains("qemu-storage-daemon") && cmdline.contains(&file_json))
            .then(|| ReadOnlyExport { file: file.to_owned(), pid })
    }

    /// Ends whatever export is at `file`: its daemon stopped if one runs, a FUSE mount left by
    /// a daemon that died detached, an NBD socket removed, the pid file removed. Whether there
    /// was anything to end.
    pub fn stop_at(file: &Path, timeout: Duration) -> Result<bool, ImageError> {
        let Ok(file) = std::path::absolute(file) else { return Ok(false) };
        let mounted = fs_mounted(&file);
        match ReadOnlyExport::find(&file) {
            Some(export) => export.stop(timeout).map(|()| true),
            None if mounted => ReadOnlyExport { file, pid: 0 }.stop(timeout).map(|()| true),
            None => {
                let _ = std::fs::remove_file(pid_file(&file));
                if std::fs::symlink_metadata(&file)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(&file);
                }
                Ok(false)
            }
        }
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after `timeout`), which ends the export; a FUSE
    /// mount still left on the file is detached; the pid file is removed. The file itself
    /// stays, empty.
    pub fn stop(&self, timeout: Duration) -> Result<(), ImageError> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let err = |detail: String| ImageError::Daemon { action: "stopping a read-only export", detail };
        let pid = Pid::from_raw(self.pid as i32);
        // Ended: reaped, or a zombie whose threads have all ended. A thread-group leader is a
        // zombie as soon as its own thread exits, while the daemon's other threads may still
        // hold its files (and the locks they carry): those are let go with the last thread.
        let gone = || {
            let zombie = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).map_or(true, |stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
            });
            let threads = std::fs::read_dir(format!("/proc/{}/task", self.pid)).map_or(0, Iterator::count);
            zombie && threads <= 1
        };
        let wait = |limit: Duration| {
            let deadline = Instant::now() + limit;
            while !gone() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            gone()
        };
        if ReadOnlyExport::find(&self.file).is_some() {
            let _ = kill(pid, Signal::SIGTERM);
            if !wait(timeout) {
                let _ = kill(pid, Signal::SIGKILL);
                if !wait(KILL_WAIT) {
                    return Err(err(format!(
                        "the daemon exporting {} (pid {}) still runs {KILL_WAIT:?} after SIGKILL",
                        self.file.display(),
                        self.pid
                    )));
                }
            }
        }
        if fs_mounted(&self.file) {
            nix::mount::umount2(&self.file, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| err(format!("detaching the export at {}: {e}", self.file.display())))?;
        }
        if std::fs::symlink_metadata(&self.file)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(&self.file);
        }
        let _ = std::fs::remove_file(pid_file(&self.file));
        Ok(())
    }
}

/// Whether something is mounted on `file` (mountinfo).
fn fs_mounted(file: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = file.to_string_lossy().replace(' ', "\\040");
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

/// Where the pid of the daemon exporting `file` is kept: `.<file name>.pid` beside it.
fn pid_file(file: &Path) -> PathBuf {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    file.with_file_name(format!(".{name}.pid"))
}
