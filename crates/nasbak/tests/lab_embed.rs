//! `examples/embed.rs`, the reference program for embedders, run against a lab VM: a backup with
//! its own progress printer, a second backup cancelled from another thread, a restore of one
//! disk as a new volume and a verify, all through the facade.

use std::time::Duration;

use nasbak::nasbak_process::ExternalCommand;
use nasbak_testlab::{DiskSpec, DomainSpec, example};

#[test]
fn the_embedding_example_backs_up_cancels_restores_and_verifies() {
    let dom = DomainSpec::new("embed")
        .disk(DiskSpec::qcow2(16).ext4_with_files(&[("known.txt", b"embedded")]))
        .disk(DiskSpec::qcow2(256))
        .create();
    // Data on the second disk, so that the cancelled copy takes a while.
    let disk = &dom.disks()[0];
    ExternalCommand::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 192M"])
        .arg(&dom.disks()[1].path)
        .run()
        .unwrap();
    dom.start();
    let repo = dom.dir().join("repo");
    let restored = dom.dir().join("restored-vda.qcow2");
    let out = ExternalCommand::new(example("embed"))
        .args([dom.name(), repo.to_str().unwrap(), restored.to_str().unwrap()])
        .timeout(Duration::from_secs(300))
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = out.stdout_text();
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("{}", out.stderr_text());
    // The printer saw the job's progress.
    let stderr = out.stderr_text();
    assert!(stderr.contains(&format!("{} job all disks: 100 %", dom.name())), "{stderr}");
    assert!(v["backup"]["id"].as_str().unwrap().starts_with(&format!("embed:{}/", dom.name())), "{v}");
    assert_eq!(v["cancelled"], true);
    assert!(v["cancel_latency_ms"].as_f64().is_some(), "{v}");
    assert_eq!(v["verified"]["files"][0]["status"], "ok", "{v}");
    assert_eq!(v["verified"]["files"][1]["status"], "ok", "{v}");
    assert_eq!(v["restored"]["disk"], "vda");
    // The cancelled backup left nothing: one backup in the VM's directory.
    let entries: Vec<String> = std::fs::read_dir(repo.join(dom.name()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    // The restored volume holds what the disk held at the backup (this VM boots no OS, so its
    // disk has not changed since).
    assert_eq!(dom.read_ext4_file(&restored, "known.txt").as_deref(), Some("embedded"));
    let same = ExternalCommand::new("qemu-img").args(["compare", "-U"]).arg(&disk.path).arg(&restored).run();
    assert!(same.is_ok(), "{same:?}");
}
