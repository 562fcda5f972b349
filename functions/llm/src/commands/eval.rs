//! `llm eval`: exact-match accuracy on held-out questions (JSONL of `task`, `prompt`, `answer`).

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL, one {"task", "prompt", "answer"} per line (what `llm demo-data` writes as eval.jsonl).
    #[arg(long)]
    pub data: PathBuf,
    /// Questions answered together in one batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let questions = llm_train::demo::read_questions(&args.data)?;
    let loaded = super::load_model(&args.model, llm_engine::LoadOptions::default())?;
    let report = llm_train::eval::exact_match(&loaded, &questions, args.batch_size).with_context(|| format!("cannot evaluate {}", args.model.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for t in &report.tasks {
        println!("{:<10} {:>4}/{:<4} {:.1}%", t.task, t.correct, t.total, 100.0 * t.accuracy);
    }
    println!("{:<10} {:>4}/{:<4} {:.1}%", "all", report.correct, report.total, 100.0 * report.accuracy);
    Ok(())
}
