//! A prompt's products with float weights on AVX-512: the activations transposed into panels of
//! up to [`PANEL_ACTIVATIONS`] rows, a lane each, and every weight broadcast against a panel's
//! registers, so that a tile of [`TILE_ROWS`] weight rows keeps its sums in 24 registers (8
//! weight rows × 48 activation rows, one output a lane) and never reduces one across lanes.
//!
//! The weights are read in place (16-bit ones widened a tile's block at a time into a small
//! buffer, [`weight_tile`]). Only the activations are copied: transposed once a call, on the
//! calling thread, and shared by the call's products (in a C model of this file, 0.6–8 ms for
//! 128 to 512 rows of 2,048 to 5,632 values, 2–7 % of a product of them; not measured here).
//!
//! The float tiles ([`super::rows_of`]) read a row of each operand per register and reduce their
//! sums at the end. With `f32` weights, twice the bytes of the 16-bit ones, they ran at 56–88
//! GFLOP/s at 128 activation rows (one thread, Ice Lake-SP), under candle's `f32` product
//! (75–83), where this core's FMA units do 175 (24 independent 512-bit FMAs in a loop). These
//! run at 101–117 there (`RAYON_NUM_THREADS=1 cargo bench -p llm-kernels -- F32`, two runs:
//! candle's 76–89 in the same runs), 84–115 at 32 rows and 92–117 at 512. F16 at 128 rows, the
//! tiles and these in turn, twice: 74–86 → 94–108; BF16 75–102 → 92–108.
//!
//! A 128-token prompt of TinyLlama's shape in f32 (`llm bench`, paired runs) went 28.4–29.8 →
//! 37.5–42.2 tok/s at one thread, 48.6–49.1 → 61.4–71.0 at two.

use std::arch::x86_64::*;
use std::ops::Range;

use super::x86::Avx512;
use super::{Bf16s, F16s, F32s, Float, FloatMatrix, Widen};

/// Activation rows from which a product of `ty` goes through panels: below, the tiles' sums of a
/// few rows cost less than a panel of one or two registers of lanes half used. GFLOP/s, one
/// thread, tiles and panels in turn: `f32` at 16 rows 47–93 → 58–72 (faster on the MLP's two
/// shapes, as fast on `attn_q`'s, slower on `attn_k`'s 256 rows), at 24 47–68 → 68–84; f16 at
/// 16 rows 60–81 → 53–61, at 24 68–95 → 65–78, at 32 74–81 → 75–97.
pub const fn min_activations(ty: Float) -> usize {
    match ty {
        Float::F32 => 16,
        Float::F16 | Float::Bf16 => 32,
    }
}

/// Activation rows a panel holds: three 512-bit registers of lanes.
const PANEL_ACTIVATIONS: usize = 48;

/// Weight rows a tile broadcasts against a panel: 8 × 3 sums, the panel's 3 registers and the
/// broadcast weight take 28 of the 32.
const TILE_ROWS: usize = 8;

/// Values of a row each tile runs over before the next tile takes them: a panel's block of them
/// (128 × 48 `f32`, 24 KiB) stays in L1 while the weight rows pass. In a C model of this file
/// (a one-off, not kept), 64, 128, 256 and 512 were alike within this VM's noise (79–110
/// GFLOP/s); the whole row at once fell to 70 on the down projection's 5,632 values (a panel's
/// rows, 1 MiB, then come from L3).
const BLOCK_VALUES: usize = 128;

/// Weight rows whose sums a pass over a panel keeps, on the stack.
const SUM_ROWS: usize = 64;

/// `m` activation rows of `cols` values, transposed into panels: panel `p` holds rows
/// `PANEL_ACTIVATIONS · p..`, value `k` of them at `[k][lane]`, in `width(p)` lanes (its rows
/// rounded up to whole registers; the lanes past them are zero).
pub struct Transposed {
    values: Vec<f32>,
    m: usize,
    cols: usize,
}

impl Transposed {
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        let panels = m.div_ceil(PANEL_ACTIVATIONS);
        let mut t = Self { values: Vec::new(), m, cols };
        let len = panels.checked_sub(1).map_or(0, |last| t.start(last) + t.width(last) * cols);
        t.values = vec![0.0; len];
        for p in 0..panels {
            let (start, width, first_row) = (t.start(p), t.width(p), p * PANEL_ACTIVATIONS);
            let live = (m - first_row).min(PANEL_ACTIVATIONS);
            let panel = &mut t.values[start..start + width * cols];
            // A block of values at a time, so that the panel's part it writes stays in cache.
            for block in (0..cols).step_by(64) {
                let values = block..cols.min(block + 64);
                for (lane, row) in x[first_row * cols..].chunks_exact(cols).take(live).enumerate() {
                    for k in values.clone() {
                        panel[k * width + lane] = row[k];
                    }
                }
            }
        }
        t
    }

    fn panels(&self) -> usize {
        self.m.div_ceil(PANEL_ACTIVATIONS)
    }

    /// Lanes of panel `p`: its rows rounded up to whole registers.
    fn width(&self, p: usize) -> usize {
        (self.m - p * PANEL_ACTIVATIONS).min(PANEL_ACTIVATIONS).next_multiple_of(16)
    }

    /// Where panel `p` starts: every panel before it is full.
    fn start(&self, p: usize) -> usize {
        p * PANEL_ACTIVATIONS * self.cols
    }
}

