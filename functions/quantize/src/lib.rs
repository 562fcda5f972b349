//! The quantization function: S3 `ObjectCreated` events in, versioned GGUF files out.
//!
//! Convention (see README, "Quantization function"): upload a Hugging Face checkpoint under
//! `incoming/<model>/`, then `incoming/<model>/quantize.json` (`{"types": ["q4_k_m", "q8_0"]}`,
//! or empty for the default types). The job file's event starts the conversion; results go to
//! `models/<model>/<version>/` with a manifest, and `models/<model>/latest` names the newest.
//!
//! [`handle`] is the whole function; `main.rs` only wires it to the Lambda runtime, and tests
//! call it directly with real event JSON.

mod config;
mod job;
mod trigger;

use std::time::SystemTime;

use aws_lambda_events::s3::S3Event;
use llm_store::S3;
use serde::Serialize;

pub use config::Config;
pub use job::{Outcome, TransientError};
pub use trigger::{classify, Trigger};

/// What one invocation did, returned as the function's response.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub jobs: Vec<Outcome>,
    pub ignored: Vec<Skipped>,
    pub rejected: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

/// Handles one event. A storage fault in any job is returned as an error, so Lambda retries the
/// event; jobs that already completed are then found done and not redone.
pub fn handle(s3: &S3, config: &Config, event: &S3Event, deadline: Option<SystemTime>) -> Result<Summary, TransientError> {
    let mut summary = Summary::default();
    let mut jobs = Vec::new();
    for record in &event.records {
        match classify(record) {
            Trigger::Job { bucket, model } => {
                if !jobs.contains(&(bucket.clone(), model.clone())) {
                    jobs.push((bucket, model));
                }
            }
            Trigger::Ignored { key, reason } => {
                tracing::debug!(key, reason, "ignored");
                summary.ignored.push(Skipped { key, reason: reason.into() });
            }
            Trigger::Rejected { key, reason } => {
                tracing::warn!(key = %key.escape_debug(), reason, "rejected");
                summary.rejected.push(Skipped { key, reason });
            }
        }
    }
    let mut first_fault = None;
    for (bucket, model) in &jobs {
        match job::run(s3, config, bucket, model, deadline) {
            Ok(outcome) => summary.jobs.push(outcome),
            Err(fault) => first_fault = first_fault.or(Some(fault)),
        }
    }
    match first_fault {
        Some(fault) => Err(fault),
        None => Ok(summary),
    }
}
