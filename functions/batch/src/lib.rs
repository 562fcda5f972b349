//! The batch inference function: an OpenAI Batch API file written to
//! `batches/input/<name>.jsonl` is answered into `batches/output/<name>.jsonl` (200 answers),
//! `<name>.errors.jsonl` (every other line) and `<name>.status.json` (counts, tokens, timings),
//! by the same code as `llm batch` ([`llm_api::batch_file`]).
//!
//! A file larger than one invocation can finish is answered in chunks of `BATCH_CHUNK_LINES`
//! lines. Each chunk's answers are written as a part object under `batches/state/<name>/`, then
//! the progress object there is updated; when the invocation's time runs short, it writes
//! `batches/continue/<name>.json`, whose S3 event starts the next invocation where this one
//! stopped. Every request is answered exactly once: an invocation that dies after writing a
//! part but before recording it is followed (Lambda retries the event) by one that writes the
//! same part again, and a file already answered (its status names the input's ETag) is not
//! answered again when its event is delivered twice.
//!
//! [`handle`] is the whole function; `main.rs` only wires it to the Lambda runtime.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_lambda_events::s3::S3Event;
use llm_api::batch_file::{self, to_jsonl, OutputLine, RunStats};
use llm_api::AppState;
use llm_store::{event_key, StoreError, S3};
use serde::{Deserialize, Serialize};

pub const INPUT_PREFIX: &str = "batches/input/";
pub const OUTPUT_PREFIX: &str = "batches/output/";
pub const STATE_PREFIX: &str = "batches/state/";
pub const CONTINUE_PREFIX: &str = "batches/continue/";

#[derive(Debug, Clone)]
pub struct Config {
    /// Lines answered per chunk (`BATCH_CHUNK_LINES`): one chunk must fit in one invocation.
    pub chunk_lines: usize,
    /// Largest input file read (`BATCH_MAX_INPUT_MIB`).
    pub max_input_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self { chunk_lines: 64, max_input_bytes: 256 << 20 }
    }
}

impl Config {
    pub fn from_env() -> Result<Self, String> {
        let defaults = Self::default();
        let number = |name: &str, default: u64| -> Result<u64, String> {
            match std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
                Some(v) => v.trim().parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{name}=`{v}` is not a positive whole number")),
                None => Ok(default),
            }
        };
        Ok(Self {
            chunk_lines: number("BATCH_CHUNK_LINES", defaults.chunk_lines as u64)? as usize,
            max_input_bytes: number("BATCH_MAX_INPUT_MIB", defaults.max_input_bytes >> 20)? << 20,
        })
    }
}

/// What an invocation did with one file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub status: Status,
    pub lines_done: usize,
    pub lines: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Completed,
    /// Time ran short: the next invocation continues.
    Continued,
    /// The status object already answers this version of the file.
    AlreadyDone,
    /// The file cannot be answered (missing, too large); the status object says why.
    Failed,
}

/// How far a file has got, kept beside its parts (`batches/state/<name>/progress.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Progress {
    input_etag: String,
    lines_done: usize,
    parts: usize,
    invocations: usize,
    /// Wall time of the invocations so far, up to their last recorded chunk.
    seconds: f64,
    stats: RunStats,
}

/// `batches/output/<name>.status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileStatus {
    pub status: Status,
    pub input_etag: String,
    pub requests: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub invocations: usize,
    /// Wall time of all invocations (reading, generating, writing).
    pub seconds: f64,
    pub stats: RunStats,
    pub error: Option<String>,
}