/// Columns `rows` of every output row (`x.m` rows of `w.rows`): `out[i][j] = Σₖ x[i][k] · w[j][k]`.
///
/// # Safety
/// AVX-512F runs here (and F16C, as on every AVX-512 CPU); `x` has rows of `w.cols`; `out`
/// points to `x.m × w.rows` values that no other thread writes in these columns.
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn product_rows(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
    debug_assert_eq!(w.cols, x.cols);
    match w.ty {
        Float::F32 => panels::<F32s>(w, x, rows, out),
        Float::F16 => panels::<F16s>(w, x, rows, out),
        Float::Bf16 => panels::<Bf16s>(w, x, rows, out),
    }
}

/// [`product_rows`] for weights of `H`, panel after panel.
#[inline(always)]
unsafe fn panels<H: Widen>(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
    for p in 0..x.panels() {
        match x.width(p) / 16 {
            3 => panel_rows::<H, 3>(w, x, p, rows.clone(), out),
            2 => panel_rows::<H, 2>(w, x, p, rows.clone(), out),
            1 => panel_rows::<H, 1>(w, x, p, rows.clone(), out),
            lanes => unreachable!("a panel of {lanes} registers"),
        }
    }
}

/// Columns `rows` of panel `p`'s output rows, whose `V` registers of lanes it has.
#[inline(always)]
unsafe fn panel_rows<H: Widen, const V: usize>(w: &FloatMatrix, x: &Transposed, p: usize, rows: Range<usize>, out: *mut f32) {
    let (width, first_row) = (16 * V, p * PANEL_ACTIVATIONS);
    let panel = x.values.as_ptr().add(x.start(p));
    let mut sums = [0f32; SUM_ROWS * PANEL_ACTIVATIONS];
    let mut widened = [0f32; TILE_ROWS * BLOCK_VALUES];
    for chunk in (rows.start..rows.end).step_by(SUM_ROWS) {
        let chunk = chunk..rows.end.min(chunk + SUM_ROWS);
        for block in (0..w.cols).step_by(BLOCK_VALUES) {
            let values = block..w.cols.min(block + BLOCK_VALUES);
            let panel = panel.add(block * width);
            let mut j = chunk.start;
            while j < chunk.end {
                let row = w.bytes.as_ptr().add(H::BYTES * (j * w.cols + block));
                let sums = sums.as_mut_ptr().add((j - chunk.start) * width);
                j += match chunk.end - j >= TILE_ROWS {
                    true => weight_tile::<H, TILE_ROWS, V>(row, w.cols, values.len(), &mut widened, panel, block == 0, sums),
                    false => weight_tile::<H, 1, V>(row, w.cols, values.len(), &mut widened, panel, block == 0, sums),
                };
            }
        }
        for (j, sums) in chunk.zip(sums.chunks_exact(width)) {
            for (i, &sum) in sums.iter().take(x.m - first_row).enumerate() {
                *out.add((first_row + i) * w.rows + j) = sum;
            }
        }
    }
}

/// [`tile`] for `R` rows of `len` values of `H` from `row` (rows of `cols`): `f32` ones where they
/// lie, others widened into `widened` first, so that each is widened once a panel, not once a
/// broadcast.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weight_tile<H: Widen, const R: usize, const V: usize>(
    row: *const u8,
    cols: usize,
    len: usize,
    widened: &mut [f32; TILE_ROWS * BLOCK_VALUES],
    panel: *const f32,
    first_block: bool,
    sums: *mut f32,
) -> usize {
    if H::TY == Float::F32 {
        return tile::<R, V>(row.cast(), cols, panel, len, first_block, sums);
    }
    for a in 0..R {
        for k in (0..len).step_by(16) {
            _mm512_storeu_ps(widened.as_mut_ptr().add(a * BLOCK_VALUES + k), H::widen::<Avx512>(row.add(H::BYTES * (a * cols + k))));
        }
    }
    tile::<R, V>(widened.as_ptr(), BLOCK_VALUES, panel, len, first_block, sums)
}

/// `len` values of `R` weight rows from `weights` (rows `stride` apart) against a panel's block
/// of `V` registers of lanes, into `sums` (`R` rows of `16 · V`), added to what is there unless
/// `first_block`; returns `R`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one counter indexes the sums and the operands
unsafe fn tile<const R: usize, const V: usize>(weights: *const f32, stride: usize, panel: *const f32, len: usize, first_block: bool, sums: *mut f32) -> usize {
    let width = 16 * V;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    if !first_block {
        for a in 0..R {
            for b in 0..V {
                acc[a][b] = _mm512_loadu_ps(sums.add(a * width + 16 * b));
            }
        }
    }
    for k in 0..len {
        let mut xv = [_mm512_setzero_ps(); V];
        for b in 0..V {
            xv[b] = _mm512_loadu_ps(panel.add(k * width + 16 * b));
        }
        for a in 0..R {
            let wv = _mm512_set1_ps(weights.add(a * stride + k).read_unaligned());
            for b in 0..V {
                acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
            }
        }
    }
    for a in 0..R {
        for b in 0..V {
            _mm512_storeu_ps(sums.add(a * width + 16 * b), acc[a][b]);
        }
    }
    R
}
