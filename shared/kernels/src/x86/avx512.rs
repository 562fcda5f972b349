//! AVX-512 with VNNI: 64 byte products per instruction (`vpdpbusd`, or `maddubs` and `vpdpwssd`
//! where the K-quants' sub-block scales multiply in) and 32 registers for larger tiles. Chosen
//! at run time where the host has it (Intel since Cascade Lake, AMD since Zen 4); the binary
//! itself is built for AVX2.
//!
//! A 512-bit register holds two 32-value blocks: the legacy types go two blocks at a time (a
//! row with an odd number of blocks ends with one, the other half zero), the K-quants two
//! sub-blocks at a time.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::q6_k_codes;
use super::{f16_at, operands, prefetch_ahead, rows_of, store, Tile};
use crate::activations::QuantizedRows;
use crate::blocks::{q4_k_scales, BlockType, BLOCK, SUPER_BLOCK};
use crate::QMatrix;

pub fn detected() -> bool {
    super::avx2::detected()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Columns `rows` of every output row (see [`crate::product_rows`]), in tiles of (weight rows ×
/// activation rows) measured with `cargo bench -p llm-kernels`.
///
/// # Safety
/// [`detected`] is true; `out` as in [`crate::product_rows`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub unsafe fn product_rows(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    match w.ty {
        BlockType::Q8_0 => rows_of::<Legacy<Q8_0>, 4, 4, 4>(w, x, rows, out),
        BlockType::Q4_0 => rows_of::<Legacy<Q4_0>, 4, 4, 4>(w, x, rows, out),
        BlockType::Q4K => rows_of::<Q4K, 2, 4, 4>(w, x, rows, out),
        BlockType::Q6K => rows_of::<Q6K, 2, 4, 4>(w, x, rows, out),
    }
}

/// How two 32-value weight blocks meet two activation blocks in one `vpdpbusd` (unsigned ×
/// signed bytes, four products summed into each 32-bit lane, added to a starting value that
/// corrects for the offset that made one side unsigned).
trait Block {
    const BYTES: usize;
    /// Blocks `b` and, if `two`, `b + 1` (else zeros): the bytes [`Block::dot`] takes and the
    /// starting value, if the weights' side owns it.
    ///
    /// # Safety
    /// `block` points to the blocks; the module's features are available.
    unsafe fn weights(block: *const u8, two: bool) -> [__m512i; 2];
    /// Two activation blocks as [`Block::dot`] takes them, and the starting value, if theirs.
    unsafe fn activations(x: __m512i) -> [__m512i; 2];
    /// The sums of four products in each lane.
    unsafe fn dot(w: &[__m512i; 2], x: &[__m512i; 2]) -> __m512i;
}

struct Q8_0;
struct Q4_0;

impl Block for Q8_0 {
    const BYTES: usize = BlockType::Q8_0.block_bytes();
    /// `[w, −128 · Σw]`.
    #[inline(always)]
    unsafe fn weights(block: *const u8, two: bool) -> [__m512i; 2] {
        let second = if two { _mm256_loadu_si256(block.add(Self::BYTES + 2) as *const __m256i) } else { _mm256_setzero_si256() };
        let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(block.add(2) as *const __m256i)), second);
        let offset_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), w);
        [w, _mm512_sub_epi32(_mm512_setzero_si512(), offset_sums)]
    }
    /// `[x + 128]`, unsigned.
    #[inline(always)]
    unsafe fn activations(x: __m512i) -> [__m512i; 2] {
        [_mm512_xor_si512(x, _mm512_set1_epi8(-128)), _mm512_setzero_si512()]
    }
    /// `(x + 128) · w − 128 · w = x · w`.
    #[inline(always)]
    unsafe fn dot(w: &[__m512i; 2], x: &[__m512i; 2]) -> __m512i {
        _mm512_dpbusd_epi32(w[1], x[0], w[0])
    }
}

