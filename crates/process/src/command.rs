//! Running an external program as an argv (never through a shell), with a timeout.
//!
//! stdout and stderr are read on their own threads so a full pipe cannot deadlock the child, and
//! the child gets its own process group so a timeout kills its helpers too (`mount` forks
//! `mount.cifs`, `sshfs`, ...). If the child cannot be reaped (a process stuck in the kernel on
//! a dead NAS), the call still returns at its deadline; only a waiting thread is left behind.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use crate::cancel::CancelHandle;
use crate::redact::redact_secrets as redact_loosely;

/// An external command: program, arguments and a timeout.
#[derive(Clone)]
pub struct ExternalCommand {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<std::path::PathBuf>,
    timeout: Duration,
    cancel: Option<CancelHandle>,
}

impl ExternalCommand {
    /// A command running `program` with no arguments and a 60 s timeout.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        ExternalCommand {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            timeout: Duration::from_secs(60),
            cancel: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the child in `dir`.
    pub fn current_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Kills the command (its whole process group) within 20 ms of `cancel` being cancelled.
    pub fn cancel_on(mut self, cancel: &CancelHandle) -> Self {
        self.cancel = Some(cancel.clone());
        self
    }

    /// The argv as one line for messages, with any secret-looking option value redacted.
    pub fn display_argv(&self) -> String {
        let mut parts = vec![self.program.to_string_lossy().into_owned()];
        parts.extend(self.args.iter().map(|a| redact_loosely(&a.to_string_lossy())));
        parts.join(" ")
    }

    /// Runs the command; success means it exited 0 within the timeout.
    pub fn run(&self) -> Result<CommandOutput, CommandError> {
        let output = self.run_unchecked()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(CommandError::Failed { argv: self.display_argv(), status: output.status, stderr: output.stderr_text() })
        }
    }

    /// Like [`ExternalCommand::run`], and hands every chunk of stdout to `observer` as it
    /// arrives (on a reader thread), for progress output such as `qemu-img convert -p`.
    pub fn run_observed(&self, observer: StdoutObserver) -> Result<CommandOutput, CommandError> {
        let output = self.spawn_and_wait(Some(observer))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(CommandError::Failed { argv: self.display_argv(), status: output.status, stderr: output.stderr_text() })
        }
    }

    /// Runs the command and returns whatever it exited with; errors only for failing to start
    /// and for the timeout.
    pub fn run_unchecked(&self) -> Result<CommandOutput, CommandError> {
        self.spawn_and_wait(None)
    }

    /// Runs the command with its stdout handed, chunk by chunk, to `sink` (on a reader thread)
    /// and never kept: for a stream larger than memory (`rbd export-diff ... -`). When `sink`
    /// returns `false` the command's process group is killed and nothing more is read. The
    /// call returns once the command has exited and `sink` has seen all it wrote (or at the
    /// timeout, or at a cancel); success means exit 0. The returned output's `stdout` is empty.
    pub fn run_streamed(&self, sink: StdoutSink) -> Result<CommandOutput, CommandError> {
        let output = self.spawn_and_wait_with(Output::Streamed(sink))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(CommandError::Failed { argv: self.display_argv(), status: output.status, stderr: output.stderr_text() })
        }
    }

    fn spawn_and_wait(&self, observer: Option<StdoutObserver>) -> Result<CommandOutput, CommandError> {
        self.spawn_and_wait_with(match observer {
            Some(o) => Output::Observed(o),
            None => Output::Kept,
        })
    }

    fn spawn_and_wait_with(&self, output: Output) -> Result<CommandOutput, CommandError> {
        let mut command = Command::new(&self.program);
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let mut child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| CommandError::Spawn { argv: self.display_argv(), source })?;
        let pid = child.id();
        let streamed = matches!(output, Output::Streamed(_));
        let stdout = read_in_background(child.stdout.take(), output, pid);
        let stderr = read_in_background(child.stderr.take(), Output::Kept, pid);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let deadline = std::time::Instant::now() + self.timeout;
        // With a cancel handle, looked at every 20 ms: a cancel kills the group well within 100 ms.
        let tick = if self.cancel.is_some() { Duration::from_millis(20) } else { self.timeout };
        let status = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let cancelled = self.cancel.as_ref().is_some_and(CancelHandle::is_cancelled);
            if left.is_zero() || cancelled {
                kill_group(pid);
                // Give the group a moment to die so its pipes close; never wait longer.
                let _ = rx.recv_timeout(Duration::from_secs(2));
                let stderr = String::from_utf8_lossy(&collect(stderr, Duration::from_millis(200))).into_owned();
                let argv = self.display_argv();
                return Err(if cancelled {
                    CommandError::Cancelled { argv }
                } else {
                    CommandError::TimedOut { argv, timeout: self.timeout, stderr }
                });
            }
            match rx.recv_timeout(left.min(tick)) {
                Ok(Ok(status)) => break status,
                Ok(Err(source)) => return Err(CommandError::Spawn { argv: self.display_argv(), source }),
                Err(_) => {}
            }
        };
        // A daemon forked by the child (sshfs) may keep a pipe open: read what is there, briefly.
        // A streamed stdout is waited for until the deadline: its sink may still be writing
        // what the pipe held when the command exited.
        let grace = Duration::from_secs(2);
        let stdout_wait =
            if streamed { deadline.saturating_duration_since(std::time::Instant::now()).max(grace) } else { grace };
        let stdout = collect(stdout, stdout_wait);
        Ok(CommandOutput { status, stdout, stderr: collect(stderr, grace) })
    }
}

