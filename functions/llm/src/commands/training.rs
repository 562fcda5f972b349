//! The options `llm finetune` and `llm distill` share, and how a run reports progress.

use std::path::PathBuf;

use llm_train::data::Overflow;
use llm_train::finetune::{Settings, StepMetrics, Summary};
use llm_train::Trainable;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OverflowArg {
    Truncate,
    Skip,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// JSONL: {"prompt", "completion"}, {"messages": [...]} or {"text"} per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Optimiser steps (default: --epochs passes over the data).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Peak learning rate.
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
    /// Train quantization-aware for GGUF q8_0 or q4_0.
    #[arg(long)]
    pub qat: Option<String>,
    /// Write a checkpoint into OUTPUT/checkpoint every this many steps (0: never).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue from OUTPUT/checkpoint (an interrupted run) when there is one.
    #[arg(long)]
    pub resume: bool,
}

impl TrainArgs {
    pub fn settings(&self, trainable: Trainable, default_lr: f64) -> anyhow::Result<Settings> {
        anyhow::ensure!(self.device == "cpu", "--device {}: only cpu is available in this build", self.device);
        Ok(Settings {
            trainable,
            steps: self.steps,
            epochs: self.epochs,
            lr: self.lr.unwrap_or(default_lr),
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            max_seq_len: self.max_seq_len,
            overflow: match self.overflow {
                OverflowArg::Truncate => Overflow::Truncate,
                OverflowArg::Skip => Overflow::Skip,
            },
            eval_data: self.eval_data.clone(),
            eval_every: self.eval_every,
            seed: self.seed,
            qat: self.qat.as_deref().map(str::parse).transpose()?,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
        })
    }
}

/// A progress bar over the run's steps, showing the latest loss and learning rate.
pub fn progress() -> (indicatif::ProgressBar, impl FnMut(&StepMetrics, usize) -> std::ops::ControlFlow<()>) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let updates = bar.clone();
    (bar, move |m: &StepMetrics, total: usize| {
        updates.set_length(total as u64);
        updates.set_position(m.step as u64);
        updates.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
        std::ops::ControlFlow::Continue(())
    })
}

pub fn report(summary: &Summary, output: &std::path::Path) {
    if let Some(step) = summary.resumed_from {
        eprintln!("resumed after step {step}");
    }
    eprintln!(
        "{} steps on {} examples ({} truncated, {} skipped): loss {:.4} -> {:.4}{}; wrote {}",
        summary.steps,
        summary.examples,
        summary.truncated,
        summary.skipped,
        summary.first_loss,
        summary.last_loss,
        summary.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
        output.display()
    );
}
