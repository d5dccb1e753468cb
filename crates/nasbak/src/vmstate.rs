//! A VM's state outside its disks: its UEFI variable store (`<os><nvram>`) and its emulated
//! TPM's state directory (swtpm's). Both are read whole into memory when the disks are read
//! (for a running VM right after the backup job starts, the guest still frozen), written beside
//! the disk files (`state.nvram`, `state.tpm.<name>`) with their checksums in the manifest, and
//! put back by a restore.
//!
//! What a running VM's copy guarantees: swtpm replaces its state file whole (a temporary file,
//! synced, renamed), so the copy is a state swtpm wrote, the one it held when the job started or
//! one a TPM command later. QEMU's pflash writes the variable store in place, so a variable
//! being written at that instant may be caught half-written; OVMF's variable store survives
//! that as it survives a power cut (its fault-tolerant write), so the copy is what the VM would
//! find after losing power at the moment the job started: the disks' own guarantee.
//!
//! On a repository that encrypts, each file is kept as a LUKS-encrypted qcow2 of its bytes (the
//! repository's key; stock `qemu-img convert` reads it back), never in the clear: a TPM's state
//! is as sensitive as a key. qemu-img reads and writes the clear bytes in an anonymous memory
//! file of this process, never in a file system.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nasbak_libvirt::{CancelHandle, Domain};
use nasbak_qemu_img::{ConvertRequest, ImageFormat, ImageLocation, ImageTool, StoredImage, StoredLayout};
use nasbak_repo::{Checksum, FileFormat, ManifestState, NVRAM_FILE, StateKind, TPM_FILE_PREFIX, is_tpm_state_name};

use crate::error::{BackupError, cancelled_or};
use crate::outcome::RestoredState;
use crate::protect::Key;

/// The largest state file nasbak reads: an NVRAM is a few MiB, a TPM's state a few KiB; a path
/// that names something far larger is not a VM's state.
const MAX_STATE_FILE: u64 = 64 << 20;

/// A file of the VM's state, read.
#[derive(Clone)]
pub(crate) struct CapturedFile {
    pub kind: StateKind,
    /// Its name where it was.
    pub name: String,
    /// The NVRAM file, or the TPM state directory.
    pub source: PathBuf,
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Debug for CapturedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the bytes: a TPM's state seals keys.
        write!(f, "{} {} ({} bytes)", self.kind, self.name, self.bytes.len())
    }
}

/// The VM's state as read, and what could not be and why.
#[derive(Debug, Clone, Default)]
pub(crate) struct Captured {
    pub files: Vec<CapturedFile>,
    pub notes: Vec<String>,
}

/// Reads the NVRAM and the TPM state `domain` names. Missing ones are noted, never an error:
/// libvirt makes the NVRAM from its template, and swtpm its state, at the first start, so a VM
/// defined and never started has neither. A file that is there and cannot be read is an error.
pub(crate) fn capture(domain: &Domain) -> Result<Captured, BackupError> {
    let mut captured = Captured::default();
    if let Some(nvram) = &domain.nvram {
        let path = PathBuf::from(&nvram.path);
        match read_file(&path)? {
            Some(file) => captured.files.push(CapturedFile {
                kind: StateKind::Nvram,
                name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                source: path.clone(),
                ..file
            }),
            None => captured.notes.push(format!(
                "the VM's NVRAM {} does not exist yet (libvirt makes it from the firmware's template at the first start)",
                path.display()
            )),
        }
    }
    if let Some(dir) = domain.tpm_state_dir() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                captured.notes.push(format!(
                    "the VM's TPM has no state yet ({} does not exist: swtpm makes it at the first start)",
                    dir.display()
                ));
                return Ok(captured);
            }
            Err(source) => return Err(BackupError::Io { action: "listing the TPM state in", path: dir, source }),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| is_tpm_state_name(n))
            .collect();
        names.sort();
        for name in names {
            // A file swtpm replaced between the listing and the read is gone: its successor
            // (another name) was listed, or is newer than the job's start.
            if let Some(file) = read_file(&dir.join(&name))? {
                captured.files.push(CapturedFile { kind: StateKind::Tpm, name, source: dir.clone(), ..file });
            }
        }
        if !captured.files.iter().any(|f| f.kind == StateKind::Tpm) {
            captured.notes.push(format!("the VM's TPM state directory {} holds no state yet", dir.display()));
        }
    }
    Ok(captured)
}