impl fmt::Debug for ExternalCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalCommand").field("argv", &self.display_argv()).field("timeout", &self.timeout).finish()
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A pipe being read on its own thread; what was read so far stays available even if the pipe
/// never closes.
struct PipeReader {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

/// A callback that sees a command's stdout as it is written.
pub type StdoutObserver = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A consumer of a command's whole stdout ([`ExternalCommand::run_streamed`]): `false` stops
/// the command.
pub type StdoutSink = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// What becomes of a pipe's bytes.
enum Output {
    /// Kept in memory.
    Kept,
    /// Kept, and shown to an observer as they come.
    Observed(StdoutObserver),
    /// Handed to a sink, not kept.
    Streamed(StdoutSink),
}

fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>, mut output: Output, pid: u32) -> PipeReader {
    let (tx, done) = mpsc::channel();
    let buf = Arc::new(Mutex::new(Vec::new()));
    if let Some(mut pipe) = pipe {
        let buf = Arc::clone(&buf);
        thread::spawn(move || {
            let size = if matches!(output, Output::Streamed(_)) { 1 << 20 } else { 8192 };
            let mut chunk = vec![0u8; size];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                match &mut output {
                    Output::Streamed(sink) => {
                        if !sink(&chunk[..n]) {
                            kill_group(pid);
                            break;
                        }
                        continue;
                    }
                    Output::Observed(observe) => observe(&chunk[..n]),
                    Output::Kept => {}
                }
                buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
            }
            let _ = tx.send(());
        });
    }
    PipeReader { buf, done }
}

fn collect(reader: PipeReader, wait: Duration) -> Vec<u8> {
    let _ = reader.done.recv_timeout(wait);
    std::mem::take(&mut *reader.buf.lock().unwrap_or_else(|e| e.into_inner()))
}

/// What a finished command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    /// stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text, trimmed.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_owned()
    }
}

