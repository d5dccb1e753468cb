//! A running VM's compressed or encrypted backup read from libvirt's pull-mode job and written
//! by nasbak on every core ([`nasbak_qemu_img::encode`]), instead of the push job writing
//! through QEMU's own codecs (one cluster or sector at a time, on one thread).
//!
//! The job is started as a push job would be (the guest frozen around its start, the same
//! checkpoint), in pull mode: QEMU exports each disk's point-in-time view over NBD on a Unix
//! socket nasbak made for it, and keeps what the guest overwrites meanwhile in a local scratch
//! file (the guest never waits on the repository). nasbak reads each export (a full: what its
//! block status says is data; an incremental: what the checkpoint's bitmap marks), encodes it
//! into the backup's file, and then ends the job. The files are qcow2 files like those the
//! push job wrote, so restore, verify, mount, merge and key rotation treat them the same.
//!
//! The scratch files are watched as staged files are ([`crate::staging::Staging::watch`]): a
//! guest that overwrites more than the scratch may hold, or a scratch file system near full,
//! stops the job before a guest write could fail on it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nasbak_libvirt::CancelHandle;
use nasbak_qemu_img::StoredLayout;
use nasbak_qemu_img::encode::{EncodeError, EncodeTarget, Encoder, FileHash, Plan, copy_from_nbd};
use nasbak_qemu_img::nbd::{BASE_ALLOCATION, NbdClient};
use nasbak_repo::{Checksum, FileFormat};

use crate::error::BackupError;
use crate::progress::{Observer, Phase, Progress};
use crate::request::Scratch;
use crate::staging::Staging;
use crate::transfer::hash::{CHECKSUM_ALGORITHM, split_algorithm};

/// Where the scratch files of a pull job go when no scratch storage is configured: a local
/// directory (the guest's overwritten clusters wait there, never on the repository).
pub const DEFAULT_PULL_SCRATCH: &str = "/var/lib/nasbak/scratch";
/// How long one exchange with the job's NBD server may take.
const NBD_TIMEOUT: Duration = Duration::from_secs(120);

/// The socket and scratch of one pull job; both removed when dropped.
#[derive(Debug)]
pub(crate) struct PullSetup {
    /// The Unix socket QEMU's NBD server listens on.
    pub(crate) socket: PathBuf,
    socket_dir: PathBuf,
    /// The scratch files' own directory, when the backup is not staged (a staged backup's
    /// scratch files go to its staging directory, watched with the files it stages).
    own_scratch: Option<Staging>,
}

impl PullSetup {
    /// The directory the scratch files go to and that is watched while the job runs: this
    /// job's own, or the backup's staging directory.
    pub(crate) fn scratch<'a>(&'a self, staging: Option<&'a Staging>) -> Option<&'a Staging> {
        self.own_scratch.as_ref().or(staging)
    }
}

impl Drop for PullSetup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.socket_dir);
    }
}

/// Whether a running VM's backup in `format` goes through a pull job: a compressed or
/// encrypted one, unless a disk is itself encrypted (its overwritten clusters would wait in
/// the scratch file as plaintext; the push job keeps those inside QEMU).
pub(crate) fn wanted(format: FileFormat, disks: &[&nasbak_libvirt::Disk]) -> bool {
    format != FileFormat::Plain && disks.iter().all(|d| d.encryption.is_none())
}

/// The user and group QEMU runs as for the domain whose live definition is `xml` (its DAC
/// label, `+UID:+GID`), if it names one.
pub(crate) fn qemu_owner(xml: &str) -> Option<(u32, u32)> {
    let mut rest = xml;
    while let Some(i) = rest.find("<seclabel") {
        let element = &rest[i..];
        let end = element.find("</seclabel>").unwrap_or(element.len());
        let element = &element[..end];
        if element.contains("model='dac'") || element.contains("model=\"dac\"") {
            let label = element.split("<label>").nth(1)?.split("</label>").next()?;
            let (u, g) = label.trim().split_once(':')?;
            return Some((u.trim_start_matches('+').parse().ok()?, g.trim_start_matches('+').parse().ok()?));
        }
        rest = &rest[i + "<seclabel".len()..];
    }
    None
}

