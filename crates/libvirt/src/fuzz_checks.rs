//! Invariants of the XML parsers, shared by the fuzz target `domain_xml` and by the test that
//! replays its seeds. Each function panics when an invariant breaks.

use std::path::Path;

use crate::{Domain, PushBackup};

/// Domain XML: parsing never panics; a parsed domain yields a backup selection that accounts
/// for every disk, and the push backup built from it parses back to the same targets.
pub fn check_domain_xml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(domain) = Domain::parse(text) else { return };
    let (chosen, skipped) = domain.backup_selection();
    assert_eq!(chosen.len() + skipped.len(), domain.disks.len());
    let backup = PushBackup::for_domain(&domain, Path::new("/r/x.partial"), |d| format!("{}.qcow2", d.target));
    let back = PushBackup::parse(&backup.to_xml()).expect("our own backup XML parses");
    assert_eq!(back.targets, backup.targets);
    let _ = PushBackup::parse(text);
}
