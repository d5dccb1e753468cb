//! `cargo xtask test`, `tests`, `demo`, `fuzz` and `faults`.

use anyhow::{Context, Result, bail};

use crate::exec::{cargo, cargo_test, cmd, conclude, workspace_root};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `cargo xtask test`: the whole CI gate (the NAS guest's tests included).
pub fn test() -> Result<()> {
    println!("xtask: {}", crate::deadline::disk_free());
    crate::lab::up()?;
    // The S3 gateway (over the Ceph cluster) for the off-site target tests.
    crate::lab::s3::up()?;
    cargo(&["fmt", "--all", "--check"], &[])?;
    crate::layers::check()?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    // tests/nas.rs is built only for the NAS guest; lint it too.
    cargo(&["clippy", "-p", "nasbak-repo", "--features", "nas-guest", "--all-targets", "--", "-D", "warnings"], &[])?;
    // The facade's exported mocks and the test that uses them as an embedder would.
    // tests/lab_ceph.rs too, built only for the lab cluster.
    cargo(
        &[
            "clippy",
            "-p",
            "nasbak",
            "--features",
            "mock ceph-lab nas-guest s3",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    cargo(&["doc", "--workspace", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    publish_dry_run()?;
    fuzz(10)?;
    // Every test binary under a deadline (see deadline.rs), the doc tests through cargo.
    let limits = crate::deadline::Limits::from_env()?;
    println!("xtask: {}", crate::deadline::disk_free());
    let mut binaries = crate::deadline::test_binaries(&["test", "--workspace"])?;
    // What an embedder's tests do: the facade's mocks, exported by its `mock` feature (built
    // with the workspace already when a dev-dependency turns the feature on).
    for b in
        crate::deadline::test_binaries(&["test", "-p", "nasbak", "--features", "mock", "--test", "embedder_mocks"])?
    {
        if !binaries.iter().any(|known| known.name == b.name) {
            binaries.push(b);
        }
    }
    let (passed, failed) = crate::deadline::run_all(&binaries, limits)?;
    let (doc_passed, doc_failed) = cargo_test(&["test", "--workspace", "--doc"])?;
    let (passed, failed) = (passed + doc_passed, failed + doc_failed);
    println!("xtask: the real NFS and SMB tests inside the NAS guest (cargo xtask lab nas):");
    let (nas_passed, nas_failed) = crate::lab::nas::run_tests()?;
    println!("{nas_passed} passed, {nas_failed} failed");
    let (passed, failed) = (passed + nas_passed, failed + nas_failed);
    println!("xtask: VMs with RBD disks against the lab Ceph cluster (cargo xtask lab ceph):");
    let (ceph_passed, ceph_failed) = crate::lab::ceph::run_tests()?;
    println!("{ceph_passed} passed, {ceph_failed} failed");
    let (passed, failed) = (passed + ceph_passed, failed + ceph_failed);
    println!("xtask: all test binaries together, the NAS guest's and the Ceph cluster's included:");
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// `cargo xtask tests [--times N] [--deadline SECS] BINARY [FILTER...]`: the test binaries
/// whose `package/target` name contains BINARY, each run N times (default 1) under the deadline
/// of `cargo xtask test` (or SECS), with the time of every run: for a test that must pass ten
/// times in a row, and to watch a hung test fail by name.
pub fn tests(args: &[&str]) -> Result<()> {
    let mut limits = crate::deadline::Limits::from_env()?;
    let (mut times, mut rest) = (1u32, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{a} needs {what}"))?;
            v.parse().with_context(|| format!("{a} {v:?}: expected {what}"))
        };
        match *a {
            "--times" => times = u32::try_from(value("a count")?)?,
            "--deadline" => limits.per_binary = Duration::from_secs(value("seconds")?),
            _ => rest.push(*a),
        }
    }
    let Some((binary, filters)) = rest.split_first() else {
        bail!("which test binary? (package/target, or part of it)")
    };
    crate::lab::up()?;
    if binary.contains("s3") {
        crate::lab::s3::up()?;
    }
    let chosen: Vec<_> = crate::deadline::test_binaries(&["test", "--workspace"])?
        .into_iter()
        .filter(|b| b.name.contains(binary))
        .collect();
    if chosen.is_empty() {
        bail!("no test binary's name contains {binary:?}");
    }
    let (mut passed, mut failed) = (0u64, 0u64);
    for round in 1..=times {
        for bin in &chosen {
            let started = std::time::Instant::now();
            let out = crate::deadline::run_binary(bin, filters, limits.per_binary)?;
            let verdict = if out.failed.is_empty() { "ok".to_owned() } else { format!("FAILED {:?}", out.failed) };
            println!(
                "xtask: round {round} of {times}: {} in {:.1} s: {verdict}",
                bin.name,
                started.elapsed().as_secs_f64()
            );
            passed += out.passed;
            failed += out.failed.len() as u64;
        }
    }
    conclude("chosen", (passed, failed))
}

/// Every published crate packaged and built from its package, as `cargo publish` would (the lab
/// fixtures and xtask are never published).
pub fn publish_dry_run() -> Result<()> {
    // Cargo unpacks the packages of its temporary local registry under
    // $CARGO_HOME/registry/src/-<hash>/ and reuses what an earlier run unpacked there for the
    // same version, and it never rebuilds a registry package of a version it built before: a
    // verify would build against old sources. So our crates' unpacked copies go first, and the
    // verify builds in a target directory of its own, emptied first.
    let target = workspace_root().join("target/publish-check");
    if target.exists() {
        fs::remove_dir_all(&target).with_context(|| format!("removing {}", target.display()))?;
    }
    let target = target.to_str().context("a UTF-8 target path")?.to_owned();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("no CARGO_HOME or HOME")?;
    if let Ok(registries) = fs::read_dir(cargo_home.join("registry/src")) {
        for registry in registries.flatten().filter(|r| r.file_name().to_string_lossy().starts_with('-')) {
            for unpacked in fs::read_dir(registry.path()).into_iter().flatten().flatten() {
                if unpacked.file_name().to_string_lossy().starts_with("nasbak") {
                    fs::remove_dir_all(unpacked.path())
                        .with_context(|| format!("removing the stale {}", unpacked.path().display()))?;
                }
            }
        }
    }
    cargo(
        &["publish", "--workspace", "--dry-run", "--allow-dirty", "--exclude", "nasbak-testlab", "--exclude", "xtask"],
        &[("CARGO_TARGET_DIR", &target)],
    )?;
    // Its build (2 GB) is of no use once verified, and the test build that follows needs the disk.
    fs::remove_dir_all(&target).with_context(|| format!("removing {target}"))
}

/// `cargo xtask faults`: the fault matrix, a test target of nasbak-cli without the libtest
/// harness that prints its own table and closing line.
pub fn faults(rows: &[&str]) -> Result<()> {
    crate::lab::up()?;
    let mut args = vec!["test", "-p", "nasbak-cli", "--test", "faults", "--"];
    args.extend_from_slice(rows);
    cargo(&args, &[])
}

/// Runs a command for the demo, printing it first, with its output on our terminal.
fn show(program: &str, args: &[&str]) -> Result<String> {
    println!("$ {program} {}", args.join(" "));
    let out = cmd(program).args(args).run()?;
    print!("{}", out.stdout_text());
    Ok(out.stdout_text())
}

fn agent(domain: &str, json: &str) -> Result<String> {
    Ok(cmd("virsh")
        .args(["-c", crate::lab::URI, "qemu-agent-command", domain, "--timeout", "5", json])
        .run()?
        .stdout_text())
}

fn wait_for_agent(domain: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while agent(domain, r#"{"execute":"guest-ping"}"#).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("the guest agent of {domain} did not answer within 120 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// Reads a file inside the guest through the guest agent.
fn guest_cat(domain: &str, path: &str) -> Result<String> {
    let reply = |json: &str| -> Result<serde_json::Value> {
        let text = agent(domain, json)?;
        serde_json::from_str(&text).with_context(|| format!("the guest agent's reply {text:?}"))
    };
    let open = reply(&format!(r#"{{"execute":"guest-file-open","arguments":{{"path":"{path}"}}}}"#))?;
    let handle = open["return"].as_i64().context("a file handle from guest-file-open")?;
    let read = reply(&format!(r#"{{"execute":"guest-file-read","arguments":{{"handle":{handle}}}}}"#));
    let _ = agent(domain, &format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{handle}}}}}"#));
    let b64 = read?["return"]["buf-b64"].as_str().context("buf-b64 from guest-file-read")?.to_owned();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).context("the guest agent's base64")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `cargo xtask man`: the manual page, from the command line's own definition (`nasbak man`),
/// in `target/man/nasbak.1`.
pub fn man() -> Result<()> {
    cargo(&["build", "--quiet", "-p", "nasbak-cli"], &[])?;
    let binary = crate::exec::built_binary("debug");
    let page = cmd(&binary).arg("man").run()?.stdout;
    // Beside the profiles: `<target>/man/`.
    let dir = Path::new(&binary).parent().and_then(Path::parent).map_or_else(|| "target/man".into(), |t| t.join("man"));
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("nasbak.1"), page)?;
    println!("man: {}", dir.join("nasbak.1").display());
    Ok(())
}

/// `cargo xtask demo`: the README's main job on the embedded default: a `custom` repository on a
/// loop-mounted ext4 image, and a lab guest with an agent and a data disk holding known files.
/// Backup with quiesce, damage, restore, show the files are back, verify, list.
pub fn demo() -> Result<()> {
    crate::lab::up()?;
    cargo(&["build", "--quiet", "-p", "nasbak-cli"], &[])?;
    let nasbak = crate::exec::built_binary("debug");
    let dir = Path::new(crate::lab::STATE).join("demo");
    let domain = "nasbak-demo";
    let _ = cmd("virsh").args(["-c", crate::lab::URI, "destroy", domain]).run();
    let _ = cmd("virsh").args(["-c", crate::lab::URI, "undefine", domain, "--checkpoints-metadata"]).run();
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("files"))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let d = |name: &str| dir.join(name).to_string_lossy().into_owned();
    fs::write(dir.join("files/known.txt"), "the files nasbak protects\n")?;
    // The repository: 256 MiB of ext4 in a file. The VM: one ext4 data disk with known files.
    fs::File::create(dir.join("repo.img"))?.set_len(256 << 20)?;
    show("mkfs.ext4", &["-q", "-F", &d("repo.img")])?;
    fs::File::create(dir.join("data.raw"))?.set_len(64 << 20)?;
    show(
        "mkfs.ext4",
        &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", &d("files"), &d("data.raw")],
    )?;
    show("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &d("data.raw"), &d("data.qcow2")])?;
    let guest = fs::read_to_string(Path::new(crate::lab::STATE).join("guest.conf"))?;
    let get = |k: &str| guest.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_default().to_owned();
    let xml = format!(
        "<domain type='qemu'><name>{domain}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0</cmdline></os>\
         <on_poweroff>destroy</on_poweroff><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel><memballoon model='none'/></devices></domain>",
        get("kernel"),
        get("initrd"),
        d("data.qcow2")
    );
    fs::write(dir.join("domain.xml"), xml)?;
    show("virsh", &["-c", crate::lab::URI, "define", &d("domain.xml")])?;
    show("virsh", &["-c", crate::lab::URI, "start", domain])?;
    wait_for_agent(domain)?;
    println!("in the guest, /data/known.txt says: {}", guest_cat(domain, "/data/known.txt")?.trim());
    let config = d("nasbak.toml");
    let n = |args: &[&str]| -> Result<String> {
        let mut all = vec!["--config", &config];
        all.extend_from_slice(args);
        show(&nasbak, &all)
    };
    n(&["repo", "add", "demo", "--type", "custom", "--fstype", "ext4", "--address", &d("repo.img")])?;
    n(&["repo", "check", "demo"])?;
    let out = n(&["backup", domain, "--quiesce", "required"])?;
    let id = out
        .split_whitespace()
        .skip_while(|w| *w != "as")
        .nth(1)
        .context("the backup id in nasbak's output")?
        .to_owned();
    show("virsh", &["-c", crate::lab::URI, "destroy", domain])?;
    println!("damaging the data disk:");
    show("qemu-io", &["-f", "qcow2", "-c", "write -z 0 64M", &d("data.qcow2")])?;
    n(&["restore", &id])?;
    show("virsh", &["-c", crate::lab::URI, "start", domain])?;
    wait_for_agent(domain)?;
    let back = guest_cat(domain, "/data/known.txt")?;
    println!("in the guest again, /data/known.txt says: {}", back.trim());
    if back.trim() != "the files nasbak protects" {
        bail!("the restored guest does not have its file back");
    }
    n(&["verify", &id])?;
    n(&["list"])?;
    show("virsh", &["-c", crate::lab::URI, "destroy", domain])?;
    println!("demo: backup, damage, restore, verify: all good");
    Ok(())
}

/// Runs every fuzz target for `secs` seconds, installing cargo-fuzz first if it is missing.
/// The stable toolchain runs it with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs `-Z` flags).
pub fn fuzz(secs: u32) -> Result<()> {
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !have {
        cargo(&["install", "--locked", "cargo-fuzz"], &[])?;
    }
    let fuzz_dir = workspace_root().join("fuzz");
    for target in ["mount_options", "address", "domain_xml", "backup_ref", "image_location"] {
        let corpus = fuzz_dir.join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let max = format!("-max_total_time={secs}");
        println!("xtask: fuzzing {target} for {secs} s");
        let status = Command::new("cargo")
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(&seeds)
            .args(["--", &max, "-print_final_stats=0"])
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target {target} failed ({status}); the crash input is under fuzz/artifacts/{target}/");
        }
    }
    Ok(())
}
