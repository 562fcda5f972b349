//! A differentiable Llama for training, read from a Hugging Face directory: the engine's
//! architecture (RMSNorm, RoPE with Llama 3 scaling, grouped-query attention, SwiGLU) written
//! with ops that have gradients, in f32, over whole right-padded sequences.
//!
//! Weights are either all trainable (full fine-tuning) or frozen with LoRA adapters on the
//! chosen projections; [`TrainLlama::trainable`] names what the optimiser updates.

use std::path::Path;

use candle_core::{Device, Tensor, Var, D};
use candle_nn::ops::{rms_norm_slow, softmax};
use candle_nn::rotary_emb::rope_slow;
use llm_engine::config::LlamaConfig;
use llm_engine::hf::{self, SafetensorsSource};
use llm_engine::rope::{Rope, RopeLayout};
use llm_engine::weights::{LayerTensor, TensorName, Weight, WeightSource};

use crate::error::{Result, TrainError};
use crate::lora::{load_adapter, peft_prefix, seeded, Lora, LoraConfig};
use crate::qat::{straight_through, QatType};

/// A projection: a weight `[out, in]` and, with LoRA, its adapter.
pub struct Linear {
    pub weight: Tensor,
    pub lora: Option<Lora>,
    /// Quantization-aware training: the forward pass sees the weight on this grid.
    pub qat: Option<QatType>,
}

impl Linear {
    fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let weight = match self.qat {
            Some(ty) => straight_through(&self.weight, ty)?,
            None => self.weight.clone(),
        };
        let y = x.broadcast_matmul(&weight.t()?)?;
        match &self.lora {
            Some(lora) => Ok((y + lora.forward(x, dropout_seed)?)?),
            None => Ok(y),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// The projections by PEFT module name (the order of [`crate::lora::MODULES`]).
    fn projections(&self) -> [(&'static str, &Linear); 7] {
        [
            ("q_proj", &self.q),
            ("k_proj", &self.k),
            ("v_proj", &self.v),
            ("o_proj", &self.o),
            ("gate_proj", &self.gate),
            ("up_proj", &self.up),
            ("down_proj", &self.down),
        ]
    }

    fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("q_proj", &mut self.q),
            ("k_proj", &mut self.k),
            ("v_proj", &mut self.v),
            ("o_proj", &mut self.o),
            ("gate_proj", &mut self.gate),
            ("up_proj", &mut self.up),
            ("down_proj", &mut self.down),
        ]
    }
}

/// How a run trains the model.
#[derive(Debug, Clone)]
pub enum Trainable {
    /// Every weight.
    Full,
    /// Adapters on the configured projections; the base stays frozen.
    Lora { config: LoraConfig, seed: u64 },
    /// Nothing (a distillation teacher).
    Frozen,
}

pub struct TrainLlama {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `None` when the output projection is the token embedding (tied).
    lm_head: Option<Tensor>,
    rope: Rope,
    /// What the optimiser updates, by the name it is saved under (Hugging Face or PEFT).
    trainable: Vec<(String, Var)>,
    device: Device,
}

