//! Test fixtures on the real lab (`cargo xtask lab up`): disposable libvirt domains with any mix
//! of disks, and an sshd on loopback.
//!
//! The key decision: every fixture is owned by a value whose `Drop` removes it (domain, disk
//! files, loop devices, processes), and every name carries the test process's pid, so that
//! whatever a killed test run left behind is swept by the next run ([`sweep_leftovers`]) or by
//! `cargo xtask lab down`. Tests that only need "a booted guest with an agent" share one per
//! test process ([`shared_agent_guest`]), since each boot costs seconds of TCG on 2 cores.
//!
//! Fixtures panic with a message naming what is missing when the lab is not up: a lab test
//! never passes by skipping.
//!
//! ```no_run
//! use nasbak_testlab::{DiskSpec, DomainSpec};
//! let dom = DomainSpec::new("doc").disk(DiskSpec::qcow2(64).ext4()).agent(true).running(true).create();
//! dom.wait_for_agent(std::time::Duration::from_secs(60));
//! assert_eq!(dom.agent_command(r#"{"execute":"guest-ping"}"#), r#"{"return":{}}"#);
//! ```

#![deny(missing_docs)]

pub mod ceph;
mod domain;
pub mod reference;
pub mod s3;
mod ssh;

pub use domain::{
    DiskKind, DiskSpec, DomainSpec, FrozenQemu, LabDisk, LabDomain, LogicalVolumeSpec, PartitionSpec, qemu_pid,
    shared_agent_guest, sweep_leftovers, swtpm_local_ca_to_tss, virsh,
};
pub use ssh::{SshServer, pids_with_cmdline};

/// The libvirt URI of the lab.
pub const URI: &str = "qemu:///system";
/// Where `lab up` keeps its state.
pub const STATE: &str = "/var/lib/nasbak-lab";
/// Prefix of every test domain.
pub const PREFIX: &str = "nasbak-t-";

/// `target/<profile>/examples/NAME` of the running test's build, which `cargo test` builds
/// with the tests, so a test can run a reference program as an operator would.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps").join("examples").join(name);
    assert!(path.exists(), "{} is not built; run the tests through `cargo test`", path.display());
    path
}

/// `len` pseudo-random bytes (xorshift) from `seed`: test data that neither compresses nor
/// repeats, the same for the same seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Overwrites the first `mib` MiB of a disk file with pseudo-random bytes (xorshift), so that a
/// backup of it neither compresses nor skips zeros and takes a measurable while.
pub fn fill_pseudo_random(path: &std::path::Path, mib: usize) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("open the disk file");
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write the disk file");
    }
}

/// Panics with what is missing and how to get it.
#[track_caller]
pub(crate) fn lab_missing(what: &str) -> ! {
    panic!("the lab is not ready: {what}. Run `cargo xtask lab up` (as root) first")
}

/// Runs `f` while watching every process's command line: its result, and whether any command
/// line held `needle` meanwhile (a secret must never be one's argument).
pub fn watching_argv<T>(needle: &str, f: impl FnOnce() -> T) -> (T, bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, seen, needle) = (Arc::clone(&stop), Arc::clone(&seen), needle.to_owned());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for e in std::fs::read_dir("/proc").unwrap().flatten() {
                    if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
                        && String::from_utf8_lossy(&cmdline).contains(&needle)
                    {
                        seen.store(true, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    (out, seen.load(Ordering::SeqCst))
}
