//! `cargo xtask`: automation for nasbak.
//!
//! - `cargo xtask lab up | status | down`: the KVM lab (see `docs/lab.md`).
//! - `cargo xtask lab nas`: the real NFS and SMB tests inside the NAS lab guest.
//! - `cargo xtask lab ceph [up]`: a one-node Ceph cluster (RBD pool, CephFS, users, libvirt
//!   secret), and the Ceph tests against it.
//! - `cargo xtask demo`: the README's main job.
//! - `cargo xtask bench`: nasbak against virsh, qemu-img, rsync and cp, side by side.
//! - `cargo xtask fuzz [SECS]`: short fuzz runs of every target.
//! - `cargo xtask faults [ROW...]`: the fault matrix (`docs/reliability.md`).
//! - `cargo xtask layers`: no module circle in any crate; `nasbak` within its layers.
//! - `cargo xtask tests [--times N] [--deadline SECS] BINARY [FILTER...]`: some test binaries
//!   under the deadline `test` gives each (see `deadline.rs`), N times, with their run times.
//! - `cargo xtask test`: what CI runs: lab up, fmt, clippy, doc, every test (the NAS guest's too), a short fuzz run.

mod bench;
mod deadline;
mod exec;
mod lab;
mod latency;
mod layers;
mod run;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  lab up        install and start the KVM lab (idempotent), build the test guest
  lab status    say what is up and what is missing
  lab down      stop what `lab up` started and remove leftover test domains
  lab nas       boot the NAS guest (NFS and SMB servers on its loopback) and run the real NFS and
                SMB tests of nasbak-repo inside it
  lab ceph      bring up a one-node Ceph cluster (monitor on 127.0.0.1, in-memory OSD, MDS; pool
                vms, CephFS labfs, users client.nasbak-vm and client.nasbak-fs, a libvirt secret)
                and run the Ceph tests against it (`N passed, M failed`)
  lab ceph up   only bring the cluster up
  lab s3 up     the Ceph cluster, then an S3 gateway (radosgw) on https://127.0.0.1:7443 with a
                user, a bucket with object lock and one without; writes /var/lib/nasbak-lab/s3/env
  demo          lab up, then back up a lab VM with nasbak to an ext4-image repository, damage its
                disk, restore it, show the files are back, verify, list (the README's main job)
  bench [ROUNDS] nasbak against virsh backup-begin, qemu-img convert, rsync and cp, best of ROUNDS (3)
  bench protected [ROUNDS]  only the compressed and encrypted repositories' part
  bench chain [ROUNDS]      every way to restore, from the end of a chain of ten against its full
  bench restores [ROUNDS]   full, instant (the guest writing) and mount, on a 2 and an 8 GiB disk
  bench rbd [ROUNDS]        incremental backups of an RBD disk against fulls, on the lab cluster
  bench night [ROUNDS]      run-due of eight running VMs due at once, one after another against in parallel
  bench big [ROUNDS]        a 100 GiB disk holding 2 GiB against a 2 GiB disk: backups, restores, instant restore
  bench s3 [ROUNDS]         nasbak copy to the lab S3 gateway against rclone copy; the rest of a killed copy
  bench latency [ROUNDS]    a guest's write latency during a backup to a NAS shaped to 20 MiB/s, with and without scratch
  man           build the nasbak binary and write its manual page to target/man/nasbak.1
  fuzz [SECS]   run each fuzz target for SECS seconds (default 30) from its seed corpus
  faults [ROW...] lab up, then the fault matrix (every row, or those whose key contains ROW): each
                fault injected into nasbak on the lab, a table of the checks after it
                (docs/reliability.md)
  layers        no module circle in any crate, and nasbak's modules within their layers
                (crates/xtask/src/layers.rs)
  tests [--times N] [--deadline SECS] BINARY [FILTER...]
                lab up, then the test binaries whose package/target name contains BINARY (tests
                matching FILTER), N times, each under the deadline `test` gives a binary
  test          lab up, fmt --check, clippy -D warnings, doc -D warnings, all tests (also those in
                the NAS guest, and the fault matrix), a short fuzz run";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["lab", "up"] => lab::up(),
        ["lab", "status"] => lab::status(),
        ["lab", "down"] => lab::down(),
        ["lab", "nas"] => lab::nas::run(),
        ["lab", "ceph"] => lab::ceph::run(),
        ["lab", "ceph", "up"] => lab::ceph::up(),
        ["lab", "s3", "up"] => lab::s3::up(),
        ["test"] => run::test(),
        ["demo"] => run::demo(),
        ["man"] => run::man(),
        ["bench"] => bench::bench(3),
        ["bench", "protected"] => bench::protected(3),
        ["bench", "chain"] => bench::chain(3),
        ["bench", "restores"] => bench::restores(3),
        ["bench", "restores", n] => {
            bench::restores(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", "chain", n] => {
            bench::chain(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", "night"] => bench::night(2),
        ["bench", "night", n] => {
            bench::night(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", "big"] => bench::big(3),
        ["bench", "big", n] => {
            bench::big(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", "latency"] => latency::latency(3),
        ["bench", "latency", n] => {
            latency::latency(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", "s3"] => bench::s3(3),
        ["bench", "s3", n] => bench::s3(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?),
        ["bench", "rbd"] => bench::rbd(3),
        ["bench", "rbd", n] => {
            bench::rbd(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", "protected", n] => {
            bench::protected(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?)
        }
        ["bench", n] => bench::bench(n.parse().map_err(|_| anyhow::anyhow!("ROUNDS must be a number, not {n:?}"))?),
        ["fuzz"] => run::fuzz(30),
        ["fuzz", secs] => run::fuzz(secs.parse().map_err(|_| anyhow::anyhow!("SECS must be a number, not {secs:?}"))?),
        ["faults", rows @ ..] => run::faults(rows),
        ["tests", rest @ ..] => run::tests(rest),
        ["layers"] => layers::check(),
        ["help"] | ["--help"] | ["-h"] | [] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown command {:?}\n\n{USAGE}", args.join(" ")),
    }
}
