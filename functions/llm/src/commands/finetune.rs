//! `llm finetune`: full or LoRA fine-tuning of a Hugging Face checkpoint on JSONL data.

use llm_train::finetune::finetune;
use llm_train::{LoraConfig, Trainable};

use super::training::{run_staged, Staging, TrainArgs};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Method {
    Full,
    Lora,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a Hugging Face directory (config.json, safetensors, tokenizer.json), or
    /// an S3 prefix holding one (s3://bucket/prefix/).
    #[arg(long)]
    pub base: String,
    #[arg(long, value_enum, default_value = "lora")]
    pub method: Method,
    /// A Hugging Face directory (full) or a PEFT adapter directory (LoRA), with metrics.jsonl
    /// and loss.png: a path or an S3 prefix.
    #[arg(long)]
    pub output: String,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Comma-separated projections to adapt.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub target_modules: Vec<String>,
    #[command(flatten)]
    pub train: TrainArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (trainable, default_lr) = match args.method {
        Method::Full => (Trainable::Full, 2e-5),
        Method::Lora => {
            let config =
                LoraConfig { r: args.lora_rank, alpha: args.lora_alpha, dropout: args.lora_dropout, target_modules: args.target_modules, use_rslora: false };
            (Trainable::Lora { config, seed: args.train.seed }, 2e-4)
        }
    };
    let staging = Staging::new();
    let settings = args.train.settings(trainable, default_lr, &staging)?;
    run_staged(&staging, &args.base, &args.train, &args.output, "fine-tuning", |base, data, output, on_step| finetune(base, data, output, &settings, on_step))
}
