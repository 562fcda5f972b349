//! The Llama hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `rope_type: "linear"`, GGUF `rope.scaling.type = linear`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1+ frequency-dependent scaling (HF `rope_type: "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// `config.json` as transformers writes it for `LlamaForCausalLM` (v4 and v5 spellings).
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers v5 folds `rope_theta` and `rope_scaling` into this one object.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

/// Bounds on counts read from untrusted files (the largest Llama, 3.1 405B, has 126 layers of
/// 128 heads of 128 dimensions).
const MAX_LAYERS: usize = 512;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_DIM: usize = 1024;

impl LlamaConfig {
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| EngineError::Config(e.to_string()))?;
        let is_llama = hf.model_type.as_deref() == Some("llama") || hf.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            let name = hf.model_type.or_else(|| hf.architectures.first().cloned()).unwrap_or_else(|| "unknown".into());
            return Err(EngineError::UnsupportedArchitecture(name));
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err(EngineError::Config("attention_bias / mlp_bias are not supported".into()));
        }
        let rope = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let rope_theta = hf.rope_theta.or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64)).unwrap_or(10_000.0);
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling: rope.map(rope_scaling_from_hf).transpose()?.unwrap_or(RopeScaling::None),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects shapes that would make the forward pass ill-defined, and counts no real Llama has:
    /// what is planned or allocated from the config alone (one entry per layer, RoPE factors per
    /// head dimension) must stay small before any tensor vouches for it.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(EngineError::Config(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return fail("vocab_size, hidden_size and the number of layers must be positive".into());
        }
        if self.num_layers > MAX_LAYERS {
            return fail(format!("{} layers: more than {MAX_LAYERS} (llama.cpp's limit too)", self.num_layers));
        }
        if self.num_heads > MAX_HEADS || self.head_dim > MAX_HEAD_DIM {
            return fail(format!("{} heads of {} dimensions: at most {MAX_HEADS} heads of {MAX_HEAD_DIM}", self.num_heads, self.head_dim));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail(format!("{} attention heads cannot be shared by {} key/value heads", self.num_heads, self.num_kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail(format!("head_dim {} must be even and positive", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail("rms_norm_eps and rope_theta must be finite".into());
        }
        Ok(())
    }
}

fn rope_scaling_from_hf(v: &Value) -> Result<RopeScaling> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| v.get(key).and_then(Value::as_f64).ok_or_else(|| EngineError::Config(format!("rope scaling `{kind}` needs `{key}`")));
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => return Err(EngineError::Config(format!("unsupported rope scaling `{other}`"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama32_style_config() {
        let c = LlamaConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":100,
            "hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},
            "tie_word_embeddings":true}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.num_kv_heads, 2);
        assert!(c.tie_word_embeddings);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn rejects_other_architectures() {
        let err = LlamaConfig::from_hf_json(
            r#"{"model_type":"gpt2","vocab_size":1,"hidden_size":1,"intermediate_size":1,
            "num_hidden_layers":1,"num_attention_heads":1,"rms_norm_eps":1e-5}"#,
        )
        .unwrap_err();
        assert!(matches!(err, EngineError::UnsupportedArchitecture(a) if a == "gpt2"));
    }

    #[test]
    fn rejects_heads_not_divisible_by_kv_heads() {
        let err = LlamaConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":12,"intermediate_size":4,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"rms_norm_eps":1e-5}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("key/value heads"), "{err}");
    }

    /// Found by fuzzing: a layer count of 444,444,444,449 made the conversion plan list that many
    /// layers' tensors, and one from a GGUF made the loader reserve 610 GB, before any tensor was
    /// looked for.
    #[test]
    fn rejects_counts_no_llama_has() {
        let config = |layers: u64, heads: u64| {
            LlamaConfig::from_hf_json(&format!(
                r#"{{"model_type":"llama","vocab_size":10,"hidden_size":4096,"intermediate_size":4,
                "num_hidden_layers":{layers},"num_attention_heads":{heads},"rms_norm_eps":1e-5}}"#
            ))
        };
        assert!(config(126, 32).is_ok());
        assert!(config(444_444_444_449, 32).unwrap_err().to_string().contains("layers"));
        assert!(config(2, 4096).unwrap_err().to_string().contains("heads"));
    }
}
