//! Invariants of the parsers, shared by the fuzz targets in `fuzz/` and by the ordinary test
//! that replays their seed corpus. Each function panics when an invariant breaks.

use crate::model::address::Address;
use crate::model::options::MountOptions;

/// Mount options: parsing never panics; whatever parses writes back to a string that parses to
/// the same options, and the redacted form never shows a secret value.
pub fn check_mount_options(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(options) = MountOptions::parse(text) else { return };
    let written = options.to_mount_string();
    assert_eq!(written, text, "options must write back as written");
    assert_eq!(MountOptions::parse(&written).as_ref(), Ok(&options));
    let shown = options.to_string();
    let pieces: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    assert_eq!(shown, pieces.join(","));
    for o in options.iter().filter(|o| o.is_secret()) {
        assert_eq!(o.to_string(), format!("{}=***", o.key()), "a secret option must show as key=***");
    }
}

/// Addresses: the first byte picks the kind; parsing never panics; whatever parses displays to a
/// string that parses to the same address; errors point inside the input.
pub fn check_address(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let parse: fn(&str) -> Result<Address, crate::ParseError> = match kind % 5 {
        0 => Address::parse_nfs,
        1 => Address::parse_cifs,
        2 => Address::parse_ceph,
        3 => Address::parse_shared,
        _ => Address::parse_custom,
    };
    match parse(text) {
        Ok(address) => {
            let shown = address.to_string();
            assert_eq!(parse(&shown).as_ref(), Ok(&address), "{text:?} displayed as {shown:?}");
        }
        Err(e) => assert!(e.position <= text.len(), "position {} outside {text:?}", e.position),
    }
}

/// Backup references: parsing never panics; whatever parses displays to the same text (the
/// forms are canonical) and parses back to the same reference; errors point inside the input.
pub fn check_backup_ref(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match text.parse::<crate::BackupRef>() {
        Ok(r) => {
            let shown = r.to_string();
            assert_eq!(shown, text, "a reference displays as written");
            assert_eq!(shown.parse::<crate::BackupRef>().as_ref(), Ok(&r));
        }
        Err(e) => assert!(e.position <= text.len(), "position {} outside {text:?}", e.position),
    }
}
