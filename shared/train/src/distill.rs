//! `llm distill`: a smaller student learns from a teacher's distribution (soft targets) and
//! the data's labels. The student starts as the teacher pruned: to K evenly spaced layers
//! (DistilBERT's initialisation), or to a `config.json` that fits inside the teacher — fewer
//! layers and a narrower MLP, whose neurons are the teacher's most important ones (Minitron's
//! width pruning). A config that does not fit starts fresh. The student is written as a
//! Hugging Face directory with the teacher's tokenizer files.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::error::{Result, TrainError};
use crate::finetune::{save, train, validate, Settings, StepMetrics, Summary, TrainingData};
use crate::lora::seeded;
use crate::loss::{causal_lm_loss, distillation_loss};
use crate::model::{TrainLlama, Trainable};
use crate::soft_targets::SoftTargets;

#[derive(Debug, Clone)]
pub enum Student {
    /// The teacher's first and last layers and evenly spaced ones between: K in all.
    Layers(usize),
    /// This config: the teacher pruned to it when it fits inside the teacher (the same
    /// vocabulary, width, heads and tying; no more layers, no wider an MLP), otherwise a fresh
    /// model (normal(0, 0.02) weights, as transformers initialises).
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
    /// `alpha = 0`: the student learns from the labels alone and the teacher is never run.
    Unused {
        vocab: usize,
    },
}

pub fn distill(
    teacher_dir: &Path,
    data: &Path,
    output: &Path,
    settings: &DistillSettings,
    on_step: impl FnMut(&StepMetrics, usize) -> ControlFlow<()>,
) -> Result<Summary> {
    validate(&settings.train)?;
    if settings.temperature.is_nan() || settings.temperature <= 0.0 || !(0.0..=1.0).contains(&settings.alpha) {
        return Err(TrainError::Invalid("--temperature must be positive and --alpha in [0, 1]".into()));
    }
    let device = &settings.train.device;
    let data = TrainingData::load(teacher_dir, data, &settings.train)?;
    let load_teacher = || TrainLlama::load(teacher_dir, &Trainable::Frozen, device);
    let teacher = match &settings.soft_targets {
        _ if settings.alpha == 0.0 => Teacher::Unused { vocab: llm_engine::LlamaConfig::from_hf_json(&read_config(teacher_dir)?.to_string())?.vocab_size },
        Some(path) => Teacher::Stored(SoftTargets::load_or_compute(path, &data.examples, settings.soft_top_k, settings.train.batch_size, load_teacher)?),
        None => Teacher::Live(load_teacher()?),
    };
    let teacher_vocab = match &teacher {
        Teacher::Live(model) => model.config().vocab_size,
        Teacher::Stored(targets) => targets.vocab(),
        Teacher::Unused { vocab } => *vocab,
    };
    // The student's starting checkpoint lives beside the output until training is done.
    let init = output.join(".student-init");
    // A resumed run keeps the student it started from; its trained weights are in the checkpoint.
    if !(settings.train.resume && init.exists()) {
        let _ = std::fs::remove_dir_all(&init);
        match &settings.student {
            Student::Layers(k) => prune_layers(teacher_dir, *k, &init)?,
            Student::Config(config) => {
                let text = std::fs::read_to_string(config).map_err(|e| TrainError::file(config, e))?;
                let student = serde_json::from_str(&text).map_err(|e| TrainError::file(config, e))?;
                if fits_inside(&read_config(teacher_dir)?, &student)? {
                    prune(teacher_dir, student, &init)?
                } else {
                    fresh_model(teacher_dir, config, settings.train.seed, &init)?
                }
            }
        }
    }
    let mut student = TrainLlama::load(&init, &Trainable::Full, device)?;
    student.set_qat(settings.train.qat);
    if student.config().vocab_size != teacher_vocab {
        return Err(TrainError::Invalid(format!("the student's vocabulary ({}) differs from the teacher's ({teacher_vocab})", student.config().vocab_size)));
    }
    let (t, alpha) = (settings.temperature, settings.alpha);
    let summary = train(
        &student,
        &data,
        output,
        &settings.train,
        |model, batch, seed| {
            let logits = model.forward(&batch.ids, Some(seed))?;
            let soft = match &teacher {
                Teacher::Live(teacher) => teacher.forward(&batch.ids, None)?.detach(),
                Teacher::Stored(targets) => targets.logits(batch.examples, batch.ids.dim(1)?, device)?,
                Teacher::Unused { .. } => return causal_lm_loss(&logits, &batch.ids, &batch.mask),
            };
            distillation_loss(&logits, &soft, &batch.ids, &batch.mask, t, alpha)
        },
        on_step,
    )?;
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
    config["num_hidden_layers"] = k.into();
    prune(teacher, config, dir)
}

