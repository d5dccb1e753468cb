//! Test binaries under deadlines: no test can hang `cargo xtask test`, and so CI.
//!
//! `cargo test` runs test binaries one after the other and waits for each for ever: one test
//! stuck in a call that never returns (a libvirt call to a frozen QEMU, a read on a stalled
//! mount) holds the whole suite until CI's hard limit. So `cargo xtask test` builds the test
//! binaries with cargo, then runs each itself:
//! - its tests are listed first (`--list`), so that the tests still running at the deadline are
//!   known by name (those listed that never reported);
//! - it runs in its own process group, its stdout read line by line (`test NAME ... ok`);
//! - past its deadline ([`Limits::per_binary`]), gdb prints the stack of every thread of the
//!   tests still running (libtest names each test's thread after it), the group is killed, and
//!   those tests count as failed, by name; the next binary runs;
//! - once the suite's budget ([`Limits::suite`]) is spent, the binaries not yet run fail by name
//!   without running, so a run that goes wrong still ends well inside CI's limit.
//!
//! A binary without the libtest harness takes part when it answers `--list` with `NAME: test`
//! lines and prints `test NAME ... ok|FAILED` and a `test result:` line as libtest does (the
//! fault matrix does).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use nasbak_process::ExternalCommand;

/// How long a test binary, and the whole test phase, may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One test binary, from its start to its end (`NASBAK_TEST_DEADLINE`, seconds).
    pub per_binary: Duration,
    /// Every test binary together (`NASBAK_SUITE_DEADLINE`, seconds).
    pub suite: Duration,
}

impl Limits {
    /// 20 minutes a binary (the slowest, the fault matrix, takes about 8 on 2 cores) and 50 for
    /// the suite (it takes about 15): with lab up, lints and the NAS and Ceph guests, a run
    /// stays under an hour whatever its tests do. The environment may set either.
    pub fn from_env() -> Result<Limits> {
        let get = |var: &str, default: u64| -> Result<Duration> {
            match std::env::var(var) {
                Ok(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs)
                    .with_context(|| format!("{var}={v:?}: expected a number of seconds above 0")),
                Err(_) => Ok(Duration::from_secs(default)),
            }
        };
        Ok(Limits { per_binary: get("NASBAK_TEST_DEADLINE", 20 * 60)?, suite: get("NASBAK_SUITE_DEADLINE", 50 * 60)? })
    }
}

/// A test binary cargo built, and how cargo would run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// `package/target` (`nasbak/lab_instant`, `nasbak-libvirt/lib`).
    pub name: String,
    /// The executable.
    pub path: PathBuf,
    /// Its package's directory: cargo runs tests there.
    pub dir: PathBuf,
    /// Its package's name.
    pub package: String,
}

/// What one binary did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed, by name (the hung ones included).
    pub failed: Vec<String>,
    /// Tests still running at the deadline, by name.
    pub hung: Vec<String>,
}

