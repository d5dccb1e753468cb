//! A repository's protection applied to backup files: its key resolved to a file QEMU reads,
//! how each new file is written, and how a stored file (and its chain) is opened.
//!
//! The key never reaches argv, the environment of a child, a log or an error: qemu-img and
//! qemu-storage-daemon read it from the key file (`--object secret,file=`). A key kept as a
//! libvirt secret is written for the length of the operation to a 0600 file in a 0700
//! directory under the runtime directory, and removed when the [`Key`] drops. The daemons that
//! export a backup read it as they start, and need it no longer.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nasbak_libvirt::{Hypervisor, NetworkAuth};
use nasbak_qemu_img::{ImageLocation, StoredFile, StoredImage, StoredLayout, TargetProtection};
use nasbak_repo::{FileFormat, KeySource, ManifestDisk, Protection};

use crate::error::BackupError;

/// The key of an encrypted repository, as a file QEMU reads.
#[derive(Debug)]
pub(crate) struct Key {
    path: PathBuf,
    /// Written by nasbak (from a libvirt secret): removed on drop.
    temporary: bool,
}

impl Key {
    /// The key file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A transient libvirt secret (`ephemeral='yes'`, `private='yes'`: in libvirtd's memory only)
/// holding a passphrase QEMU opens an encrypted file with; undefined on drop. Its description is
/// a prefix (which tells what it is for) followed by the defining process's pid and `)`, so that
/// one a killed process left is found and removed ([`remove_leaked_secrets`]).
pub(crate) struct TransientSecret<'h, H: Hypervisor> {
    hypervisor: &'h H,
    /// Its UUID, which a disk's `<encryption>` names.
    pub(crate) uuid: String,
}

impl<'h, H: Hypervisor> TransientSecret<'h, H> {
    /// Defines the secret holding `value`, described as `prefix` with this process's pid.
    pub(crate) fn define(hypervisor: &'h H, prefix: &str, value: &nasbak_process::Secret) -> Result<Self, BackupError> {
        let description = format!("{prefix}{})", std::process::id());
        let uuid = hypervisor.define_transient_secret(&description, value)?;
        Ok(TransientSecret { hypervisor, uuid })
    }
}

impl<H: Hypervisor> Drop for TransientSecret<'_, H> {
    fn drop(&mut self) {
        let _ = self.hypervisor.undefine_secret(&self.uuid);
    }
}

/// The transient secrets described as `prefix` (see [`TransientSecret`]) whose process is gone,
/// undefined: their UUIDs. Never an error: a secret nobody can read back is no danger, only
/// clutter.
pub(crate) fn remove_leaked_secrets<H: Hypervisor>(hypervisor: &H, prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for (uuid, description) in hypervisor.transient_secrets(prefix).unwrap_or_default() {
        let pid =
            description.strip_prefix(prefix).and_then(|p| p.strip_suffix(')')).and_then(|p| p.parse::<u32>().ok());
        let gone = pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists());
        if gone && hypervisor.undefine_secret(&uuid).is_ok() {
            removed.push(uuid);
        }
    }
    removed
}

