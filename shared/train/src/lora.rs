//! LoRA adapters as Hugging Face PEFT defines them: for a frozen linear `W` (`[out, in]`), two
//! trainable matrices `A` (`[r, in]`, Kaiming-uniform) and `B` (`[out, r]`, zero) add
//! `scaling · B · A · x`, with `scaling = lora_alpha / r` (or `/ √r` with rsLoRA). The files
//! are PEFT's: `adapter_config.json` and `adapter_model.safetensors` with PEFT's key names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use llm_engine::adapter::{lora_scaling, AdapterConfig, LoraPairs, PeftAdapter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainError};

/// The projections of a Llama layer, by the names PEFT's `target_modules` uses.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, dropout: 0.05, target_modules: vec!["q_proj".into(), "v_proj".into()], use_rslora: false }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(TrainError::Invalid("--lora-rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainError::Invalid("--lora-dropout must be in [0, 1)".into()));
        }
        if let Some(unknown) = self.target_modules.iter().find(|m| !MODULES.contains(&m.as_str())) {
            return Err(TrainError::Invalid(format!("unknown target module `{unknown}` (Llama has {})", MODULES.join(", "))));
        }
        if self.target_modules.is_empty() {
            return Err(TrainError::Invalid("--target-modules names no module".into()));
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        lora_scaling(self.alpha, self.r, self.use_rslora)
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }
}

/// One adapted projection's trainable pair.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f32,
}

impl Lora {
    /// PEFT's initialisation: `A ~ U(-1/√in, 1/√in)` (Kaiming-uniform with a = √5), `B = 0`.
    pub fn new(config: &LoraConfig, in_dim: usize, out_dim: usize, rng: &mut StdRng, device: &Device) -> Result<Self> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..config.r * in_dim).map(|_| rng.random_range(-bound..bound)).collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (config.r, in_dim), device)?)?,
            b: Var::zeros((out_dim, config.r), DType::F32, device)?,
            scaling: config.scaling(),
            dropout: config.dropout,
        })
    }

    /// `scaling · B · A · dropout(x)` for `x` `[.., in]`; dropout only while training, with
    /// a mask drawn from `dropout_seed` so that runs (and resumed runs) repeat exactly.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let keep = 1.0 - self.dropout;
                let mut rng = seeded(seed);
                let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f32>() < keep { 1.0 / keep } else { 0.0 }).collect();
                (x * Tensor::from_vec(mask, x.shape(), x.device())?)?
            }
            _ => x.clone(),
        };
        let down = x.broadcast_matmul(&self.a.as_tensor().t()?)?;
        Ok((down.broadcast_matmul(&self.b.as_tensor().t()?)? * self.scaling)?)
    }

    /// The weight update `scaling · B · A` (`[out, in]`) that merging adds to the base.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }
}

/// PEFT's key for a layer's projection, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
pub fn peft_prefix(layer: usize, module: &str) -> String {
    let block = if ["gate_proj", "up_proj", "down_proj"].contains(&module) { "mlp" } else { "self_attn" };
    format!("base_model.model.model.layers.{layer}.{block}.{module}")
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn save_adapter(dir: &Path, config: &LoraConfig, base: Option<&str>, adapters: &[(String, &Lora)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
    let adapter_config = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        base_model_name_or_path: base.map(str::to_string),
        r: config.r,
        lora_alpha: config.alpha,
        lora_dropout: config.dropout,
        target_modules: config.target_modules.clone(),
        bias: "none".into(),
        use_rslora: config.use_rslora,
        fan_in_fan_out: false,
        inference_mode: true,
        use_dora: false,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
    };
    crate::merge::write_json(&dir.join("adapter_config.json"), &adapter_config)?;
    let mut tensors = HashMap::new();
    for (prefix, lora) in adapters {
        tensors.insert(format!("{prefix}.lora_A.weight"), lora.a.as_tensor().clone());
        tensors.insert(format!("{prefix}.lora_B.weight"), lora.b.as_tensor().clone());
    }
    let path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| TrainError::file(&path, e))
}

/// Reads a PEFT LoRA adapter directory: its settings and its `A`/`B` tensors by PEFT prefix.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<(LoraConfig, LoraPairs)> {
    let adapter = PeftAdapter::read(dir, device)?;
    let c = adapter.config;
    let lora = LoraConfig { r: c.r, alpha: c.lora_alpha, dropout: c.lora_dropout, target_modules: c.target_modules, use_rslora: c.use_rslora };
    Ok((lora, adapter.pairs))
}

/// A fresh generator for adapter initialisation.
pub fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
