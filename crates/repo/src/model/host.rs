//! Host names and IP addresses as they appear in repository addresses.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::error::ParseError;

/// A server: a DNS name, an IPv4 address or an IPv6 address (written `[addr]` in addresses).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS host name such as `nas1.example.org`.
    Name(String),
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address; displayed in brackets.
    V6(Ipv6Addr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

const HOST_EXPECTED: &str =
    "expected a host name (letters, digits, '-', '.'), an IPv4 address or an IPv6 address in brackets";

/// Parses the host at the start of `input[start..]`, ending at the first byte for which `stop`
/// is true (outside brackets). Returns the host and the offset just after it.
pub(crate) fn parse_host(
    what: &'static str,
    input: &str,
    start: usize,
    stop: impl Fn(char) -> bool,
) -> Result<(Host, usize), ParseError> {
    let rest = &input[start..];
    if let Some(inner) = rest.strip_prefix('[') {
        let Some(close) = inner.find(']') else {
            return Err(ParseError::new(what, input, start, "'[' is never closed", HOST_EXPECTED));
        };
        let text = &inner[..close];
        let addr: Ipv6Addr = text.parse().map_err(|_| {
            ParseError::new(what, input, start + 1, format!("{text:?} is not an IPv6 address"), HOST_EXPECTED)
        })?;
        return Ok((Host::V6(addr), start + close + 2));
    }
    let candidate = &rest[..rest.find(['/', ',']).unwrap_or(rest.len())];
    let unbracketed_v6 = candidate.parse::<Ipv6Addr>().is_ok()
        || candidate.match_indices(':').any(|(i, _)| candidate[..i].parse::<Ipv6Addr>().is_ok());
    if unbracketed_v6 {
        return Err(ParseError::new(
            what,
            input,
            start,
            "an IPv6 address must be written in brackets",
            "expected it in brackets, for example [fd00::1]",
        ));
    }
    let end = rest.find(&stop).unwrap_or(rest.len());
    let text = &rest[..end];
    if text.is_empty() {
        return Err(ParseError::new(what, input, start, "the host is missing", HOST_EXPECTED));
    }
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Ok((Host::V4(v4), start + end));
    }
    check_hostname(what, input, start, text)?;
    Ok((Host::Name(text.to_owned()), start + end))
}

fn check_hostname(what: &'static str, input: &str, start: usize, text: &str) -> Result<(), ParseError> {
    if text.len() > 253 {
        return Err(ParseError::new(what, input, start, "the host name is longer than 253 bytes", HOST_EXPECTED));
    }
    let mut offset = start;
    for label in text.split('.') {
        let bad = label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-');
        if bad {
            return Err(ParseError::new(
                what,
                input,
                offset,
                format!("{label:?} is not a valid host name label"),
                HOST_EXPECTED,
            ));
        }
        if let Some((i, c)) = label.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(ParseError::new(
                what,
                input,
                offset + i,
                format!("character {c:?} is not allowed in a host name"),
                HOST_EXPECTED,
            ));
        }
        offset += label.len() + 1;
    }
    Ok(())
}
