//! What the operator reads: JSON documents (the library's outcome types serialised), the exit
//! codes, and errors with their causes and the CLI's hints.

use nasbak::{BackupError, ErrorKind};
use nasbak_service::config::Refused;
use serde::Serialize;

/// Prints `value` as one JSON document on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Prints `rows` as one JSON array, or one line each.
pub fn print_rows<T: Serialize>(json: bool, rows: &[T], line: impl Fn(&T) -> String) -> anyhow::Result<()> {
    if json {
        return print_json(rows);
    }
    for r in rows {
        println!("{}", line(r));
    }
    Ok(())
}

/// The documented exit code of a failure (see the crate documentation).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Refused>().is_some() {
        return 4;
    }
    let Some(e) = e.downcast_ref::<BackupError>() else { return 1 };
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::NoSuchDomain => 3,
        ErrorKind::DomainRunning
        | ErrorKind::Mismatch
        | ErrorKind::Busy
        | ErrorKind::Exists
        | ErrorKind::HalfRestored
        | ErrorKind::HasDependents => 4,
        ErrorKind::Ambiguous => 2,
        ErrorKind::DamagedBackup => 6,
        ErrorKind::Cancelled => 130,
        _ => 1,
    }
}

/// What the operator can do about a failure, in this tool's commands (the library's messages
/// never name a command).
fn hint(e: &anyhow::Error) -> Option<String> {
    let e = e.downcast_ref::<BackupError>()?;
    match (e.kind(), e) {
        (ErrorKind::NotFound, _) => {
            Some("`nasbak list` shows the backups there are; `nasbak repo list` the repositories".into())
        }
        (_, BackupError::NotShutOff { vm }) => Some(format!("shut it off first: `virsh shutdown {vm}`")),
        (ErrorKind::DamagedBackup, _) => Some("`nasbak delete` removes it".into()),
        (ErrorKind::Unresponsive, _) => Some(
            "a stopped or stuck QEMU (or libvirtd) does not answer: look at its storage (a stalled NFS server or \
             repository) and at `virsh domstate --reason`; calls that did not answer may still take effect"
                .into(),
        ),
        _ => None,
    }
}

/// Prints a failure on stderr: as JSON (`{"error": [cause, ...], "kind": ..., "step": ...}`) or
/// as text with every cause, the hint, and with `verbose` the debug form.
pub fn report_error(e: &anyhow::Error, json: bool, verbose: bool) {
    let library = e.downcast_ref::<BackupError>();
    if json {
        #[derive(Serialize)]
        struct Failure {
            error: Vec<String>,
            kind: Option<ErrorKind>,
            step: Option<nasbak::Step>,
        }
        let failure = Failure {
            error: e.chain().map(ToString::to_string).collect(),
            kind: library.map(BackupError::kind),
            step: library.and_then(BackupError::step),
        };
        eprintln!("{}", serde_json::to_string(&failure).unwrap_or_default());
        return;
    }
    eprintln!("nasbak: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if let Some(h) = hint(e) {
        eprintln!("  hint: {h}");
    }
    if verbose {
        eprintln!("  detail: {e:?}");
    }
}