/// Makes the socket directory (owned by QEMU's user, who creates the socket; no one else
/// may enter it) and, unless the backup is staged (`staged`), a scratch directory of backup
/// `id` of `vm` in [`DEFAULT_PULL_SCRATCH`] holding at most `scratch_limit` bytes.
pub(crate) fn prepare(
    runtime_dir: &Path,
    staged: bool,
    (vm, id, xml): (&str, &str, &str),
    scratch_limit: u64,
) -> Result<PullSetup, BackupError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Io { action, path, source }
    };
    // A Unix socket's path holds at most 107 bytes: a short directory of its own, named by this
    // process and a count.
    let root = socket_root(runtime_dir);
    fs::create_dir_all(&root).map_err(io("creating", &root))?;
    // QEMU runs as another user: it must reach its directory.
    for d in [root.parent(), Some(root.as_path())].into_iter().flatten() {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io("opening to QEMU", d))?;
    }
    // What killed runs left (their processes are gone).
    crate::staging::remove_left_by_dead_processes(&root);
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let socket_dir = root.join(format!("{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&socket_dir);
    fs::create_dir(&socket_dir).map_err(io("creating", &socket_dir))?;
    fs::set_permissions(&socket_dir, fs::Permissions::from_mode(0o700)).map_err(io("securing", &socket_dir))?;
    let owner = qemu_owner(xml).or_else(|| qemu_process_owner(vm));
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid)).map_err(io("handing to QEMU", &socket_dir))?;
    }
    let own_scratch = if staged {
        None
    } else {
        match Staging::create(&Scratch::new(DEFAULT_PULL_SCRATCH, scratch_limit), vm, &format!("pull-{id}")) {
            Ok(s) => Some(s),
            Err(e) => {
                let _ = fs::remove_dir_all(&socket_dir);
                return Err(e);
            }
        }
    };
    Ok(PullSetup { socket: socket_dir.join("s"), socket_dir, own_scratch })
}

/// Where the sockets of pull jobs go: `<runtime>/p`, or [`SHORT_SOCKET_ROOT`] when that path
/// is too long to leave room for a socket's name.
pub fn socket_root(runtime_dir: &Path) -> PathBuf {
    let root = runtime_dir.join("p");
    if root.as_os_str().len() <= 64 { root } else { PathBuf::from(SHORT_SOCKET_ROOT) }
}

/// The sockets' directory when the runtime directory's path is long.
pub const SHORT_SOCKET_ROOT: &str = "/run/nasbak/p";

/// Whether `socket` is the socket of a pull job a nasbak process that is gone started: in one
/// of the socket roots, its directory named by a pid that no longer runs.
pub(crate) fn orphaned_socket(runtime_dir: &Path, socket: &Path) -> bool {
    let Some(dir) = socket.parent() else { return false };
    let in_root = dir.parent().is_some_and(|r| r == socket_root(runtime_dir) || r == Path::new(SHORT_SOCKET_ROOT));
    in_root && dir.file_name().is_some_and(|n| crate::staging::left_by_dead_process(&n.to_string_lossy()))
}

/// The owner of the VM's running QEMU process, from libvirt's pid file.
fn qemu_process_owner(vm: &str) -> Option<(u32, u32)> {
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{vm}.pid")).ok()?;
    let m = fs::metadata(format!("/proc/{}", pid.trim())).ok()?;
    Some((m.uid(), m.gid()))
}

/// One disk read from the pull job's export.
#[derive(Debug, Clone)]
pub(crate) struct PullDisk {
    /// The disk's target, the export's name.
    pub(crate) target: String,
    /// The backup file written.
    pub(crate) file: PathBuf,
    /// An incremental: its changes since the checkpoint are read (the export's bitmap).
    pub(crate) incremental: bool,
    /// The backing file its header names (an incremental's parent), if any.
    pub(crate) backing: Option<String>,
}

