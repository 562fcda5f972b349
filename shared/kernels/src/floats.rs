//! Products with plain float weights (a GGUF's F32, F16 and BF16 tensors), read in place as the
//! block formats are.
//!
//! Each weight becomes `f32` in a register as it is loaded (F16C's `vcvtph2ps`; a bf16 is the
//! top half of an `f32`) and meets the activations as they are, in `f32`, with `f32` sums:
//! llama.cpp rounds the activations to the weights' type first; the conversion here costs nothing
//! it would save. Tiles as the block formats' (weight rows × activation rows, the sums in
//! registers for as much of a row as the tile's activations keep in L1) make a prompt a matrix
//! product and a decode step one stream of weights a row.
//!
//! Before these, candle took such a file's matrices: dequantized to `f32` at load and multiplied
//! by its `f32` matrix product. TinyLlama's shape in f16, two threads, Ice Lake-SP
//! (`compare.py`): decode 2.0 → 8.9 tok/s (llama.cpp 6.8), a 128-token prompt 31.3 → 52.9 tok/s
//! (llama.cpp 52.8), load 15.2 → 0.08 s, peak RSS 6,415 → 2,023 MiB for a 2,101 MiB file. In f32,
//! candle's copy: decode 2.4 → 5.2–6.3 tok/s, load 11 → 0.1 s, peak RSS 8,681 → 3,995 MiB for a
//! 4,199 MiB file. A prompt's products go through panels of transposed activations (`panels`),
//! not the tiles: from 16 activation rows for `f32` weights (AVX-512 or AVX2), from 32 for the
//! 16-bit ones (AVX-512 only).

#[cfg(target_arch = "x86_64")]
mod panels;

use std::ops::Range;

use crate::{Kernels, OutPtr, ShapeError};

/// Values a row of a [`FloatMatrix`] is a whole number of: the widest registers' lanes.
pub const FLOAT_ROW_MULTIPLE: usize = 16;

/// A float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Float {
    /// IEEE single precision.
    F32,
    /// IEEE half precision: 5 bits of exponent, 10 of mantissa.
    F16,
    /// bfloat16: the top 16 bits of an `f32`.
    Bf16,
}

