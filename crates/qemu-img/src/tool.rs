//! The image-tool seam and its real implementation over the qemu-img binary.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasbak_process::{CancelHandle, CommandError, ExternalCommand};

use crate::convert::{ConvertRequest, last_progress};
use crate::daemon::{DirtyCopy, ExportKind, ReadOnlyExport, WritableExport};
use crate::error::{ImageError, ProgressFn, WRONG_KEY};
use crate::info::{CheckReport, CheckVerdict, ImageFormat, ImageInfo, parse_check, parse_info};
use crate::location::{ImageLocation, filename_for, objects_for};
use crate::luks::{LuksError, LuksFile};
use crate::stored::{
    StoredFile, StoredImage, StoredLayout, TARGET_KEY_SECRET_ID, TargetProtection, escape_opt, key_object_args,
};

/// The payload a LUKS container needs for a qcow2 of `size` bytes written in full: the data,
/// its L2 and refcount tables (well under 1/512 of it) and 32 MiB for the rest of the metadata.
pub(crate) fn container_payload(size: u64) -> u64 {
    let bytes = size + size / 512 + (32 << 20);
    bytes.div_ceil(1 << 20) << 20
}

/// `--target-image-opts` of the encrypted file at `path` laid out as `layout` (the qcow2 inside a
/// LUKS container, or a LUKS-encrypted qcow2), keyed by the target key.
fn encrypted_image_opts(path: &Path, layout: StoredLayout) -> String {
    let file = escape_opt(&path.to_string_lossy());
    match layout {
        StoredLayout::Qcow2InLuks => {
            format!("driver=qcow2,file.driver=luks,file.key-secret={TARGET_KEY_SECRET_ID},file.file.filename={file}")
        }
        _ => format!("driver=qcow2,encrypt.key-secret={TARGET_KEY_SECRET_ID},file.filename={file}"),
    }
}

/// What a command's output is handed to, chunk by chunk.
type OutputFn = dyn Fn(&[u8]) + Send + Sync;

/// The passphrase in the key file `path`: its bytes as they are, as QEMU's secret objects read
/// them (`file=`), zeroed when dropped.
fn read_passphrase(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, ImageError> {
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|source| LuksError::Io { action: "read the key in", path: path.to_owned(), source }.into())
}

/// `image` is to be encrypted and no key was given.
fn no_key(image: &Path) -> ImageError {
    ImageError::Output {
        action: "create",
        detail: format!("{} is to be encrypted and no key was given", image.display()),
    }
}

/// The key given opens none of `file`'s keyslots.
fn wrong_key(file: &StoredFile) -> ImageError {
    LuksError::WrongKey { path: file.path.clone() }.into()
}

/// Removes a file on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How long removing an RBD image waits for the watch of a client that died with it open.
const RBD_WATCH_WAIT: Duration = Duration::from_secs(60);
/// How long the in-process metadata check of one file may take before qemu-img is asked
/// instead (a repository that stalls).
const QUICK_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the qcow2 file at `path` is one [`crate::metacheck`] checks and finds clean, and its
/// backing file (if it names one) is there: read on a thread of its own, so that a repository
/// that stalls costs `timeout` and not the caller's thread.
fn quick_check_is_clean(path: &Path, timeout: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    let spawned = std::thread::Builder::new().name("nasbak-check".into()).spawn(move || {
        let clean = crate::metacheck::check(&path).is_ok_and(|c| c.is_some_and(|c| c.clean()))
            && crate::metacheck::backing_of(&path).is_ok_and(|b| b.is_none_or(|b| b.is_file()));
        let _ = tx.send(clean);
    });
    spawned.is_ok() && rx.recv_timeout(timeout).unwrap_or(false)
}

/// What [`ImageTool::begin_rekey`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rekeyed {
    /// The file had the old key (in keyslot `old_slot`): it has the new one too now.
    Added {
        /// The keyslot the old key opens, for [`ImageTool::finish_rekey`].
        old_slot: usize,
    },
    /// The file had the new key only already.
    Already,
}

