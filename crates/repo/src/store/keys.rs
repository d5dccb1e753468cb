//! Encryption key files: checked before anything reads them. A key file must be a regular file,
//! owned by root, readable by its owner only (mode 0600 or 0400), and hold at least
//! [`MIN_KEY_LEN`] bytes. Anything else is refused with the reason and the fix, and the key's
//! value is never part of an error.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nasbak_process::Secret;

/// The shortest key accepted, in bytes: LUKS spends little time deriving keyslot keys
/// (`nasbak_qemu_img::luks::KEYSLOT_ITERATIONS`), which is safe for a random key and not for a word.
pub const MIN_KEY_LEN: u64 = 32;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// It cannot be read (missing, no permission).
    #[error("key file {path} cannot be read: {source}; give the path of a root-owned file with mode 0600")]
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file.
    #[error("key file {path} is not a regular file; give the path of a root-owned file with mode 0600")]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// Group or others may read or write it.
    #[error("key file {path} has mode {mode:04o}: a key file must be readable by its owner only (chmod 600 {path})")]
    Mode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Someone other than root owns it.
    #[error("key file {path} is owned by uid {uid}: a key file must be owned by root (chown root: {path})")]
    Owner {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// It holds less than [`MIN_KEY_LEN`] bytes.
    #[error(
        "key file {path} holds {len} bytes: a key must be at least {MIN_KEY_LEN} (make one with: head -c 32 /dev/urandom | base64 > {path})"
    )]
    Short {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
}

impl KeyError {
    /// The key file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            KeyError::Unreadable { path, .. }
            | KeyError::NotAFile { path }
            | KeyError::Mode { path, .. }
            | KeyError::Owner { path, .. }
            | KeyError::Short { path, .. } => path,
        }
    }
}

/// Checks that `path` may serve as a key file (see the module's rules), without reading it.
pub fn check_key_file(path: &Path) -> Result<(), KeyError> {
    check_key_file_owned_by(path, 0)
}

/// [`check_key_file`] with the owner to expect (tests run as other users).
pub(crate) fn check_key_file_owned_by(path: &Path, owner: u32) -> Result<(), KeyError> {
    let meta = fs::metadata(path).map_err(|source| KeyError::Unreadable { path: path.to_owned(), source })?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile { path: path.to_owned() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode { path: path.to_owned(), mode });
    }
    if meta.uid() != owner {
        return Err(KeyError::Owner { path: path.to_owned(), uid: meta.uid() });
    }
    if meta.len() < MIN_KEY_LEN {
        return Err(KeyError::Short { path: path.to_owned(), len: meta.len() });
    }
    Ok(())
}

/// Checks `path` and reads the key in it, for where a value must be handed over (a libvirt
/// secret for QEMU). qemu-img and qemu-storage-daemon read the file themselves.
pub fn read_key_file(path: &Path) -> Result<Secret, KeyError> {
    check_key_file(path)?;
    let bytes = fs::read(path).map_err(|source| KeyError::Unreadable { path: path.to_owned(), source })?;
    let text = String::from_utf8(bytes).map_err(|_| KeyError::Unreadable {
        path: path.to_owned(),
        source: std::io::Error::other("it is not UTF-8 text"),
    })?;
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_an_owner_only_non_empty_file_of_the_right_owner_is_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let key = dir.path().join("k");
        fs::write(&key, "passphrase-value-of-32-bytes-long").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_key_file_owned_by(&key, me).unwrap_err();
        let said = e.to_string();
        assert!(said.contains("mode 0644") && said.contains("chmod 600"), "{said}");
        assert!(!said.contains("passphrase-value"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        check_key_file_owned_by(&key, me).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        check_key_file_owned_by(&key, me).unwrap();
        let e = check_key_file_owned_by(&key, me + 1).unwrap_err();
        assert!(matches!(e, KeyError::Owner { uid, .. } if uid == me), "{e}");
        assert!(matches!(check_key_file_owned_by(dir.path(), me), Err(KeyError::NotAFile { .. })));
        assert!(matches!(check_key_file_owned_by(&dir.path().join("none"), me), Err(KeyError::Unreadable { .. })));
        let short = dir.path().join("short");
        fs::write(&short, "hunter2").unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        let e = check_key_file_owned_by(&short, me).unwrap_err();
        assert!(matches!(e, KeyError::Short { len: 7, .. }) && e.to_string().contains("at least 32"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        assert_eq!(e.path(), short);
        if me == 0 {
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
            let secret = read_key_file(&key).unwrap();
            assert!(!format!("{secret:?}").contains("passphrase-value"));
            assert_eq!(secret.expose(), "passphrase-value-of-32-bytes-long");
        }
    }
}
