//! `llm merge`: base + LoRA adapter → a plain Hugging Face directory.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a Hugging Face directory.
    #[arg(long)]
    pub base: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The merged Hugging Face directory to write.
    #[arg(long)]
    pub output: PathBuf,
    /// Weight dtype of the output: f32, f16 or bf16 (default: the base's).
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = args.dtype.as_deref().map(llm_train::merge::parse_dtype).transpose()?;
    let report = llm_train::merge::merge(&args.base, &args.adapter, &args.output, dtype)
        .with_context(|| format!("cannot merge {} into {}", args.adapter.display(), args.base.display()))?;
    eprintln!("merged {} weights; wrote {} tensors to {}", report.merged_weights, report.tensors, args.output.display());
    Ok(())
}
