//! The image-tool seam and its real implementation over the qemu-img binary.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasbak_process::{CommandError, ExternalCommand};

use crate::convert::{ConvertRequest, last_progress};
use crate::daemon::{DirtyCopy, ExportKind, ReadOnlyExport};
use crate::error::{ImageError, ProgressFn};
use crate::info::{CheckReport, ImageFormat, ImageInfo, parse_check, parse_info};
use crate::location::{ImageLocation, filename_for};

/// How long removing an RBD image waits for the watch of a client that died with it open.
const RBD_WATCH_WAIT: Duration = Duration::from_secs(60);

/// What nasbak needs from an image tool.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait ImageTool {
    /// Information about an image and its backing chain (the image first).
    fn info(&self, image: &ImageLocation) -> Result<Vec<ImageInfo>, ImageError>;
    /// Converts (copies) an image, reporting progress.
    fn convert(&self, request: &ConvertRequest, progress: Arc<ProgressFn>) -> Result<(), ImageError>;
    /// Checks an image's consistency.
    fn check(&self, image: &ImageLocation, format: &ImageFormat) -> Result<CheckReport, ImageError>;
    /// Whether two images have the same guest-visible content.
    fn compare(&self, a: &ImageLocation, b: &ImageLocation) -> Result<bool, ImageError>;
    /// Creates an empty image of `size` bytes.
    fn create(&self, image: &ImageLocation, format: &ImageFormat, size: u64) -> Result<(), ImageError>;
    /// Points the qcow2 file `image` at `backing` (a path as written into the header, relative
    /// to the image's directory when relative) of format `backing_format`, without reading or
    /// copying data (`qemu-img rebase -u`): for a file whose data already is the difference.
    fn set_backing(&self, image: &Path, backing: &str, backing_format: &ImageFormat) -> Result<(), ImageError>;
    /// Adds the persistent dirty bitmap `name` (enabled) to the qcow2 file `image`, which no
    /// process has open (`qemu-img bitmap --add`).
    fn add_bitmap(&self, image: &Path, name: &str) -> Result<(), ImageError>;
    /// Removes the persistent bitmap `name` from the qcow2 file `image`, which no process has
    /// open (`qemu-img bitmap --remove`).
    fn remove_bitmap(&self, image: &Path, name: &str) -> Result<(), ImageError>;
    /// Copies the clusters `copy.bitmap` marks dirty in `copy.source` (no process has it open)
    /// into a new qcow2 file `copy.target` of the same size, the rest left unallocated.
    fn copy_dirty(&self, copy: &DirtyCopy, progress: Arc<ProgressFn>) -> Result<(), ImageError>;
    /// Removes the RBD image `image` (`rbd rm`, with the spec's monitors, client id and key; the
    /// key in a 0600 keyring for the command's duration): what a restore that created it and
    /// failed leaves behind.
    fn remove_rbd(&self, image: &crate::location::RbdSpec) -> Result<(), ImageError>;
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

    fn command(&self, timeout: Duration) -> ExternalCommand {
        ExternalCommand::new(&self.program).timeout(timeout)
    }
}

impl ImageTool for QemuImg {
    fn info(&self, image: &ImageLocation) -> Result<Vec<ImageInfo>, ImageError> {
        let (name, _keyring) = self.name(image)?;
        let out = self
            .command(self.timeouts.quick)
            .args(["info", "--output=json", "--backing-chain", "-U", &name])
            .run()
            .map_err(|source| ImageError::Command { action: "info", source })?;
        parse_info(&out.stdout_text()).map_err(|e| ImageError::Output { action: "info", detail: e.to_string() })
    }

    fn convert(&self, request: &ConvertRequest, progress: Arc<ProgressFn>) -> Result<(), ImageError> {
        let (source, _k1) = self.name(&request.source)?;
        let (target, _k2) = self.name(&request.target)?;
        let pending = Arc::new(Mutex::new(String::new()));
        let observer = {
            let pending = Arc::clone(&pending);
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
        };
        self.command(self.timeouts.copy)
            .args(request.args(&source, &target))
            .cancel_on(&request.cancel)
            .run_observed(observer)
            .map(drop)
            .map_err(|source| ImageError::Command { action: "convert", source })
    }

    fn check(&self, image: &ImageLocation, format: &ImageFormat) -> Result<CheckReport, ImageError> {
        let (name, _keyring) = self.name(image)?;
        let cmd = self.command(self.timeouts.copy).args(["check", "--output=json", "-f", &format.to_string(), &name]);
        let out = cmd.run_unchecked().map_err(|source| ImageError::Command { action: "check", source })?;
        let code = out.status.code().unwrap_or(-1);
        parse_check(code, &out.stdout_text()).ok_or_else(|| ImageError::Command {
            action: "check",
            source: CommandError::Failed { argv: cmd.display_argv(), status: out.status, stderr: out.stderr_text() },
        })
    }

    fn compare(&self, a: &ImageLocation, b: &ImageLocation) -> Result<bool, ImageError> {
        let (an, _k1) = self.name(a)?;
        let (bn, _k2) = self.name(b)?;
        let cmd = self.command(self.timeouts.copy).args(["compare", "-U", &an, &bn]);
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

    fn remove_rbd(&self, image: &crate::location::RbdSpec) -> Result<(), ImageError> {
        use crate::location::RbdAuth;
        let (_, temp) = self.name(&ImageLocation::Rbd(image.clone()))?;
        let keyring = match (&temp, &image.auth) {
            (Some(t), _) => Some(t.path().to_owned()),
            (None, RbdAuth::Keyring(k)) => Some(k.clone()),
            _ => None,
        };
        let mut command = ExternalCommand::new("rbd").arg("rm").arg("--no-progress");
        if let Some(id) = &image.id {
            command = command.arg("--id").arg(id);
        }
        if let Some(conf) = &image.conf {
            command = command.arg("--conf").arg(conf);
        }
        if !image.mon_hosts.is_empty() {
            command = command.arg("--mon-host").arg(image.mon_hosts.join(","));
        }
        if let Some(k) = &keyring {
            command = command.arg("--keyring").arg(k);
        }
        let mut spec = format!("{}/", image.pool);
        if let Some(ns) = &image.namespace {
            spec.push_str(&format!("{ns}/"));
        }
        spec.push_str(&image.image);
        let command = command.arg(spec).timeout(self.timeouts.quick);
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

    fn set_backing(&self, image: &Path, backing: &str, backing_format: &ImageFormat) -> Result<(), ImageError> {
        self.command(self.timeouts.quick)
            .args(["rebase", "-u", "-f", "qcow2", "-F", &backing_format.to_string(), "-b", backing])
            .arg(image)
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
        self.create(&ImageLocation::Path(copy.target.clone()), &ImageFormat::Qcow2, size)?;
        let runtime = self.private_dir.parent().unwrap_or(&self.private_dir).to_owned();
        crate::daemon::copy_dirty(copy, &runtime, self.timeouts.copy, &*progress)
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
