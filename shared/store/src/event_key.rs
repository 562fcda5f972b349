//! Object keys as S3 event notifications carry them: URL-encoded (`+` for a space, `%xx` for
//! other bytes) and from outside, so decoded, then validated before any use.

/// The decoded key, or why it cannot be used.
pub fn event_key(raw: &str) -> Result<String, String> {
    decode(raw).and_then(validate)
}

/// Decodes an event key: `+` is a space, `%xx` a byte; the result must be UTF-8.
fn decode(raw: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut input = raw.bytes();
    while let Some(b) = input.next() {
        match b {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = [input.next(), input.next()];
                let value = match hex {
                    [Some(h), Some(l)] => std::str::from_utf8(&[h, l]).ok().and_then(|s| u8::from_str_radix(s, 16).ok()),
                    _ => None,
                };
                bytes.push(value.ok_or_else(|| format!("malformed escape in key `{raw}`"))?);
            }
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).map_err(|_| format!("key `{raw}` is not UTF-8 once decoded"))
}

/// No empty, `.` or `..` segments, no control characters, at most S3's 1024 bytes.
fn validate(key: String) -> Result<String, String> {
    let bad_segment = key.split('/').any(|s| s.is_empty() || s == "." || s == "..");
    if key.len() > 1024 || bad_segment || key.chars().any(char::is_control) {
        return Err(format!("invalid key `{}`", key.escape_debug()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plus_and_percent_escapes() {
        assert_eq!(decode("incoming/my+model/a%2Bb%C3%A9").unwrap(), "incoming/my model/a+bé");
        assert!(decode("incoming/%zz").is_err());
        assert!(decode("incoming/%4").is_err());
        assert!(decode("incoming/%FF").is_err());
    }

    #[test]
    fn rejects_traversal_and_control_characters() {
        for key in ["incoming/../models/x", "incoming/m//quantize.json", "incoming/./m", "incoming/m\n/quantize.json"] {
            assert!(validate(key.to_string()).is_err(), "{key:?}");
        }
        assert!(validate("incoming/m/quantize.json".into()).is_ok());
    }
}
