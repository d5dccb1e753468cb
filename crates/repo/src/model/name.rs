//! Validated names that become single path components: repository, VM and volume names.

use std::fmt;
use std::str::FromStr;

use super::error::{ParseError, first_control};

/// Checks that `s` is safe as one path component: non-empty, at most 200 bytes, not `.` or `..`,
/// no `/`, no control characters, not starting with `-` (so it can never be read as an option)
/// and only characters from `extra` beyond ASCII letters and digits.
fn check_component(what: &'static str, s: &str, extra: &str) -> Result<(), ParseError> {
    let expected = format!("use 1 to 200 of the characters A-Z a-z 0-9 and {extra:?}, not starting with '-' or '.'");
    let err = |pos: usize, problem: &str| ParseError::new(what, s, pos, problem, expected.clone());
    if s.is_empty() {
        return Err(err(0, "it is empty"));
    }
    if s.len() > 200 {
        return Err(err(200, "it is longer than 200 bytes"));
    }
    if let Some(pos) = first_control(s) {
        return Err(err(pos, "it holds a control character"));
    }
    if s.starts_with('-') || s.starts_with('.') {
        return Err(err(0, "it starts with '-' or '.'"));
    }
    if let Some((pos, c)) = s.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || extra.contains(c))) {
        let problem = if c == '/' {
            "'/' would leave its directory".to_owned()
        } else {
            format!("character {c:?} is not allowed")
        };
        return Err(err(pos, &problem));
    }
    Ok(())
}

macro_rules! component_name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $extra:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `s`.
            pub fn new(s: &str) -> Result<Self, ParseError> {
                check_component($what, s, $extra)?;
                Ok($name(s.to_owned()))
            }

            /// The name as a string; always a single safe path component.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                $name::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

component_name!(
    /// The name of a backup repository; also the name of its mount point directory.
    RepositoryName,
    "repository name",
    "-_."
);

component_name!(
    /// The name of a VM (a libvirt domain name) as it appears on the repository.
    VmName,
    "VM name",
    "-_.+@"
);

component_name!(
    /// The identity of one volume inside a backup file name (`root.<volume>.qcow2`).
    VolumeName,
    "volume name",
    "-_.+@"
);

component_name!(
    /// The name of an off-site target (an S3 bucket and prefix backups are copied to).
    TargetName,
    "target name",
    "-_."
);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, ok: bool) {
        assert_eq!(RepositoryName::new(input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn repository_names() {
        for good in ["nas1", "nfs-main", "a.b_c", "X9"] {
            check(good, true);
        }
        for bad in ["", ".", "..", "a/b", "-x", ".hidden", "a b", "a\nb", &"x".repeat(201)] {
            check(bad, false);
        }
    }

    #[test]
    fn error_names_position_and_rule() {
        let e = VmName::new("web/../etc").unwrap_err();
        assert_eq!(e.position, 3);
        assert!(e.to_string().contains("'/' would leave its directory"), "{e}");
        assert!(e.to_string().contains("VM name"), "{e}");
    }
}