/// A file's bytes, mode and owner; none when it does not exist.
fn read_file(path: &Path) -> Result<Option<CapturedFile>, BackupError> {
    let io = |source| BackupError::Io { action: "reading the VM's state", path: path.to_owned(), source };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_file() || meta.len() > MAX_STATE_FILE {
        return Err(BackupError::Unsupported {
            what: format!(
                "keeping {} as the VM's state: it is not a regular file of at most {} MiB",
                path.display(),
                MAX_STATE_FILE >> 20
            ),
        });
    }
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    Ok(Some(CapturedFile {
        kind: StateKind::Nvram,
        name: String::new(),
        source: PathBuf::new(),
        bytes,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// The file a state file is kept as in a backup directory.
pub(crate) fn backup_file_name(kind: StateKind, name: &str) -> String {
    match kind {
        StateKind::Nvram => NVRAM_FILE.to_owned(),
        StateKind::Tpm => format!("{TPM_FILE_PREFIX}{name}"),
    }
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The bytes in an anonymous memory file (memfd) that qemu-img reads from or writes to by its
/// `/proc/<pid>/fd/<n>` name when a state file is stored encrypted: the clear bytes never reach
/// a file system, and vanish with the descriptor.
struct MemFile {
    file: fs::File,
    path: PathBuf,
}

impl MemFile {
    fn new(bytes: &[u8]) -> Result<MemFile, BackupError> {
        let io = |source| BackupError::Io {
            action: "holding the VM's state for qemu-img in",
            path: PathBuf::from("memfd"),
            source,
        };
        let fd = nix::sys::memfd::memfd_create(c"nasbak-state", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| io(e.into()))?;
        let mut file = fs::File::from(fd);
        let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()));
        file.write_all(bytes).map_err(io)?;
        // A LUKS payload is whole sectors: the tail is zeros, cut off again when read.
        file.set_len((bytes.len() as u64).div_ceil(512).max(1) * 512).map_err(io)?;
        Ok(MemFile { file, path })
    }

    fn read(&mut self) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut bytes = Vec::new();
        self.file.seek(std::io::SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// Writes the captured files into the backup directory `dir`, stored as the repository's
/// `format` asks (encrypted when it encrypts, else plain), each synced: their manifest entries.
pub(crate) fn write_state<I: ImageTool>(
    images: &I,
    captured: &Captured,
    dir: &Path,
    (format, key): (FileFormat, Option<&Key>),
    cancel: &CancelHandle,
) -> Result<Vec<ManifestState>, BackupError> {
    let stored_as = if format.is_encrypted() { FileFormat::Encrypted } else { FileFormat::Plain };
    let mut entries = Vec::new();
    for f in &captured.files {
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let file = backup_file_name(f.kind, &f.name);
        let path = dir.join(&file);
        let io = |source| BackupError::Io { action: "writing the VM's state into", path: path.clone(), source };
        match stored_as {
            FileFormat::Encrypted => {
                let key = key.ok_or_else(|| BackupError::KeyNeeded {
                    backup: dir.display().to_string(),
                    detail: "the repository encrypts and no key was resolved".into(),
                })?;
                let plain = MemFile::new(&f.bytes)?;
                let mut r =
                    ConvertRequest::new(ImageLocation::Path(plain.path.clone()), path.clone(), ImageFormat::Qcow2);
                r.source_format = Some(ImageFormat::Raw);
                r.protection = crate::protect::target_protection(FileFormat::Encrypted, Some(key));
                r.cancel = cancel.clone();
                images.convert(&r, std::sync::Arc::new(|_| {}))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io)?;
            }
            _ => {
                let mut out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
                out.write_all(&f.bytes).and_then(|()| out.sync_all()).map_err(io)?;
            }
        }
        entries.push(ManifestState {
            kind: f.kind,
            file,
            name: f.name.clone(),
            source: f.source.display().to_string(),
            size: f.bytes.len() as u64,
            checksum: Checksum { algorithm: "blake3".into(), value: blake3_hex(&f.bytes) },
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            stored_as,
        });
        crate::fault::point("state-written");
    }
    Ok(entries)
}

/// A state file of the backup in `dir`, read (decrypted with `key` when it is stored
/// encrypted) and checked against its manifest entry: its bytes.
pub(crate) fn read_state<I: ImageTool>(
    images: &I,
    dir: &Path,
    entry: &ManifestState,
    key: Option<&Key>,
    cancel: &CancelHandle,
) -> Result<Vec<u8>, BackupError> {
    let path = dir.join(&entry.file);
    let damaged = |detail: String| BackupError::Damaged { path: path.clone(), detail };
    let io = |source| BackupError::Io { action: "reading the kept VM state", path: path.clone(), source };
    let mut bytes = match entry.stored_as {
        FileFormat::Encrypted => {
            let key = key.ok_or_else(|| BackupError::KeyNeeded {
                backup: dir.display().to_string(),
                detail: format!("its {} {} is encrypted", entry.kind, entry.name),
            })?;
            let mut plain = MemFile::new(&vec![0; entry.size.min(MAX_STATE_FILE) as usize])?;
            let source = ImageLocation::Stored(StoredImage::single(
                path.clone(),
                StoredLayout::Qcow2Luks,
                Some(key.path().to_owned()),
            ));
            let mut r = ConvertRequest::new(source, plain.path.clone(), ImageFormat::Raw);
            r.source_format = Some(ImageFormat::Qcow2);
            r.out_of_order = false;
            r.target_exists = true;
            r.cancel = cancel.clone();
            images.convert(&r, std::sync::Arc::new(|_| {})).map_err(|e| match e.is_wrong_key() {
                true => BackupError::KeyNeeded {
                    backup: dir.display().to_string(),
                    detail: format!("its {} {} does not open with the key", entry.kind, entry.name),
                },
                false => cancelled_or(cancel, e),
            })?;
            plain.read().map_err(io)?
        }
        _ => {
            let len = fs::metadata(&path).map_err(io)?.len();
            if len > MAX_STATE_FILE {
                return Err(damaged(format!("{len} bytes, the manifest says {}", entry.size)));
            }
            fs::read(&path).map_err(io)?
        }
    };
    if entry.stored_as == FileFormat::Encrypted && bytes.len() as u64 >= entry.size {
        bytes.truncate(entry.size as usize);
    }
    if bytes.len() as u64 != entry.size {
        return Err(damaged(format!("{} bytes, the manifest says {}", bytes.len(), entry.size)));
    }
    let sum = blake3_hex(&bytes);
    if entry.checksum.algorithm != "blake3" || sum != entry.checksum.value {
        return Err(damaged(format!(
            "{} is {sum}, the manifest says {}",
            entry.checksum.algorithm, entry.checksum.value
        )));
    }
    Ok(bytes)
}

/// Where each of the backup's state files goes in the VM `domain` (a restore's target): its
/// NVRAM file, its TPM state directory. A backup's NVRAM or TPM state that the VM has no place
/// for is a mismatch, said before anything is written.
pub(crate) fn placements(
    state: &[ManifestState],
    domain: &Domain,
) -> Result<Vec<(ManifestState, PathBuf)>, Vec<String>> {
    let mut problems = Vec::new();
    let mut placed = Vec::new();
    for s in state {
        match s.kind {
            StateKind::Nvram => match &domain.nvram {
                Some(n) => placed.push((s.clone(), PathBuf::from(&n.path))),
                None => problems.push(format!(
                    "the backup holds the VM's UEFI variables ({}), VM {} has no <nvram>",
                    s.name, domain.name
                )),
            },
            StateKind::Tpm => match domain.tpm_state_dir() {
                Some(dir) => placed.push((s.clone(), dir.join(&s.name))),
                None if problems.iter().any(|p| p.contains("emulated TPM")) => {}
                None => problems.push(format!(
                    "the backup holds the VM's TPM state, VM {} has no emulated TPM (<tpm><backend type='emulator'>)",
                    domain.name
                )),
            },
        }
    }
    if problems.is_empty() { Ok(placed) } else { Err(problems) }
}

/// What a restore says of a backup without state for a VM that has some: the VM's own is left
/// as it is. None when there is nothing to say.
pub(crate) fn missing_note(state: &[ManifestState], domain: &Domain) -> Option<String> {
    let mut missing = Vec::new();
    if domain.nvram.is_some() && !state.iter().any(|s| s.kind == StateKind::Nvram) {
        missing.push("NVRAM");
    }
    if domain.tpm_state_dir().is_some() && !state.iter().any(|s| s.kind == StateKind::Tpm) {
        missing.push("TPM state");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "the backup holds no {} (made before nasbak kept them, or before the VM first started): the VM's own were left as they are",
            missing.join(" or ")
        )
    })
}

/// Writes each state file in its place (see [`placements`]) with its recorded mode and owner:
/// the NVRAM beside its place and renamed over it; the TPM's files likewise, into its state
/// directory (made when missing, owned like its files), whose other state files (a volatile
/// state left by an earlier run, say) are removed so that swtpm starts from the backup's. libvirt
/// relabels both as the VM starts (its DAC and SELinux drivers; AppArmor labels no files).
pub(crate) fn put_back(files: &[(ManifestState, PathBuf, Vec<u8>)]) -> Result<Vec<RestoredState>, BackupError> {
    let mut restored = Vec::new();
    let mut tpm_dirs: Vec<(PathBuf, u32, u32)> = Vec::new();
    for (s, path, bytes) in files {
        let parent = path.parent().unwrap_or(Path::new("/")).to_owned();
        let io = |action: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| BackupError::Io { action, path: p, source }
        };
        if !parent.exists() {
            // As libvirt makes them: the directories above passable (0711); a TPM's own private
            // to swtpm's user, the NVRAM's readable (QEMU's user opens the file in it).
            if let Some(above) = parent.parent() {
                fs::DirBuilder::new().recursive(true).mode(0o711).create(above).map_err(io("creating", above))?;
            }
            let mode = if s.kind == StateKind::Tpm { 0o700 } else { 0o755 };
            fs::DirBuilder::new().mode(mode).create(&parent).map_err(io("creating", &parent))?;
            if s.kind == StateKind::Tpm {
                std::os::unix::fs::chown(&parent, Some(s.uid), Some(s.gid))
                    .map_err(io("giving to swtpm's user", &parent))?;
            }
        }
        if s.kind == StateKind::Tpm && !tpm_dirs.iter().any(|(d, _, _)| *d == parent) {
            tpm_dirs.push((parent.clone(), s.uid, s.gid));
        }
        let tmp = parent.join(format!(".{}.nasbak-restore", path.file_name().unwrap_or_default().to_string_lossy()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(bytes)?;
            std::os::unix::fs::fchown(&f, Some(s.uid), Some(s.gid))?;
            f.set_permissions(fs::Permissions::from_mode(s.mode & 0o7777))?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            fs::File::open(&parent)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io("restoring the VM's state into", path)(e));
        }
        restored.push(RestoredState { kind: s.kind, path: path.display().to_string(), size: bytes.len() as u64 });
    }
    // State files the backup does not hold go: swtpm would resume from them.
    for (dir, _, _) in &tpm_dirs {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let kept = files.iter().any(|(s, p, _)| s.kind == StateKind::Tpm && p == &e.path());
            if is_tpm_state_name(&name) && !kept && e.file_type().is_ok_and(|t| t.is_file()) {
                fs::remove_file(e.path()).map_err(|source| BackupError::Io {
                    action: "removing a TPM state file the backup does not hold",
                    path: e.path(),
                    source,
                })?;
            }
        }
    }
    Ok(restored)
}

