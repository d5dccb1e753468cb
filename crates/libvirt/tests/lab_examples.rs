//! The reference programs in `examples/`, run as an operator would, against lab domains.

use std::path::PathBuf;
use std::time::Duration;

use nasbak_process::ExternalCommand;
use nasbak_testlab::{DiskSpec, DomainSpec, example};

fn last_json_line(program: &str, args: &[&str]) -> serde_json::Value {
    let out = ExternalCommand::new(example(program))
        .args(args)
        .timeout(Duration::from_secs(300))
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = out.stdout_text();
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{program}: last line {last:?}: {e}"))
}

fn check_disks(v: &serde_json::Value, targets: &[&str]) {
    let disks = v["disks"].as_array().unwrap();
    let got: Vec<&str> = disks.iter().map(|d| d["target"].as_str().unwrap()).collect();
    assert_eq!(got, targets);
    for d in disks {
        assert_eq!(d["format"], "qcow2");
        assert!(d["virtual_size"].as_u64().unwrap() > 0);
        assert!(PathBuf::from(d["file"].as_str().unwrap()).is_file());
        assert!(!d["source"].as_str().unwrap().is_empty());
    }
}

#[test]
fn backup_running_and_backup_stopped_print_their_json_line() {
    let dom = DomainSpec::new("examples")
        .disk(DiskSpec::qcow2(32).ext4())
        .disk(DiskSpec::raw(8))
        .disk(DiskSpec::cdrom())
        .agent(true)
        .running(true)
        .create();
    dom.wait_for_agent(Duration::from_secs(90));
    let out = dom.dir().join("running");
    let v = last_json_line("backup_running", &[dom.name(), out.to_str().unwrap(), "--quiesce", "required"]);
    assert_eq!(v["domain"], dom.name());
    assert_eq!(v["quiesced"], true);
    check_disks(&v, &["vda", "vdb"]);
    dom.destroy();
    let out = dom.dir().join("stopped");
    let v = last_json_line("backup_stopped", &[dom.name(), out.to_str().unwrap()]);
    assert_eq!(v["quiesced"], false);
    check_disks(&v, &["vda", "vdb"]);
}
