//! A per-VM lock stored on the repository, so that two processes, on one host or on several
//! hosts sharing the repository, never back up, restore or prune one VM at once.
//!
//! The lock is a lease made of claim files `<repo>/<vm>/.nasbak-lock.<host>.<pid>.<nonce>`.
//! Taking it: create our own claim with `O_EXCL` (which NFS v3+, SMB and CephFS all honour,
//! unlike flock on a CIFS mount with `nobrl`), then look at every other claim. A claim is stale
//! when its process is gone (same host: no such pid, another process under that pid, or another
//! boot) or, for a claim of another host, when it was not renewed within its lease as the
//! repository's own clock tells (its mtime against the mtime of the claim we just created, so
//! clocks of different hosts never matter). Stale claims are removed and the takeover reported.
//! If any live claim remains, we withdraw ours and the lock is held by the other.
//!
//! Two takers can never both win: each creates its claim before it looks, so whichever looks
//! last sees the other (both may withdraw; then one retries after a short random pause). A
//! claim's name is never reused, so removing a stale claim can never remove a fresh one.
//!
//! The holder renews its claim (touches its mtime) every quarter of the lease from a helper
//! thread. Should it find its claim gone (taken over after a stall longer than the lease),
//! [`VmLock::check`] says so, and the workflow abandons its result instead of committing it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The prefix of the lock's claim files inside `<repo>/<vm>/` (a file of exactly this name is a
/// claim written by nasbak before leases).
pub const LOCK_FILE: &str = ".nasbak-lock";

/// The lease a holder gives itself unless told otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    host: String,
    pid: u32,
    since: chrono::DateTime<chrono::Utc>,
    /// The kernel's boot id of the holder's host: a claim of an earlier boot is stale.
    #[serde(default)]
    boot_id: Option<String>,
    /// The holder's start time (clock ticks after boot): a reused pid is told apart.
    #[serde(default)]
    start_time: Option<u64>,
    /// The lease in seconds (claims written before leases: none, so never expired by time).
    #[serde(default)]
    lease_secs: Option<u64>,
}

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    /// Another host may take the lock over once the holder has not renewed it for this long.
    pub lease: Duration,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions { lease: DEFAULT_LEASE }
    }
}

/// A held VM lock; renewed while held, removed on drop.
#[derive(Debug)]
pub struct VmLock {
    path: PathBuf,
    takeovers: Vec<String>,
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
}

/// Why a VM lock could not be taken or kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Someone else holds it.
    #[error(
        "{vm} is being backed up, restored or pruned by {holder} since {since}; the lock passes on by itself once that process ends, or once it has not renewed its lease ({lease}) (lock file {path})"
    )]
    Held {
        /// The VM.
        vm: String,
        /// `host pid N`.
        holder: String,
        /// When.
        since: String,
        /// The holder's lease, as text.
        lease: String,
        /// The holder's claim file.
        path: PathBuf,
    },
    /// Our claim was taken over while we held it (we stalled for longer than the lease).
    #[error(
        "the lock of {vm} was taken over by another process while this one held it (it stalled for longer than its lease); its work was abandoned"
    )]
    Lost {
        /// The VM.
        vm: String,
    },
    /// A lock file could not be written or read.
    #[error("could not take the lock {path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown-host".into())
}

fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks after boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Who we are, as a claim says it.
#[derive(Debug, Clone)]
struct Identity {
    host: String,
    boot_id: Option<String>,
    pid: u32,
}

impl Identity {
    fn current() -> Identity {
        Identity { host: hostname(), boot_id: boot_id(), pid: std::process::id() }
    }
}

/// One claim found in a VM directory.
struct Claim {
    path: PathBuf,
    owner: Option<Owner>,
    mtime: Option<SystemTime>,
}

