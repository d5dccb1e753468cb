//! The fault matrix: each row injects one fault into the `nasbak` binary working on the real lab
//! (libvirtd, QEMU, qemu-img, guest agent, loop-mounted ext4 repositories), then checks the same
//! things: no backup is listed that is not complete (and every listed one verifies), the guest is
//! not frozen, no backup job is left on the domain, no mount is leaked, and the error names what
//! happened; then the next backup of that VM succeeds. It prints a table and a closing
//! `N passed, M failed` line (`cargo xtask faults`; `cargo xtask test` runs it too).
//!
//! Runs without the libtest harness: rows run one after the other (several restart daemons or
//! stop processes), and the table is the output. `cargo test -p nasbak-cli --test faults -- ROW`
//! runs the rows whose name contains ROW.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nasbak_testlab::{DiskSpec, DomainSpec, LabDomain, SshServer, virsh};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const RUNTIME: &str = "/run/nasbak";

/// The outcome of one check.
#[derive(Debug, Clone)]
enum Verdict {
    Pass,
    Fail(String),
    /// The check does not apply (a shut-off VM has no job and no frozen guest).
    Skip(&'static str),
}

impl Verdict {
    fn failed(&self) -> bool {
        matches!(self, Verdict::Fail(_))
    }
    fn cell(&self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Fail(_) => "FAIL",
            Verdict::Skip(_) => "-",
        }
    }
}

fn check(ok: bool, why: impl FnOnce() -> String) -> Verdict {
    if ok { Verdict::Pass } else { Verdict::Fail(why()) }
}

/// The result of one row.
struct Row {
    name: &'static str,
    listed: Verdict,
    thawed: Verdict,
    no_job: Verdict,
    no_mount: Verdict,
    error_named: Verdict,
    next_backup: Verdict,
    /// From the fault to the process's clean error.
    time_to_error: Option<Duration>,
    /// Failures of the row's own assertions (beyond the six checks).
    extra: Vec<String>,
    /// The first line of what nasbak said about the fault.
    said: String,
}

impl Row {
    fn verdicts(&self) -> [(&'static str, &Verdict); 6] {
        [
            ("listed", &self.listed),
            ("thawed", &self.thawed),
            ("no job", &self.no_job),
            ("no mount", &self.no_mount),
            ("error", &self.error_named),
            ("next", &self.next_backup),
        ]
    }
    fn passed(&self) -> bool {
        self.extra.is_empty() && self.verdicts().iter().all(|(_, v)| !v.failed())
    }
}

/// One VM with a configuration whose only repository is a loop-mounted ext4 image.
struct Lab {
    dom: LabDomain,
    config: PathBuf,
    state: PathBuf,
    image: PathBuf,
    repo: String,
    agent: bool,
}

impl Lab {
    fn new(tag: &str, disks: Vec<DiskSpec>, agent: bool, running: bool, repo_mib: u64) -> Lab {
        Lab::of(disks.into_iter().fold(DomainSpec::new(tag), DomainSpec::disk), agent, running, repo_mib)
    }

    /// [`Lab::new`] with a domain made as `spec` says.
    fn of(spec: DomainSpec, agent: bool, running: bool, repo_mib: u64) -> Lab {
        let tag = spec.tag().to_owned();
        let tag = tag.as_str();
        let dom = spec.agent(agent).create();
        if running {
            dom.start();
        }
        let config = dom.dir().join("nasbak.toml");
        let image = dom.dir().join("repo.img");
        fs::File::create(&image).unwrap().set_len(repo_mib << 20).unwrap();
        assert!(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).status().unwrap().success());
        let repo = repo_name(tag);
        let lab = Lab { state: dom.dir().join("state.json"), dom, config, image, repo, agent };
        lab.ok(&[
            "repo",
            "add",
            &lab.repo,
            "--type",
            "custom",
            "--fstype",
            "ext4",
            "--address",
            lab.image.to_str().unwrap(),
        ]);
        if agent && running {
            lab.dom.wait_for_agent(Duration::from_secs(120));
        }
        lab
    }

    /// The same with a `fuse.sshfs` repository served by an sshd on 127.0.0.1 (a real network
    /// file system this kernel can mount).
    fn with_sshfs(tag: &str, disks: Vec<DiskSpec>, running: bool) -> (Lab, SshServer) {
        let dom = disks.into_iter().fold(DomainSpec::new(tag), DomainSpec::disk).create();
        if running {
            dom.start();
        }
        let server = SshServer::start();
        let export = dom.dir().join("export");
        fs::create_dir_all(&export).unwrap();
        let repo = repo_name(tag);
        let lab = Lab {
            config: dom.dir().join("nasbak.toml"),
            state: dom.dir().join("state.json"),
            image: export.clone(),
            dom,
            repo,
            agent: false,
        };
        let address = format!("root@127.0.0.1:{}", export.display());
        let options = server.sshfs_options();
        let fstype = ["--type", "custom", "--fstype", "fuse.sshfs"];
        lab.ok(&[&["repo", "add", &lab.repo][..], &fstype, &["--address", &address, "--options", &options]].concat());
        (lab, server)
    }

