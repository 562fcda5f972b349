//! A prompt's products with float weights on x86: the activations transposed into panels of
//! a few registers of rows, a lane each, and every weight broadcast against a panel's registers,
//! so that a tile of weight rows keeps its sums in registers (one output a lane) and never
//! reduces one across lanes. AVX-512: tiles of 8 weight rows × 48 activation rows, 24 registers
//! of sums; AVX2, `f32` weights only: 6 × 16, 12 registers ([`Broadcast`]), which AVX-512 takes
//! too for fewer than 24 activation rows ([`layout`]).
//!
//! A product takes its weight rows a chunk at a time ([`CHUNK_ROWS`]), and a chunk a block of
//! values at a time: every panel's block passes the chunk's block while it is in cache, so each
//! weight comes from memory once a product (16-bit ones widened to `f32` once, into a buffer).
//! Only the activations are copied whole: transposed once a call, on the calling thread, shared by
//! the call's products (0.8 % of the samples of a one-thread 128-token prompt of TinyLlama's
//! shape in f32 with AVX2, `perf`).
//!
//! The float tiles ([`super::rows_of`]) read a row of each operand per register and reduce their
//! sums at the end. With `f32` weights, twice the bytes of the 16-bit ones, they ran at 56–88
//! GFLOP/s at 128 activation rows (one thread, Ice Lake-SP), under candle's `f32` product
//! (75–83), where this core's FMA units do 175 (24 independent 512-bit FMAs in a loop). The
//! panels, a panel after another over all of a group's rows, ran at 101–117 there
//! (`RAYON_NUM_THREADS=1 cargo bench -p llm-kernels -- F32`, two runs: candle's 76–89 in the
//! same runs), 84–115 at 32 rows and 92–117 at 512. F16 at 128 rows, the tiles and the panels
//! in turn, twice: 74–86 → 94–108; BF16 75–102 → 92–108. A 128-token prompt of TinyLlama's
//! shape in f32 (`llm bench`, paired runs) went 28.4–29.8 → 37.5–42.2 tok/s at one thread,
//! 48.6–49.1 → 61.4–71.0 at two.
//!
//! With AVX2 alone, `f32` panels a panel after another ran at 49–57 GFLOP/s with tiles of
//! 4 × 24 (their sums partly on the stack) and 65–75 with 6 × 16, against the tiles' 36–69: the
//! weights, read once a panel of 16 rows, came from memory 8 times for 128 rows. Chunk after
//! chunk, with tiles of 4 rows for a chunk's last 4 (64 = 10 × 6 + 4; tiles of one took 12 %
//! of a prompt's samples): 77–84 in two runs (one cell 44, in a slow phase of the VM), 70–87 at
//! 16 rows against the tiles' 36–84. AVX-512's panels, chunk after chunk: `f32` 101–125, f16
//! 99–114, bf16 91–117 at 128 rows. Through AVX2's panels, f16 ran no faster than its tiles
//! (128 rows, one thread, in turn: 43–82 against 46–79 in a slow phase, 63–76 against 74–81 in
//! a quieter one), which read half the bytes of `f32` ones: 16-bit weights keep the tiles there.

use std::arch::x86_64::*;
use std::ops::Range;

use super::x86::{Avx2, Avx512};
use super::{Bf16s, F16s, F32s, Float, FloatMatrix, Lanes, Widen};
use crate::Kernels;

/// Whether a product of `ty` weights against `m` activation rows goes through panels with
/// `kernels`: below the threshold, the tiles' sums of a few rows cost less than a panel of one or
/// two registers of lanes half used. GFLOP/s, one thread, AVX-512, tiles and panels in turn:
/// `f32` at 16 rows 47–93 → 58–72 (faster on the MLP's two shapes, as fast on `attn_q`'s, slower
/// on `attn_k`'s 256 rows; AVX2's panels, which [`layout`] now takes there, 68–85), at 24 47–68
/// → 68–84; f16 at 16 rows 60–81 → 53–61, at 24 68–95 → 65–78, at 32 74–81 → 75–97. AVX2, `f32`
/// at 16 rows: 36–84 → 70–87. With AVX2, 16-bit weights keep the tiles (above); with AVX-512,
/// they start where its own panels do.
pub fn through_panels(kernels: Kernels, ty: Float, m: usize) -> bool {
    let from = match (kernels, ty) {
        (Kernels::Avx512Vnni | Kernels::Avx2, Float::F32) => 16,
        (Kernels::Avx512Vnni, Float::F16 | Float::Bf16) => SIXTEEN_BIT_FROM,
        (Kernels::Avx2, Float::F16 | Float::Bf16) | (Kernels::NeonDot | Kernels::Scalar, _) => return false,
    };
    m >= from
}