/// What nasbak needs from an image tool.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait ImageTool {
    /// Information about an image and its backing chain (the image first).
    fn info(&self, image: &ImageLocation) -> Result<Vec<ImageInfo>, ImageError>;
    /// Converts (copies) an image, reporting progress.
    fn convert(&self, request: &ConvertRequest, progress: Arc<ProgressFn>) -> Result<(), ImageError>;
    /// Writes what the qcow2 file `top` and every file between it and `base` hold into `base`
    /// (`qemu-img commit -d -b base`), so that `base` reads as `top` did; `top` and the files
    /// between are left as they were in content but no longer needed. All are nasbak's own
    /// copies (the files are opened read-write). Cancelling kills qemu-img.
    fn commit(
        &self,
        top: &Path,
        base: &Path,
        cancel: &CancelHandle,
        progress: Arc<ProgressFn>,
    ) -> Result<(), ImageError>;
    /// Checks an image's consistency.
    fn check(&self, image: &ImageLocation, format: &ImageFormat) -> Result<CheckReport, ImageError>;
    /// Whether two images have the same guest-visible content.
    fn compare(&self, a: &ImageLocation, b: &ImageLocation) -> Result<bool, ImageError>;
    /// Creates an empty image of `size` bytes.
    fn create(&self, image: &ImageLocation, format: &ImageFormat, size: u64) -> Result<(), ImageError>;
    /// Creates an empty qcow2 file of `size` bytes protected as `protection` says, its header
    /// naming `backing` (a qcow2, not opened) when given; a qcow2 inside a LUKS container names
    /// none (its chain is given whenever it is opened).
    fn create_protected(
        &self,
        image: &Path,
        size: u64,
        backing: Option<String>,
        protection: &TargetProtection,
    ) -> Result<(), ImageError>;
    /// Creates the qcow2 overlay `image` of `size` bytes over `backing` (its name as written into
    /// the header: a path, relative to the overlay's directory when relative, or an NBD URI; not
    /// opened) of format `backing_format`, in one step. With `key` (a file holding a passphrase)
    /// the overlay is encrypted with qcow2's built-in LUKS, so that what is written into it is
    /// never stored as plaintext (its backing stays as it is).
    // mockall needs the reference's lifetime named.
    #[allow(clippy::needless_lifetimes)]
    fn create_overlay<'a>(
        &self,
        image: &Path,
        size: u64,
        backing: &str,
        backing_format: &ImageFormat,
        key: Option<&'a Path>,
    ) -> Result<(), ImageError>;
    /// Points the qcow2 file `image` at `backing` (a path as written into the header, relative
    /// to the image's directory when relative) of format `backing_format`, without reading or
    /// copying data (`qemu-img rebase -u`): for a file whose data already is the difference.
    fn set_backing(&self, image: &ImageLocation, backing: &str, backing_format: &ImageFormat)
    -> Result<(), ImageError>;
    /// Adds the persistent dirty bitmap `name` (enabled) to the qcow2 file `image`, which no
    /// process has open (`qemu-img bitmap --add`).
    fn add_bitmap(&self, image: &Path, name: &str) -> Result<(), ImageError>;
    /// Removes the persistent bitmap `name` from the qcow2 file `image`, which no process has
    /// open (`qemu-img bitmap --remove`).
    fn remove_bitmap(&self, image: &Path, name: &str) -> Result<(), ImageError>;
    /// Copies the clusters `copy.bitmap` marks dirty in `copy.source` (no process has it open)
    /// into a new qcow2 file `copy.target` of the same size, the rest left unallocated.
    fn copy_dirty(&self, copy: &DirtyCopy, progress: Arc<ProgressFn>) -> Result<(), ImageError>;
    /// Whether `key` opens the encrypted file `file` (its backing files are not opened); a
    /// plain or compressed file needs no key and opens.
    fn opens_with(&self, file: &StoredFile, key: &Path) -> Result<bool, ImageError>;
    /// The first half of moving the encrypted file `file` from the key in `old` to the key in
    /// `new`: a keyslot for `new` added when it does not open the file yet. Each key is tried
    /// once. Returns the keyslot `old` opens, for [`ImageTool::finish_rekey`], or that the file
    /// has the new key only already; a file neither key opens is `ImageError::Luks` with
    /// `LuksError::WrongKey`.
    fn begin_rekey(&self, file: &StoredFile, old: &Path, new: &Path) -> Result<Rekeyed, ImageError>;
    /// The second half: the keyslot `old_slot` (from [`ImageTool::begin_rekey`]) removed, never
    /// the file's last one.
    fn finish_rekey(&self, file: &StoredFile, old_slot: usize) -> Result<(), ImageError>;
    /// Removes the RBD image `image` (`rbd rm`, with the spec's monitors, client id and key; the
    /// key in a 0600 keyring for the command's duration): what a restore that created it and
    /// failed leaves behind.
    fn remove_rbd(&self, image: &crate::location::RbdSpec) -> Result<(), ImageError>;
    /// The RBD image's id, size and snapshots (`rbd info`, `rbd snap ls`).
    fn rbd_image(&self, image: &crate::location::RbdSpec) -> Result<crate::rbd::RbdImageFacts, ImageError>;
    /// Takes the snapshot `name` of the RBD image (`rbd snap create`) and returns its id. With
    /// the image open in a running QEMU, librbd asks that client (the lock owner) to flush and
    /// take it.
    fn rbd_snapshot_create(&self, image: &crate::location::RbdSpec, name: &str) -> Result<u64, ImageError>;
    /// Removes the snapshot `name` of the RBD image (`rbd snap rm`).
    fn rbd_snapshot_remove(&self, image: &crate::location::RbdSpec, name: &str) -> Result<(), ImageError>;
    /// Writes into `copy.target` what changed in the image between the snapshots `copy.from`
    /// and `copy.image.snapshot` (`rbd export-diff`, streamed through the target's writable
    /// export); tells progress in percent of the image; returns the bytes of changed data.
    fn copy_rbd_diff(&self, copy: &crate::rbd::RbdDiffCopy, progress: Arc<ProgressFn>) -> Result<u64, ImageError>;
    /// Shows the stored chain `image` (compressed, encrypted or both) read-only at `file`, as
    /// [`ImageTool::export_read_only`] does a plain one; the key is read by the daemon as it
    /// starts.
    // mockall needs the reference's lifetime named.
    #[allow(clippy::needless_lifetimes)]
    fn export_stored<'a>(
        &self,
        kind: ExportKind,
        image: &StoredImage,
        file: &Path,
        hold: Option<&'a std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError>;
    /// Shows `image` (with its backing chain) read-only at `file`, as a raw file (FUSE, `file`
    /// new or empty) or an NBD unix socket (`file` new), through a daemonized
    /// qemu-storage-daemon that outlives the caller, until [`ReadOnlyExport::stop`]. The daemon
    /// keeps `hold` open while it runs (see [`ReadOnlyExport::start`]).
    // mockall needs the reference's lifetime named.
    #[allow(clippy::needless_lifetimes)]
    fn export_read_only<'a>(
        &self,
        kind: ExportKind,
        image: &Path,
        format: &ImageFormat,
        file: &Path,
        hold: Option<&'a std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError>;
}

