//! Names of GGML quantization types and the rules for when a tensor cannot use one.

use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};

/// Parses a type name as llama.cpp spells it (`q8_0`, `q4_k`, `f16`, ...), case-insensitively.
pub fn parse_ggml_dtype(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => {
            return Err(EngineError::InvalidRequest(format!(
                "unknown quantization type `{other}` (expected one of f32 f16 bf16 q8_0 q4_0 q4_1 \
                 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k)"
            )))
        }
    })
}

/// The type a row of `row_len` values can be stored in when `wanted` is asked for: `wanted`
/// itself when the row is a whole number of blocks, otherwise llama.cpp's fallback for K-quants
/// (`tensor_type_fallback` in `llama-quant.cpp`), otherwise `None` (llama.cpp then uses F16).
pub fn type_for_row(wanted: GgmlDType, row_len: usize) -> Option<GgmlDType> {
    let fits = |t: GgmlDType| row_len > 0 && row_len.is_multiple_of(t.block_size());
    if fits(wanted) {
        return Some(wanted);
    }
    let fallback = match wanted {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => return None,
    };
    fits(fallback).then_some(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_quants_fall_back_like_llama_cpp() {
        assert_eq!(type_for_row(GgmlDType::Q4K, 512), Some(GgmlDType::Q4K));
        assert_eq!(type_for_row(GgmlDType::Q4K, 64), Some(GgmlDType::Q5_0));
        assert_eq!(type_for_row(GgmlDType::Q6K, 96), Some(GgmlDType::Q8_0));
        assert_eq!(type_for_row(GgmlDType::Q8_0, 48), None);
    }

    #[test]
    fn parses_names() {
        assert_eq!(parse_ggml_dtype("Q4_K").unwrap(), GgmlDType::Q4K);
        assert!(parse_ggml_dtype("q9_9").is_err());
    }
}
