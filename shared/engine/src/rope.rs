//! Rotary position embeddings, including Llama 3 frequency scaling.

use candle_core::{DType, Device, Tensor};

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::Result;

/// Which halves of a head a rotation pairs up. Hugging Face checkpoints rotate the first half
/// against the second; llama.cpp permutes the Q/K rows when converting so that adjacent
/// elements pair up instead. Both give the same attention scores on their own weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Halves,
    Interleaved,
}

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[1, 1, head_dim / 2]`, so that positions `[b, s, 1]` broadcast against it.
    inv_freq: Tensor,
    layout: RopeLayout,
}

impl Rope {
    /// `factors` are GGUF's `rope_freqs` tensor: each frequency is divided by its factor. They
    /// replace the scaling described in the config, which GGUF files do not carry.
    pub fn new(config: &LlamaConfig, factors: Option<&[f32]>, layout: RopeLayout, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config, factors);
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), device)?;
        Ok(Self { inv_freq, layout })
    }

    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    /// Rotates `x` (`[b, heads, s, head_dim]`) to the per-row positions `[b, s]` (u32).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.layout {
            RopeLayout::Halves => candle_nn::rotary_emb::rope(x, cos, sin)?,
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
        })
    }

    /// cos and sin tables `[b, s, head_dim / 2]` for the positions `[b, s]`.
    pub fn cos_sin(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let freqs = positions.to_dtype(DType::F32)?.unsqueeze(2)?.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
    }
}

/// The per-pair rotation speeds: `theta^(-2i/d)` (in f32, as transformers computes it), each
/// divided by its scaling factor.
fn inverse_frequencies(config: &LlamaConfig, factors: Option<&[f32]>) -> Vec<f32> {
    let from_config = scaling_factors(config);
    let factors = factors.or(from_config.as_deref());
    base_frequencies(config).into_iter().enumerate().map(|(i, f)| factors.and_then(|s| s.get(i)).map_or(f, |s| f / s)).collect()
}

fn base_frequencies(config: &LlamaConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta as f32;
    (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect()
}

/// Per-frequency divisors for the config's RoPE scaling: what llama.cpp stores as the
/// `rope_freqs` tensor for Llama 3 scaling. `None` without scaling.
pub fn scaling_factors(config: &LlamaConfig) -> Option<Vec<f32>> {
    let freqs = base_frequencies(config);
    match config.rope_scaling {
        RopeScaling::None => None,
        RopeScaling::Linear { factor } => Some(vec![factor as f32; freqs.len()]),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old_ctx } => {
            let (factor, low, high, old_ctx) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, old_ctx as f32);
            let (low_freq_wavelen, high_freq_wavelen) = (old_ctx / low, old_ctx / high);
            Some(
                freqs
                    .iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            1.0
                        } else if wavelen > low_freq_wavelen {
                            factor
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            1.0 / ((1.0 - smooth) / factor + smooth)
                        }
                    })
                    .collect(),
            )
        }
    }
}

/// llama.cpp's Q/K row order: within each of `heads` heads, rows `[half 0 | half 1]` of a
/// `[heads · head_dim, cols]` matrix become interleaved pairs, so that its RoPE (adjacent
/// pairs) equals Hugging Face's (halves) on the same weights.
pub fn interleave_heads(rows: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, cols) = rows.dims2()?;
    let half = out / heads / 2;
    Ok(rows.reshape((heads, 2, half, cols))?.transpose(1, 2)?.contiguous()?.reshape((out, cols))?)
}