/// Time limits for qemu-img.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTimeouts {
    /// For info, check of metadata, compare of small images, create.
    pub quick: Duration,
    /// For convert and compare of whole disks.
    pub copy: Duration,
}

impl Default for ImageTimeouts {
    fn default() -> Self {
        ImageTimeouts { quick: Duration::from_secs(120), copy: Duration::from_secs(24 * 3600) }
    }
}

/// The real [`ImageTool`]: `qemu-img` as argv, with timeouts, keys in temporary keyring files.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
    private_dir: PathBuf,
    timeouts: ImageTimeouts,
}

impl QemuImg {
    /// `qemu-img` from PATH; temporary keyrings under `<runtime_dir>/private`.
    pub fn new(runtime_dir: impl AsRef<Path>) -> Self {
        QemuImg {
            program: "qemu-img".into(),
            private_dir: runtime_dir.as_ref().join("private"),
            timeouts: ImageTimeouts::default(),
        }
    }

    /// Sets the timeouts.
    pub fn with_timeouts(mut self, timeouts: ImageTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    fn name(&self, image: &ImageLocation) -> Result<(String, Option<crate::location::TempKeyring>), ImageError> {
        filename_for(image, &self.private_dir)
            .map_err(|source| ImageError::Keyring { dir: self.private_dir.clone(), source })
    }

    /// `qemu-img bitmap OP -f qcow2 IMAGE NAME`.
    fn bitmap(&self, op: &'static str, image: &Path, name: &str) -> Result<(), ImageError> {
        self.command(self.timeouts.quick)
            .args(["bitmap", op, "-f", "qcow2"])
            .arg(image)
            .arg(name)
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "bitmap", source })
    }

    /// `qemu-img create -f qcow2` with the protection's options (and key), `backing` named in
    /// its header without being opened.
    fn create_qcow2(
        &self,
        image: &Path,
        size: u64,
        backing: Option<&str>,
        protection: &TargetProtection,
    ) -> Result<(), ImageError> {
        if protection.layout == StoredLayout::Qcow2Luks {
            let passphrase = read_passphrase(protection.key.as_deref().ok_or_else(|| no_key(image))?)?;
            return Ok(crate::luks::create_encrypted_qcow2(
                image,
                size,
                backing.map(|b| (b, &ImageFormat::Qcow2)),
                &passphrase,
            )?);
        }
        let mut command = self
            .command(self.timeouts.quick)
            .args(["create", "-q", "-f", "qcow2"])
            .args(key_object_args(TARGET_KEY_SECRET_ID, protection.key.as_deref()));
        for o in protection.create_options() {
            command = command.arg("-o").arg(o);
        }
        if let Some(b) = backing {
            command = command.args(["-u", "-F", "qcow2", "-b", b]);
        }
        command
            .arg(image)
            .arg(size.to_string())
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "create", source })
    }

    /// Creates a LUKS container at `image` whose payload is an empty zstd-compressed qcow2 of
    /// `size` bytes (see [`StoredLayout::Qcow2InLuks`]). The container is sparse and sized for
    /// the worst case (every cluster written uncompressed, with its tables), so only what is
    /// written takes space. The empty qcow2 is made beside the private keyrings and copied into
    /// the payload as bytes. Its header names no backing file: a backing name there would point
    /// at a LUKS container QEMU cannot open by name, and would conflict with the chain that
    /// every reader gives ([`crate::StoredImage`]).
    fn create_container(&self, image: &Path, size: u64, protection: &TargetProtection) -> Result<(), ImageError> {
        let key = protection.key.as_deref();
        let keyring = |source| ImageError::Keyring { dir: self.private_dir.clone(), source };
        std::fs::create_dir_all(&self.private_dir).map_err(keyring)?;
        let inner = self.private_dir.join(format!("inner-{}.qcow2", uuid::Uuid::new_v4()));
        let _remove = RemoveOnDrop(inner.clone());
        let inner_protection = TargetProtection::new(StoredLayout::Qcow2, true, None);
        self.create_qcow2(&inner, size, None, &inner_protection)?;
        let passphrase = read_passphrase(key.ok_or_else(|| no_key(image))?)?;
        crate::luks::create_container(image, container_payload(size), &passphrase)?;
        self.command(self.timeouts.quick)
            .args(["convert", "-n", "-f", "raw"])
            .args(key_object_args(TARGET_KEY_SECRET_ID, key))
            .arg(&inner)
            .arg("--target-image-opts")
            .arg(format!(
                "driver=luks,key-secret={TARGET_KEY_SECRET_ID},file.filename={}",
                escape_opt(&image.to_string_lossy())
            ))
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "convert", source })
    }

    fn command(&self, timeout: Duration) -> ExternalCommand {
        ExternalCommand::new(&self.program).timeout(timeout)
    }
}

