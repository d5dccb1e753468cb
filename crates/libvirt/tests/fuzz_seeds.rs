//! Replays the `domain_xml` fuzz target's seeds (`fuzz/seeds/domain_xml/`) through its checks.

use std::fs;
use std::path::Path;

#[test]
fn domain_xml_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/domain_xml");
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        nasbak_libvirt::fuzz_checks::check_domain_xml(&fs::read(entry.unwrap().path()).unwrap());
        count += 1;
    }
    assert!(count >= 5, "only {count} seeds in {}", dir.display());
}
