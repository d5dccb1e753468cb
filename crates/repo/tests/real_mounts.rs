//! Real mounts through the public API: a loop-mounted ext4 image, a bind mount, `fuse.sshfs` to
//! an sshd on 127.0.0.1, stalled servers, and a CIFS password that must stay off argv.
//! These need root, fuse3, sshfs and openssh-server (`cargo xtask lab up` installs them).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nasbak_process::ExternalCommand;
use nasbak_repo::{
    BackupRepository, MountError, MountTimeouts, Mounter, ReleaseOutcome, RepositoryKind, RepositoryMounts,
    SystemMounter, UnmountOutcome,
};
use nasbak_testlab::{SshServer, pids_with_cmdline};

fn custom(name: &str, fstype: &str, address: &str, options: &str) -> BackupRepository {
    let kind = RepositoryKind::from_parts("custom", Some(fstype)).unwrap();
    BackupRepository::new(name, kind, address, options, None).unwrap()
}

/// An sshd on loopback, the folder it exports, and a `fuse.sshfs` repository of that folder.
fn sshfs_repo(name: &str) -> (SshServer, tempfile::TempDir, BackupRepository) {
    let server = SshServer::start();
    let export = tempfile::tempdir().unwrap();
    let address = format!("root@127.0.0.1:{}", export.path().display());
    let repo = custom(name, "fuse.sshfs", &address, &server.sshfs_options());
    (server, export, repo)
}

fn short_timeouts() -> MountTimeouts {
    MountTimeouts {
        mount: Duration::from_secs(5),
        unmount: Duration::from_secs(3),
        probe: Duration::from_secs(2),
        lock: Duration::from_secs(10),
    }
}

fn is_mounted(path: &Path) -> bool {
    SystemMounter::new("/run/nasbak").mounts().unwrap().iter().any(|m| m.mount_point == path)
}

fn run(program: &str, args: &[&str]) -> String {
    ExternalCommand::new(program).args(args).run().unwrap_or_else(|e| panic!("{e}")).stdout_text()
}

/// Mounts, writes, reads back, measures and unmounts; checks nothing is left mounted.
fn write_read_round_trip(repo: &BackupRepository) -> PathBuf {
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), short_timeouts());
    let mounted = mounts.acquire(repo).unwrap_or_else(|e| panic!("{e:#?}"));
    let root = mounted.root().to_owned();
    assert!(is_mounted(&root), "{root:?} not in mountinfo");
    let mode = fs::metadata(runtime.path().join("mnt")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "QEMU must be able to traverse the mount directory");
    let file = root.join("hello.txt");
    fs::write(&file, b"backup bytes").unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"backup bytes");
    let cap = mounted.capacity().unwrap();
    assert!(cap.total > 0 && cap.used <= cap.total && cap.available <= cap.total, "{cap:?}");
    let outcome = mounted.release().unwrap();
    assert_eq!(outcome, ReleaseOutcome::Unmounted(UnmountOutcome::Clean));
    assert!(!is_mounted(&root), "{root:?} still mounted");
    root
}

#[test]
fn loop_mounted_ext4_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("repo.img");
    fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let repo = custom("loop1", "ext4", image.to_str().unwrap(), "");
    write_read_round_trip(&repo);
    let loops = run("losetup", &["-j", image.to_str().unwrap()]);
    assert!(loops.trim().is_empty(), "loop device left behind: {loops}");
    // The data is on the image: mount it again and find the file.
    let repo = custom("loop1", "ext4", image.to_str().unwrap(), "ro");
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), short_timeouts());
    let m = mounts.acquire(&repo).unwrap();
    assert_eq!(fs::read(m.root().join("hello.txt")).unwrap(), b"backup bytes");
}

