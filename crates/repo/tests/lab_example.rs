//! `examples/repo_check.rs`, run as an operator would: a loop-mounted ext4 image repository is
//! validated, mounted, written, read back, measured and unmounted.

use std::time::Duration;

use nasbak_process::ExternalCommand;
use nasbak_testlab::example;

#[test]
fn repo_check_mounts_writes_measures_and_unmounts() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("repo.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    ExternalCommand::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).run().unwrap();
    let runtime = dir.path().join("runtime");
    let out = ExternalCommand::new(example("repo_check"))
        .args(["--name", "excheck", "--type", "custom", "--fstype", "ext4", "--address"])
        .arg(&image)
        .arg("--runtime")
        .arg(&runtime)
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = out.stdout_text();
    for line in ["repository excheck (custom) at", "mount -t ext4", "write and read back: ok", "capacity: total"] {
        assert!(text.contains(line), "{line:?} missing: {text}");
    }
    assert!(text.contains("release: Unmounted"), "{text}");
    // Nothing stays mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(runtime.to_str().unwrap()), "left mounted");
}
