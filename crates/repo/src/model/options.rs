//! Mount options: parsed the way libmount reads them, kept in order, secrets redacted.
//!
//! Grammar (libmount's): options are separated by `,`; an option is `key` or `key=value`; a `"`
//! inside a value opens or closes a quoted run in which `,` does not separate. Quotes are kept as
//! written, so the kernel sees exactly what the admin wrote.

use std::fmt;
use std::str::FromStr;

use super::error::{ParseError, first_control};
use nasbak_process::Secret;

use nasbak_process::redact::redact_secrets as redact_loosely;
pub use nasbak_process::redact::{SECRET_KEYS, is_secret_key};

/// The value of one option, as written (including any quotes).
#[derive(Clone, PartialEq, Eq)]
pub enum OptionValue {
    /// An ordinary value.
    Plain(String),
    /// The value of a secret option; never shown.
    Secret(Secret),
}

impl OptionValue {
    /// The value as written, quotes included. For a secret this exposes it.
    fn raw(&self) -> &str {
        match self {
            OptionValue::Plain(s) => s,
            OptionValue::Secret(s) => s.expose(),
        }
    }

    /// The value with libmount's quotes removed (what the file system receives as the value).
    /// For a secret this exposes it.
    pub fn unquoted(&self) -> String {
        self.raw().replace('"', "")
    }
}

impl fmt::Debug for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Plain(s) => write!(f, "{s:?}"),
            OptionValue::Secret(s) => write!(f, "{s:?}"),
        }
    }
}

/// One mount option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOption {
    key: String,
    value: Option<OptionValue>,
}

impl MountOption {
    /// A flag option (`nobrl`).
    pub fn flag(key: &str) -> Result<Self, ParseError> {
        check_key(key, key, 0)?;
        Ok(MountOption { key: key.to_owned(), value: None })
    }

    /// A `key=value` option. A value holding `,` is quoted; one holding `"` is refused.
    pub fn with_value(key: &str, value: &str) -> Result<Self, ParseError> {
        check_key(key, key, 0)?;
        let shown = if is_secret_key(key) { "***" } else { value };
        if let Some(pos) = value.find('"').or_else(|| first_control(value)) {
            return Err(ParseError::new(
                "mount option value",
                shown,
                pos,
                "a value cannot hold '\"' or control characters",
                "remove it",
            ));
        }
        let raw = if value.contains(',') { format!("\"{value}\"") } else { value.to_owned() };
        Ok(MountOption { value: Some(make_value(key, raw)), key: key.to_owned() })
    }

    /// The option's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The option's value, if it has one.
    pub fn value(&self) -> Option<&OptionValue> {
        self.value.as_ref()
    }

    /// Whether the value is a secret.
    pub fn is_secret(&self) -> bool {
        matches!(self.value, Some(OptionValue::Secret(_)))
    }

    fn write(&self, f: &mut impl fmt::Write, expose: bool) -> fmt::Result {
        f.write_str(&self.key)?;
        match &self.value {
            None => Ok(()),
            Some(OptionValue::Secret(_)) if !expose => f.write_str("=***"),
            Some(v) => write!(f, "={}", v.raw()),
        }
    }
}

impl fmt::Display for MountOption {
    /// Writes `key` or `key=value` as written, with a secret value shown as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

fn make_value(key: &str, raw: String) -> OptionValue {
    if is_secret_key(key) { OptionValue::Secret(Secret::new(raw)) } else { OptionValue::Plain(raw) }
}

const EXPECTED: &str = "expected comma-separated key or key=value items; quote a value holding ',' with \"";

fn check_key(input: &str, key: &str, at: usize) -> Result<(), ParseError> {
    if key.is_empty() {
        return Err(ParseError::new(
            "mount options",
            input,
            at,
            "an option is empty (two commas, or a comma at an end)",
            EXPECTED,
        ));
    }
    if let Some((i, c)) =
        key.char_indices().find(|&(_, c)| c.is_control() || c.is_whitespace() || c == '"' || c == '=' || c == ',')
    {
        return Err(ParseError::new(
            "mount options",
            input,
            at + i,
            format!("character {c:?} is not allowed in an option name"),
            EXPECTED,
        ));
    }
    Ok(())
}

/// Mount options in the order written.
///
/// `Display` writes them back as parsed, with secret values shown as `***`;
/// [`MountOptions::to_mount_string`] is the form with secrets, for where they must go.
///
/// ```
/// use nasbak_repo::MountOptions;
/// let o: MountOptions = r#"vers=3.1.1,password="s3,cr",context="a,b",nobrl"#.parse().unwrap();
/// assert_eq!(o.to_string(), r#"vers=3.1.1,password=***,context="a,b",nobrl"#);
/// assert_eq!(o.get("context").unwrap().unquoted(), "a,b");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions(Vec<MountOption>);

impl MountOptions {
    /// No options.
    pub fn new() -> Self {
        MountOptions::default()
    }

