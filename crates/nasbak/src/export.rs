//! Backups shown to QEMU without copying them: a read-only export of a backup file's chain over
//! NBD on a short unix socket, and a qcow2 overlay over it. Shared by instant restore and boot
//! verification (a layer below both; `nasbak mount`'s FUSE exports go through
//! `ImageTool::export_read_only` directly).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nasbak_qemu_img::{ExportKind, ImageFormat, ImageLocation, ImageTool};

use crate::error::BackupError;

/// A qcow2 overlay over a backup file (and its chain) that QEMU reads through a read-only NBD
/// export: QEMU's NBD client waits for an unreachable repository without blocking its main loop
/// (reads of a FUSE file would).
pub(crate) struct Overlay<'a> {
    /// The backup file.
    pub source: &'a Path,
    /// Its virtual size as its manifest says (used when qemu-img cannot tell).
    pub size: u64,
    /// The export's socket ([`nbd_socket`]).
    pub socket: &'a Path,
    /// The overlay to create.
    pub file: &'a Path,
}

impl Overlay<'_> {
    /// Starts the export (its daemon holding `hold`) and creates the overlay; the disk's size.
    pub(crate) fn make<I: ImageTool>(&self, images: &I, hold: Option<&fs::File>) -> Result<u64, BackupError> {
        let uri = nasbak_qemu_img::nbd_uri(self.socket)
            .ok_or_else(|| BackupError::Unsupported { what: format!("an NBD socket at {}", self.socket.display()) })?;
        images.export_read_only(ExportKind::Nbd, self.source, &ImageFormat::Qcow2, self.socket, hold)?;
        let size = images
            .info(&ImageLocation::Path(self.source.to_owned()))
            .ok()
            .and_then(|i| i.first().map(|i| i.virtual_size))
            .unwrap_or(self.size);
        images.create(&ImageLocation::Path(self.file.to_owned()), &ImageFormat::Qcow2, size)?;
        images.set_backing(self.file, &uri, &ImageFormat::Raw)?;
        Ok(size)
    }
}

/// Where the NBD socket of a new export goes: `/run/nasbak/nbd/<16 hex>.sock`, short enough
/// for a unix socket's path (at most 107 bytes), whatever the work directory.
pub(crate) fn nbd_socket() -> Result<PathBuf, BackupError> {
    let dir = Path::new(NBD_SOCKET_DIR);
    let io = |source| BackupError::Io { action: "creating", path: dir.to_owned(), source };
    fs::create_dir_all(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io)?;
    Ok(dir.join(format!("{}.sock", &uuid::Uuid::new_v4().simple().to_string()[..16])))
}

/// The directory of the exports' NBD sockets.
pub(crate) const NBD_SOCKET_DIR: &str = "/run/nasbak/nbd";
