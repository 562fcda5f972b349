//! The functions' configuration, read once at start-up from environment variables (the
//! template sets every one of them) into the API's state: the model, where it comes from, and
//! the request limits.

use std::sync::Arc;
use std::time::Duration;

use llm_engine::LoadOptions;

use crate::model_source::{self, DownloadSettings};
use crate::{AppState, Limits, ModelSlot};

/// `MODEL_URI`: `s3://bucket/models/<name>/latest`, `s3://bucket/key.gguf` or a local path;
/// unset, the demo model built into the binary (`cargo lambda watch` with no setup). Optional: `MODEL_ID`, `MODEL_TYPE` (a type of the alias's version),
/// `DOWNLOAD_PART_MIB` (16), `DOWNLOAD_CONCURRENCY` (8), `MODEL_CACHE_DIR` (e.g. `/tmp/models`),
/// `MODEL_ADAPTER` (a PEFT LoRA adapter: directory or `s3://` prefix),
/// `MAX_BODY_BYTES`, `MAX_PROMPT_TOKENS`, `MAX_TOKENS`, `MAX_BATCH_SEQUENCES` (sequences that
/// generate together: the batch function's file lines), `DEADLINE_MARGIN_MS`, `PROMPT_CACHE_MIB`, `LOG_TEXT`
/// (`1` logs prompts and completions), and Lambda's `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
pub fn state_from_env() -> Result<Arc<AppState>, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let number = |name: &str, default: u64| -> Result<u64, String> {
        var(name).map_or(Ok(default), |v| v.trim().parse().map_err(|_| format!("{name}=`{v}` is not a whole number")))
    };
    let uri = var("MODEL_URI").unwrap_or_else(|| llm_engine::DEMO_MODEL.to_string());
    let defaults = Limits::default();
    let limits = Limits {
        max_body_bytes: number("MAX_BODY_BYTES", defaults.max_body_bytes as u64)? as usize,
        max_prompt_tokens: number("MAX_PROMPT_TOKENS", defaults.max_prompt_tokens as u64)? as usize,
        max_tokens: number("MAX_TOKENS", defaults.max_tokens as u64)? as usize,
        max_batch_sequences: number("MAX_BATCH_SEQUENCES", defaults.max_batch_sequences as u64)?.max(1) as usize,
        prompt_cache_bytes: (number("PROMPT_CACHE_MIB", (defaults.prompt_cache_bytes >> 20) as u64)? << 20) as usize,
        deadline_margin: Duration::from_millis(number("DEADLINE_MARGIN_MS", defaults.deadline_margin.as_millis() as u64)?),
        ..defaults
    };
    let settings = DownloadSettings {
        part_size: number("DOWNLOAD_PART_MIB", 16)? << 20,
        concurrency: number("DOWNLOAD_CONCURRENCY", 8)? as usize,
        memory_limit_bytes: var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").and_then(|mb| mb.parse::<u64>().ok()).map(|mb| mb << 20),
        quant_type: var("MODEL_TYPE"),
        cache_dir: var("MODEL_CACHE_DIR").map(Into::into),
        adapter: var("MODEL_ADAPTER"),
    };
    let id = var("MODEL_ID").unwrap_or_else(|| model_source::model_id(&uri));
    let loader = model_source::loader(&uri, LoadOptions::default(), settings)?;
    let log_text = matches!(var("LOG_TEXT").as_deref(), Some("1" | "true"));
    // Access control is the template's job (API key or IAM on the URL), not the function's.
    Ok(Arc::new(AppState::new(ModelSlot::new(id, loader), limits, None).with_text_logging(log_text)))
}
