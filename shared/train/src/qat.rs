//! Quantization-aware training: the forward pass sees each projection's weights as they will
//! be after GGUF quantization (Q8_0 or Q4_0, blocks of 32 along the input dimension, ggml's
//! exact rounding), while gradients flow to the full-precision weights unchanged (the
//! straight-through estimator). Weights whose rows are not whole blocks stay as they are, as
//! the GGUF converter leaves them.

use candle_core::{DType, Tensor, D};

use crate::error::{Result, TrainError};

const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QatType {
    Q8_0,
    Q4_0,
}

impl std::str::FromStr for QatType {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            other => Err(TrainError::Invalid(format!("--qat {other}: q8_0 or q4_0"))),
        }
    }
}

/// `w` rounded to the type's grid, as quantizing and dequantizing it would give.
pub fn fake_quantize(w: &Tensor, ty: QatType) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let Some(&cols) = dims.last() else { return Ok(w.clone()) };
    if cols % BLOCK != 0 {
        return Ok(w.clone());
    }
    let blocks = w.detach().to_dtype(DType::F32)?.reshape(((), BLOCK))?;
    // ggml rounds with `x · (1/d)` in f32 and stores d as f16; a zero block stays zero.
    let inverse = |d: &Tensor| -> Result<Tensor> {
        let zero = d.eq(0f64)?.to_dtype(DType::F32)?;
        Ok(((d + &zero)?.recip()? * (1.0 - &zero)?)?)
    };
    let stored = |d: &Tensor| -> Result<Tensor> { Ok(d.to_dtype(DType::F16)?.to_dtype(DType::F32)?) };
    let rounded = match ty {
        QatType::Q8_0 => {
            // d = max|x| / 127; q = roundf(x / d).
            let d = (blocks.abs()?.max_keepdim(D::Minus1)? / 127.0)?;
            let q = round_half_away(&blocks.broadcast_mul(&inverse(&d)?)?)?;
            q.broadcast_mul(&stored(&d)?)?
        }
        QatType::Q4_0 => {
            // d = (the value of largest magnitude) / -8; q = min(15, trunc(x / d + 8.5)).
            let largest = blocks.abs()?.argmax_keepdim(D::Minus1)?;
            let d = (blocks.gather(&largest, D::Minus1)? / -8.0)?;
            let q = (blocks.broadcast_mul(&inverse(&d)?)? + 8.5)?.floor()?.clamp(0f32, 15f32)?;
            (q - 8.0)?.broadcast_mul(&stored(&d)?)?
        }
    };
    Ok(rounded.reshape(dims)?.to_dtype(w.dtype())?)
}

/// The quantized weights forward, the identity backward.
pub fn straight_through(w: &Tensor, ty: QatType) -> Result<Tensor> {
    let noise = (fake_quantize(w, ty)? - w.detach())?;
    Ok((w + noise.detach())?)
}

fn round_half_away(x: &Tensor) -> Result<Tensor> {
    Ok((x.sign()? * (x.abs()? + 0.5)?.floor()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};

    /// The grid is ggml's: fake-quantized weights equal candle's quantize → dequantize, which
    /// writes the same blocks as llama-quantize.
    #[test]
    fn fake_quantization_equals_ggml_round_trip() {
        let device = Device::Cpu;
        let mut values: Vec<f32> = (0..8 * 64).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 64) as f32)).collect();
        values[64..96].iter_mut().for_each(|v| *v = 0.0);
        let w = Tensor::from_vec(values, (8, 64), &device).unwrap();
        for (ty, ggml) in [(QatType::Q8_0, GgmlDType::Q8_0), (QatType::Q4_0, GgmlDType::Q4_0)] {
            let ours = fake_quantize(&w, ty).unwrap();
            let reference = QTensor::quantize(&w, ggml).unwrap().dequantize(&device).unwrap();
            let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{ty:?}: {diff}");
        }
    }

    #[test]
    fn gradients_pass_straight_through() {
        let w = Var::from_tensor(&Tensor::new(&[[0.3f32; 32]], &Device::Cpu).unwrap()).unwrap();
        let y = straight_through(w.as_tensor(), QatType::Q4_0).unwrap();
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|&x| x == 3.0));
    }
}
