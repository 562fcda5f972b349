//! Activations quantized to 8-bit blocks, the form the integer dot products take them in.

use std::ops::Range;

use crate::blocks::BLOCK;
use crate::OutPtr;

/// Rows per tile of [`Interleaved`].
pub const TILE_ROWS: usize = 8;

/// `rows` rows of activations as `i8`, with an `f32` scale per `group` values (32 for the legacy
/// weight types, 256 for K-quants, whose sub-block sums then add up as integers) and the sums of
/// every 32 and every 16 quantized values (what the K-quants' per-sub-block minimums multiply:
/// Q4_K's and Q5_K's sub-blocks are 32 values, Q2_K's 16).
/// llama.cpp stores the legacy scale as `f16`; `f32` is as cheap here and loses nothing.
pub struct QuantizedRows {
    cols: usize,
    /// Scales per row: `cols / group`, kept so that [`QuantizedRows::row`], which a decode step
    /// calls for every tile, divides nothing.
    groups: usize,
    scales: Vec<f32>,
    values: Vec<i8>,
    sums: Vec<i32>,
    sums16: Vec<i16>,
    interleaved: Option<Interleaved>,
}

/// The same rows interleaved for a kernel that multiplies 4 bytes of many weight rows by the
/// same 4 activation bytes (`vpdpbusd` with a broadcast operand): tiles of [`TILE_ROWS`] rows
/// (the last one padded with zero rows), and within a tile, per group of `group` values, the
/// first 4 bytes of every row, then the next 4, and so on; per group and row, the activation
/// scale, the scale times the group's sum, and the sum times the weights' code offset. A tile's
/// operands then lie in one stream that a single pointer walks.
pub struct Interleaved {
    pub group: usize,
    /// `[tile][group][quad][row of the tile][4 bytes]`.
    pub values: Vec<i8>,
    /// `[tile][group][row of the tile]`.
    pub scales: Vec<f32>,
    /// `[tile][group][row of the tile]`: what the weights' minimums meet.
    pub scaled_sums: Vec<f32>,
    /// `[tile][group][row of the tile]`: `−k · Σx` for weight codes offset by `k`
    /// ([`Interleaving::code_offset`]), the group's integer sum of products starts from.
    pub offset_sums: Vec<i32>,
}

/// One row of [`QuantizedRows`]: its scales (one per group), values, and sums of 32 values.
pub type Row<'a> = (&'a [f32], &'a [i8], &'a [i32]);

/// How a product's kernels read its activations [`Interleaved`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interleaving {
    /// Values per group: those that share a weight scale.
    pub group: usize,
    /// What the weights' codes are offset by (value = scale · (code − k)); `None` for a type with
    /// a minimum in its place.
    pub code_offset: Option<i32>,
}

impl QuantizedRows {
    /// Quantizes `x`, rows of `cols` values (a multiple of `group`, itself a multiple of 32):
    /// each group scaled so that its largest magnitude becomes ±127, rounded to nearest.
    pub fn new(x: &[f32], cols: usize, group: usize) -> Self {
        Self::for_product(x, cols, group, None)
    }