impl Block for Q4_0 {
    const BYTES: usize = BlockType::Q4_0.block_bytes();
    /// `[q]`, the stored nibbles 0..16 (the value is `q − 8`).
    #[inline(always)]
    unsafe fn weights(block: *const u8, two: bool) -> [__m512i; 2] {
        let nibbles = |packed: __m128i| _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let first = nibbles(_mm_loadu_si128(block.add(2) as *const __m128i));
        let second = if two { nibbles(_mm_loadu_si128(block.add(Self::BYTES + 2) as *const __m128i)) } else { _mm256_setzero_si256() };
        let q = _mm512_and_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second), _mm512_set1_epi8(0x0F));
        [q, _mm512_setzero_si512()]
    }
    /// `[x, −8 · Σx]`, the second shared by every weight row of the tile.
    #[inline(always)]
    unsafe fn activations(x: __m512i) -> [__m512i; 2] {
        let offset_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(8), x);
        [x, _mm512_sub_epi32(_mm512_setzero_si512(), offset_sums)]
    }
    /// `q · x − 8 · x = (q − 8) · x`.
    #[inline(always)]
    unsafe fn dot(w: &[__m512i; 2], x: &[__m512i; 2]) -> __m512i {
        _mm512_dpbusd_epi32(x[1], w[0], x[0])
    }
}

/// The tiles of a [`Block`] type (a wrapper, since the AVX2 module's blocks are tiles too).
struct Legacy<W>(std::marker::PhantomData<W>);

impl<W: Block> Tile for Legacy<W> {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        legacy_tile::<W, RT, CT>(w, x, r, i, out)
    }
}

/// The tile of a 32-value block type, two blocks at a time: each pair's integer sums are scaled
/// into `f32` by the pair's scales, one per half of the register.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
unsafe fn legacy_tile<W: Block, const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let blocks = w.cols / BLOCK;
    let mut acc = [[_mm512_setzero_ps(); CT]; RT];
    for b in (0..blocks).step_by(2) {
        let two = b + 1 < blocks;
        let mut wv = [[_mm512_setzero_si512(); 2]; RT];
        let mut scales = [_mm512_setzero_ps(); RT];
        for a in 0..RT {
            let block = weights[a].add(b * W::BYTES);
            if CT == 1 {
                prefetch_ahead(block, 2 * W::BYTES);
            }
            wv[a] = W::weights(block, two);
            scales[a] = halves(f16_at(block, 0), if two { f16_at(block, W::BYTES) } else { 0.0 });
        }
        // The activations are contiguous: one (masked) load takes both blocks.
        let mask = if two { u64::MAX } else { u64::from(u32::MAX) };
        for c in 0..CT {
            let (xd, xq, _) = acts[c];
            let xv = W::activations(_mm512_maskz_loadu_epi8(mask, xq.as_ptr().add(b * BLOCK)));
            let dx = halves(*xd.get_unchecked(b), if two { *xd.get_unchecked(b + 1) } else { 0.0 });
            for a in 0..RT {
                let sums = _mm512_cvtepi32_ps(W::dot(&wv[a], &xv));
                acc[a][c] = _mm512_fmadd_ps(_mm512_mul_ps(scales[a], dx), sums, acc[a][c]);
            }
        }
    }
    store(&acc, hsum, w, r, i, out)
}

/// Q4_K, as in the AVX2 kernel (sub-block sums scaled as integers, minimums against the
/// activations' sums), with a pair of sub-blocks per register: `maddubs` then `vpdpwssd` by
/// the pair's two scales.
struct Q4K;

impl Tile for Q4K {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        q4_k_tile::<RT, CT>(w, x, r, i, out)
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
unsafe fn q4_k_tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    const BYTES: usize = BlockType::Q4K.block_bytes();
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); CT]; RT];
    for b in 0..w.cols / SUPER_BLOCK {
        let mut scales = [[0u8; 8]; RT];
        let mut mins = [_mm256_setzero_si256(); RT];
        let mut d = [0f32; RT];
        let mut dmin = [0f32; RT];
        for a in 0..RT {
            let block = weights[a].add(b * BYTES);
            if CT == 1 {
                prefetch_ahead(block, BYTES);
            }
            let (s, m) = q4_k_scales(std::slice::from_raw_parts(block.add(4), 12));
            scales[a] = s;
            mins[a] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
            (d[a], dmin[a]) = (f16_at(block, 0), f16_at(block, 2));
        }
        let mut sums = [[_mm512_setzero_si512(); CT]; RT];
        for pair in 0..4 {
            let mut nibbles = [_mm512_setzero_si512(); RT];
            let mut pair_scales = [_mm512_setzero_si512(); RT];
            for a in 0..RT {
                let q = _mm256_loadu_si256(weights[a].add(b * BYTES + 16 + 32 * pair) as *const __m256i);
                nibbles[a] = _mm512_and_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4)), low);
                let scale = |j: usize| _mm512_set1_epi16(i16::from(scales[a][j]));
                pair_scales[a] = _mm512_mask_blend_epi16(0xFFFF_0000, scale(2 * pair), scale(2 * pair + 1));
            }
            for c in 0..CT {
                let xv = _mm512_loadu_si512(acts[c].1.as_ptr().add(b * SUPER_BLOCK + 64 * pair) as *const __m512i);
                for a in 0..RT {
                    sums[a][c] = _mm512_dpwssd_epi32(sums[a][c], _mm512_maddubs_epi16(nibbles[a], xv), pair_scales[a]);
                }
            }
        }
        for c in 0..CT {
            let (xd, _, xsums) = acts[c];
            let dx = *xd.get_unchecked(b);
            let block_sums = _mm256_loadu_si256(xsums.as_ptr().add(b * 8) as *const __m256i);
            for a in 0..RT {
                acc[a][c] = _mm512_fmadd_ps(_mm512_set1_ps(d[a] * dx), _mm512_cvtepi32_ps(sums[a][c]), acc[a][c]);
                let min_part = _mm512_zextps256_ps512(_mm256_cvtepi32_ps(_mm256_mullo_epi32(mins[a], block_sums)));
                acc[a][c] = _mm512_fmadd_ps(_mm512_set1_ps(-dmin[a] * dx), min_part, acc[a][c]);
            }
        }
    }
    store(&acc, hsum, w, r, i, out)
}

