//! OpenAI Batch API files: one request per line, `{"custom_id", "method": "POST", "url":
//! "/v1/chat/completions" | "/v1/completions", "body"}`, answered as the same requests over HTTP
//! would be (the same checks and response bodies, see [`crate::prepare`]), with the sequences of
//! many lines generated together in the engine's batch. A bad line is answered with the reason
//! and never stops the rest; every `custom_id` is answered once.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use llm_engine::LoadedModel;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batch::{usage, Meta};
use crate::engine::Submitted;
use crate::error::ApiError;
use crate::openai::{ChatRequest, CompletionRequest};
use crate::prepare::{check_chat, check_completion, Checked, Prepared};
use crate::router::{check_model, unique_suffix, AppState};

const CHAT_URL: &str = "/v1/chat/completions";
const COMPLETIONS_URL: &str = "/v1/completions";

/// One request of the file.
#[derive(Debug, Clone)]
pub struct Line {
    /// 1-based, as editors count.
    pub number: usize,
    pub custom_id: String,
    chat: bool,
    body: Value,
    bytes: usize,
}

/// One answer, in OpenAI's batch output format: `response` with the status and body an HTTP
/// request would have got, or `error` when the line is not a request at all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputLine {
    pub id: String,
    pub custom_id: Option<String>,
    pub response: Option<LineResponse>,
    pub error: Option<LineError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineResponse {
    pub status_code: u16,
    pub request_id: String,
    pub body: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub line: usize,
}

impl OutputLine {
    fn new(custom_id: Option<String>, response: Option<LineResponse>, error: Option<LineError>) -> Self {
        Self { id: format!("batch_req_{}", unique_suffix()), custom_id, response, error }
    }

    fn answered(custom_id: String, status_code: u16, body: Value) -> Self {
        Self::new(Some(custom_id), Some(LineResponse { status_code, request_id: unique_suffix(), body }), None)
    }

    fn failed(custom_id: String, error: &ApiError) -> Self {
        Self::answered(custom_id, error.status.as_u16(), error.body())
    }

    /// Boxed: it takes a request line's place in [`parse`]'s list, and is larger than one.
    fn unreadable(number: usize, custom_id: Option<String>, code: &str, message: String) -> Box<Self> {
        Box::new(Self::new(custom_id, None, Some(LineError { code: code.into(), message, line: number })))
    }

    /// A 200 answer (the output file); anything else goes to the errors file.
    pub fn succeeded(&self) -> bool {
        self.response.as_ref().is_some_and(|r| r.status_code == 200)
    }
}

/// The file's lines in order, blank ones skipped: each a request, or the error line that
/// answers it (not JSON, no `custom_id`, a repeated `custom_id`, another method or URL).
pub fn parse(text: &str) -> Vec<Result<Line, Box<OutputLine>>> {
    let mut seen = HashSet::new();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line = parse_line(i + 1, l)?;
            if !seen.insert(line.custom_id.clone()) {
                let message = format!("`custom_id` `{}` is used by an earlier line; each must be unique.", line.custom_id);
                return Err(OutputLine::unreadable(line.number, Some(line.custom_id), "duplicate_custom_id", message));
            }
            Ok(line)
        })
        .collect()
}

fn parse_line(number: usize, text: &str) -> Result<Line, Box<OutputLine>> {
    let value: Value = serde_json::from_str(text).map_err(|e| OutputLine::unreadable(number, None, "invalid_json", format!("The line is not JSON: {e}.")))?;
    let custom_id = match value.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => return Err(OutputLine::unreadable(number, None, "missing_custom_id", "The line has no `custom_id` string.".into())),
    };
    let fail = |code: &str, message: String| Err(OutputLine::unreadable(number, Some(custom_id.clone()), code, message));
    if value.get("method").and_then(Value::as_str) != Some("POST") {
        return fail("invalid_method", "`method` must be `POST`.".into());
    }
    let chat = match value.get("url").and_then(Value::as_str) {
        Some(CHAT_URL) => true,
        Some(COMPLETIONS_URL) => false,
        other => return fail("invalid_url", format!("`url` {other:?} is not supported: use {CHAT_URL} or {COMPLETIONS_URL}.")),
    };
    match value.get("body") {
        Some(body @ Value::Object(_)) => Ok(Line { number, custom_id, chat, body: body.clone(), bytes: text.len() }),
        _ => fail("missing_body", "The line has no `body` object.".into()),
    }
}

/// What a run did, for the status object and the throughput comparison. Read back from the
/// batch function's progress and status objects, which earlier builds wrote with other fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunStats {
    /// The most sequences that generated together in one decode step.
    pub largest_batch: usize,
    pub sequences: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Time spent generating, from the first request's queueing to the last one's end.
    pub generate_seconds: f64,
}