    /// [`QuantizedRows::new`], and [`Interleaved`] as `interleave` says when the product's
    /// kernels read them so. Many rows (a prompt) are quantized on the
    /// compute pool, a tile of [`TILE_ROWS`] rows per work item, which interleaves its rows too:
    /// on the calling thread alone, this took a sixth of a 512-token prompt's time at two
    /// threads (`perf`).
    pub(crate) fn for_product(x: &[f32], cols: usize, group: usize, interleave: Option<Interleaving>) -> Self {
        debug_assert!(group.is_multiple_of(BLOCK) && cols.is_multiple_of(group) && x.len().is_multiple_of(cols));
        let rows = x.len() / cols;
        let mut scales = vec![0f32; x.len() / group];
        let mut values = vec![0i8; x.len()];
        let mut sums16 = vec![0i16; x.len() / (BLOCK / 2)];
        let mut interleaved = interleave.map(|how| Interleaved::zeros(how.group, rows, cols));
        let tiles = rows.div_ceil(TILE_ROWS);
        {
            let (scales_out, values_out, sums_out) = (OutPtr(scales.as_mut_ptr()), OutPtr(values.as_mut_ptr()), OutPtr(sums16.as_mut_ptr()));
            let interleaved_out = interleaved.as_mut().zip(interleave).map(|(t, how)| {
                (how, OutPtr(t.values.as_mut_ptr()), OutPtr(t.scales.as_mut_ptr()), OutPtr(t.scaled_sums.as_mut_ptr()), OutPtr(t.offset_sums.as_mut_ptr()))
            });
            let quantize_tiles = |range: Range<usize>| {
                for tile in range {
                    let tile_rows = tile * TILE_ROWS..rows.min((tile + 1) * TILE_ROWS);
                    let n = tile_rows.len();
                    // SAFETY: each tile's rows (and interleaved tile) are written by its work
                    // item alone; the vectors outlive the pool's execution.
                    let (scales, values, sums16) = unsafe {
                        (
                            scales_out.slice(tile_rows.start * cols / group..tile_rows.end * cols / group),
                            values_out.slice(tile_rows.start * cols..tile_rows.end * cols),
                            sums_out.slice(tile_rows.start * cols / 16..tile_rows.end * cols / 16),
                        )
                    };
                    quantize(&x[tile_rows.start * cols..tile_rows.end * cols], group, scales, values, sums16);
                    if let Some((how, values_out, scales_out, sums_out, offset_sums_out)) = &interleaved_out {
                        let g = how.group;
                        let groups = cols / g;
                        let tile_values = tile * groups * g * TILE_ROWS..(tile + 1) * groups * g * TILE_ROWS;
                        let tile_groups = tile * groups * TILE_ROWS..(tile + 1) * groups * TILE_ROWS;
                        let into = unsafe {
                            (
                                values_out.slice(tile_values),
                                scales_out.slice(tile_groups.clone()),
                                sums_out.slice(tile_groups.clone()),
                                offset_sums_out.slice(tile_groups),
                            )
                        };
                        interleave_tile(*how, (scales, &values[..n * cols]), cols, group, into);
                    }
                }
            };
            match rows >= PARALLEL_ROWS {
                true => crate::pool::in_runs(tiles, quantize_tiles),
                false => quantize_tiles(0..tiles),
            }
        }
        let sums = sums16.chunks_exact(2).map(|pair| pair[0] as i32 + pair[1] as i32).collect();
        Self { cols, groups: cols / group, scales, values, sums, sums16, interleaved }
    }

    #[inline]
    pub fn rows(&self) -> usize {
        self.values.len() / self.cols
    }

    /// Row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> Row<'_> {
        let (groups, blocks) = (self.groups, self.cols / BLOCK);
        (&self.scales[i * groups..(i + 1) * groups], &self.values[i * self.cols..(i + 1) * self.cols], &self.sums[i * blocks..(i + 1) * blocks])
    }

    /// Row `i`'s sums of 16 values (at most 16 · 127 in magnitude).
    pub fn sums16(&self, i: usize) -> &[i16] {
        let per_row = self.cols / (BLOCK / 2);
        &self.sums16[i * per_row..(i + 1) * per_row]
    }

    /// The rows [`Interleaved`] in groups of `group` values.
    ///
    /// # Panics
    /// If the product did not ask for them so ([`QuantizedRows::for_product`]).
    pub fn interleaved(&self, group: usize) -> &Interleaved {
        let built = self.interleaved.as_ref().expect("the product interleaves its activations");
        assert_eq!(built.group, group, "one product interleaves its activations one way");
        built
    }
}

/// Rows from which quantizing them is spread over the compute pool: waking it costs more than
/// quantizing a decode step's row or a few.
const PARALLEL_ROWS: usize = 16;

/// Quantizes whole rows `x` in groups of `group` values into their `scales`, `values` and sums
/// of 16 values.
fn quantize(x: &[f32], group: usize, scales: &mut [f32], values: &mut [i8], sums16: &mut [i16]) {
    for ((chunk, out), d) in x.chunks_exact(group).zip(values.chunks_exact_mut(group)).zip(scales.iter_mut()) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        // SAFETY: the build enables AVX2 (`.cargo/config.toml`), so the host running it has it.
        let scale = unsafe { quantize_group_avx2(chunk, out) };
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
        let scale = quantize_group(chunk, out);
        *d = scale;
    }
    for (sum, sixteen) in sums16.iter_mut().zip(values.chunks_exact(BLOCK / 2)) {
        *sum = sixteen.iter().map(|&q| q as i16).sum();
    }
}