/// The kernels whose panels a product of `m` activation rows takes with `kernels`. Up to 16
/// rows, AVX-512's panel is one register of lanes, and its tiles of 8 sums ran `f32` at 55–65
/// GFLOP/s where AVX2's panels of 16 (6 × 2 sums) ran at 68–85 on the same CPU (one cell 36;
/// one thread, in turn, two runs); at 24 rows, 52–86 against 60–77. Only `f32` weights go
/// through panels of so few rows ([`through_panels`]).
fn layout(kernels: Kernels, m: usize) -> Kernels {
    match kernels {
        Kernels::Avx512Vnni if m < AVX512_PANELS_FROM => Kernels::Avx2,
        _ => kernels,
    }
}

/// Activation rows from which AVX-512 takes its own panels ([`layout`]).
const AVX512_PANELS_FROM: usize = 24;

/// Activation rows from which 16-bit weights go through AVX-512's panels ([`through_panels`]).
const SIXTEEN_BIT_FROM: usize = 32;

// AVX2's panels take `f32` weights alone: 16-bit ones must never meet them on AVX-512.
const _: () = assert!(AVX512_PANELS_FROM <= SIXTEEN_BIT_FROM);

/// Values of a row each tile runs over before the next tile takes them: a panel's block of them
/// (128 × 48 `f32`, 24 KiB, with AVX-512) stays in L1 while the weight rows pass. In a C model
/// of this file (a one-off, not kept), 64, 128, 256 and 512 were alike within this VM's noise
/// (79–110 GFLOP/s); the whole row at once fell to 70 on the down projection's 5,632 values (a
/// panel's rows, 1 MiB, then come from L3).
const BLOCK_VALUES: usize = 128;

/// Weight rows a pass over the panels takes: their block of values (widened to `f32` where
/// they are not) stays in L1 or L2 while every panel's block passes.
const CHUNK_ROWS: usize = 64;

/// A register of `f32` lanes, as a panel's tile broadcasts weights against it.
trait Broadcast: Lanes {
    /// Registers of lanes a panel holds: a tile's sums for each of its weight rows.
    const PANEL_REGISTERS: usize;
    /// Weight rows a tile broadcasts against a panel: as many as the sums (`PANEL_REGISTERS` a
    /// row), the panel's registers and the broadcast weight leave room for.
    const TILE_ROWS: usize;
    unsafe fn splat(value: f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
}

impl Broadcast for Avx512 {
    /// 24 sums, 3 panel registers and the weight: 28 of the 32 registers.
    const PANEL_REGISTERS: usize = 3;
    const TILE_ROWS: usize = 8;

    #[inline(always)]
    unsafe fn splat(value: f32) -> __m512 {
        _mm512_set1_ps(value)
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
}

impl Broadcast for Avx2 {
    /// 12 sums, 2 panel registers and the weight: 15 of the 16 registers. Tiles of 4 rows × 3
    /// registers, all 16, kept some sums on the stack: `f32` at 49–57 GFLOP/s against 65–75 (128
    /// rows, one thread, Ice Lake-SP).
    const PANEL_REGISTERS: usize = 2;
    const TILE_ROWS: usize = 6;

    #[inline(always)]
    unsafe fn splat(value: f32) -> __m256 {
        _mm256_set1_ps(value)
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
}

/// `m` activation rows of `cols` values, transposed into panels of `registers` registers of
/// `lanes` (as `kernels`, [`layout`]'s choice, have them): panel `p` holds rows
/// `registers · lanes · p..`, value `k` of them at `[k][lane]`, in `width(p)` lanes (its rows
/// rounded up to whole registers; the lanes past them are zero).
pub struct Transposed {
    values: Vec<f32>,
    kernels: Kernels,
    lanes: usize,
    registers: usize,
    m: usize,
    cols: usize,
}

impl Transposed {
    /// # Panics
    /// If `kernels` have no panels ([`through_panels`]).
    pub fn new(kernels: Kernels, x: &[f32], m: usize, cols: usize) -> Self {
        let kernels = layout(kernels, m);
        let (lanes, registers) = match kernels {
            Kernels::Avx512Vnni => (Avx512::LANES, Avx512::PANEL_REGISTERS),
            Kernels::Avx2 => (Avx2::LANES, Avx2::PANEL_REGISTERS),
            Kernels::NeonDot | Kernels::Scalar => panic!("the {kernels:?} kernels have no panels"),
        };
        let mut t = Self { values: Vec::new(), kernels, lanes, registers, m, cols };
        t.values = vec![0.0; t.total_lanes() * cols];
        for p in 0..t.panels() {
            let (start, width, first_row, rows) = (t.start(p), t.width(p), t.first_row(p), t.rows(p));
            let panel = &mut t.values[start..start + width * cols];
            // A block of values at a time, so that the panel's part it writes stays in cache.
            for block in (0..cols).step_by(64) {
                let values = block..cols.min(block + 64);
                for (lane, row) in x[first_row * cols..].chunks_exact(cols).take(rows).enumerate() {
                    for k in values.clone() {
                        panel[k * width + lane] = row[k];
                    }
                }
            }
        }
        t
    }

