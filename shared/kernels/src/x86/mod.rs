//! x86_64 kernels: the block helpers both instruction sets share.

// The tiles index the rows of several arrays (weights, activations, sums) by the same counter;
// chains of zipped iterators over them read worse, and LLVM unrolls both alike.
#![allow(clippy::needless_range_loop)]

pub mod avx2;
pub mod avx512;
mod panel;

use std::arch::x86_64::*;

use crate::activations::Interleaving;
use crate::blocks::BlockType;
use panel::{code_offset, group_values, panel_min_activations};

/// How the panels read `m` activation rows against `ty`'s weights, if a product of `m` rows goes
/// through panels with AVX-512 (`avx512`) or AVX2.
pub fn interleaving(ty: BlockType, m: usize, avx512: bool) -> Option<Interleaving> {
    (m >= panel_min_activations(ty, avx512, avx512::two_passes())).then(|| Interleaving { group: group_values(ty), code_offset: code_offset(ty) })
}

/// See [`crate::Kernels::layout`]: with AVX-512, the 16-row layout of every quantized type for a
/// matrix of whole groups of its rows; otherwise Q4_0's scales first with AVX2, and with AVX-512
/// where a 512-bit instruction takes two passes, whose Q4_0 decode steps then go through AVX2's
/// tiles ([`avx512::two_passes`]).
pub fn layout(ty: BlockType, rows: usize, avx512: bool) -> BlockType {
    let in_groups = rows.is_multiple_of(crate::blocks::INTERLEAVED_ROWS);
    match ty {
        BlockType::Q8_0 if avx512 && in_groups => BlockType::Q8_0Interleaved,
        BlockType::Q4_0 if avx512 && in_groups => BlockType::Q4_0Interleaved,
        BlockType::Q4_1 if avx512 && in_groups => BlockType::Q4_1Interleaved,
        BlockType::Q5_0 if avx512 && in_groups => BlockType::Q5_0Interleaved,
        BlockType::Q5_1 if avx512 && in_groups => BlockType::Q5_1Interleaved,
        BlockType::Q4_0 if !avx512 || avx512::two_passes() => BlockType::Q4_0ScalesFirst,
        BlockType::Q4K if avx512 && in_groups => BlockType::Q4KInterleaved,
        BlockType::Q5K if avx512 && in_groups => BlockType::Q5KInterleaved,
        BlockType::Q6K if avx512 && in_groups => BlockType::Q6KInterleaved,
        BlockType::Q3K if avx512 && in_groups => BlockType::Q3KInterleaved,
        BlockType::Q2K if avx512 && in_groups => BlockType::Q2KInterleaved,
        _ => ty,
    }
}

/// How far ahead of the current block a decode step asks for its weight rows: measured over a
/// whole model (Q4_K_M, one thread, one row per tile), none 8.4 tok/s, 1 KiB 10.9–11.1, 2 KiB
/// 12.0–13.3, 4 KiB 13.4–13.8, 8 KiB and more no better and less steady. A type with more bytes
/// per value may ask further ahead (AVX2's Q8_0 does), and so do faster tiles (AVX-512's ask
/// twice as far, [`avx512`]'s `AHEAD_BYTES`). A tile of several rows rounds it up to whole tiles
/// ([`tiles_ahead`]).
const PREFETCH_BYTES: usize = 4096;

/// How far ahead a decode tile of `tile_rows` weight rows asks for its weights: whole tiles, at
/// least `at_least` bytes on. Measured when each row asked for its own block ahead, before
/// [`prefetch_ahead`] took the tile in memory order: a distance in bytes alone then landed in
/// different rows of the later tiles, and missed some: with four Q4_0 rows of 1,152 bytes,
/// 4 KiB after each row's block is the fourth row of this tile and the first three of the next,
/// so every fourth row went unfetched until the tile that reads it. Zen 3, whole model, decode,
/// paired runs, tok/s: Q4_0 one thread 11.3–11.9 → 12.3–13.4, two 18.3–20.2 → 19.4–23.0; Q5_1
/// (four rows of 1,536 bytes: two rows of each tile unfetched) one thread 6.9–8.0 → 8.8–9.9;
/// Q8_0 (two rows per tile then) and Q4_K_M (one) no different.
#[inline(always)]
fn tiles_ahead(w: &crate::QMatrix, tile_rows: usize, at_least: usize) -> usize {
    let tile = tile_rows * w.ty.row_bytes(w.cols);
    at_least.div_ceil(tile) * tile
}

/// Whether a tile of `tile_rows` weight rows asks for the tiles ahead into L2 only
/// ([`L1_TILE_BYTES`]). The tiles take the answer as a constant (`with_ahead_cache!`): a branch
/// at every ask cost a Q4_K_M decode step 3.5 % (31.0–32.0 → 30.0–30.7 tok/s). The K-quants'
/// tiles are one row, so they take it once a product; a row of more than 10 KiB ran at half
/// speed asking into L1: Zen 4, `--bench stream -- shape=1024x24576` (Q6_K rows of 20 KiB), one
/// thread, 11.3–11.4 → 24.8–24.9 GB/s (Q4_K's 13.5 KiB rows 10.6–10.8 → 22.2–23.7 with the same
/// change, which Q4_K and Q5_K do not take: `avx2::product_rows` says why); 5632 × 2048 level.
#[inline(always)]
fn ahead_into_l2(w: &crate::QMatrix, tile_rows: usize) -> bool {
    tile_rows * w.ty.row_bytes(w.cols) > L1_TILE_BYTES
}