/// Reads each disk of `disks` from the export at `socket` into its file, stored as `format`
/// (encrypted with `passphrase` where it says), until `deadline` or a cancel. Returns each
/// file's checksum by disk target, as the manifest records it, computed while it was written
/// (a file whose hash could not be kept so is left out, to be read again).
pub(crate) fn read_disks(
    socket: &Path,
    disks: &[PullDisk],
    (format, passphrase): (FileFormat, Option<&[u8]>),
    (deadline, cancel): (Instant, &CancelHandle),
    (vm, observer): (&str, &mut dyn Observer),
) -> Result<HashMap<String, Checksum>, BackupError> {
    let layout = crate::protect::layout_of(format);
    let mut checksums = HashMap::new();
    for disk in disks {
        let fail = |detail: String| BackupError::Pull {
            action: format!("reading disk {} of {vm} from its backup job's export", disk.target),
            detail,
        };
        let bitmap = format!("qemu:dirty-bitmap:{}", nasbak_libvirt::export_bitmap(&disk.target));
        let mut contexts = vec![BASE_ALLOCATION];
        if disk.incremental {
            contexts.push(&bitmap);
        }
        let mut client = NbdClient::connect(socket, &disk.target, &contexts, NBD_TIMEOUT)
            .map_err(|e| fail(crate::error::chain(&e)))?;
        let size = client.size();
        let allocation = client.map(BASE_ALLOCATION).map_err(|e| fail(crate::error::chain(&e)))?;
        let plan = if disk.incremental {
            let dirty = client.map(&bitmap).map_err(|e| fail(crate::error::chain(&e)))?;
            Plan::incremental(&dirty, &allocation, size)
        } else {
            Plan::full(&allocation, size)
        };
        let target = EncodeTarget {
            layout,
            compress: format.is_compressed(),
            size,
            // A file inside a LUKS container names no parent: its chain is given by the
            // manifests whenever it is opened.
            backing: disk.backing.clone().filter(|_| layout != StoredLayout::Qcow2InLuks),
            over_parent: disk.incremental,
        };
        let total = plan.data_bytes();
        let mut encoder = Encoder::create(&disk.file, target, passphrase.filter(|_| layout.needs_key()))
            .map_err(|e| encode(e, vm))?;
        let stop = || cancel.is_cancelled() || Instant::now() > deadline;
        let mut report = |done: u64| {
            if done > 0 {
                crate::fault::point("pull-read");
            }
            observer(&Progress::new(Phase::Job, vm, done, total).on_disk(&disk.target));
        };
        report(0);
        copy_from_nbd(&mut client, &plan, &mut encoder, &stop, &mut report).map_err(|e| match e {
            EncodeError::Stopped { .. } if cancel.is_cancelled() => BackupError::Cancelled,
            EncodeError::Stopped { .. } => {
                BackupError::TimedOut { what: format!("reading disk {} of {vm} from its backup job", disk.target) }
            }
            e => encode(e, vm),
        })?;
        let encoded = encoder.finish().map_err(|e| encode(e, vm))?;
        if let Some(hash) = encoded.hash {
            checksums.insert(disk.target.clone(), checksum_of(hash));
        }
        // Once more with the file complete.
        report(total);
        let _ = client.disconnect();
    }
    Ok(checksums)
}

/// A hash the encoder kept, as [`crate::transfer::hash::checksum_file`] computes it with the
/// algorithm [`crate::transfer::hash::checksum_algorithm_for`] gives the file.
fn checksum_of(hash: FileHash) -> Checksum {
    match hash {
        FileHash::Whole(h) => Checksum { algorithm: CHECKSUM_ALGORITHM.to_owned(), value: h.to_hex().to_string() },
        FileHash::AroundLuksHeader { header: (offset, len), parts } => Checksum {
            algorithm: split_algorithm(offset, len),
            value: parts.iter().map(|h| h.to_hex().to_string()).collect::<Vec<_>>().join(":"),
        },
    }
}