/// The index of the VM's own state files an instant restore set aside (see [`set_aside`]).
const ASIDE_INDEX: &str = "state-aside.json";
/// The prefix of each set-aside file's copy.
const ASIDE_PREFIX: &str = "state-aside.";

/// One of the VM's own state files as it was before an instant restore replaced it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Aside {
    path: PathBuf,
    /// A file of a TPM state directory.
    tpm: bool,
    /// Its mode, owner and group, and its copy's name in the work directory; none when the file
    /// did not exist (a VM never started: the restore's file is removed again).
    kept: Option<(u32, u32, u32, String)>,
}

/// Before an instant restore puts the backup's state in the VM's places (`places`, see
/// [`placements`]), the VM's own files there (and the rest of its TPM state directory) are
/// copied into its private work directory `dir`, so that a cancelled or failed instant restore
/// gives the VM back its own identity ([`put_aside_back`]).
pub(crate) fn set_aside(places: &[(ManifestState, PathBuf)], dir: &Path) -> Result<(), BackupError> {
    let mut paths: Vec<(PathBuf, bool)> = places.iter().map(|(s, p)| (p.clone(), s.kind == StateKind::Tpm)).collect();
    for (_, place) in places.iter().filter(|(s, _)| s.kind == StateKind::Tpm) {
        let parent = place.parent().unwrap_or(Path::new("/"));
        for e in fs::read_dir(parent).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_tpm_state_name(&name)
                && e.file_type().is_ok_and(|t| t.is_file())
                && !paths.iter().any(|(p, _)| *p == e.path())
            {
                paths.push((e.path(), true));
            }
        }
    }
    let mut index = Vec::new();
    for (i, (path, tpm)) in paths.into_iter().enumerate() {
        let kept = match read_file(&path)? {
            Some(f) => {
                let name = format!("{ASIDE_PREFIX}{i}");
                let copy = dir.join(&name);
                let io =
                    |source| BackupError::Io { action: "setting aside the VM's state in", path: copy.clone(), source };
                let mut out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&copy).map_err(io)?;
                out.write_all(&f.bytes).and_then(|()| out.sync_all()).map_err(io)?;
                Some((f.mode, f.uid, f.gid, name))
            }
            None => None,
        };
        index.push(Aside { path, tpm, kept });
    }
    let path = dir.join(ASIDE_INDEX);
    let text = serde_json::to_string_pretty(&index).expect("the index serialises");
    nasbak_repo::store::write_atomic(&path, text.as_bytes(), 0o600).map_err(|source| BackupError::Io {
        action: "writing",
        path,
        source,
    })
}