/// Whether a student of config `student` can start as the teacher pruned: the same vocabulary,
/// width, attention heads and embedding tying, no more layers and no wider an MLP.
fn fits_inside(teacher: &serde_json::Value, student: &serde_json::Value) -> Result<bool> {
    let (t, s) = (llm_engine::LlamaConfig::from_hf_json(&teacher.to_string())?, llm_engine::LlamaConfig::from_hf_json(&student.to_string())?);
    Ok((s.vocab_size, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.tie_word_embeddings)
        == (t.vocab_size, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.tie_word_embeddings)
        && (1..=t.num_layers).contains(&s.num_layers)
        && (1..=t.intermediate_size).contains(&s.intermediate_size))
}

/// Writes the teacher pruned to `config` (which [`fits_inside`] it) into `dir`: its first and
/// last layers and evenly spaced ones between, renumbered, and in each the MLP neurons that
/// matter most.
fn prune(teacher: &Path, config: serde_json::Value, dir: &Path) -> Result<()> {
    let shape = |c: &serde_json::Value| (c["num_hidden_layers"].as_u64().unwrap_or(0) as usize, c["intermediate_size"].as_u64().unwrap_or(0) as usize);
    let ((layers, _), (k, width)) = (shape(&read_config(teacher)?), shape(&config));
    let keep: Vec<usize> = (0..k).map(|i| if k == 1 { 0 } else { (i * (layers - 1) + (k - 1) / 2) / (k - 1) }).collect();
    let mut tensors = HashMap::new();
    let mut mlps: HashMap<usize, HashMap<String, Tensor>> = HashMap::new();
    for file in llm_engine::hf::safetensors_files(teacher)? {
        for (name, tensor) in candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| TrainError::file(&file, e))? {
            match layer_of(&name) {
                Some((layer, rest)) => {
                    if let Some(position) = keep.iter().position(|&l| l == layer) {
                        if rest.starts_with("mlp.") {
                            mlps.entry(position).or_default().insert(rest.to_string(), tensor);
                        } else {
                            tensors.insert(format!("model.layers.{position}.{rest}"), tensor);
                        }
                    }
                }
                None => {
                    tensors.insert(name, tensor);
                }
            }
        }
    }
    for (position, mlp) in mlps {
        for (rest, tensor) in narrow_mlp(mlp, width)? {
            tensors.insert(format!("model.layers.{position}.{rest}"), tensor);
        }
    }
    write_checkpoint(teacher, dir, &config, &tensors)
}