impl Claim {
    fn read(path: PathBuf) -> Option<Claim> {
        let meta = fs::metadata(&path).ok()?;
        // A claim is written once, in one write, before anyone else can know its name; a read
        // that finds it empty raced with that write: read again.
        let mut owner = None;
        for _ in 0..3 {
            owner = fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<Owner>(&t).ok());
            if owner.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Claim { path, owner, mtime: meta.modified().ok() })
    }

    fn holder(&self) -> String {
        match &self.owner {
            Some(o) => format!("{} pid {}", o.host, o.pid),
            None => "an unknown process".into(),
        }
    }

    fn lease(&self) -> Option<Duration> {
        self.owner.as_ref().and_then(|o| o.lease_secs).map(Duration::from_secs)
    }

    /// Why the claim is stale, or `None` while it may be live. `now` is the repository's clock.
    fn stale(&self, me: &Identity, now: Option<SystemTime>) -> Option<String> {
        if let Some(o) = &self.owner
            && o.host == me.host
        {
            let same_boot = match (&o.boot_id, &me.boot_id) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            if !same_boot {
                return Some(format!("pid {} of this host ran before the last reboot", o.pid));
            }
            match (start_time(o.pid), o.start_time) {
                (None, _) => return Some(format!("pid {} of this host no longer runs", o.pid)),
                (Some(now), Some(then)) if now != then => {
                    return Some(format!("pid {} of this host is now another process", o.pid));
                }
                _ => return None,
            }
        }
        // Another host's claim (or one we cannot read): only its lease tells.
        let lease = self.lease().unwrap_or(if self.owner.is_some() { Duration::MAX } else { DEFAULT_LEASE * 2 });
        let idle = now?.duration_since(self.mtime?).ok()?;
        (idle > lease).then(|| format!("its lease of {} s ran out {} s ago", lease.as_secs(), (idle - lease).as_secs()))
    }
}

fn claims(vm_dir: &Path, except: &Path) -> Result<Vec<Claim>, LockError> {
    let io = |source| LockError::Io { path: vm_dir.to_owned(), source };
    let mut out = Vec::new();
    for e in fs::read_dir(vm_dir).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_claim = name == LOCK_FILE || name.starts_with(&format!("{LOCK_FILE}."));
        if is_claim && e.path() != except {
            out.extend(Claim::read(e.path()));
        }
    }
    Ok(out)
}

impl VmLock {
    /// Takes the lock of `vm` in `vm_dir` with the default lease.
    pub fn take(vm_dir: &Path, vm: &str) -> Result<VmLock, LockError> {
        VmLock::take_with(vm_dir, vm, LockOptions::default())
    }

    /// Takes the lock of `vm` in `vm_dir`: at once, or [`LockError::Held`] at once with who
    /// holds it. Stale claims are taken over and reported by [`VmLock::takeovers`].
    pub fn take_with(vm_dir: &Path, vm: &str, options: LockOptions) -> Result<VmLock, LockError> {
        take_as(vm_dir, vm, options, &Identity::current())
    }

    /// What taking the lock removed: claims of processes that had ended or whose lease ran out.
    pub fn takeovers(&self) -> &[String] {
        &self.takeovers
    }

    /// Whether the lock is still ours: [`LockError::Lost`] once another process took it over
    /// (after this one stalled past its lease). Call before committing work done under it.
    pub fn check(&self, vm: &str) -> Result<(), LockError> {
        if self.lost.load(Ordering::SeqCst) || !self.path.exists() {
            return Err(LockError::Lost { vm: vm.to_owned() });
        }
        Ok(())
    }