/// The test binaries `cargo <args> --no-run` builds (for example `test --workspace`), from
/// cargo's JSON messages.
pub fn test_binaries(args: &[&str]) -> Result<Vec<TestBinary>> {
    println!("xtask: cargo {} --no-run", args.join(" "));
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo to build the tests")?;
    if !out.status.success() {
        bail!("building the tests failed ({}): see cargo's output above; {}", out.status, disk_free());
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(exe) = msg["executable"].as_str() else { continue };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let manifest = Path::new(msg["manifest_path"].as_str().context("an artifact without its manifest")?);
        let package = msg["package_id"]
            .as_str()
            .and_then(package_name)
            .or_else(|| manifest.parent()?.file_name()?.to_str().map(str::to_owned))
            .unwrap_or_default();
        let target = msg["target"]["name"].as_str().unwrap_or_default();
        binaries.push(TestBinary {
            name: format!("{package}/{target}"),
            path: exe.into(),
            dir: manifest.parent().context("a manifest in a directory")?.to_owned(),
            package,
        });
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    binaries.dedup();
    Ok(binaries)
}

/// The package name in a cargo package id: `path+file:///w/crates/repo#nasbak-repo@0.1.0`,
/// `path+file:///w/crates/nasbak#0.1.0` (a package named as its directory), or the older
/// `nasbak-repo 0.1.0 (path+file:///...)`.
fn package_name(id: &str) -> Option<String> {
    if let Some((url, tail)) = id.rsplit_once('#') {
        return match tail.split_once('@') {
            Some((name, _)) => Some(name.to_owned()),
            None => Some(url.rsplit('/').next()?.to_owned()),
        };
    }
    Some(id.split(' ').next()?.to_owned())
}

/// Runs every binary under `limits`, printing its output; returns (passed, failed) and prints
/// the failed tests by name at the end.
pub fn run_all(binaries: &[TestBinary], limits: Limits) -> Result<(u64, u64)> {
    let suite_end = Instant::now() + limits.suite;
    let (mut passed, mut failed) = (0, Vec::new());
    for bin in binaries {
        let left = suite_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let names = list(bin, &[])?;
            println!("xtask: {} not run: the suite's budget of {:?} is spent", bin.name, limits.suite);
            failed.extend(
                names.into_iter().map(|n| format!("{}::{n} (not run: the suite's budget was spent)", bin.name)),
            );
            continue;
        }
        let out = run_binary(bin, &[], limits.per_binary.min(left))?;
        passed += out.passed;
        failed.extend(out.failed.iter().map(|n| format!("{}::{n}", bin.name)));
    }
    if !failed.is_empty() {
        println!("xtask: failed tests:");
        for f in &failed {
            println!("    {f}");
        }
    }
    Ok((passed, failed.len() as u64))
}

/// The tests of `bin` (with `filters`), by name.
pub fn list(bin: &TestBinary, filters: &[&str]) -> Result<Vec<String>> {
    let out = ExternalCommand::new(&bin.path)
        .args(["--list", "--format", "terse"])
        .args(filters)
        .current_dir(&bin.dir)
        .env("CARGO_MANIFEST_DIR", &bin.dir)
        .env("CARGO_PKG_NAME", &bin.package)
        .timeout(Duration::from_secs(120))
        .run()
        .with_context(|| format!("listing the tests of {}", bin.name))?;
    Ok(out.stdout_text().lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_owned).collect())
}

/// One result line of libtest's pretty output: the test and whether it passed (`None` when
/// ignored).
fn result_line(line: &str) -> Option<(&str, Option<bool>)> {
    let rest = line.strip_prefix("test ")?;
    let (name, verdict) = rest.split_once(" ... ")?;
    let verdict = match verdict.split_whitespace().next()?.trim_end_matches(',') {
        "ok" => Some(true),
        "FAILED" => Some(false),
        "ignored" => None,
        _ => return None,
    };
    Some((name, verdict))
}

/// libtest's closing counts: `test result: ok. 3 passed; 1 failed; ...`.
pub fn closing_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((count(" passed"), count(" failed")))
}