/// One layer's MLP (`mlp.gate_proj.weight`, `mlp.up_proj.weight`, `mlp.down_proj.weight`) cut
/// to its `width` most important neurons, in their original order. A neuron's importance is
/// the product of its three weight vectors' norms: it bounds how much the neuron can add to
/// the residual stream for an input of unit norm (a weight-only stand-in for Minitron's
/// activation-based score, so pruning needs no data).
fn narrow_mlp(mut mlp: HashMap<String, Tensor>, width: usize) -> Result<HashMap<String, Tensor>> {
    let mut take = |name: &str| mlp.remove(&format!("mlp.{name}.weight")).ok_or_else(|| TrainError::Invalid(format!("the teacher has no mlp.{name}.weight")));
    let (gate, up, down) = (take("gate_proj")?, take("up_proj")?, take("down_proj")?);
    if gate.dim(0)? == width {
        return Ok(HashMap::from([("mlp.gate_proj.weight".into(), gate), ("mlp.up_proj.weight".into(), up), ("mlp.down_proj.weight".into(), down)]));
    }
    let norms = |t: &Tensor, across: usize| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.sqr()?.sum(across)?.sqrt()?.to_vec1()?) };
    let (g, u, d) = (norms(&gate, 1)?, norms(&up, 1)?, norms(&down, 0)?);
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| (g[b] * u[b] * d[b]).total_cmp(&(g[a] * u[a] * d[a])));
    let mut kept: Vec<u32> = order[..width].iter().map(|&i| i as u32).collect();
    kept.sort_unstable();
    let kept = Tensor::new(kept, gate.device())?;
    Ok(HashMap::from([
        ("mlp.gate_proj.weight".into(), gate.index_select(&kept, 0)?),
        ("mlp.up_proj.weight".into(), up.index_select(&kept, 0)?),
        ("mlp.down_proj.weight".into(), down.index_select(&kept, 1)?),
    ]))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn teacher() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama2/hf")
    }

    fn weights(dir: &Path) -> HashMap<String, Tensor> {
        let mut tensors = HashMap::new();
        for file in llm_engine::hf::safetensors_files(dir).unwrap() {
            tensors.extend(candle_core::safetensors::load(&file, &Device::Cpu).unwrap());
        }
        tensors.into_iter().map(|(name, t)| (name, t.to_dtype(DType::F32).unwrap())).collect()
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn only_a_narrower_or_shallower_config_fits_inside() {
        let teacher = read_config(&teacher()).unwrap();
        let with = |key: &str, value: u64| {
            let mut config = teacher.clone();
            config[key] = value.into();
            config
        };
        assert!(fits_inside(&teacher, &teacher).unwrap());
        assert!(fits_inside(&teacher, &with("num_hidden_layers", 1)).unwrap());
        assert!(fits_inside(&teacher, &with("intermediate_size", 8)).unwrap());
        assert!(!fits_inside(&teacher, &with("num_hidden_layers", 3)).unwrap());
        assert!(!fits_inside(&teacher, &with("intermediate_size", 128)).unwrap());
        assert!(!fits_inside(&teacher, &with("num_key_value_heads", 2)).unwrap());
        assert!(!fits_inside(&teacher, &with("vocab_size", 100)).unwrap());
    }

    /// The student keeps the kept layers' attention whole and, of each MLP, the neurons (rows
    /// of gate and up, columns of down) with the largest norm product, in their order.
    #[test]
    fn width_pruning_keeps_the_most_important_neurons() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = read_config(&teacher()).unwrap();
        config["num_hidden_layers"] = 1.into();
        config["intermediate_size"] = 16.into();
        prune(&teacher(), config, dir.path()).unwrap();
        let (t, s) = (weights(&teacher()), weights(dir.path()));
        assert_eq!(s.len(), 3 + 9);
        assert_eq!(rows(&s["model.layers.0.self_attn.q_proj.weight"]), rows(&t["model.layers.0.self_attn.q_proj.weight"]));

        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let down = rows(&t["model.layers.0.mlp.down_proj.weight"].t().unwrap());
        let (gate, up) = (rows(&t["model.layers.0.mlp.gate_proj.weight"]), rows(&t["model.layers.0.mlp.up_proj.weight"]));
        let score: Vec<f32> = (0..gate.len()).map(|i| norm(&gate[i]) * norm(&up[i]) * norm(&down[i])).collect();
        let kept: Vec<usize> =
            rows(&s["model.layers.0.mlp.gate_proj.weight"]).iter().map(|row| gate.iter().position(|g| g == row).expect("a teacher neuron")).collect();
        assert!(kept.len() == 16 && kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
        let weakest_kept = kept.iter().map(|&i| score[i]).fold(f32::INFINITY, f32::min);
        assert!((0..gate.len()).filter(|i| !kept.contains(i)).all(|i| score[i] <= weakest_kept));
        let s_down = rows(&s["model.layers.0.mlp.down_proj.weight"].t().unwrap());
        for (j, &i) in kept.iter().enumerate() {
            assert_eq!((&rows(&s["model.layers.0.mlp.up_proj.weight"])[j], &s_down[j]), (&up[i], &down[i]));
        }
    }
}
