//! Running commands from xtask, and `cargo xtask test`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nasbak_repo::mount::command::ExternalCommand;

/// A command with the default xtask timeout (10 minutes).
pub fn cmd(program: &str) -> ExternalCommand {
    ExternalCommand::new(program).timeout(Duration::from_secs(600))
}

/// Runs a cargo step with its output on our terminal.
fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo xtask test`: the whole CI gate.
pub fn test() -> Result<()> {
    crate::lab::up()?;
    cargo(&["fmt", "--all", "--check"], &[])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    cargo(&["doc", "--workspace", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    cargo(&["test", "--workspace", "--all-targets", "--no-fail-fast"], &[])?;
    cargo(&["test", "--workspace", "--doc"], &[])?;
    Ok(())
}
