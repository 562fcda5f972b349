//! The training-submission function: a job spec written to `training/jobs/<name>.json` becomes
//! a job on the AWS Batch GPU queue, running `llm` with the spec's command line.
//!
//! Convention (see README, "Training on AWS Batch"): the spec is
//! `{"command": ["finetune", "--base", "s3://BUCKET/training/…", …, "--output", "s3://BUCKET/…"]}`
//! with optional `gpus`, `vcpus`, `memory_mib` and `timeout_seconds`. What became of it is
//! written to `training/submitted/<name>.json`: `{"job_id", "job_name", "command"}` or
//! `{"error"}`. A spec delivered twice (S3 events are at-least-once) is submitted once: the job
//! name carries the spec's ETag, and a job of that name on the queue is taken as done.
//!
//! [`handle`] is the whole function; `main.rs` only wires it to the Lambda runtime.

mod queue;
pub mod spec;

use aws_lambda_events::s3::S3Event;
use llm_store::{event_key, S3};
use serde::Serialize;

pub use queue::{BatchError, JobQueue};
use spec::{JOBS_PREFIX, MAX_SPEC_BYTES, SUBMITTED_PREFIX};

/// What happened to one spec, returned in the function's response and written beside it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Outcome {
    Submitted { spec: String, job_name: String, job_id: String, command: Vec<String>, duplicate: bool },
    Refused { spec: String, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Store(#[from] llm_store::StoreError),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// Handles one event. Records outside `training/jobs/` and deletes are ignored; a refused
/// spec is answered in S3, not retried; a storage or Batch fault is returned so that Lambda
/// retries the event (specs already submitted are then found, not submitted again).
pub fn handle(s3: &S3, queue: &JobQueue, event: &S3Event) -> Result<Vec<Outcome>, SubmitError> {
    let mut outcomes = Vec::new();
    for record in &event.records {
        let raw_key = record.s3.object.key.as_deref().unwrap_or_default();
        let created = record.event_name.as_deref().is_some_and(|e| e.starts_with("ObjectCreated:"));
        let (Some(bucket), Ok(key)) = (record.s3.bucket.name.as_deref(), event_key(raw_key)) else {
            tracing::warn!(key = %raw_key.escape_debug(), "rejected: no bucket or an invalid key");
            continue;
        };
        if !created || !key.starts_with(JOBS_PREFIX) {
            tracing::debug!(key, "ignored");
            continue;
        }
        let outcome = submit_one(s3, queue, bucket, &key)?;
        let name = key.trim_start_matches(JOBS_PREFIX);
        s3.put_json(bucket, &format!("{SUBMITTED_PREFIX}{name}"), &outcome)?;
        match &outcome {
            Outcome::Submitted { job_id, job_name, duplicate, .. } => tracing::info!(spec = key, job_id, job_name, duplicate, "submitted"),
            Outcome::Refused { error, .. } => tracing::warn!(spec = key, error, "refused"),
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn submit_one(s3: &S3, queue: &JobQueue, bucket: &str, key: &str) -> Result<Outcome, SubmitError> {
    let refused = |error: String| Ok(Outcome::Refused { spec: key.to_string(), error });
    // Deleted before it was read: refused (the answer says so), nothing submitted.
    let Some(info) = s3.head(bucket, key)? else { return refused("the spec no longer exists".into()) };
    if info.size > MAX_SPEC_BYTES {
        return refused(format!("the spec is {} bytes; at most {MAX_SPEC_BYTES} are read", info.size));
    }
    let bytes = s3.read(bucket, &info)?;
    let submission = match spec::submission(bucket, key, &info.etag, &bytes) {
        Ok(submission) => submission,
        Err(error) => return refused(error),
    };
    let (job_id, duplicate) = match queue.find(&submission.job_name)? {
        Some(id) => (id, true),
        None => (queue.submit(&submission)?, false),
    };
    Ok(Outcome::Submitted { spec: key.to_string(), job_name: submission.job_name, job_id, command: submission.command, duplicate })
}
