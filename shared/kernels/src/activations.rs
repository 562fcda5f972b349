//! Activations quantized to 8-bit blocks, the form the integer dot products take them in.

use crate::blocks::BLOCK;

/// `rows` rows of activations, each cut into 32-value blocks of `i8` with an `f32` scale
/// (llama.cpp stores the scale as `f16`; `f32` is as cheap here and loses nothing).
pub struct QuantizedRows {
    cols: usize,
    scales: Vec<f32>,
    values: Vec<i8>,
}

impl QuantizedRows {
    /// Quantizes `x`, rows of `cols` values (a multiple of 32): each block scaled so that its
    /// largest magnitude becomes ±127, rounded to nearest.
    pub fn new(x: &[f32], cols: usize) -> Self {
        debug_assert!(cols % BLOCK == 0 && x.len() % cols == 0);
        let blocks = x.len() / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut values = vec![0i8; x.len()];
        for (block, out) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (q, v) in out.iter_mut().zip(block) {
                *q = (v * inv).round() as i8;
            }
            scales.push(d);
        }
        Self { cols, scales, values }
    }

    pub fn rows(&self) -> usize {
        self.scales.len() * BLOCK / self.cols
    }

    /// Row `i`'s block scales and values.
    pub fn row(&self, i: usize) -> (&[f32], &[i8]) {
        let blocks = self.cols / BLOCK;
        (&self.scales[i * blocks..(i + 1) * blocks], &self.values[i * self.cols..(i + 1) * self.cols])
    }
}