impl Float {
    /// Bytes a value takes.
    pub const fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// A weight matrix of `rows` rows of `cols` little-endian floats, row after row.
#[derive(Debug, Clone, Copy)]
pub struct FloatMatrix<'a> {
    pub ty: Float,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> FloatMatrix<'a> {
    pub fn new(ty: Float, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self, ShapeError> {
        if cols == 0 || !cols.is_multiple_of(FLOAT_ROW_MULTIPLE) {
            return Err(ShapeError(format!("a {ty:?} row must be a whole number of {FLOAT_ROW_MULTIPLE} values, not {cols}")));
        }
        let expected = ty.bytes() * rows * cols;
        if bytes.len() != expected {
            return Err(ShapeError(format!("a {rows}×{cols} {ty:?} matrix takes {expected} bytes, not {}", bytes.len())));
        }
        Ok(Self { ty, rows, cols, bytes })
    }
}

/// [`crate::matmuls_with`] for plain float weights: `y = x · Wᵀ` for each of `products`, which
/// take the same `x`, in one job of the compute pool.
///
/// # Panics
/// If this CPU cannot run `kernels` ([`Kernels::runs_here`]).
pub fn float_matmuls_with(kernels: Kernels, products: &mut [(FloatMatrix, &mut [f32])], x: &[f32]) -> Result<(), ShapeError> {
    assert!(kernels.runs_here(), "this CPU cannot run the {kernels:?} kernels");
    let m = crate::input_rows(products.iter().map(|(w, y)| (w.rows, w.cols, y.len())), x.len())?;
    let parts: Vec<(FloatMatrix, OutPtr<f32>)> = products.iter_mut().map(|(w, y)| (*w, OutPtr(y.as_mut_ptr()))).collect();
    let rows: Vec<(usize, usize)> = parts.iter().map(|(w, _)| (w.rows, 1)).collect();
    #[cfg(target_arch = "x86_64")]
    let through_panels = |ty: Float| panels::through_panels(kernels, ty, m);
    #[cfg(target_arch = "x86_64")]
    let transposed = parts.iter().any(|(w, _)| through_panels(w.ty)).then(|| panels::Transposed::new(kernels, x, m, parts[0].0.cols));
    crate::in_row_groups(&rows, m, |p, rows| {
        let (w, out) = &parts[p];
        #[cfg(target_arch = "x86_64")]
        if let Some(x) = transposed.as_ref().filter(|_| through_panels(w.ty)) {
            // SAFETY: as below; `transposed` is made for `kernels` or, under AVX-512, AVX2's
            // panels (which every AVX-512 CPU runs), from `x`, whose rows `input_rows` found as
            // long as every product's.
            return unsafe { panels::product_rows(w, x, rows, out.0) };
        }
        // SAFETY: each group of rows is its own columns of the output, which outlives the pool's
        // execution; `kernels` run here.
        unsafe {
            match w.ty {
                Float::F32 => product_rows::<F32s>(kernels, w, x, m, rows, out.0),
                Float::F16 => product_rows::<F16s>(kernels, w, x, m, rows, out.0),
                Float::Bf16 => product_rows::<Bf16s>(kernels, w, x, m, rows, out.0),
            }
        }
    });
    Ok(())
}

/// [`float_matmuls_with`] with [`Kernels::best`].
pub fn float_matmuls(products: &mut [(FloatMatrix, &mut [f32])], x: &[f32]) -> Result<(), ShapeError> {
    float_matmuls_with(Kernels::best(), products, x)
}

/// Columns `rows` of each of the `m` output rows.
///
/// # Safety
/// `kernels` run here; `out` points to `m × w.rows` values that no other thread writes in these
/// columns.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // only x86 has float kernels of its own
unsafe fn product_rows<H: Widen>(kernels: Kernels, w: &FloatMatrix, x: &[f32], m: usize, rows: Range<usize>, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        unsafe fn avx512<H: Widen>(w: &FloatMatrix, x: &[f32], m: usize, rows: Range<usize>, out: *mut f32) {
            rows_of::<x86::Avx512, H, 3, 8, 4>(w, x, m, rows, out)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<H: Widen>(w: &FloatMatrix, x: &[f32], m: usize, rows: Range<usize>, out: *mut f32) {
            rows_of::<x86::Avx2, H, 3, 4, 4>(w, x, m, rows, out)
        }
        match kernels {
            Kernels::Avx512Vnni => return avx512::<H>(w, x, m, rows, out),
            Kernels::Avx2 => return avx2::<H>(w, x, m, rows, out),
            _ => {}
        }
    }
    rows_of::<Portable, H, 2, 4, 4>(w, x, m, rows, out)
}

/// Weight rows `rows` against all `m` activation rows in tiles of `R × C` (a prompt) or `D × 1`
/// (a decode step), and smaller ones for the rows left over; activation rows outside, so that a
/// tile's few (a block of them, [`across`]) stay in L1 while the weight rows pass, each a stream
/// from L2 (a prompt) or memory.
///
/// AVX-512 takes 3 × 8: eight activation rows share each weight register, which halves the
/// weights read from L2 per product against 3 × 4, and the blocks of [`across`] keep the eight
/// rows in L1 (`cargo bench -p llm-kernels -- m=128`, one thread, Ice Lake-SP, GFLOP/s against
/// 3 × 4 the same hour: f16 84–91 against 74–93, f32 56–88 against 40–62; the f32 weights, twice
/// the bytes, gained most, but stayed under candle's own f32 product there, 75–83). Before the
/// blocks, 3 × 8 was slower than 3 × 4 (26–51 against 43–77 for AVX2's 3 × 4 in the same run).
/// The tiles now take a decode step, prompts of a few rows, and with AVX2 the 16-bit weights'
/// prompts; the others go through `panels`.
///
/// Tried for prompts and not kept (`cargo bench -p llm-kernels -- F16`, Ice Lake-SP, one
/// thread, GFLOP/s against AVX2's tiles of 3 × 4 in the same run):
/// - AVX-512 tiles of 4 weight rows × 6 activation rows: 24–33 against 46–80; of 4 × 4, 22–40
///   against 42–72, and 38–42 with the blocks; of 2 × 8 with the blocks, 39–41 against 62–80;
/// - copies of a group's weight rows, 128 or 256 values at a time, so that they stay in L1
///   across tiles: no faster; each tile then reduces its sums across lanes once a block;
/// - `gemm`'s matrix product (candle's, over the group's rows converted to `f32`): as fast from
///   128 rows on, half as fast at 16 to 32;
/// - a first form of the panels: a group's rows widened to `f32` once, each weight broadcast
///   against one register of 16 (AVX-512) or 8 activation rows transposed: AVX-512 51–90, AVX2
///   58–72 against the tiles' 65–88. `panels` broadcast each weight against up to three
///   registers, and widen a block of a chunk's rows at a time.
#[inline(always)]
unsafe fn rows_of<L: Lanes, H: Widen, const R: usize, const C: usize, const D: usize>(w: &FloatMatrix, x: &[f32], m: usize, rows: Range<usize>, out: *mut f32) {
    let (weights, out) = (w.bytes.as_ptr().add(H::BYTES * rows.start * w.cols), out.add(rows.start));
    let mut i = 0;
    while i < m {
        let (x, out) = (x.as_ptr().add(i * w.cols), out.add(i * w.rows));
        i += match m - i {
            left if left >= C => across::<L, H, R, C>(w, weights, rows.len(), x, out),
            left if left >= 3 => across::<L, H, R, 3>(w, weights, rows.len(), x, out),
            2 => across::<L, H, R, 2>(w, weights, rows.len(), x, out),
            _ => across::<L, H, D, 1>(w, weights, rows.len(), x, out),
        };
    }
}

/// `rows` weight rows from `weights` against `CT` activation rows from `x`, into `out` (`CT`
/// rows of the output), in tiles of `RT` weight rows and of one for the rows left over; returns
/// `CT`.
///
/// A row's values in blocks of about [`TILE_ACTIVATIONS`] for the `CT` rows together (rounded up
/// to whole registers), all weight rows through one block before the next: the activations'
/// block stays in L1 while the weights pass. Without blocks, four rows of the MLP's down
/// projection (5,632 values) did not fit there, and its product ran at 49.5 GFLOP/s against 74.5
/// for the up projection's 2,048 (`cargo bench -p llm-kernels -- F16 m=128`, AVX-512, one thread,
/// Ice Lake-SP).
#[inline(always)]
unsafe fn across<L: Lanes, H: Widen, const RT: usize, const CT: usize>(
    w: &FloatMatrix,
    weights: *const u8,
    rows: usize,
    x: *const f32,
    out: *mut f32,
) -> usize {
    let blocks = (CT * w.cols).div_ceil(TILE_ACTIVATIONS);
    let block = w.cols.div_ceil(blocks).next_multiple_of(FLOAT_ROW_MULTIPLE);
    for start in (0..w.cols).step_by(block) {
        let values = start..w.cols.min(start + block);
        let mut r = 0;
        while r < rows {
            let (weights, out) = (weights.add(H::BYTES * r * w.cols), out.add(r));
            r += match rows - r >= RT {
                true => tile::<L, H, RT, CT>(w, weights, x, values.clone(), out),
                false => tile::<L, H, 1, CT>(w, weights, x, values.clone(), out),
            };
        }
    }
    CT
}

/// Activation values (`f32`) a tile reads from L1: 32 KiB, of the 48 KiB an Ice Lake or later
/// core has. Half as many were as fast there; a core of 32 KiB (most before Ice Lake, and Zen 3)
/// may want them, and was not measured.
const TILE_ACTIVATIONS: usize = 8 * 1024;

/// Values `values` of `RT` weight rows from `weights` against `CT` activation rows from `x`,
/// into `out` (`CT` rows of `RT` sums), added to what is there unless `values` starts the rows;
/// returns `RT`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // as in `x86`: one counter indexes the sums and the operands
unsafe fn tile<L: Lanes, H: Widen, const RT: usize, const CT: usize>(
    w: &FloatMatrix,
    weights: *const u8,
    x: *const f32,
    values: Range<usize>,
    out: *mut f32,
) -> usize {
    let (mut acc, mut wv) = ([[L::zero(); CT]; RT], [L::zero(); RT]);
    let first = values.start == 0;
    for k in values.step_by(L::LANES) {
        // A loop, not `array::from_fn`: a closure does not take the caller's target features,
        // and its vector operations would be calls if LLVM did not inline it.
        for a in 0..RT {
            wv[a] = H::widen::<L>(weights.add(H::BYTES * (a * w.cols + k)));
        }
        for c in 0..CT {
            let xv = L::f32(x.add(c * w.cols + k));
            for a in 0..RT {
                acc[a][c] = L::fma(wv[a], xv, acc[a][c]);
            }
        }
    }
    for (a, sums) in acc.iter().enumerate() {
        for (c, &sum) in sums.iter().enumerate() {
            let out = out.add(c * w.rows + a);
            *out = L::sum(sum) + if first { 0.0 } else { *out };
        }
    }
    RT
}

/// A float format, as a tile widens it to `f32` lanes.
trait Widen {
    const TY: Float;
    const BYTES: usize = Self::TY.bytes();
    unsafe fn widen<L: Lanes>(p: *const u8) -> L::V;
}

struct F32s;

impl Widen for F32s {
    const TY: Float = Float::F32;