/// What qemu-img prints with `-p`, told to `progress` as percentages.
fn progress_observer(progress: Arc<ProgressFn>) -> Arc<OutputFn> {
    let pending = Mutex::new(String::new());
    Arc::new(move |chunk: &[u8]| {
        let mut text = pending.lock().unwrap_or_else(|e| e.into_inner());
        text.push_str(&String::from_utf8_lossy(chunk));
        if let Some(p) = last_progress(&text) {
            progress(p);
        }
        // Keep only the unfinished tail.
        if let Some(i) = text.rfind(['\r', '\n']) {
            text.drain(..=i);
        }
    })
}

impl ImageTool for QemuImg {
    fn info(&self, image: &ImageLocation) -> Result<Vec<ImageInfo>, ImageError> {
        let (name, _keyring) = self.name(image)?;
        let command = match image {
            // The chain's backing files are given, not followed: the top file alone.
            ImageLocation::Stored(stored) => self
                .command(self.timeouts.quick)
                .args(["info", "--output=json", "-U"])
                .args(objects_for(image))
                .arg(stored.filename(false)),
            _ => self.command(self.timeouts.quick).args(["info", "--output=json", "--backing-chain", "-U", &name]),
        };
        let out = command.run().map_err(|source| ImageError::Command { action: "info", source })?;
        parse_info(&out.stdout_text()).map_err(|e| ImageError::Output { action: "info", detail: e.to_string() })
    }

