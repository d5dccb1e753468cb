//! Redaction of secrets in text that may be an argv element, a mount option string or an error
//! message: the values of `key=value` items whose key names a secret are replaced by `***`.

/// Option keys whose values are secrets (matched without regard to case).
pub const SECRET_KEYS: &[&str] = &["password", "pass", "password2", "passwd", "secret", "key"];

/// Whether `key` names a secret option.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// A best-effort redaction of a string that may not parse: the value of every item whose key is
/// a secret key is replaced up to the next comma that follows a balanced quote run.
pub fn redact_secrets(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    let mut hiding = false;
    let mut in_quote = false;
    let mut item_start = true;
    let mut key = String::new();
    for c in input.chars() {
        if hiding {
            if c == '"' {
                in_quote = !in_quote;
            }
            if c == ',' && !in_quote {
                hiding = false;
                item_start = true;
                key.clear();
                out.push(c);
            }
            continue;
        }
        if item_start && c == '=' {
            out.push(c);
            if is_secret_key(&key) {
                out.push_str("***");
                hiding = true;
            } else {
                item_start = false;
            }
            continue;
        }
        if c == '"' {
            in_quote = !in_quote;
        }
        if c == ',' && !in_quote {
            item_start = true;
            key.clear();
        } else if item_start {
            key.push(c);
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_hidden_up_to_the_next_unquoted_comma() {
        assert_eq!(redact_secrets("user=a,password=hunter2,vers=3"), "user=a,password=***,vers=3");
        assert_eq!(redact_secrets("PASS=\"a,b\",x"), "PASS=***,x");
        assert_eq!(redact_secrets("plain text, no secret"), "plain text, no secret");
        assert!(is_secret_key("Secret") && !is_secret_key("user"));
    }
}
