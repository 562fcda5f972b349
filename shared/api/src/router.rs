//! The HTTP API: one axum router that `llm serve`, the Lambda function and `cargo lambda watch`
//! all run. Handlers parse the body and check the model's name; [`crate::prepare`] validates and
//! encodes, and [`crate::batch`] runs the request's sequences in the engine's batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_observe::{Metrics, Unit};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::batch::{answer, Batch};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::model_slot::ModelSlot;
use crate::openai::*;
use crate::params::Limits;
use crate::prepare::{check_chat, check_completion, Checked};

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
    /// The thread every generation runs on, with the prompt cache.
    pub(crate) engine: Engine,
    /// Cleared by the first request: that one is a cold start.
    pub(crate) cold: AtomicBool,
}

impl AppState {
    pub fn new(slot: ModelSlot, limits: Limits, api_key: Option<String>) -> Self {
        Self { engine: Engine::new(&limits), slot, limits, api_key, log_text: false, cold: AtomicBool::new(true) }
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
    Json(ModelList { object: "list", data: vec![ModelCard { id: state.slot.id.clone(), object: "model", created: 0, owned_by: "llm-serverless" }] })
}

/// The body as JSON of type `T`: 413 past the limit, 400 when it does not parse.
async fn read_json<T: DeserializeOwned>(request: Request, limit: usize) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| ApiError::too_large(limit))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_body(format!("Invalid JSON body: {e}")))
}

pub(crate) fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
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

async fn chat(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let deadline = request.extensions().get::<Deadline>().copied();
    let body: ChatRequest = read_json(request, state.limits.max_body_bytes).await?;
    check_model(&state, &body.model)?;
    let checked = check_chat(body, &state.limits)?;
    run(state, checked, deadline).await
}

async fn complete(state: Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let deadline = request.extensions().get::<Deadline>().copied();
    let body: CompletionRequest = read_json(request, state.limits.max_body_bytes).await?;
    check_model(&state, &body.model)?;
    let checked = check_completion(body, &state.limits)?;
    run(state, checked, deadline).await
}

/// Loads the model (the first request), prepares the request and answers it.
async fn run(state: Arc<AppState>, checked: Checked, deadline: Option<Deadline>) -> Result<Response, ApiError> {
    let (model, load) = state.slot.get().await?;
    let request = checked.prepare(&state, &model).await?;
    answer(Batch { state, model, load, deadline, request }).await
}
