//! `cargo xtask bench latency [ROUNDS]`: what a guest's writes cost while its VM is backed up to
//! a slow NAS.
//!
//! A lab guest (TCG, guest agent) has a 1 GiB qcow2 ext4 disk mounted on `/data` whose 512 MiB
//! file `big` holds pseudo-random data. In the guest, a static program of ours writes 4 KiB
//! blocks with `O_DSYNC` at pseudo-random offsets of `big` for 15 s and records each write's
//! latency. The repository is sshfs to an sshd in a network namespace of the bench's own, over a
//! veth pair whose host side is shaped to 20 MiB/s with `tc ... tbf` (this kernel has no netem).
//! Each round measures, in an order that rotates between rounds:
//! - the writes with no backup;
//! - the writes during a full backup whose push job writes to the repository (today's default);
//! - the writes during a full backup through scratch storage (`scratch_dir`): the job writes to
//!   a local directory, the files go to the repository after it; once with the scratch on the
//!   VM's own disk (this machine has one), once on a tmpfs standing in for a second local device.
//!
//! Each backup starts with the writes, run as the shipped systemd unit runs it (nice 10,
//! best-effort I/O priority 7); its wall time is reported too. Reported: each case's p99 against
//! the no-backup p99 of the same round, the best round (its writes done, p50, p99, worst) and
//! the range of that ratio over the rounds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, SshServer};

use crate::exec::{cargo, cmd};
use crate::lab::STATE;

/// The network namespace and the veth pair the repository is reached through.
const NETNS: &str = "nasbak-bench-lat";
const HOST_IF: &str = "nbklat0";
const NS_IF: &str = "nbklat1";
const HOST_ADDR: &str = "10.231.7.1";
const NS_ADDR: &str = "10.231.7.2";
/// 20 MiB/s.
const RATE: &str = "168mbit";
/// How long the guest writes in each case.
const WRITE_SECS: u64 = 15;

/// The guest's writer: 4 KiB `O_DSYNC` writes at pseudo-random offsets of a file, each one's
/// latency printed as `MS_SINCE_START LATENCY_US`.
const WRITER: &str = r#"
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (path, secs, span): (&str, f64, u64) = (&a[1], a[2].parse().unwrap(), a[3].parse().unwrap());
    let f = std::fs::OpenOptions::new().write(true).custom_flags(0o10000).open(path).unwrap();
    let buf = [0x5au8; 4096];
    let start = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = String::new();
    while start.elapsed().as_secs_f64() < secs {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        let at = (x % (span / 4096)) * 4096;
        let t = Instant::now();
        f.write_all_at(&buf, at).unwrap();
        out.push_str(&format!("{} {}\n", start.elapsed().as_millis(), t.elapsed().as_micros()));
    }
    print!("{out}");
}
"#;

/// A mount point unmounted on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = cmd("umount").arg(&self.0).run();
    }
}

/// The shaped link and the namespace behind it, removed on drop.
struct Link;

