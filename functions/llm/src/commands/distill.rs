//! `llm distill`: a smaller student trained on a teacher's soft targets and the data's labels.

use std::path::PathBuf;

use llm_train::distill::{distill, DistillSettings, Student};
use llm_train::Trainable;

use super::training::{run_staged, Staging, TrainArgs};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("student").required(true).args(["student_config", "student_layers"])))]
pub struct Args {
    /// The teacher: a Hugging Face directory, or an S3 prefix holding one.
    #[arg(long)]
    pub teacher: String,
    /// The student's Hugging Face directory to write (with metrics.jsonl and loss.png): a path
    /// or an S3 prefix.
    #[arg(long)]
    pub output: String,
    /// A config.json for a fresh student (same vocabulary as the teacher).
    #[arg(long)]
    pub student_config: Option<PathBuf>,
    /// Start the student as the teacher pruned to this many evenly spaced layers.
    #[arg(long)]
    pub student_layers: Option<usize>,
    /// Softmax temperature of the distillation term.
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f64,
    /// Weight of the distillation term (the rest goes to the labels' cross-entropy).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Offline soft targets: the teacher's top-k logits for the data, stored in this
    /// safetensors file. Computed and written first when the file does not exist; reused
    /// (without running the teacher) when it does and matches the data.
    #[arg(long)]
    pub soft_targets: Option<PathBuf>,
    /// How many of the teacher's logits per position --soft-targets keeps.
    #[arg(long, default_value_t = 32)]
    pub soft_top_k: usize,
    #[command(flatten)]
    pub train: TrainArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let student = match (args.student_layers, args.student_config) {
        (Some(k), _) => Student::Layers(k),
        (None, Some(config)) => Student::Config(config),
        (None, None) => anyhow::bail!("give --student-layers or --student-config"),
    };
    let staging = Staging::new();
    let settings = DistillSettings {
        train: args.train.settings(Trainable::Full, 1e-4, &staging)?,
        student,
        temperature: args.temperature,
        alpha: args.alpha,
        soft_targets: args.soft_targets,
        soft_top_k: args.soft_top_k,
    };
    run_staged(&staging, &args.teacher, &args.train, &args.output, "distilling", |teacher, data, output, on_step| {
        distill(teacher, data, output, &settings, on_step)
    })
}
