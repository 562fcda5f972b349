//! The tile loop every SIMD instruction set shares.
//!
//! A tile is `RT` weight rows × `CT` activation rows: each weight block is loaded once per tile
//! and meets `CT` activation blocks, each activation block meets `RT` weight blocks, and the
//! `RT·CT` partial sums stay in registers for the whole row.

use std::ops::Range;

use crate::activations::{QuantizedRows, Row};
use crate::blocks::BlockType;
use crate::QMatrix;

/// Tile shapes (weight rows × activation rows) of the kernels without panels: AVX2, and NEON,
/// which takes them as they are (not measured on a Graviton). Measured for AVX2 with
/// `cargo bench -p llm-kernels`: a prompt's tile (fewer rows than the x86 panels need)
/// trades weight rows for activation rows (more of the 16 vector registers go to sums that share
/// one weight load).
pub(crate) const PROMPT: (usize, usize) = (2, 4);

/// Weight rows of a decode step's tile (one activation row). More rows' independent sums hide
/// the latency of the multiply-adds; fewer streams of weights read from memory faster. Measured
/// over whole models with AVX2 (`llm bench --kernels avx2`, one / two threads, tok/s):
/// - Q4_0 hides latency the least well (a scale per 32 values): 1 row 4.8–5.3 / 9.5–10.2,
///   2 rows 8.2–8.9 / 15.7–16.4, 4 rows 11.4–11.9 / 20.7;
/// - Q8_0: 1 row 5.1–5.2 / 9.3–9.5, 2 rows 6.8–7.9 / 13.0–13.5, 4 rows 5.8–6.9 / 11.1–11.6,
///   while a fixed prefetch distance skipped some rows of the next tiles; since every row is
///   fetched ahead (`x86::tiles_ahead`), 4 rows are a little faster than 2 (Zen 3, paired runs,
///   7.2–8.8 → 7.4–9.1 / 13.0–13.6 → 13.3–14.4, 13 of 18 pairs faster);
/// - the K-quants' rows hold more registers (scales, minimums, two of nibbles), so four spill
///   out of the 16 registers; one row decoded fastest (Q4_K_M, one thread: 1 row 13.1–13.5,
///   2 rows 12.3–12.4, 4 rows 8.9–10.0). Retried for Q4_K once its blocks took fewer
///   instructions (Zen 4, one thread, `ffn_up`): two rows no faster in cache, and 13.6–17.9 GB/s
///   of weights out of memory against one row's 17.1–17.6.
pub(crate) const fn decode_rows(ty: BlockType) -> usize {
    match ty {
        // Q4_1, Q5_0 and Q5_1 are Q4_0's tile with a minimum or a fifth bit.
        BlockType::Q4_0 | BlockType::Q4_0ScalesFirst | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1 => 4,
        BlockType::Q8_0 => 4,
        BlockType::Q2K | BlockType::Q3K | BlockType::Q4K | BlockType::Q5K | BlockType::Q6K => 1,
        // Their tiles are a group of rows ([`BlockType::rows_together`]).
        BlockType::Q8_0Interleaved
        | BlockType::Q4_0Interleaved
        | BlockType::Q4_1Interleaved
        | BlockType::Q5_0Interleaved
        | BlockType::Q5_1Interleaved
        | BlockType::Q4KInterleaved
        | BlockType::Q5KInterleaved
        | BlockType::Q6KInterleaved
        | BlockType::Q3KInterleaved
        | BlockType::Q2KInterleaved => crate::blocks::INTERLEAVED_ROWS,
    }
}

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
///
/// Two or three activation rows left over (a batch of that many sequences, or what a batch's
/// tiles of `C` leave) go through one tile of them: one by one, each row's pass read every
/// weight from memory again; one tile reads them once.
#[inline(always)]
pub(crate) unsafe fn rows_of<W: Tile, const R: usize, const C: usize, const D: usize>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    // Activation rows outside, weight rows inside: the few activation rows of a tile stay in
    // L1 while the group's weight rows come from L2.
    let mut i = 0;
    while i < x.rows() {
        i += match x.rows() - i {
            left if left >= C => across::<W, R, C>(w, x, rows.clone(), i, out),
            3 => across::<W, R, 3>(w, x, rows.clone(), i, out),
            2 => across::<W, R, 2>(w, x, rows.clone(), i, out),
            _ => across::<W, D, 1>(w, x, rows.clone(), i, out),
        };
    }
}

/// Weight rows `rows` against activation rows `i..i + CT`, in tiles of `RT` weight rows and of
/// one for the rows left over; returns `CT`.
#[inline(always)]
unsafe fn across<W: Tile, const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, i: usize, out: *mut f32) -> usize {
    let mut r = rows.start;
    while r < rows.end {
        r += match rows.end - r >= RT {
            true => W::tile::<RT, CT>(w, x, r, i, out),
            false => W::tile::<1, CT>(w, x, r, i, out),
        };
    }
    CT
}

/// The tile's weight rows and activation rows.
#[inline(always)]
pub(crate) unsafe fn operands<'x, const RT: usize, const CT: usize>(w: &QMatrix, x: &'x QuantizedRows, r: usize, i: usize) -> ([*const u8; RT], [Row<'x>; CT]) {
    let row_bytes = w.ty.row_bytes(w.cols);
    // A loop, not `array::from_fn`: LLVM left that closure out of line, a call per decode tile
    // (2 % of a Q4_K_M decode step).
    let mut acts: [Row; CT] = [(&[], &[], &[]); CT];
    for (c, act) in acts.iter_mut().enumerate() {
        *act = x.row(i + c);
    }
    (std::array::from_fn(|a| w.bytes.as_ptr().add((r + a) * row_bytes)), acts)
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
    for (a, sums) in acc.iter().enumerate() {
        for (c, &sum) in sums.iter().enumerate() {
            *out.add((i + c) * w.rows + r + a) = hsum(sum);
        }
    }
    RT
}