    fn convert(&self, request: &ConvertRequest, progress: Arc<ProgressFn>) -> Result<(), ImageError> {
        let (source, _k1) = self.name(&request.source)?;
        let (target, _k2) = self.name(&request.target)?;
        let mut objects = objects_for(&request.source);
        let mut request = request.clone();
        let mut target = target;
        if let Some(p) = request.protection.clone() {
            objects.extend(key_object_args(TARGET_KEY_SECRET_ID, p.key.as_deref()));
            if p.layout.needs_key() {
                let ImageLocation::Path(path) = &request.target else {
                    return Err(ImageError::Output {
                        action: "convert",
                        detail: "an encrypted target must be a file".into(),
                    });
                };
                let size = self.info(&request.source)?.first().map_or(0, |i| i.virtual_size);
                self.create_protected(path, size, None, &p)?;
                target = encrypted_image_opts(path, p.layout);
                request.target_exists = true;
            }
        }
        let request = &request;
        // Secret objects go after the subcommand.
        let mut args = request.args(&source, &target);
        args.splice(1..1, objects);
        let command = self.command(self.timeouts.copy).args(args).cancel_on(&request.cancel);
        command
            .run_observed(progress_observer(progress))
            .map(drop)
            .map_err(|source| ImageError::Command { action: "convert", source })
    }

    fn commit(
        &self,
        top: &Path,
        base: &Path,
        cancel: &CancelHandle,
        progress: Arc<ProgressFn>,
    ) -> Result<(), ImageError> {
        // -d: the top is not emptied afterwards (it is a copy removed next); the base by the
        // name its chain gives, as qemu-img looks it up in the chain.
        self.command(self.timeouts.copy)
            .args(["commit", "-p", "-d", "-f", "qcow2"])
            .arg("-b")
            .arg(base)
            .arg(top)
            .cancel_on(cancel)
            .run_observed(progress_observer(progress))
            .map(drop)
            .map_err(|source| ImageError::Command { action: "commit", source })
    }

    fn check(&self, image: &ImageLocation, format: &ImageFormat) -> Result<CheckReport, ImageError> {
        // A qcow2 file whose metadata this process checks and finds clean needs no qemu-img
        // (see `crate::metacheck`); anything else, found or not checked, is qemu-img's to say.
        if let (ImageLocation::Path(path), ImageFormat::Qcow2) = (image, format)
            && quick_check_is_clean(path, self.timeouts.copy.min(QUICK_CHECK_TIMEOUT))
        {
            return Ok(CheckReport { verdict: CheckVerdict::Clean, corruptions: 0, leaks: 0, check_errors: 0 });
        }
        let (name, _keyring) = self.name(image)?;
        let cmd = self
            .command(self.timeouts.copy)
            .args(["check", "--output=json", "-f", &format.to_string()])
            .args(objects_for(image))
            .arg(&name);
        let out = cmd.run_unchecked().map_err(|source| ImageError::Command { action: "check", source })?;
        let code = out.status.code().unwrap_or(-1);
        // A key that opens no keyslot is no verdict on the image: said as the failure it is.
        if out.stderr_text().contains(WRONG_KEY) {
            return Err(ImageError::Command {
                action: "check",
                source: CommandError::Failed {
                    argv: cmd.display_argv(),
                    status: out.status,
                    stderr: out.stderr_text(),
                },
            });
        }
        parse_check(code, &out.stdout_text()).ok_or_else(|| ImageError::Command {
            action: "check",
            source: CommandError::Failed { argv: cmd.display_argv(), status: out.status, stderr: out.stderr_text() },
        })
    }

