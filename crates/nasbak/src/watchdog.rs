//! A thaw watchdog: a small process, started before a running VM's guest is frozen, that thaws
//! the guest and aborts the domain's job if this process dies (SIGKILL, OOM) between the freeze
//! and the end of the push job. Every other path out (errors, Ctrl-C, panics) thaws and aborts
//! in-process; this covers the one that cannot run code.
//!
//! The watchdog is `sh` reading one line from a pipe whose write end only this process holds:
//! `done` disarms it; end of file (this process is gone) makes it run `virsh domfsthaw` and
//! `virsh domjobabort`, each under `timeout`; `thaw` hands it the thaw when the agent did not
//! answer in time: it retries every 5 s for ten minutes, whether or not this process lives. The URI and domain are passed as arguments, never
//! interpolated into the script. It runs in its own process group, so a terminal's Ctrl-C does
//! not reach it. While it is armed the domain's job is ours: `start_backup` refuses a domain
//! that already has a job, and the watchdog is disarmed once the job has ended.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

const SCRIPT: &str = r#"read x
case "$x" in
done) exit 0 ;;
thaw)
  n=0
  while [ $n -lt 120 ]; do
    timeout 30 virsh -q -c "$1" domfsthaw "$2" >/dev/null 2>&1 && exit 0
    n=$((n + 1)); sleep 5
  done
  exit 1 ;;
esac
timeout 30 virsh -q -c "$1" domfsthaw "$2" >/dev/null 2>&1
timeout 30 virsh -q -c "$1" domjobabort "$2" >/dev/null 2>&1
exit 0"#;

/// How long a handed-over thaw is retried (every 5 s).
pub(crate) const THAW_RETRY_MINUTES: u32 = 10;

/// An armed watchdog; disarmed on drop.
#[derive(Debug)]
pub(crate) struct ThawWatchdog {
    child: Option<Child>,
}

impl ThawWatchdog {
    /// Starts a watchdog for `domain` on `uri`; `None` if it cannot be started (no `sh`), in
    /// which case the guarantees of the in-process paths still hold.
    pub(crate) fn arm(uri: &str, domain: &str) -> Option<ThawWatchdog> {
        let child = Command::new("sh")
            .args(["-c", SCRIPT, "nasbak-thaw-watchdog", uri, domain])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok()?;
        Some(ThawWatchdog { child: Some(child) })
    }

    /// Hands the thaw over: the watchdog keeps trying to thaw the guest every 5 s for
    /// [`THAW_RETRY_MINUTES`] minutes, also after this process has ended. Returns its pid.
    pub(crate) fn hand_over_thaw(mut self) -> Option<u32> {
        let mut child = self.child.take()?;
        let pid = child.id();
        let told = child.stdin.take().is_some_and(|mut stdin| stdin.write_all(b"thaw\n").is_ok());
        // Reaped by a thread while this process lives; inherited by init after it.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        told.then_some(pid)
    }
}

impl Drop for ThawWatchdog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"done\n");
            }
            let _ = child.wait();
        }
    }
}
