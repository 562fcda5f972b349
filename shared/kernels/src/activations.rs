//! Activations quantized to 8-bit blocks, the form the integer dot products take them in.

use crate::blocks::BLOCK;

/// `rows` rows of activations as `i8`, with an `f32` scale per `group` values (32 for the legacy
/// weight types, 256 for K-quants, whose sub-block sums then add up as integers) and the sum of
/// every 32 quantized values (what the K-quants' per-sub-block minimums multiply).
/// llama.cpp stores the legacy scale as `f16`; `f32` is as cheap here and loses nothing.
pub struct QuantizedRows {
    cols: usize,
    group: usize,
    scales: Vec<f32>,
    values: Vec<i8>,
    sums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x`, rows of `cols` values (a multiple of `group`, itself a multiple of 32):
    /// each group scaled so that its largest magnitude becomes ±127, rounded to nearest.
    pub fn new(x: &[f32], cols: usize, group: usize) -> Self {
        debug_assert!(group % BLOCK == 0 && cols % group == 0 && x.len() % cols == 0);
        let mut scales = Vec::with_capacity(x.len() / group);
        let mut values = vec![0i8; x.len()];
        for (chunk, out) in x.chunks_exact(group).zip(values.chunks_exact_mut(group)) {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (q, v) in out.iter_mut().zip(chunk) {
                *q = (v * inv).round() as i8;
            }
            scales.push(d);
        }
        let sums = values.chunks_exact(BLOCK).map(|b| b.iter().map(|&q| q as i32).sum()).collect();
        Self { cols, group, scales, values, sums }
    }

    pub fn rows(&self) -> usize {
        self.values.len() / self.cols
    }

    /// Row `i`: its scales (one per group), values, and sums of 32 values.
    pub fn row(&self, i: usize) -> (&[f32], &[i8], &[i32]) {
        let (groups, blocks) = (self.cols / self.group, self.cols / BLOCK);
        (
            &self.scales[i * groups..(i + 1) * groups],
            &self.values[i * self.cols..(i + 1) * self.cols],
            &self.sums[i * blocks..(i + 1) * blocks],
        )
    }
}