/// `$tile` with the constant `L2` that [`ahead_into_l2`] gives for tiles of `$rows` rows of `$w`.
macro_rules! with_ahead_cache {
    ($w:expr, $rows:expr, $tile:expr) => {
        match $crate::x86::ahead_into_l2($w, $rows) {
            true => {
                const L2: bool = true;
                $tile
            }
            false => {
                const L2: bool = false;
                $tile
            }
        }
    };
}
use with_ahead_cache;

/// The largest tile whose next tiles a decode step asks for into L1; a larger one's go into L2
/// only. A whole tile ahead of a tile of long rows, with the tile being read, no longer fits
/// L1's 32 KiB, and lines asked for early were evicted before they were read. Zen 4, `--bench
/// stream` (one thread, pinned), GB/s of weights, two rounds of each in turn, into L1 → L2:
/// TinyLlama's `ffn_down`, 2048 × 5632 (tiles of 12.4 KiB for Q4_0's four rows, 11.7 KiB for
/// AVX-512's two rows of Q8_0, 23.4 KiB for AVX2's four), Q4_0 17.6–18.4 → 19.3–20.2 (laid out
/// for AVX2's tiles, 17.8–19.1 → 20.7–21.4), Q8_0 20.7–21.4 → 22.0–23.1 (AVX2's 18.0–18.6 →
/// 27.0–28.1); Llama 3.2 1B's, 2048 × 8192, Q4_0 15.6–16.2 → 19.9–20.4 (laid out 14.3–15.2 →
/// 20.3–21.6), Q8_0 15.2–17.0 → 21.3–24.2 (AVX2's 16.9–18.5 → 25.1–30.0). Small tiles lost in
/// L2 (every ask into L2 against every ask into L1): `ffn_up`, 5632 × 2048, Q4_0 (4.5 KiB)
/// 19.9–20.3 → 13.8–14.0, Q4_K (a row of 1.1 KiB) 19.7–20.5 → 15.8–16.0, and 2048 × 8192's Q4_K
/// (4.5 KiB) 19.3–21.1 → 17.0; with 8 KiB here, AVX2's Q8_0 tile of `ffn_up` (8.5 KiB) went
/// into L2 and lost up to 9 % in one round. A batch's tiles (2 or 4 activation rows) of long rows
/// gain too, 2048 × 8192, two rounds in turn, into L1 → L2: Q8_0 (AVX-512's tiles) at 2 rows
/// 6.3–12.3 → 18.6–20.8 GB/s, at 4 rows 8.8–10.8 → 12.8–13.7; Q4_0 laid out (AVX2's) 9.7–11.4
/// → 11.1–11.5 and 4.9–6.4 → 6.7–7.0.
const L1_TILE_BYTES: usize = 10 << 10;

/// A decode step streams the weights from memory: while a tile multiplies step `step` of its
/// rows (`step_bytes`: a block, or two, of each row), ask for the cache lines of the same share
/// of the bytes `ahead` of it, in memory order.
///
/// A decode tile's rows lie one after another in memory, so the share of step `step` is the
/// `step_bytes` bytes `step · step_bytes` after its first row, not each row's own block. Those asks then
/// run through the bytes ahead as one sequential stream, which the hardware's prefetcher follows,
/// instead of `RT` streams a row apart. Zen 3, one `ffn_up` product after another out of
/// memory, one thread, GB/s of weights: Q4_0 6.5–10.0 → 8.8–11.3, two threads 14.3–16.7 →
/// 16.5–20.3 (as fast as reading the tile's blocks one after another, which a layout of
/// interleaved rows would); whole model, decode, paired runs, tok/s: Q4_0 one thread 11.1–13.2
/// → 15.6–16.6 in three pairs of four, two threads 14.8–22.9 → 23.0–24.0; Q5_1 8.7–9.5 →
/// 10.1–11.4; Q8_0 6.8–8.7 → 7.2–9.4. The K-quants' tiles have one row: no different.
#[inline(always)]
unsafe fn prefetch_ahead<const L2: bool>(first_row: *const u8, step: usize, step_bytes: usize, ahead: usize) {
    // The bytes ahead of the last rows lie past the matrix: a prefetch of them does not fault,
    // but `add` past an allocation would be undefined behaviour, so the address wraps.
    let from = first_row.wrapping_add(step * step_bytes + ahead);
    for line in (0..step_bytes).step_by(64) {
        let at = from.wrapping_add(line) as *const i8;
        match L2 {
            true => _mm_prefetch::<_MM_HINT_T1>(at),
            false => _mm_prefetch::<_MM_HINT_T0>(at),
        }
    }
}

/// The little-endian `f16` at `block + at` (F16C).
#[inline(always)]
unsafe fn f16_at(block: *const u8, at: usize) -> f32 {
    let bits = u16::from_le_bytes([*block.add(at), *block.add(at + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With AVX-512, every quantized type gets its 16-row layout for whole groups of 16 rows,
    /// and none for other row counts: a layout built but not named here would never be used.
    #[test]
    fn avx512_lays_out_whole_groups_of_every_type_with_a_16_row_layout() {
        let laid_out = [
            BlockType::Q8_0,
            BlockType::Q4_0,
            BlockType::Q4_1,
            BlockType::Q5_0,
            BlockType::Q5_1,
            BlockType::Q2K,
            BlockType::Q3K,
            BlockType::Q4K,
            BlockType::Q5K,
            BlockType::Q6K,
        ];
        for ty in laid_out {
            let whole = layout(ty, 32, true);
            assert_eq!((whole.rows_together(), whole.in_file()), (crate::blocks::INTERLEAVED_ROWS, ty), "{ty:?}");
            assert_eq!(layout(ty, 24, true).rows_together(), 1, "{ty:?} in 24 rows");
        }
    }
}
