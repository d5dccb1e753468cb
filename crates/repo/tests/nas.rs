//! Real NFS and SMB repositories, run by `cargo xtask lab nas` inside the NAS lab guest, which is
//! its own server (nfsd with a `no_root_squash` and a `root_squash` export, Samba with a share
//! that needs a user and password) and its own client, over its loopback. Built only with the
//! `nas-guest` feature: the host's kernel has no nfs or cifs file system. See docs/testing.md.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nasbak_process::ExternalCommand;
use nasbak_repo::{
    BackupRepository, MountError, MountInfoEntry, MountTimeouts, Mounter, RepositoryKind, RepositoryMounts,
    SystemMounter,
};

const OPEN: &str = "127.0.0.1:/srv/nfs/open";
const SQUASH: &str = "127.0.0.1:/srv/nfs/squash";
const SHARE: &str = "//127.0.0.1/backup";

fn smb_user() -> String {
    std::env::var("NASBAK_SMB_USER").expect("the NAS guest sets NASBAK_SMB_USER")
}

fn smb_password() -> String {
    std::env::var("NASBAK_SMB_PASSWORD").expect("the NAS guest sets NASBAK_SMB_PASSWORD")
}

fn repo(name: &str, kind: RepositoryKind, address: &str, options: &str) -> BackupRepository {
    BackupRepository::new(name, kind, address, options, None).unwrap_or_else(|e| panic!("{e}"))
}

fn timeouts() -> MountTimeouts {
    MountTimeouts {
        mount: Duration::from_secs(30),
        unmount: Duration::from_secs(15),
        probe: Duration::from_secs(5),
        lock: Duration::from_secs(30),
    }
}

fn mount_of(path: &Path) -> Option<MountInfoEntry> {
    SystemMounter::new("/run/nasbak").mounts().unwrap().into_iter().rev().find(|m| m.mount_point == path)
}

fn run(program: &str, args: &[&str]) {
    ExternalCommand::new(program).args(args).timeout(Duration::from_secs(60)).run().unwrap_or_else(|e| panic!("{e}"));
}

/// Mounts, writes, reads back, measures and unmounts; returns the mount's mountinfo entry.
fn round_trip(r: &BackupRepository) -> MountInfoEntry {
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let m = mounts.acquire(r).unwrap_or_else(|e| panic!("{e:#?}"));
    let root = m.root().to_owned();
    let entry = mount_of(&root).expect("mounted");
    let file = root.join(format!("hello-{}.txt", r.name()));
    fs::write(&file, b"backup bytes").unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"backup bytes");
    fs::remove_file(&file).unwrap();
    m.check_writable().unwrap_or_else(|e| panic!("{e}"));
    let cap = m.capacity().unwrap();
    assert!(cap.total > 0 && cap.available <= cap.total, "{cap:?}");
    m.release().unwrap();
    assert!(mount_of(&root).is_none(), "{} left mounted", root.display());
    entry
}

fn has_options(entry: &MountInfoEntry, wanted: &[&str]) {
    let all: Vec<&str> = entry.mount_options.split(',').chain(entry.super_options.split(',')).collect();
    for w in wanted {
        assert!(all.contains(w), "{w} not in {} / {}", entry.mount_options, entry.super_options);
    }
}

#[test]
fn nfs_v3_with_the_default_options() {
    let e = round_trip(&repo("nfs3", RepositoryKind::Nfs, OPEN, "vers=3"));
    assert_eq!(e.fstype, "nfs");
    has_options(&e, &["vers=3", "soft", "timeo=100", "retrans=2"]);
}

#[test]
fn nfs_v4_2_with_the_default_options() {
    let e = round_trip(&repo("nfs42", RepositoryKind::Nfs, OPEN, "vers=4.2"));
    assert_eq!(e.fstype, "nfs4");
    has_options(&e, &["vers=4.2", "soft", "timeo=100", "retrans=2"]);
}

#[test]
fn nfs_options_an_admin_gives_arrive_as_written() {
    let e = round_trip(&repo("nfsopts", RepositoryKind::Nfs, OPEN, "vers=4.2,rsize=65536,wsize=65536,sec=sys"));
    has_options(&e, &["rsize=65536", "wsize=65536", "sec=sys"]);
}

