//! Running commands from xtask, and `cargo xtask test`.

use std::fs;
use std::path::{Path, PathBuf};
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
    fuzz(10)?;
    let (passed, failed) = cargo_test(&["test", "--workspace", "--no-fail-fast"])?;
    println!("xtask: all test binaries together:");
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn cargo_test(args: &[&str]) -> Result<(u64, u64)> {
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
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status}) before any test failed: see its output above");
    }
    Ok((passed, failed))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `cargo xtask demo`: the end-to-end job of this stage on an embedded default: a `custom`
/// repository on a loop-mounted ext4 image under the lab's state directory.
pub fn demo() -> Result<()> {
    crate::lab::up()?;
    let dir = Path::new(crate::lab::STATE).join("demo");
    fs::create_dir_all(&dir)?;
    let image = dir.join("repo.img");
    if !image.exists() {
        println!("xtask: truncate -s 256M {0} && mkfs.ext4 -q {0}", image.display());
        fs::File::create(&image)?.set_len(256 << 20)?;
        cmd("mkfs.ext4").arg("-q").arg("-F").arg(&image).run()?;
    }
    let image = image.to_string_lossy().into_owned();
    let args = [
        "run",
        "--quiet",
        "-p",
        "nasbak-repo",
        "--example",
        "repo_check",
        "--",
        "--name",
        "demo",
        "--type",
        "custom",
        "--fstype",
        "ext4",
        "--address",
        &image,
    ];
    cargo(&args, &[])
}

/// Runs every fuzz target for `secs` seconds, installing cargo-fuzz first if it is missing.
/// The stable toolchain runs it with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs `-Z` flags).
pub fn fuzz(secs: u32) -> Result<()> {
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !have {
        cargo(&["install", "--locked", "cargo-fuzz"], &[])?;
    }
    let fuzz_dir = workspace_root().join("fuzz");
    for target in ["mount_options", "address", "domain_xml"] {
        let corpus = fuzz_dir.join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let max = format!("-max_total_time={secs}");
        println!("xtask: fuzzing {target} for {secs} s");
        let status = Command::new("cargo")
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(&seeds)
            .args(["--", &max, "-print_final_stats=0"])
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target {target} failed ({status}); the crash input is under fuzz/artifacts/{target}/");
        }
    }
    Ok(())
}