    /// The claim file of this holder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn take_as(vm_dir: &Path, vm: &str, options: LockOptions, me: &Identity) -> Result<VmLock, LockError> {
    let owner = Owner {
        host: me.host.clone(),
        pid: me.pid,
        since: chrono::Utc::now(),
        boot_id: me.boot_id.clone(),
        start_time: start_time(me.pid),
        lease_secs: Some(options.lease.as_secs().max(1)),
    };
    let text = serde_json::to_string(&owner).expect("owner serializes");
    let mut takeovers = Vec::new();
    for attempt in 0..5u32 {
        let nonce = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = vm_dir.join(format!("{LOCK_FILE}.{}.{}.{nonce:x}-{attempt}", me.host, me.pid));
        let io = |source| LockError::Io { path: path.clone(), source };
        let mut f = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io)?;
        if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.sync_all()) {
            let _ = fs::remove_file(&path);
            return Err(io(e));
        }
        // Our claim's mtime is the repository's "now": other claims' mtimes are on its clock too.
        let now = f.metadata().ok().and_then(|m| m.modified().ok());
        drop(f);
        let mut live = None;
        for c in claims(vm_dir, &path)? {
            match c.stale(me, now) {
                Some(why) => {
                    // Its name is never reused: removing it can never remove a fresh claim.
                    if fs::remove_file(&c.path).is_ok() {
                        takeovers.push(format!("took over the lock of {vm} from {}: {why}", c.holder()));
                    }
                }
                None => live = Some(c),
            }
        }
        let Some(other) = live else {
            return Ok(VmLock::held(path, takeovers, options.lease));
        };
        let _ = fs::remove_file(&path);
        // Both of two simultaneous takers may have withdrawn: if the other's claim is gone after
        // a short random pause, try again.
        std::thread::sleep(Duration::from_millis(5 + u64::from(nonce as u32 % 40)));
        if other.path.exists() {
            let since = other.owner.as_ref().map_or("an unknown time".into(), |o| o.since.to_rfc3339());
            let lease =
                other.lease().map_or("no lease: a claim of an older nasbak".into(), |l| format!("{} s", l.as_secs()));
            return Err(LockError::Held { vm: vm.to_owned(), holder: other.holder(), since, lease, path: other.path });
        }
    }
    Err(LockError::Io {
        path: vm_dir.join(LOCK_FILE),
        source: std::io::Error::other("other processes kept taking the lock at the same moment; try again"),
    })
}

impl VmLock {
    fn held(path: PathBuf, takeovers: Vec<String>, lease: Duration) -> VmLock {
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let (claim, flag) = (path.clone(), lost.clone());
        let every = (lease / 4).max(Duration::from_millis(250));
        // The renewal thread is not joined: on a stalled repository a renewal may block, and the
        // workflow must never wait for it. It ends at the next wake-up after the lock is dropped.
        let renewer = std::thread::Builder::new().name("nasbak-lock-renew".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if renew(&claim).is_err() {
                    flag.store(true, Ordering::SeqCst);
                    return;
                }
            }
        });
        // Without a renewal thread the lease would run out under us: say the lock is lost.
        if renewer.is_err() {
            lost.store(true, Ordering::SeqCst);
        }
        VmLock { path, takeovers, lost, stop: Some(stop) }
    }
}

/// Touches an existing claim (never creates one: a claim taken over stays gone). The new mtime
/// is the file system's "now" (`UTIME_NOW`: on NFS and SMB the server's clock), the clock
/// that contenders compare it with.
fn renew(claim: &Path) -> std::io::Result<()> {
    use nix::sys::time::TimeSpec;
    use std::os::fd::AsRawFd;
    let f = OpenOptions::new().write(true).open(claim)?;
    nix::sys::stat::futimens(f.as_raw_fd(), &TimeSpec::UTIME_OMIT, &TimeSpec::UTIME_NOW).map_err(std::io::Error::from)
}