/// Two configurations each name a repository `same`, on two images: the second is refused
/// while the first is mounted (it would have written into the first's file system), and is
/// mounted once the first is gone.
#[test]
fn a_repository_of_the_same_name_on_another_image_is_refused_while_the_first_is_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = ["a.img", "b.img"].iter().map(|n| dir.path().join(n)).collect();
    for image in &images {
        fs::File::create(image).unwrap().set_len(32 << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    }
    let first = custom("same", "ext4", images[0].to_str().unwrap(), "");
    let second = custom("same", "ext4", images[1].to_str().unwrap(), "");
    let runtime = tempfile::tempdir().unwrap();
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), short_timeouts());
    let a = mounts.acquire(&first).unwrap_or_else(|e| panic!("{e:#?}"));
    fs::write(a.root().join("first.txt"), b"first").unwrap();
    let err = mounts.acquire(&second).map(|_| ()).unwrap_err();
    assert!(matches!(err, MountError::Conflict { .. }), "{err:#?}");
    assert!(err.to_string().contains(images[0].to_str().unwrap()), "{err}");
    // The same repository is still shared.
    let again = mounts.acquire(&first).unwrap();
    assert_eq!(fs::read(again.root().join("first.txt")).unwrap(), b"first");
    assert_eq!(again.release().unwrap(), ReleaseOutcome::StillInUse);
    assert_eq!(a.release().unwrap(), ReleaseOutcome::Unmounted(UnmountOutcome::Clean));
    let b = mounts.acquire(&second).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(!b.root().join("first.txt").exists(), "the second repository is its own image");
    b.release().unwrap();
}

#[test]
fn bind_mount() {
    let src = tempfile::tempdir().unwrap();
    let repo = custom("bind1", "none", src.path().to_str().unwrap(), "bind");
    write_read_round_trip(&repo);
    assert_eq!(fs::read(src.path().join("hello.txt")).unwrap(), b"backup bytes");
}

#[test]
fn sshfs_over_loopback() {
    let (_server, export, repo) = sshfs_repo("ssh1");
    let root = write_read_round_trip(&repo);
    assert_eq!(fs::read(export.path().join("hello.txt")).unwrap(), b"backup bytes");
    assert!(pids_with_cmdline(&root.to_string_lossy()).is_empty(), "sshfs left running");
}

#[test]
fn concurrent_users_share_the_mount_and_the_last_one_unmounts() {
    let src = tempfile::tempdir().unwrap();
    let repo = custom("shared1", "none", src.path().to_str().unwrap(), "bind");
    let runtime = tempfile::tempdir().unwrap();
    // Two independent managers stand for two processes: the locks are flock(2) on files.
    let first = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), short_timeouts());
    let second = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), short_timeouts());
    let a = first.acquire(&repo).unwrap();
    let b = second.acquire(&repo).unwrap();
    assert_eq!(a.root(), b.root());
    let root = a.root().to_owned();
    let count = SystemMounter::new(runtime.path()).mounts().unwrap().iter().filter(|m| m.mount_point == root).count();
    assert_eq!(count, 1, "mounted twice");
    assert_eq!(a.release().unwrap(), ReleaseOutcome::StillInUse);
    assert!(is_mounted(&root));
    assert_eq!(b.release().unwrap(), ReleaseOutcome::Unmounted(UnmountOutcome::Clean));
    assert!(!is_mounted(&root));
}

#[test]
fn a_server_that_does_not_answer_makes_mount_fail_within_its_timeout() {
    let (server, _export, repo) = sshfs_repo("stall1");
    let runtime = tempfile::tempdir().unwrap();
    let timeouts = MountTimeouts { mount: Duration::from_secs(3), ..short_timeouts() };
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), timeouts);
    server.pause();
    let start = Instant::now();
    let e = mounts.acquire(&repo).map(|_| ()).unwrap_err();
    let took = start.elapsed();
    server.resume();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(matches!(e, MountError::Command { .. }), "{e:?}");
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(text.contains("did not finish within 3s"), "{text}");
    let mp = mounts.mount_point(&repo);
    assert!(!is_mounted(&mp), "a mount was left behind");
    assert!(pids_with_cmdline(&mp.to_string_lossy()).is_empty(), "sshfs left running");
}

