//! Weight rows repacked, [`PANEL_ROWS`] at a time, for products with many activation rows (a
//! prompt). `vpdpbusd` then multiplies four bytes of every row of the panel by the same four
//! activation bytes at once, so one instruction serves 16 outputs and no sum is ever reduced
//! across a register. The panel is a small per-work-item buffer, filled once and read by every
//! activation row: the weights themselves stay as they are in the file.
//!
//! Every block type is unpacked to the same form, per group of 32 values of a row (16 for
//! Q2_K, Q3_K and Q6_K, whose scales change every 16): unsigned bytes `u`, a `scale` and an `offset`, with
//! `value = scale · u − offset`. Against activations `d · x` (bytes `x` with scale `d`), a
//! group contributes `d · (scale · Σ u·x − offset · Σ x)`; `d · Σ x` comes with the
//! activations ([`QuantizedRows::interleaved`]).

use std::ops::Range;

use crate::blocks::{f16_at, q3_k_high_bit_at, q3_k_scales, q4_k_scales, q6_k_value, two_bit_code_at, BlockType, BLOCK, SUPER_BLOCK};
use crate::QMatrix;
#[cfg(doc)]
use crate::QuantizedRows;

/// Weight rows per panel: one 32-bit lane of a 512-bit register each.
pub const PANEL_ROWS: usize = 16;

/// Activation rows from which panels are worth packing (`cargo bench -p llm-kernels` with other
/// row counts): packing costs about as much as a dozen rows' products. With AVX-512, at 16 rows
/// panels ran at 0.35–1.1 × the tiles, at 32 rows at 0.9–1.8 ×, at 64 rows at 1.7–3 ×; with AVX2
/// (best of three, one thread), at 16 rows at 0.6–1.2 ×, at 24 rows at 0.8–1.9 ×, at 32 rows at
/// 1.05–2.2 ×, at 64 rows at 1.05–2 ×.
pub const PANEL_MIN_ACTIVATIONS: usize = 32;

/// Values per group: those that share a scale in `ty`.
pub const fn group_values(ty: BlockType) -> usize {
    match ty {
        BlockType::Q2K | BlockType::Q3K | BlockType::Q6K => BLOCK / 2,
        _ => BLOCK,
    }
}

/// The largest value `u` a panel holds for `ty` (the code plus whatever offset made it
/// unsigned): how many products AVX2 may add up in 16 bits.
pub const fn largest_code(ty: BlockType) -> i32 {
    match ty {
        BlockType::Q8_0 => 255,
        BlockType::Q2K => 3,
        BlockType::Q3K => 7,
        BlockType::Q4_0 | BlockType::Q4K => 15,
        BlockType::Q5K => 31,
        BlockType::Q6K => 63,
    }
}

pub struct Panel {
    /// Values per group.
    group: usize,
    /// `[group][quad of 4 values][row (16)][4 bytes]`: one quad of every row is one 512-bit
    /// register.
    pub values: Vec<u8>,
    /// `[group][row]`.
    pub scales: Vec<f32>,
    /// `[group][row]`.
    pub offsets: Vec<f32>,
}

impl Panel {
    /// `rows` of `w` (at most [`PANEL_ROWS`]) packed; the panel's rows past them keep zero
    /// scales and offsets, so they add nothing.
    pub fn packed(w: &QMatrix, rows: Range<usize>) -> Self {
        debug_assert!(rows.len() <= PANEL_ROWS);
        let group = group_values(w.ty);
        let groups = w.cols / group;
        let mut panel = Self {
            group,
            values: vec![0; w.cols * PANEL_ROWS],
            scales: vec![0.0; groups * PANEL_ROWS],
            offsets: vec![0.0; groups * PANEL_ROWS],
        };
        panel.pack(w, rows);
        panel
    }

    /// The panels of `rows`, each with the weight rows it holds.
    pub fn all(w: &QMatrix, rows: Range<usize>) -> Vec<(Range<usize>, Self)> {
        rows.clone()
            .step_by(PANEL_ROWS)
            .map(|start| {
                let held = start..rows.end.min(start + PANEL_ROWS);
                (held.clone(), Self::packed(w, held))
            })
            .collect()
    }