    /// Activation rows a full panel holds.
    fn activations(&self) -> usize {
        self.registers * self.lanes
    }

    fn panels(&self) -> usize {
        self.m.div_ceil(self.activations())
    }

    /// Panel `p`'s first activation row, and its first lane among all the panels' (every panel
    /// before it is full).
    fn first_row(&self, p: usize) -> usize {
        p * self.activations()
    }

    /// Activation rows panel `p` holds.
    fn rows(&self, p: usize) -> usize {
        (self.m - self.first_row(p)).min(self.activations())
    }

    /// Lanes of panel `p`: its rows rounded up to whole registers.
    fn width(&self, p: usize) -> usize {
        self.rows(p).next_multiple_of(self.lanes)
    }

    /// Where panel `p` starts.
    fn start(&self, p: usize) -> usize {
        self.first_row(p) * self.cols
    }

    /// Lanes of all the panels.
    fn total_lanes(&self) -> usize {
        self.panels().checked_sub(1).map_or(0, |last| self.first_row(last) + self.width(last))
    }
}

/// Columns `rows` of every output row (`x.m` rows of `w.rows`): `out[i][j] = Σₖ x[i][k] · w[j][k]`.
///
/// # Safety
/// The kernels `x` was transposed for run here; `x` has rows of `w.cols`; `out` points to
/// `x.m × w.rows` values that no other thread writes in these columns.
pub unsafe fn product_rows(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
    debug_assert_eq!(w.cols, x.cols);
    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    unsafe fn avx512<H: Widen>(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
        panels::<Avx512, H, { Avx512::TILE_ROWS }>(w, x, rows, out)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_f32(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
        panels::<Avx2, F32s, { Avx2::TILE_ROWS }>(w, x, rows, out)
    }
    match (x.kernels, w.ty) {
        (Kernels::Avx512Vnni, Float::F32) => avx512::<F32s>(w, x, rows, out),
        (Kernels::Avx512Vnni, Float::F16) => avx512::<F16s>(w, x, rows, out),
        (Kernels::Avx512Vnni, Float::Bf16) => avx512::<Bf16s>(w, x, rows, out),
        (Kernels::Avx2, Float::F32) => avx2_f32(w, x, rows, out),
        (kernels, ty) => unreachable!("{ty:?} weights against panels for {kernels:?}"),
    }
}

/// [`product_rows`] for weights of `H` in tiles of `R` weight rows: [`CHUNK_ROWS`] weight rows
/// at a time, and for each block of their values every panel in turn, so that the chunk's block
/// comes from memory (and is widened) once a product, not once a panel.
#[inline(always)]
unsafe fn panels<L: Broadcast, H: Widen, const R: usize>(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
    let mut sums = vec![0f32; CHUNK_ROWS * x.total_lanes()];
    let mut widened = vec![0f32; if H::TY == Float::F32 { 0 } else { CHUNK_ROWS * BLOCK_VALUES }];
    for chunk in (rows.start..rows.end).step_by(CHUNK_ROWS) {
        let chunk = chunk..rows.end.min(chunk + CHUNK_ROWS);
        for block in (0..w.cols).step_by(BLOCK_VALUES) {
            let len = w.cols.min(block + BLOCK_VALUES) - block;
            let first = w.bytes.as_ptr().add(H::BYTES * (chunk.start * w.cols + block));
            let (weights, stride) = match H::TY {
                Float::F32 => (first.cast::<f32>(), w.cols),
                _ => {
                    for a in 0..chunk.len() {
                        for k in (0..len).step_by(L::LANES) {
                            L::store(widened.as_mut_ptr().add(a * BLOCK_VALUES + k), H::widen::<L>(first.add(H::BYTES * (a * w.cols + k))));
                        }
                    }
                    (widened.as_ptr(), BLOCK_VALUES)
                }
            };
            for p in 0..x.panels() {
                let panel = x.values.as_ptr().add(x.start(p) + block * x.width(p));
                let sums = sums.as_mut_ptr().add(CHUNK_ROWS * x.first_row(p));
                // Calls, not a function pointer chosen here: that would be a function of its own,
                // compiled without the caller's target features.
                match x.width(p) / L::LANES {
                    // Only where a panel has three registers: AVX2's 6 × 3 sums would not fit.
                    3 if L::PANEL_REGISTERS >= 3 => tiles::<L, R, 3>(weights, stride, chunk.len(), panel, len, block == 0, sums),
                    2 => tiles::<L, R, 2>(weights, stride, chunk.len(), panel, len, block == 0, sums),
                    1 => tiles::<L, R, 1>(weights, stride, chunk.len(), panel, len, block == 0, sums),
                    registers => unreachable!("a panel of {registers} registers"),
                }
            }
        }
        for p in 0..x.panels() {
            let (width, first_row) = (x.width(p), x.first_row(p));
            let sums = &sums[CHUNK_ROWS * first_row..][..chunk.len() * width];
            for (j, sums) in chunk.clone().zip(sums.chunks_exact(width)) {
                for (i, &sum) in sums.iter().take(x.rows(p)).enumerate() {
                    *out.add((first_row + i) * w.rows + j) = sum;
                }
            }
        }
    }
}

/// `rows` weight rows of `len` values from `weights` (rows `stride` apart) against a panel's
/// block of `V` registers of lanes, in tiles of `R` rows, then 4 (groups of rows are multiples of
/// 4 but for a product's last, and AVX2's 6 leave 4 of 64) and one for the rows left over, into
/// `sums` (`rows` rows of `V` registers).
#[inline(always)]
unsafe fn tiles<L: Broadcast, const R: usize, const V: usize>(
    weights: *const f32,
    stride: usize,
    rows: usize,
    panel: *const f32,
    len: usize,
    first_block: bool,
    sums: *mut f32,
) {
    let width = L::LANES * V;
    let mut a = 0;
    while a < rows {
        let (weights, sums) = (weights.add(a * stride), sums.add(a * width));
        a += match rows - a {
            left if left >= R => tile::<L, R, V>(weights, stride, panel, len, first_block, sums),
            left if left >= 4 => tile::<L, 4, V>(weights, stride, panel, len, first_block, sums),
            _ => tile::<L, 1, V>(weights, stride, panel, len, first_block, sums),
        };
    }
}

/// `len` values of `R` weight rows from `weights` (rows `stride` apart) against a panel's block
/// of `V` registers of lanes, into `sums` (`R` rows of `V` registers), added to what is there
/// unless `first_block`; returns `R`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one counter indexes the sums and the operands
unsafe fn tile<L: Broadcast, const R: usize, const V: usize>(
    weights: *const f32,
    stride: usize,
    panel: *const f32,
    len: usize,
    first_block: bool,
    sums: *mut f32,
) -> usize {
    let width = L::LANES * V;
    let mut acc = [[L::zero(); V]; R];
    if !first_block {
        for a in 0..R {
            for b in 0..V {
                acc[a][b] = L::f32(sums.add(a * width + L::LANES * b));
            }
        }
    }
    for k in 0..len {
        let mut xv = [L::zero(); V];
        for b in 0..V {
            xv[b] = L::f32(panel.add(k * width + L::LANES * b));
        }
        for a in 0..R {
            let wv = L::splat(weights.add(a * stride + k).read_unaligned());
            for b in 0..V {
                acc[a][b] = L::fma(wv, xv[b], acc[a][b]);
            }
        }
    }
    for a in 0..R {
        for b in 0..V {
            L::store(sums.add(a * width + L::LANES * b), acc[a][b]);
        }
    }
    R
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`product_rows`] over more weight rows than a chunk takes, which the compute pool's groups
    /// (64 rows at most) never give it: every chunk's sums start afresh. Weights and activations
    /// are small multiples of a power of two, so every sum is exact in `f32`.
    #[test]
    fn rows_past_a_chunk_give_exact_sums() {
        let (rows, cols, m) = (150, 272, 50);
        let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 7) % 17) as f32 / 8.0 - 1.0).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| ((i * 5) % 13) as f32 / 4.0 - 1.5).collect();
        for kernels in [Kernels::Avx512Vnni, Kernels::Avx2].into_iter().filter(|k| k.runs_here()) {
            for ty in [Float::F32, Float::F16].into_iter().filter(|&ty| through_panels(kernels, ty, m)) {
                let bytes: Vec<u8> = match ty {
                    Float::F32 => weights.iter().flat_map(|w| w.to_le_bytes()).collect(),
                    _ => weights.iter().flat_map(|&w| half::f16::from_f32(w).to_le_bytes()).collect(),
                };
                let w = FloatMatrix::new(ty, rows, cols, &bytes).unwrap();
                let mut out = vec![f32::NAN; m * rows];
                // SAFETY: `kernels` run here; `out` is `m × rows`, this thread's alone.
                unsafe { product_rows(&w, &Transposed::new(kernels, &x, m, cols), 0..rows, out.as_mut_ptr()) };
                for i in 0..m {
                    for j in 0..rows {
                        let exact: f32 = (0..cols).map(|k| weights[j * cols + k] * x[i * cols + k]).sum();
                        assert_eq!(out[i * rows + j], exact, "{kernels:?}, {ty:?}: out[{i}][{j}]");
                    }
                }
            }
        }
    }
}
