//! Freezes a running domain's file systems through its guest agent, prints the status, thaws,
//! prints the status again.
//!
//! ```text
//! cargo run --example quiesce -- DOMAIN [--connect URI]
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use nasbak_agent::{FreezeGuard, GuestAgent, LibvirtAgentTransport};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (domain, uri) = match args.as_slice() {
        [d] => (d.as_str(), "qemu:///system"),
        [d, flag, uri] if flag == "--connect" => (d.as_str(), uri.as_str()),
        _ => bail!("usage: quiesce DOMAIN [--connect URI]"),
    };
    let conn = virt::connect::Connect::open(Some(uri)).with_context(|| format!("connecting to {uri}"))?;
    let dom = conn.lookup_domain_by_name(domain).with_context(|| format!("looking up domain {domain}"))?;
    let agent = GuestAgent::new(LibvirtAgentTransport::new(dom), Duration::from_secs(10));
    let guard = FreezeGuard::freeze(&agent, None)?;
    println!("froze {} file system(s); status: {:?}", guard.frozen(), agent.status()?);
    let thawed = guard.thaw()?;
    println!("thawed {thawed} file system(s); status: {:?}", agent.status()?);
    Ok(())
}