impl Link {
    fn up() -> Result<Link> {
        Link::down();
        let ip = |args: &[&str]| cmd("ip").args(args).run().map(drop);
        ip(&["netns", "add", NETNS])?;
        let link = Link;
        ip(&["link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF])?;
        ip(&["link", "set", NS_IF, "netns", NETNS])?;
        ip(&["addr", "add", &format!("{HOST_ADDR}/30"), "dev", HOST_IF])?;
        ip(&["link", "set", HOST_IF, "up"])?;
        ip(&["netns", "exec", NETNS, "ip", "addr", "add", &format!("{NS_ADDR}/30"), "dev", NS_IF])?;
        ip(&["netns", "exec", NETNS, "ip", "link", "set", NS_IF, "up"])?;
        ip(&["netns", "exec", NETNS, "ip", "link", "set", "lo", "up"])?;
        // What the host sends to the repository goes through the bucket.
        cmd("tc")
            .args(["qdisc", "add", "dev", HOST_IF, "root", "tbf", "rate", RATE, "burst", "64kb", "latency", "50ms"])
            .run()?;
        Ok(link)
    }

    fn down() {
        let _ = cmd("ip").args(["link", "del", HOST_IF]).run();
        let _ = cmd("ip").args(["netns", "del", NETNS]).run();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        Link::down();
    }
}

/// The writer built as a static binary (it runs in the guest's initramfs, which has no libc).
fn build_writer(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("writelat.rs");
    let bin = dir.join("writelat");
    fs::write(&src, WRITER)?;
    cmd("rustc")
        .args(["--edition", "2021", "-O", "-C", "target-feature=+crt-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .timeout(Duration::from_secs(300))
        .run()
        .context("building the guest's writer with rustc")?;
    Ok(bin)
}

/// The `return` of an agent command, as JSON.
fn agent(dom: &LabDomain, json: &str) -> Result<serde_json::Value> {
    let text = dom.try_agent_command(json).map_err(|e| anyhow::anyhow!("{e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{json}: {text}"))?;
    Ok(v["return"].clone())
}

/// Copies `file` into the guest at `to` (through the agent, 48 KiB at a time) and makes it
/// executable.
fn upload(dom: &LabDomain, file: &Path, to: &str) -> Result<()> {
    let data = fs::read(file)?;
    let handle = agent(dom, &format!(r#"{{"execute":"guest-file-open","arguments":{{"path":"{to}","mode":"w"}}}}"#))?;
    let handle = handle.as_i64().context("a file handle")?;
    for chunk in data.chunks(48 << 10) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
        agent(
            dom,
            &format!(r#"{{"execute":"guest-file-write","arguments":{{"handle":{handle},"buf-b64":"{b64}"}}}}"#),
        )?;
    }
    agent(dom, &format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{handle}}}}}"#))?;
    let pid = exec(dom, "/bin/chmod", &["755", to])?;
    wait_exec(dom, pid, Duration::from_secs(30))?;
    Ok(())
}

/// Starts `path args` in the guest; its pid.
fn exec(dom: &LabDomain, path: &str, args: &[&str]) -> Result<i64> {
    let args = serde_json::to_string(args)?;
    let r = agent(
        dom,
        &format!(r#"{{"execute":"guest-exec","arguments":{{"path":"{path}","arg":{args},"capture-output":true}}}}"#),
    )?;
    r["pid"].as_i64().context("guest-exec's pid")
}

/// Waits for the guest's program `pid` to exit; its stdout.
fn wait_exec(dom: &LabDomain, pid: i64, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        // The agent may be slow to answer while the guest's I/O waits: keep asking.
        if let Ok(r) = agent(dom, &format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#))
            && r["exited"] == true
        {
            if r["exitcode"] != 0 {
                bail!("guest program {pid} failed: {r}");
            }
            let out = r["out-data"].as_str().unwrap_or_default();
            return Ok(String::from_utf8(base64::engine::general_purpose::STANDARD.decode(out)?)?);
        }
        if Instant::now() > deadline {
            bail!("guest program {pid} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The latencies (in ms) of one case, sorted.
struct Case {
    sorted_ms: Vec<f64>,
    /// Each write as the guest recorded it: ms since the start, latency in µs.
    written: Vec<(u64, u64)>,
    backup_secs: Option<f64>,
}

impl Case {
    fn percentile(&self, p: f64) -> f64 {
        let n = self.sorted_ms.len();
        if n == 0 {
            return f64::NAN;
        }
        let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
        self.sorted_ms[i]
    }
}

/// One case: the guest writes for [`WRITE_SECS`], with `backup` (a nasbak command line)
/// started at the same moment when given.
fn measure(dom: &LabDomain, backup: Option<&[String]>) -> Result<Case> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")?;
    let started = Instant::now();
    let mut child = match backup {
        Some(args) => Some(
            Command::new(&args[0])
                .args(&args[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting the backup")?,
        ),
        None => None,
    };
    let span = (512u64 << 20).to_string();
    let pid = exec(dom, "/tmp/writelat", &["/data/big", &WRITE_SECS.to_string(), &span])?;
    let out = wait_exec(dom, pid, Duration::from_secs(WRITE_SECS + 600))?;
    let backup_secs = match child.as_mut() {
        Some(c) => {
            let status = c.wait()?;
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("the backup failed ({status}): {err}");
            }
            Some(started.elapsed().as_secs_f64())
        }
        None => None,
    };
    nix::unistd::sync();
    let written: Vec<(u64, u64)> = out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().map(|n| n.parse::<u64>().ok());
            Some((w.next()??, w.next()??))
        })
        .collect();
    let mut sorted_ms: Vec<f64> = written.iter().map(|(_, us)| *us as f64 / 1000.0).collect();
    if sorted_ms.is_empty() {
        bail!("the guest's writer recorded nothing: {out}");
    }
    sorted_ms.sort_by(f64::total_cmp);
    Ok(Case { sorted_ms, written, backup_secs })
}

pub fn latency(rounds: usize) -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--release", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("release");
    let dir = Path::new(STATE).join("bench-latency");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("export"))?;
    fs::create_dir_all(dir.join("scratch"))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let writer = build_writer(&dir)?;
    println!(
        "bench: latency, guest 4 KiB O_DSYNC writes for {WRITE_SECS} s; repository: sshfs over a veth shaped to 20 MiB/s"
    );
    let big: Vec<u8> = {
        let mut x: u32 = 0x2545_f491;
        (0..512usize << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    };
    let dom = DomainSpec::new("latency")
        .disk(DiskSpec::qcow2(1024).ext4_with_files(&[("big", &big)]))
        .agent(true)
        .running(true)
        .create();
    drop(big);
    dom.wait_for_agent(Duration::from_secs(180));
    upload(&dom, &writer, "/tmp/writelat")?;
    let _link = Link::up()?;
    let server = SshServer::start_in(Some(NETNS), NS_ADDR);
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let options = format!(
        "port={},IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,allow_other",
        server.port(),
        server.client_key().display()
    );
    let config = p("nasbak.toml");
    cmd(&nasbak)
        .args(["--config", &config, "repo", "add", "nas", "--type", "custom", "--fstype", "fuse.sshfs"])
        .args(["--address", &format!("root@{NS_ADDR}:{}", p("export")), "--options", &options])
        .run()?;
    let base = fs::read_to_string(&config)?;
    let scratch_config = p("nasbak-scratch.toml");
    fs::write(&scratch_config, format!("scratch_dir = \"{}\"\n{base}", p("scratch")))?;
    // The scratch on a device of its own (a tmpfs stands in for a second local disk): what is
    // left of the cost when the job's writes do not share the VM's disk.
    fs::create_dir_all(dir.join("scratch-tmpfs"))?;
    cmd("mount")
        .args(["-t", "tmpfs", "-o", "size=3g,mode=0755", "nasbak-bench-scratch"])
        .arg(dir.join("scratch-tmpfs"))
        .run()?;
    let _tmpfs = Unmount(dir.join("scratch-tmpfs"));
    let tmpfs_config = p("nasbak-scratch-tmpfs.toml");
    fs::write(&tmpfs_config, format!("scratch_dir = \"{}\"\n{base}", p("scratch-tmpfs")))?;
    // As the shipped systemd unit runs it: nice 10, best-effort I/O priority 7 (the processes it
    // starts, qemu-img and sshfs's ssh, inherit them; QEMU's job does not).
    let backup = |config: &str| -> Vec<String> {
        [
            "nice",
            "-n",
            "10",
            "ionice",
            "-c2",
            "-n7",
            nasbak.as_str(),
            "--config",
            config,
            "backup",
            dom.name(),
            "--mode",
            "full",
            "--quiesce",
            "off",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let names = [
        "no backup",
        "push job to the repository (today)",
        "through scratch storage on the VM's disk",
        "through scratch storage on another device (tmpfs)",
    ];
    let mut cases: Vec<Vec<Case>> = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 1..=rounds {
        let mut order = [0usize, 1, 2, 3];
        order.rotate_left((round - 1) % 4);
        for i in order {
            let args = match i {
                0 => None,
                1 => Some(backup(&config)),
                2 => Some(backup(&scratch_config)),
                _ => Some(backup(&tmpfs_config)),
            };
            let case = measure(&dom, args.as_deref())?;
            println!(
                "bench: latency, round {round}, {}: {} writes, p50 {:.2} ms, p99 {:.2} ms, worst {:.2} ms{}",
                names[i],
                case.sorted_ms.len(),
                case.percentile(0.5),
                case.percentile(0.99),
                case.percentile(1.0),
                case.backup_secs.map(|s| format!(", backup {s:.1} s")).unwrap_or_default()
            );
            // Each write (ms since the start, latency in µs), for a closer look.
            let raw: String = case.written.iter().map(|(at, us)| format!("{at} {us}\n")).collect();
            fs::write(dir.join(format!("round{round}-case{i}.txt")), raw)?;
            cases[i].push(case);
            // The backup is not needed: the next full writes the same.
            let _ = fs::remove_dir_all(dir.join("export").join(dom.name()));
        }
    }
    // Each case's p99 against the no-backup p99 of the same round (the rounds' noise cancels).
    let ratios = |i: usize| -> Vec<f64> {
        cases[i].iter().zip(&cases[0]).map(|(c, quiet)| c.percentile(0.99) / quiet.percentile(0.99)).collect()
    };
    println!(
        "\n| guest 4 KiB O_DSYNC writes for {WRITE_SECS} s | writes done | p50 | p99 | worst | p99 against no backup, same round | target | ratio range | backup |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let r = ratios(i);
        let at = r.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(k, _)| k);
        let c = &cases[i][at];
        println!(
            "| {name} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}x | {} | {:.2}-{:.2}x | {} |",
            c.sorted_ms.len(),
            c.percentile(0.5),
            c.percentile(0.99),
            c.percentile(1.0),
            r[at],
            if i >= 2 { "<= 2x" } else { "" },
            r.iter().copied().fold(f64::INFINITY, f64::min),
            r.iter().copied().fold(0.0, f64::max),
            c.backup_secs.map(|s| format!("{s:.1} s")).unwrap_or_default()
        );
    }
    Ok(())
}