/// An external command failed to start, timed out or exited non-zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The program could not be started (not installed, not executable).
    #[error("could not run `{argv}`; is the program installed?")]
    Spawn {
        /// The argv, redacted.
        argv: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program did not finish in time and was killed.
    #[error("`{argv}` did not finish within {timeout:?} and was killed{}", stderr_suffix(.stderr))]
    TimedOut {
        /// The argv, redacted.
        argv: String,
        /// The timeout that passed.
        timeout: Duration,
        /// What it had written to stderr.
        stderr: String,
    },
    /// The command was cancelled and killed.
    #[error("`{argv}` was cancelled and killed")]
    Cancelled {
        /// The argv, redacted.
        argv: String,
    },
    /// The program exited with a failure status.
    #[error("`{argv}` failed ({status}){}", stderr_suffix(.stderr))]
    Failed {
        /// The argv, redacted.
        argv: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr, trimmed.
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() { String::new() } else { format!(": {}", redact_loosely(stderr)) }
}

impl CommandError {
    /// The stderr the program wrote, if it ran.
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Spawn { .. } | CommandError::Cancelled { .. } => "",
            CommandError::TimedOut { stderr, .. } | CommandError::Failed { stderr, .. } => stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_streamed_stdout_is_seen_whole_and_not_kept_and_a_sink_can_stop_it() {
        let seen = Arc::new(Mutex::new(0usize));
        let counter = Arc::clone(&seen);
        let out = ExternalCommand::new("head")
            .args(["-c", "3000001", "/dev/zero"])
            .run_streamed(Box::new(move |b| {
                *counter.lock().unwrap() += b.len();
                true
            }))
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), 3_000_001);
        assert!(out.stdout.is_empty());
        // `yes` never ends by itself: the sink's `false` kills it.
        let started = Instant::now();
        let err =
            ExternalCommand::new("yes").timeout(Duration::from_secs(30)).run_streamed(Box::new(|_| false)).unwrap_err();
        assert!(matches!(err, CommandError::Failed { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn success_failure_and_stderr() {
        let out = ExternalCommand::new("sh").args(["-c", "echo out; echo err >&2"]).run().unwrap();
        assert_eq!(out.stdout_text(), "out\n");
        assert_eq!(out.stderr_text(), "err");
        let e = ExternalCommand::new("sh").args(["-c", "echo boom >&2; exit 3"]).run().unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sh -c") && text.contains("boom") && text.contains("exit status: 3"), "{text}");
        let e = ExternalCommand::new("/nonexistent/prog").run().unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let start = Instant::now();
        let e = ExternalCommand::new("sh")
            .args(["-c", "sleep 30 & echo started >&2; wait"])
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert!(matches!(e, CommandError::TimedOut { .. }), "{e}");
        assert!(e.to_string().contains("started"), "{e}");
    }

    #[test]
    fn cancel_kills_the_whole_group_promptly() {
        let cancel = CancelHandle::new();
        let trigger = cancel.clone();
        let start = Instant::now();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            trigger.cancel();
        });
        let pidfile = std::env::temp_dir().join(format!("nasbak-cancel-test-{}", std::process::id()));
        let e = ExternalCommand::new("sh")
            .args(["-c", &format!("sleep 30 & echo $! > {}; wait", pidfile.display())])
            .timeout(Duration::from_secs(60))
            .cancel_on(&cancel)
            .run()
            .unwrap_err();
        assert!(matches!(e, CommandError::Cancelled { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        // The background sleep (the group, not only the shell) is gone.
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        let _ = std::fs::remove_file(&pidfile);
        let gone = (0..40).any(|_| {
            thread::sleep(Duration::from_millis(50));
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
        });
        assert!(gone, "sleep {pid} survived the cancel");
        assert_eq!(cancel, cancel.clone());
        assert_ne!(cancel, CancelHandle::new());
    }

    #[test]
    fn a_daemon_holding_the_pipe_does_not_block() {
        let start = Instant::now();
        let out = ExternalCommand::new("sh").args(["-c", "(sleep 20 &) ; echo done"]).run().unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(out.status.success());
        assert_eq!(out.stdout_text(), "done\n");
    }

    #[test]
    fn an_observer_sees_stdout_while_the_command_runs() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let out = ExternalCommand::new("sh")
            .args(["-c", "printf 'a\\r'; sleep 0.2; printf 'b\\r'"])
            .run_observed(Arc::new(move |chunk: &[u8]| sink.lock().unwrap().extend_from_slice(chunk)))
            .unwrap();
        assert_eq!(out.stdout_text(), "a\rb\r");
        assert_eq!(*seen.lock().unwrap(), b"a\rb\r");
    }

    #[test]
    fn argv_display_redacts_secrets() {
        let c = ExternalCommand::new("mount").args(["-o", "user=a,password=hunter2", "src"]);
        assert_eq!(c.display_argv(), "mount -o user=a,password=*** src");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
