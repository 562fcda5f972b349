//! Running one request: validated prompts and settings to engine requests, generation in the
//! engine's batch (stopping near the deadline), and the request's log line and metrics. Answers
//! as JSON, or hands over to [`crate::stream`].

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use axum::Json;
use llm_engine::{Completion, FinishReason, Generated, GenerationRequest, GenerationStats, LoadedModel, TokenEvent};
use llm_observe::{Metrics, Unit};

use crate::error::ApiError;
use crate::model_slot::LoadReport;
use crate::openai::{CompletionLogprobs, Usage};
use crate::prepare::Prepared;
use crate::router::{unique_suffix, AppState, Deadline};
use crate::stream::{stream_response, ChunkKind};

/// What every response of one request shares.
#[derive(Clone)]
pub(crate) struct Meta {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
}

impl Meta {
    pub(crate) fn new(kind: ChunkKind, model: &str) -> Self {
        let prefix = match kind {
            ChunkKind::Chat => "chatcmpl",
            ChunkKind::Text => "cmpl",
        };
        let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Self { id: format!("{prefix}-{}", unique_suffix()), created, model: model.into() }
    }
}

pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub(crate) fn usage(prompts: &[Vec<u32>], completions: &[Completion]) -> Usage {
    Usage::new(prompts.iter().map(Vec::len).sum(), completions.iter().map(|c| c.token_ids.len()).sum())
}

/// `echo`: each prompt's text (and with `logprobs`, its tokens' lists) goes before the
/// completions of its choices.
pub(crate) struct Echo {
    pub(crate) texts: Vec<String>,
    pub(crate) logprobs: Vec<Option<CompletionLogprobs>>,
}

/// One request's sequences, ready to run.
pub(crate) struct Batch {
    pub(crate) state: Arc<AppState>,
    pub(crate) model: Arc<LoadedModel>,
    pub(crate) load: LoadReport,
    pub(crate) deadline: Option<Deadline>,
    pub(crate) request: Prepared,
}

impl Batch {
    /// When generation must stop to answer before the deadline.
    fn stop_at(&self) -> Option<Instant> {
        self.deadline.map(|d| d.0.checked_sub(self.state.limits.deadline_margin).unwrap_or(d.0))
    }
}

/// Streams the batch as server-sent events, or runs it to the end and answers with JSON.
pub(crate) async fn answer(batch: Batch) -> Result<Response, ApiError> {
    let request = &batch.request;
    let meta = Meta::new(request.kind, &batch.state.slot.id);
    let requests = request.generation.requests(&request.prompts);
    if request.generation.stream {
        let include_usage = request.generation.include_usage;
        return Ok(stream_response(batch, requests, include_usage, meta));
    }
    let (completions, stats) = run_batch(&batch, requests, |_| ControlFlow::Continue(())).await?;
    let usage = usage(&request.prompts, &completions);
    record(&batch, &stats, usage, &completions);
    Ok(Json(request.response(meta, &batch.model, &completions, usage)).into_response())
}

/// Runs one request's sequences in the engine's batch (see [`crate::engine`]), stopping near
/// its deadline.
pub(crate) async fn run_batch(
    batch: &Batch,
    requests: Vec<GenerationRequest>,
    on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()> + Send + 'static,
) -> Result<Generated, ApiError> {
    batch.state.engine.generate(&batch.model, requests, batch.request.generation.cache_prompt, batch.stop_at(), on_token).await
}

/// The request's log line and metrics (one EMF record); the first request of the process is
/// the cold start. Prompts and completions are logged only when the server was told to.
pub(crate) fn record(batch: &Batch, stats: &GenerationStats, usage: Usage, completions: &[Completion]) {
    let (state, load) = (&batch.state, &batch.load);
    let cold = state.cold.swap(false, Ordering::Relaxed);
    let decode_s = stats.decode.as_secs_f64();
    // With the wait for room in the engine's batch (see `crate::engine`).
    let ttft_ms = stats.first_token.as_secs_f64() * 1e3 + load.load_ms.unwrap_or(0.0);
    tracing::info!(
        model = %state.slot.id,
        source = %load.source,
        cold,
        sequences = completions.len(),
        prompt_tokens = usage.prompt_tokens,
        cached_prompt_tokens = stats.cached_prompt_tokens,
        completion_tokens = usage.completion_tokens,
        load_ms = load.load_ms,
        ttft_ms,
        prefill_ms = stats.prefill.as_secs_f64() * 1e3,
        decode_ms = decode_s * 1e3,
        "completed"
    );
    if state.log_text {
        let tokenizer = &batch.model.tokenizer;
        let prompts: Vec<String> = batch.request.prompts.iter().map(|p| tokenizer.decode_with_special(p).unwrap_or_default()).collect();
        let outputs: Vec<&str> = completions.iter().map(|c| c.text.as_str()).collect();
        tracing::info!(?prompts, completions = ?outputs, "request text");
    }
    let mut metrics = Metrics::new("llm-serverless")
        .dimension("Function", "infer")
        .property("model", state.slot.id.as_str())
        .metric("ColdStart", if cold { 1.0 } else { 0.0 }, Unit::Count)
        .metric("TimeToFirstTokenMs", ttft_ms, Unit::Milliseconds);
    if let Some(ms) = load.load_ms {
        metrics = metrics.metric("ModelLoadMs", ms, Unit::Milliseconds);
    }
    metrics
        .metric("PromptTokens", usage.prompt_tokens as f64, Unit::Count)
        .metric("CachedPromptTokens", stats.cached_prompt_tokens as f64, Unit::Count)
        .metric("CompletionTokens", usage.completion_tokens as f64, Unit::Count)
        .metric("DecodeTokensPerSecond", if decode_s > 0.0 { stats.decode_steps as f64 / decode_s } else { 0.0 }, Unit::CountPerSecond)
        .emit();
}
