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
    ] {
        let out = ok(&config, cmd);
        assert!(out.contains("Usage"), "{cmd:?}: {out}");
    }
    let (code, _, err) = nasbak(&config, &["repo", "add", "x", "--type", "nfs", "--address", "nohost"]);
    assert_eq!(code, 1);
    assert!(err.contains("NFS address") && err.contains("expected host:/export"), "{err}");
    let (code, _, _) = nasbak(&config, &["frobnicate"]);
    assert_eq!(code, 2, "usage errors exit 2");
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
    assert_eq!(v["quiesced"], true);
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
    let list: serde_json::Value = serde_json::from_str(&ok(&config, &["--json", "list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    let (code, _, _) = nasbak(&config, &["delete", &format!("lab:{}/", dom.name())]);
    assert_ne!(code, 0, "a VM directory must never be deleted");
    ok(&config, &["delete", &id]);
    let (code, _, _) = nasbak(&config, &["show", &id]);
    assert_eq!(code, 3, "not found");
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = nasbak_testlab::virsh(&["domjobinfo", dom.name()]).unwrap_or_default();
        if info.contains("Backup") || info.contains("Unbounded") || info.contains("Bounded") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
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