/// Gives the VM back the state files [`set_aside`] kept in `dir` (a file that did not exist is
/// removed, as is a TPM state file swtpm made since), then removes the copies. Nothing to do
/// when none were set aside.
pub(crate) fn put_aside_back(dir: &Path) -> Result<(), BackupError> {
    let path = dir.join(ASIDE_INDEX);
    let Ok(text) = fs::read_to_string(&path) else { return Ok(()) };
    let index: Vec<Aside> =
        serde_json::from_str(&text).map_err(|e| BackupError::Damaged { path: path.clone(), detail: e.to_string() })?;
    let io = |action: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| BackupError::Io { action, path: p, source }
    };
    for a in &index {
        match &a.kept {
            Some((mode, uid, gid, name)) => {
                let bytes = fs::read(dir.join(name)).map_err(io("reading the VM's state set aside in", dir))?;
                let entry = ManifestState {
                    kind: StateKind::Nvram,
                    file: String::new(),
                    name: String::new(),
                    source: String::new(),
                    size: bytes.len() as u64,
                    checksum: Checksum { algorithm: String::new(), value: String::new() },
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                    stored_as: FileFormat::Plain,
                };
                // One at a time, with no TPM directory sweep: that comes below.
                put_back(&[(entry, a.path.clone(), bytes)])?;
            }
            None => match fs::remove_file(&a.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("removing", &a.path)(e)),
                _ => {}
            },
        }
    }
    // TPM state files swtpm made while the restored VM ran, which the VM did not have.
    let tpm_dirs: Vec<PathBuf> =
        index.iter().filter(|a| a.tpm).filter_map(|a| a.path.parent().map(Path::to_owned)).collect();
    for d in &tpm_dirs {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_tpm_state_name(&name) && !index.iter().any(|a| a.path == e.path() && a.kept.is_some()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    discard_aside(dir);
    Ok(())
}

/// Removes what [`set_aside`] kept in `dir` (the restore was finished: the VM keeps the
/// backup's state).
pub(crate) fn discard_aside(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(ASIDE_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(os: &str, devices: &str) -> Domain {
        Domain::parse(&format!(
            "<domain><name>vm</name><uuid>11111111-2222-3333-4444-555555555555</uuid><os><type>hvm</type>{os}</os><devices>{devices}</devices></domain>"
        ))
        .unwrap()
    }

    #[test]
    fn a_vm_without_state_captures_nothing_and_missing_files_are_noted() {
        assert!(capture(&domain("", "")).unwrap().files.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let nvram = dir.path().join("vm_VARS.fd");
        let tpm = dir.path().join("tpm2");
        let d = domain(
            &format!("<nvram>{}</nvram>", nvram.display()),
            &format!(
                "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='dir' path='{}'/></backend></tpm>",
                tpm.display()
            ),
        );
        let c = capture(&d).unwrap();
        assert!(c.files.is_empty());
        assert!(c.notes[0].contains("does not exist yet") && c.notes[1].contains("no state yet"), "{:?}", c.notes);
        fs::write(&nvram, b"vars").unwrap();
        fs::create_dir(&tpm).unwrap();
        fs::write(tpm.join("tpm2-00.permall"), b"perm").unwrap();
        fs::write(tpm.join(".lock"), b"").unwrap();
        fs::create_dir(tpm.join("sub")).unwrap();
        let c = capture(&d).unwrap();
        let got: Vec<(StateKind, &str, &[u8])> =
            c.files.iter().map(|f| (f.kind, f.name.as_str(), f.bytes.as_slice())).collect();
        assert_eq!(
            got,
            [(StateKind::Nvram, "vm_VARS.fd", &b"vars"[..]), (StateKind::Tpm, "tpm2-00.permall", &b"perm"[..])]
        );
        assert!(c.notes.is_empty());
        assert!(!format!("{:?}", c.files).contains("perm\""), "Debug never shows the bytes");
    }

    #[test]
    fn placements_name_every_mismatch_and_put_back_replaces_the_tpm_state_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = |kind, name: &str| ManifestState {
            kind,
            file: backup_file_name(kind, name),
            name: name.into(),
            source: String::new(),
            size: 1,
            checksum: Checksum { algorithm: "blake3".into(), value: blake3_hex(b"x") },
            mode: 0o640,
            uid: 0,
            gid: 0,
            stored_as: FileFormat::Plain,
        };
        let state = [s(StateKind::Nvram, "a.fd"), s(StateKind::Tpm, "tpm2-00.permall")];
        let problems = placements(&state, &domain("", "")).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("no <nvram>") && problems[1].contains("no emulated TPM"), "{problems:?}");
        let nvram = dir.path().join("nvram").join("vm_VARS.fd");
        let tpm = dir.path().join("swtpm").join("tpm2");
        let d = domain(
            &format!("<nvram>{}</nvram>", nvram.display()),
            &format!("<tpm><backend type='emulator'><source type='dir' path='{}'/></backend></tpm>", tpm.display()),
        );
        assert_eq!(
            missing_note(&[], &d).unwrap().split(':').next().unwrap(),
            "the backup holds no NVRAM or TPM state (made before nasbak kept them, or before the VM first started)"
        );
        assert_eq!(missing_note(&state, &d), None);
        assert_eq!(missing_note(&[], &domain("", "")), None, "a VM without either hears nothing");
        let placed = placements(&state, &d).unwrap();
        assert_eq!(placed[0].1, nvram);
        assert_eq!(placed[1].1, tpm.join("tpm2-00.permall"));
        fs::create_dir_all(&tpm).unwrap();
        fs::write(tpm.join("tpm2-00.volatilestate"), b"stale").unwrap();
        fs::write(tpm.join(".lock"), b"").unwrap();
        let files: Vec<_> = placed.into_iter().map(|(s, p)| (s, p, b"x".to_vec())).collect();
        let restored = put_back(&files).unwrap();
        assert_eq!(restored.len(), 2);
        assert_eq!(fs::read(&nvram).unwrap(), b"x");
        assert_eq!(fs::metadata(&nvram).unwrap().mode() & 0o777, 0o640);
        assert!(!tpm.join("tpm2-00.volatilestate").exists(), "a state the backup does not hold is gone");
        assert!(tpm.join(".lock").exists() && tpm.join("tpm2-00.permall").exists());
    }

    #[test]
    fn state_set_aside_comes_back_whole_and_a_file_that_was_not_there_goes() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let tpm = dir.path().join("tpm2");
        fs::create_dir(&tpm).unwrap();
        fs::write(tpm.join("tpm2-00.permall"), b"own").unwrap();
        fs::set_permissions(tpm.join("tpm2-00.permall"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(tpm.join("tpm2-00.volatilestate"), b"own volatile").unwrap();
        let nvram = dir.path().join("never-made_VARS.fd");
        let entry = |kind, name: &str| ManifestState {
            kind,
            file: backup_file_name(kind, name),
            name: name.into(),
            source: String::new(),
            size: 3,
            checksum: Checksum { algorithm: "blake3".into(), value: String::new() },
            mode: 0o600,
            uid: 0,
            gid: 0,
            stored_as: FileFormat::Plain,
        };
        let places = vec![
            (entry(StateKind::Nvram, "x"), nvram.clone()),
            (entry(StateKind::Tpm, "tpm2-00.permall"), tpm.join("tpm2-00.permall")),
        ];
        set_aside(&places, &work).unwrap();
        let files: Vec<_> = places.into_iter().map(|(s, p)| (s, p, b"bak".to_vec())).collect();
        put_back(&files).unwrap();
        fs::write(tpm.join("tpm2-00.savestate"), b"made while it ran").unwrap();
        assert_eq!(fs::read(&nvram).unwrap(), b"bak");
        put_aside_back(&work).unwrap();
        assert!(!nvram.exists(), "the VM had no NVRAM yet: it has none again");
        assert_eq!(fs::read(tpm.join("tpm2-00.permall")).unwrap(), b"own");
        assert_eq!(fs::metadata(tpm.join("tpm2-00.permall")).unwrap().mode() & 0o777, 0o640);
        assert_eq!(fs::read(tpm.join("tpm2-00.volatilestate")).unwrap(), b"own volatile");
        assert!(!tpm.join("tpm2-00.savestate").exists());
        assert_eq!(fs::read_dir(&work).unwrap().count(), 0, "the copies are gone");
        put_aside_back(&work).unwrap();
    }
}
