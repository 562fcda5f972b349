//! `llm finetune`: full or LoRA fine-tuning of a Hugging Face checkpoint on JSONL data.

use std::path::PathBuf;

use anyhow::Context;
use llm_train::data::Overflow;
use llm_train::finetune::{finetune, Settings};
use llm_train::{LoraConfig, Trainable};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Method {
    Full,
    Lora,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OverflowArg {
    Truncate,
    Skip,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a Hugging Face directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub base: PathBuf,
    /// JSONL: {"prompt", "completion"}, {"messages": [...]} or {"text"} per line.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "lora")]
    pub method: Method,
    /// A Hugging Face directory (full) or a PEFT adapter directory (LoRA), with metrics.jsonl.
    #[arg(long)]
    pub output: PathBuf,
    /// Optimiser steps (default: --epochs passes over the data).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Comma-separated projections to adapt.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// Peak learning rate (default: 2e-4 for LoRA, 2e-5 for full).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Warmup steps (linear), then cosine decay.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// What to do with longer examples (both are counted).
    #[arg(long, value_enum, default_value = "truncate")]
    pub overflow: OverflowArg,
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu (the cuda backend is not built in yet).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.device == "cpu", "--device {}: only cpu is available in this build", args.device);
    let trainable = match args.method {
        Method::Full => Trainable::Full,
        Method::Lora => Trainable::Lora {
            config: LoraConfig { r: args.lora_rank, alpha: args.lora_alpha, dropout: args.lora_dropout, target_modules: args.target_modules, use_rslora: false },
            seed: args.seed,
        },
    };
    let default_lr = if matches!(args.method, Method::Lora) { 2e-4 } else { 2e-5 };
    let settings = Settings {
        trainable,
        steps: args.steps,
        epochs: args.epochs,
        lr: args.lr.unwrap_or(default_lr),
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        max_seq_len: args.max_seq_len,
        overflow: match args.overflow {
            OverflowArg::Truncate => Overflow::Truncate,
            OverflowArg::Skip => Overflow::Skip,
        },
        eval_data: args.eval_data,
        eval_every: args.eval_every,
        seed: args.seed,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let summary = finetune(&args.base, &args.data, &args.output, &settings, |m, total| {
        bar.set_length(total as u64);
        bar.set_position(m.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
    })
    .with_context(|| format!("fine-tuning {} failed", args.base.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "{} steps on {} examples ({} truncated, {} skipped): loss {:.4} -> {:.4}{}; wrote {}",
        summary.steps,
        summary.examples,
        summary.truncated,
        summary.skipped,
        summary.first_loss,
        summary.last_loss,
        summary.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
        args.output.display()
    );
    Ok(())
}
