//! The `llm` command line: thin argument parsing over the engine and the other libraries.
//! Each subcommand lives in its own module under `commands/`.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "llm", version, about = "Run, inspect and benchmark Llama models on CPU")]
pub struct Cli {
    /// Worker threads for the matrix kernels (default: one per core this process may run on).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt.
    Generate(commands::generate::Args),
    /// Print a model's metadata and tensors.
    Inspect(commands::inspect::Args),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(commands::bench::Args),
    /// Convert a Hugging Face checkpoint to a (quantized) GGUF file.
    Quantize(commands::quantize::Args),
    /// Serve the OpenAI-compatible API (the inference function's router) on a local port.
    Serve(commands::serve::Args),
    /// Merge a LoRA adapter into its base model (a plain Hugging Face directory).
    Merge(commands::merge::Args),
    /// Fine-tune a Hugging Face checkpoint (all weights or LoRA) on JSONL data.
    Finetune(commands::finetune::Args),
    /// Distil a teacher into a smaller student (soft targets + labels).
    Distill(commands::distill::Args),
    /// Write the demo task (data, held-out questions, tokenizer, untrained teacher).
    DemoData(commands::demo_data::Args),
    /// Exact-match accuracy on held-out questions.
    Eval(commands::eval::Args),
    /// Answer an OpenAI Batch API file (requests of many lines in shared engine batches).
    Batch(commands::batch::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // stdout stays machine-readable (`--json`): logs go to stderr.
    llm_observe::init_logging("warn");
    llm_engine::threads::configure(cli.threads)?;
    match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Finetune(args) => commands::finetune::run(args),
        Command::Distill(args) => commands::distill::run(args),
        Command::DemoData(args) => commands::demo_data::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Batch(args) => commands::batch::run(args),
    }
}