    fn pack(&mut self, w: &QMatrix, rows: Range<usize>) {
        for (j, r) in rows.enumerate() {
            let row = w.row(r);
            let bytes = w.ty.block_bytes();
            // One loop per type, over whole blocks: this runs once per weight row and product,
            // and with few activation rows it is a good part of the product's time.
            match w.ty {
                BlockType::Q8_0 => {
                    for (g, block) in row.chunks_exact(bytes).enumerate() {
                        let d = f16_at(block, 0);
                        // `q + 128` as a byte is `q` with its top bit flipped.
                        self.put(j, g, std::array::from_fn(|v| block[2 + v] ^ 0x80), d, 128.0 * d);
                    }
                }
                BlockType::Q4_0 => {
                    for (g, block) in row.chunks_exact(bytes).enumerate() {
                        let d = f16_at(block, 0);
                        let q = &block[2..18];
                        self.put(j, g, std::array::from_fn(|v| if v < 16 { q[v] & 0xF } else { q[v - 16] >> 4 }), d, 8.0 * d);
                    }
                }
                BlockType::Q2K => {
                    for (b, block) in row.chunks_exact(bytes).enumerate() {
                        let (d, dmin) = (f16_at(block, 80), f16_at(block, 82));
                        for (sub, &packed) in block[..16].iter().enumerate() {
                            let codes = two_bit_codes(&block[16..80], sub);
                            self.put(j, 16 * b + sub, codes, d * f32::from(packed & 0xF), dmin * f32::from(packed >> 4));
                        }
                    }
                }
                BlockType::Q3K => {
                    for (b, block) in row.chunks_exact(bytes).enumerate() {
                        let d = f16_at(block, 108);
                        for (sub, scale) in q3_k_scales(&block[96..108]).into_iter().enumerate() {
                            let scale = d * f32::from(scale as i8 - 32);
                            let mut codes = two_bit_codes(&block[32..96], sub);
                            // A sub-block's 16 high bits are one bit of 16 consecutive bytes.
                            let (byte, bit) = q3_k_high_bit_at(16 * sub);
                            let mask = 1 << bit;
                            codes[..16].iter_mut().zip(&block[byte..][..16]).for_each(|(c, &h)| *c |= if h & mask != 0 { 4 } else { 0 });
                            self.put(j, 16 * b + sub, codes, scale, 4.0 * scale);
                        }
                    }
                }
                BlockType::Q4K => {
                    for (b, block) in row.chunks_exact(bytes).enumerate() {
                        let (scales, mins) = q4_k_scales(&block[4..16]);
                        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                        // A run of 32 bytes holds two sub-blocks: low nibbles, then high.
                        for (pair, q) in block[16..].chunks_exact(32).enumerate() {
                            for (half, shift) in [(0, 0), (1, 4)] {
                                let sub = 2 * pair + half;
                                let (scale, min) = (d * f32::from(scales[sub]), dmin * f32::from(mins[sub]));
                                self.put(j, 8 * b + sub, std::array::from_fn(|v| (q[v] >> shift) & 0xF), scale, min);
                            }
                        }
                    }
                }
                BlockType::Q5K => {
                    for (b, block) in row.chunks_exact(bytes).enumerate() {
                        let (scales, mins) = q4_k_scales(&block[4..16]);
                        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                        let high: &[u8; BLOCK] = block[16..48].try_into().expect("32 bytes");
                        // As Q4_K, each nibble with bit `sub` of its high byte on top.
                        for (pair, q) in block[48..].chunks_exact(32).enumerate() {
                            for (half, shift) in [(0, 0), (1, 4)] {
                                let sub = 2 * pair + half;
                                let (scale, min) = (d * f32::from(scales[sub]), dmin * f32::from(mins[sub]));
                                let bit = 1 << sub;
                                let codes = std::array::from_fn(|v| (q[v] >> shift) & 0xF | if high[v] & bit != 0 { 16 } else { 0 });
                                self.put(j, 8 * b + sub, codes, scale, min);
                            }
                        }
                    }
                }
                BlockType::Q6K => {
                    for (b, block) in row.chunks_exact(bytes).enumerate() {
                        let d = f16_at(block, 208);
                        for sub in 0..SUPER_BLOCK / 16 {
                            let scale = d * f32::from(block[192 + sub] as i8);
                            let codes = std::array::from_fn(|v| if v < 16 { q6_k_value(block, 16 * sub + v) } else { 0 });
                            self.put(j, 16 * b + sub, codes, scale, 32.0 * scale);
                        }
                    }
                }
            }
        }
    }

    /// Group `g` of panel row `j`: its values `u` (the first [`Panel::group`] of them), scale
    /// and offset.
    #[inline(always)]
    fn put(&mut self, j: usize, g: usize, u: [u8; BLOCK], scale: f32, offset: f32) {
        self.scales[g * PANEL_ROWS + j] = scale;
        self.offsets[g * PANEL_ROWS + j] = offset;
        let quads = &mut self.values[g * self.group * PANEL_ROWS..(g + 1) * self.group * PANEL_ROWS];
        for (quad, four) in u[..self.group].chunks_exact(4).enumerate() {
            quads[quad * 4 * PANEL_ROWS + 4 * j..][..4].copy_from_slice(four);
        }
    }
}

/// The 2-bit codes of sub-block `sub` (16 values, the rest of the array zero) of a Q2_K or Q3_K
/// block's 64 code bytes (see [`crate::blocks::q2_k_code`]), whole bytes at a time (they share
/// a shift): the function per value took most of a prompt's time.
fn two_bit_codes(code_bytes: &[u8], sub: usize) -> [u8; BLOCK] {
    let (byte, shift) = two_bit_code_at(16 * sub);
    let bytes = &code_bytes[byte..][..16];
    let mut codes = [0; BLOCK];
    codes[..16].iter_mut().zip(bytes).for_each(|(c, &b)| *c = (b >> shift) & 3);
    codes
}
