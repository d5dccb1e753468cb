//! Replays the `image_location` fuzz target's seeds (`fuzz/seeds/image_location/`) through its
//! checks.

use std::fs;
use std::path::Path;

#[test]
fn image_location_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/image_location");
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        nasbak_qemu_img::fuzz_checks::check_image_location(&fs::read(entry.unwrap().path()).unwrap());
        count += 1;
    }
    assert!(count >= 5, "only {count} seeds in {}", dir.display());
}
