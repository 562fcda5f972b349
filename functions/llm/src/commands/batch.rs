//! `llm batch`: an OpenAI Batch API file answered on this machine, with the code the batch
//! function runs: requests of many lines generated together in engine batches. Writes the
//! answers (`OUTPUT`), the failed lines (`OUTPUT` with `.errors.jsonl`) and a status object
//! (`.status.json`, also printed), locally or on S3.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use llm_api::batch_file::{self, OutputLine};
use llm_api::model_source::{self, DownloadSettings};
use llm_api::{AppState, Limits, ModelSlot};
use llm_engine::LoadOptions;
use llm_store::{Location, S3};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The batch file (JSONL of {"custom_id", "method", "url", "body"}): a path or s3://bucket/key.
    #[arg(long)]
    pub input: String,
    /// Where the answers go: a path or s3://bucket/key (ending in .jsonl); the errors and
    /// status files go beside it.
    #[arg(long)]
    pub output: String,
    /// A GGUF file, a Hugging Face directory, s3://bucket/key.gguf or an s3://…/latest alias;
    /// default: the built-in demo model.
    #[arg(long, default_value = llm_engine::DEMO_MODEL)]
    pub model: String,
    /// The name request bodies must give as `model` (default: as `llm serve` names it).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Most sequences that generate together (1: one request at a time).
    #[arg(long, default_value_t = 32)]
    pub max_batch_sequences: usize,
    #[command(flatten)]
    pub kernels: super::KernelArgs,
}

/// `out.jsonl` → `out.errors.jsonl`, `out.status.json`.
fn beside(output: &str, suffix: &str) -> String {
    format!("{}{suffix}", output.strip_suffix(".jsonl").unwrap_or(output))
}

fn write(uri: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
    match Location::parse(uri)? {
        Location::Local(path) => std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display())),
        Location::S3 { bucket, key } => S3::connect()?.put(&bucket, &key, bytes).with_context(|| format!("cannot write {uri}")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.kernels.choose();
    let started = Instant::now();
    let staging = llm_store::sync::Staging::new("batch");
    let input = staging.input(&Location::parse(&args.input)?, "input").with_context(|| format!("cannot read {}", args.input))?;
    let text = std::fs::read_to_string(&input).with_context(|| format!("cannot read {}", args.input))?;
    let (mut lines, mut answers) = (Vec::new(), Vec::new());
    for parsed in batch_file::parse(&text) {
        match parsed {
            Ok(line) => lines.push(line),
            Err(unreadable) => answers.push(*unreadable),
        }
    }

    let id = args.model_id.clone().unwrap_or_else(|| model_source::model_id(&args.model));
    let loader = model_source::loader(&args.model, LoadOptions::default(), DownloadSettings::default()).map_err(anyhow::Error::msg)?;
    let limits = Limits { max_batch_sequences: args.max_batch_sequences, ..Limits::default() };
    let state = Arc::new(AppState::new(ModelSlot::new(id, loader), limits, None));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (answered, stats) = runtime.block_on(batch_file::answer(&state, lines)).map_err(|e| anyhow::anyhow!("cannot load the model: {}", e.message))?;
    answers.extend(answered);

    let (succeeded, failed): (Vec<&OutputLine>, Vec<&OutputLine>) = answers.iter().partition(|a| a.succeeded());
    let errors = beside(&args.output, ".errors.jsonl");
    write(&args.output, batch_file::to_jsonl(succeeded.iter().copied()))?;
    write(&errors, batch_file::to_jsonl(failed.iter().copied()))?;
    let seconds = started.elapsed().as_secs_f64();
    let status = serde_json::json!({
        "status": "completed",
        "input": args.input,
        "output": args.output,
        "errors": errors,
        "requests": answers.len(),
        "succeeded": succeeded.len(),
        "failed": failed.len(),
        "seconds": seconds,
        "completion_tokens_per_second": if stats.generate_seconds > 0.0 { stats.completion_tokens as f64 / stats.generate_seconds } else { 0.0 },
        "stats": stats,
    });
    write(&beside(&args.output, ".status.json"), serde_json::to_vec_pretty(&status)?)?;
    println!("{status}");
    Ok(())
}