    fn compare(&self, a: &ImageLocation, b: &ImageLocation) -> Result<bool, ImageError> {
        let (an, _k1) = self.name(a)?;
        let (bn, _k2) = self.name(b)?;
        let objects = match (objects_for(a), objects_for(b)) {
            (x, y) if y.is_empty() || x == y => x,
            (x, y) if x.is_empty() => y,
            _ => {
                return Err(ImageError::Output {
                    action: "compare",
                    detail: "two images encrypted with different keys cannot be compared in one command".into(),
                });
            }
        };
        let cmd = self.command(self.timeouts.copy).args(["compare", "-U"]).args(objects).args([&an, &bn]);
        let out = cmd.run_unchecked().map_err(|source| ImageError::Command { action: "compare", source })?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(ImageError::Command {
                action: "compare",
                source: CommandError::Failed {
                    argv: cmd.display_argv(),
                    status: out.status,
                    stderr: out.stderr_text(),
                },
            }),
        }
    }

    fn create(&self, image: &ImageLocation, format: &ImageFormat, size: u64) -> Result<(), ImageError> {
        let (name, _keyring) = self.name(image)?;
        self.command(self.timeouts.quick)
            .args(["create", "-q", "-f", &format.to_string(), &name, &size.to_string()])
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "create", source })
    }

    fn create_protected(
        &self,
        image: &Path,
        size: u64,
        backing: Option<String>,
        protection: &TargetProtection,
    ) -> Result<(), ImageError> {
        if protection.layout == StoredLayout::Qcow2InLuks {
            return self.create_container(image, size, protection);
        }
        self.create_qcow2(image, size, backing.as_deref(), protection)
    }

    fn create_overlay(
        &self,
        image: &Path,
        size: u64,
        backing: &str,
        backing_format: &ImageFormat,
        key: Option<&Path>,
    ) -> Result<(), ImageError> {
        if let Some(key) = key {
            let passphrase = read_passphrase(key)?;
            return Ok(crate::luks::create_encrypted_qcow2(image, size, Some((backing, backing_format)), &passphrase)?);
        }
        self.command(self.timeouts.quick)
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", &backing_format.to_string(), "-b", backing])
            .arg(image)
            .arg(size.to_string())
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "create", source })
    }

    fn remove_rbd(&self, image: &crate::location::RbdSpec) -> Result<(), ImageError> {
        let (_, temp) = self.name(&ImageLocation::Rbd(image.clone()))?;
        let command = crate::rbd::rbd_command(image, temp.as_ref().map(|t| t.path())).arg("rm").arg("--no-progress");
        let command = command.arg(crate::rbd::image_name(image)).timeout(self.timeouts.quick);
        // A client killed with the image open (a cancelled qemu-img) leaves its watch until the
        // cluster times it out (30 s by default): until then the image "still has watchers".
        let deadline = std::time::Instant::now() + RBD_WATCH_WAIT;
        loop {
            match command.run() {
                Ok(_) => return Ok(()),
                Err(e) if e.to_string().contains("watchers") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(source) => return Err(ImageError::Command { action: "rbd rm", source }),
            }
        }
    }

    fn rbd_image(&self, image: &crate::location::RbdSpec) -> Result<crate::rbd::RbdImageFacts, ImageError> {
        let (_, temp) = self.name(&ImageLocation::Rbd(image.clone()))?;
        let run = |op: &str, action: &'static str| {
            crate::rbd::rbd_command(image, temp.as_ref().map(|t| t.path()))
                .args(op.split(' '))
                .args(["--format", "json"])
                .arg(crate::rbd::image_name(&crate::location::RbdSpec { snapshot: None, ..image.clone() }))
                .timeout(self.timeouts.quick)
                .run()
                .map(|o| o.stdout_text())
                .map_err(|source| ImageError::Command { action, source })
        };
        // Each `rbd` connects to the cluster on its own: both at once.
        let (info, snaps) = std::thread::scope(|scope| {
            let info = scope.spawn(|| run("info", "rbd info"));
            let snaps = run("snap ls", "rbd snap ls");
            (info.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), snaps)
        });
        crate::rbd::parse_image_facts(&info?, &snaps?)
            .map_err(|detail| ImageError::Output { action: "rbd info", detail })
    }

    fn rbd_snapshot_create(&self, image: &crate::location::RbdSpec, name: &str) -> Result<u64, ImageError> {
        let (_, temp) = self.name(&ImageLocation::Rbd(image.clone()))?;
        let rbd = || crate::rbd::rbd_command(image, temp.as_ref().map(|t| t.path())).timeout(self.timeouts.quick);
        rbd()
            .args(["snap", "create", "--no-progress"])
            .arg(crate::rbd::image_name(&image.at_snapshot(name)))
            .run()
            .map_err(|source| ImageError::Command { action: "rbd snap create", source })?;
        let listed = rbd()
            .args(["snap", "ls", "--format", "json"])
            .arg(crate::rbd::image_name(&crate::location::RbdSpec { snapshot: None, ..image.clone() }))
            .run()
            .map_err(|source| ImageError::Command { action: "rbd snap ls", source })?;
        crate::rbd::parse_snapshots(&listed.stdout_text())
            .map_err(|detail| ImageError::Output { action: "rbd snap ls", detail })?
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.id)
            .ok_or_else(|| ImageError::Output {
                action: "rbd snap create",
                detail: format!("the new snapshot {name} is not listed"),
            })
    }

    fn rbd_snapshot_remove(&self, image: &crate::location::RbdSpec, name: &str) -> Result<(), ImageError> {
        let (_, temp) = self.name(&ImageLocation::Rbd(image.clone()))?;
        crate::rbd::rbd_command(image, temp.as_ref().map(|t| t.path()))
            .args(["snap", "rm", "--no-progress"])
            .arg(crate::rbd::image_name(&image.at_snapshot(name)))
            .timeout(self.timeouts.quick)
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "rbd snap rm", source })
    }

    fn copy_rbd_diff(&self, copy: &crate::rbd::RbdDiffCopy, progress: Arc<ProgressFn>) -> Result<u64, ImageError> {
        let err = |detail: String| ImageError::Daemon { action: "copying an RBD image's changes", detail };
        let to = copy.image.snapshot.clone().ok_or_else(|| err("no snapshot to copy up to".into()))?;
        let size = copy.size;
        // The daemon's QMP socket goes in the runtime directory (the private one's parent).
        let runtime = self.private_dir.parent().unwrap_or(&self.private_dir).to_owned();
        let export =
            WritableExport::start(&copy.target, &copy.protection, copy.backing.as_ref(), &copy.mountpoint, &runtime)?;
        let file = crate::rbd::open_for_writes(export.mountpoint())
            .map_err(|e| err(format!("opening {}: {e}", export.mountpoint().display())))?;
        let (_, temp) = self.name(&ImageLocation::Rbd(copy.image.clone()))?;
        let command = crate::rbd::rbd_command(&copy.image, temp.as_ref().map(|t| t.path()))
            .args(["export-diff", "--no-progress", "--from-snap"])
            .arg(&copy.from)
            .arg(crate::rbd::image_name(&copy.image))
            .arg("-")
            .timeout(self.timeouts.copy)
            .cancel_on(&copy.cancel);
        // The stream is parsed and written on the command's reader thread; what it found is
        // handed back here.
        let state = Arc::new(Mutex::new((crate::rbd::DiffParser::new(), None::<String>, 0u64)));
        let shared = Arc::clone(&state);
        let (from, file) = (copy.from.clone(), Arc::new(file));
        let writer_file = Arc::clone(&file);
        let last_percent = Mutex::new(-1i64);
        let ran = command.run_streamed(Box::new(move |chunk| {
            let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
            let (parser, failure, written) = &mut *guard;
            let mut writer =
                crate::rbd::DiffWriter { file: &writer_file, from: &from, to: &to, size, written: 0, position: 0 };
            let result = parser.feed(chunk, &mut |e| writer.apply(e));
            *written += writer.written;
            if size > 0 && writer.position > 0 {
                let percent = (writer.position as f64 / size as f64 * 100.0).min(100.0);
                let mut last = last_percent.lock().unwrap_or_else(|e| e.into_inner());
                if percent as i64 > *last {
                    *last = percent as i64;
                    progress(percent);
                }
            }
            match result {
                Ok(()) => true,
                Err(e) => {
                    *failure = Some(e);
                    false
                }
            }
        }));
        let (parser, failure, written) = std::mem::take(&mut *state.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(detail) = failure {
            return Err(err(format!(
                "the rbd export-diff stream of {}: {detail}",
                crate::rbd::image_name(&copy.image)
            )));
        }
        ran.map_err(|source| ImageError::Command { action: "rbd export-diff", source })?;
        if !parser.finished() {
            return Err(err(format!(
                "the rbd export-diff stream of {} ended early",
                crate::rbd::image_name(&copy.image)
            )));
        }
        drop(file);
        export.finish(Duration::from_secs(120))?;
        Ok(written)
    }

    fn set_backing(
        &self,
        image: &ImageLocation,
        backing: &str,
        backing_format: &ImageFormat,
    ) -> Result<(), ImageError> {
        // Only the header changes: the top file alone is opened (with its key when encrypted).
        if let ImageLocation::Stored(s) = image
            && s.chain.first().is_some_and(|f| f.layout == StoredLayout::Qcow2InLuks)
        {
            return Err(ImageError::Output {
                action: "rebase",
                detail: "a qcow2 inside a LUKS container names no backing file: its chain is given when it is opened"
                    .into(),
            });
        }
        let name = match image {
            ImageLocation::Stored(s) => s.filename(false),
            other => self.name(other)?.0,
        };
        self.command(self.timeouts.quick)
            .args(["rebase", "-u"])
            .args(objects_for(image))
            .args(["-F", &backing_format.to_string(), "-b", backing])
            .arg(name)
            .run()
            .map(drop)
            .map_err(|source| ImageError::Command { action: "rebase", source })
    }

    fn add_bitmap(&self, image: &Path, name: &str) -> Result<(), ImageError> {
        self.bitmap("--add", image, name)
    }

    fn remove_bitmap(&self, image: &Path, name: &str) -> Result<(), ImageError> {
        self.bitmap("--remove", image, name)
    }

    fn copy_dirty(&self, copy: &DirtyCopy, progress: Arc<ProgressFn>) -> Result<(), ImageError> {
        let source = ImageLocation::Path(copy.source.clone());
        let size = self.info(&source)?.first().map_or(0, |i| i.virtual_size);
        match &copy.protection {
            Some(p) => self.create_protected(&copy.target, size, None, p)?,
            None => self.create(&ImageLocation::Path(copy.target.clone()), &ImageFormat::Qcow2, size)?,
        }
        let runtime = self.private_dir.parent().unwrap_or(&self.private_dir).to_owned();
        crate::daemon::copy_dirty(copy, &runtime, self.timeouts.copy, &*progress)
    }

    fn opens_with(&self, file: &StoredFile, key: &Path) -> Result<bool, ImageError> {
        if !file.layout.needs_key() {
            return Ok(true);
        }
        let luks = LuksFile::open(&file.path, file.layout)?;
        Ok(luks.unlock(&read_passphrase(key)?)?.is_some())
    }

    fn begin_rekey(&self, file: &StoredFile, old: &Path, new: &Path) -> Result<Rekeyed, ImageError> {
        let mut luks = LuksFile::open(&file.path, file.layout)?;
        let (old_key, new_key) = (read_passphrase(old)?, read_passphrase(new)?);
        match (luks.unlock(&old_key)?, luks.unlock(&new_key)?) {
            (None, None) => Err(wrong_key(file)),
            (None, Some(_)) => Ok(Rekeyed::Already),
            (Some(master), opened) => {
                if opened.is_none() {
                    luks.add(&master, &new_key)?;
                }
                Ok(Rekeyed::Added { old_slot: master.slot() })
            }
        }
    }

    fn finish_rekey(&self, file: &StoredFile, old_slot: usize) -> Result<(), ImageError> {
        Ok(LuksFile::open(&file.path, file.layout)?.remove_slot(old_slot)?)
    }

    fn export_stored(
        &self,
        kind: ExportKind,
        image: &StoredImage,
        file: &Path,
        hold: Option<&std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError> {
        ReadOnlyExport::start_stored(kind, image, file, self.timeouts.quick, hold)
    }

    fn export_read_only(
        &self,
        kind: ExportKind,
        image: &Path,
        format: &ImageFormat,
        file: &Path,
        hold: Option<&std::fs::File>,
    ) -> Result<ReadOnlyExport, ImageError> {
        ReadOnlyExport::start_as(kind, image, &format.to_string(), file, self.timeouts.quick, hold)
    }
}
