//! The inference function's configuration: environment variables read once at start-up into
//! the router's state. `main.rs` runs the router under lambda_http with response streaming.

use std::sync::Arc;

use llm_api::model_source::{self, DownloadSettings};
use llm_api::{AppState, Limits, ModelSlot};
use llm_engine::LoadOptions;

/// `MODEL_URI` (required): `s3://bucket/models/<name>/latest`, `s3://bucket/key.gguf` or a
/// local path. Optional: `MODEL_ID`, `MODEL_TYPE` (a type of the alias's version),
/// `DOWNLOAD_PART_MIB` (16), `DOWNLOAD_CONCURRENCY` (8), `MAX_BODY_BYTES`, `MAX_PROMPT_TOKENS`,
/// `MAX_TOKENS`, and Lambda's `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
pub fn state_from_env() -> Result<Arc<AppState>, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let number = |name: &str, default: u64| -> Result<u64, String> {
        var(name).map_or(Ok(default), |v| v.trim().parse().map_err(|_| format!("{name}=`{v}` is not a whole number")))
    };
    let uri = var("MODEL_URI").ok_or("MODEL_URI is not set: name the model to serve (s3://bucket/models/<name>/latest)")?;
    let defaults = Limits::default();
    let limits = Limits {
        max_body_bytes: number("MAX_BODY_BYTES", defaults.max_body_bytes as u64)? as usize,
        max_prompt_tokens: number("MAX_PROMPT_TOKENS", defaults.max_prompt_tokens as u64)? as usize,
        max_tokens: number("MAX_TOKENS", defaults.max_tokens as u64)? as usize,
        ..defaults
    };
    let settings = DownloadSettings {
        part_size: number("DOWNLOAD_PART_MIB", 16)? << 20,
        concurrency: number("DOWNLOAD_CONCURRENCY", 8)? as usize,
        memory_limit_bytes: var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").and_then(|mb| mb.parse::<u64>().ok()).map(|mb| mb << 20),
        quant_type: var("MODEL_TYPE"),
    };
    let id = var("MODEL_ID").unwrap_or_else(|| model_source::model_id(&uri));
    let loader = model_source::loader(&uri, LoadOptions::default(), settings)?;
    // Access control is the template's job (API key or IAM on the URL), not the function's.
    Ok(Arc::new(AppState::new(ModelSlot::new(id, loader), limits, None)))
}