/// Runs `bin` with `filters` until it ends or `deadline` passes (see the module's
/// documentation).
pub fn run_binary(bin: &TestBinary, filters: &[&str], deadline: Duration) -> Result<Outcome> {
    let listed = list(bin, filters)?;
    if listed.is_empty() {
        return Ok(Outcome::default());
    }
    println!("xtask: {} ({} tests, deadline {:?})", bin.name, listed.len(), deadline);
    let started = Instant::now();
    let mut child = Command::new(&bin.path)
        .args(filters)
        .current_dir(&bin.dir)
        .env("CARGO_MANIFEST_DIR", &bin.dir)
        .env("CARGO_PKG_NAME", &bin.package)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.path.display()))?;
    let stdout = child.stdout.take().context("the test binary's stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut done, mut passed, mut failed) = (BTreeSet::new(), 0u64, Vec::new());
    let mut closing: Option<(u64, u64)> = None;
    let end = started + deadline;
    let timed_out = loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now()).min(Duration::from_secs(1))) {
            Ok(line) => {
                println!("{line}");
                if let Some((name, verdict)) = result_line(&line) {
                    done.insert(name.to_owned());
                    match verdict {
                        Some(true) => passed += 1,
                        Some(false) => failed.push(name.to_owned()),
                        None => {}
                    }
                } else if let Some(counts) = closing_counts(&line) {
                    closing = Some(counts);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= end => break true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    let pgid = Pid::from_raw(child.id() as i32);
    if !timed_out {
        // Its stdout closed: the binary has ended (or is about to); children it left in its
        // group go with it.
        let status = child.wait()?;
        let _ = killpg(pgid, Signal::SIGKILL);
        return Ok(match closing {
            Some((p, f)) => Outcome { passed: p, failed: pad_failed(failed, f, &bin.name), hung: Vec::new() },
            // Ended without its closing line (a crash, an abort): what did not report failed.
            None => {
                let missing: Vec<String> = listed.iter().filter(|n| !done.contains(*n)).cloned().collect();
                println!("xtask: {} ended ({status}) before it reported {missing:?}", bin.name);
                failed.extend(missing);
                Outcome { passed, failed, hung: Vec::new() }
            }
        });
    }
    let hung: Vec<String> = listed.iter().filter(|n| !done.contains(*n)).cloned().collect();
    println!(
        "xtask: {} exceeded its deadline of {deadline:?}; still running: {}",
        bin.name,
        if hung.is_empty() { "(no test; the binary itself)".to_owned() } else { hung.join(", ") }
    );
    println!("{}", backtraces(child.id(), &hung));
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = child.wait();
    // What the killed tests had made on the lab (domains, their disks and loop devices, a
    // stopped QEMU among them) is swept now, not at the next lab test's start.
    nasbak_testlab::sweep_leftovers();
    for name in &hung {
        println!("test {name} ... FAILED (hung: still running after {deadline:?})");
    }
    failed.extend(hung.iter().cloned());
    if failed.is_empty() {
        failed.push("(the binary, after its tests)".to_owned());
    }
    Ok(Outcome { passed, failed, hung })
}

/// The closing line's failure count, with names where the result lines gave them.
fn pad_failed(mut named: Vec<String>, count: u64, bin: &str) -> Vec<String> {
    while (named.len() as u64) < count {
        named.push(format!("(a test of {bin} whose name it did not print)"));
    }
    named
}

/// The stacks of the threads of `pid` that run the tests `hung` (libtest names a test's thread
/// after the test; the kernel keeps its first 15 bytes), or of every thread when none matches;
/// a note instead when gdb is missing or does not answer in a minute.
fn backtraces(pid: u32, hung: &[String]) -> String {
    let out = ExternalCommand::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "set pagination off", "-ex", "thread apply all bt 40"])
        .timeout(Duration::from_secs(60))
        .run_unchecked();
    let text = match out {
        Ok(o) => o.stdout_text(),
        Err(e) => return format!("xtask: no backtrace (gdb: {e})"),
    };
    let blocks = thread_blocks(&text);
    let wanted: Vec<&String> = blocks
        .iter()
        .filter(|b| {
            let name = b.lines().next().and_then(|l| l.split('"').nth(1)).unwrap_or_default();
            !name.is_empty() && hung.iter().any(|h| h.starts_with(name) || h.replace("::", "_").starts_with(name))
        })
        .collect();
    let shown: Vec<&String> = if wanted.is_empty() { blocks.iter().collect() } else { wanted };
    let mut s = format!("xtask: the stacks of the stuck threads ({} of {}):\n", shown.len(), blocks.len());
    for b in shown {
        s.push_str(b);
        s.push('\n');
    }
    s
}

