//! The tile loop every SIMD instruction set shares.
//!
//! A tile is `RT` weight rows × `CT` activation rows: each weight block is loaded once per tile
//! and meets `CT` activation blocks, each activation block meets `RT` weight blocks, and the
//! `RT·CT` partial sums stay in registers for the whole row.

use std::ops::Range;

use crate::activations::QuantizedRows;
use crate::QMatrix;

/// A tile kernel: output `[i..i+CT] × [r..r+RT]`; returns `RT`, the weight rows done.
pub(crate) trait Tile {
    /// # Safety
    /// The module's instruction set is available; the rows exist; `out` as in
    /// [`crate::product_rows`].
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize;
}

/// Columns `rows` of every output row in tiles of `R × C` (a prompt) or `D × 1` (a decode step),
/// and smaller ones for the rows left over. Inlined into each instruction set's entry point,
/// which enables its target features.
#[inline(always)]
pub(crate) unsafe fn rows_of<W: Tile, const R: usize, const C: usize, const D: usize>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
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
pub(crate) unsafe fn operands<'x, const RT: usize, const CT: usize>(
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
pub(crate) unsafe fn store<V: Copy, const RT: usize, const CT: usize>(
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
