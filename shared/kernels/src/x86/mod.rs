//! x86_64 kernels: the tile loop and block helpers both instruction sets share.
//!
//! A tile is `RT` weight rows × `CT` activation rows: each weight block is loaded once per tile
//! and meets `CT` activation blocks, each activation block meets `RT` weight blocks, and the
//! `RT·CT` partial sums stay in registers for the whole row.

pub mod avx2;
pub mod avx512;
mod panel;

use std::arch::x86_64::*;
use std::ops::Range;

use crate::activations::QuantizedRows;
use crate::QMatrix;

/// How far ahead of the current block a decode step asks for its weight rows: measured over a
/// whole model (Q4_K_M, one thread, one row per tile), none 8.4 tok/s, 1 KiB 10.9–11.1, 2 KiB
/// 12.0–13.3, 4 KiB 13.4–13.8, 8 KiB and more no better and less steady.
const PREFETCH_BYTES: usize = 4096;

/// A tile kernel: output `[i..i+CT] × [r..r+RT]`; returns `RT`, the weight rows done.
trait Tile {
    /// # Safety
    /// The module's instruction set is available; the rows exist; `out` as in
    /// [`crate::product_rows`].
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize;
}

/// Columns `rows` of every output row in tiles of `R × C` (a prompt) or `D × 1` (a decode step),
/// and smaller ones for the rows left over. Inlined into each instruction set's entry point,
/// which enables its target features.
#[inline(always)]
unsafe fn rows_of<W: Tile, const R: usize, const C: usize, const D: usize>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    // Activation rows outside, weight rows inside: the few activation rows of a tile stay in
    // L1 while the group's weight rows come from L2.
    let mut i = 0;
    while i < x.rows() {
        let several = x.rows() - i >= C;
        let mut r = rows.start;
        while r < rows.end {
            let left = rows.end - r;
            r += match several {
                true if left >= R => W::tile::<R, C>(w, x, r, i, out),
                true => W::tile::<1, C>(w, x, r, i, out),
                false if left >= D => W::tile::<D, 1>(w, x, r, i, out),
                false => W::tile::<1, 1>(w, x, r, i, out),
            };
        }
        i += if several { C } else { 1 };
    }
}

/// The tile's weight rows and activation rows.
#[inline(always)]
unsafe fn operands<'x, const RT: usize, const CT: usize>(
    w: &QMatrix,
    x: &'x QuantizedRows,
    r: usize,
    i: usize,
) -> ([*const u8; RT], [(&'x [f32], &'x [i8], &'x [i32]); CT]) {
    let row_bytes = w.ty.row_bytes(w.cols);
    (std::array::from_fn(|a| w.bytes.as_ptr().add((r + a) * row_bytes)), std::array::from_fn(|c| x.row(i + c)))
}

/// Writes the tile's sums, each reduced by `hsum`, to `out`; returns `RT`.
#[inline(always)]
unsafe fn store<V: Copy, const RT: usize, const CT: usize>(
    acc: &[[V; CT]; RT],
    hsum: unsafe fn(V) -> f32,
    w: &QMatrix,
    r: usize,
    i: usize,
    out: *mut f32,
) -> usize {
    for a in 0..RT {
        for c in 0..CT {
            *out.add((i + c) * w.rows + r + a) = hsum(acc[a][c]);
        }
    }
    RT
}

/// A decode step streams the weights from memory: ask for the cache lines `PREFETCH_BYTES`
/// after `block`'s while this one is multiplied.
#[inline(always)]
unsafe fn prefetch_ahead(block: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_BYTES + line) as *const i8);
    }
}

/// The little-endian `f16` at `block + at` (F16C).
#[inline(always)]
unsafe fn f16_at(block: *const u8, at: usize) -> f32 {
    let bits = u16::from_le_bytes([*block.add(at), *block.add(at + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}