#[test]
fn a_root_squash_export_is_reported_with_the_fix() {
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let m = mounts.acquire(&repo("squash", RepositoryKind::Nfs, SQUASH, "vers=4.2")).unwrap();
    let e = m.check_writable().unwrap_err();
    assert!(matches!(e, MountError::NotWritable { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("root_squash") && text.contains("no_root_squash"), "{text}");
    m.release().unwrap();
}

#[test]
fn a_stopped_nfs_server_cannot_hang_a_writer_or_the_unmount() {
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let m = mounts.acquire(&repo("stall", RepositoryKind::Nfs, OPEN, "vers=4.2")).unwrap();
    let root = m.root().to_owned();
    fs::write(root.join("before.txt"), b"x").unwrap();
    run("rpc.nfsd", &["0"]);
    // A writer gets an error within the bound the defaults give (soft, timeo=100, retrans=2:
    // about 60 s; docs/repositories.md), never a hang.
    let start = Instant::now();
    let path = root.join("during.txt");
    let writer = std::thread::spawn(move || fs::write(path, b"y"));
    let bound = Duration::from_secs(120);
    while !writer.is_finished() && start.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    // The probe returns at its own deadline.
    let probe_start = Instant::now();
    let probe = m.capacity();
    let probe_took = probe_start.elapsed();
    // Unmount finishes within its timeout (lazily if it must).
    let unmount_start = Instant::now();
    let released = m.release();
    let unmount_took = unmount_start.elapsed();
    run("rpc.nfsd", &["-H", "127.0.0.1", "4"]);
    assert!(writer.is_finished(), "the write still hangs after {took:?}");
    assert!(writer.join().unwrap().is_err(), "a write to a stopped server succeeded");
    println!("write failed after {took:?}; probe {probe_took:?}; unmount {unmount_took:?}");
    assert!(probe.is_err() && probe_took < Duration::from_secs(10), "{probe:?} after {probe_took:?}");
    assert!(unmount_took < Duration::from_secs(40), "unmount took {unmount_took:?}: {released:?}");
    assert!(mount_of(&root).is_none(), "left mounted: {released:?}");
}

/// Scans every process's argv while `f` runs; returns what `f` returned and whether `needle`
/// was ever seen.
fn watching_argv<T>(needle: &str, f: impl FnOnce() -> T) -> (T, bool) {
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicBool::new(false));
    let (d, s, n) = (Arc::clone(&done), Arc::clone(&seen), needle.to_owned());
    let scanner = std::thread::spawn(move || {
        while !d.load(Ordering::SeqCst) {
            for e in fs::read_dir("/proc").unwrap().flatten() {
                if let Ok(cmd) = fs::read(e.path().join("cmdline"))
                    && String::from_utf8_lossy(&cmd).contains(&n)
                {
                    s.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    let out = f();
    done.store(true, Ordering::SeqCst);
    scanner.join().unwrap();
    (out, seen.load(Ordering::SeqCst))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn smb3_password_reaches_mount_cifs_only_through_the_credentials_file() {
    let password = smb_password();
    let options = format!("username={},password={password},vers=3.1.1", smb_user());
    let r = repo("smb", RepositoryKind::Cifs, SHARE, &options);
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let (m, seen) = watching_argv(&password, || mounts.acquire(&r));
    let m = m.unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(!seen, "the password appeared in a process's argv");
    for f in files_under(runtime.path()) {
        let text = fs::read_to_string(&f).unwrap_or_default();
        assert!(!text.contains(&password), "{} still holds the password", f.display());
    }
    let entry = mount_of(m.root()).unwrap();
    assert_eq!(entry.fstype, "cifs");
    has_options(&entry, &["vers=3.1.1", "nobrl"]);
    fs::write(m.root().join("smb.txt"), b"over smb").unwrap();
    assert_eq!(fs::read(m.root().join("smb.txt")).unwrap(), b"over smb");
    m.check_writable().unwrap();
    let root = m.root().to_owned();
    m.release().unwrap();
    assert!(mount_of(&root).is_none());
}

#[test]
fn smb_with_a_wrong_password_fails_clearly_without_echoing_it() {
    let wrong = "Wr0ng-pa55word";
    let r = repo("smbbad", RepositoryKind::Cifs, SHARE, &format!("username={},password={wrong}", smb_user()));
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let e = mounts.acquire(&r).map(|_| ()).unwrap_err();
    let text = format!("{e} {e:?} {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
    assert!(!text.contains(wrong), "the password is echoed: {text}");
    assert!(text.to_lowercase().contains("permission denied") || text.contains("13"), "{text}");
    assert!(files_under(runtime.path()).iter().all(|f| !fs::read_to_string(f).unwrap_or_default().contains(wrong)));
}

#[test]
fn smb_options_an_admin_gives_arrive_as_written() {
    let options = format!(
        "username={},password={},vers=3.0,rsize=65536,sec=ntlmssp,domain=\"WORKGROUP\"",
        smb_user(),
        smb_password()
    );
    let e = round_trip(&repo("smbopts", RepositoryKind::Cifs, SHARE, &options));
    // mount(8) hands the helper the options with their quotes, and mount.cifs hands them to the
    // kernel as they are: a quoted value arrives quoted.
    has_options(&e, &["vers=3.0", "rsize=65536", "sec=ntlmssp", "nobrl", "domain=\"WORKGROUP\""]);
}

// CephFS: the kernel client of the guest's Debian kernel, with mount.ceph, against the host's
// lab cluster (`cargo xtask lab ceph`): the guest reaches the monitors and daemons at the
// addresses they advertise (127.0.0.1) through its user-mode network (see nas-init.sh).

/// The three monitors of the lab cluster, and its file system's root.
const CEPHFS: &str = "127.0.0.1:6789,127.0.0.1:6790,127.0.0.1:6791:/";

fn ceph_key() -> String {
    std::env::var("NASBAK_CEPH_FS_KEY").expect("the NAS guest sets NASBAK_CEPH_FS_KEY")
}

#[test]
fn cephfs_with_three_monitors_gets_its_key_only_through_a_secretfile() {
    let key = ceph_key();
    let r = repo("cephfs", RepositoryKind::CephFs, CEPHFS, &format!("name=nasbak-fs,secret={key}"));
    assert!(
        !format!("{r:?} {}", r.summary().options).contains(&key),
        "the key shows in the repository's Debug or summary"
    );
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let (m, seen) = watching_argv(&key, || mounts.acquire(&r));
    let m = m.unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(!seen, "the key appeared in a process's argv");
    for f in files_under(runtime.path()) {
        assert!(!fs::read_to_string(&f).unwrap_or_default().contains(&key), "{} still holds the key", f.display());
    }
    let entry = mount_of(m.root()).unwrap();
    assert_eq!(entry.fstype, "ceph");
    assert!(!format!("{entry:?}").contains(&key), "the key shows in mountinfo: {entry:?}");
    m.check_writable().unwrap_or_else(|e| panic!("{e}"));
    let capacity = m.capacity().unwrap();
    assert!(capacity.total > 0, "{capacity:?}");
    let dir = m.root().join("cephfs-test");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("a.txt"), b"on cephfs").unwrap();
    assert_eq!(fs::read(dir.join("a.txt")).unwrap(), b"on cephfs");
    fs::remove_dir_all(&dir).unwrap();
    let root = m.root().to_owned();
    m.release().unwrap();
    assert!(mount_of(&root).is_none(), "left mounted");
}

#[test]
fn cephfs_with_a_wrong_key_fails_within_the_mount_timeout_and_leaves_nothing() {
    // A well-formed key of the right user, with other secret bytes.
    let key = ceph_key();
    let mut wrong: Vec<char> = key.chars().collect();
    let i = wrong.len() - 8;
    wrong[i] = if wrong[i] == 'A' { 'B' } else { 'A' };
    let wrong: String = wrong.into_iter().collect();
    let r = repo("cephbad", RepositoryKind::CephFs, CEPHFS, &format!("name=nasbak-fs,secret={wrong}"));
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let started = Instant::now();
    let e = mounts.acquire(&r).map(|_| ()).unwrap_err();
    let took = started.elapsed();
    let text = format!("{e} {e:?} {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
    println!("a wrong CephFS key failed after {took:?}: {e}");
    assert!(took < timeouts().mount + Duration::from_secs(10), "took {took:?}: {text}");
    assert!(!text.contains(&wrong), "the key is echoed: {text}");
    assert!(text.contains("mounting"), "{text}");
    assert!(mount_of(&mounts.mount_point(&r)).is_none(), "left mounted");
    assert!(files_under(runtime.path()).iter().all(|f| !fs::read_to_string(f).unwrap_or_default().contains(&wrong)));
}

#[test]
fn cephfs_with_no_monitor_answering_fails_within_the_mount_timeout_and_leaves_nothing() {
    let r =
        repo("cephnone", RepositoryKind::CephFs, "127.0.0.1:6799:/", &format!("name=nasbak-fs,secret={}", ceph_key()));
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts());
    let started = Instant::now();
    let e = mounts.acquire(&r).map(|_| ()).unwrap_err();
    let took = started.elapsed();
    println!("no CephFS monitor answering failed after {took:?}: {e}");
    assert!(took < timeouts().mount + Duration::from_secs(10), "took {took:?}: {e}");
    assert!(matches!(e, MountError::Command { .. } | MountError::TimedOut { .. }), "{e:#?}");
    assert!(mount_of(&mounts.mount_point(&r)).is_none(), "left mounted");
}
