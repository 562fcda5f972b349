//! Weight rows repacked, [`PANEL_ROWS`] at a time, for products with many activation rows (a
//! prompt). `vpdpbusd` then multiplies four bytes of every row of the panel by the same four
//! activation bytes at once, so one instruction serves 16 outputs and no sum is ever reduced
//! across a register. The panel is a small per-work-item buffer, filled once and read by every
//! activation row: the weights themselves stay as they are in the file.
//!
//! Every block type is unpacked to the same form, per group of 32 values of a row (16 for
//! Q6_K, whose scales change every 16): unsigned bytes `u`, a `scale` and an `offset`, with
//! `value = scale · u − offset`. Against activations `d · x` (bytes `x` with scale `d`), a
//! group contributes `d · (scale · Σ u·x − offset · Σ x)`, and `Σ x` is an activation sum
//! [`QuantizedRows`] already keeps.

use std::ops::Range;

use crate::blocks::{f16_at, q4_k_scales, q6_k_value, BlockType, BLOCK, SUPER_BLOCK};
use crate::QMatrix;
#[cfg(doc)]
use crate::QuantizedRows;

/// Weight rows per panel: one 32-bit lane of a 512-bit register each.
pub const PANEL_ROWS: usize = 16;

/// Values per group: those that share a scale in `ty`.
pub const fn group_values(ty: BlockType) -> usize {
    match ty {
        BlockType::Q6K => BLOCK / 2,
        _ => BLOCK,
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
    pub fn new(ty: BlockType, cols: usize) -> Self {
        let group = group_values(ty);
        let groups = cols / group;
        Self {
            group,
            values: vec![0; cols * PANEL_ROWS],
            scales: vec![0.0; groups * PANEL_ROWS],
            offsets: vec![0.0; groups * PANEL_ROWS],
        }
    }

    /// Packs `rows` of `w` (at most [`PANEL_ROWS`]); the rows of the panel past them are zero.
    pub fn pack(&mut self, w: &QMatrix, rows: Range<usize>) {
        debug_assert!(group_values(w.ty) == self.group && rows.len() <= PANEL_ROWS);
        for j in rows.len()..PANEL_ROWS {
            for g in 0..w.cols / self.group {
                self.scales[g * PANEL_ROWS + j] = 0.0;
                self.offsets[g * PANEL_ROWS + j] = 0.0;
            }
        }
        for (j, r) in rows.enumerate() {
            let row = w.row(r);
            for g in 0..w.cols / self.group {
                let (values, scale, offset) = group(w.ty, row, g);
                self.scales[g * PANEL_ROWS + j] = scale;
                self.offsets[g * PANEL_ROWS + j] = offset;
                for (quad, four) in values[..self.group].chunks_exact(4).enumerate() {
                    let at = (g * self.group + quad * 4) * PANEL_ROWS + 4 * j;
                    self.values[at..at + 4].copy_from_slice(four);
                }
            }
        }
    }
}

/// Group `g` of a row as `(u, scale, offset)` (see the module's doc); a 16-value group fills
/// the first half of `u`.
fn group(ty: BlockType, row: &[u8], g: usize) -> ([u8; BLOCK], f32, f32) {
    match ty {
        BlockType::Q8_0 => {
            let block = &row[g * ty.block_bytes()..(g + 1) * ty.block_bytes()];
            let d = f16_at(block, 0);
            // `q + 128` as a byte is `q` with its top bit flipped.
            (std::array::from_fn(|v| block[2 + v] ^ 0x80), d, 128.0 * d)
        }
        BlockType::Q4_0 => {
            let block = &row[g * ty.block_bytes()..(g + 1) * ty.block_bytes()];
            let d = f16_at(block, 0);
            (std::array::from_fn(|v| (block[2 + v % 16] >> (4 * (v / 16))) & 0xF), d, 8.0 * d)
        }
        BlockType::Q4K => {
            let (b, sub) = (g / (SUPER_BLOCK / BLOCK), g % (SUPER_BLOCK / BLOCK));
            let block = &row[b * ty.block_bytes()..(b + 1) * ty.block_bytes()];
            let (scales, mins) = q4_k_scales(&block[4..16]);
            let nibbles = &block[16 + 32 * (sub / 2)..][..32];
            let shift = 4 * (sub % 2);
            let values = std::array::from_fn(|v| (nibbles[v] >> shift) & 0xF);
            (values, f16_at(block, 0) * f32::from(scales[sub]), f16_at(block, 2) * f32::from(mins[sub]))
        }
        BlockType::Q6K => {
            let (b, sub) = (g / (SUPER_BLOCK / 16), g % (SUPER_BLOCK / 16));
            let block = &row[b * ty.block_bytes()..(b + 1) * ty.block_bytes()];
            let scale = f16_at(block, 208) * f32::from(block[192 + sub] as i8);
            (std::array::from_fn(|v| if v < 16 { q6_k_value(block, 16 * sub + v) } else { 0 }), scale, 32.0 * scale)
        }
    }
}