/// A new random passphrase (256 bits from the system's random source, as hex) in a 0600 file
/// under `runtime_dir` (see [`secret_key`]), removed when the key drops: for a file that lives
/// no longer than one operation.
pub(crate) fn one_off_key(runtime_dir: &Path) -> Result<(Key, nasbak_process::Secret), BackupError> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut bytes[..]).map_err(|e| BackupError::Io {
        action: "drawing a key from the system's random source for",
        path: runtime_dir.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let value = nasbak_process::Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    Ok((write_key(&value, runtime_dir)?, value))
}

/// The key `protection` names, checked (a key file: root-owned, owner-only, long enough) or
/// fetched (a libvirt secret, through `hypervisor`); none when it encrypts nothing.
pub(crate) fn resolve_key<H: Hypervisor>(
    hypervisor: &H,
    protection: &Protection,
    runtime_dir: &Path,
) -> Result<Option<Key>, BackupError> {
    match protection.key() {
        None => Ok(None),
        Some(KeySource::File(path)) => {
            nasbak_repo::store::check_key_file(path)?;
            Ok(Some(Key { path: path.clone(), temporary: false }))
        }
        Some(KeySource::LibvirtSecret(uuid)) => {
            let auth = NetworkAuth {
                username: None,
                secret_type: Some("passphrase".into()),
                secret_usage: None,
                secret_uuid: Some(uuid.to_string()),
            };
            secret_key(hypervisor, &auth, runtime_dir).map(Some)
        }
    }
}

/// The value of the libvirt secret `auth` names, written for QEMU to a 0600 file in a 0700
/// directory under `runtime_dir`, removed when the key drops.
fn secret_key<H: Hypervisor>(hypervisor: &H, auth: &NetworkAuth, runtime_dir: &Path) -> Result<Key, BackupError> {
    write_key(&hypervisor.secret_value(auth)?, runtime_dir)
}

/// `value` written to a new 0600 file in a 0700 directory under `runtime_dir`, removed when the
/// key drops.
fn write_key(value: &nasbak_process::Secret, runtime_dir: &Path) -> Result<Key, BackupError> {
    let dir = runtime_dir.join("private");
    let io = |source| BackupError::Io { action: "writing the key for QEMU into", path: dir.clone(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io)?;
    let path = dir.join(format!("key-{}", uuid::Uuid::new_v4()));
    let key = Key { path: path.clone(), temporary: true };
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
    f.write_all(value.expose().as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
    Ok(key)
}

/// A VM disk that is itself encrypted (a LUKS qcow2 volume, as the reference system's volume
/// encryption makes them): its passphrase, from the libvirt secret the disk names, as a file
/// QEMU reads. `None` for a plain disk. A disk encrypted otherwise (a raw LUKS volume, another
/// format, a backing chain below it) is refused, named: nasbak never reads it as plaintext nor
/// writes it back as one.
pub(crate) fn volume_key<H: Hypervisor>(
    hypervisor: &H,
    disk: &nasbak_libvirt::Disk,
    runtime_dir: &Path,
) -> Result<Option<Key>, BackupError> {
    let Some(e) = &disk.encryption else { return Ok(None) };
    if e.format != "luks" || disk.format.as_deref() != Some("qcow2") || !disk.backing_chain.is_empty() {
        return Err(BackupError::Unsupported {
            what: format!(
                "disk {} is encrypted ({} on a {} volume{}); nasbak handles LUKS-encrypted qcow2 volumes without a backing chain",
                disk.target,
                e.format,
                disk.format.as_deref().unwrap_or("unknown"),
                if disk.backing_chain.is_empty() { "" } else { " with a backing chain" }
            ),
        });
    }
    let auth = NetworkAuth {
        username: None,
        secret_type: Some("passphrase".into()),
        secret_usage: e.secret_usage.clone(),
        secret_uuid: e.secret_uuid.clone(),
    };
    secret_key(hypervisor, &auth, runtime_dir).map(Some).map_err(|err| match err {
        BackupError::Libvirt(l) if l.message.contains("private") => BackupError::Unsupported {
            what: format!(
                "reading or writing the encrypted disk {} without QEMU: its passphrase is a private libvirt secret ({}), which no client may read; define the secret with private='no' (a backup while the VM runs needs no passphrase: QEMU decrypts)",
                disk.target,
                e.secret_uuid.clone().or_else(|| e.secret_usage.clone()).unwrap_or_default()
            ),
        },
        other => other,
    })
}

/// An encrypted volume's backup would be plaintext on a repository that does not encrypt:
/// refused, naming the disk and what to do. (Encrypting it with the volume's own secret instead
/// would make the backup depend on a secret kept in one host's libvirt: lost with that host,
/// where a backup is needed most.)
pub(crate) fn refuse_plaintext_of_encrypted(
    disks: &[&nasbak_libvirt::Disk],
    protection: &Protection,
    vm: &str,
    repository: &str,
) -> Result<(), BackupError> {
    let Some(d) = disks.iter().find(|d| d.encryption.is_some()) else { return Ok(()) };
    if protection.encryption() == nasbak_repo::Encryption::Luks {
        return Ok(());
    }
    Err(BackupError::Unsupported {
        what: format!(
            "backing up {vm} to repository {repository}: its disk {} is an encrypted volume, and the repository does not encrypt, so its backup would be plaintext; give the repository encryption and a key",
            d.target
        ),
    })
}

/// The key of `protection` where no hypervisor is at hand (the catalog): a key file, checked;
/// none for a key kept as a libvirt secret.
pub(crate) fn file_key(protection: &Protection) -> Result<Option<Key>, BackupError> {
    match protection.key() {
        Some(KeySource::File(path)) => {
            nasbak_repo::store::check_key_file(path)?;
            Ok(Some(Key { path: path.clone(), temporary: false }))
        }
        _ => Ok(None),
    }
}

/// How a file of format `format` is laid out.
pub(crate) fn layout_of(format: FileFormat) -> StoredLayout {
    match format {
        FileFormat::Plain | FileFormat::Compressed => StoredLayout::Qcow2,
        FileFormat::Encrypted => StoredLayout::Qcow2Luks,
        FileFormat::CompressedInLuks => StoredLayout::Qcow2InLuks,
    }
}

/// How a new file of format `format` is written (none: plain).
pub(crate) fn target_protection(format: FileFormat, key: Option<&Key>) -> Option<TargetProtection> {
    (format != FileFormat::Plain)
        .then(|| TargetProtection::new(layout_of(format), format.is_compressed(), key.map(|k| k.path.clone())))
}

/// The image a backup disk reads as: the file at `dir/<file>` with the files it builds on
/// (`chain`, nearest first, as `nasbak_repo::store::ancestors` gives them). A chain of plain or
/// compressed files is opened by its top file's path (qemu-img follows the relative backing
/// names); an encrypted chain, and a reference-system chain, are given file by file (the
/// encrypted one with the key, which must be there).
pub(crate) fn disk_image(
    dir: &Path,
    disk: &ManifestDisk,
    chain: &[(PathBuf, ManifestDisk)],
    key: Option<&Key>,
    backup: &str,
) -> Result<ImageLocation, BackupError> {
    let top = dir.join(&disk.file);
    let encrypted = disk.stored_as.is_encrypted() || chain.iter().any(|(_, d)| d.stored_as.is_encrypted());
    // A reference-system chain's headers may name their parents by the reference script's
    // long-gone mount point: its files are given one by one, as resolved in the repository.
    if std::iter::once(disk).chain(chain.iter().map(|(_, d)| d)).any(|d| d.reference) && !encrypted {
        let mut files = vec![StoredFile { path: top, layout: StoredLayout::Qcow2 }];
        files.extend(chain.iter().map(|(d, m)| StoredFile { path: d.join(&m.file), layout: StoredLayout::Qcow2 }));
        return Ok(ImageLocation::Stored(StoredImage { chain: files, key: None }));
    }
    if !encrypted {
        return Ok(ImageLocation::Path(top));
    }
    let Some(key) = key else {
        return Err(BackupError::KeyNeeded {
            backup: backup.to_owned(),
            detail: format!("disk {} is stored {}", disk.target, disk.stored_as),
        });
    };
    let mut files = vec![StoredFile { path: top, layout: layout_of(disk.stored_as) }];
    files.extend(chain.iter().map(|(d, m)| StoredFile { path: d.join(&m.file), layout: layout_of(m.stored_as) }));
    Ok(ImageLocation::Stored(StoredImage { chain: files, key: Some(key.path.clone()) }))
}

/// The chain an incremental file builds on, as a stored image: the parent's file its backing
/// link `../<parent>/<file>` names (in `vm_dir`), and every file below it, each with its layout
/// from its own manifest, the key given when any is encrypted.
pub(crate) fn parent_chain(
    vm_dir: &Path,
    vm: &str,
    backing: &str,
    key: Option<&Key>,
) -> Result<StoredImage, BackupError> {
    let broken = |reason: String| BackupError::DamagedBackup { backup: format!("{vm}/{backing}"), reason };
    let (parent, file) = backing
        .strip_prefix("../")
        .and_then(|rest| rest.split_once('/'))
        .ok_or_else(|| broken(format!("the backing link {backing:?} is not ../<backup>/<file>")))?;
    let dir = vm_dir.join(parent);
    let disk = match nasbak_repo::store::read_backup("", vm, parent, &dir).map(|e| e.kind) {
        Some(nasbak_repo::store::BackupKind::Nasbak(m)) => m.disks.into_iter().find(|d| d.file == file),
        _ => None,
    }
    .ok_or_else(|| broken(format!("backup {parent} has no file {file}")))?;
    let below = nasbak_repo::store::ancestors(vm_dir, vm, parent, &disk)?;
    let mut files = vec![StoredFile { path: dir.join(&disk.file), layout: layout_of(disk.stored_as) }];
    files.extend(below.iter().map(|(d, m)| StoredFile { path: d.join(&m.file), layout: layout_of(m.stored_as) }));
    let needs_key = files.iter().any(|f| f.layout.needs_key());
    Ok(StoredImage { chain: files, key: key.filter(|_| needs_key).map(|k| k.path.clone()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_off_key_is_random_private_and_gone_with_its_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, va) = one_off_key(dir.path()).unwrap();
        let (b, vb) = one_off_key(dir.path()).unwrap();
        assert_ne!(va.expose(), vb.expose());
        assert!(va.expose().len() == 64 && va.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(fs::read_to_string(a.path()).unwrap(), va.expose());
        assert_eq!(fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(dir.path().join("private")).unwrap().permissions().mode() & 0o777, 0o700);
        let paths = (a.path().to_owned(), b.path().to_owned());
        drop((a, b));
        assert!(!paths.0.exists() && !paths.1.exists(), "removed with the keys");
        assert!(!format!("{va:?}").contains(va.expose()), "Debug never shows it");
    }

    #[test]
    fn formats_map_to_layouts_and_protections() {
        assert_eq!(layout_of(FileFormat::Compressed), StoredLayout::Qcow2);
        assert_eq!(layout_of(FileFormat::CompressedInLuks), StoredLayout::Qcow2InLuks);
        assert!(target_protection(FileFormat::Plain, None).is_none());
        let key = Key { path: "/k".into(), temporary: false };
        let p = target_protection(FileFormat::Encrypted, Some(&key)).unwrap();
        assert_eq!((p.layout, p.compressed, p.key.as_deref()), (StoredLayout::Qcow2Luks, false, Some(Path::new("/k"))));
        let p = target_protection(FileFormat::Compressed, None).unwrap();
        assert_eq!((p.layout, p.compressed), (StoredLayout::Qcow2, true));
    }

    #[test]
    fn an_encrypted_chain_is_opened_file_by_file_and_needs_the_key() {
        let mut top = crate::test_support::manifest("2", &[("vda", "a")]).disks.remove(0);
        let mut parent = top.clone();
        let plain = disk_image(Path::new("/r/vm/2"), &top, &[(PathBuf::from("/r/vm/1"), parent.clone())], None, "vm/2")
            .unwrap();
        assert_eq!(plain, ImageLocation::Path("/r/vm/2/datadisk.a.qcow2".into()));
        top.stored_as = FileFormat::Encrypted;
        parent.stored_as = FileFormat::Encrypted;
        let chain = [(PathBuf::from("/r/vm/1"), parent)];
        let e = disk_image(Path::new("/r/vm/2"), &top, &chain, None, "vm/2").unwrap_err();
        assert!(e.to_string().contains("vm/2") && e.to_string().contains("key"), "{e}");
        let key = Key { path: "/k".into(), temporary: false };
        let ImageLocation::Stored(s) = disk_image(Path::new("/r/vm/2"), &top, &chain, Some(&key), "vm/2").unwrap()
        else {
            panic!("an encrypted chain is a stored image")
        };
        assert_eq!(s.chain.len(), 2);
        assert_eq!(s.chain[1].path, Path::new("/r/vm/1/datadisk.a.qcow2"));
        assert_eq!(s.key.as_deref(), Some(Path::new("/k")));
    }
}
