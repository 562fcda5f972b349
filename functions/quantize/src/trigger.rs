//! Which S3 event records start a job.

use aws_lambda_events::s3::S3EventRecord;
use llm_store::event_key;
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
    let key = match event_key(&raw_key) {
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
