//! `llm demo-data`: the demo task's data, tokenizer and untrained teacher (see `llm_train::demo`).

use std::path::PathBuf;

use anyhow::Context;
use llm_train::demo::{write_demo, DemoSizes, TeacherShape};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write (pretrain.jsonl, sft.jsonl, sft-eval.jsonl, eval.jsonl, tokenizer/,
    /// teacher-init/).
    #[arg(long)]
    pub output: PathBuf,
    /// Lines of pretraining text.
    #[arg(long, default_value_t = 20000)]
    pub pretrain: usize,
    /// Chat examples for instruction SFT.
    #[arg(long, default_value_t = 8000)]
    pub sft: usize,
    /// Held-out questions per task.
    #[arg(long, default_value_t = 100)]
    pub eval_per_task: usize,
    /// Teacher layers (hidden 256, MLP 512, 4 heads, 2 KV heads).
    #[arg(long, default_value_t = 5)]
    pub layers: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sizes = DemoSizes { pretrain: args.pretrain, sft: args.sft, eval_per_task: args.eval_per_task, seed: args.seed };
    let shape = TeacherShape { layers: args.layers, ..TeacherShape::default() };
    write_demo(&args.output, &sizes, &shape).with_context(|| format!("cannot write the demo task into {}", args.output.display()))?;
    eprintln!("wrote the demo task and an untrained teacher into {}", args.output.display());
    Ok(())
}