    fn name(&self) -> &str {
        self.dom.name()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nasbak"));
        c.arg("--config").arg(&self.config).arg("--state").arg(&self.state).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "nasbak {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `nasbak ARGS` that stops itself at `phase` (see `nasbak::fault`).
    fn spawn_paused(&self, args: &[&str], phase: &str) -> Child {
        let child = self
            .command(args)
            .env("NASBAK_FAULT_PAUSE", phase)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_stopped(child.id(), phase);
        child
    }

    /// The mount point of the repository (it must not stay mounted).
    fn mount_point(&self) -> PathBuf {
        Path::new(RUNTIME).join("mnt").join(&self.repo)
    }

    /// Runs `f` on the repository's file system, mounted by hand (as an operator would).
    fn on_repository(&self, f: impl FnOnce(&Path)) {
        let mnt = self.dom.dir().join("by-hand");
        fs::create_dir_all(&mnt).unwrap();
        assert!(Command::new("mount").arg(&self.image).arg(&mnt).status().unwrap().success());
        f(&mnt);
        assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    }

    /// Runs the six checks; `error` is what the faulty run printed (or the next run, for kills),
    /// `expect` the words that must be in it.
    fn checks(&self, error: &str, expect: &[&str]) -> [Verdict; 6] {
        // 1. Every listed backup is complete and verifies.
        let listed = (|| {
            let out = self.run(&["--json", "list"]);
            if !out.status.success() {
                return Verdict::Fail(format!("list failed: {}", text(&out)));
            }
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            for b in list.as_array().unwrap() {
                if !b["damaged"].is_null() {
                    return Verdict::Fail(format!("{} is damaged: {}", b["id"], b["damaged"]));
                }
                let v = self.run(&["verify", b["id"].as_str().unwrap()]);
                if !v.status.success() {
                    return Verdict::Fail(format!("verify {}: {}", b["id"], text(&v)));
                }
            }
            Verdict::Pass
        })();
        let running = self.dom.is_running();
        // 2. The guest is not frozen.
        let thawed = if !running || !self.agent {
            Verdict::Skip("no running guest with an agent")
        } else {
            match self.dom.try_agent_command(r#"{"execute":"guest-fsfreeze-status"}"#) {
                Ok(s) => check(s.contains("thawed"), || format!("freeze status {s}")),
                Err(_) => Verdict::Skip("the agent does not answer"),
            }
        };
        // 3. No backup job on the domain.
        let no_job = if running {
            let info = virsh(&["domjobinfo", self.name()]).unwrap_or_default();
            check(info.contains("None"), || format!("a job is left: {}", info.trim()))
        } else {
            Verdict::Skip("shut off")
        };
        // 4. Nothing mounted, no loop device left on the repository image.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mp = self.mount_point();
        let loops = Command::new("losetup").arg("-j").arg(&self.image).output().unwrap();
        let no_mount = check(!mountinfo.contains(&*mp.to_string_lossy()) && loops.stdout.is_empty(), || {
            format!("{} still mounted or looped: {}", mp.display(), String::from_utf8_lossy(&loops.stdout))
        });
        // 5. The error names what happened.
        let lower = error.to_lowercase();
        let missing: Vec<&&str> = expect.iter().filter(|w| !lower.contains(&w.to_lowercase())).collect();
        let error_named = check(missing.is_empty(), || format!("{missing:?} not in: {}", error.trim()));
        // 6. The next backup succeeds.
        let out = self.run(&["backup", self.name(), "--quiesce", "best-effort", "--timeout", "5m"]);
        let next_backup = check(out.status.success(), || format!("the next backup failed: {}", text(&out)));
        [listed, thawed, no_job, no_mount, error_named, next_backup]
    }
}

fn repo_name(tag: &str) -> String {
    format!("f{}", tag.chars().filter(char::is_ascii_alphanumeric).collect::<String>())
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until the process has stopped itself (state `T` in `/proc/PID/stat`).
fn wait_stopped(pid: u32, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("");
        if state == "T" {
            return;
        }
        assert!(!stat.is_empty(), "nasbak ended before it reached {phase}");
        assert!(Instant::now() < deadline, "nasbak did not reach {phase}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, s: Signal) {
    kill(Pid::from_raw(child.id() as i32), s).unwrap();
}

fn row(
    name: &'static str,
    checks: [Verdict; 6],
    time_to_error: Option<Duration>,
    extra: Vec<String>,
    said: &str,
) -> Row {
    let [listed, thawed, no_job, no_mount, error_named, next_backup] = checks;
    let said = said.lines().find(|l| l.starts_with("nasbak:")).unwrap_or_default().to_owned();
    Row { name, listed, thawed, no_job, no_mount, error_named, next_backup, time_to_error, extra, said }
}

/// SIGKILL at one phase of a running VM's backup. A killed process cannot clean up: the thaw
/// watchdog thaws the guest and aborts the job at once; the mount and the partial directory are
/// taken care of by the next nasbak (here `list`, then the next backup, whose output must say
/// what it cleaned).
fn kill_at(name: &'static str, phase: &'static str, expect: &[&str]) -> Row {
    kill_vm_at(name, phase, expect, false)
}

/// [`kill_at`]; with `uefi`, of a UEFI VM with an emulated TPM, whose next backup must keep
/// its NVRAM and TPM state (and whose killed backup left no state file behind that looks kept).
fn kill_vm_at(name: &'static str, phase: &'static str, expect: &[&str], uefi: bool) -> Row {
    // An ext4 disk for the freeze, and 200 MiB of random data so the job runs a while.
    let tag = format!("{}k{}", if uefi { "u" } else { "" }, phase.replace('-', ""));
    let spec = DomainSpec::new(&tag).disk(DiskSpec::raw(32).ext4()).disk(DiskSpec::raw(256)).uefi_with_tpm(uefi);
    let lab = Lab::of(spec, true, false, 1024);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[1].path, 200);
    lab.dom.start();
    lab.dom.wait_for_agent(Duration::from_secs(120));
    let mut child = lab.spawn_paused(&["--json", "backup", lab.name(), "--quiesce", "required"], phase);
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    // The watchdog acts within moments of the kill (allow 20 s on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut thawed_now, mut job_now);
    loop {
        thawed_now = lab.dom.try_agent_command(r#"{"execute":"guest-fsfreeze-status"}"#).unwrap_or_default();
        job_now = virsh(&["domjobinfo", lab.name()]).unwrap_or_default();
        if (thawed_now.contains("thawed") && job_now.contains("None")) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut extra = Vec::new();
    if !thawed_now.contains("thawed") {
        extra.push(format!("right after the kill the guest is {thawed_now}"));
    }
    if !job_now.contains("None") {
        extra.push(format!("right after the kill a job runs: {}", job_now.trim()));
    }
    // The next backup reports what it cleaned up; that is the "error" of a kill.
    let next = lab.run(&["--json", "backup", lab.name(), "--quiesce", "best-effort"]);
    let said = text(&next);
    if uefi {
        let made: serde_json::Value = serde_json::from_slice(&next.stdout).unwrap_or_default();
        let kept: Vec<&str> = made["manifest"]["state"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["file"].as_str()).collect())
            .unwrap_or_default();
        if kept != ["state.nvram", "state.tpm.tpm2-00.permall"] {
            extra.push(format!("the next backup kept {kept:?} of the VM's state"));
        }
    }
    let checks = lab.checks(&said, expect);
    row(name, checks, None, extra, &said)
}

/// A UEFI VM's restore killed while it copies the disks: the VM's NVRAM and TPM state (put back
/// only once every disk is) are as they were; run again, the restore puts back the backup's.
fn restore_killed_uefi() -> Row {
    let spec = DomainSpec::new("urestkill").disk(DiskSpec::qcow2(256)).uefi_with_tpm(true);
    let lab = Lab::of(spec, true, true, 1024);
    // Started once, so that the firmware and swtpm wrote their state.
    lab.dom.destroy();
    let _ = random_qcow2(&lab, 64);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let xml = virsh(&["dumpxml", "--inactive", lab.name()]).unwrap();
    let d = nasbak::nasbak_libvirt::Domain::parse(&xml).unwrap();
    let (nvram, tpm) = (PathBuf::from(&d.nvram.as_ref().unwrap().path), d.tpm_state_dir().unwrap());
    let kept = (fs::read(&nvram).unwrap(), fs::read(tpm.join("tpm2-00.permall")).unwrap());
    // Both changed after the backup (a firmware update of the variables, say).
    fs::write(&nvram, vec![0x5a; kept.0.len()]).unwrap();
    fs::write(tpm.join("tpm2-00.permall"), b"changed").unwrap();
    let mut child = lab.spawn_paused(&["restore", &id], "restore-copy");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    let mut extra = Vec::new();
    if fs::read(&nvram).unwrap() != vec![0x5a; kept.0.len()]
        || fs::read(tpm.join("tpm2-00.permall")).unwrap() != b"changed"
    {
        extra.push("the VM's state changed although the restore was killed before its disks were done".into());
    }
    let again = lab.run(&["--json", "restore", &id]);
    let said = text(&again);
    if !again.status.success() {
        extra.push(format!("the restore run again failed: {said}"));
    }
    if (fs::read(&nvram).unwrap(), fs::read(tpm.join("tpm2-00.permall")).unwrap()) != kept {
        extra.push("the restore run again did not put back the backup's NVRAM and TPM state".into());
    }
    let checks = lab.checks(&said, &["\"state\""]);
    row("UEFI restore killed mid-copy, then run again", checks, None, extra, &said)
}

fn enospc() -> Row {
    // 200 MiB of random data in the disk fits the space check of a 320 MiB repository; the repository
    // is then filled behind nasbak's back before the job starts writing.
    let lab = Lab::new("enospc", vec![DiskSpec::raw(256)], false, true, 320);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 200);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "frozen");
    let filler = lab.mount_point().join("filler");
    let _ = Command::new("fallocate").args(["-l", "200M"]).arg(&filler).status();
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup succeeded on a full repository".into());
    }
    if !lab.dom.is_running() {
        extra.push("the VM stopped".into());
    }
    // Make room again for the next backup, as an operator would.
    lab.on_repository(|root| {
        let _ = fs::remove_file(root.join("filler"));
    });
    let checks = lab.checks(&said, &["space"]);
    row("repository full (ENOSPC) mid-job", checks, Some(time), extra, &said)
}