/// One group's values scaled so that the largest magnitude becomes ±127 and rounded to
/// nearest, ties to even (as llama.cpp's SIMD quantizers round); returns the scale.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))] // the definition the AVX2 one is tested against
fn quantize_group(x: &[f32], out: &mut [i8]) -> f32 {
    // Eight running maxima, so that the loop vectorizes.
    let lanes = x.chunks_exact(8).fold([0f32; 8], |m, v| std::array::from_fn(|l| m[l].max(v[l].abs())));
    let amax = lanes.into_iter().fold(0f32, f32::max);
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in out.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even() as i8;
    }
    d
}

/// [`quantize_group`] with AVX2, 5–6 × faster (the compiler turns the portable loop's
/// saturating conversions into scalar code); the same bytes, since the scale is computed the
/// same way and `cvtps` rounds ties to even.
///
/// # Safety
/// AVX2 is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_group_avx2(x: &[f32], out: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    for eight in x.chunks_exact(8) {
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(eight.as_ptr()), magnitude));
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    for (x, out) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        let q = |k: usize| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * k)), inv));
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q(0), q(1)), _mm256_packs_epi32(q(2), q(3)));
        // The packs work within 128-bit lanes: their 4-byte runs come out in the order 0, 2, 4,
        // 6, 1, 3, 5, 7.
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes);
    }
    d
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn avx2_quantizes_to_the_same_bytes() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        // Halves (ties), zeros, a group of zeros, and magnitudes spread over a wide range.
        let x: Vec<f32> = (0..4096).map(|i| if i / 256 == 3 { 0.0 } else { ((i * 7919) % 1001) as f32 / 8.0 - 62.5 } * (1 + i % 5) as f32).collect();
        for group in [32, 256] {
            for (chunk, i) in x.chunks_exact(group).zip(0..) {
                let (mut simd, mut portable) = (vec![0i8; group], vec![0i8; group]);
                let (d_simd, d_portable) = (unsafe { quantize_group_avx2(chunk, &mut simd) }, quantize_group(chunk, &mut portable));
                assert_eq!((d_simd.to_bits(), &simd), (d_portable.to_bits(), &portable), "group {i} of {group}");
            }
        }
    }
}

impl Interleaved {
    /// Zeros for `rows` rows of `cols` values, padded to whole tiles.
    fn zeros(group: usize, rows: usize, cols: usize) -> Self {
        let padded = rows.next_multiple_of(TILE_ROWS);
        let groups = padded * cols / group;
        Self { group, values: vec![0; padded * cols], scales: vec![0.0; groups], scaled_sums: vec![0.0; groups], offset_sums: vec![0; groups] }
    }
}

/// One tile's quantized rows (their scales per `row_group` values, and their values) interleaved
/// as `how` says into the tile's `(values, scales, scaled_sums, offset_sums)`; padding rows stay
/// zero.
fn interleave_tile(how: Interleaving, (scales, values): (&[f32], &[i8]), cols: usize, row_group: usize, into: (&mut [i8], &mut [f32], &mut [f32], &mut [i32])) {
    let group = how.group;
    debug_assert!(group.is_multiple_of(4) && cols.is_multiple_of(group) && row_group.is_multiple_of(group));
    let groups = cols / group;
    let (out_values, out_scales, out_sums, out_offset_sums) = into;
    for (row, values) in values.chunks_exact(cols).enumerate() {
        let scales = &scales[row * cols / row_group..];
        for g in 0..groups {
            let group_values = &values[g * group..(g + 1) * group];
            let d = scales[g * group / row_group];
            out_scales[g * TILE_ROWS + row] = d;
            let sum = group_values.iter().map(|&q| q as i32).sum::<i32>();
            out_sums[g * TILE_ROWS + row] = d * sum as f32;
            out_offset_sums[g * TILE_ROWS + row] = -how.code_offset.unwrap_or(0) * sum;
            for (quad, four) in group_values.chunks_exact(4).enumerate() {
                let at = g * group * TILE_ROWS + (quad * TILE_ROWS + row) * 4;
                out_values[at..at + 4].copy_from_slice(four);
            }
        }
    }
}
