//! Running commands from xtask: external programs with the default timeout, cargo steps with
//! their output on our terminal, the closing line of a test run, the workspace root.

use anyhow::{Context, Result, bail};
use nasbak_process::ExternalCommand;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A command with the default xtask timeout (10 minutes).
pub fn cmd(program: &str) -> ExternalCommand {
    ExternalCommand::new(program).timeout(Duration::from_secs(600))
}

/// Prints `N passed, M failed` and fails when any of the `what` tests failed.
pub fn conclude(what: &str, (passed, failed): (u64, u64)) -> Result<()> {
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} {what} tests failed");
    }
    Ok(())
}

/// Runs a cargo step with its output on our terminal.
pub fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status}); {}", args.join(" "), crate::deadline::disk_free());
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
pub fn cargo_test(args: &[&str]) -> Result<(u64, u64)> {
    println!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = crate::deadline::closing_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status}) before any test failed: see its output above");
    }
    Ok((passed, failed))
}

/// The `nasbak` binary `cargo build` just made in `profile` (`debug` or `release`): under
/// `CARGO_TARGET_DIR` when it is set (cargo puts it there), else under the workspace's `target/`.
/// (The benchmark once ran a stale `target/release/nasbak` while cargo built elsewhere.)
pub fn built_binary(profile: &str) -> String {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_relative() { workspace_root().join(t) } else { t })
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join(profile).join("nasbak").to_string_lossy().into_owned()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
