//! Validates a repository, mounts it through nasbak-repo, writes and reads back a probe file,
//! prints its capacity and unmounts it.
//!
//! ```text
//! cargo run -p nasbak-repo --example repo_check -- --name NAME --type nfs|cifs|cephfs|shared|custom \
//!     --address ADDR [--fstype T] [--options OPTS] [--runtime DIR]
//! ```

use std::collections::HashMap;
use std::fs;

use anyhow::{Context, Result, bail};
use nasbak_repo::{BackupRepository, MountTimeouts, RepositoryKind, RepositoryMounts, SystemMounter};

fn main() -> Result<()> {
    let mut args: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(key) = flag.strip_prefix("--") else { bail!("unexpected argument {flag:?}") };
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        args.insert(key.to_owned(), value);
    }
    let get = |k: &str| args.get(k).map(String::as_str);
    let need = |k: &str| get(k).with_context(|| format!("--{k} is required"));
    let kind = RepositoryKind::from_parts(need("type")?, get("fstype"))?;
    let repo = BackupRepository::new(need("name")?, kind, need("address")?, get("options").unwrap_or(""), get("zone"))?;
    println!("repository {} ({}) at {}", repo.name(), repo.kind(), repo.address());
    if let Some(plan) = repo.mount_plan() {
        let creds = plan.credentials.as_ref().map(|c| format!(" + {} file", c.option)).unwrap_or_default();
        let options = if plan.options.is_empty() { String::new() } else { format!(" -o {}", plan.options) };
        println!("mount -t {}{options} {} <mount point>{creds}", plan.fstype, plan.source);
    }
    let runtime = get("runtime").unwrap_or("/run/nasbak");
    let mounts = RepositoryMounts::new(SystemMounter::new(runtime), runtime, MountTimeouts::default());
    let mounted = mounts.acquire(&repo)?;
    println!("mounted on {}", mounted.root().display());
    let probe = mounted.root().join(".nasbak-check");
    fs::write(&probe, b"nasbak").with_context(|| format!("writing {}", probe.display()))?;
    let back = fs::read(&probe).with_context(|| format!("reading {}", probe.display()))?;
    fs::remove_file(&probe)?;
    if back != b"nasbak" {
        bail!("read back different bytes from {}", probe.display());
    }
    println!("write and read back: ok");
    let cap = mounted.capacity()?;
    println!(
        "capacity: total {} MiB, used {} MiB, available {} MiB",
        cap.total >> 20,
        cap.used >> 20,
        cap.available >> 20
    );
    println!("release: {:?}", mounted.release()?);
    Ok(())
}