#[test]
fn a_stalled_fuse_daemon_makes_probe_fail_and_unmount_still_finishes() {
    let (_server, _export, repo) = sshfs_repo("stall2");
    let runtime = tempfile::tempdir().unwrap();
    let mounter = SystemMounter::new(runtime.path());
    let mounts = RepositoryMounts::new(mounter.clone(), runtime.path(), short_timeouts());
    let mounted = mounts.acquire(&repo).unwrap();
    let root = mounted.root().to_owned();
    let daemons = pids_with_cmdline(&root.to_string_lossy());
    assert!(!daemons.is_empty(), "no sshfs process for {root:?}");
    for pid in &daemons {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    // Probe: an error within the probe timeout, not a hang.
    let start = Instant::now();
    let e = mounter.probe(&root, Duration::from_secs(2)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    assert!(matches!(e, MountError::TimedOut { .. }), "{e}");
    // A second user finds the stale mount, detaches it and mounts afresh (the daemon is stopped,
    // so the new mount gets a new sshfs process).
    let second = RepositoryMounts::new(SystemMounter::new(runtime.path()), runtime.path(), short_timeouts());
    let start = Instant::now();
    let again = second.acquire(&repo).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
    fs::write(again.root().join("after.txt"), b"x").unwrap();
    drop(again);
    drop(mounted);
    // Unmount of the stalled original: within its timeout, lazily if it must.
    let start = Instant::now();
    let outcome = mounter.unmount(&root, Duration::from_secs(3));
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    for pid in &daemons {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    // Nothing may be mounted there any more, however the unmount went.
    let _ = outcome;
    assert!(!is_mounted(&root), "{root:?} still mounted");
}

#[test]
fn a_cifs_password_reaches_the_helper_only_through_a_0600_file() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record");
    let share = dir.path().join("share");
    fs::create_dir_all(&record).unwrap();
    fs::create_dir_all(&share).unwrap();
    // A stand-in for mount(8)+mount.cifs (this kernel has no cifs): it records its argv and the
    // credentials file it was pointed at, then bind-mounts a folder so the rest is real.
    let helper = dir.path().join("mount");
    let script = format!(
        r#"#!/bin/sh
rec={rec}
printf '%s\n' "$@" > "$rec/argv"
tr '\0' ' ' < /proc/$$/cmdline > "$rec/cmdline"
opts=""
while [ $# -gt 2 ]; do [ "$1" = "-o" ] && opts="$2"; shift; done
creds=$(printf '%s' "$opts" | tr ',' '\n' | sed -n 's/^credentials=//p')
stat -c %a "$creds" > "$rec/mode"
cat "$creds" > "$rec/creds"
echo "$creds" > "$rec/credpath"
exec mount --bind {share} "$2"
"#,
        rec = record.display(),
        share = share.display()
    );
    fs::write(&helper, script).unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();
    let repo = BackupRepository::new(
        "smb1",
        RepositoryKind::Cifs,
        "//127.0.0.1/backup",
        r#"username=bk,password="pa,ss word",vers=3.1.1"#,
        None,
    )
    .unwrap();
    let runtime = dir.path().join("runtime");
    let mounter = SystemMounter::new(&runtime).with_mount_program(&helper);
    let mounts = RepositoryMounts::new(mounter, &runtime, short_timeouts());
    let mounted = mounts.acquire(&repo).unwrap_or_else(|e| panic!("{e:#?}"));
    let argv = fs::read_to_string(record.join("argv")).unwrap();
    let cmdline = fs::read_to_string(record.join("cmdline")).unwrap();
    for seen in [&argv, &cmdline] {
        assert!(!seen.contains("pa,ss"), "password on argv: {seen}");
        assert!(seen.contains("nobrl") && seen.contains("username=bk") && seen.contains("credentials="), "{seen}");
    }
    assert!(argv.contains("-t\ncifs\n"), "{argv}");
    assert_eq!(fs::read_to_string(record.join("mode")).unwrap().trim(), "600");
    assert_eq!(fs::read_to_string(record.join("creds")).unwrap(), "password=pa,ss word\n");
    let credpath = fs::read_to_string(record.join("credpath")).unwrap();
    assert!(!Path::new(credpath.trim()).exists(), "credentials file left behind");
    let private = runtime.join("private");
    assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(fs::read_dir(&private).unwrap().count(), 0);
    mounted.release().unwrap();
}