impl RunStats {
    /// Adds another run's counts and times (a file answered in chunks).
    pub fn add(&mut self, other: &RunStats) {
        self.largest_batch = self.largest_batch.max(other.largest_batch);
        self.sequences += other.sequences;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.generate_seconds += other.generate_seconds;
    }
}

/// Answer lines as a JSONL file.
pub fn to_jsonl<'a>(lines: impl IntoIterator<Item = &'a OutputLine>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in lines {
        if serde_json::to_writer(&mut bytes, line).is_ok() {
            bytes.push(b'\n');
        }
    }
    bytes
}

/// Answers `lines` in order. Every request is a job of the engine's batch (see
/// [`crate::Limits::max_batch_sequences`]), all queued at once in the order of their prompts'
/// tokens: those that fit start together, prompts that start alike next to each other (one
/// system prompt runs once), and the next join as sequences end, so the batch stays full when
/// completions end at different lengths. Fails only when the model cannot be loaded: every
/// line would fail alike, so the run should be retried instead.
pub async fn answer(state: &Arc<AppState>, lines: Vec<Line>) -> Result<(Vec<OutputLine>, RunStats), ApiError> {
    let (model, _) = state.slot.get().await?;
    let mut answers: Vec<Option<OutputLine>> = vec![None; lines.len()];
    let mut ready = Vec::new();
    for (position, line) in lines.into_iter().enumerate() {
        match prepare(state, &model, &line).await {
            Ok(request) => ready.push((position, line.custom_id, request)),
            Err(error) => answers[position] = Some(OutputLine::failed(line.custom_id, &error)),
        }
    }
    ready.sort_by(|(_, _, a), (_, _, b)| a.prompts.cmp(&b.prompts));
    let jobs = ready
        .iter()
        .map(|(_, _, r)| Submitted {
            requests: r.generation.requests(&r.prompts),
            cache_prompt: r.generation.cache_prompt,
            stop_at: None,
            on_token: Box::new(|_| ControlFlow::Continue(())),
        })
        .collect();
    let started = Instant::now();
    let results = state.engine.generate_each(&model, jobs).await;
    let mut stats = RunStats { generate_seconds: started.elapsed().as_secs_f64(), ..RunStats::default() };
    let results = match results {
        Ok(results) => results,
        Err(error) => ready.iter().map(|_| Err(error.clone())).collect(),
    };
    for ((position, custom_id, request), result) in ready.into_iter().zip(results) {
        answers[position] = Some(match result {
            Ok((completions, generated)) => {
                let usage = usage(&request.prompts, &completions);
                stats.largest_batch = stats.largest_batch.max(generated.batch_rows);
                stats.sequences += completions.len();
                stats.prompt_tokens += usage.prompt_tokens;
                stats.completion_tokens += usage.completion_tokens;
                let body = request.response(Meta::new(request.kind, &state.slot.id), &model, &completions, usage);
                OutputLine::answered(custom_id, 200, serde_json::to_value(body).unwrap_or_default())
            }
            Err(error) => {
                tracing::warn!(custom_id, message = %error.message, "request failed");
                OutputLine::failed(custom_id, &error)
            }
        });
    }
    Ok((answers.into_iter().flatten().collect(), stats))
}

/// The line's request, checked and encoded as the HTTP handlers do; streaming has no meaning
/// in a file.
async fn prepare(state: &AppState, model: &Arc<LoadedModel>, line: &Line) -> Result<Prepared, ApiError> {
    if line.bytes > state.limits.max_body_bytes {
        return Err(ApiError::too_large(state.limits.max_body_bytes));
    }
    let invalid = |e: serde_json::Error| ApiError::bad_body(format!("Invalid JSON body: {e}"));
    let checked: Checked = if line.chat {
        let body: ChatRequest = serde_json::from_value(line.body.clone()).map_err(invalid)?;
        check_model(state, &body.model)?;
        check_chat(body, &state.limits)?
    } else {
        let body: CompletionRequest = serde_json::from_value(line.body.clone()).map_err(invalid)?;
        check_model(state, &body.model)?;
        check_completion(body, &state.limits)?
    };
    if checked.stream() {
        return Err(ApiError::invalid("stream", "`stream` is not supported in a batch file."));
    }
    checked.prepare(state, model).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A progress or status object that a build before `largest_batch` wrote (the batch
    /// function reads them back on its next invocation, maybe after a deploy) still reads.
    #[test]
    fn stats_written_by_an_earlier_build_still_read() {
        let old = r#"{"engine_batches": 2, "sequences": 3, "prompt_tokens": 40, "completion_tokens": 12, "generate_seconds": 1.5}"#;
        let stats: RunStats = serde_json::from_str(old).unwrap();
        assert_eq!(stats, RunStats { largest_batch: 0, sequences: 3, prompt_tokens: 40, completion_tokens: 12, generate_seconds: 1.5 });
    }
}
