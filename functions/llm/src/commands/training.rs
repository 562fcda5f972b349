//! The options `llm finetune` and `llm distill` share, how a run reports progress, and how
//! `s3://` inputs and outputs are staged through a local directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use llm_store::{sync, Location, S3};
use llm_train::checkpoint;

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
    /// JSONL: {"prompt", "completion"}, {"messages": [...]} or {"text"} per line (a path or
    /// s3://bucket/key).
    #[arg(long)]
    pub data: String,
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
    pub eval_data: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, or cuda (the first GPU; needs a build with `--features cuda`).
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
    /// The run's settings, with `--eval-data` staged into `staging` when it is on S3.
    pub fn settings(&self, trainable: Trainable, default_lr: f64, staging: &Staging) -> anyhow::Result<Settings> {
        let device = match self.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(0).context("--device cuda: no usable GPU, or `llm` was built without `--features cuda`")?,
            other => anyhow::bail!("--device {other}: expected cpu or cuda"),
        };
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
            eval_data: self.eval_data.as_deref().map(|uri| staging.input(uri, "eval")).transpose()?,
            eval_every: self.eval_every,
            seed: self.seed,
            qat: self.qat.as_deref().map(str::parse).transpose()?,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            device,
        })
    }
}

/// Set by SIGTERM (AWS Batch stopping or reclaiming the job) or Ctrl-C.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns SIGTERM and SIGINT into a request to stop after the current step, with a checkpoint.
fn stop_on_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            STOP.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
}

/// A progress bar over the run's steps, showing the latest loss and learning rate; the run
/// stops (after a checkpoint) once a stop signal arrived. Each new checkpoint is copied to S3
/// when the output is there.
fn progress<'a>(
    remote: Option<&'a RemoteCheckpoint>,
    checkpoint_every: usize,
) -> (indicatif::ProgressBar, impl FnMut(&StepMetrics, usize) -> std::ops::ControlFlow<()> + 'a) {
    stop_on_signals();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let updates = bar.clone();
    (bar, move |m: &StepMetrics, total: usize| {
        updates.set_length(total as u64);
        updates.set_position(m.step as u64);
        updates.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
        if let Some(remote) = remote.filter(|_| checkpoint_every > 0 && m.step.is_multiple_of(checkpoint_every) && m.step < total) {
            // A failed copy costs only the progress since the last one: the run goes on.
            if let Err(err) = remote.push() {
                tracing::warn!(step = m.step, error = %format!("{err:#}"), "cannot copy the checkpoint to S3");
            }
        }
        match STOP.load(std::sync::atomic::Ordering::SeqCst) {
            true => std::ops::ControlFlow::Break(()),
            false => std::ops::ControlFlow::Continue(()),
        }
    })
}

/// An S3 output's checkpoint kept on S3 (`<output>/checkpoint/`, with `metrics.jsonl`), so
/// that a run stopped on one machine (a Spot reclaim, a Batch retry) resumes on another.
struct RemoteCheckpoint {
    s3: S3,
    bucket: String,
    prefix: String,
    local: PathBuf,
}

impl RemoteCheckpoint {
    fn new(output: &Location, local: &Path) -> anyhow::Result<Option<Self>> {
        let Location::S3 { bucket, .. } = output else { return Ok(None) };
        let Location::S3 { key, .. } = output.join("checkpoint/") else { return Ok(None) };
        Ok(Some(Self { s3: S3::connect()?, bucket: bucket.clone(), prefix: key, local: local.to_path_buf() }))
    }

    /// Brings the S3 checkpoint (if any) into the local output; whether there was one.
    fn pull(&self) -> anyhow::Result<bool> {
        let dir = checkpoint::dir(&self.local);
        std::fs::create_dir_all(&dir)?;
        if !sync::download_prefix(&self.s3, &self.bucket, &self.prefix, &dir)? {
            return Ok(false);
        }
        std::fs::rename(dir.join("metrics.jsonl"), self.local.join("metrics.jsonl")).context("the S3 checkpoint has no metrics.jsonl")?;
        Ok(true)
    }

    fn push(&self) -> anyhow::Result<()> {
        sync::upload_dir(&self.s3, &checkpoint::dir(&self.local), &self.bucket, &self.prefix)?;
        let metrics = std::fs::read(self.local.join("metrics.jsonl"))?;
        Ok(self.s3.put(&self.bucket, &format!("{}metrics.jsonl", self.prefix), metrics)?)
    }

    /// Removes the S3 checkpoint once the finished output is published.
    fn clear(&self) -> anyhow::Result<()> {
        for object in self.s3.list(&self.bucket, &self.prefix)? {
            self.s3.delete(&self.bucket, &object.key)?;
        }
        Ok(())
    }
}

fn report(summary: &Summary, output: &str) {
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
        output
    );
}

/// Stages `source` and the data, runs `job(source, data, output, on_step)` under a progress
/// bar, publishes the output and reports: the part `llm finetune` and `llm distill` share.
pub fn run_staged<F>(staging: &Staging, source: &str, args: &TrainArgs, output: &str, what: &str, job: F) -> anyhow::Result<()>
where
    F: FnOnce(&Path, &Path, &Path, &mut dyn FnMut(&StepMetrics, usize) -> std::ops::ControlFlow<()>) -> llm_train::Result<Summary>,
{
    let (source_dir, data, local_output) = (staging.input(source, "source")?, staging.input(&args.data, "data")?, staging.output(output)?);
    let remote = RemoteCheckpoint::new(&Location::parse(output)?, &local_output)?;
    if let Some(remote) = remote.as_ref().filter(|_| args.resume) {
        if remote.pull().with_context(|| format!("cannot read the checkpoint under {output}"))? {
            eprintln!("resuming from the checkpoint under {output}");
        }
    }
    let (bar, mut on_step) = progress(remote.as_ref(), args.checkpoint_every);
    let summary = job(&source_dir, &data, &local_output, &mut on_step).with_context(|| format!("{what} {source} failed"))?;
    bar.finish_and_clear();
    if !summary.completed {
        let place = match &remote {
            Some(remote) => {
                remote.push().with_context(|| format!("cannot copy the checkpoint to {output}"))?;
                output.to_string()
            }
            None => local_output.display().to_string(),
        };
        anyhow::bail!("stopped by a signal with a checkpoint in {place}: run the same command with --resume to continue");
    }
    staging.publish(&local_output, output)?;
    if let Some(remote) = &remote {
        remote.clear().with_context(|| format!("cannot remove the finished run's checkpoint under {output}"))?;
    }
    report(&summary, output);
    Ok(())
}

/// A run's local working copies of `s3://` inputs and outputs, removed when the run ends:
/// [`sync::Staging`] taking the command line's URIs.
pub struct Staging(sync::Staging);

impl Staging {
    pub fn new() -> Self {
        Self(sync::Staging::new("staging"))
    }

    /// A local path for `uri` (a path, an S3 object, or an S3 prefix ending in `/`).
    pub fn input(&self, uri: &str, name: &str) -> anyhow::Result<PathBuf> {
        self.0.input(&Location::parse(uri)?, name).with_context(|| format!("cannot read {uri}"))
    }

    /// Where to write the output named `uri`: itself, or a staging directory to publish.
    pub fn output(&self, uri: &str) -> anyhow::Result<PathBuf> {
        Ok(self.0.output(&Location::parse(uri)?))
    }

    /// Uploads the staged output to `uri` when it is on S3.
    pub fn publish(&self, local: &Path, uri: &str) -> anyhow::Result<()> {
        self.0.publish(local, &Location::parse(uri)?).with_context(|| format!("cannot upload to {uri}"))
    }
}