impl Drop for VmLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_claim(dir: &Path, name: &str, owner: &Owner, age: Duration) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, serde_json::to_string(owner).unwrap()).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        path
    }

    fn owner(host: &str, pid: u32, lease: Option<u64>) -> Owner {
        Owner {
            host: host.into(),
            pid,
            since: chrono::Utc::now(),
            boot_id: boot_id(),
            start_time: None,
            lease_secs: lease,
        }
    }

    #[test]
    fn held_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let lock = VmLock::take(dir.path(), "vm1").unwrap();
        assert!(lock.takeovers().is_empty());
        let e = VmLock::take(dir.path(), "vm1").unwrap_err();
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(lock);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
        drop(VmLock::take(dir.path(), "vm1").unwrap());
    }

    #[test]
    fn claims_of_ended_processes_are_taken_over_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        // The claim file of an older nasbak, of a process of this host that no longer runs.
        write_claim(dir.path(), LOCK_FILE, &owner(&hostname(), u32::MAX - 1, None), Duration::ZERO);
        let lock = VmLock::take(dir.path(), "vm1").unwrap();
        assert_eq!(lock.takeovers().len(), 1, "{:?}", lock.takeovers());
        assert!(lock.takeovers()[0].contains("no longer runs"), "{:?}", lock.takeovers());
        drop(lock);
        // A reused pid: this very process, but with another start time.
        let mut reused = owner(&hostname(), std::process::id(), Some(60));
        reused.start_time = Some(start_time(std::process::id()).unwrap() + 1);
        write_claim(dir.path(), ".nasbak-lock.x.1.a", &reused, Duration::ZERO);
        let lock = VmLock::take(dir.path(), "vm1").unwrap();
        assert!(lock.takeovers()[0].contains("now another process"), "{:?}", lock.takeovers());
        drop(lock);
        // Another boot of this host.
        let mut old_boot = owner(&hostname(), 1, Some(60));
        old_boot.boot_id = Some("another-boot".into());
        write_claim(dir.path(), ".nasbak-lock.x.1.b", &old_boot, Duration::ZERO);
        assert!(VmLock::take(dir.path(), "vm1").unwrap().takeovers()[0].contains("before the last reboot"));
    }

    #[test]
    fn another_hosts_claim_holds_until_its_lease_runs_out_by_the_repositorys_clock() {
        let dir = tempfile::tempdir().unwrap();
        let fresh =
            write_claim(dir.path(), ".nasbak-lock.h2.1.a", &owner("host2", 1, Some(60)), Duration::from_secs(50));
        let e = VmLock::take(dir.path(), "vm1").unwrap_err().to_string();
        assert!(e.contains("host2 pid 1") && e.contains("60 s"), "{e}");
        assert!(fresh.exists());
        write_claim(dir.path(), ".nasbak-lock.h2.1.a", &owner("host2", 1, Some(60)), Duration::from_secs(75));
        let lock = VmLock::take(dir.path(), "vm1").unwrap();
        assert!(lock.takeovers()[0].contains("host2 pid 1: its lease of 60 s ran out"), "{:?}", lock.takeovers());
        assert!(!fresh.exists());
        drop(lock);
        // A claim of an older nasbak from another host has no lease: never taken over by time.
        write_claim(dir.path(), LOCK_FILE, &owner("host3", 1, None), Duration::from_secs(100_000));
        assert!(VmLock::take(dir.path(), "vm1").unwrap_err().to_string().contains("host3 pid 1"));
    }

    #[test]
    fn the_holder_renews_its_lease_and_knows_when_it_lost_it() {
        let dir = tempfile::tempdir().unwrap();
        let lock = VmLock::take_with(dir.path(), "vm1", LockOptions { lease: Duration::from_secs(1) }).unwrap();
        let first = fs::metadata(lock.path()).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(fs::metadata(lock.path()).unwrap().modified().unwrap() > first, "renewed");
        lock.check("vm1").unwrap();
        // Another host took it over (it seemed stalled): renewal does not bring it back.
        fs::remove_file(lock.path()).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(!lock.path().exists());
        assert!(matches!(lock.check("vm1"), Err(LockError::Lost { .. })));
        // As another host: our own live claim is only stale once its lease ran out.
        let lock = VmLock::take_with(dir.path(), "vm1", LockOptions { lease: Duration::from_secs(1) }).unwrap();
        let other = Identity { host: "host2".into(), boot_id: None, pid: 7 };
        std::thread::sleep(Duration::from_millis(1500));
        assert!(take_as(dir.path(), "vm1", LockOptions::default(), &other).is_err(), "renewed, so still held");
        drop(lock);
    }
}
