//! Replays the fuzz targets' seed corpus (`fuzz/seeds/`) through the same checks the fuzzers run.

use std::fs;
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds").join(target);
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        check(&fs::read(&path).unwrap());
        count += 1;
    }
    assert!(count >= 5, "only {count} seeds in {}", dir.display());
}

#[test]
fn mount_options_seeds() {
    replay("mount_options", nasbak_repo::fuzz_checks::check_mount_options);
}

#[test]
fn address_seeds() {
    replay("address", nasbak_repo::fuzz_checks::check_address);
}

#[test]
fn backup_ref_seeds() {
    replay("backup_ref", nasbak_repo::fuzz_checks::check_backup_ref);
}