impl TrainLlama {
    /// Reads the Hugging Face checkpoint in `dir` (f32/f16/bf16 safetensors) as f32.
    pub fn load(dir: &Path, trainable: &Trainable, device: &Device) -> Result<Self> {
        let config = hf::read_config(dir)?;
        let files = hf::safetensors_files(dir)?;
        let mut source = SafetensorsSource::open(&files, device)?;
        let full = matches!(trainable, Trainable::Full);
        let mut params = Vec::new();
        let mut take = |name: TensorName| -> Result<Option<Tensor>> {
            let Some(weight) = source.load(name)? else { return Ok(None) };
            let tensor = match weight {
                Weight::Dense(t) => t,
                quantized => quantized.to_f32()?.to_device(device)?,
            };
            if full {
                let var = Var::from_tensor(&tensor)?;
                params.push((name.hf(), var.clone()));
                Ok(Some(var.as_tensor().clone()))
            } else {
                Ok(Some(tensor))
            }
        };
        let mut need = |name: TensorName| take(name)?.ok_or_else(|| TrainError::file(dir, format!("missing tensor {}", name.hf())));
        let embed = need(TensorName::TokenEmbedding)?;
        let norm = need(TensorName::OutputNorm)?;
        // Not preallocated: the count comes from config.json, and only the tensors vouch for it.
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            let mut tensor = |t| need(TensorName::Layer(i, t));
            let linear = |weight| Linear { weight, lora: None, qat: None };
            layers.push(Layer {
                attn_norm: tensor(LayerTensor::AttnNorm)?,
                q: linear(tensor(LayerTensor::Q)?),
                k: linear(tensor(LayerTensor::K)?),
                v: linear(tensor(LayerTensor::V)?),
                o: linear(tensor(LayerTensor::O)?),
                ffn_norm: tensor(LayerTensor::FfnNorm)?,
                gate: linear(tensor(LayerTensor::Gate)?),
                up: linear(tensor(LayerTensor::Up)?),
                down: linear(tensor(LayerTensor::Down)?),
            });
        }
        let lm_head = if config.tie_word_embeddings { None } else { Some(need(TensorName::Output)?) };
        let rope = Rope::new(&config, None, RopeLayout::Halves, device)?;
        let mut model = Self { config, embed, layers, norm, lm_head, rope, trainable: params, device: device.clone() };
        if let Trainable::Lora { config, seed } = trainable {
            model.add_adapters(config, *seed)?;
        }
        Ok(model)
    }

    fn add_adapters(&mut self, config: &LoraConfig, seed: u64) -> Result<()> {
        config.validate()?;
        let mut rng = seeded(seed);
        let device = self.device.clone();
        self.attach(config, |_, in_dim, out_dim| Lora::new(config, in_dim, out_dim, &mut rng, &device))
    }

    /// Puts the PEFT adapter in `dir` on the (frozen) base; its matrices become trainable.
    pub fn apply_adapter(&mut self, dir: &Path) -> Result<()> {
        let (config, mut pairs) = load_adapter(dir, &self.device)?;
        config.validate()?;
        self.attach(&config, |prefix, in_dim, out_dim| {
            let (a, b) = pairs.remove(prefix).ok_or_else(|| TrainError::file(dir, format!("the adapter has no {prefix}")))?;
            if a.dims() != [config.r, in_dim] || b.dims() != [out_dim, config.r] {
                return Err(TrainError::file(
                    dir,
                    format!("{prefix}: A {:?} and B {:?} do not fit [{out_dim}, {in_dim}] at rank {}", a.dims(), b.dims(), config.r),
                ));
            }
            Ok(Lora { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scaling: config.scaling(), dropout: config.dropout })
        })?;
        match pairs.keys().next() {
            Some(extra) => Err(TrainError::file(dir, format!("{extra} is not a projection of this model's targeted modules"))),
            None => Ok(()),
        }
    }

    /// Gives every targeted projection the adapter `make(peft_prefix, in, out)` returns.
    fn attach(&mut self, config: &LoraConfig, mut make: impl FnMut(&str, usize, usize) -> Result<Lora>) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (module, linear) in layer.projections_mut() {
                if config.targets(module) {
                    let (out_dim, in_dim) = linear.weight.dims2()?;
                    let prefix = peft_prefix(i, module);
                    let lora = make(&prefix, in_dim, out_dim)?;
                    self.trainable.push((format!("{prefix}.lora_A.weight"), lora.a.clone()));
                    self.trainable.push((format!("{prefix}.lora_B.weight"), lora.b.clone()));
                    linear.lora = Some(lora);
                }
            }
        }
        Ok(())
    }

    /// From now on the projections are trained quantization-aware.
    pub fn set_qat(&mut self, qat: Option<QatType>) {
        for layer in &mut self.layers {
            for (_, linear) in layer.projections_mut() {
                linear.qat = qat;
            }
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// The adapters by PEFT prefix, for saving.
    pub fn adapters(&self) -> Vec<(String, &Lora)> {
        let mut adapters = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (module, linear) in layer.projections() {
                if let Some(lora) = &linear.lora {
                    adapters.push((peft_prefix(i, module), lora));
                }
            }
        }
        adapters
    }

    /// Logits `[b, s, vocab]` for token ids `[b, s]` (causal attention; padding goes at the end
    /// of a row, where the loss mask ignores it). A `dropout_seed` means training: LoRA dropout
    /// is on, each projection drawing its mask from its own seed derived from this one.
    pub fn forward(&self, tokens: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let (b, s) = tokens.dims2()?;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let positions = Tensor::arange(0u32, s as u32, &self.device)?.unsqueeze(0)?;
        let (cos, sin) = self.rope.cos_sin(&positions)?;
        let (cos, sin) = (cos.squeeze(0)?, sin.squeeze(0)?);
        let mask = causal_mask(s, &self.device)?;
        let mut x = self.embed.embedding(&tokens.flatten_all()?)?.reshape((b, s, c.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let seed = |module: u64| dropout_seed.map(|s| s ^ ((i as u64) << 8 | module).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let h = rms_norm_slow(&x, &layer.attn_norm, eps)?;
            let heads = |t: Tensor, n: usize| t.reshape((b, s, n, c.head_dim))?.transpose(1, 2)?.contiguous();
            let q = rope_slow(&heads(layer.q.forward(&h, seed(0))?, c.num_heads)?, &cos, &sin)?;
            let k = rope_slow(&heads(layer.k.forward(&h, seed(1))?, c.num_kv_heads)?, &cos, &sin)?;
            let v = heads(layer.v.forward(&h, seed(2))?, c.num_kv_heads)?;
            let (k, v) = (repeat_kv(&k, c.num_heads / c.num_kv_heads)?, repeat_kv(&v, c.num_heads / c.num_kv_heads)?);
            let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?.broadcast_add(&mask)?;
            let attended = softmax(&scores, D::Minus1)?.matmul(&v)?;
            let attended = attended.transpose(1, 2)?.reshape((b, s, c.num_heads * c.head_dim))?;
            x = (x + layer.o.forward(&attended, seed(3))?)?;
            let h = rms_norm_slow(&x, &layer.ffn_norm, eps)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&h, seed(4))?)? * layer.up.forward(&h, seed(5))?)?;
            x = (x + layer.down.forward(&gated, seed(6))?)?;
        }
        let x = rms_norm_slow(&x, &self.norm, eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(x.broadcast_matmul(&head.t()?)?)
    }
}

/// `[s, s]`: 0 where a query may see a key (at or before it), -inf after.
fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    Ok(Tensor::from_vec(mask, (s, s), device)?)
}

/// Grouped-query attention: each key/value head serves `n` query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, n, s, d))?.reshape((b, kv * n, s, d))?)
}
