//! Property tests of image locations: what parses displays as written and parses back the same;
//! what is neither an absolute path nor `rbd:POOL/IMAGE` is refused with a position inside it.

use nasbak_qemu_img::{ImageLocation, RbdSpec};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-][A-Za-z0-9_. -]{0,12}"
}

proptest! {
    #[test]
    fn paths_round_trip(path in "(/[^\\p{Cc}/]{1,10}){1,4}/?") {
        let location: ImageLocation = path.parse().unwrap();
        prop_assert_eq!(&location, &ImageLocation::Path(path.clone().into()));
        prop_assert_eq!(location.to_string(), path);
    }

    #[test]
    fn rbd_images_round_trip(pool in name(), namespace in proptest::option::of(name()), image in name()) {
        let mut spec = RbdSpec::new(&pool, &image);
        spec.namespace = namespace;
        let location = ImageLocation::Rbd(spec);
        let text = location.to_string();
        prop_assert_eq!(text.parse::<ImageLocation>().unwrap(), location);
    }

    #[test]
    fn anything_else_is_refused_inside_the_input(text in "[^/][^\\x00]{0,20}") {
        prop_assume!(!text.starts_with("rbd:"));
        let e = text.parse::<ImageLocation>().unwrap_err();
        prop_assert!(e.position <= text.len());
        prop_assert!(e.to_string().contains("absolute path or rbd:POOL/IMAGE"));
    }
}

#[test]
fn rbd_forms_and_errors() {
    let l: ImageLocation = "rbd:vms/ns/img".parse().unwrap();
    assert!(
        matches!(&l, ImageLocation::Rbd(s) if s.pool == "vms" && s.namespace.as_deref() == Some("ns") && s.image == "img")
    );
    for (bad, position) in [("rbd:vms", 7), ("rbd:vms/a:id=x", 9), ("rbd:/x", 4), ("rbd:a/b/c/d", 4), ("x.qcow2", 0)] {
        let e = bad.parse::<ImageLocation>().unwrap_err();
        assert_eq!(e.position, position, "{bad}: {e}");
    }
}
