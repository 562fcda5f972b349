//! Activations quantized to 8-bit blocks, the form the integer dot products take them in.

use std::sync::OnceLock;

use crate::blocks::BLOCK;

/// Rows per tile of [`Interleaved`].
pub const TILE_ROWS: usize = 8;

/// `rows` rows of activations as `i8`, with an `f32` scale per `group` values (32 for the legacy
/// weight types, 256 for K-quants, whose sub-block sums then add up as integers) and the sums of
/// every 32 and every 16 quantized values (what the K-quants' per-sub-block minimums multiply:
/// Q4_K's and Q5_K's sub-blocks are 32 values, Q2_K's 16).
/// llama.cpp stores the legacy scale as `f16`; `f32` is as cheap here and loses nothing.
pub struct QuantizedRows {
    cols: usize,
    group: usize,
    scales: Vec<f32>,
    values: Vec<i8>,
    sums: Vec<i32>,
    sums16: Vec<i16>,
    interleaved: OnceLock<Interleaved>,
}

/// The same rows interleaved for a kernel that multiplies 4 bytes of many weight rows by the
/// same 4 activation bytes (`vpdpbusd` with a broadcast operand): tiles of [`TILE_ROWS`] rows
/// (the last one padded with zero rows), and within a tile, per group of `group` values, the
/// first 4 bytes of every row, then the next 4, and so on; per group and row, the activation
/// scale and the scale times the group's sum. A tile's operands then lie in one stream that a
/// single pointer walks.
pub struct Interleaved {
    pub group: usize,
    /// `[tile][group][quad][row of the tile][4 bytes]`.
    pub values: Vec<i8>,
    /// `[tile][group][row of the tile]`.
    pub scales: Vec<f32>,
    /// `[tile][group][row of the tile]`.
    pub scaled_sums: Vec<f32>,
}

impl QuantizedRows {
    /// Quantizes `x`, rows of `cols` values (a multiple of `group`, itself a multiple of 32):
    /// each group scaled so that its largest magnitude becomes ±127, rounded to nearest.
    pub fn new(x: &[f32], cols: usize, group: usize) -> Self {
        debug_assert!(group % BLOCK == 0 && cols % group == 0 && x.len() % cols == 0);
        let mut scales = Vec::with_capacity(x.len() / group);
        let mut values = vec![0i8; x.len()];
        for (chunk, out) in x.chunks_exact(group).zip(values.chunks_exact_mut(group)) {
            // Eight running maxima, so that the loop vectorizes.
            let lanes = chunk.chunks_exact(8).fold([0f32; 8], |m, v| std::array::from_fn(|l| m[l].max(v[l].abs())));
            let amax = lanes.into_iter().fold(0f32, f32::max);
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            // Ties to even, as llama.cpp's SIMD quantizers round (one instruction, unlike
            // `round`).
            for (q, v) in out.iter_mut().zip(chunk) {
                *q = (v * inv).round_ties_even() as i8;
            }
            scales.push(d);
        }
        let sums16: Vec<i16> = values.chunks_exact(BLOCK / 2).map(|b| b.iter().map(|&q| q as i16).sum()).collect();
        let sums = sums16.chunks_exact(2).map(|pair| pair[0] as i32 + pair[1] as i32).collect();
        Self { cols, group, scales, values, sums, sums16, interleaved: OnceLock::new() }
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

    /// Row `i`'s sums of 16 values (at most 16 · 127 in magnitude).
    pub fn sums16(&self, i: usize) -> &[i16] {
        let per_row = self.cols / (BLOCK / 2);
        &self.sums16[i * per_row..(i + 1) * per_row]
    }

    /// The rows [`Interleaved`] in groups of `group` values (16 or 32), built by the first
    /// caller (the threads of one product share it) and kept for the others.
    pub fn interleaved(&self, group: usize) -> &Interleaved {
        let built = self.interleaved.get_or_init(|| self.interleave(group));
        assert_eq!(built.group, group, "one product interleaves its activations one way");
        built
    }

    fn interleave(&self, group: usize) -> Interleaved {
        debug_assert!(group % 4 == 0 && self.cols % group == 0 && self.group % group == 0);
        let groups = self.cols / group;
        let padded = self.rows().next_multiple_of(TILE_ROWS);
        let mut out = Interleaved {
            group,
            values: vec![0; padded * self.cols],
            scales: vec![0.0; padded * groups],
            scaled_sums: vec![0.0; padded * groups],
        };
        for i in 0..self.rows() {
            let (tile, row) = (i / TILE_ROWS, i % TILE_ROWS);
            let (scales, values, _) = self.row(i);
            for g in 0..groups {
                let group_values = &values[g * group..(g + 1) * group];
                let d = scales[g * group / self.group];
                let at = (tile * groups + g) * TILE_ROWS + row;
                out.scales[at] = d;
                out.scaled_sums[at] = d * group_values.iter().map(|&q| q as i32).sum::<i32>() as f32;
                for (quad, four) in group_values.chunks_exact(4).enumerate() {
                    let at = (tile * groups + g) * group * TILE_ROWS + (quad * TILE_ROWS + row) * 4;
                    out.values[at..at + 4].copy_from_slice(four);
                }
            }
        }
        out
    }
}
