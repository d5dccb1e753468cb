//! Invariants of the image-location parser, shared by the `image_location` fuzz target in
//! `fuzz/` and by the ordinary test that replays its seeds. Each function panics when an
//! invariant breaks.

use crate::ImageLocation;

/// Image locations: parsing never panics; whatever parses displays to the same text and parses
/// back to the same location; errors point inside the input.
pub fn check_image_location(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match text.parse::<ImageLocation>() {
        Ok(location) => {
            let shown = location.to_string();
            assert_eq!(shown, text, "a location displays as written");
            assert_eq!(shown.parse::<ImageLocation>().as_ref(), Ok(&location));
        }
        Err(e) => assert!(e.position <= text.len(), "position {} outside {text:?}", e.position),
    }
}