fn two_backups_of_one_vm() -> Row {
    let lab = Lab::new("twice", vec![DiskSpec::raw(128)], false, true, 1024);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 64);
    let first = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "job-started");
    let out_pid = first.id();
    let start = Instant::now();
    let second = lab.run(&["backup", lab.name(), "--quiesce", "off"]);
    let time = start.elapsed();
    let said = text(&second);
    let mut extra = Vec::new();
    if second.status.code() != Some(4) {
        extra.push(format!("the second backup did not exit 4: {said}"));
    }
    signal(&first, Signal::SIGCONT);
    let out = first.wait_with_output().unwrap();
    if !out.status.success() {
        extra.push(format!("the first backup failed: {}", text(&out)));
    }
    let holder = format!("pid {}", out_pid);
    let checks = lab.checks(&said, &["is being backed up", &holder]);
    row("two backups of one VM at once", checks, Some(time), extra, &said)
}

fn several_vms_at_once() -> Row {
    let lab = Lab::new("many", vec![DiskSpec::raw(64)], false, true, 1024);
    let others: Vec<LabDomain> =
        (0..2).map(|i| DomainSpec::new(&format!("many{i}")).disk(DiskSpec::raw(64)).running(true).create()).collect();
    let mut names = vec![lab.name().to_owned()];
    names.extend(others.iter().map(|d| d.name().to_owned()));
    let children: Vec<Child> = names
        .iter()
        .map(|n| {
            lab.command(&["backup", n, "--quiesce", "off"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut extra = Vec::new();
    let mut said = String::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        said.push_str(&text(&out));
        if !out.status.success() {
            extra.push(format!("a backup failed: {}", text(&out)));
        }
    }
    let list: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "list"])).unwrap();
    if list.as_array().unwrap().len() != 3 {
        extra.push(format!("3 backups expected: {list}"));
    }
    let checks = lab.checks(&said, &["backed up"]);
    row("backups of three VMs at once on one repository", checks, None, extra, &said)
}

fn backup_prune_delete_race() -> Row {
    let lab = Lab::new("race", vec![DiskSpec::raw(32)], false, true, 1024);
    lab.ok(&["offering", "add", "o", "--repo", &repo_name("race"), "--quiesce", "off", "--keep", "last=2"]);
    lab.ok(&["assign", lab.name(), "o"]);
    for _ in 0..3 {
        lab.ok(&["backup", lab.name()]);
    }
    let ids = |lab: &Lab| -> Vec<String> {
        let list: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "list"])).unwrap();
        list.as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_owned()).collect()
    };
    let before = ids(&lab);
    let spawn = |args: &[&str]| lab.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let children = [
        spawn(&["backup", lab.name()]),
        spawn(&["prune"]),
        spawn(&["delete", &before[0]]),
        spawn(&["backup", lab.name()]),
        spawn(&["prune"]),
    ];
    let mut extra = Vec::new();
    let mut said = String::new();
    let mut deleted = false;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        said.push_str(&text(&out));
        match out.status.code() {
            Some(0) => deleted |= i == 2,
            // Refused because another process held (or was just taking) the VM's lock.
            Some(4) if String::from_utf8_lossy(&out.stderr).contains("lock") => {}
            // The delete lost the race to a prune that had removed that backup already.
            Some(3) if i == 2 => {}
            _ => extra.push(format!("command {i}: {}", text(&out))),
        }
    }
    let after = ids(&lab);
    if deleted && after.contains(&before[0]) {
        extra.push(format!("{} was deleted and is still listed", before[0]));
    }
    if !after.contains(&before[2]) && after.iter().all(|a| a <= &before[2]) {
        extra.push("the newest backup was lost".into());
    }
    let checks = lab.checks(&said, &[]);
    row("backup, prune and delete racing on one VM", checks, None, extra, &said)
}

fn vm_destroyed_mid_job() -> Row {
    let lab = Lab::new("destroyed", vec![DiskSpec::raw(256)], false, true, 1024);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 200);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "job-started");
    lab.dom.destroy();
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup of a destroyed VM succeeded".into());
    }
    lab.dom.start();
    let checks = lab.checks(&said, &[lab.name(), "the VM stopped", "domain is not running"]);
    row("VM destroyed during the push job", checks, Some(time), extra, &said)
}

fn libvirtd_restarted_mid_job() -> Row {
    let lab = Lab::new("restart", vec![DiskSpec::raw(256)], false, true, 1024);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 200);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "job-started");
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).output();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Command::new("pgrep").args(["-x", "libvirtd"]).output().unwrap().status.success() && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Command::new("libvirtd").arg("-d").status().unwrap().success(), "restarting libvirtd");
    let deadline = Instant::now() + Duration::from_secs(60);
    while virsh(&["version"]).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    // Completing is acceptable (the job ran on in QEMU): "listed" checks that the backup is
    // complete; failing must say libvirt went away.
    let checks = lab.checks(&said, if out.status.success() { &[] } else { &["libvirtd restarted"] });
    row("libvirtd restarted during the push job", checks, Some(time), extra, &said)
}

/// What restores staged in `dir` and left there.
fn staged_files(dir: &Path) -> Vec<std::ffi::OsString> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("nasbak-restore"))
        .map(|e| e.file_name())
        .collect()
}

fn restore_killed_mid_copy() -> Row {
    let lab = Lab::new("restkill", vec![DiskSpec::qcow2(256)], false, false, 1024);
    let disk = random_qcow2(&lab, 128);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let original = nasbak::checksum_file(&disk, "blake3").unwrap();
    let _ = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 64M"]).arg(&disk).output();
    let damaged = nasbak::checksum_file(&disk, "blake3").unwrap();
    let mut child = lab.spawn_paused(&["restore", &id], "restore-copy");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    let mut extra = Vec::new();
    if nasbak::checksum_file(&disk, "blake3").unwrap() != damaged {
        extra.push("the volume changed although the restore was killed before the rename".into());
    }
    let again = lab.run(&["restore", &id]);
    let said = text(&again);
    if !again.status.success() {
        extra.push(format!("the restore run again failed: {said}"));
    }
    // The restored qcow2 is the backup's image, not the original file byte for byte: compare
    // what the guest sees.
    let backup_file = lab.dom.dir().join("restored-view.raw");
    let _ = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&disk).arg(&backup_file).status();
    let _ = original;
    if nasbak::checksum_file(&disk, "blake3").unwrap() == damaged || !again.status.success() {
        extra.push("the volume was not restored".into());
    }
    let _ = fs::remove_file(&backup_file);
    let staged = staged_files(lab.dom.dir());
    if !staged.is_empty() {
        extra.push(format!("staged files left: {staged:?}"));
    }
    let checks = lab.checks(&said, &["restored"]);
    row("restore killed mid-copy, then run again", checks, None, extra, &said)
}

/// A restore writing a raw volume in place is killed: the volume's content is mixed. The mark
/// the restore left on the repository makes the next backup refuse (it would save mixed content
/// that looks complete) and the next restore say what it repairs.
fn restore_killed_mid_write() -> Row {
    let lab = Lab::new("rawkill", vec![DiskSpec::raw(256)], false, false, 1024);
    let disk = lab.dom.disks()[0].path.clone();
    nasbak_testlab::fill_pseudo_random(&disk, 128);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let _ = Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 0 64M"]).arg(&disk).output();
    let mut child = lab.spawn_paused(&["restore", &id], "restore-write");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    // qemu-img, orphaned, may still write: wait for it to end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nasbak_testlab::pids_with_cmdline(&disk.to_string_lossy()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut extra = Vec::new();
    let refused = lab.run(&["backup", lab.name()]);
    let said = text(&refused);
    if refused.status.code() != Some(4) {
        extra.push(format!("a backup of the half-restored VM was not refused: {said}"));
    }
    let again = lab.run(&["restore", &id]);
    let again_said = text(&again);
    if !again.status.success() || !again_said.contains("had been interrupted") {
        extra.push(format!("the restore run again: {again_said}"));
    }
    let checks = lab.checks(&said, &["half-written", "restore it again"]);
    row("raw restore killed mid-write, then backup and restore", checks, None, extra, &said)
}

