//! `llm quantize`: a Hugging Face checkpoint (local directory or `s3://` prefix) to a
//! llama.cpp-compatible GGUF file (local path or `s3://` key).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use llm_convert::{CheckpointSource, ConvertReport, QuantType};
use llm_store::{Location, S3};

/// S3 multipart part size: large enough for few requests, small enough to bound memory.
const PART_SIZE: usize = 64 << 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory or s3://bucket/prefix/ (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub input: String,
    /// The GGUF file to write: a path or s3://bucket/key.gguf.
    #[arg(long)]
    pub output: String,
    /// f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q4_k_m q5_k_m q4_k_s
    #[arg(long = "type")]
    pub quant_type: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let quant: QuantType = args.quant_type.parse()?;
    let input = CheckpointSource::open(Location::parse(&args.input)?)?;
    let bar =
        ProgressBar::new(0).with_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let convert = |out: &mut dyn Write| -> anyhow::Result<ConvertReport> {
        let report = llm_convert::convert(&input, &mut WriteRef(out), quant, |p| {
            bar.set_length(p.total_bytes);
            bar.set_position(p.bytes_written);
            bar.set_message(p.tensor.to_string());
        })
        .with_context(|| format!("cannot convert {}", args.input))?;
        bar.finish_and_clear();
        Ok(report)
    };
    // Either way the output appears under its name only once it is complete.
    let report = match Location::parse(&args.output)? {
        Location::S3 { bucket, key } => {
            let s3 = S3::connect()?;
            let mut upload = BufWriter::new(s3.multipart(&bucket, &key, PART_SIZE)?);
            let report = convert(&mut upload)?;
            upload.into_inner().map_err(|e| e.into_error())?.finish()?;
            report
        }
        Location::Local(path) => write_file(&path, convert)?,
    };
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB from {:.1} MiB of weights) in {:.1} s",
        args.output,
        report.tensors,
        report.output_bytes as f64 / (1 << 20) as f64,
        report.input_bytes as f64 / (1 << 20) as f64,
        report.seconds
    );
    Ok(())
}

/// Writes beside the destination and renames when complete; removes the partial file on error.
fn write_file(path: &Path, convert: impl FnOnce(&mut dyn Write) -> anyhow::Result<ConvertReport>) -> anyhow::Result<ConvertReport> {
    let partial = partial_path(path);
    let result = (|| {
        let file = std::fs::File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
        let mut out = BufWriter::new(file);
        let report = convert(&mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&partial, path).with_context(|| format!("cannot move the result to {}", path.display()))?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    output.with_file_name(name)
}

/// `convert` takes `impl Write`; this lets one closure serve both destinations.
struct WriteRef<'a>(&'a mut dyn Write);

impl Write for WriteRef<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
