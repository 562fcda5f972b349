//! Which S3 event records start a job. Keys arrive URL-encoded (`+` for a space, `%xx` for
//! other bytes) and come from outside: they are decoded, then validated before any use.

use aws_lambda_events::s3::S3EventRecord;
use llm_store::registry::{ModelKeys, INCOMING_PREFIX, JOB_FILE};

/// What one event record asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `incoming/<model>/quantize.json` was written: convert that model's checkpoint.
    Job { bucket: String, model: ModelKeys },
    /// Nothing to do: a checkpoint file (the job file comes last), a delete, or a key outside
    /// `incoming/` such as this function's own outputs.
    Ignored { key: String, reason: &'static str },
    /// A malformed or hostile record; logged and never retried.
    Rejected { key: String, reason: String },
}

pub fn classify(record: &S3EventRecord) -> Trigger {
    let raw_key = record.s3.object.key.clone().unwrap_or_default();
    let rejected = |reason: String| Trigger::Rejected { key: raw_key.clone(), reason };
    if !record.event_name.as_deref().unwrap_or_default().starts_with("ObjectCreated:") {
        return Trigger::Ignored { key: raw_key, reason: "not an ObjectCreated event" };
    }
    let Some(bucket) = record.s3.bucket.name.clone().filter(|b| !b.is_empty()) else {
        return rejected("the record names no bucket".into());
    };
    let key = match decode_key(&raw_key).and_then(validate_key) {
        Ok(key) => key,
        Err(reason) => return rejected(reason),
    };
    let Some(rest) = key.strip_prefix(INCOMING_PREFIX) else {
        return Trigger::Ignored { key, reason: "outside incoming/" };
    };
    match rest.split_once('/') {
        Some((model, JOB_FILE)) => match ModelKeys::new(model) {
            Ok(model) => Trigger::Job { bucket, model },
            Err(reason) => rejected(reason),
        },
        _ => Trigger::Ignored { key, reason: "a checkpoint file: the job starts with its quantize.json" },
    }
}

/// Decodes an event key: `+` is a space, `%xx` a byte; the result must be UTF-8.
pub fn decode_key(raw: &str) -> Result<String, String> {
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
fn validate_key(key: String) -> Result<String, String> {
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
        assert_eq!(decode_key("incoming/my+model/a%2Bb%C3%A9").unwrap(), "incoming/my model/a+bé");
        assert!(decode_key("incoming/%zz").is_err());
        assert!(decode_key("incoming/%4").is_err());
        assert!(decode_key("incoming/%FF").is_err());
    }

    #[test]
    fn rejects_traversal_and_control_characters() {
        for key in ["incoming/../models/x", "incoming/m//quantize.json", "incoming/./m", "incoming/m\n/quantize.json"] {
            assert!(validate_key(key.to_string()).is_err(), "{key:?}");
        }
        assert!(validate_key("incoming/m/quantize.json".into()).is_ok());
    }
}
