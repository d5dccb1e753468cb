//! The `nasbak` binary as an operator runs it, against the lab.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nasbak_testlab::{DiskSpec, DomainSpec};

fn nasbak(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nasbak")).arg("--config").arg(config).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(config: &Path, args: &[&str]) -> String {
    let (code, out, err) = nasbak(config, args);
    assert_eq!(code, 0, "nasbak {args:?}: {out}{err}");
    out
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    for cmd in [
        &["--help"][..],
        &["repo", "--help"],
        &["repo", "add", "--help"],
        &["backup", "--help"],
        &["restore", "--help"],
        &["list", "--help"],
        &["verify", "--help"],
        &["delete", "--help"],
        &["show", "--help"],
        &["restore-volume", "--help"],
        &["offering", "--help"],
        &["offering", "add", "--help"],
        &["offering", "list", "--help"],
        &["offering", "remove", "--help"],
        &["assign", "--help"],
        &["unassign", "--help"],
        &["prune", "--help"],
        &["schedule", "--help"],
        &["schedule", "add", "--help"],
        &["schedule", "list", "--help"],
        &["schedule", "remove", "--help"],
        &["run-due", "--help"],
        &["status", "--help"],
        &["metrics", "--help"],
        &["repo", "check", "--help"],
        &["repo", "stats", "--help"],
        &["mount", "--help"],
        &["umount", "--help"],
        &["instant", "--help"],
        &["instant", "finish", "--help"],
        &["instant", "cancel", "--help"],
    ] {
        let out = ok(&config, cmd);
        assert!(out.contains("Usage"), "{cmd:?}: {out}");
    }
    let (code, _, err) = nasbak(&config, &["repo", "add", "x", "--type", "nfs", "--address", "nohost"]);
    assert_eq!(code, 1);
    assert!(err.contains("NFS address") && err.contains("expected host:/export"), "{err}");
    let (code, _, _) = nasbak(&config, &["frobnicate"]);
    assert_eq!(code, 2, "usage errors exit 2");
    let out = ok(&config, &["schedule", "add", "--help"]);
    assert!(out.contains("DAY HH:MM"), "the --at forms are explained: {out}");
    let (code, _, err) =
        nasbak(&config, &["schedule", "add", "vm", "--every", "weekly", "--at", "funday 1:00", "--keep", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mon, tue"), "{err}");
    let (code, _, err) = nasbak(&config, &["offering", "add", "o", "--repo", "r", "--keep", "forever"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("last, hourly, daily"), "{err}");
}

#[test]
fn backup_damage_restore_verify_list_delete() {
    let dom = DomainSpec::new("cli")
        .disk(DiskSpec::qcow2(32).ext4_with_files(&[("known.txt", b"nasbak was here")]))
        .agent(true)
        .running(true)
        .create();
    dom.wait_for_agent(Duration::from_secs(90));
    let config = dom.dir().join("nasbak.toml");
    let image = dom.dir().join("repo.img");
    std::fs::File::create(&image).unwrap().set_len(128 << 20).unwrap();
    assert!(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).status().unwrap().success());
    ok(&config, &["repo", "add", "lab", "--type", "custom", "--fstype", "ext4", "--address", image.to_str().unwrap()]);
    assert!(ok(&config, &["repo", "check", "lab"]).contains("ok"));
    let out = ok(&config, &["--json", "backup", dom.name(), "--quiesce", "required"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["manifest"]["quiesced"], true);
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with(&format!("lab:{}/", dom.name())), "{id}");
    // A running VM is not restored (exit code 4: refused).
    let (code, _, err) = nasbak(&config, &["restore", &id]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("shut it off"), "{err}");
    // Damage, stop, restore.
    dom.destroy();
    let disk = &dom.disks()[0].path;
    assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 8M"]).arg(disk).status().unwrap().success());
    assert!(ok(&config, &["restore", &id]).contains("restored vda"));
    let raw = dom.dir().join("check.raw");
    assert!(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(disk).arg(&raw).status().unwrap().success());
    let cat = Command::new("debugfs").args(["-R", "cat /known.txt"]).arg(&raw).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "nasbak was here");
    assert!(ok(&config, &["verify", &id]).starts_with("ok "));
    // Mounted read-only from a repository nasbak mounts: the repository stays mounted as long
    // as the backup is, after nasbak has exited; umount takes both away.
    let repo_mounted = || std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(" /run/nasbak/mnt/lab ");
    assert!(!repo_mounted());
    let mnt = dom.dir().join("browse");
    ok(&config, &["mount", &id, mnt.to_str().unwrap()]);
    assert!(repo_mounted(), "held by the export's daemon");
    assert_eq!(std::fs::read_to_string(mnt.join("vda/fs/known.txt")).unwrap(), "nasbak was here");
    let out = ok(&config, &["umount", mnt.to_str().unwrap()]);
    assert!(out.contains("and the repository"), "{out}");
    assert!(!repo_mounted() && !mnt.exists());
    let list: serde_json::Value = serde_json::from_str(&ok(&config, &["--json", "list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    // The same fields as `backup --json`, the manifest's disks included.
    assert_eq!((list[0]["vm"].as_str(), list[0]["manifest"]["quiesced"].as_bool()), (Some(dom.name()), Some(true)));
    assert_eq!(list[0]["manifest"]["disks"][0]["target"], "vda");
    let (code, _, _) = nasbak(&config, &["delete", &format!("lab:{}/", dom.name())]);
    assert_ne!(code, 0, "a VM directory must never be deleted");
    ok(&config, &["delete", &id]);
    let (code, _, err) = nasbak(&config, &["show", &id]);
    assert_eq!(code, 3, "not found");
    assert!(err.contains("does not exist") && err.contains("hint: `nasbak list`"), "{err}");
    // As JSON: every cause, and the case a tool can match on.
    let (code, _, err) = nasbak(&config, &["--json", "show", &id]);
    let e: serde_json::Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!((code, e["kind"].as_str()), (3, Some("not-found")), "{err}");
}

#[test]
fn a_backup_killed_mid_job_leaves_nothing_complete_and_the_next_run_cleans_up() {
    let dom = DomainSpec::new("clikill").disk(DiskSpec::raw(512)).create();
    // Pseudo-random data, so the job takes a while.
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 512);
    dom.start();
    let config = dom.dir().join("nasbak.toml");
    let image = dom.dir().join("repo.img");
    std::fs::File::create(&image).unwrap().set_len(2 << 30).unwrap();
    assert!(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).status().unwrap().success());
    ok(&config, &["repo", "add", "kill", "--type", "custom", "--fstype", "ext4", "--address", image.to_str().unwrap()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasbak"))
        .arg("--config")
        .arg(&config)
        .args(["backup", dom.name(), "--quiesce", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as libvirt shows the job running.
    dom.wait_for_backup_job(Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing complete-looking: no backup is listed.
    let list: serde_json::Value = serde_json::from_str(&ok(&config, &["--json", "list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    // The next run aborts the orphaned job, removes the partial directory and succeeds.
    let out = ok(&config, &["--json", "backup", dom.name(), "--quiesce", "off"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let cleaned = v["cleaned"].as_array().unwrap();
    assert!(cleaned.iter().any(|c| c.as_str().unwrap().contains("removed the unfinished backup")), "{cleaned:?}");
    let list: serde_json::Value = serde_json::from_str(&ok(&config, &["--json", "list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], v["id"]);
    // And the repository holds no partial directory and no lock.
    let mnt = dom.dir().join("inspect");
    std::fs::create_dir_all(&mnt).unwrap();
    assert!(Command::new("mount").args(["-o", "ro"]).arg(&image).arg(&mnt).status().unwrap().success());
    let names: Vec<String> = std::fs::read_dir(mnt.join(dom.name()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(!names[0].ends_with(".partial"));
}

fn nasbak_env(config: &Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nasbak"))
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn ids(config: &Path) -> Vec<String> {
    let list = json_of(&ok(config, &["--json", "list"]));
    list.as_array().unwrap().iter().map(|b| b["backup"].as_str().unwrap().to_owned()).collect()
}

/// Every schedule of the configuration file `config` made two hours ago (so that its last
/// occurrence is due).
fn created_two_hours_ago(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let earlier = format!("created = \"{}\"", (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339());
    let text: Vec<String> =
        text.lines().map(|l| if l.starts_with("created = ") { earlier.clone() } else { l.to_owned() }).collect();
    std::fs::write(config, text.join("\n")).unwrap();
}

/// A `shared` repository: a directory nasbak never mounts.
fn shared_repo(config: &Path, dir: &Path) {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    ok(config, &["repo", "add", "lab", "--type", "shared", "--address", repo.to_str().unwrap()]);
}

#[test]
fn completions_and_the_manual_page_come_from_the_command_line_itself() {
    let missing = std::path::Path::new("/nonexistent/nasbak.toml");
    for (shell, says) in [("bash", "_nasbak()"), ("zsh", "#compdef nasbak"), ("fish", "complete -c nasbak")] {
        let out = ok(missing, &["completions", shell]);
        assert!(out.contains(says) && out.contains("run-due") && out.contains("restore-volume"), "{shell}: {out}");
    }
    let page = ok(missing, &["man"]);
    assert!(page.starts_with(".ie") && page.contains(".TH nasbak 1") && page.contains("run\\-due"), "{page}");
    let (code, _, err) = nasbak(missing, &["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bash") && err.contains("zsh"), "{err}");
}

#[test]
fn offerings_prune_schedules_and_run_due() {
    let dom = DomainSpec::new("clisched").disk(DiskSpec::qcow2(16)).create();
    let config = dom.dir().join("nasbak.toml");
    let state = dom.dir().join("state.json");
    let state_env = [("NASBAK_STATE", state.to_str().unwrap())];
    shared_repo(&config, dom.dir());
    ok(&config, &["offering", "add", "gold", "--repo", "lab", "--quiesce", "off", "--keep", "last=2"]);
    // References stay whole: no offering on a missing repository, no removal of a used one.
    let (code, _, err) = nasbak(&config, &["offering", "add", "bad", "--repo", "nowhere"]);
    assert_eq!(code, 4, "{err}");
    let (code, _, err) =
        nasbak(&config, &["schedule", "add", dom.name(), "--every", "daily", "--at", "02:00", "--keep", "1"]);
    assert_eq!(code, 4, "a schedule needs an offering: {err}");
    assert!(err.contains("nasbak assign"), "{err}");
    ok(&config, &["assign", dom.name(), "gold"]);
    let (code, _, err) = nasbak(&config, &["offering", "remove", "gold"]);
    assert_eq!(code, 4, "{err}");
    // Three backups through the offering (no --repo).
    for _ in 0..3 {
        ok(&config, &["backup", dom.name()]);
    }
    let all = ids(&config);
    assert_eq!(all.len(), 3);
    // The dry run says what would go and removes nothing; prune then removes exactly that.
    let plan = json_of(&ok(&config, &["--json", "prune", "--dry-run"]));
    let doomed: Vec<String> = plan[0]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == false)
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(doomed, [all[0].clone()], "keep last=2 of 3 removes the oldest");
    assert_eq!(ids(&config), all);
    ok(&config, &["prune"]);
    assert_eq!(ids(&config), all[1..].to_vec());
    // A schedule that is due: hourly at the last full minute, created two hours ago.
    let minute = (chrono::Utc::now() - chrono::Duration::minutes(1)).format("%M").to_string();
    let out = ok(&config, &["schedule", "add", dom.name(), "--every", "hourly", "--at", &minute, "--keep", "1"]);
    let schedule_id = format!("{}-hourly", dom.name());
    assert!(out.contains(&schedule_id), "{out}");
    let text = std::fs::read_to_string(&config).unwrap();
    let created = text.lines().find(|l| l.starts_with("created = ")).unwrap().to_owned();
    let earlier = format!("created = \"{}\"", (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339());
    std::fs::write(&config, text.replace(&created, &earlier)).unwrap();
    let (code, out, err) = nasbak_env(&config, &state_env, &["--json", "run-due"]);
    assert_eq!(code, 0, "{out}{err}");
    let runs = json_of(&out)["ran"].clone();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(runs[0]["schedule"], schedule_id.as_str());
    let made = runs[0]["outcome"]["succeeded"].as_str().unwrap().to_owned();
    // Prune after the run: keep last=2 of the offering leaves the new one and the newest other.
    let now = ids(&config);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(made.ends_with(&now[1]), "{made} {now:?}");
    let listed = json_of(&ok(&config, &["--json", "list"]));
    assert_eq!(listed[1]["manifest"]["schedule"], schedule_id.as_str());
    // Not due again until the next occurrence; the state shows the run.
    let (code, out, _) = nasbak_env(&config, &state_env, &["run-due"]);
    assert_eq!((code, out.trim()), (0, "nothing is due"));
    let (_, out, _) = nasbak_env(&config, &state_env, &["--json", "schedule", "list"]);
    assert!(json_of(&out)[0]["last_run"].is_string(), "{out}");
    // show reads the manifest, with the schedule that made the backup.
    let shown = json_of(&ok(&config, &["--json", "show", &made]));
    assert_eq!(shown["manifest"]["schedule"], schedule_id.as_str());
    assert_eq!(shown["manifest"]["disks"][0]["checksum"]["algorithm"], "blake3");
    // The repository commands.
    let repos = json_of(&ok(&config, &["--json", "repo", "list"]));
    assert_eq!((repos[0]["name"].as_str(), repos[0]["type"].as_str()), (Some("lab"), Some("shared")));
    assert!(ok(&config, &["repo", "show", "lab"]).contains("type: shared"));
    let stats = json_of(&ok(&config, &["--json", "repo", "stats", "lab"]));
    assert!(stats["total"].as_u64().unwrap() > 0 && stats["available"].as_u64().unwrap() > 0, "{stats}");
    let offerings = json_of(&ok(&config, &["--json", "offering", "list"]));
    assert_eq!(offerings[0]["vms"][0], dom.name());
    // Schedules keep the assignment alive, offerings their repository; removal in order works.
    let (code, _, _) = nasbak(&config, &["unassign", dom.name()]);
    assert_eq!(code, 4);
    let (code, _, err) = nasbak(&config, &["repo", "remove", "lab"]);
    assert_eq!(code, 4, "{err}");
    ok(&config, &["schedule", "remove", &schedule_id]);
    ok(&config, &["unassign", dom.name()]);
    ok(&config, &["offering", "remove", "gold"]);
    ok(&config, &["repo", "remove", "lab"]);
    assert_eq!(json_of(&ok(&config, &["--json", "repo", "list"])), serde_json::json!([]));
    // Its backups were not touched.
    assert_eq!(std::fs::read_dir(dom.dir().join("repo").join(dom.name())).unwrap().count(), 2);
}

#[test]
fn run_due_backs_up_several_vms_at_once_within_the_repositorys_limit() {
    let doms: Vec<_> =
        (0..3).map(|i| DomainSpec::new(&format!("cliparallel{i}")).disk(DiskSpec::raw(96)).create()).collect();
    for d in &doms {
        nasbak_testlab::fill_pseudo_random(&d.disks()[0].path, 96);
    }
    let dir = doms[0].dir();
    let config = dir.join("nasbak.toml");
    let state = dir.join("state.json");
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    // At most two at once on the repository; the host would allow more.
    ok(
        &config,
        &["repo", "add", "lab", "--type", "shared", "--address", repo.to_str().unwrap(), "--max-parallel", "2"],
    );
    assert!(ok(&config, &["repo", "show", "lab"]).contains("max_parallel: 2"));
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("max_parallel = 3\n{text}")).unwrap();
    ok(&config, &["offering", "add", "gold", "--repo", "lab", "--quiesce", "off"]);
    let minute = (chrono::Utc::now() - chrono::Duration::minutes(1)).format("%M").to_string();
    for d in &doms {
        ok(&config, &["assign", d.name(), "gold"]);
        ok(&config, &["schedule", "add", d.name(), "--every", "hourly", "--at", &minute, "--keep", "0"]);
    }
    created_two_hours_ago(&config);
    let (code, out, err) = nasbak_env(&config, &[("NASBAK_STATE", state.to_str().unwrap())], &["--json", "run-due"]);
    assert_eq!(code, 0, "{out}{err}");
    let runs = json_of(&out)["ran"].clone();
    assert_eq!(runs.as_array().unwrap().len(), 3, "{out}");
    assert!(runs.as_array().unwrap().iter().all(|r| r["outcome"]["succeeded"].is_string()), "{out}");
    // From the manifests: two ran at once, never three.
    let listed = json_of(&ok(&config, &["--json", "list"]));
    let spans: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let t = |k: &str| b["manifest"][k].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
            (t("started"), t("finished"))
        })
        .collect();
    assert_eq!(spans.len(), 3);
    let at_once = spans.iter().map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count()).max().unwrap();
    assert_eq!(at_once, 2, "{spans:?}");
}

/// The value of the sample of `metric` for `vm` in a metrics file.
fn sample(text: &str, metric: &str, vm: &str) -> Option<f64> {
    let prefix = format!("{metric}{{vm=\"{vm}\"");
    text.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.rsplit(' ').next()).map(|v| v.parse().unwrap())
}

#[test]
fn status_and_metrics_after_a_missed_schedule_a_success_and_a_failure() {
    let good = DomainSpec::new("clistatus").disk(DiskSpec::qcow2(16)).create();
    let broken = DomainSpec::new("clistatusbad").disk(DiskSpec::qcow2(16)).create();
    let dir = good.dir();
    let config = dir.join("nasbak.toml");
    let state = dir.join("state.json");
    let env = [("NASBAK_STATE", state.to_str().unwrap())];
    shared_repo(&config, dir);
    ok(&config, &["offering", "add", "gold", "--repo", "lab", "--quiesce", "off"]);
    let minute = (chrono::Utc::now() - chrono::Duration::minutes(1)).format("%M").to_string();
    for d in [&good, &broken] {
        ok(&config, &["assign", d.name(), "gold"]);
        ok(&config, &["schedule", "add", d.name(), "--every", "hourly", "--at", &minute, "--keep", "0"]);
    }
    created_two_hours_ago(&config);
    // Missed: the schedules' occurrence an hour ago has passed its grace with no backup.
    let (code, out, err) = nasbak_env(&config, &env, &["--json", "status"]);
    assert_eq!(code, 5, "{out}{err}");
    let report = json_of(&out);
    for vm in report["vms"].as_array().unwrap() {
        assert_eq!(vm["rpo"]["state"], "missed", "{vm}");
        assert!(vm["newest"].is_null() && vm["rpo"]["required_since"].is_string(), "{vm}");
    }
    assert!(report["repositories"][0]["capacity"]["available"].as_u64().unwrap() > 0, "{report}");
    let (_, text, _) = nasbak_env(&config, &env, &["status"]);
    assert!(text.contains(&format!("{}: RPO MISSED, no good backup", good.name())), "{text}");
    // A broken disk: the second VM's backup fails; the first one's succeeds. run-due writes
    // the metrics file the configuration names.
    std::fs::remove_file(&broken.disks()[0].path).unwrap();
    let textfile = dir.join("textfile").join("nasbak.prom");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("metrics_textfile = \"{}\"\n{text}", textfile.display())).unwrap();
    let (code, out, err) = nasbak_env(&config, &env, &["run-due"]);
    assert_eq!(code, 5, "{out}{err}");
    let (code, out, err) = nasbak_env(&config, &env, &["--json", "status"]);
    assert_eq!(code, 5, "the broken VM needs attention: {out}{err}");
    let report = json_of(&out);
    let vm = |name: &str| report["vms"].as_array().unwrap().iter().find(|v| v["vm"] == name).unwrap().clone();
    let (g, b) = (vm(good.name()), vm(broken.name()));
    assert_eq!((g["rpo"]["state"].as_str(), g["chain_length"].as_u64()), (Some("met"), Some(1)), "{g}");
    assert_eq!((g["consecutive_failures"].as_u64(), g["newest"]["mode"].as_str()), (Some(0), Some("full")), "{g}");
    assert!(g["newest"]["bytes_written"].as_u64().unwrap() > 0 && g["newest"]["age_seconds"].as_i64().unwrap() < 600);
    assert_eq!((b["rpo"]["state"].as_str(), b["consecutive_failures"].as_u64()), (Some("missed"), Some(1)), "{b}");
    assert_eq!(b["last_failure"]["schedule"], format!("{}-hourly", broken.name()).as_str());
    assert!(b["last_failure"]["reason"].as_str().unwrap().contains("disk0.qcow2"), "the reason names the file: {b}");
    let (_, text, _) = nasbak_env(&config, &env, &["status"]);
    assert!(text.contains(&format!("{}: RPO met", good.name())), "{text}");
    assert!(text.contains("FAILING (1 run(s) in a row)"), "{text}");
    // The metrics file: promtool reads and lints it; it says what the status says.
    let metrics = std::fs::read_to_string(&textfile).unwrap();
    let lint =
        Command::new("promtool").args(["check", "metrics"]).stdin(std::fs::File::open(&textfile).unwrap()).output();
    let lint = lint.expect("promtool (Debian's prometheus package; the lab installs it)");
    assert!(
        lint.status.success(),
        "{}{}\n{metrics}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert_eq!(sample(&metrics, "nasbak_vm_rpo_met", good.name()), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "nasbak_vm_rpo_met", broken.name()), Some(0.0), "{metrics}");
    assert_eq!(sample(&metrics, "nasbak_vm_failures_total", broken.name()), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "nasbak_vm_failures_total", good.name()), Some(0.0), "{metrics}");
    let made = sample(&metrics, "nasbak_vm_last_success_timestamp_seconds", good.name()).unwrap();
    assert!((chrono::Utc::now().timestamp() as f64 - made).abs() < 600.0, "{made}");
    assert!(metrics.contains("nasbak_repository_available_bytes{repository=\"lab\"}"), "{metrics}");
    // `nasbak metrics` prints the same families; a run-due with nothing due leaves a fresh file.
    let printed = ok(&config, &["metrics"]);
    assert_eq!(printed.lines().filter(|l| l.starts_with("# TYPE")).count(), 18, "{printed}");
    let before = std::fs::metadata(&textfile).unwrap().modified().unwrap();
    let (code, out, _) = nasbak_env(&config, &env, &["run-due"]);
    assert_eq!((code, out.trim()), (0, "nothing is due"));
    assert_eq!(std::fs::metadata(&textfile).unwrap().modified().unwrap(), before);
}

#[test]
fn the_documented_alert_rules_pass_their_tests_and_use_only_metrics_nasbak_writes() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/monitoring");
    let out = Command::new("promtool")
        .args(["test", "rules", "nasbak.rules.test.yml"])
        .current_dir(&docs)
        .output()
        .expect("promtool (Debian's prometheus package; the lab installs it)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let printed = ok(&dir.path().join("c.toml"), &["metrics"]);
    let families: Vec<&str> =
        printed.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let rules = std::fs::read_to_string(docs.join("nasbak.rules.yml")).unwrap();
    let used: std::collections::BTreeSet<&str> =
        rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("nasbak_")).collect();
    assert!(used.len() >= 6, "{used:?}");
    for m in used {
        assert!(families.contains(&m), "the rules use {m}, which nasbak does not write: {families:?}");
    }
}

/// A night of six VMs due at once: four good running ones, one whose disk file is gone, one
/// whose guest agent hangs. The broken one fails with its reason, the hung agent costs its VM
/// the quiesce but not the backup (best-effort) and never pauses it, the others are untouched;
/// every backup made verifies, and the status says which VM needs attention.
#[test]
fn run_due_of_six_vms_with_a_broken_disk_and_a_hung_agent() {
    let hung = DomainSpec::new("nighthung").disk(DiskSpec::qcow2(64).ext4()).agent(true).running(true).create();
    let good: Vec<_> = (0..4)
        .map(|i| DomainSpec::new(&format!("night{i}")).disk(DiskSpec::qcow2(32)).running(true).create())
        .collect();
    let broken = DomainSpec::new("nightbroken").disk(DiskSpec::qcow2(32)).create();
    std::fs::remove_file(&broken.disks()[0].path).unwrap();
    hung.wait_for_agent(Duration::from_secs(120));
    // Stop the agent from inside the guest: guest-exec answers before the kill lands.
    let _ = hung.try_agent_command(
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 1; kill -STOP $(pidof qemu-ga)"]}}"#,
    );
    std::thread::sleep(Duration::from_secs(2));
    let dir = hung.dir();
    let config = dir.join("nasbak.toml");
    let state = dir.join("state.json");
    let env = [("NASBAK_STATE", state.to_str().unwrap())];
    shared_repo(&config, dir);
    ok(&config, &["offering", "add", "gold", "--repo", "lab", "--quiesce", "best-effort"]);
    let minute = (chrono::Utc::now() - chrono::Duration::minutes(1)).format("%M").to_string();
    let all: Vec<&nasbak_testlab::LabDomain> = std::iter::once(&hung).chain(&good).chain([&broken]).collect();
    for d in &all {
        ok(&config, &["assign", d.name(), "gold"]);
        ok(&config, &["schedule", "add", d.name(), "--every", "hourly", "--at", &minute, "--keep", "0"]);
    }
    created_two_hours_ago(&config);
    let (code, out, err) = nasbak_env(&config, &env, &["--json", "run-due"]);
    assert_eq!(code, 5, "a due schedule failed: {out}{err}");
    let runs = json_of(&out)["ran"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 6, "{out}");
    for r in &runs {
        let vm = r["vm"].as_str().unwrap();
        if vm == broken.name() {
            let e = r["outcome"]["failed"].as_str().unwrap_or_else(|| panic!("{r}"));
            assert!(e.contains("disk0.qcow2") && e.contains("No such file"), "{e}");
        } else {
            assert!(r["outcome"]["succeeded"].is_string(), "{vm}: {r}");
        }
    }
    // The hung agent: not quiesced, said why, the guest still running (never left paused).
    let listed = json_of(&ok(&config, &["--json", "list"]));
    let backups = listed.as_array().unwrap();
    assert_eq!(backups.len(), 5, "{listed}");
    let of_hung = backups.iter().find(|b| b["vm"] == hung.name()).unwrap();
    assert_eq!(of_hung["manifest"]["quiesced"], false, "{of_hung}");
    assert!(of_hung["manifest"]["quiesce_note"].as_str().unwrap_or_default().contains("agent"), "{of_hung}");
    assert!(hung.is_running(), "the VM with the hung agent runs");
    assert_eq!(nasbak_testlab::virsh(&["domstate", hung.name()]).unwrap().trim(), "running");
    for b in backups {
        let (code, out, err) = nasbak_env(&config, &env, &["verify", b["id"].as_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
    }
    // The status: the five met, the broken one missed and failing.
    let (code, out, _) = nasbak_env(&config, &env, &["--json", "status"]);
    assert_eq!(code, 5);
    let report = json_of(&out);
    for vm in report["vms"].as_array().unwrap() {
        let (state, failing) = (vm["rpo"]["state"].as_str().unwrap(), vm["consecutive_failures"].as_u64().unwrap());
        if vm["vm"] == broken.name() {
            assert_eq!((state, failing), ("missed", 1), "{vm}");
        } else {
            assert_eq!((state, failing), ("met", 0), "{vm}");
        }
    }
}

#[test]
fn restore_volume_writes_a_new_volume_and_attaches_it_to_a_running_vm() {
    let src = DomainSpec::new("clivolsrc")
        .disk(DiskSpec::qcow2(16))
        .disk(DiskSpec::raw(24).ext4_with_files(&[("data.txt", b"second disk")]))
        .create();
    let running = DomainSpec::new("clivoldst").disk(DiskSpec::qcow2(16)).acpi(true).running(true).create();
    let config = src.dir().join("nasbak.toml");
    shared_repo(&config, src.dir());
    let v = json_of(&ok(&config, &["--json", "backup", src.name()]));
    let id = v["id"].as_str().unwrap().to_owned();
    // An unknown disk names the ones there are.
    let to = running.dir().join("restored.qcow2");
    let to_s = to.to_str().unwrap();
    let (code, _, err) = nasbak(&config, &["restore-volume", &id, "--disk", "vdz", "--to", to_s]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("vda, vdb"), "{err}");
    // qcow2, attached live as the next free target.
    let out =
        ok(&config, &["--json", "restore-volume", &id, "--disk", "vdb", "--to", to_s, "--attach", running.name()]);
    let r = json_of(&out);
    assert_eq!(r["attached"]["target"], "vdb", "{r}");
    let live = nasbak_testlab::virsh(&["dumpxml", running.name()]).unwrap();
    assert!(live.contains(to_s) && live.contains("dev='vdb'"), "{live}");
    let inactive = nasbak_testlab::virsh(&["dumpxml", "--inactive", running.name()]).unwrap();
    assert!(inactive.contains(to_s), "attached to the persistent definition too");
    let same = Command::new("qemu-img").args(["compare", "-U"]).arg(&src.disks()[1].path).arg(&to).status().unwrap();
    assert!(same.success(), "the restored volume has the backed-up content");
    let info = Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&to).output().unwrap();
    let info = json_of(&String::from_utf8_lossy(&info.stdout));
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "self-contained");
    // Never over an existing file; nothing is lost.
    let before = std::fs::read(&to).unwrap();
    let (code, _, err) = nasbak(&config, &["restore-volume", &id, "--disk", "vda", "--to", to_s]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read(&to).unwrap(), before);
    // raw, to a shut-off VM, as the next free target after vdb.
    let raw = src.dir().join("restored.raw");
    let out = ok(
        &config,
        &[
            "restore-volume",
            &id,
            "--disk",
            "vdb",
            "--to",
            raw.to_str().unwrap(),
            "--format",
            "raw",
            "--attach",
            src.name(),
        ],
    );
    assert!(out.contains("attached to") && out.contains("as vdc"), "{out}");
    let cat = Command::new("debugfs").args(["-R", "cat /data.txt"]).arg(&raw).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "second disk");
    // Into an existing block device (a loop device of another lab domain), as raw.
    let blk = DomainSpec::new("clivolblk").disk(DiskSpec::block(24)).create();
    let dev = blk.disks()[0].path.to_str().unwrap().to_owned();
    let out = ok(&config, &["--json", "restore-volume", &id, "--disk", "vdb", "--to", &dev]);
    assert_eq!(json_of(&out)["format"], "raw", "{out}");
    let cat = Command::new("debugfs").args(["-R", "cat /data.txt", &dev]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "second disk");
    let (code, _, err) = nasbak(&config, &["restore-volume", &id, "--disk", "vdb", "--to", "relative.qcow2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("absolute path or rbd:POOL/IMAGE"), "{err}");
}

#[test]
fn a_reference_layout_backup_is_listed_verified_and_restored() {
    let dom = DomainSpec::new("cliref")
        .disk(DiskSpec::qcow2(24).ext4_with_files(&[("ref.txt", b"from the reference")]))
        .disk(DiskSpec::qcow2(16))
        .create();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    // What the reference system writes: <repo>/<vm>/<local time>/root.<volume>.qcow2,
    // datadisk.<volume>.qcow2 and domain-config.xml; no manifest.
    let backup = dom.dir().join("repo").join(dom.name()).join("2026.01.02.03.04.05");
    std::fs::create_dir_all(&backup).unwrap();
    for (i, name) in ["root.disk0.qcow2", "datadisk.disk1.qcow2"].iter().enumerate() {
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&dom.disks()[i].path)
            .arg(backup.join(name))
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::write(backup.join("domain-config.xml"), nasbak_testlab::virsh(&["dumpxml", dom.name()]).unwrap()).unwrap();
    let id = format!("lab:{}/2026.01.02.03.04.05", dom.name());
    let list = json_of(&ok(&config, &["--json", "list"]));
    assert_eq!(list[0]["written_by"], "reference");
    assert_eq!(list[0]["files"].as_array().unwrap().len(), 2);
    assert_eq!(list[0]["files"][0], "root.disk0.qcow2");
    let out = ok(&config, &["verify", &id]);
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 2, "{out}");
    // Mounted read-only, a file copied out with cp, then unmounted without a trace.
    let mnt = dom.dir().join("browse");
    let out = ok(&config, &["mount", &id, mnt.to_str().unwrap(), "--disk", "vda"]);
    assert!(out.contains("whole disk") && out.contains("(ext4, ro,"), "{out}");
    let copy = dom.dir().join("ref.txt");
    assert!(Command::new("cp").arg(mnt.join("vda/fs/ref.txt")).arg(&copy).status().unwrap().success());
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "from the reference");
    let (code, _, err) = nasbak(&config, &["mount", &id, mnt.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already holds a mounted backup"), "{err}");
    let out = ok(&config, &["--json", "umount", mnt.to_str().unwrap()]);
    assert_eq!(json_of(&out)["exports"].as_array().unwrap().len(), 1, "{out}");
    assert!(!mnt.exists());
    let (code, _, err) = nasbak(&config, &["umount", mnt.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    // Damage the root disk, restore, the file is back.
    let disk = &dom.disks()[0].path;
    assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 8M"]).arg(disk).status().unwrap().success());
    let out = ok(&config, &["restore", &id]);
    assert!(out.contains("restored vda") && out.contains("restored vdb"), "{out}");
    let raw = dom.dir().join("check.raw");
    assert!(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(disk).arg(&raw).status().unwrap().success());
    let cat = Command::new("debugfs").args(["-R", "cat /ref.txt"]).arg(&raw).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "from the reference");
    // A damaged reference file is reported by verify (exit 5).
    let f = backup.join("datadisk.disk1.qcow2");
    std::fs::write(&f, b"not a qcow2").unwrap();
    let (code, out, _) = nasbak(&config, &["verify", "--all"]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("BAD") && out.contains("datadisk.disk1.qcow2"), "{out}");
}

#[test]
fn ctrl_c_stops_qemu_img_and_leaves_nothing() {
    let dom = DomainSpec::new("cliint").disk(DiskSpec::qcow2(16)).create();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    // A qemu-img that is slow to convert, so the interrupt lands mid-copy.
    let bin = dom.dir().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = dom.dir().join("convert-started");
    let real =
        String::from_utf8(Command::new("sh").args(["-c", "command -v qemu-img"]).output().unwrap().stdout).unwrap();
    std::fs::write(
        bin.join("qemu-img"),
        format!(
            "#!/bin/sh\nif [ \"$1\" = convert ]; then echo $$ > {}; sleep 60; fi\nexec {} \"$@\"\n",
            marker.display(),
            real.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("qemu-img"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let start = std::time::Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_nasbak"))
        .arg("--config")
        .arg(&config)
        .env("PATH", path)
        .args(["backup", dom.name()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !marker.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "convert never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&marker).unwrap().trim().to_owned();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(20), "cancelled promptly: {:?}", start.elapsed());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "qemu-img ({pid}) was killed");
    let vm_dir = dom.dir().join("repo").join(dom.name());
    let left: Vec<_> = std::fs::read_dir(&vm_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}

/// The catalog commands never touch a VM, so they work while libvirtd does not answer; a damaged
/// backup is listed as damaged, verify says so with exit 6, and delete removes it.
#[test]
fn catalog_commands_work_without_libvirtd_and_show_damaged_backups() {
    let dom = DomainSpec::new("clicatalog").disk(DiskSpec::qcow2(16)).create();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    ok(&config, &["offering", "add", "gold", "--repo", "lab", "--keep", "last=1"]);
    ok(&config, &["assign", dom.name(), "gold"]);
    ok(&config, &["backup", dom.name()]);
    // Independent fulls: the first is damaged below, the second must not build on it.
    ok(&config, &["backup", dom.name(), "--mode", "full"]);
    let all = ids(&config);
    let vm_dir = dom.dir().join("repo").join(dom.name());
    std::fs::write(vm_dir.join(&all[0]).join("manifest.json"), "{ truncated").unwrap();
    // A libvirt URI that cannot answer: as if libvirtd were down.
    let down = ["-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"];
    let (code, _, err) = nasbak(&config, &[&down[..], &["backup", dom.name()][..]].concat());
    assert_eq!(code, 1, "the backup needs libvirt: {err}");
    fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [&["-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"][..], args].concat()
    }
    let listed = json_of(&ok(&config, &with(&["--json", "list"])));
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert!(listed[0]["damaged"].as_str().unwrap().contains("manifest is invalid"), "{listed}");
    assert!(ok(&config, &with(&["list"])).contains("DAMAGED"));
    let damaged_id = format!("lab:{}/{}", dom.name(), all[0]);
    let good_id = format!("lab:{}/{}", dom.name(), all[1]);
    let (code, out, err) = nasbak(&config, &with(&["verify", &damaged_id]));
    assert_eq!(code, 6, "{out}{err}");
    assert!(out.contains("DAMAGED"), "{out}");
    let (code, _, _) = nasbak(&config, &with(&["verify", "--all"]));
    assert_eq!(code, 6);
    assert!(ok(&config, &with(&["verify", &good_id])).starts_with("ok "));
    let (code, _, err) = nasbak(&config, &with(&["show", &damaged_id]));
    assert_eq!(code, 6, "{err}");
    // Prune reports the damaged backup and keeps the only good one.
    let out = ok(&config, &with(&["prune"]));
    assert!(out.contains("DAMAGED") && out.contains("keep"), "{out}");
    assert_eq!(ids(&config), all);
    ok(&config, &with(&["delete", &damaged_id]));
    assert_eq!(ids(&config), [all[1].clone()]);
    assert!(ok(&config, &with(&["repo", "stats", "lab"])).contains("total"));
    // A file that cannot be read is told apart from bad data: exit 7, not 5.
    let file = std::fs::read_dir(vm_dir.join(&all[1]))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .unwrap();
    let data = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let (code, out, _) = nasbak(&config, &with(&["verify", &good_id]));
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("UNREADABLE"), "{out}");
    std::fs::remove_dir(&file).unwrap();
    let mut flipped = data.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    std::fs::write(&file, flipped).unwrap();
    let (code, out, _) = nasbak(&config, &with(&["verify", &good_id]));
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("DIFFERS"), "{out}");
}

/// Ctrl-C while the push job of a running VM runs: exit 130 from `backup`, and `run-due`
/// records the run as cancelled (not failed); no job is left and nothing looks complete.
#[test]
fn ctrl_c_during_a_push_job_is_a_cancel_in_backup_and_in_run_due() {
    let dom = DomainSpec::new("clicancel").disk(DiskSpec::raw(1024)).create();
    nasbak_testlab::fill_pseudo_random(&dom.disks()[0].path, 1024);
    dom.start();
    // A second VM due at the same time: run-due backs both up at once, and Ctrl-C stops both.
    let other = DomainSpec::new("clicancel2").disk(DiskSpec::raw(1024)).create();
    nasbak_testlab::fill_pseudo_random(&other.disks()[0].path, 1024);
    other.start();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    ok(&config, &["offering", "add", "gold", "--repo", "lab", "--quiesce", "off"]);
    let minute = (chrono::Utc::now() - chrono::Duration::minutes(1)).format("%M").to_string();
    for d in [&dom, &other] {
        ok(&config, &["assign", d.name(), "gold"]);
        ok(&config, &["schedule", "add", d.name(), "--every", "hourly", "--at", &minute, "--keep", "1"]);
    }
    created_two_hours_ago(&config);
    let state = dom.dir().join("state.json");
    for args in [vec!["backup", dom.name()], vec!["run-due"]] {
        let child = Command::new(env!("CARGO_BIN_EXE_nasbak"))
            .arg("--config")
            .arg(&config)
            .arg("--state")
            .arg(&state)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The job's first progress line is the moment it runs (polling libvirt for it can miss a
        // job that takes half a second on a loaded machine).
        let mut child = child;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let started = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains(" vda:") => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .unwrap();
        let status = child.wait().unwrap();
        let err = reader.join().unwrap();
        assert!(started, "{args:?}: no progress of its job in 60 s: {err}");
        assert_eq!(status.code(), Some(130), "{args:?}: {err}");
        for d in [&dom, &other] {
            let info = nasbak_testlab::virsh(&["domjobinfo", d.name()]).unwrap();
            assert!(info.contains("None"), "no job is left: {info}");
        }
        assert!(ids(&config).is_empty());
    }
    let (_, out, _) = nasbak(&config, &["--state", state.to_str().unwrap(), "--json", "schedule", "list"]);
    let listed = json_of(&out);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{out}");
    assert!(listed.as_array().unwrap().iter().all(|s| s["last_outcome"] == "cancelled"), "{out}");
}

/// Two data disks with one file name in two directories, and two qcow2 volumes sharing a stem
/// in one directory: every disk is saved in its own file, and a restore gives every disk its
/// own content back (the binary only, so the same test runs against any nasbak).
#[test]
fn disks_whose_names_collide_are_each_saved_and_restored() {
    let contents = ["root disk", "disk in a", "disk in b", "same stem qcow2", "same stem img"];
    let names = ["root.qcow2", "a/data.qcow2", "b/data.qcow2", "disk.qcow2", "disk.img"];
    let dom = names
        .iter()
        .zip(contents)
        .fold(DomainSpec::new("clicollide"), |spec, (name, content)| {
            spec.disk(DiskSpec::qcow2(16).ext4_with_files(&[("f.txt", content.as_bytes())]).named(name))
        })
        .create();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    let out = json_of(&ok(&config, &["--json", "backup", dom.name()]));
    let id = out["id"].as_str().unwrap().to_owned();
    let mut files: Vec<&str> =
        out["manifest"]["disks"].as_array().unwrap().iter().map(|d| d["file"].as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert_eq!(files.len(), 5, "one file per disk: {out}");
    assert!(ok(&config, &["verify", &id]).lines().all(|l| l.starts_with("ok ")));
    for disk in dom.disks() {
        let zeroed = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 8M"]).arg(&disk.path).output();
        assert!(zeroed.unwrap().status.success());
    }
    let (code, out, err) = nasbak(&config, &["restore", &id]);
    assert_eq!(code, 0, "{out}{err}");
    for (disk, want) in dom.disks().iter().zip(contents) {
        assert_eq!(dom.read_ext4_file(&disk.path, "f.txt").as_deref(), Some(want), "{}", disk.target);
    }
}

/// `--mode`: a running VM's second backup is incremental on the first by default, `--mode full`
/// says why it is full, `list` shows the chain, and the parent cannot be deleted first.
#[test]
fn backups_of_a_running_vm_form_a_chain() {
    let dom = DomainSpec::new("clichain").disk(DiskSpec::qcow2(16)).running(true).create();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    let first = json_of(&ok(&config, &["--json", "backup", dom.name()]));
    assert_eq!((first["manifest"]["mode"].as_str(), first["manifest"]["parent"].is_null()), (Some("full"), true));
    let second = json_of(&ok(&config, &["--json", "backup", dom.name()]));
    assert_eq!(second["manifest"]["mode"], "incremental", "{second}");
    assert_eq!(second["manifest"]["parent"], first["manifest"]["id"]);
    let full = ok(&config, &["backup", dom.name(), "--mode", "full"]);
    assert!(full.contains("(full,") && full.contains("full because a full backup was asked for"), "{full}");
    let listed = ok(&config, &["list"]);
    assert!(listed.contains(&format!("incremental on {}", first["manifest"]["id"].as_str().unwrap())), "{listed}");
    let (code, _, err) = nasbak(&config, &["delete", first["id"].as_str().unwrap()]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("build on it"), "{err}");
    let (code, _, err) = nasbak(&config, &["backup", dom.name(), "--mode", "sometimes"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("full, incremental or auto"), "{err}");
    // An incremental on the newest full, then prune keeping the newest only: the plan merges
    // it over the full it builds on, and removes the other three.
    let third = json_of(&ok(&config, &["--json", "backup", dom.name()]));
    assert_eq!(third["manifest"]["mode"], "incremental", "{third}");
    ok(&config, &["offering", "add", "o", "--repo", "lab", "--keep", "last=1"]);
    ok(&config, &["assign", dom.name(), "o"]);
    let plan = ok(&config, &["prune", "--dry-run"]);
    let merge_line = format!("would merge  {}/{}", dom.name(), third["manifest"]["id"].as_str().unwrap());
    assert!(plan.contains(&merge_line), "{plan}");
    assert_eq!(plan.matches("would remove").count(), 3, "{plan}");
    let done = ok(&config, &["prune"]);
    assert!(done.contains("merged  "), "{done}");
    let shown = json_of(&ok(&config, &["--json", "show", third["id"].as_str().unwrap()]));
    assert_eq!((shown["manifest"]["mode"].as_str(), shown["manifest"]["parent"].is_null()), (Some("full"), true));
    assert!(ok(&config, &["verify", third["id"].as_str().unwrap()]).starts_with("ok "));
}

/// Runs nasbak with `args` until it says the VM runs on its backup, then kills it.
fn killed_once_running(config: &std::path::Path, args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasbak"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.contains("runs on its backup"), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `restore --instant`: nasbak killed while the copy runs leaves the VM running and the copy
/// going; `instant list` shows it, `instant finish` (another process) completes it; a detached
/// one is cancelled.
#[test]
fn an_instant_restore_outlives_a_killed_nasbak() {
    let dom = DomainSpec::new("cliinst").disk(DiskSpec::qcow2(64).ext4_with_files(&[("i.txt", b"instant")])).create();
    let config = dom.dir().join("nasbak.toml");
    shared_repo(&config, dom.dir());
    let id = json_of(&ok(&config, &["--json", "backup", dom.name()]))["id"].as_str().unwrap().to_owned();
    let disk = &dom.disks()[0].path;
    assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 8M"]).arg(disk).status().unwrap().success());
    killed_once_running(&config, &["restore", &id, "--instant", "--bandwidth", "8"]);
    assert!(dom.is_running(), "the VM runs on without nasbak");
    let list = ok(&config, &["instant", "list"]);
    assert!(list.contains(dom.name()) && list.contains("vda"), "{list}");
    let done = json_of(&ok(&config, &["--json", "instant", "finish", dom.name()]));
    assert_eq!(done["restored"][0]["location"], disk.to_str().unwrap());
    assert!(!ok(&config, &["instant", "list"]).contains(dom.name()));
    dom.destroy();
    assert_eq!(dom.read_ext4_file(disk, "i.txt").as_deref(), Some("instant"));
    // The default way (the backup copied by nasbak, then the guest's writes mirrored), killed
    // once the VM runs: the VM runs on, `instant finish` copies what is missing and completes.
    assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 0 8M"]).arg(disk).status().unwrap().success());
    killed_once_running(&config, &["restore", &id, "--instant"]);
    assert!(dom.is_running(), "the VM runs on without nasbak");
    let done = json_of(&ok(&config, &["--json", "instant", "finish", dom.name()]));
    assert_eq!(done["restored"][0]["location"], disk.to_str().unwrap());
    dom.destroy();
    assert_eq!(dom.read_ext4_file(disk, "i.txt").as_deref(), Some("instant"));
    let left: Vec<_> = std::fs::read_dir(disk.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("nasbak-restore"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Detached, then cancelled: the VM stopped, its volume marked, a backup refused (exit 4).
    let out = ok(&config, &["restore", &id, "--instant", "--detach", "--bandwidth", "8"]);
    assert!(out.contains("nasbak instant finish"), "{out}");
    let (code, _, err) = nasbak(&config, &["restore", &id, "--instant"]);
    assert_eq!(code, 4, "{err}");
    let out = ok(&config, &["instant", "cancel", dom.name()]);
    assert!(out.contains("partly written"), "{out}");
    assert!(!dom.is_running());
    let (code, _, err) = nasbak(&config, &["backup", dom.name()]);
    assert_eq!(code, 4, "{err}");
    ok(&config, &["restore", &id]);
    ok(&config, &["backup", dom.name()]);
}

#[test]
fn repository_protection_is_set_checked_shown_and_never_silently_ignored() {
    use std::os::unix::fs::PermissionsExt;
    let dom = DomainSpec::new("cliprotect").disk(DiskSpec::qcow2(16)).create();
    let dir = dom.dir();
    let config = dir.join("nasbak.toml");
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let key = dir.join("backup.key");
    std::fs::write(&key, "a-random-passphrase-of-enough-length-0123456789").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let add = |extra: &[&str]| {
        let mut args = vec!["repo", "add", "p", "--type", "shared", "--address", repo.to_str().unwrap()];
        args.extend_from_slice(extra);
        nasbak(&config, &args)
    };
    // A key file others may read is refused, with the fix; nothing is saved.
    let (code, _, err) = add(&["--encrypt", "luks", "--key-file", key.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("mode 0644") && err.contains("chmod 600"), "{err}");
    assert!(!config.exists() || !std::fs::read_to_string(&config).unwrap().contains("[[repository]]"));
    // Encryption without a key, a key without encryption, an unknown compression.
    let (_, _, err) = add(&["--encrypt", "luks"]);
    assert!(err.contains("needs a key") && err.contains("--key-file"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, _, err) = add(&["--key-file", key.to_str().unwrap()]);
    assert!(err.contains("encryption is none"), "{err}");
    let (code, _, err) = add(&["--compress", "gzip"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("zstd or none"), "{err}");
    // Set, shown (where the key is, never what), changed for later backups.
    let (code, out, err) = add(&["--compress", "zstd", "--encrypt", "luks", "--key-file", key.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let shown = ok(&config, &["repo", "show", "p"]);
    assert!(shown.contains("compression: zstd") && shown.contains("encryption: luks"), "{shown}");
    assert!(shown.contains(&format!("key: file:{}", key.display())), "{shown}");
    let json = json_of(&ok(&config, &["--json", "repo", "show", "p"]));
    assert_eq!(json["compression"], "zstd");
    assert_eq!(json["encryption"], "luks");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(!saved.contains("a-random-passphrase") && !shown.contains("a-random-passphrase"));
    ok(&config, &["repo", "set", "p", "--compress", "none"]);
    let shown = ok(&config, &["repo", "show", "p"]);
    assert!(shown.contains("compression: none") && shown.contains("encryption: luks"), "{shown}");
    // A shut-off VM's backup is stored encrypted; verify opens it with the key.
    let made = json_of(&ok(&config, &["--json", "backup", dom.name(), "--repo", "p"]));
    assert_eq!(made["manifest"]["disks"][0]["stored_as"], "encrypted", "{made}");
    let id = made["id"].as_str().unwrap().to_owned();
    let verified = ok(&config, &["verify", &id]);
    assert!(!verified.contains("corrupt") && !verified.contains("differs"), "{verified}");
    // A running VM: its push job writes through an export that stores the file encrypted.
    dom.start();
    let made = json_of(&ok(&config, &["--json", "backup", dom.name(), "--repo", "p"]));
    assert_eq!(made["manifest"]["disks"][0]["stored_as"], "encrypted", "{made}");
    dom.destroy();
    ok(&config, &["repo", "set", "p", "--encrypt", "none"]);
    let shown = ok(&config, &["repo", "show", "p"]);
    assert!(shown.contains("encryption: none") && shown.contains("key: -"), "{shown}");
}
