//! `llm finetune`: supervised fine-tuning of a Hugging Face checkpoint on JSONL data, all
//! weights or LoRA adapters, with AdamW, warmup + cosine, gradient accumulation and clipping.
//!
//! The output directory gets a Hugging Face checkpoint (full) or a PEFT adapter (LoRA),
//! `metrics.jsonl`: one line per optimiser step (`step`, `loss`, `lr`, `grad_norm`,
//! `tokens_per_s`, and `eval_loss` where evaluated), and `loss.png`, the loss curve.

use std::collections::HashMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::checkpoint;
use crate::data::{load_jsonl, Example, Overflow};
use crate::error::{Result, TrainError};
use crate::lora::{save_adapter, seeded};
use crate::loss::causal_lm_loss;
use crate::model::{TrainLlama, Trainable};
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::plot::{write_loss_curve, Point};
use crate::qat::QatType;

#[derive(Debug, Clone)]
pub struct Settings {
    pub trainable: Trainable,
    /// Optimiser steps; when `None`, `epochs` passes over the data.
    pub steps: Option<usize>,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_seq_len: usize,
    pub overflow: Overflow,
    pub eval_data: Option<PathBuf>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    pub seed: u64,
    /// Train quantization-aware for this GGUF type.
    pub qat: Option<QatType>,
    /// Write a checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Continue from the output's checkpoint when there is one.
    pub resume: bool,
    /// Where the model trains: the CPU, or a GPU when built with the `cuda` feature.
    pub device: Device,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trainable: Trainable::Full,
            steps: None,
            epochs: 1,
            lr: 2e-5,
            batch_size: 4,
            grad_accum: 1,
            warmup: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_seq_len: 512,
            overflow: Overflow::Truncate,
            eval_data: None,
            eval_every: 50,
            seed: 0,
            qat: None,
            checkpoint_every: 50,
            resume: false,
            device: Device::Cpu,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    /// False when `on_step` stopped the run: a checkpoint holds it, no model was written.
    pub completed: bool,
    /// The step the run resumed after.
    pub resumed_from: Option<usize>,
    pub examples: usize,
    pub truncated: usize,
    pub skipped: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
}

/// Trains `base` on `data` and writes the result into `output`. `on_step` sees every step's
/// metrics as it is written (progress bars, logs) and may stop the run (see [`train`]).
pub fn finetune(base: &Path, data: &Path, output: &Path, settings: &Settings, on_step: impl FnMut(&StepMetrics, usize) -> ControlFlow<()>) -> Result<Summary> {
    validate(settings)?;
    let data = TrainingData::load(base, data, settings)?;
    let mut model = TrainLlama::load(base, &settings.trainable, &settings.device)?;
    model.set_qat(settings.qat);
    let summary =
        train(&model, &data, output, settings, |model, batch, seed| causal_lm_loss(&model.forward(&batch.ids, Some(seed))?, &batch.ids, &batch.mask), on_step)?;
    if summary.completed {
        save(&model, base, output, &settings.trainable)?;
        checkpoint::remove(output);
    }
    Ok(summary)
}

/// Tokenized training and evaluation examples.
pub struct TrainingData {
    pub examples: Vec<Example>,
    pub eval: Option<Vec<Example>>,
    pub report: crate::data::DataReport,
}

impl TrainingData {
    /// `data` (and `settings.eval_data`) with the tokenizer and chat template of `model_dir`.
    pub fn load(model_dir: &Path, data: &Path, settings: &Settings) -> Result<Self> {
        let (tokenizer, template) = llm_engine::hf_tokenizer(model_dir)?;
        let (examples, report) = load_jsonl(data, &tokenizer, template.as_ref(), settings.max_seq_len, settings.overflow)?;
        let eval = match &settings.eval_data {
            Some(path) => Some(load_jsonl(path, &tokenizer, template.as_ref(), settings.max_seq_len, settings.overflow)?.0),
            None => None,
        };
        Ok(Self { examples, eval, report })
    }
}

/// One micro-batch: right-padded token ids and loss mask (`[b, s]`), and which of the
/// training examples (indices into [`TrainingData::examples`]) its rows are.
pub struct Batch<'a> {
    pub ids: Tensor,
    pub mask: Tensor,
    pub examples: &'a [usize],
}

