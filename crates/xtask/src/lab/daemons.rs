//! virtlogd and libvirtd, started without systemd.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{STARTED, TEST_DOMAIN_PREFIX, URI};
use crate::exec::cmd;

/// `(libvirt, qemu)` versions as `virsh version` reports them.
pub fn versions() -> Result<(String, String)> {
    let out = cmd("virsh").args(["-c", URI, "version"]).timeout(Duration::from_secs(10)).run()?;
    let text = out.stdout_text();
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().last())
            .map(str::to_owned)
    };
    match (find("Using library:"), find("Running hypervisor:")) {
        (Some(l), Some(q)) => Ok((l, q)),
        _ => bail!("could not read the versions from `virsh version`:\n{text}"),
    }
}

fn running(name: &str) -> bool {
    let Ok(dir) = fs::read_dir("/proc") else { return false };
    dir.flatten().any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
}

/// Starts virtlogd and libvirtd if they are not running, and waits for `qemu:///system`.
pub fn ensure() -> Result<()> {
    let mut started = fs::read_to_string(STARTED).unwrap_or_default();
    for daemon in ["virtlogd", "libvirtd"] {
        if !running(daemon) {
            println!("lab: starting {daemon}");
            cmd(daemon)
                .arg("-d")
                .timeout(Duration::from_secs(30))
                .run()
                .with_context(|| format!("starting {daemon}"))?;
            started.push_str(daemon);
            started.push('\n');
        }
    }
    if let Some(dir) = Path::new(STARTED).parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(STARTED, &started)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match versions() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("libvirtd does not answer on {URI}"))),
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Stops the daemons `lab up` started (and only those).
pub fn stop_started() -> Result<()> {
    let started = fs::read_to_string(STARTED).unwrap_or_default();
    for daemon in started.lines().rev() {
        let pidfile = format!("/run/{daemon}.pid");
        let pid = fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            println!("lab: stopped {daemon} (pid {pid})");
        }
    }
    let _ = fs::remove_file(STARTED);
    Ok(())
}

/// Names of all test domains (running or not).
pub fn test_domains() -> Result<Vec<String>> {
    let out = cmd("virsh").args(["-c", URI, "list", "--all", "--name"]).timeout(Duration::from_secs(10)).run()?;
    Ok(out
        .stdout_text()
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(TEST_DOMAIN_PREFIX))
        .map(str::to_owned)
        .collect())
}
