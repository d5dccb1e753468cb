//! Many processes take and release one VM lock as fast as they can, and half of the holders
//! "crash" (their claim is left behind with the pid of a process that no longer runs), so stale
//! locks are taken over again and again while others race for them. No two processes may ever
//! hold the lock at once: each logs its holds, and the logs must not overlap.
//!
//! Uses only the public API (`VmLock::take`, `LOCK_FILE`), so the same test shows the defect in
//! the earlier lock (a takeover removed whatever lock was there after a read, also a fresh one).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use nasbak::{LOCK_FILE, VmLock};

const RACE_DIR: &str = "NASBAK_LOCK_RACE_DIR";
/// A pid no process has (above the kernel's pid_max).
const DEAD_PID: u32 = 4_000_000_000;

#[test]
fn racing_processes_never_hold_one_lock_together() {
    if let Ok(dir) = std::env::var(RACE_DIR) {
        return race_child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("vm")).unwrap();
    let children: Vec<_> = (0..12)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "racing_processes_never_hold_one_lock_together", "--nocapture"])
                .env(RACE_DIR, dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let log = fs::read_to_string(dir.path().join("log")).unwrap();
    let mut events: Vec<(u128, bool, &str)> = log
        .lines()
        .map(|l| {
            let mut p = l.split(' ');
            let (kind, pid, t) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
            (t.parse().unwrap(), kind == "S", pid)
        })
        .collect();
    events.sort();
    let mut holder: Option<&str> = None;
    for (_, start, pid) in &events {
        if *start {
            assert!(holder.is_none(), "{pid} took the lock while {holder:?} held it");
            holder = Some(pid);
        } else {
            assert_eq!(holder, Some(*pid), "{pid} released a lock it did not hold alone");
            holder = None;
        }
    }
    assert!(events.len() >= 2 * 12 * 4, "every process held the lock 4 times: {} holds", events.len() / 2);
}

fn race_child(dir: &Path) {
    let now = || SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    let log = || OpenOptions::new().append(true).create(true).open(dir.join("log")).unwrap();
    let vm_dir = dir.join("vm");
    let pid = std::process::id();
    let host = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
    let mut held = 0;
    for _ in 0..5000 {
        let Ok(lock) = VmLock::take(&vm_dir, "vm") else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        writeln!(log(), "S {pid} {}", now()).unwrap();
        std::thread::sleep(Duration::from_millis(3));
        writeln!(log(), "E {pid} {}", now()).unwrap();
        held += 1;
        if held % 2 == 0 {
            // "Crash": the claim stays, naming a process that no longer runs.
            let dead = format!(r#"{{"host":"{host}","pid":{DEAD_PID},"since":"2026-01-01T00:00:00Z"}}"#);
            for e in fs::read_dir(&vm_dir).unwrap().flatten() {
                let ours = fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&format!("\"pid\":{pid},")));
                if e.file_name().to_string_lossy().starts_with(LOCK_FILE) && ours {
                    fs::write(e.path(), &dead).unwrap();
                }
            }
            std::mem::forget(lock);
        } else {
            drop(lock);
        }
        if held == 4 {
            return;
        }
    }
    panic!("process {pid} held the lock only {held} times in 5000 attempts");
}