/// A failure to write a backup file, in the engine's words.
fn encode(e: EncodeError, vm: &str) -> BackupError {
    match e {
        EncodeError::Io { action, path, source } => BackupError::Io { action, path, source },
        e => BackupError::Pull { action: format!("writing {vm}'s backup"), detail: crate::error::chain(&e) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_orphaned_when_its_process_is_gone_and_it_is_in_a_root_of_ours() {
        let runtime = Path::new("/run/nasbak");
        let root = socket_root(runtime);
        // pid 0x7ffffffe never exists; this process does.
        assert!(orphaned_socket(runtime, &root.join("2147483646-0/s")));
        assert!(!orphaned_socket(runtime, &root.join(format!("{}-0/s", std::process::id()))));
        assert!(!orphaned_socket(runtime, Path::new("/elsewhere/2147483646-0/s")));
        assert!(!orphaned_socket(runtime, &root.join("notapid/s")));
        let long = Path::new("/var/lib/a-runtime-directory-whose-path-is-far-too-long-for-a-socket/x");
        assert!(orphaned_socket(long, &Path::new(SHORT_SOCKET_ROOT).join("2147483646-3/s")));
    }

    /// Guest data of `len` bytes: runs of text (compresses), of noise (does not) and zeros.
    fn guest_data(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|i| match (i >> 16) % 3 {
                0 => b"the quick brown fox jumps over the lazy dog "[i % 44],
                1 => {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_file_written_by_nasbak_is_hashed_as_a_read_of_it_hashes_it_in_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        // Not a whole number of clusters; more data than one batch; holes between.
        let size = 80 * mib + 12_345;
        for format in [FileFormat::Compressed, FileFormat::Encrypted, FileFormat::CompressedInLuks] {
            for (n, backing) in [(0, None), (1, Some("parent.qcow2".to_owned()))] {
                let layout = crate::protect::layout_of(format);
                let path = dir.path().join(format!("{format}-{n}.qcow2"));
                let target = EncodeTarget {
                    layout,
                    compress: format.is_compressed(),
                    size,
                    backing: backing.clone().filter(|_| layout != StoredLayout::Qcow2InLuks),
                    over_parent: backing.is_some(),
                };
                let key = layout.needs_key().then_some(&b"a key for the hash test"[..]);
                let mut e = Encoder::create(&path, target, key).unwrap();
                e.put(0, guest_data(36 * mib as usize, 1)).unwrap();
                if backing.is_some() {
                    e.put_zeros(40 * mib, 2 * mib).unwrap();
                }
                // The last batch compresses whole: the tables then start on the next cluster,
                // past a stretch of the file never written.
                let text = b"the quick brown fox jumps over the lazy dog ".iter().copied().cycle();
                e.put(50 * mib, text.take(4 * mib as usize + 65_536).collect()).unwrap();
                e.put(80 * mib, guest_data(12_345, 3)).unwrap();
                let encoded = e.finish().unwrap();
                let kept = checksum_of(encoded.hash.unwrap_or_else(|| panic!("{format}: a hash was kept")));
                let algorithm = crate::transfer::hash::checksum_algorithm_for(&path, layout);
                assert_eq!(kept.algorithm, algorithm, "{format} {n}");
                let read = crate::transfer::hash::checksum_file(&path, &algorithm).unwrap();
                assert_eq!(kept.value, read, "{format} {n}");
            }
        }
    }

    #[test]
    fn qemus_owner_is_read_from_the_dac_label_only() {
        let xml = "<domain><seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-1</label></seclabel>\
                   <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+108</label><imagelabel>+64055:+108</imagelabel></seclabel></domain>";
        assert_eq!(qemu_owner(xml), Some((64055, 108)));
        assert_eq!(qemu_owner("<domain><seclabel type='none'/></domain>"), None);
        assert_eq!(qemu_owner("<domain><seclabel model='dac'><label>root</label></seclabel></domain>"), None);
    }

    #[test]
    fn a_pull_job_is_for_protected_formats_and_never_for_an_encrypted_volume() {
        let d = nasbak_libvirt::Domain::parse(
            "<domain><name>v</name><devices>\
             <disk type='file' device='disk'><driver type='qcow2'/><source file='/a.qcow2'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver type='qcow2'/><source file='/b.qcow2'><encryption format='luks'><secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></encryption></source><target dev='vdb'/></disk>\
             </devices></domain>",
        )
        .unwrap();
        let (plain, luks) = (&d.disks[0], &d.disks[1]);
        assert!(!wanted(FileFormat::Plain, &[plain]));
        for f in [FileFormat::Compressed, FileFormat::Encrypted, FileFormat::CompressedInLuks] {
            assert!(wanted(f, &[plain]), "{f}");
            assert!(!wanted(f, &[plain, luks]), "{f}");
        }
    }

    #[test]
    fn the_socket_directory_is_qemus_alone_and_goes_with_the_backup() {
        let runtime = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let xml = format!(
            "<domain><seclabel type='dynamic' model='dac'><label>+{}:+{}</label></seclabel></domain>",
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        // A killed run's directory goes (pid 0x7ffffffe never exists).
        let old = socket_root(runtime.path()).join("2147483646-0");
        fs::create_dir_all(&old).unwrap();
        // A staged backup: the scratch files go to its staging directory.
        let staging = Staging::create(&Scratch::new(scratch.path(), 1 << 30), "web1", "2026").unwrap();
        let setup = prepare(runtime.path(), true, ("web1", "2026", &xml), 0).unwrap();
        let staged = setup.scratch(Some(&staging)).unwrap();
        assert!(!old.exists());
        let dir = setup.socket.parent().unwrap().to_owned();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(staged.path().starts_with(scratch.path()));
        let scratch_dir = staged.path().to_owned();
        drop(setup);
        drop(staging);
        assert!(!dir.exists() && !scratch_dir.exists());
    }
}