/// The optimisation loop shared by fine-tuning and distillation: `loss(model, batch,
/// dropout_seed)` for each micro-batch (the seed follows from the run's seed and the
/// micro-batch's number, so a resumed run draws the same masks), gradients accumulated and
/// clipped, AdamW on the model's trainable parameters, `metrics.jsonl` and checkpoints in
/// `output`. Evaluation uses plain cross-entropy. `on_step` runs after the step's metrics line
/// and its checkpoint, when one is due, are written (so it may copy them elsewhere); when it
/// breaks, the run stops after a checkpoint (`completed: false`) and `settings.resume`
/// continues it exactly where it stopped.
pub fn train(
    model: &TrainLlama,
    data: &TrainingData,
    output: &Path,
    settings: &Settings,
    loss_fn: impl Fn(&TrainLlama, &Batch, u64) -> Result<Tensor>,
    mut on_step: impl FnMut(&StepMetrics, usize) -> ControlFlow<()>,
) -> Result<Summary> {
    validate(settings)?;
    let device = model.device().clone();
    let examples = &data.examples;
    let per_step = settings.batch_size * settings.grad_accum;
    let total = settings.steps.unwrap_or_else(|| examples.len().div_ceil(per_step) * settings.epochs).max(1);

    std::fs::create_dir_all(output).map_err(|e| TrainError::file(output, e))?;
    let vars: Vec<_> = model.trainable().iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(vars.clone(), settings.weight_decay)?;
    let mut batches = Batches::new(examples.len(), settings.batch_size, settings.seed);
    let resumed = match settings.resume {
        true => checkpoint::load(output, model.trainable(), &mut optimizer)?,
        false => None,
    };
    if let Some(progress) = resumed {
        (batches.epoch, batches.at) = (progress.epoch, progress.at);
        batches.order = Batches::order(examples.len(), settings.seed, progress.epoch);
    }
    let start = resumed.map_or(0, |p| p.step);
    let metrics_path = output.join("metrics.jsonl");
    let mut metrics = metrics_file(&metrics_path, start)?;
    let report = &data.report;
    let mut summary = Summary {
        steps: total,
        completed: true,
        resumed_from: resumed.map(|p| p.step),
        examples: report.examples,
        truncated: report.truncated,
        skipped: report.skipped,
        first_loss: f64::NAN,
        last_loss: f64::NAN,
        eval_loss: None,
    };

    for step in start..total {
        let started = Instant::now();
        let mut grads: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<_>>()?;
        let (mut loss_sum, mut tokens) = (0.0, 0usize);
        for micro in 0..settings.grad_accum {
            let indices = batches.next();
            let batch: Vec<&Example> = indices.iter().map(|&i| &examples[i]).collect();
            let (ids, mask) = pad(&batch, &device)?;
            tokens += batch.iter().map(|e| e.ids.len()).sum::<usize>();
            let dropout_seed = settings.seed ^ ((step * settings.grad_accum + micro) as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let loss = loss_fn(model, &Batch { ids, mask, examples: &indices }, dropout_seed)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(TrainError::NonFinite { step: step + 1, output: output.to_path_buf() });
            }
            loss_sum += value;
            let step_grads = (loss / settings.grad_accum as f64)?.backward()?;
            for (sum, var) in grads.iter_mut().zip(&vars) {
                if let Some(g) = step_grads.get(var.as_tensor()) {
                    *sum = (&*sum + g)?;
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, settings.max_grad_norm)?;
        let lr = learning_rate(settings.lr, step, settings.warmup, total);
        optimizer.step(&grads, lr)?;
        let loss = loss_sum / settings.grad_accum as f64;
        let last = step + 1 == total;
        let eval_loss = match &data.eval {
            Some(eval) if last || (step + 1) % settings.eval_every.max(1) == 0 => Some(evaluate(model, eval, settings.batch_size, &device)?),
            _ => None,
        };
        let line = StepMetrics { step: step + 1, loss, lr, grad_norm, tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9), eval_loss };
        let json = serde_json::to_string(&line).map_err(|e| TrainError::file(&metrics_path, e))?;
        writeln!(metrics, "{json}").map_err(|e| TrainError::file(&metrics_path, e))?;
        if step == start {
            summary.first_loss = loss;
        }
        summary.last_loss = loss;
        summary.eval_loss = eval_loss.or(summary.eval_loss);
        let progress = checkpoint::Progress { step: step + 1, epoch: batches.epoch, at: batches.at };
        let due = !last && settings.checkpoint_every > 0 && (step + 1) % settings.checkpoint_every == 0;
        if due {
            checkpoint::save(output, model.trainable(), &optimizer, progress)?;
        }
        if on_step(&line, total).is_break() {
            if !due {
                checkpoint::save(output, model.trainable(), &optimizer, progress)?;
            }
            summary.completed = false;
            break;
        }
    }
    drop(metrics);
    write_loss_curve(&read_points(&metrics_path)?, &output.join("loss.png"))?;
    Ok(summary)
}

/// The `(step, loss, eval loss)` of every line of `metrics.jsonl`.
fn read_points(path: &Path) -> Result<Vec<Point>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?;
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| TrainError::file(path, e))?;
            Ok((v["step"].as_u64().unwrap_or(0) as usize, v["loss"].as_f64().unwrap_or(f64::NAN), v["eval_loss"].as_f64()))
        })
        .collect()
}

