//! A prompt's products with `f32` weights on AVX-512: the activations transposed into panels of
//! up to [`PANEL_ACTIVATIONS`] rows, a lane each, and every weight broadcast against a panel's
//! registers, so that a tile of [`TILE_ROWS`] weight rows keeps 24 sums in registers (one
//! output each lane) and never reduces one across lanes. The weights are read in place; only
//! the activations are copied, once a product.
//!
//! The float tiles ([`super::rows_of`]) read a row of each operand per register and reduce their
//! sums at the end: with `f32` weights, twice the bytes of the 16-bit ones, they ran at 56–88
//! GFLOP/s at 128 activation rows (one thread, Ice Lake-SP), under candle's `f32` product
//! (75–83), where this core's FMA units do 175 (24 independent 512-bit FMAs in a loop). These
//! run at 101–117 there (`RAYON_NUM_THREADS=1 cargo bench -p llm-kernels -- F32`, two runs:
//! candle's 76–89 in the same runs), 84–115 at 32 rows and 92–117 at 512; a whole 128-token
//! prompt of TinyLlama's shape in f32 (`llm bench`, paired runs) went 28.4–29.8 → 37.5–42.2
//! tok/s at one thread, 48.6–49.1 → 61.4–71.0 at two.
//!
//! The 16-bit weights stay with the tiles: broadcast, each would be widened on its own, and
//! a panel's block of them widened to `f32` first ran no faster than the tiles (a C model of
//! this file, not kept: 79–98 against the tiles' 86–101 GFLOP/s).

use std::arch::x86_64::*;
use std::ops::Range;

use super::FloatMatrix;

/// Activation rows from which an `f32` product goes through panels. At 16 rows (one register of
/// lanes) they ran at 58–72 GFLOP/s against the AVX-512 tiles' 47–93 (faster on the MLP's two
/// shapes, as fast on `attn_q`'s, slower on `attn_k`'s 256 rows), at 24 at 68–84 against 47–68;
/// at 8 and 12 at 32–54, mostly under AVX2's tiles in the same runs (30–77).
pub const MIN_ACTIVATIONS: usize = 16;

/// Activation rows a panel holds: three 512-bit registers of lanes.
const PANEL_ACTIVATIONS: usize = 48;

/// Weight rows a tile broadcasts against a panel: 8 × 3 sums and the panel's 3 registers take
/// 27 of the 32.
const TILE_ROWS: usize = 8;

/// Values of a row each tile runs over before the next tile takes them: a panel's block of them
/// (128 × 48 `f32`, 24 KiB) stays in L1 while the weight rows pass. In the C model, 64, 128,
/// 256 and 512 were alike within this VM's noise (79–110 GFLOP/s); the whole row at once fell
/// to 70 on the down projection's 5,632 values (a panel's rows, 1 MiB, then come from L3).
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
            let (start, width, first) = (t.start(p), t.width(p), p * PANEL_ACTIVATIONS);
            let live = (m - first).min(PANEL_ACTIVATIONS);
            let panel = &mut t.values[start..start + width * cols];
            // A block of values at a time, so that the panel's part it writes stays in cache.
            for block in (0..cols).step_by(64) {
                let values = block..cols.min(block + 64);
                for (lane, row) in x[first * cols..].chunks_exact(cols).take(live).enumerate() {
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
/// AVX-512F runs here; `w` holds `f32` values and `x` rows of `w.cols`; `out` points to `x.m ×
/// w.rows` values that no other thread writes in these columns.
#[target_feature(enable = "avx512f")]
pub unsafe fn product_rows(w: &FloatMatrix, x: &Transposed, rows: Range<usize>, out: *mut f32) {
    debug_assert!(w.ty == super::Float::F32 && w.cols == x.cols);
    for p in 0..x.panels() {
        match x.width(p) / 16 {
            3 => panel_rows::<3>(w, x, p, rows.clone(), out),
            2 => panel_rows::<2>(w, x, p, rows.clone(), out),
            _ => panel_rows::<1>(w, x, p, rows.clone(), out),
        }
    }
}

/// Columns `rows` of panel `p`'s output rows, whose `V` registers of lanes it has.
#[inline(always)]
unsafe fn panel_rows<const V: usize>(w: &FloatMatrix, x: &Transposed, p: usize, rows: Range<usize>, out: *mut f32) {
    let (width, first) = (16 * V, p * PANEL_ACTIVATIONS);
    let panel = x.values.as_ptr().add(x.start(p));
    let weights = w.bytes.as_ptr().cast::<f32>();
    let mut sums = [0f32; SUM_ROWS * PANEL_ACTIVATIONS];
    for chunk in (rows.start..rows.end).step_by(SUM_ROWS) {
        let chunk = chunk..rows.end.min(chunk + SUM_ROWS);
        for block in (0..w.cols).step_by(BLOCK_VALUES) {
            let values = block..w.cols.min(block + BLOCK_VALUES);
            let mut j = chunk.start;
            while j < chunk.end {
                let (row, sums) = (weights.add(j * w.cols), sums.as_mut_ptr().add((j - chunk.start) * width));
                j += match chunk.end - j >= TILE_ROWS {
                    true => tile::<TILE_ROWS, V>(row, w.cols, panel, values.clone(), sums),
                    false => tile::<1, V>(row, w.cols, panel, values.clone(), sums),
                };
            }
        }
        for (j, sums) in chunk.zip(sums.chunks_exact(width)) {
            for (i, &sum) in sums.iter().take(x.m - first).enumerate() {
                *out.add((first + i) * w.rows + j) = sum;
            }
        }
    }
}

/// Values `values` of `R` weight rows from `row` (rows of `cols`) against a panel of `V`
/// registers of lanes, into `sums` (`R` rows of `16 · V`), added to what is there unless
/// `values` starts the rows; returns `R`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one counter indexes the sums and the operands
unsafe fn tile<const R: usize, const V: usize>(row: *const f32, cols: usize, panel: *const f32, values: Range<usize>, sums: *mut f32) -> usize {
    let width = 16 * V;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    if values.start > 0 {
        for a in 0..R {
            for b in 0..V {
                acc[a][b] = _mm512_loadu_ps(sums.add(a * width + 16 * b));
            }
        }
    }
    for k in values {
        let mut xv = [_mm512_setzero_ps(); V];
        for b in 0..V {
            xv[b] = _mm512_loadu_ps(panel.add(k * width + 16 * b));
        }
        for a in 0..R {
            let wv = _mm512_set1_ps(row.add(a * cols + k).read_unaligned());
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
