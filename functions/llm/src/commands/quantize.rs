//! `llm quantize`: a Hugging Face checkpoint directory to a llama.cpp-compatible GGUF file.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use llm_convert::QuantType;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub input: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    pub output: PathBuf,
    /// f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q4_k_m q5_k_m q4_k_s
    #[arg(long = "type")]
    pub quant_type: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let quant: QuantType = args.quant_type.parse()?;
    for p in [&args.input, &args.output] {
        anyhow::ensure!(!p.to_string_lossy().starts_with("s3://"), "{}: S3 locations are not supported yet; use local paths", p.display());
    }
    // Written beside the destination and renamed when complete: the output never exists half-written.
    let partial = partial_path(&args.output);
    let result = write(&args.input, &partial, quant);
    match result {
        Ok(report) => {
            std::fs::rename(&partial, &args.output).with_context(|| format!("cannot move the result to {}", args.output.display()))?;
            eprintln!(
                "wrote {} ({} tensors, {:.1} MiB from {:.1} MiB of weights) in {:.1} s",
                args.output.display(),
                report.tensors,
                report.output_bytes as f64 / (1 << 20) as f64,
                report.input_bytes as f64 / (1 << 20) as f64,
                report.seconds
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write(input: &Path, partial: &Path, quant: QuantType) -> anyhow::Result<llm_convert::ConvertReport> {
    let file = std::fs::File::create(partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut out = BufWriter::new(file);
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = llm_convert::convert(input, &mut out, quant, |p| {
        bar.set_length(p.total_bytes);
        bar.set_position(p.bytes_written);
        bar.set_message(p.tensor.to_string());
    })
    .with_context(|| format!("cannot convert {}", input.display()))?;
    bar.finish_and_clear();
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(report)
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    output.with_file_name(name)
}