/// gdb's `thread apply all bt` output cut into one block a thread.
fn thread_blocks(text: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("Thread ") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

/// How much room the disk of the workspace's `target/` has left, as a sentence: said with every
/// failed build, since a disk that runs out shows as a linker killed by SIGBUS, not as "full".
pub fn disk_free() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = root.join("target");
    let at = if target.exists() { target } else { root };
    match nix::sys::statvfs::statvfs(&at) {
        Ok(fs) => {
            let free = fs.blocks_available() as f64 * fs.fragment_size() as f64;
            format!("{:.1} GiB free on the disk of {}", free / f64::from(1u32 << 30), at.display())
        }
        Err(e) => format!("free disk of {} unknown ({e})", at.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn libtest_lines_are_read() {
        assert_eq!(result_line("test a::b ... ok"), Some(("a::b", Some(true))));
        assert_eq!(result_line("test c ... FAILED"), Some(("c", Some(false))));
        assert_eq!(result_line("test d ... ignored, needs x"), Some(("d", None)));
        assert_eq!(result_line("test e has been running for over 60 seconds"), None);
        assert_eq!(closing_counts("test result: FAILED. 3 passed; 1 failed; 0 ignored"), Some((3, 1)));
        assert_eq!(package_name("path+file:///w/crates/repo#nasbak-repo@0.1.0").as_deref(), Some("nasbak-repo"));
        assert_eq!(package_name("nasbak-repo 0.1.0 (path+file:///w)").as_deref(), Some("nasbak-repo"));
        assert_eq!(package_name("path+file:///w/crates/nasbak#0.1.0").as_deref(), Some("nasbak"));
        let gdb = "Thread 2 (Thread 0x7f (LWP 12) \"stuck_test_nam\"):\n#0 poll\nThread 1 (LWP 11) \"main\"):\n#0 x\n";
        assert_eq!(thread_blocks(gdb).len(), 2);
    }

    /// A test binary (a script that answers as libtest does) whose second test hangs: the run
    /// ends at the deadline with that test failed by name, the first passed, and nothing of
    /// the binary left running.
    #[test]
    fn a_hung_test_fails_by_name_at_the_deadline_and_its_binary_is_killed() {
        let dir = std::env::temp_dir().join(format!("xtask-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("still-here");
        let script = dir.join("fake-tests");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$1\" in --list) printf 'quick: test\\nstuck_forever: test\\n'; exit 0;; esac\n\
                 echo 'test quick ... ok'\n(sleep 300; touch {}) &\nsleep 300\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = TestBinary { name: "fake/tests".into(), path: script, dir: dir.clone(), package: "fake".into() };
        let started = Instant::now();
        let out = run_binary(&bin, &[], Duration::from_secs(3)).unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(60), "ended {took:?} after a 3 s deadline (gdb included)");
        assert_eq!(out.passed, 1);
        assert_eq!(out.hung, ["stuck_forever"]);
        assert_eq!(out.failed, ["stuck_forever"]);
        // The whole process group is gone, the background child included.
        let left = Command::new("pgrep").args(["-f", &dir.to_string_lossy()]).output().unwrap();
        assert!(left.stdout.is_empty(), "left running: {}", String::from_utf8_lossy(&left.stdout));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_binary_that_ends_without_its_closing_line_fails_what_it_did_not_report() {
        let dir = std::env::temp_dir().join(format!("xtask-crash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("fake-tests");
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in --list) printf 'a: test\\nb: test\\n'; exit 0;; esac\necho 'test a ... ok'\nexit 101\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = TestBinary { name: "fake/crash".into(), path: script, dir: dir.clone(), package: "fake".into() };
        let out = run_binary(&bin, &[], Duration::from_secs(30)).unwrap();
        assert_eq!((out.passed, out.failed.as_slice()), (1, &["b".to_owned()][..]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