/// Handles one event: each `batches/input/<name>.jsonl` or `batches/continue/<name>.json`
/// record answers (more of) that file; other records are ignored. A storage fault, or a model
/// that cannot be loaded, is returned so that Lambda retries the event.
pub fn handle(
    s3: &S3,
    engine: &tokio::runtime::Handle,
    state: &Arc<AppState>,
    config: &Config,
    event: &S3Event,
    deadline: Option<SystemTime>,
) -> Result<Vec<Outcome>, String> {
    let mut outcomes = Vec::new();
    for record in &event.records {
        let created = record.event_name.as_deref().is_some_and(|e| e.starts_with("ObjectCreated:"));
        let (Some(bucket), Ok(key)) = (record.s3.bucket.name.as_deref(), event_key(record.s3.object.key.as_deref().unwrap_or_default())) else {
            tracing::warn!("rejected: a record without a bucket or with an invalid key");
            continue;
        };
        let name = key
            .strip_prefix(INPUT_PREFIX)
            .and_then(|k| k.strip_suffix(".jsonl"))
            .or_else(|| key.strip_prefix(CONTINUE_PREFIX).and_then(|k| k.strip_suffix(".json")))
            .filter(|name| created && !name.is_empty() && !name.contains('/'));
        let Some(name) = name else {
            tracing::debug!(key, "ignored");
            continue;
        };
        let job = Job { s3, engine, state, config, bucket, name, deadline };
        let outcome = job.run().map_err(|e| e.to_string())?;
        tracing::info!(name, status = ?outcome.status, outcome.lines_done, outcome.lines, "batch file");
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

struct Job<'a> {
    s3: &'a S3,
    engine: &'a tokio::runtime::Handle,
    state: &'a Arc<AppState>,
    config: &'a Config,
    bucket: &'a str,
    name: &'a str,
    deadline: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the model cannot be loaded: {0}")]
    Model(String),
}

impl Job<'_> {
    fn key(&self, prefix: &str, suffix: &str) -> String {
        format!("{prefix}{}{suffix}", self.name)
    }

    fn part_key(&self, part: usize) -> String {
        self.key(STATE_PREFIX, &format!("/part-{part:06}.jsonl"))
    }

    /// A state or status object; one that does not parse counts as absent, so the file is
    /// answered again from the start rather than never.
    fn read_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        Ok(self.s3.get(self.bucket, key)?.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    fn put_json(&self, key: &str, value: &impl Serialize) -> Result<(), StoreError> {
        self.s3.put_json(self.bucket, key, value)
    }

    fn outcome(&self, status: Status, lines_done: usize, lines: usize) -> Outcome {
        Outcome { name: self.name.to_string(), status, lines_done, lines }
    }

    fn run(&self) -> Result<Outcome, JobError> {
        let input_key = self.key(INPUT_PREFIX, ".jsonl");
        let status_key = self.key(OUTPUT_PREFIX, ".status.json");
        let Some(input) = self.s3.head(self.bucket, &input_key)? else {
            return Ok(self.outcome(Status::Failed, 0, 0));
        };
        if let Some(done) = self.read_json::<FileStatus>(&status_key)? {
            if done.input_etag == input.etag {
                return Ok(self.outcome(Status::AlreadyDone, done.requests, done.requests));
            }
        }
        if input.size > self.config.max_input_bytes {
            let error = format!("the file is {} bytes; at most {} are read (BATCH_MAX_INPUT_MIB)", input.size, self.config.max_input_bytes);
            let status = FileStatus {
                status: Status::Failed,
                input_etag: input.etag,
                requests: 0,
                succeeded: 0,
                failed: 0,
                invocations: 1,
                seconds: 0.0,
                stats: RunStats::default(),
                error: Some(error),
            };
            self.put_json(&status_key, &status)?;
            return Ok(self.outcome(Status::Failed, 0, 0));
        }
        let progress_key = self.key(STATE_PREFIX, "/progress.json");
        let invocation = Instant::now();
        let mut progress = match self.read_json::<Progress>(&progress_key)?.filter(|p| p.input_etag == input.etag) {
            Some(progress) => progress,
            None => {
                // A new file, or a new version of it: nothing of an earlier run's parts is kept.
                for stale in self.s3.list(self.bucket, &self.key(STATE_PREFIX, "/"))? {
                    self.s3.delete(self.bucket, &stale.key)?;
                }
                Progress { input_etag: input.etag.clone(), ..Progress::default() }
            }
        };
        progress.invocations += 1;
        let seconds_before = progress.seconds;
        let bytes = self.s3.read(self.bucket, &input)?;
        let entries = batch_file::parse(&String::from_utf8_lossy(&bytes));

        let mut slowest = Duration::ZERO;
        while progress.lines_done < entries.len() {
            // The first chunk of an invocation always runs; later ones only when they fit.
            let time_left = self.deadline.map(|d| d.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
            if slowest > Duration::ZERO && time_left.is_some_and(|left| left < slowest * 2) {
                self.put_json(&self.key(CONTINUE_PREFIX, ".json"), &progress)?;
                return Ok(self.outcome(Status::Continued, progress.lines_done, entries.len()));
            }
            let started = Instant::now();
            let chunk = &entries[progress.lines_done..entries.len().min(progress.lines_done + self.config.chunk_lines)];
            let answers = self.answer(chunk, &mut progress.stats)?;
            self.s3.put(self.bucket, &self.part_key(progress.parts), to_jsonl(&answers))?;
            progress.parts += 1;
            progress.lines_done += chunk.len();
            progress.seconds = seconds_before + invocation.elapsed().as_secs_f64();
            self.put_json(&progress_key, &progress)?;
            slowest = slowest.max(started.elapsed());
        }
        self.assemble(&progress, &status_key)?;
        for part in 0..progress.parts {
            self.s3.delete(self.bucket, &self.part_key(part))?;
        }
        self.s3.delete(self.bucket, &progress_key)?;
        self.s3.delete(self.bucket, &self.key(CONTINUE_PREFIX, ".json"))?;
        Ok(self.outcome(Status::Completed, entries.len(), entries.len()))
    }

    /// The chunk's answers: requests through the engine, unreadable lines as they are.
    fn answer(&self, chunk: &[Result<batch_file::Line, Box<OutputLine>>], stats: &mut RunStats) -> Result<Vec<OutputLine>, JobError> {
        let mut answers: Vec<OutputLine> = chunk.iter().filter_map(|e| e.as_ref().err().map(|line| OutputLine::clone(line))).collect();
        let lines = chunk.iter().filter_map(|e| e.as_ref().ok().cloned()).collect();
        let (answered, chunk_stats) = self.engine.block_on(batch_file::answer(self.state, lines)).map_err(|e| JobError::Model(e.message))?;
        answers.extend(answered);
        stats.add(&chunk_stats);
        Ok(answers)
    }

    /// The parts, in order, split into the output and errors files, then the status.
    fn assemble(&self, progress: &Progress, status_key: &str) -> Result<(), StoreError> {
        let (mut succeeded, mut failed) = (Vec::new(), Vec::new());
        for part in 0..progress.parts {
            let bytes = self.s3.get(self.bucket, &self.part_key(part))?.unwrap_or_default();
            for line in String::from_utf8_lossy(&bytes).lines() {
                let answer: OutputLine =
                    serde_json::from_str(line).map_err(|e| StoreError::S3 { bucket: self.bucket.into(), key: self.part_key(part), message: e.to_string() })?;
                if answer.succeeded() {
                    succeeded.push(answer)
                } else {
                    failed.push(answer)
                }
            }
        }
        self.s3.put(self.bucket, &self.key(OUTPUT_PREFIX, ".jsonl"), to_jsonl(&succeeded))?;
        self.s3.put(self.bucket, &self.key(OUTPUT_PREFIX, ".errors.jsonl"), to_jsonl(&failed))?;
        let status = FileStatus {
            status: Status::Completed,
            input_etag: progress.input_etag.clone(),
            requests: succeeded.len() + failed.len(),
            succeeded: succeeded.len(),
            failed: failed.len(),
            invocations: progress.invocations,
            seconds: progress.seconds,
            stats: progress.stats.clone(),
            error: None,
        };
        self.put_json(status_key, &status)
    }
}
