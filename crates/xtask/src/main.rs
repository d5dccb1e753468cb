//! `cargo xtask`: automation for nasbak.
//!
//! - `cargo xtask lab up | status | down`: the KVM lab (see `docs/lab.md`).
//! - `cargo xtask test`: what CI runs: lab up, fmt, clippy, doc, every test.

mod lab;
mod run;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  lab up        install and start the KVM lab (idempotent), build the test guest
  lab status    say what is up and what is missing
  lab down      stop what `lab up` started and remove leftover test domains
  test          lab up, then fmt --check, clippy -D warnings, doc -D warnings and all tests";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["lab", "up"] => lab::up(),
        ["lab", "status"] => lab::status(),
        ["lab", "down"] => lab::down(),
        ["test"] => run::test(),
        ["help"] | ["--help"] | ["-h"] | [] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown command {:?}\n\n{USAGE}", args.join(" ")),
    }
}