    /// Parses `input`; an empty string is no options.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let mut options = Vec::new();
        if input.is_empty() {
            return Ok(MountOptions(options));
        }
        let redacted = redact_loosely(input);
        if let Some(pos) = first_control(input) {
            return Err(ParseError::new(
                "mount options",
                &redacted,
                pos,
                "a control character is not allowed",
                EXPECTED,
            ));
        }
        let bytes = input.as_bytes();
        let mut start = 0;
        let mut in_quote: Option<usize> = None;
        let mut i = 0;
        while i <= bytes.len() {
            let end_of_item = i == bytes.len() || (bytes[i] == b',' && in_quote.is_none());
            if i < bytes.len() && bytes[i] == b'"' {
                in_quote = if in_quote.is_some() { None } else { Some(i) };
            }
            if end_of_item {
                if let Some(q) = in_quote {
                    return Err(ParseError::new("mount options", &redacted, q, "this '\"' is never closed", EXPECTED));
                }
                let item = &input[start..i];
                let (key, value) = match item.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (item, None),
                };
                check_key(&redacted, key, start)?;
                options.push(MountOption { key: key.to_owned(), value: value.map(|v| make_value(key, v.to_owned())) });
                start = i + 1;
            }
            i += 1;
        }
        Ok(MountOptions(options))
    }

    /// The options, in order.
    pub fn iter(&self) -> impl Iterator<Item = &MountOption> {
        self.0.iter()
    }

    /// Whether there are no options.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an option with this key (any case) is present.
    pub fn contains(&self, key: &str) -> bool {
        self.0.iter().any(|o| o.key.eq_ignore_ascii_case(key))
    }

    /// The value of the first option with this key (any case).
    pub fn get(&self, key: &str) -> Option<&OptionValue> {
        self.0.iter().find(|o| o.key.eq_ignore_ascii_case(key)).and_then(|o| o.value.as_ref())
    }

    /// Appends an option.
    pub fn push(&mut self, option: MountOption) {
        self.0.push(option);
    }

    /// Removes and returns every option with this key (any case).
    pub fn take(&mut self, key: &str) -> Vec<MountOption> {
        let (taken, kept) = std::mem::take(&mut self.0).into_iter().partition(|o| o.key.eq_ignore_ascii_case(key));
        self.0 = kept;
        taken
    }

    /// Whether any option carries a secret.
    pub fn has_secrets(&self) -> bool {
        self.0.iter().any(MountOption::is_secret)
    }

    /// The options as mount(8) takes them after `-o`, secrets included. Never log this.
    pub fn to_mount_string(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, true).expect("writing to a String cannot fail");
        s
    }

    fn write(&self, f: &mut impl fmt::Write, expose: bool) -> fmt::Result {
        for (i, o) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            o.write(f, expose)?;
        }
        Ok(())
    }
}

impl fmt::Display for MountOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

impl FromStr for MountOptions {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        MountOptions::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(input: &str) {
        let o = MountOptions::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(o.to_mount_string(), input);
    }

    fn error_at(input: &str, position: usize, problem: &str) {
        let e = MountOptions::parse(input).expect_err(input);
        assert_eq!(e.position, position, "{input:?}: {e}");
        assert!(e.problem.contains(problem), "{input:?}: {e}");
    }

    #[test]
    fn parses_in_order_with_quotes() {
        round_trip("vers=4.2,soft,timeo=100");
        round_trip(r#"context="system_u:object_r:nfs_t:s0:c1,c2",ro"#);
        round_trip(r#"a="x,"y,b"#);
        round_trip("");
        let o = MountOptions::parse(r#"x=1,context="a,b",nobrl"#).unwrap();
        let keys: Vec<_> = o.iter().map(|o| o.key()).collect();
        assert_eq!(keys, ["x", "context", "nobrl"]);
        assert_eq!(o.get("CONTEXT").unwrap().unquoted(), "a,b");
    }

    #[test]
    fn errors_carry_positions() {
        error_at("a,,b", 2, "empty");
        error_at(",a", 0, "empty");
        error_at("a,", 2, "empty");
        error_at(r#"a="x,b"#, 2, "never closed");
        error_at("a b", 1, "' '");
        error_at("=x", 0, "empty");
    }

    #[test]
    fn secrets_are_redacted_everywhere_but_the_mount_string() {
        let o = MountOptions::parse(r#"username=u,password="p,w",secret=K"#).unwrap();
        assert_eq!(o.to_string(), "username=u,password=***,secret=***");
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("p,w") && !dbg.contains('K'), "{dbg}");
        assert_eq!(o.to_mount_string(), r#"username=u,password="p,w",secret=K"#);
        let e = MountOptions::parse(r#"password=topsecret,,"#).unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
        let e = MountOptions::parse(r#"pass="top,secret"#).unwrap_err();
        assert!(!e.to_string().contains("top"), "{e}");
    }

    #[test]
    fn built_options_quote_commas() {
        let o = MountOption::with_value("context", "a,b").unwrap();
        let mut all = MountOptions::new();
        all.push(o);
        assert_eq!(all.to_mount_string(), r#"context="a,b""#);
        assert!(MountOption::with_value("x", "a\"b").is_err());
    }
}
