//! `llm serve`: the OpenAI-compatible API on a local port: the same router the Lambda
//! function runs, with the model loaded on the first request.

use std::sync::Arc;

use anyhow::Context;
use llm_api::model_source::{self, DownloadSettings};
use llm_api::{AppState, Limits, ModelSlot};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory, `s3://bucket/key.gguf`, or
    /// `s3://bucket/models/<name>/latest` (the quantization function's alias); default: the
    /// built-in demo model.
    #[arg(long, default_value = llm_engine::DEMO_MODEL)]
    pub model: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/ requests.
    #[arg(long, env = "LLM_API_KEY")]
    pub api_key: Option<String>,
    /// The name clients pass as `model` (default: the file or directory name without extension).
    #[arg(long)]
    pub model_id: Option<String>,
    #[command(flatten)]
    pub load: super::LoadArgs,
    #[command(flatten)]
    pub kernels: super::KernelArgs,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Longest accepted prompt, in tokens.
    #[arg(long, default_value_t = Limits::default().max_prompt_tokens)]
    pub max_prompt_tokens: usize,
    /// Cap on `max_tokens` (and its default).
    #[arg(long, default_value_t = Limits::default().max_tokens)]
    pub max_tokens: usize,
    /// Sequences that generate together: a request joins the running batch between two decode
    /// steps when its sequences fit (a larger one runs alone).
    #[arg(long, default_value_t = Limits::default().max_batch_sequences)]
    pub max_batch_sequences: usize,
    /// Requests that may wait to join the running batch (one always may); more get 503.
    #[arg(long, default_value_t = Limits::default().max_queued)]
    pub max_queued: usize,
    /// MiB of KV cache kept between requests for prompts that start alike (conversations'
    /// earlier turns, system prompts), the least recently used dropped first; the last request's
    /// is kept whatever its size (0 keeps only it).
    #[arg(long, default_value_t = Limits::default().prompt_cache_bytes >> 20)]
    pub prompt_cache_mib: usize,
    /// Keep S3 downloads here, named by their sha256, for the next start.
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
    /// A PEFT LoRA adapter (directory or s3:// prefix) applied to the model when it loads.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Log prompts and completions (off by default).
    #[arg(long)]
    pub log_text: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.kernels.choose();
    let id = args.model_id.clone().unwrap_or_else(|| model_source::model_id(&args.model));
    let settings = DownloadSettings { cache_dir: args.cache_dir, adapter: args.adapter, ..DownloadSettings::default() };
    let loader = model_source::loader(&args.model, args.load.options()?, settings).map_err(anyhow::Error::msg)?;
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens: args.max_tokens,
        max_batch_sequences: args.max_batch_sequences,
        max_queued: args.max_queued,
        prompt_cache_bytes: args.prompt_cache_mib << 20,
        ..Limits::default()
    };
    let state = Arc::new(AppState::new(ModelSlot::new(id, loader), limits, args.api_key).with_text_logging(args.log_text));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await.with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        // Scripts wait for this line to know the port (with --port 0) and that requests are accepted.
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, llm_api::router(state)).await.context("server stopped")
    })
}
