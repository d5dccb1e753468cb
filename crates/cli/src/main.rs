//! `nasbak`: back up and restore KVM/libvirt VMs to network-attached storage.
//!
//! Exit codes: 0 success, 1 failed, 2 usage (also: the input does not say enough to choose), 3 not
//! found (a backup, a repository, a domain), 4 refused (the VM is running, the backup does not
//! match, another process holds the VM, the destination exists, a configuration change would
//! leave a dangling reference), 5 partially failed (verify found bad data, a due schedule failed,
//! a backup completed but the guest could not be thawed), 6 a backup is damaged (its manifest
//! unreadable or invalid, or a file it lists missing), 7 verify could not read a file (an I/O
//! error), 130 cancelled (Ctrl-C, SIGTERM).
//!
//! `args` defines the command line, `commands` runs it over the `nasbak` library (one module per
//! command group), `output` prints results and errors, `progress` shows progress.

mod args;
mod commands;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            output::report_error(&e, cli.json, cli.verbose);
            ExitCode::from(output::exit_code(&e))
        }
    }
}
