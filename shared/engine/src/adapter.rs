//! LoRA adapters in Hugging Face PEFT's files: `adapter_config.json` and
//! `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`, `[r, in]`, and
//! `...lora_B.weight`, `[out, r]`). The update of a projection `W` is `scaling · B · A`, with
//! `scaling = lora_alpha / r` (`/ √r` with rsLoRA). Only plain LoRA is read: no bias, DoRA,
//! `fan_in_fan_out` or per-module rank/alpha patterns.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// `adapter_config.json`: the fields PEFT needs to load a LoRA onto its base.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub target_modules: Vec<String>,
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

impl AdapterConfig {
    pub fn scaling(&self) -> f64 {
        lora_scaling(self.lora_alpha, self.r, self.use_rslora)
    }
}

/// How much of `B · A` a LoRA adds: `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn lora_scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// An adapter's `(A, B)` matrices by PEFT prefix, e.g.
/// `base_model.model.model.layers.0.self_attn.q_proj`.
pub type LoraPairs = HashMap<String, (Tensor, Tensor)>;

/// An adapter read from disk: its settings and its pairs (f32).
pub struct PeftAdapter {
    pub config: AdapterConfig,
    pub pairs: LoraPairs,
}

impl PeftAdapter {
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| EngineError::io(&config_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| EngineError::invalid_file(&config_path, e))?;
        if config.peft_type != "LORA" {
            return Err(EngineError::invalid_file(&config_path, format!("peft_type is `{}`, not LORA", config.peft_type)));
        }
        if config.fan_in_fan_out || config.bias != "none" || config.use_dora || !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return Err(EngineError::invalid_file(
                &config_path,
                "only plain LoRA is supported (no bias, DoRA, fan_in_fan_out or per-module rank/alpha patterns)",
            ));
        }
        let path = dir.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, device).map_err(|e| EngineError::invalid_file(&path, e))?;
        let prefixes: Vec<String> = tensors.keys().filter_map(|k| k.strip_suffix(".lora_A.weight")).map(str::to_string).collect();
        let mut pairs = HashMap::new();
        for prefix in prefixes {
            let missing = || EngineError::invalid_file(&path, format!("{prefix}: lora_A without lora_B"));
            let a = tensors.remove(&format!("{prefix}.lora_A.weight")).ok_or_else(missing)?;
            let b = tensors.remove(&format!("{prefix}.lora_B.weight")).ok_or_else(missing)?;
            if a.dims().first() != Some(&config.r) || b.dims().get(1) != Some(&config.r) {
                return Err(EngineError::invalid_file(&path, format!("{prefix}: A {:?} / B {:?} are not of rank {}", a.dims(), b.dims(), config.r)));
            }
            pairs.insert(prefix, (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?));
        }
        Ok(Self { config, pairs })
    }
}

/// `(layer, module)` of a PEFT prefix such as `base_model.model.model.layers.3.mlp.down_proj`.
pub fn layer_module(prefix: &str) -> Option<(usize, &str)> {
    let rest = prefix.strip_prefix("base_model.model.model.layers.")?;
    let (index, path) = rest.split_once('.')?;
    let module = path.strip_prefix("self_attn.").or_else(|| path.strip_prefix("mlp."))?;
    Some((index.parse().ok()?, module))
}