fn agent_hung(policy: &'static str) -> Row {
    let lab = Lab::new(&format!("hung{policy}"), vec![DiskSpec::raw(32).ext4()], true, true, 1024);
    // Stop the agent from inside the guest: guest-exec answers before the kill lands.
    let _ = lab.dom.try_agent_command(
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 1; kill -STOP $(pidof qemu-ga)"]}}"#,
    );
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    let out = lab.run(&["--json", "backup", lab.name(), "--quiesce", policy]);
    let time = start.elapsed();
    let said = text(&out);
    let mut extra = Vec::new();
    let expect: &[&str] = match policy {
        "required" => {
            if out.status.success() {
                extra.push("a required quiesce succeeded with a hung agent".into());
            }
            &["agent"]
        }
        _ => {
            if !out.status.success() {
                extra.push(format!("best-effort failed: {said}"));
            }
            &["not quiesced"]
        }
    };
    let checks = lab.checks(&said, expect);
    let name =
        if policy == "required" { "guest agent hung, quiesce required" } else { "guest agent hung, best-effort" };
    row(name, checks, Some(time), extra, &said)
}

/// The guest agent stops answering between the freeze and the thaw (the VM is paused right
/// after the freeze): the thaw is retried, again after the job, and the backup (complete) says
/// the guest may still be frozen, exit 5. Once the VM runs again the next backup thaws it.
fn agent_hangs_while_frozen() -> Row {
    let lab = Lab::new("hungfrozen", vec![DiskSpec::raw(32).ext4()], true, true, 1024);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "required"], "frozen");
    let _ = virsh(&["suspend", lab.name()]);
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    if out.status.code() != Some(5) {
        extra.push(format!("expected exit 5 (complete, but the guest may be frozen): {said}"));
    }
    let _ = virsh(&["resume", lab.name()]);
    // The helper nasbak handed the thaw to thaws the guest once it runs again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.dom.try_agent_command(r#"{"execute":"guest-fsfreeze-status"}"#).unwrap_or_default().contains("thawed") {
        if Instant::now() > deadline {
            extra.push("the guest was still frozen 30 s after it ran again".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let checks = lab.checks(&said, &["may still be frozen", "keeps trying"]);
    row("guest agent hangs between freeze and thaw", checks, Some(time), extra, &said)
}

/// Fills the lab's first disk, a qcow2, with `mib` MiB of pseudo-random data (so a copy of it
/// takes a while); returns its path.
fn random_qcow2(lab: &Lab, mib: usize) -> PathBuf {
    let raw = lab.dom.dir().join("random.raw");
    fs::File::create(&raw).unwrap().set_len(256 << 20).unwrap();
    nasbak_testlab::fill_pseudo_random(&raw, mib);
    let disk = lab.dom.disks()[0].path.clone();
    let converted =
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&disk).output();
    assert!(converted.unwrap().status.success());
    fs::remove_file(&raw).unwrap();
    disk
}