/// `metrics.jsonl` with its first `keep` lines (the steps a resumed run already made).
fn metrics_file(path: &Path, keep: usize) -> Result<std::fs::File> {
    let kept: Vec<String> = match keep {
        0 => Vec::new(),
        _ => std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?.lines().take(keep).map(str::to_string).collect(),
    };
    let mut file = std::fs::File::create(path).map_err(|e| TrainError::file(path, e))?;
    for line in kept {
        writeln!(file, "{line}").map_err(|e| TrainError::file(path, e))?;
    }
    Ok(file)
}

pub fn validate(s: &Settings) -> Result<()> {
    let bad = |m: &str| Err(TrainError::Invalid(m.into()));
    if s.batch_size == 0 || s.grad_accum == 0 {
        return bad("--batch-size and --grad-accum must be at least 1");
    }
    if s.max_seq_len < 2 {
        return bad("--max-seq-len must be at least 2");
    }
    if !(s.lr.is_finite() && s.lr > 0.0) {
        return bad("--lr must be a positive number");
    }
    if s.steps == Some(0) || (s.steps.is_none() && s.epochs == 0) {
        return bad("nothing to do: --steps or --epochs is 0");
    }
    Ok(())
}

/// Mean loss over `examples`, without gradients or dropout.
pub fn evaluate(model: &TrainLlama, examples: &[Example], batch_size: usize, device: &Device) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let batch: Vec<&Example> = chunk.iter().collect();
        let (ids, mask) = pad(&batch, device)?;
        let loss = causal_lm_loss(&model.forward(&ids, None)?.detach(), &ids, &mask)?;
        let weight = batch.iter().map(|e| e.mask.iter().skip(1).filter(|&&m| m == 1).count()).sum::<usize>();
        total += loss.to_scalar::<f32>()? as f64 * weight as f64;
        count += weight;
    }
    Ok(total / count.max(1) as f64)
}

/// Right-padded ids and loss mask `[b, longest]`; padding never counts.
pub(crate) fn pad(batch: &[&Example], device: &Device) -> Result<(Tensor, Tensor)> {
    let longest = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(batch.len() * longest);
    let mut mask = Vec::with_capacity(batch.len() * longest);
    for e in batch {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(0, longest - e.ids.len())));
        mask.extend(e.mask.iter().map(|&m| m as u32).chain(std::iter::repeat_n(0, longest - e.ids.len())));
    }
    Ok((Tensor::from_vec(ids, (batch.len(), longest), device)?, Tensor::from_vec(mask, (batch.len(), longest), device)?))
}

/// Example indices in batches: every example once per epoch, in an order that depends only
/// on the seed and the epoch (so that a checkpoint's `(epoch, at)` is the whole state).
struct Batches {
    order: Vec<usize>,
    epoch: u64,
    at: usize,
    size: usize,
    seed: u64,
}

impl Batches {
    fn new(examples: usize, size: usize, seed: u64) -> Self {
        Self { order: Self::order(examples, seed, 0), epoch: 0, at: 0, size: size.min(examples).max(1), seed }
    }

    fn order(examples: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..examples).collect();
        order.shuffle(&mut seeded(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        order
    }

    fn next(&mut self) -> Vec<usize> {
        if self.at + self.size > self.order.len() {
            self.epoch += 1;
            self.order = Self::order(self.order.len(), self.seed, self.epoch);
            self.at = 0;
        }
        let batch = self.order[self.at..self.at + self.size].to_vec();
        self.at += self.size;
        batch
    }
}

/// A PEFT adapter for LoRA; for full fine-tuning a Hugging Face directory with the base's
/// other files and each weight in the base's dtype.
pub fn save(model: &TrainLlama, base: &Path, output: &Path, trainable: &Trainable) -> Result<()> {
    match trainable {
        Trainable::Lora { config, .. } => save_adapter(output, config, base.to_str(), &model.adapters()),
        Trainable::Frozen => Err(TrainError::Invalid("a frozen model has nothing to save".into())),
        Trainable::Full => {
            let files = llm_engine::hf::safetensors_files(base)?;
            let dtypes: HashMap<String, DType> = llm_engine::hf::tensor_infos(&files)?
                .into_iter()
                .map(|(name, dtype, _)| {
                    (
                        name,
                        match dtype.as_str() {
                            "F16" => DType::F16,
                            "BF16" => DType::BF16,
                            _ => DType::F32,
                        },
                    )
                })
                .collect();
            let mut tensors = HashMap::new();
            for (name, var) in model.trainable() {
                let dtype = dtypes.get(name).copied().unwrap_or(DType::F32);
                tensors.insert(name.clone(), var.as_tensor().to_dtype(dtype)?);
            }
            let path = output.join("model.safetensors");
            candle_core::safetensors::save(&tensors, &path).map_err(|e| TrainError::file(&path, e))?;
            crate::merge::copy_other_files(base, output, None, &["model.safetensors.index.json"])
        }
    }
}
