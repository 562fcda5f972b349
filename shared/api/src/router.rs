//! The HTTP API: one axum router that `llm serve`, the Lambda function and `cargo lambda watch`
//! all run. Handlers parse and validate, render the chat template, and hand one batch of
//! sequences to the engine on a blocking thread; answers are JSON or server-sent events.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use llm_engine::{ChatMessage, Completion, FinishReason, GenerationRequest, GenerationStats, LoadedModel, TokenEvent, TokenLogprob};
use llm_observe::{Metrics, Unit};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::error::ApiError;
use crate::logprobs;
use crate::model_slot::{LoadReport, ModelSlot};
use crate::openai::*;
use crate::params::{check_prompts, Generation, Limits};

/// When the invocation must have answered (Lambda's deadline). A launcher that has one puts
/// it in the request's extensions; generation stops [`Limits::deadline_margin`] before it.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// The id logs carry for a request: the launcher's (Lambda's request id) when it puts one in
/// the extensions, else the `x-request-id` header, else a fresh one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub struct AppState {
    pub slot: ModelSlot,
    pub limits: Limits,
    /// When set, every `/v1/` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Log prompts and completions (off by default: they may be private).
    pub log_text: bool,
    /// One batch on the CPU at a time; others queue.
    engine: Semaphore,
    /// Cleared by the first request: that one is a cold start.
    cold: AtomicBool,
}

impl AppState {
    pub fn new(slot: ModelSlot, limits: Limits, api_key: Option<String>) -> Self {
        Self { slot, limits, api_key, log_text: false, engine: Semaphore::new(1), cold: AtomicBool::new(true) }
    }

    pub fn with_text_logging(self, log_text: bool) -> Self {
        Self { log_text, ..self }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|request: Request| async move { ApiError::not_found(request.uri().path()) })
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

/// Every log line of a request carries its id.
async fn trace_request(request: Request, next: Next) -> Response {
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .or_else(|| request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| format!("req-{}", unique_suffix()));
    let span = tracing::info_span!("request", request_id = %id, path = %request.uri().path());
    next.run(request).instrument(span).await
}

/// Distinct per call within the process and unlikely to repeat across processes.
fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", (now.as_nanos() as u64 ^ (std::process::id() as u64) << 32).wrapping_add(count))
}

async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "model": state.slot.id}))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard { id: state.slot.id.clone(), object: "model", created: 0, owned_by: "llm-serverless" }],
    })
}

/// The body as JSON of type `T`: 413 past the limit, 400 when it does not parse.
async fn read_json<T: DeserializeOwned>(request: Request, limit: usize) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| ApiError::too_large(limit))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_body(format!("Invalid JSON body: {e}")))
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.slot.id {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// What every response of one request shares.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn new(prefix: &str, model: &str) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Self { id: format!("{prefix}-{}", unique_suffix()), created, model: model.into() }
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(prompts: &[Vec<u32>], completions: &[Completion]) -> Usage {
    Usage::new(prompts.iter().map(Vec::len).sum(), completions.iter().map(|c| c.token_ids.len()).sum())
}

async fn chat_completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    respond(&state, chat(state.clone(), request).await)
}

async fn completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    respond(&state, complete(state.clone(), request).await)
}

fn respond(state: &AppState, result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| {
        tracing::warn!(status = e.status.as_u16(), message = %e.message, "request failed");
        Metrics::new("llm-serverless").dimension("Function", "infer").metric("Errors", 1.0, Unit::Count).property("model", state.slot.id.as_str()).emit();
        e.into_response()
    })
}

fn chat_messages(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty."));
    }
    messages
        .into_iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid("messages", format!("Unknown role `{}`.", m.role)));
            }
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::invalid("messages", format!("Content parts of type `{kind}` are not supported."))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            Ok(ChatMessage::new(m.role, content))
        })
        .collect()
}

async fn chat(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let deadline = request.extensions().get::<Deadline>().copied();
    let body: ChatRequest = read_json(request, state.limits.max_body_bytes).await?;
    check_model(&state, &body.model)?;
    let generation = Generation::from_request(&body.sampling, &state.limits, 1)?.with_chat_logprobs(body.logprobs, body.top_logprobs)?;
    let messages = chat_messages(body.messages)?;
    let (model, load) = state.slot.get().await?;
    let template = model
        .chat_template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("messages", "This model has no chat template: use /v1/completions."))?;
    let text = template.render(&messages, true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template writes BOS as text; adding special tokens again would double it.
    let prompt = model.tokenizer.encode(&text, false).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let batch = Batch { state, model, load, prompts: vec![prompt], kind: ChunkKind::Chat, deadline, echo: None };
    answer(batch, &generation, |meta, model, completions, usage| {
        let choices = completions
            .iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                message: ResponseMessage { role: "assistant", content: c.text.clone() },
                finish_reason: finish_reason(c.finish_reason),
                logprobs: generation.logprobs.map(|_| logprobs::chat(&model.tokenizer, &c.logprobs)),
            })
            .collect();
        Json(ChatCompletion { id: meta.id, object: "chat.completion", created: meta.created, model: meta.model, choices, usage }).into_response()
    })
    .await
}