/// Q6_K, as in the AVX2 kernel, two runs of 32 values (four 16-value sub-blocks, one per
/// 128-bit lane) per register.
struct Q6K;

impl Tile for Q6K {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        q6_k_tile::<RT, CT>(w, x, r, i, out)
    }
}

/// `permutexvar` indices that give 128-bit lane `k` of a register the `i16` at `first + k`.
const fn lane_scales(first: i16) -> [i16; 32] {
    let mut idx = [0; 32];
    let mut e = 0;
    while e < 32 {
        idx[e] = first + (e / 8) as i16;
        e += 1;
    }
    idx
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
unsafe fn q6_k_tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    const BYTES: usize = BlockType::Q6K.block_bytes();
    const RUN_PAIRS: [[i16; 32]; 2] = [lane_scales(0), lane_scales(4)];
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let thirty_two = _mm512_set1_epi8(32);
    let mut acc = [[_mm512_setzero_ps(); CT]; RT];
    for b in 0..w.cols / SUPER_BLOCK {
        let mut d = [0f32; RT];
        for a in 0..RT {
            let block = weights[a].add(b * BYTES);
            if CT == 1 {
                prefetch_ahead(block, BYTES);
            }
            d[a] = f16_at(block, 208);
        }
        let mut sums = [[_mm512_setzero_si512(); CT]; RT];
        for half in 0..2 {
            let mut codes = [[_mm512_setzero_si512(); 2]; RT];
            let mut run_scales = [[_mm512_setzero_si512(); 2]; RT];
            for a in 0..RT {
                let block = weights[a].add(b * BYTES);
                let runs = q6_k_codes(block, half);
                let scales = _mm512_castsi128_si512(_mm_cvtepi8_epi16(_mm_loadl_epi64(block.add(192 + 8 * half) as *const __m128i)));
                for p in 0..2 {
                    codes[a][p] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(runs[2 * p]), runs[2 * p + 1]);
                    run_scales[a][p] = _mm512_permutexvar_epi16(_mm512_loadu_si512(RUN_PAIRS[p].as_ptr() as *const __m512i), scales);
                }
            }
            for c in 0..CT {
                let xq = acts[c].1.as_ptr().add(b * SUPER_BLOCK + 128 * half);
                for p in 0..2 {
                    let x = _mm512_loadu_si512(xq.add(2 * BLOCK * p) as *const __m512i);
                    let offset = _mm512_maddubs_epi16(thirty_two, x);
                    for a in 0..RT {
                        let pairs = _mm512_sub_epi16(_mm512_maddubs_epi16(codes[a][p], x), offset);
                        sums[a][c] = _mm512_dpwssd_epi32(sums[a][c], pairs, run_scales[a][p]);
                    }
                }
            }
        }
        for c in 0..CT {
            let dx = *acts[c].0.get_unchecked(b);
            for a in 0..RT {
                acc[a][c] = _mm512_fmadd_ps(_mm512_set1_ps(d[a] * dx), _mm512_cvtepi32_ps(sums[a][c]), acc[a][c]);
            }
        }
    }
    store(&acc, hsum, w, r, i, out)
}

/// `lo` in the low eight lanes, `hi` in the high eight.
#[inline(always)]
unsafe fn halves(lo: f32, hi: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi))
}

#[inline(always)]
unsafe fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}
