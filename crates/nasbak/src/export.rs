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
    /// The backup file and its chain: by path, or stored (compressed, encrypted) with its key.
    pub source: &'a ImageLocation,
    /// Its virtual size as its manifest says (used when qemu-img cannot tell).
    pub size: u64,
    /// The export's socket ([`nbd_socket`]).
    pub socket: &'a Path,
    /// The overlay to create.
    pub file: &'a Path,
    /// A file holding the passphrase the overlay is encrypted with (qcow2's built-in LUKS), for
    /// a disk that is itself encrypted: what the guest writes is then never plaintext. `None`:
    /// a plain overlay.
    pub key: Option<&'a Path>,
}

impl Overlay<'_> {
    /// Starts the export (its daemon holding `hold`) and creates the overlay; the disk's size.
    pub(crate) fn make<I: ImageTool>(&self, images: &I, hold: Option<&fs::File>) -> Result<u64, BackupError> {
        let uri = nasbak_qemu_img::nbd_uri(self.socket)
            .ok_or_else(|| BackupError::Unsupported { what: format!("an NBD socket at {}", self.socket.display()) })?;
        match self.source {
            ImageLocation::Stored(stored) => images.export_stored(ExportKind::Nbd, stored, self.socket, hold)?,
            ImageLocation::Path(path) => {
                images.export_read_only(ExportKind::Nbd, path, &ImageFormat::Qcow2, self.socket, hold)?
            }
            ImageLocation::Rbd(_) => {
                return Err(BackupError::Unsupported { what: "an overlay over an RBD image".into() });
            }
        };
        let size = images.info(self.source).ok().and_then(|i| i.first().map(|i| i.virtual_size)).unwrap_or(self.size);
        images.create_overlay(self.file, size, &uri, &ImageFormat::Raw, self.key)?;
        Ok(size)
    }
}

/// Where the NBD socket of a new export goes: `<runtime>/nbd/<16 hex>.sock` (the engine's
/// runtime directory, `Engine::with_runtime_dir`), whatever the work directory, refused when it
/// is longer than a unix socket's path may be (107 bytes).
pub(crate) fn nbd_socket(runtime: &Path) -> Result<PathBuf, BackupError> {
    let dir = runtime.join("nbd");
    let socket = dir.join(format!("{}.sock", &uuid::Uuid::new_v4().simple().to_string()[..16]));
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(BackupError::Unsupported {
            what: format!(
                "NBD sockets under {} ({} bytes, at most {MAX_SOCKET_PATH} for a unix socket): give the engine a shorter runtime directory",
                dir.display(),
                socket.as_os_str().len()
            ),
        });
    }
    let io = |source| BackupError::Io { action: "creating", path: dir.clone(), source };
    fs::create_dir_all(&dir).map_err(io)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io)?;
    Ok(socket)
}

/// The longest path of a unix socket (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_go_under_the_runtime_directory_and_a_too_long_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = nbd_socket(dir.path()).unwrap();
        assert!(s.starts_with(dir.path().join("nbd")) && s.extension().is_some_and(|e| e == "sock"), "{s:?}");
        let long = dir.path().join("x".repeat(120));
        let err = nbd_socket(&long).unwrap_err().to_string();
        assert!(err.contains("at most 107") && err.contains("shorter runtime directory"), "{err}");
        assert!(!long.exists(), "nothing made for a refused directory");
    }
}
