//! Progress of the long phases, told to one observer type.
//!
//! Every workflow that can take long (the push job, a qemu-img conversion, a copy, a checksum,
//! a verify, a restore) reports [`Progress`] to an [`Observer`]: any closure
//! `FnMut(&Progress)` is one. Progress is told at least every few seconds while bytes move, and
//! serialises as the CLI's `--json` progress lines.

use serde::Serialize;

/// The phase a [`Progress`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Phase {
    /// libvirt's push backup job copying a running VM's disks (all disks at once).
    Job,
    /// qemu-img converting a disk (a shut-off VM's backup, a restore written in place).
    Convert,
    /// Copying a backup file beside the volume it restores (hashed as it is copied).
    Copy,
    /// Checksumming a backup file just written.
    Checksum,
    /// Verifying a backup's files.
    Verify,
    /// libvirt block jobs moving an instant restore's data onto the VM's volumes.
    Mirror,
    /// Copying a backup's files to an off-site target.
    Upload,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Job => "job",
            Phase::Convert => "convert",
            Phase::Copy => "copy",
            Phase::Checksum => "checksum",
            Phase::Verify => "verify",
            Phase::Mirror => "mirror",
            Phase::Upload => "upload",
        })
    }
}

/// How far one phase of a workflow is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// The VM the work is for.
    pub vm: String,
    /// The disk (target device) the work is on; `None` when the phase covers every disk.
    pub disk: Option<String>,
    /// The schedule the work is for (`nasbak_service::run_due` sets it).
    pub schedule: Option<String>,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0 when unknown).
    pub total: u64,
}

impl Progress {
    /// Progress of `phase` for `vm`: `done` of `total` bytes.
    pub fn new(phase: Phase, vm: impl Into<String>, done: u64, total: u64) -> Self {
        Progress { phase, vm: vm.into(), disk: None, schedule: None, done, total }
    }

    /// The same, on one disk.
    pub fn on_disk(mut self, disk: impl Into<String>) -> Self {
        self.disk = Some(disk.into());
        self
    }

    /// Done, in percent (0 when the total is unknown).
    pub fn percent(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.done as f64 * 100.0 / self.total as f64 }
    }
}

/// Told the progress of every long phase: any `FnMut(&Progress)` closure is one, so a caller
/// passes `&mut |p| ...` (or `&mut |_| {}` to ignore progress).
pub trait Observer: FnMut(&Progress) {}

impl<F: FnMut(&Progress)> Observer for F {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_json() {
        let p = Progress::new(Phase::Checksum, "vm1", 1, 4).on_disk("vda");
        assert_eq!(p.percent(), 25.0);
        assert_eq!(Progress::new(Phase::Job, "vm1", 5, 0).percent(), 0.0);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["phase"], "checksum");
        assert_eq!(v["disk"], "vda");
        let mut seen = Vec::new();
        let o: &mut dyn Observer = &mut |p| seen.push(p.done);
        o(&p);
        assert_eq!(seen, [1]);
    }
}