    #[inline(always)]
    unsafe fn widen<L: Lanes>(p: *const u8) -> L::V {
        L::f32(p.cast())
    }
}

struct F16s;

impl Widen for F16s {
    const TY: Float = Float::F16;

    #[inline(always)]
    unsafe fn widen<L: Lanes>(p: *const u8) -> L::V {
        L::f16(p)
    }
}

struct Bf16s;

impl Widen for Bf16s {
    const TY: Float = Float::Bf16;

    #[inline(always)]
    unsafe fn widen<L: Lanes>(p: *const u8) -> L::V {
        L::bf16(p)
    }
}

/// One instruction set's vector of `f32` lanes, as a tile uses it.
trait Lanes {
    type V: Copy;
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    /// `LANES` little-endian `f16` values at `p`, as `f32`.
    unsafe fn f16(p: *const u8) -> Self::V;
    /// `LANES` little-endian bf16 values at `p`, as `f32`.
    unsafe fn bf16(p: *const u8) -> Self::V;
    /// `LANES` `f32` values at `p` (activations, or a row of `f32` weights).
    unsafe fn f32(p: *const f32) -> Self::V;
    /// `a · b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> f32;
}

/// Plain arrays that LLVM vectorizes where it can: arm64 (NEON is its baseline) and the scalar
/// fallback.
struct Portable;

impl Lanes for Portable {
    type V = [f32; 8];
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> Self::V {
        std::array::from_fn(|j| half::f16::from_le_bytes([*p.add(2 * j), *p.add(2 * j + 1)]).to_f32())
    }

    #[inline(always)]
    unsafe fn bf16(p: *const u8) -> Self::V {
        std::array::from_fn(|j| f32::from_bits(u32::from(u16::from_le_bytes([*p.add(2 * j), *p.add(2 * j + 1)])) << 16))
    }

    #[inline(always)]
    unsafe fn f32(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p.cast())
    }

    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|j| a[j].mul_add(b[j], c[j]))
    }

    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        v.iter().sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// 16 lanes in a 512-bit register.
    pub struct Avx512;

    impl Lanes for Avx512 {
        type V = __m512;
        const LANES: usize = 16;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }

        #[inline(always)]
        unsafe fn f16(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }

        #[inline(always)]
        unsafe fn bf16(p: *const u8) -> __m512 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
        }

        #[inline(always)]
        unsafe fn f32(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }

        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }

        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    /// 8 lanes in a 256-bit register.
    pub struct Avx2;

    impl Lanes for Avx2 {
        type V = __m256;
        const LANES: usize = 8;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }

        #[inline(always)]
        unsafe fn f16(p: *const u8) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }

        #[inline(always)]
        unsafe fn bf16(p: *const u8) -> __m256 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))))
        }

        #[inline(always)]
        unsafe fn f32(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }

        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }

        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
        }
    }
}