async fn complete(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let deadline = request.extensions().get::<Deadline>().copied();
    let body: CompletionRequest = read_json(request, state.limits.max_body_bytes).await?;
    check_model(&state, &body.model)?;
    // With `echo`, `max_tokens: 0` only scores the prompt (as lm-evaluation-harness asks).
    let min_tokens = if body.echo { 0 } else { 1 };
    let generation = Generation::from_request(&body.sampling, &state.limits, min_tokens)?.with_completion_logprobs(body.logprobs)?;
    let (model, load) = state.slot.get().await?;
    let encode = |text: &str| model.tokenizer.encode(text, true).map_err(|e| ApiError::invalid("prompt", e.to_string()));
    let (prompts, texts): (Vec<Vec<u32>>, Option<Vec<String>>) = match body.prompt {
        Prompt::Text(text) => (vec![encode(&text)?], Some(vec![text])),
        Prompt::Texts(texts) => (texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?, Some(texts)),
        Prompt::Tokens(ids) => (vec![ids], None),
        Prompt::TokenLists(lists) => (lists, None),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty."));
    }
    let vocab = model.model.config().vocab_size as u32;
    if prompts.iter().flatten().any(|&id| id >= vocab) {
        return Err(ApiError::invalid("prompt", format!("Token ids must be below the vocabulary size {vocab}.")));
    }
    check_prompts(&prompts, &generation, &state.limits, model.model.config().max_position_embeddings)?;
    let echo = match body.echo {
        true => Some(Arc::new(echo(&state, &model, &prompts, texts, generation.logprobs).await?)),
        false => None,
    };
    let n = generation.n;
    let batch = Batch { state, model, load, prompts, kind: ChunkKind::Text, deadline, echo: echo.clone() };
    answer(batch, &generation, |meta, model, completions, usage| {
        let choices = completions
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let echoed = echo.as_ref().map(|e| (&e.texts[index / n], &e.logprobs[index / n]));
                let mut logprobs = generation.logprobs.map(|_| CompletionLogprobs::default());
                if let (Some(lists), Some((_, Some(prompt_lists)))) = (&mut logprobs, echoed) {
                    lists.append(prompt_lists.clone());
                }
                let prefix = echoed.map_or("", |(text, _)| text.as_str());
                if let Some(lists) = &mut logprobs {
                    lists.append(logprobs::completion(&model.tokenizer, logprobs::visible(&model.tokenizer, &c.logprobs), prefix.len()).0);
                }
                CompletionChoice { index, text: format!("{prefix}{}", c.text), finish_reason: Some(finish_reason(c.finish_reason)), logprobs }
            })
            .collect();
        Json(TextCompletion { id: meta.id, object: "text_completion", created: meta.created, model: meta.model, choices, usage: Some(usage) }).into_response()
    })
    .await
}

/// `echo`: each prompt's text (and with `logprobs`, its tokens' lists) goes before the
/// completions of its choices.
struct Echo {
    texts: Vec<String>,
    logprobs: Vec<Option<CompletionLogprobs>>,
}

