//! `llm bench`: load time, prefill and decode throughput, peak memory — the numbers compared
//! with llama.cpp by `infra/bench/compare.py`.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use llm_engine::GenerationRequest;
use serde::Serialize;

use super::generate::per_second;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: super::LoadArgs,
    #[command(flatten)]
    pub kernels: super::KernelArgs,
}

#[derive(Serialize)]
struct Report {
    model: String,
    threads: usize,
    /// The quantized products' kernels ([`llm_kernels::Kernels::name`]).
    kernels: &'static str,
    /// The KV cache's type ([`llm_engine::KvCacheType::name`]).
    kv_cache: &'static str,
    prompt_tokens: usize,
    gen_tokens: usize,
    load_s: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    peak_rss_bytes: u64,
}

/// A fixed, ordinary English text, so that runs are comparable across models.
const TEXT: &str = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep \
    and the river runs quietly past the old mill towards the distant sea. ";

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.prompt_tokens > 0 && args.gen_tokens > 0, "--prompt-tokens and --gen-tokens must be positive");
    let kernels = args.kernels.choose();
    let started = Instant::now();
    let loaded = super::load_model(&args.model, args.load.options()?)?;
    let load_s = started.elapsed().as_secs_f64();

    let mut prompt = loaded.tokenizer.encode(&TEXT.repeat(1 + args.prompt_tokens / 20), true)?;
    prompt.truncate(args.prompt_tokens);
    while prompt.len() < args.prompt_tokens {
        prompt.push(prompt[prompt.len() % prompt.len().max(1)]);
    }
    let request = GenerationRequest { prompt, max_tokens: args.gen_tokens, ignore_eos: true, ..Default::default() };
    let (_, stats) = llm_engine::generate(&loaded.model, &loaded.tokenizer, &[request], |_| ControlFlow::Continue(()))?;
    let report = Report {
        model: args.model.display().to_string(),
        threads: llm_kernels::threads(),
        kernels: kernels.name(),
        kv_cache: loaded.model.kv_cache_type().name(),
        prompt_tokens: stats.prompt_tokens,
        gen_tokens: stats.generated_tokens,
        load_s,
        prefill_tok_s: per_second(stats.prompt_tokens, stats.prefill),
        decode_tok_s: per_second(stats.decode_steps, stats.decode),
        peak_rss_bytes: peak_rss_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: load {:.2} s, prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), peak RSS {:.1} MiB, {} threads",
            report.model,
            report.load_s,
            report.prefill_tok_s,
            report.prompt_tokens,
            report.decode_tok_s,
            report.gen_tokens,
            report.peak_rss_bytes as f64 / (1 << 20) as f64,
            report.threads
        );
    }
    Ok(())
}

/// The process's high-water resident set (Linux `VmHWM`); 0 where unavailable.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}