/// The job cannot start (QEMU may not write its targets) while the guest is frozen and the
/// agent cannot be reached (the VM is paused): the backup fails, and its error says the guest
/// may still be frozen and which helper keeps trying; once the VM runs again the helper thaws it.
fn start_refused_while_frozen() -> Row {
    let lab = Lab::new("startfrozen", vec![DiskSpec::raw(32).ext4()], true, true, 1024);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "required"], "frozen");
    let _ = virsh(&["suspend", lab.name()]);
    let mut extra = Vec::new();
    // The backup's directory closed to QEMU (which runs as libvirt-qemu).
    let vm_dir = lab.mount_point().join(lab.name());
    for e in fs::read_dir(&vm_dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".partial") {
            fs::set_permissions(e.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        }
    }
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup succeeded although another job held the domain".into());
    }
    let _ = virsh(&["domjobabort", lab.name()]);
    let _ = virsh(&["resume", lab.name()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.dom.try_agent_command(r#"{"execute":"guest-fsfreeze-status"}"#).unwrap_or_default().contains("thawed") {
        if Instant::now() > deadline {
            extra.push("the guest was still frozen 30 s after it ran again".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !virsh(&["domjobinfo", lab.name()]).unwrap_or_default().contains("None") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let checks = lab.checks(&said, &["the backup failed", "may still be frozen", "keeps trying", "permission"]);
    row("job start refused with the guest frozen and the agent unreachable", checks, Some(time), extra, &said)
}

/// The parent's bitmap lost after nasbak decided on an incremental (and libvirt validated the
/// checkpoint) but before the job started: libvirt refuses the incremental job, and nasbak takes
/// a full instead, the reason recorded, instead of failing.
fn bitmap_lost_at_job_start() -> Row {
    let lab = Lab::new("bitmaplost", vec![DiskSpec::qcow2(32)], true, true, 1024);
    let first: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let bitmap = format!("nasbak-{}", first["manifest"]["id"].as_str().unwrap());
    let child = lab.spawn_paused(&["--json", "backup", lab.name(), "--mode", "incremental"], "chain-decided");
    lab.dom.remove_bitmap(0, &bitmap);
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(v) if out.status.success() => {
            if v["manifest"]["mode"] != "full" || v["manifest"]["parent"] != serde_json::Value::Null {
                extra.push(format!("not a full backup: {}", v["manifest"]));
            }
        }
        _ => extra.push(format!("the backup failed instead of taking a full: {said}")),
    }
    let checks = lab.checks(&said, &["libvirt refused the incremental job"]);
    row("bitmap lost between the decision and the job start", checks, Some(time), extra, &said)
}

/// A prune killed in the middle of merging a kept incremental into a self-contained backup,
/// after its new files and manifest were written and before the switch: nothing listed is
/// incomplete (every backup verifies), and the next nasbak holding the VM's lock (the next
/// backup) completes the merge and says so.
fn prune_killed_mid_merge() -> Row {
    let lab = Lab::new("mergekill", vec![DiskSpec::qcow2(64)], false, true, 1024);
    lab.ok(&["offering", "add", "o", "--repo", &lab.repo, "--keep", "last=1"]);
    lab.ok(&["assign", lab.name(), "o"]);
    for (pattern, offset) in [(0x11, "0"), (0x22, "8M"), (0x33, "16M")] {
        lab.dom.write_through_qemu(0, pattern, offset, "4M");
        lab.ok(&["backup", lab.name()]);
    }
    let point = lab.dom.raw_copy(0, "point");
    let mut child = lab.spawn_paused(&["prune", lab.name()], "merge-decided");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    let mut extra = Vec::new();
    let out = lab.run(&["--json", "list"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let newest = listed.as_array().and_then(|l| l.last()).map(|b| b["id"].as_str().unwrap_or_default().to_owned());
    // The next backup completes the merge; then the merged backup gives the point back.
    let next = lab.run(&["--json", "backup", lab.name(), "--mode", "full"]);
    let said = text(&next);
    if let Some(id) = newest {
        let to = lab.dom.dir().join("merged.qcow2");
        let restored = lab.run(&["restore-volume", &id, "--disk", "vda", "--to", to.to_str().unwrap()]);
        let same = Command::new("qemu-img").args(["compare", "-U"]).arg(&to).arg(&point).status().unwrap().success();
        if !restored.status.success() || !same {
            extra.push(format!("the merged backup {id} does not give its point back: {}", text(&restored)));
        }
        let shown = lab.run(&["--json", "show", &id]);
        let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap_or_default();
        if shown["manifest"]["mode"] != "full" {
            extra.push(format!("{id} is not merged: {}", shown["manifest"]));
        }
    } else {
        extra.push(format!("no backup listed after the kill: {}", text(&out)));
    }
    let checks = lab.checks(&said, &["completed the merge of backup"]);
    row("prune killed mid-merge, before the switch", checks, None, extra, &said)
}

/// SIGKILL while nasbak reads a running VM's pull job into a compressed and encrypted backup
/// (a file half written, the export's connection open): the watchdog aborts the job, and the
/// next backup cleans up (the partial directory, the dead run's socket and scratch) and
/// succeeds; every listed backup verifies.
fn kill_encrypted_backup() -> Row {
    kill_protected_backup("kencrypted", true)
}

/// The same with an encrypting repository that does not compress.
fn kill_qemu_encrypted_backup() -> Row {
    kill_protected_backup("kqemuenc", false)
}

fn kill_protected_backup(name: &str, compress: bool) -> Row {
    let disks = vec![DiskSpec::raw(32).ext4(), DiskSpec::raw(256)];
    let lab = Lab::new(name, disks, true, false, 1024);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[1].path, 200);
    let key = lab.dom.dir().join("repo.key");
    fs::write(&key, "the key of the encrypted kill row, 0123456789").unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = key.to_string_lossy().into_owned();
    let compression = if compress { "zstd" } else { "none" };
    lab.ok(&["repo", "set", &lab.repo, "--compress", compression, "--encrypt", "luks", "--key-file", &key]);
    lab.dom.start();
    lab.dom.wait_for_agent(Duration::from_secs(120));
    let secrets = || virsh(&["secret-list", "--ephemeral"]).unwrap_or_default().lines().count();
    let before = secrets();
    let mut child = lab.spawn_paused(&["--json", "backup", lab.name(), "--quiesce", "required"], "pull-read");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    let mut extra = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !virsh(&["domjobinfo", lab.name()]).unwrap_or_default().contains("None") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let next = lab.run(&["--json", "backup", lab.name(), "--quiesce", "best-effort"]);
    let said = text(&next);
    let made: serde_json::Value = serde_json::from_slice(&next.stdout).unwrap_or_default();
    let stored = if compress { "compressed-in-luks" } else { "encrypted" };
    if made["manifest"]["disks"][0]["stored_as"] != stored {
        extra.push(format!("the next backup is not stored {stored}: {}", made["manifest"]));
    }
    if made["manifest"]["method"] != "pull-job" {
        extra.push(format!("the next backup was not read from a pull job: {}", made["manifest"]["method"]));
    }
    // The dead run's socket and scratch directories are gone (the next run removed them).
    let dead = format!("{}-", child.id());
    let sockets = nasbak::SHORT_PULL_SOCKET_ROOT;
    for root in
        [Path::new(RUNTIME).join("p"), PathBuf::from(sockets), Path::new(nasbak::DEFAULT_PULL_SCRATCH).join(lab.name())]
    {
        let left: Vec<_> = fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&dead))
            .map(|e| e.path())
            .collect();
        if !left.is_empty() {
            extra.push(format!("the killed run left {left:?}"));
        }
    }
    if secrets() != before {
        extra.push(format!(
            "a transient secret is left in libvirt: {}",
            virsh(&["secret-list", "--ephemeral"]).unwrap_or_default()
        ));
    }
    let checks = lab.checks(&said, &["unfinished backup"]);
    let title = if compress {
        "SIGKILL reading the pull job into a compressed, encrypted backup"
    } else {
        "SIGKILL reading the pull job into an encrypted backup"
    };
    row(title, checks, None, extra, &said)
}

/// A key rotation of an encrypted repository killed between a file's two header changes (its new
/// key added, its old one not yet removed): every file opens with the old key or the new one,
/// and `key rotate` run again finishes, after which every backup verifies with the new key.
fn rotation_killed() -> Row {
    let lab = Lab::new("rotatekill", vec![DiskSpec::qcow2(64)], false, false, 1024);
    let key = |name: &str, value: &str| {
        let path = lab.dom.dir().join(name);
        fs::write(&path, value).unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (old, new) = (
        key("old.key", "the old key of the rotation row, 0123456789"),
        key("new.key", "the new key of the rotation row, 9876543210"),
    );
    lab.ok(&["repo", "set", &lab.repo, "--encrypt", "luks", "--key-file", &old]);
    for (pattern, offset) in [(0x11, "0"), (0x22, "8M")] {
        lab.dom.write_offline(0, pattern, offset, "4M");
        lab.ok(&["backup", lab.name()]);
    }
    let mut child = lab.spawn_paused(&["key", "rotate", &lab.repo, "--new-key-file", &new], "key-added");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    let mut extra = Vec::new();
    // Every file opens with one of the two keys.
    let opening = |k: &str| -> Vec<(String, Vec<String>)> {
        let out = lab.run(&["--json", "key", "check", &lab.repo, "--key-file", k]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        report["backups"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .map(|b| {
                        let files = b["not_opening"].as_array().cloned().unwrap_or_default();
                        (
                            b["backup"].as_str().unwrap_or_default().to_owned(),
                            files.iter().map(|f| f.to_string()).collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (with_old, with_new) = (opening(&old), opening(&new));
    if with_old.is_empty() {
        extra.push("key check listed no backup".into());
    }
    for ((backup, a), (_, b)) in with_old.iter().zip(&with_new) {
        if let Some(f) = a.iter().find(|f| b.contains(f)) {
            extra.push(format!("{backup}: {f} opens with neither key after the kill"));
        }
    }
    let rerun = lab.run(&["key", "rotate", &lab.repo, "--new-key-file", &new]);
    let said = text(&rerun);
    if !lab.run(&["key", "check", &lab.repo]).status.success() {
        extra.push("after the second run a backup does not open with the repository's (new) key".into());
    }
    let checks = lab.checks(&said, &["files rotated"]);
    row("key rotation killed between a file's header changes", checks, None, extra, &said)
}

/// Waits (at most 60 s) until libvirt lists no job on the domain: what a stopped QEMU was sent
/// (an abort) takes effect once it runs again.
fn wait_no_job(lab: &Lab, extra: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !virsh(&["domjobinfo", lab.name()]).unwrap_or_default().contains("None") {
        if Instant::now() > deadline {
            extra.push("a job still runs 60 s after QEMU ran again".into());
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The VM's QEMU stops (SIGSTOP) right after the push job started, as a QEMU stuck on a stalled
/// NAS does: no libvirt call about the job is answered. nasbak fails within its libvirt timeout
/// and the cleanup budget (no hang), says QEMU does not answer and that an abort was sent, and
/// leaves nothing that looks complete; once QEMU runs again the abort ends the job.
fn qemu_frozen_mid_job() -> Row {
    let disks = vec![DiskSpec::raw(32).ext4(), DiskSpec::raw(1024)];
    let lab = Lab::new("qfrozenjob", disks, true, true, 2048);
    // 768 MiB of random data: the job takes seconds, QEMU is stopped within milliseconds.
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[1].path, 768);
    let child = lab
        .spawn_paused(&["--libvirt-timeout", "10s", "backup", lab.name(), "--quiesce", "best-effort"], "job-started");
    let frozen = lab.dom.freeze_qemu();
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    frozen.thaw();
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup succeeded with its VM's QEMU stopped".into());
    }
    // 10 s for the poll, 10 s of cleanup budget for the abort, and slack for a loaded machine.
    if time > Duration::from_secs(45) {
        extra.push(format!("nasbak took {time:?} to give up on a stopped QEMU"));
    }
    wait_no_job(&lab, &mut extra);
    let checks = lab.checks(&said, &["is not answering", "an abort was sent"]);
    row("VM's QEMU stopped (SIGSTOP) during the push job", checks, Some(time), extra, &said)
}

/// A VM instant-restored from a backup, whose QEMU then stops (SIGSTOP): `instant finish
/// --timeout 10s` returns by its timeout, says QEMU does not answer, and leaves the restore in
/// flight; once QEMU runs again, finish completes. With a bandwidth limit (a block copy of the
/// whole disk runs from the start).
fn qemu_frozen_instant_finish() -> Row {
    qemu_frozen_instant("qfrozeninst", &["--bandwidth", "4"], "VM's QEMU stopped (SIGSTOP) during an instant restore")
}

/// The same by default: the finish copies the backup onto the volume, then starts the mirror of
/// the guest's writes, which QEMU must answer.
fn qemu_frozen_instant_finish_copy() -> Row {
    qemu_frozen_instant("qfrozencopy", &[], "VM's QEMU stopped (SIGSTOP) before an instant restore's finish copies")
}

fn qemu_frozen_instant(tag: &str, extra_args: &[&str], title: &'static str) -> Row {
    let lab = Lab::new(tag, vec![DiskSpec::qcow2(64)], false, false, 1024);
    let _ = random_qcow2(&lab, 32);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let mut args = vec!["restore", &id, "--instant", "--detach"];
    args.extend_from_slice(extra_args);
    lab.ok(&args);
    let mut extra = Vec::new();
    let frozen = lab.dom.freeze_qemu();
    let start = Instant::now();
    let child = lab
        .command(&["instant", "finish", lab.name(), "--timeout", "10s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(120), &mut extra);
    let time = start.elapsed();
    let said = text(&out);
    if out.status.success() {
        extra.push("finish succeeded with the VM's QEMU stopped".into());
    }
    if time > Duration::from_secs(20) {
        extra.push(format!("finish took {time:?}, not its 10 s timeout"));
    }
    frozen.thaw();
    let listed = lab.run(&["instant", "list"]);
    if !String::from_utf8_lossy(&listed.stdout).contains(lab.name()) {
        extra.push(format!("the restore is no longer in flight: {}", text(&listed)));
    }
    let finished = lab.run(&["instant", "finish", lab.name(), "--timeout", "5m"]);
    if !finished.status.success() {
        extra.push(format!("finish after QEMU ran again: {}", text(&finished)));
    }
    let checks = lab.checks(&said, &["is not answering", "stays in flight"]);
    lab.dom.destroy();
    row(title, checks, Some(time), extra, &said)
}

/// An instant restore's finish (the default: the backup copied onto the volume, then the
/// guest's writes mirrored) killed while it copies: the VM runs on, the volume is as it was (the
/// copy is staged beside it), `instant list` shows the restore; the next finish removes the
/// staged copy, completes, and the volume holds the backup.
fn instant_finish_killed_mid_copy() -> Row {
    let lab = Lab::new("instkill", vec![DiskSpec::qcow2(256)], false, false, 1024);
    let disk = random_qcow2(&lab, 128);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let want = lab.dom.dir().join("want.raw");
    let _ = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&disk).arg(&want).status();
    let _ = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 64M"]).arg(&disk).output();
    let before = nasbak::checksum_file(&disk, "blake3").unwrap();
    lab.ok(&["restore", &id, "--instant", "--detach"]);
    let mut extra = Vec::new();
    let mut child = lab.spawn_paused(&["instant", "finish", lab.name()], "restore-copy");
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    if !lab.dom.is_running() {
        extra.push("the VM stopped with the killed finish".into());
    }
    if nasbak::checksum_file(&disk, "blake3").unwrap() != before {
        extra.push("the volume changed although the finish was killed before the rename".into());
    }
    if !String::from_utf8_lossy(&lab.run(&["instant", "list"]).stdout).contains(lab.name()) {
        extra.push("the restore is no longer in flight".into());
    }
    let finished = lab.run(&["instant", "finish", lab.name(), "--timeout", "5m"]);
    let said = text(&finished);
    if !finished.status.success() {
        extra.push(format!("the finish run again failed: {said}"));
    }
    lab.dom.destroy();
    let same = Command::new("qemu-img").args(["compare", "-U"]).arg(&want).arg(&disk).output();
    if !same.is_ok_and(|o| o.status.success()) {
        extra.push("the volume does not hold the backup".into());
    }
    let staged = staged_files(lab.dom.dir());
    if !staged.is_empty() {
        extra.push(format!("staged files left: {staged:?}"));
    }
    let _ = fs::remove_file(&want);
    let checks = lab.checks(&said, &["runs on its own volumes"]);
    row("instant restore's finish killed mid-copy, then run again", checks, None, extra, &said)
}

/// A boot verification whose throwaway VM's QEMU stops (SIGSTOP) as soon as it started:
/// `verify --boot --timeout 20s` ends by its timeout with the verification failed (exit 5), the
/// throwaway domain destroyed and its exports stopped.
fn qemu_frozen_boot_verify() -> Row {
    let lab = Lab::new("qfrozenboot", vec![DiskSpec::qcow2(64).ext4()], true, false, 1024);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let child = lab.spawn_paused(&["verify", "--boot", &id, "--timeout", "20s"], "boot-started");
    let throwaway = virsh(&["list", "--name"])
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .find(|n| n.starts_with("nasbak-verify-") && n.ends_with(lab.name()))
        .map(str::to_owned);
    let mut extra = Vec::new();
    let frozen = throwaway.as_deref().map(nasbak_testlab::FrozenQemu::of);
    if frozen.is_none() {
        extra.push("no throwaway domain runs at boot-started".into());
    }
    let (out, time) = resume(child, &mut extra);
    drop(frozen);
    let said = text(&out);
    if out.status.code() != Some(5) {
        extra.push(format!("expected exit 5 (verification failed): {said}"));
    }
    // 20 s for the guest, the destroy of a stopped QEMU (libvirt's SIGTERM, then SIGKILL after
    // 10 s), and slack for a loaded machine.
    if time > Duration::from_secs(60) {
        extra.push(format!("verify --boot took {time:?} with a 20 s timeout"));
    }
    let left = virsh(&["list", "--all", "--name"]).unwrap_or_default();
    if left.lines().any(|n| n.contains("nasbak-verify-") && n.ends_with(lab.name())) {
        extra.push(format!("the throwaway domain is left: {left}"));
    }
    if let Some(name) = &throwaway
        && !nasbak_testlab::pids_with_cmdline(name).is_empty()
    {
        extra.push(format!("processes of {name} are left"));
    }
    let checks = lab.checks(&said, &["did not answer"]);
    row("throwaway VM's QEMU stopped (SIGSTOP) during a boot verification", checks, Some(time), extra, &said)
}

/// Lets a paused nasbak go on and waits (bounded) for it: its output and the time it took.
fn resume(child: Child, extra: &mut Vec<String>) -> (Output, Duration) {
    let start = Instant::now();
    signal(&child, Signal::SIGCONT);
    let out = wait_bounded(child, Duration::from_secs(240), extra);
    (out, start.elapsed())
}

/// Waits for a child with a limit; a child still running then is killed and that is a failure.
fn wait_bounded(child: Child, limit: Duration, extra: &mut Vec<String>) -> Output {
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        true
    });
    let out = child.wait_with_output().unwrap();
    if watchdog.join().unwrap() {
        extra.push(format!("nasbak hung for {limit:?} and was killed"));
    }
    out
}

/// The sshfs server stops answering while the push job writes (its session processes stopped):
/// sshfs gives up after its keepalives (about 6 s), the job fails, nasbak reports it and cleans.
fn repository_gone_mid_backup() -> Row {
    let (lab, server) = Lab::with_sshfs("gonebackup", vec![DiskSpec::raw(256)], true);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 200);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "job-started");
    server.signal_sessions(Signal::SIGSTOP);
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    server.signal_sessions(Signal::SIGCONT);
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup succeeded on a repository that stopped answering".into());
    }
    let checks = lab.checks(&said, &["became unavailable during the copy of the disks"]);
    row("repository stops answering mid-backup (sshfs)", checks, Some(time), extra, &said)
}

/// The same with scratch storage (`scratch_dir`): the job writes to a local directory while the
/// sshfs server stops answering; the copy to the repository afterwards fails once sshfs gives
/// up, with the reason; nothing is left in the scratch, the guest ran on.
fn repository_gone_mid_backup_scratch() -> Row {
    let (lab, server) = Lab::with_sshfs("gonescratch", vec![DiskSpec::raw(256)], true);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 200);
    let scratch = lab.dom.dir().join("scratch");
    let config = fs::read_to_string(&lab.config).unwrap();
    fs::write(&lab.config, format!("scratch_dir = \"{}\"\n{config}", scratch.display())).unwrap();
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "job-started");
    server.signal_sessions(Signal::SIGSTOP);
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    server.signal_sessions(Signal::SIGCONT);
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup succeeded on a repository that stopped answering".into());
    }
    fn files(dir: &Path) -> Vec<PathBuf> {
        let entries = fs::read_dir(dir).into_iter().flatten().flatten();
        entries.flat_map(|e| if e.path().is_dir() { files(&e.path()) } else { vec![e.path()] }).collect()
    }
    let left = files(&scratch);
    if !left.is_empty() {
        extra.push(format!("left in the scratch: {left:?}"));
    }
    let checks = lab.checks(&said, &["became unavailable during the copy of the disks (qemu-img)"]);
    row("repository stops answering mid-backup, scratch storage (sshfs)", checks, Some(time), extra, &said)
}

/// The repository is lazily unmounted under a running push job: the job finishes into the
/// detached file system, nasbak's checksum finds the files gone and says so.
fn repository_unmounted_mid_backup() -> Row {
    let lab = Lab::new("lazyumount", vec![DiskSpec::raw(128)], false, true, 1024);
    nasbak_testlab::fill_pseudo_random(&lab.dom.disks()[0].path, 64);
    let child = lab.spawn_paused(&["backup", lab.name(), "--quiesce", "off"], "job-started");
    let umount = Command::new("umount").arg("-l").arg(lab.mount_point()).output().unwrap();
    let mut extra = Vec::new();
    if !umount.status.success() {
        extra.push(format!("umount -l: {}", text(&umount)));
    }
    let (out, time) = resume(child, &mut extra);
    let said = text(&out);
    if out.status.success() {
        extra.push("the backup succeeded into a repository that was unmounted".into());
    }
    let checks = lab.checks(&said, &["became unavailable", "no longer mounted"]);
    row("repository unmounted (lazily) mid-backup", checks, Some(time), extra, &said)
}

/// The sshfs server stops answering while a restore copies: the restore fails before any
/// volume changed, and runs again once the repository is back.
fn repository_gone_mid_restore() -> Row {
    let (lab, server) = Lab::with_sshfs("gonerestore", vec![DiskSpec::qcow2(256)], false);
    let disk = random_qcow2(&lab, 128);
    let out: serde_json::Value = serde_json::from_str(&lab.ok(&["--json", "backup", lab.name()])).unwrap();
    let id = out["id"].as_str().unwrap().to_owned();
    let _ = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 64M"]).arg(&disk).output();
    let damaged = nasbak::checksum_file(&disk, "blake3").unwrap();
    let child = lab.spawn_paused(&["restore", &id], "restore-copy");
    server.signal_sessions(Signal::SIGSTOP);
    let mut extra = Vec::new();
    let (out, time) = resume(child, &mut extra);
    server.signal_sessions(Signal::SIGCONT);
    let said = text(&out);
    if out.status.success() {
        extra.push("the restore succeeded from a repository that stopped answering".into());
    }
    if nasbak::checksum_file(&disk, "blake3").unwrap() != damaged {
        extra.push("the volume changed although the restore failed while copying".into());
    }
    let again = lab.run(&["restore", &id]);
    if !again.status.success() {
        extra.push(format!("the restore run again failed: {}", text(&again)));
    }
    let checks = lab.checks(&said, &["became unavailable during the restore of disk"]);
    row("repository stops answering mid-restore (sshfs)", checks, Some(time), extra, &said)
}

fn bad_input() -> Row {
    let lab = Lab::new("badinput", vec![DiskSpec::raw(16)], false, false, 256);
    let mut extra = Vec::new();
    let mut said = String::new();
    let before = fs::read(&lab.config).unwrap();
    // Each is refused with an error that names the input and what would be valid.
    let mut refused = |cmd: Command, shown: &str, extra: &mut Vec<String>| {
        let mut cmd = cmd;
        let out = cmd.output().unwrap();
        let t = text(&out);
        said.push_str(&t);
        let named = t.contains("expected") || t.contains("use 1 to 200") || t.contains("REPO:VM/BACKUP-ID");
        if out.status.success() || !named {
            extra.push(format!("{shown}: not refused with a clear error: {t}"));
        }
    };
    let long = "x".repeat(5000);
    for id in ["../x", "/etc/passwd", "vm/..", long.as_str(), "vm/2026.01.01.00.00.00/../..", "vm/2026.13.01.00.00.00"]
    {
        refused(lab.command(&["verify", id]), id, &mut extra);
        refused(lab.command(&["delete", id]), id, &mut extra);
        refused(lab.command(&["restore", id]), id, &mut extra);
    }
    for vm in ["my vm", "vm;reboot", "$(reboot)", "vm\u{e9}", ".hidden", "-rf"] {
        refused(lab.command(&["backup", vm, "--repo", &lab.repo]), vm, &mut extra);
    }
    use std::os::unix::ffi::OsStrExt;
    let mut non_utf8 = lab.command(&["verify"]);
    non_utf8.arg(std::ffi::OsStr::from_bytes(b"vm/\xff\xfe"));
    let out = non_utf8.output().unwrap();
    if out.status.success() {
        extra.push("a non-UTF-8 backup id was accepted".into());
    }
    if fs::read(&lab.config).unwrap() != before {
        extra.push("a refused command changed the configuration".into());
    }
    // Shell metacharacters in addresses and options: refused, or passed to mount(8) as one
    // argument each; no shell ever runs them (the marker file is never created).
    let marker = lab.dom.dir().join("shell-ran");
    let m = marker.display().to_string();
    let other = lab.dom.dir().join("other.toml");
    for (n, (address, options)) in [
        (format!("host:/x;touch {m}"), String::new()),
        (format!("host:/$(touch {m})"), String::new()),
        ("host:/x".to_owned(), format!("vers=4,$(touch {m})")),
        ("host:/x".to_owned(), format!("sec=`touch {m}`")),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("evil{n}");
        let mut add = Command::new(env!("CARGO_BIN_EXE_nasbak"));
        add.arg("--config").arg(&other).args(["repo", "add", &name, "--type", "nfs", "--address", address]);
        add.args(["--options", options]);
        let out = add.output().unwrap();
        said.push_str(&text(&out));
        if out.status.success() {
            let mut check = Command::new(env!("CARGO_BIN_EXE_nasbak"));
            let out = check.arg("--config").arg(&other).args(["repo", "check", &name]).output().unwrap();
            said.push_str(&text(&out));
        }
    }
    if marker.exists() {
        extra.push("a shell ran part of an address or option".into());
    }
    // Malformed configuration files: an error naming the file (and line), the file untouched.
    for (n, content) in [
        "[[repository]\nname=",
        "\u{0}\u{1}\u{2}",
        "[[repository]]\nname = \"../../etc\"\ntype = \"shared\"\naddress = \"/srv\"\n",
        "[[repository]]\nname = \"a\"\ntype = \"nfs\"\naddress = \"h:/x\"\noptions = \"password=hunter2\"\n",
    ]
    .iter()
    .enumerate()
    {
        let path = lab.dom.dir().join(format!("hostile{n}.toml"));
        fs::write(&path, content).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nasbak")).arg("--config").arg(&path).arg("list").output().unwrap();
        let t = text(&out);
        said.push_str(&t);
        if out.status.success() || !t.contains(&*path.to_string_lossy()) {
            extra.push(format!("hostile config {n}: {t}"));
        }
        if t.contains("hunter2") {
            extra.push(format!("hostile config {n}: a secret in the error: {t}"));
        }
        if fs::read_to_string(&path).unwrap() != *content {
            extra.push(format!("hostile config {n} was rewritten"));
        }
    }
    let checks = lab.checks(&said, &["expected"]);
    row("bad input (ids, VM names, addresses, options, config files)", checks, None, extra, &said)
}

fn main() {
    // Row filters; libtest's flags (`--list`, `--format terse`, ...) are understood or passed
    // over, so that `cargo xtask test` runs this binary as it runs the others.
    let all: Vec<String> = std::env::args().skip(1).collect();
    let list = all.iter().any(|a| a == "--list");
    let args: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with('-') && (*i == 0 || all[i - 1] != "--format"))
        .map(|(_, a)| a.clone())
        .collect();
    type Fault = Box<dyn Fn() -> Row>;
    let rows: Vec<(&str, Fault)> = vec![
        ("kill-mounted", Box::new(|| kill_at("SIGKILL after mounting", "mounted", &["\"cleaned\":[]"]))),
        ("kill-frozen", Box::new(|| kill_at("SIGKILL with the guest frozen", "frozen", &["unfinished backup"]))),
        ("kill-job", Box::new(|| kill_at("SIGKILL with the job running", "job-started", &["unfinished backup"]))),
        ("kill-checksum", Box::new(|| kill_at("SIGKILL while checksumming", "checksum", &["unfinished backup"]))),
        ("kill-manifest", Box::new(|| kill_at("SIGKILL after the manifest", "manifest", &["unfinished backup"]))),
        ("kill-rename", Box::new(|| kill_at("SIGKILL after the rename", "renamed", &["took over the lock"]))),
        (
            "kill-uefi-job",
            Box::new(|| {
                kill_vm_at("UEFI+TPM VM: SIGKILL with the job running", "job-started", &["unfinished backup"], true)
            }),
        ),
        (
            "kill-uefi-state",
            Box::new(|| {
                kill_vm_at("UEFI+TPM VM: SIGKILL keeping its state", "state-written", &["unfinished backup"], true)
            }),
        ),
        ("restore-uefi-kill", Box::new(restore_killed_uefi)),
        ("enospc", Box::new(enospc)),
        ("agent-required", Box::new(|| agent_hung("required"))),
        ("agent-best-effort", Box::new(|| agent_hung("best-effort"))),
        ("agent-hangs-frozen", Box::new(agent_hangs_while_frozen)),
        ("start-refused-frozen", Box::new(start_refused_while_frozen)),
        ("bitmap-lost-start", Box::new(bitmap_lost_at_job_start)),
        ("merge-kill", Box::new(prune_killed_mid_merge)),
        ("rotate-kill", Box::new(rotation_killed)),
        ("kill-encrypted", Box::new(kill_encrypted_backup)),
        ("kill-qemu-encrypted", Box::new(kill_qemu_encrypted_backup)),
        ("vm-destroyed", Box::new(vm_destroyed_mid_job)),
        ("libvirtd-restart", Box::new(libvirtd_restarted_mid_job)),
        ("repo-gone-backup", Box::new(repository_gone_mid_backup)),
        ("repo-gone-scratch", Box::new(repository_gone_mid_backup_scratch)),
        ("repo-unmounted-backup", Box::new(repository_unmounted_mid_backup)),
        ("repo-gone-restore", Box::new(repository_gone_mid_restore)),
        ("qemu-frozen-backup", Box::new(qemu_frozen_mid_job)),
        ("qemu-frozen-instant", Box::new(qemu_frozen_instant_finish)),
        ("qemu-frozen-copy", Box::new(qemu_frozen_instant_finish_copy)),
        ("instant-finish-kill", Box::new(instant_finish_killed_mid_copy)),
        ("qemu-frozen-boot", Box::new(qemu_frozen_boot_verify)),
        ("two-backups", Box::new(two_backups_of_one_vm)),
        ("several-vms", Box::new(several_vms_at_once)),
        ("race", Box::new(backup_prune_delete_race)),
        ("restore-kill", Box::new(restore_killed_mid_copy)),
        ("raw-restore-kill", Box::new(restore_killed_mid_write)),
        ("bad-input", Box::new(bad_input)),
    ];
    let chosen = || rows.iter().filter(|(k, _)| args.is_empty() || args.iter().any(|a| k.contains(a.as_str())));
    if list {
        for (key, _) in chosen() {
            println!("{key}: test");
        }
        return;
    }
    let mut results = Vec::new();
    for (key, f) in chosen() {
        eprintln!("faults: {key} ...");
        let started = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let r = r.unwrap_or_else(|p| {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            let fail = || Verdict::Fail("the row itself failed".into());
            row(
                key_name(key),
                [fail(), fail(), fail(), fail(), fail(), fail()],
                None,
                vec![why.unwrap_or_default()],
                "",
            )
        });
        eprintln!("faults: {key} done in {:.0?}", started.elapsed());
        println!("test {key} ... {}", if r.passed() { "ok" } else { "FAILED" });
        results.push(r);
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| fault | listed complete | not frozen | no job | no mount | error named | next backup | time to error | result |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let v = r.verdicts();
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            v[0].1.cell(),
            v[1].1.cell(),
            v[2].1.cell(),
            v[3].1.cell(),
            v[4].1.cell(),
            v[5].1.cell(),
            r.time_to_error.map_or("-".into(), |t| format!("{:.1} s", t.as_secs_f64())),
            if r.passed() { "pass" } else { "FAIL" }
        );
    }
    println!("{table}");
    println!("What nasbak said:");
    for r in results.iter().filter(|r| !r.said.is_empty()) {
        println!("- {}: {}", r.name, r.said);
    }
    for r in &results {
        let skipped: Vec<String> = r
            .verdicts()
            .iter()
            .filter_map(|(what, v)| match v {
                Verdict::Skip(why) => Some(format!("{what}: {why}")),
                _ => None,
            })
            .collect();
        if !skipped.is_empty() {
            println!("{} (not applicable: {})", r.name, skipped.join("; "));
        }
    }
    for r in results.iter().filter(|r| !r.passed()) {
        println!("{}:", r.name);
        for (what, v) in r.verdicts() {
            if let Verdict::Fail(why) = v {
                println!("  {what}: {why}");
            }
        }
        for e in &r.extra {
            println!("  {e}");
        }
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    let passed = results.len() - failed;
    println!(
        "test result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn key_name(key: &str) -> &'static str {
    Box::leak(key.to_owned().into_boxed_str())
}
