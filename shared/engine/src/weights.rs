//! Format-neutral access to a Llama checkpoint's tensors.
//!
//! Each file format (Hugging Face safetensors, GGUF) implements [`WeightSource`]; the model is
//! built from canonical [`TensorName`]s and never sees format-specific names.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};

/// One tensor of a Llama decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// A tensor of the model, independent of the file format that stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorName {
    TokenEmbedding,
    OutputNorm,
    Output,
    /// llama.cpp's per-frequency RoPE divisors (Llama 3.1+ scaling), GGUF only.
    RopeFreqs,
    Layer(usize, LayerTensor),
}

impl TensorName {
    /// The name in a Hugging Face `LlamaForCausalLM` checkpoint.
    pub fn hf(self) -> String {
        use LayerTensor::*;
        match self {
            Self::TokenEmbedding => "model.embed_tokens.weight".into(),
            Self::OutputNorm => "model.norm.weight".into(),
            Self::Output => "lm_head.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, t) => {
                let suffix = match t {
                    AttnNorm => "input_layernorm",
                    Q => "self_attn.q_proj",
                    K => "self_attn.k_proj",
                    V => "self_attn.v_proj",
                    O => "self_attn.o_proj",
                    FfnNorm => "post_attention_layernorm",
                    Gate => "mlp.gate_proj",
                    Up => "mlp.up_proj",
                    Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{suffix}.weight")
            }
        }
    }

    /// The name llama.cpp gives the tensor in a GGUF file.
    pub fn gguf(self) -> String {
        use LayerTensor::*;
        match self {
            Self::TokenEmbedding => "token_embd.weight".into(),
            Self::OutputNorm => "output_norm.weight".into(),
            Self::Output => "output.weight".into(),
            Self::RopeFreqs => "rope_freqs.weight".into(),
            Self::Layer(i, t) => {
                let suffix = match t {
                    AttnNorm => "attn_norm",
                    Q => "attn_q",
                    K => "attn_k",
                    V => "attn_v",
                    O => "attn_output",
                    FfnNorm => "ffn_norm",
                    Gate => "ffn_gate",
                    Up => "ffn_up",
                    Down => "ffn_down",
                };
                format!("blk.{i}.{suffix}.weight")
            }
        }
    }
}

/// A loaded tensor: plain f32, or still in a GGML block format.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
        }
    }

    /// The tensor as f32, dequantizing if needed (for small tensors such as norms).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.to_dtype(DType::F32)?,
            Self::Quantized(q) => q.dequantize(&q.device())?,
        })
    }
}

/// Where the model's tensors come from.
pub trait WeightSource {
    /// Loads one tensor, or `None` when the checkpoint does not have it.
    fn load(&mut self, name: TensorName) -> Result<Option<Weight>>;

    /// Human-readable name of `name` in this format, for error messages.
    fn display_name(&self, name: TensorName) -> String;
}

/// Loads a tensor that must exist and have `expected` dims (PyTorch order: `[out, in]`).
pub(crate) fn load_expected(
    source: &mut dyn WeightSource,
    name: TensorName,
    expected: &[usize],
) -> Result<Weight> {
    let display = source.display_name(name);
    let weight = source
        .load(name)?
        .ok_or_else(|| EngineError::tensor(&display, "missing from the checkpoint"))?;
    check_dims(&display, weight.dims(), expected)?;
    Ok(weight)
}

pub(crate) fn check_dims(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(EngineError::tensor(
            name,
            format!("has shape {actual:?}, the config implies {expected:?}"),
        ));
    }
    Ok(())
}

/// Quantizes a 2-D weight to `dtype` at load time. Rows whose length is not a multiple of the
/// type's block size get llama.cpp's fallback type instead; tensors that fit none stay f32.
pub(crate) fn quantize_weight(weight: Weight, dtype: GgmlDType) -> Result<Weight> {
    let tensor = match &weight {
        Weight::Dense(t) => t.clone(),
        Weight::Quantized(q) if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
            q.dequantize(&q.device())?
        }
        // Already quantized by whoever wrote the file: re-quantizing would only add error.
        Weight::Quantized(_) => return Ok(weight),
    };
    let row_len = tensor.dims().last().copied().unwrap_or(0);
    match crate::quant::type_for_row(dtype, row_len) {
        Some(dtype) => Ok(Weight::Quantized(Arc::new(QTensor::quantize(&tensor, dtype)?))),
        None => Ok(Weight::Dense(tensor)),
    }
}