/// The prompts' texts (as given, or decoded from token ids) and, when `top_n` is set, their
/// tokens scored by the model, after the batches queued before.
async fn echo(state: &AppState, model: &Arc<LoadedModel>, prompts: &[Vec<u32>], texts: Option<Vec<String>>, top_n: Option<usize>) -> Result<Echo, ApiError> {
    let texts = match texts {
        Some(texts) => texts,
        None => prompts.iter().map(|p| model.tokenizer.decode(p).map_err(|e| ApiError::invalid("prompt", e.to_string()))).collect::<Result<_, _>>()?,
    };
    let Some(top_n) = top_n else {
        return Ok(Echo { logprobs: vec![None; texts.len()], texts });
    };
    let _permit = state.engine.acquire().await.map_err(|e| ApiError::internal(e.to_string()))?;
    let (scoring_model, owned) = (model.clone(), prompts.to_vec());
    let scores = tokio::task::spawn_blocking(move || owned.iter().map(|p| llm_engine::prompt_logprobs(&scoring_model.model, p, top_n)).collect::<Result<Vec<_>, _>>())
        .await
        .map_err(|e| ApiError::internal(format!("scoring stopped: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let logprobs = prompts.iter().zip(&scores).map(|(p, entries)| Some(logprobs::prompt(&model.tokenizer, p, entries).0)).collect();
    Ok(Echo { texts, logprobs })
}

/// One request's sequences, ready to run.
struct Batch {
    state: Arc<AppState>,
    model: Arc<LoadedModel>,
    load: LoadReport,
    prompts: Vec<Vec<u32>>,
    kind: ChunkKind,
    deadline: Option<Deadline>,
    echo: Option<Arc<Echo>>,
}

impl Batch {
    /// When generation must stop to answer before the deadline.
    fn stop_at(&self) -> Option<Instant> {
        self.deadline.map(|d| d.0.checked_sub(self.state.limits.deadline_margin).unwrap_or(d.0))
    }
}

/// Streams the batch as server-sent events, or runs it to the end and answers with `body`.
async fn answer(
    batch: Batch,
    generation: &Generation,
    body: impl FnOnce(Meta, &LoadedModel, &[Completion], Usage) -> Response,
) -> Result<Response, ApiError> {
    check_prompts(&batch.prompts, generation, &batch.state.limits, batch.model.model.config().max_position_embeddings)?;
    let prefix = match batch.kind {
        ChunkKind::Chat => "chatcmpl",
        ChunkKind::Text => "cmpl",
    };
    let meta = Meta::new(prefix, &batch.state.slot.id);
    let requests = generation.requests(&batch.prompts);
    if generation.stream {
        return Ok(stream_response(batch, requests, generation.include_usage, meta));
    }
    let (completions, stats) = run_batch(&batch, requests, |_| ControlFlow::Continue(())).await?;
    let usage = usage(&batch.prompts, &completions);
    record(&batch, &stats, usage, &completions);
    Ok(body(meta, &batch.model, &completions, usage))
}

/// Runs one batch on a blocking thread, after the batches queued before it. Generation stops
/// early (`finish_reason: length`) when `on_token` breaks or the deadline comes near.
async fn run_batch(
    batch: &Batch,
    requests: Vec<GenerationRequest>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()> + Send + 'static,
) -> Result<(Vec<Completion>, GenerationStats), ApiError> {
    let _permit = batch.state.engine.acquire().await.map_err(|e| ApiError::internal(e.to_string()))?;
    let model = batch.model.clone();
    let stop_at = batch.stop_at();
    let on_token = move |event: TokenEvent<'_>| {
        let flow = on_token(event);
        if flow.is_continue() && stop_at.is_some_and(|at| Instant::now() >= at) {
            tracing::warn!("stopping generation before the invocation's deadline");
            return ControlFlow::Break(());
        }
        flow
    };
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| llm_engine::generate(&model.model, &model.tokenizer, &requests, on_token)))
        .await
        .map_err(|e| ApiError::internal(format!("generation stopped: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The request's log line and metrics (one EMF record); the first request of the process is
/// the cold start. Prompts and completions are logged only when the server was told to.
fn record(batch: &Batch, stats: &GenerationStats, usage: Usage, completions: &[Completion]) {
    let (state, load) = (&batch.state, &batch.load);
    let cold = state.cold.swap(false, Ordering::Relaxed);
    let decode_s = stats.decode.as_secs_f64();
    let ttft_ms = stats.prefill.as_secs_f64() * 1e3 + load.load_ms.unwrap_or(0.0);
    tracing::info!(
        model = %state.slot.id,
        source = %load.source,
        cold,
        sequences = completions.len(),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        load_ms = load.load_ms,
        ttft_ms,
        prefill_ms = stats.prefill.as_secs_f64() * 1e3,
        decode_ms = decode_s * 1e3,
        "completed"
    );
    if state.log_text {
        let tokenizer = &batch.model.tokenizer;
        let prompts: Vec<String> = batch.prompts.iter().map(|p| tokenizer.decode_with_special(p).unwrap_or_default()).collect();
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
        .metric("CompletionTokens", usage.completion_tokens as f64, Unit::Count)
        .metric("DecodeTokensPerSecond", if decode_s > 0.0 { stats.decode_steps as f64 / decode_s } else { 0.0 }, Unit::CountPerSecond)
        .emit();
}

#[derive(Clone, Copy)]
enum ChunkKind {
    Chat,
    Text,
}

/// What the generation thread sends to the response stream.
enum Update {
    Token { index: usize, text: String, logprob: Option<TokenLogprob> },
    Done(Result<(Vec<Completion>, Usage), ApiError>),
}

fn stream_response(batch: Batch, requests: Vec<GenerationRequest>, include_usage: bool, meta: Meta) -> Response {
    let (tx, rx) = mpsc::channel::<Update>(64);
    let chunks = Chunks { meta, kind: batch.kind, model: batch.model.clone(), text_offsets: vec![0; requests.len()], echo: batch.echo.clone() };
    let choices = requests.len();
    let token_tx = tx.clone();
    let model = batch.model.clone();
    let task = async move {
        let result = run_batch(&batch, requests, move |event| {
            let logprob = event.logprob.filter(|lp| !model.tokenizer.is_stop(lp.token_id)).cloned();
            if event.text.is_empty() && logprob.is_none() {
                return ControlFlow::Continue(());
            }
            // A closed channel means the client went away: stop generating for it.
            match token_tx.blocking_send(Update::Token { index: event.index, text: event.text.to_string(), logprob }) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        })
        .await;
        let done = result.map(|(completions, stats)| {
            let usage = usage(&batch.prompts, &completions);
            record(&batch, &stats, usage, &completions);
            (completions, usage)
        });
        let _ = tx.send(Update::Done(done)).await;
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    Sse::new(sse_events(rx, chunks, choices, include_usage)).into_response()
}

/// Builds the streamed chunks' JSON.
struct Chunks {
    meta: Meta,
    kind: ChunkKind,
    model: Arc<LoadedModel>,
    /// Bytes of text streamed so far per choice (legacy logprobs' `text_offset`).
    text_offsets: Vec<usize>,
    echo: Option<Arc<Echo>>,
}

impl Chunks {
    fn event(&self, choices: Vec<serde_json::Value>, usage: Option<Usage>) -> Event {
        let object = match self.kind {
            ChunkKind::Chat => "chat.completion.chunk",
            ChunkKind::Text => "text_completion",
        };
        let mut body = serde_json::json!({"id": self.meta.id, "object": object, "created": self.meta.created, "model": self.meta.model, "choices": choices});
        if let Some(usage) = usage {
            body["usage"] = serde_json::json!(usage);
        }
        Event::default().data(body.to_string())
    }

    fn choice(&mut self, index: usize, text: Option<String>, role: bool, finish: Option<&'static str>, logprob: Option<&TokenLogprob>) -> serde_json::Value {
        let tokenizer = &self.model.tokenizer;
        match self.kind {
            ChunkKind::Chat => {
                let delta = Delta { role: role.then_some("assistant"), content: text };
                let logprobs = logprob.map(|lp| ChatLogprobs { content: vec![logprobs::chat_entry(tokenizer, lp)], refusal: None });
                serde_json::json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
            }
            ChunkKind::Text => {
                let logprobs = logprob.map(|lp| {
                    let (lists, next) = logprobs::completion(tokenizer, [lp], self.text_offsets[index]);
                    self.text_offsets[index] = next;
                    lists
                });
                serde_json::json!({"index": index, "text": text.unwrap_or_default(), "finish_reason": finish, "logprobs": logprobs})
            }
        }
    }

    /// The chunk a choice starts with: the assistant role (chat), the echoed prompt (`echo`).
    fn opening(&mut self, index: usize, choices: usize) -> Option<Event> {
        let choice = match (self.kind, &self.echo) {
            (ChunkKind::Chat, _) => self.choice(index, Some(String::new()), true, None, None),
            (ChunkKind::Text, None) => return None,
            (ChunkKind::Text, Some(echo)) => {
                let prompt = index * echo.texts.len() / choices;
                let text = echo.texts[prompt].clone();
                self.text_offsets[index] = text.len();
                serde_json::json!({"index": index, "text": text, "finish_reason": null, "logprobs": echo.logprobs[prompt]})
            }
        };
        Some(self.event(vec![choice], None))
    }

    /// The events one update becomes.
    fn events(&mut self, update: Update, include_usage: bool) -> Vec<Event> {
        match update {
            Update::Token { index, text, logprob } => {
                let choice = self.choice(index, Some(text), false, None, logprob.as_ref());
                vec![self.event(vec![choice], None)]
            }
            Update::Done(Ok((completions, usage))) => {
                let mut events = Vec::with_capacity(completions.len() + 2);
                for (i, c) in completions.iter().enumerate() {
                    let choice = self.choice(i, None, false, Some(finish_reason(c.finish_reason)), None);
                    events.push(self.event(vec![choice], None));
                }
                if include_usage {
                    events.push(self.event(Vec::new(), Some(usage)));
                }
                events.push(Event::default().data("[DONE]"));
                events
            }
            Update::Done(Err(e)) => vec![Event::default().data(e.body().to_string()), Event::default().data("[DONE]")],
        }
    }
}

/// Server-sent events: the assistant role first (chat), text as it is generated, a closing
/// chunk per choice with its finish reason, usage when asked, then `[DONE]`.
fn sse_events(rx: mpsc::Receiver<Update>, mut chunks: Chunks, choices: usize, include_usage: bool) -> impl Stream<Item = Result<Event, Infallible>> {
    let opening: Vec<Event> = (0..choices).filter_map(|i| chunks.opening(i, choices)).collect();
    let updates = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|update| (update, rx)) });
    let body = updates.flat_map(move |update| stream::iter(chunks.events(update, include_usage).into_iter().map(Ok)));
    stream::iter(opening.into_iter().map(Ok)).chain(body)
}
