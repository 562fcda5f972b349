//! `llm distill`: a smaller student learns from a teacher's distribution (soft targets) and
//! the data's labels. The student starts as the teacher pruned to K evenly spaced layers
//! (DistilBERT's initialisation) or as a fresh model from a `config.json`; it is written as a
//! Hugging Face directory with the teacher's tokenizer files.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::error::{Result, TrainError};
use crate::finetune::{save, train, validate, Settings, StepMetrics, Summary, TrainingData};
use crate::lora::seeded;
use crate::loss::distillation_loss;
use crate::model::{TrainLlama, Trainable};
use crate::soft_targets::SoftTargets;

#[derive(Debug, Clone)]
pub enum Student {
    /// The teacher's first and last layers and evenly spaced ones between: K in all.
    Layers(usize),
    /// A fresh model (normal(0, 0.02) weights, as transformers initialises) of this config.
    Config(PathBuf),
}

#[derive(Debug, Clone)]
pub struct DistillSettings {
    pub train: Settings,
    pub student: Student,
    pub temperature: f64,
    /// Weight of the distillation term; `1 − alpha` goes to the labels' cross-entropy.
    pub alpha: f64,
    /// Learn from the teacher's top-k logits stored in this file (computed and written first
    /// when it does not exist) instead of running the teacher alongside the student.
    pub soft_targets: Option<PathBuf>,
    /// The k of stored soft targets.
    pub soft_top_k: usize,
}

/// Where the teacher's logits come from during training.
enum Teacher {
    Live(TrainLlama),
    Stored(SoftTargets),
}

pub fn distill(teacher_dir: &Path, data: &Path, output: &Path, settings: &DistillSettings, on_step: impl FnMut(&StepMetrics, usize) -> ControlFlow<()>) -> Result<Summary> {
    validate(&settings.train)?;
    if !(settings.temperature > 0.0) || !(0.0..=1.0).contains(&settings.alpha) {
        return Err(TrainError::Invalid("--temperature must be positive and --alpha in [0, 1]".into()));
    }
    let device = &settings.train.device;
    let data = TrainingData::load(teacher_dir, data, &settings.train)?;
    let load_teacher = || TrainLlama::load(teacher_dir, &Trainable::Frozen, device);
    let teacher = match &settings.soft_targets {
        Some(path) => Teacher::Stored(SoftTargets::load_or_compute(path, &data.examples, settings.soft_top_k, settings.train.batch_size, load_teacher)?),
        None => Teacher::Live(load_teacher()?),
    };
    let teacher_vocab = match &teacher {
        Teacher::Live(model) => model.config().vocab_size,
        Teacher::Stored(targets) => targets.vocab(),
    };
    // The student's starting checkpoint lives beside the output until training is done.
    let init = output.join(".student-init");
    // A resumed run keeps the student it started from; its trained weights are in the checkpoint.
    if !(settings.train.resume && init.exists()) {
        let _ = std::fs::remove_dir_all(&init);
        match &settings.student {
            Student::Layers(k) => prune_layers(teacher_dir, *k, &init)?,
            Student::Config(config) => fresh_model(teacher_dir, config, settings.train.seed, &init)?,
        }
    }
    let mut student = TrainLlama::load(&init, &Trainable::Full, device)?;
    student.set_qat(settings.train.qat);
    if student.config().vocab_size != teacher_vocab {
        return Err(TrainError::Invalid(format!("the student's vocabulary ({}) differs from the teacher's ({teacher_vocab})", student.config().vocab_size)));
    }
    let (t, alpha) = (settings.temperature, settings.alpha);
    let summary = train(&student, &data, output, &settings.train, |model, batch, seed| {
        let soft = match &teacher {
            Teacher::Live(teacher) => teacher.forward(&batch.ids, None)?.detach(),
            Teacher::Stored(targets) => targets.logits(batch.examples, batch.ids.dim(1)?, device)?,
        };
        distillation_loss(&model.forward(&batch.ids, Some(seed))?, &soft, &batch.ids, &batch.mask, t, alpha)
    }, on_step)?;
    if summary.completed {
        save(&student, &init, output, &Trainable::Full)?;
        let _ = std::fs::remove_dir_all(&init);
        crate::checkpoint::remove(output);
    }
    Ok(summary)
}

/// Writes the teacher with only `k` of its layers (renumbered) into `dir`.
pub fn prune_layers(teacher: &Path, k: usize, dir: &Path) -> Result<()> {
    let mut config = read_config(teacher)?;
    let layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    if k == 0 || k > layers {
        return Err(TrainError::Invalid(format!("--student-layers must be between 1 and the teacher's {layers}")));
    }
    let keep: Vec<usize> = (0..k).map(|i| if k == 1 { 0 } else { (i * (layers - 1) + (k - 1) / 2) / (k - 1) }).collect();
    let mut tensors = HashMap::new();
    for file in llm_engine::hf::safetensors_files(teacher)? {
        for (name, tensor) in candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| TrainError::file(&file, e))? {
            match layer_of(&name) {
                Some((layer, rest)) => {
                    if let Some(position) = keep.iter().position(|&l| l == layer) {
                        tensors.insert(format!("model.layers.{position}.{rest}"), tensor);
                    }
                }
                None => {
                    tensors.insert(name, tensor);
                }
            }
        }
    }
    config["num_hidden_layers"] = k.into();
    write_checkpoint(teacher, dir, &config, &tensors)
}

/// A model of `config_path`'s shape with transformers' initialisation, and the teacher's
/// tokenizer files.
pub(crate) fn fresh_model(teacher: &Path, config_path: &Path, seed: u64, dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config_path).map_err(|e| TrainError::file(config_path, e))?;
    let config_json: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::file(config_path, e))?;
    let c = llm_engine::LlamaConfig::from_hf_json(&text)?;
    let mut rng = seeded(seed);
    let mut normal = |shape: (usize, usize)| -> Result<Tensor> {
        // Box-Muller: N(0, 0.02²).
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                0.02 * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
            })
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let mut tensors = HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), normal((c.vocab_size, h))?);
    tensors.insert("model.norm.weight".to_string(), ones(h)?);
    if !c.tie_word_embeddings {
        tensors.insert("lm_head.weight".to_string(), normal((c.vocab_size, h))?);
    }
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", (q, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, q)),
            ("mlp.gate_proj", (f, h)),
            ("mlp.up_proj", (f, h)),
            ("mlp.down_proj", (h, f)),
        ] {
            tensors.insert(format!("{p}.{name}.weight"), normal(shape)?);
        }
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    write_checkpoint(teacher, dir, &config_json, &tensors)
}

/// `model.layers.{i}.{rest}` → `(i, rest)`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::file(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::file(&path, e))
}

/// `config` and `tensors` as a one-file checkpoint in `dir`, with the tokenizer files of `source`.
fn write_checkpoint(source: &Path, dir: &Path, config: &serde_json::Value, tensors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
    crate::merge::copy_other_files(source, dir, None, &["config.json", "model.safetensors.index.json"])?;
    crate::merge::write_json(&dir.join("config.json"), config)?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &path).map_err(|e| TrainError::file(&path, e))
}
