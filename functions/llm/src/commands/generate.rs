//! `llm generate`: one prompt in, text out (streamed, or one JSON object with `--json`).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use llm_engine::{ChatMessage, GenerationRequest, SamplingParams};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file or a Hugging Face model directory (default: the built-in demo model).
    #[arg(long, default_value = llm_engine::DEMO_MODEL)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object (text, token ids, finish reason, speeds) as the last line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: super::LoadArgs,
}

#[derive(Serialize)]
struct Output<'a> {
    text: &'a str,
    token_ids: &'a [u32],
    prompt_token_ids: &'a [u32],
    finish_reason: llm_engine::FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = super::load_model(&args.model, args.load.options()?)?;
    let prompt_token_ids = if args.chat {
        let template = loaded.chat_template.as_ref().context("--chat: the model has no chat template")?;
        let text = template.render(&[ChatMessage::new("user", &args.prompt)], true)?;
        // The template already wrote BOS as text; adding it again would double it.
        loaded.tokenizer.encode(&text, false)?
    } else {
        loaded.tokenizer.encode(&args.prompt, true)?
    };
    let request = GenerationRequest {
        prompt: prompt_token_ids.clone(),
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            logit_bias: Vec::new(),
            seed: args.seed,
        },
        stop: args.stop,
        ignore_eos: args.ignore_eos,
        logprobs: None,
    };
    let mut stdout = std::io::stdout().lock();
    let stream = !args.json;
    let (completions, stats) = llm_engine::generate(&loaded.model, &loaded.tokenizer, &[request], |event| {
        if stream && !event.text.is_empty() {
            let _ = stdout.write_all(event.text.as_bytes());
            let _ = stdout.flush();
        }
        ControlFlow::Continue(())
    })?;
    let completion = &completions[0];
    if args.json {
        let output = Output {
            text: &completion.text,
            token_ids: &completion.token_ids,
            prompt_token_ids: &prompt_token_ids,
            finish_reason: completion.finish_reason,
            prompt_tokens: prompt_token_ids.len(),
            completion_tokens: completion.token_ids.len(),
            prefill_tok_s: per_second(stats.prompt_tokens, stats.prefill),
            decode_tok_s: per_second(stats.decode_steps, stats.decode),
        };
        writeln!(stdout, "{}", serde_json::to_string(&output)?)?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

pub fn per_second(count: usize, elapsed: std::time::Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}
