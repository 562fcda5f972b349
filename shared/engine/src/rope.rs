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
    pub fn new(
        config: &LlamaConfig,
        factors: Option<&[f32]>,
        layout: RopeLayout,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = inverse_frequencies(config, factors);
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), device)?;
        Ok(Self { inv_freq, layout })
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
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(2)?
            .broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
    }
}

/// The per-pair rotation speeds, computed in f32 as transformers does.
fn inverse_frequencies(config: &LlamaConfig, factors: Option<&[f32]>) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta as f32;
    let mut inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    if let Some(factors) = factors {
        for (f, factor) in inv_freq.iter_mut().zip(factors) {
            *f /= factor;
        }
        return inv_freq;
    }
    match config.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor as f32),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            for f in inv_freq.iter_mut() {
                let freq = *f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                *f = if wavelen < high_freq_wavelen {
                    freq
                } else if wavelen > low_freq_wavelen {
                    freq / factor
                } else {
                    let smooth =
                        (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                } as f32;
            }
        }
    }
    inv_freq
}
