//! Output types and llama.cpp's rules for which tensors get which GGML type
//! (`llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp`, for dense Llama models).

use candle_core::quantized::GgmlDType;
use llm_engine::weights::{LayerTensor, TensorName};

use crate::error::{ConvertError, Result};

/// An output format, named as `llama-quantize` names it. `q3_k`, `q4_k` and `q5_k` are the
/// `_M` mixtures, as in `llama-quantize` (and `q2_k` is its Q2_K mixture).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3KM,
    Q4KS,
    Q4KM,
    Q5KM,
    Q6K,
}

impl std::str::FromStr for QuantType {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q5_0" => Self::Q5_0,
            "q5_1" => Self::Q5_1,
            "q2_k" => Self::Q2K,
            "q3_k" | "q3_k_m" => Self::Q3KM,
            "q4_k_s" => Self::Q4KS,
            "q4_k" | "q4_k_m" => Self::Q4KM,
            "q5_k" | "q5_k_m" => Self::Q5KM,
            "q6_k" => Self::Q6K,
            _ => return Err(ConvertError::UnknownType(s.to_string())),
        })
    }
}

impl QuantType {
    /// llama.cpp's `llama_ftype`, stored as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q2K => 10,
            Self::Q3KM => 12,
            Self::Q4KS => 14,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::BF16 => 32,
        }
    }

    /// The file's name suffix (`llama-quantize`'s spelling, lower case).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q2K => "q2_k",
            Self::Q3KM => "q3_k_m",
            Self::Q4KS => "q4_k_s",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q6K => "q6_k",
        }
    }

    fn base(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3KM => GgmlDType::Q3K,
            Self::Q4KS | Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }
}

/// What the type rules need to know about the model.
pub struct ModelShape {
    pub num_layers: usize,
    /// Query heads per KV head.
    pub gqa: usize,
    pub tied_embeddings: bool,
}

/// The GGML type of one tensor with `row_len` columns.
pub fn tensor_type(q: QuantType, name: TensorName, row_len: usize, dims: usize, model: &ModelShape) -> GgmlDType {
    use LayerTensor::*;
    // Norms, rope_freqs and other vectors stay f32 in every format.
    if dims < 2 {
        return GgmlDType::F32;
    }
    if !q.is_quantized() {
        return q.base();
    }
    let n = model.num_layers;
    let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2;
    let base = q.base();
    let wanted = match name {
        TensorName::Output => output_type(base, row_len),
        TensorName::TokenEmbedding if model.tied_embeddings => output_type(base, row_len),
        TensorName::Layer(i, V) => match q {
            QuantType::Q2K if model.gqa >= 4 => GgmlDType::Q4K,
            QuantType::Q2K => GgmlDType::Q3K,
            QuantType::Q3KM if i < 2 => GgmlDType::Q5K,
            QuantType::Q3KM => GgmlDType::Q4K,
            QuantType::Q4KM | QuantType::Q5KM if more_bits(i) => GgmlDType::Q6K,
            QuantType::Q4KS if i < 4 => GgmlDType::Q5K,
            _ => base,
        },
        TensorName::Layer(i, Down) => match q {
            QuantType::Q2K => GgmlDType::Q3K,
            QuantType::Q3KM if i < n / 16 => GgmlDType::Q5K,
            QuantType::Q3KM => GgmlDType::Q4K,
            QuantType::Q4KM | QuantType::Q5KM if more_bits(i) => GgmlDType::Q6K,
            QuantType::Q4KS if i < n / 8 => GgmlDType::Q5K,
            _ => base,
        },
        TensorName::Layer(_, O) => match q {
            QuantType::Q2K => GgmlDType::Q3K,
            QuantType::Q3KM => GgmlDType::Q4K,
            _ => base,
        },
        _ => base,
    };
    fallback(wanted, row_len)
}

/// llama.cpp gives the output head (and a tied embedding) 6 bits unless it asked for 8.
fn output_type(base: GgmlDType, row_len: usize) -> GgmlDType {
    if !row_len.is_multiple_of(base.block_size()) {
        GgmlDType::Q8_0
    } else if base != GgmlDType::Q8_0 {
        GgmlDType::Q6K
    } else {
        base
    }
}

/// llama.cpp's `tensor_type_fallback` for rows that are not a whole number of blocks.
fn fallback(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    llm_engine::quant::type_for_row(wanted, row_len).unwrap_or(GgmlDType::F16)
}
