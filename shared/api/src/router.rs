//! The HTTP API: one axum router that `llm serve`, the Lambda function and `cargo lambda watch`
//! all run. Handlers parse and validate, render the chat template or encode the prompts, and
//! hand one batch of sequences to [`crate::batch`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_engine::{ChatMessage, LoadedModel};
use llm_observe::{Metrics, Unit};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::batch::{answer, finish_reason, Batch, Echo};
use crate::error::ApiError;
use crate::logprobs;
use crate::model_slot::ModelSlot;
use crate::openai::*;
use crate::params::{check_prompts, Generation, Limits};
use crate::stream::ChunkKind;

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
    pub(crate) engine: Semaphore,
    /// Cleared by the first request: that one is a cold start.
    pub(crate) cold: AtomicBool,
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
pub(crate) fn unique_suffix() -> String {
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

