//! AVX2 integer dot products (`maddubs`), FMA accumulation, F16C scales: what every x86_64
//! Lambda host runs.
//!
//! A prompt's products go through [`super::panel`]s, 8 weight rows to a register; otherwise
//! (decode, small batches) through tiles of a few weight rows × activation rows, a block of each
//! per register.

use std::arch::x86_64::*;
use std::ops::Range;

use super::panel::{code_offset, group_values, largest_code, Group, Panel, PANEL_ROWS};
use super::{f16_at, prefetch_ahead, tiles_ahead, with_ahead_cache, PREFETCH_BYTES};
use crate::activations::{Interleaved, QuantizedRows, Row, TILE_ROWS};
use crate::blocks::{legacy_layout, q4_k_scales, BlockType, BLOCK, SUPER_BLOCK};
use crate::tiles::{decode_rows, operands, rows_of, store, Tile, PROMPT};
use crate::QMatrix;

pub fn detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Columns `rows` of every output row (see [`crate::product_rows`]).
///
/// # Safety
/// [`detected`] is true; `out` as in [`crate::product_rows`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn product_rows(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    if super::interleaving(w.ty, x.rows(), false).is_some() {
        // An instance per type: how many quads `maddubs` adds up in 16 bits depends on its codes.
        macro_rules! panels {
            ($ty:expr) => {
                panel_rows::<{ group_values($ty) }, { i16_quads($ty) }, false, { code_offset($ty).is_none() }>(w, x, rows, out)
            };
        }
        return match w.ty {
            // Q8_0's codes plus 128 overflow `maddubs`: its panel is read back as signed bytes.
            BlockType::Q8_0 => panel_rows::<{ group_values(BlockType::Q8_0) }, 1, true, { code_offset(BlockType::Q8_0).is_none() }>(w, x, rows, out),
            BlockType::Q4_0 => panels!(BlockType::Q4_0),
            BlockType::Q4_0ScalesFirst => panels!(BlockType::Q4_0ScalesFirst),
            BlockType::Q4_1 => panels!(BlockType::Q4_1),
            BlockType::Q5_0 => panels!(BlockType::Q5_0),
            BlockType::Q5_1 => panels!(BlockType::Q5_1),
            BlockType::Q2K => panels!(BlockType::Q2K),
            BlockType::Q3K => panels!(BlockType::Q3K),
            BlockType::Q4K => panels!(BlockType::Q4K),
            BlockType::Q5K => panels!(BlockType::Q5K),
            BlockType::Q6K => panels!(BlockType::Q6K),
            _ => unreachable!("AVX-512's layouts: `crate::product_rows` sends them elsewhere"),
        };
    }
    const R: usize = PROMPT.0;
    const C: usize = PROMPT.1;
    match w.ty {
        BlockType::Q8_0 => rows_of::<Q8_0, R, C, { decode_rows(BlockType::Q8_0) }>(w, x, rows, out),
        BlockType::Q4_0 => rows_of::<Q4_0, R, C, { decode_rows(BlockType::Q4_0) }>(w, x, rows, out),
        BlockType::Q4_0ScalesFirst => rows_of::<Q4_0ScalesFirst, R, C, { decode_rows(BlockType::Q4_0ScalesFirst) }>(w, x, rows, out),
        BlockType::Q4_1 => rows_of::<Q4_1, R, C, { decode_rows(BlockType::Q4_1) }>(w, x, rows, out),
        BlockType::Q5_0 => rows_of::<Q5_0, R, C, { decode_rows(BlockType::Q5_0) }>(w, x, rows, out),
        BlockType::Q5_1 => rows_of::<Q5_1, R, C, { decode_rows(BlockType::Q5_1) }>(w, x, rows, out),
        // The K-quants' tiles are a row each: the choice is made once a product, not per row.
        BlockType::Q2K => with_ahead_cache!(w, 1, rows_of::<Per16<Q2K, L2>, R, C, { decode_rows(BlockType::Q2K) }>(w, x, rows, out)),
        BlockType::Q3K => with_ahead_cache!(w, 1, rows_of::<Per16<Q3K, L2>, R, C, { decode_rows(BlockType::Q3K) }>(w, x, rows, out)),
        // Q4_K's and Q5_K's rows pass 10 KiB only past 18,432 values, and instantiated both ways
        // their tile ran 2–3 % slower (Zen 4, `ffn_up` in cache 90.3–91.6 → 88.2–89.1 GFLOP/s):
        // they ask into L1 at every size.
        BlockType::Q4K => rows_of::<Q4K, R, C, { decode_rows(BlockType::Q4K) }>(w, x, rows, out),
        BlockType::Q5K => rows_of::<Q5K, R, C, { decode_rows(BlockType::Q5K) }>(w, x, rows, out),
        BlockType::Q6K => with_ahead_cache!(w, 1, rows_of::<Per16<Q6K, L2>, R, C, { decode_rows(BlockType::Q6K) }>(w, x, rows, out)),
        _ => unreachable!("AVX-512's layouts: `crate::product_rows` sends them elsewhere"),
    }
}

/// Weight rows of a panel in one register: a 32-bit lane each.
const HALF: usize = PANEL_ROWS / 2;

/// Activation rows a panel tile multiplies at once: their sums, a weight register and a
/// broadcast activation fill most of the 16 registers.
const PANEL_ACTS: usize = 4;

/// Of a group of `ty`'s values, the quads (4 values per row) whose `maddubs` pairs add up in
/// 16 bits without overflow: each adds two products of a code and an activation (at most 127).
const fn i16_quads(ty: BlockType) -> usize {
    let fit = i16::MAX as usize / (2 * 127 * largest_code(ty) as usize);
    let quads = group_values(ty) / 4;
    if fit < quads {
        fit
    } else {
        quads
    }
}

/// [`product_rows`] through panels of groups of `G` values against [`Interleaved`] activations:
/// each half of a panel (8 weight rows) meets [`PANEL_ACTS`] activation rows at a time. Pairs of
/// products add up in 16 bits over `QUADS` quads before they are widened; with `SIGNED`, the
/// panel's bytes are Q8_0's codes plus 128, read back as codes (`sign` makes one side
/// unsigned, as the tiles do). With `MIN`, the weights have minimums (the panel's offsets);
/// without, and without `SIGNED`, a code offset, which the activations' `offset_sums` bring.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_rows<const G: usize, const QUADS: usize, const SIGNED: bool, const MIN: bool>(
    w: &QMatrix,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: *mut f32,
) {
    let acts = x.interleaved(G);
    // As AVX-512's: the panels first, so that each activation tile is read from memory once.
    let panels = Panel::all(w, rows);
    for tile in 0..x.rows().div_ceil(TILE_ROWS) {
        let live = TILE_ROWS.min(x.rows() - tile * TILE_ROWS);
        for (held, panel) in panels.iter() {
            for half in 0..held.len().div_ceil(HALF) {
                let width = HALF.min(held.len() - half * HALF);
                for first in (0..live).step_by(PANEL_ACTS) {
                    let sums = panel_tile::<G, QUADS, SIGNED, MIN>(panel, half, acts, tile, first, w.cols / G);
                    for (c, sum) in sums.iter().enumerate().take(live - first) {
                        let mut row = [0f32; HALF];
                        _mm256_storeu_ps(row.as_mut_ptr(), *sum);
                        let at = out.add((tile * TILE_ROWS + first + c) * w.rows + held.start + half * HALF);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), at, width);
                    }
                }
            }
        }
    }
}

/// The outputs of activation rows `first..first + PANEL_ACTS` of a tile against half `half` of a
/// panel.
#[inline(always)]
unsafe fn panel_tile<const G: usize, const QUADS: usize, const SIGNED: bool, const MIN: bool>(
    panel: &Panel,
    half: usize,
    acts: &Interleaved,
    tile: usize,
    first: usize,
    groups: usize,
) -> [__m256; PANEL_ACTS] {
    let mut x = acts.values.as_ptr().add(tile * groups * G * TILE_ROWS + 4 * first);
    let mut x_scales = acts.scales.as_ptr().add(tile * groups * TILE_ROWS + first);
    let mut x_sums = acts.scaled_sums.as_ptr().add(tile * groups * TILE_ROWS + first);
    let mut offset_sums = acts.offset_sums.as_ptr().add(tile * groups * TILE_ROWS + first);
    let mut values = panel.values().add(4 * HALF * half);
    let (mut scales, mut offsets) = (panel.scales.as_ptr().add(HALF * half), panel.offsets.as_ptr().add(HALF * half));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); PANEL_ACTS];
    for _ in 0..groups {
        let mut sums: [__m256i; PANEL_ACTS] = match SIGNED || MIN {
            true => [_mm256_setzero_si256(); PANEL_ACTS],
            false => std::array::from_fn(|c| _mm256_set1_epi32(*offset_sums.add(c))),
        };
        for run in (0..G / 4).step_by(QUADS) {
            let mut pairs = [_mm256_setzero_si256(); PANEL_ACTS];
            for quad in run..run + QUADS {
                let u = _mm256_loadu_si256(values.add(quad * 4 * PANEL_ROWS) as *const __m256i);
                let (u, codes) = match SIGNED {
                    true => {
                        let codes = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                        (_mm256_sign_epi8(codes, codes), codes)
                    }
                    false => (u, u),
                };
                for c in 0..PANEL_ACTS {
                    let mut four = _mm256_set1_epi32((x.add((quad * TILE_ROWS + c) * 4) as *const i32).read_unaligned());
                    if SIGNED {
                        four = _mm256_sign_epi8(four, codes);
                    }
                    pairs[c] = _mm256_add_epi16(pairs[c], _mm256_maddubs_epi16(u, four));
                }
            }
            for c in 0..PANEL_ACTS {
                sums[c] = _mm256_add_epi32(sums[c], _mm256_madd_epi16(pairs[c], ones));
            }
        }
        let (w_scales, w_offsets) = (_mm256_loadu_ps(scales), _mm256_loadu_ps(offsets));
        for c in 0..PANEL_ACTS {
            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(w_scales, _mm256_set1_ps(*x_scales.add(c))), _mm256_cvtepi32_ps(sums[c]), acc[c]);
            if MIN {
                acc[c] = _mm256_fnmadd_ps(w_offsets, _mm256_set1_ps(*x_sums.add(c)), acc[c]);
            }
        }
        x = x.add(G * TILE_ROWS);
        (x_scales, x_sums, offset_sums) = (x_scales.add(TILE_ROWS), x_sums.add(TILE_ROWS), offset_sums.add(TILE_ROWS));
        values = values.add(G * PANEL_ROWS);
        (scales, offsets) = (scales.add(PANEL_ROWS), offsets.add(PANEL_ROWS));
    }
    acc
}

/// Fills `panel` with weight rows `rows` of `w`, a block at a time: every row's groups of the
/// block unpacked as the tiles unpack them, then each group put in. Meanwhile it asks for the
/// rows `next` (the next panel's, or the next work item's first), a block's worth of their bytes
/// per block packed, in memory order (they lie one after another).
///
/// A product through panels reads each weight once, when it packs it, from memory: without
/// asking ahead, the packing waited on each row's next block in turn. It first asked a kilobyte
/// ahead in each of its rows (Zen 5, TinyLlama shape, one thread, 128-token prompt, prefill
/// tok/s: Q4_K_M 234.8–242.9 → 241.8–247.0, Q8_0 189.3–197.9 → 199.6–203.4). But a row of
/// 2,048 values is 8 Q4_K blocks (1,152 bytes), so that lay past the row's end for all but its
/// first block, and most of each row was waited for (`perf` of a batch of 16 sequences of
/// TinyLlama-shape Q4_K_M: `pack` 29 % of the samples, most of them on its first loads of a
/// block, more than the panels' products). `batch_throughput.py --max-tokens 32 --threads 2`,
/// Zen 5, rounds in turn, tok/s, with the next panel's asked for too: Q4_K_M 8 requests
/// 107.7–111.9 → 118.9–129.4, 16 requests 172.7–176.2 → 180.5–185.5; Llama 3.2 1B-shape Q4_K_M
/// 16 requests 138.2–141.4 → 143.7–156.0; Q4_0 16 requests 140.1–141.8 → 149.6–156.8; Q8_0 no
/// different. Into L2 only, no better. Once the next work item's first panel was asked for too,
/// the asks in each row ahead only cost instructions (9 % of `pack`'s samples): without them,
/// 16 requests of Q4_K_M 211.2–222.4 → 217.0–230.4, of Q8_0 169.5–183.3 → 191.5–197.9; a
/// 128-token prompt no different.
///
/// One loop over the blocks for each type, not one loop with a `match` per block, which kept
/// fewer of its addresses in registers (Zen 4, `--bench stream`, one thread, AVX-512's panels,
/// two rounds each, GB/s: `m=8` Q4_0 4.03–4.08 → 4.56–4.59, Q4_1 4.25–4.28 → 4.76, Q4_K
/// 4.83–4.89 → 5.00–5.02, Q8_0 and Q6_K no different; `m=32` Q8_0 3.81–3.82 → 3.96–3.98, Q4_0
/// 2.09–2.10 → 2.22–2.23; AVX2's panels, `m=32`, Q4_0 1.36 → 1.41–1.42).
///
/// # Safety
/// [`detected`] is true.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pack(panel: &mut Panel, w: &QMatrix, rows: Range<usize>, next: Range<usize>) {
    let (bytes, row_bytes) = (w.ty.block_bytes(), w.ty.row_bytes(w.cols));
    let (blocks, per_block) = (w.cols / w.ty.block_values(), w.ty.block_values() / group_values(w.ty));
    let next_blocks = next.len() * blocks;
    let next_first = w.bytes.as_ptr().add(next.start * row_bytes);
    // `[group of the block][row of the panel]`.
    let mut groups = [[Group::ZERO; PANEL_ROWS]; SUPER_BLOCK / 16];
    // The loop over the blocks, once for each type: `$unpack` puts block `$b` of row `$row` into
    // groups through `$put`; `$per_block`, before the rows, what is the same for all of them
    // (LLVM left Q4_0ScalesFirst's offsets in the loop over the rows: `m=8` 4.09–4.20 → 4.25–4.29).
    macro_rules! each_block {
        (|$row:ident, $b:ident, $put:ident| $unpack:expr) => {
            each_block!(|$row, $b, $put| {}; $unpack)
        };
        (|$row:ident, $b:ident, $put:ident| $per_block:stmt; $unpack:expr) => {
            for $b in 0..blocks {
                $per_block
                for (j, r) in rows.clone().enumerate() {
                    let $row = w.bytes.as_ptr().add(r * row_bytes);
                    let step = $b * rows.len() + j;
                    if step < next_blocks {
                        prefetch_ahead::<false>(next_first, step, bytes, 0);
                    }
                    let mut $put = |sub: usize, u: __m256i, scale: f32, offset: f32| groups[sub][j] = Group { u, scale, offset };
                    $unpack;
                }
                for (sub, rows) in groups.iter().take(per_block).enumerate() {
                    panel.put_group($b * per_block + sub, rows);
                }
            }
        };
    }
    match w.ty {
        BlockType::Q8_0 => each_block!(|row, b, put| {
            let block = row.add(b * bytes);
            // `q + 128` as a byte is `q` with its top bit flipped; the 128 comes with the
            // activations ([`code_offset`]).
            put(0, _mm256_xor_si256(Q8_0::weights(block)[0], _mm256_set1_epi8(-128)), f16_at(block, 0), 0.0)
        }),
        BlockType::Q4_0 => each_block!(|row, b, put| pack_nibbles::<Q4_0>(row.add(b * bytes), &mut put)),
        BlockType::Q4_0ScalesFirst => each_block!(|row, b, put| let (scale_at, nibbles_at) = {
            let (chunk, k) = (b & !7, b & 7);
            (bytes * chunk + 2 * k, Q4_0ScalesFirst::run_at(chunk, (blocks - chunk).min(8)) + k * Q4_0ScalesFirst::STRIDE)
        }; put(0, Q4_0ScalesFirst::weights(row.add(nibbles_at))[0], f16_at(row, scale_at), 0.0)),
        BlockType::Q4_1 => each_block!(|row, b, put| pack_nibbles::<Q4_1>(row.add(b * bytes), &mut put)),
        BlockType::Q5_0 => each_block!(|row, b, put| pack_nibbles::<Q5_0>(row.add(b * bytes), &mut put)),
        BlockType::Q5_1 => each_block!(|row, b, put| pack_nibbles::<Q5_1>(row.add(b * bytes), &mut put)),
        BlockType::Q4K => each_block!(|row, b, put| pack_q4_k::<false>(row.add(b * bytes), &mut put)),
        BlockType::Q5K => each_block!(|row, b, put| pack_q4_k::<true>(row.add(b * bytes), &mut put)),
        BlockType::Q2K => each_block!(|row, b, put| pack_sixteens::<Q2K>(row.add(b * bytes), &mut put)),
        BlockType::Q3K => each_block!(|row, b, put| pack_sixteens::<Q3K>(row.add(b * bytes), &mut put)),
        BlockType::Q6K => each_block!(|row, b, put| pack_sixteens::<Q6K>(row.add(b * bytes), &mut put)),
        _ => unreachable!("AVX-512's layouts: `Panel::pack` packs them itself"),
    }
}

/// A Q4_0, Q4_1, Q5_0 or Q5_1 block, one group, for [`pack`].
#[inline(always)]
unsafe fn pack_nibbles<N: Block>(block: *const u8, put: &mut impl FnMut(usize, __m256i, f32, f32)) {
    // A code offset comes with the activations ([`code_offset`]); a minimum is the panel's.
    let minimum = if N::CODE_OFFSET.is_some() { 0.0 } else { f16_at(block, 2) };
    put(0, N::weights(block)[0], f16_at(block, 0), -minimum);
}

/// A Q4_K (Q5_K with `FIFTH_BIT`) block's eight groups, for [`pack`].
#[inline(always)]
unsafe fn pack_q4_k<const FIFTH_BIT: bool>(block: *const u8, put: &mut impl FnMut(usize, __m256i, f32, f32)) {
    let (scales, mins) = q4_k_scales(std::slice::from_raw_parts(block.add(4), 12));
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let high_bits = q4_k_high_bits::<FIFTH_BIT>(block);
    for pair in 0..4 {
        for (half, codes) in q4_k_pair_codes::<FIFTH_BIT>(block, pair, high_bits).into_iter().enumerate() {
            let sub = 2 * pair + half;
            put(sub, codes, d * f32::from(scales[sub]), dmin * f32::from(mins[sub]));
        }
    }
}

/// A [`Sixteens`] block's sixteen groups (one per 128-bit lane of its runs), for [`pack`].
#[inline(always)]
unsafe fn pack_sixteens<S: Sixteens>(block: *const u8, put: &mut impl FnMut(usize, __m256i, f32, f32)) {
    let (d, dmin) = S::d(block);
    let (mut scales, mut mins) = ([0i8; 16], [0u8; 16]);
    let (packed_scales, packed_mins) = S::scales(block);
    _mm_storeu_si128(scales.as_mut_ptr() as *mut __m128i, packed_scales);
    _mm_storeu_si128(mins.as_mut_ptr() as *mut __m128i, packed_mins);
    for half in 0..2 {
        for (run, codes) in S::codes(block, half).into_iter().enumerate() {
            for (lane, codes) in [_mm256_castsi256_si128(codes), _mm256_extracti128_si256::<1>(codes)].into_iter().enumerate() {
                let sub = 8 * half + 2 * run + lane;
                // As [`pack_nibbles`]: the panel holds minimums, not code offsets.
                let offset = if S::CODE_OFFSET.is_some() { 0.0 } else { dmin * f32::from(mins[sub]) };
                put(sub, _mm256_castsi128_si256(codes), d * f32::from(scales[sub]), offset);
            }
        }
    }
}

impl<W: Block> Tile for W {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        match takes_pairs::<W>(RT, CT) {
            true => with_ahead_cache!(w, RT, decode_pairs_tile::<W, RT, L2>(w, x, r, i, out)),
            false => with_ahead_cache!(w, RT, legacy_tile::<W, RT, CT, L2>(w, x, r, i, out)),
        }
    }
}

/// Whether a tile of `rt` weight rows × `ct` activation rows goes through [`decode_pairs`].
pub(super) const fn takes_pairs<W: Block>(rt: usize, ct: usize) -> bool {
    ct == 1 && rt.is_multiple_of(2) && W::PAIRS
}

/// The scales of a chunk of up to eight blocks (`n`, from block `chunk`), lane `k` for block
/// `chunk + k`: each weight row's times each activation row's, and what each block adds to
/// every code times its scale (its minimum; minus its code offset times its scale) times the
/// activations' sum of the block, `None` for Q8_0 (no offset).
///
/// Eight blocks at a time because one by one, the `f16` scales cost as much as the products: one
/// conversion for the weights', one load for the activations'. On Zen 3 (`cargo bench`, one
/// layer's decode product, one thread, GFLOP/s), the weights' scales loaded one by one instead
/// of gathered and the code offsets taken with the minimums instead of per block: Q4_0 23–39 →
/// 34–50, Q8_0 27–34 → 29–42, Q4_1 30–34 → 36–45.
#[inline(always)]
pub(super) unsafe fn chunk_scales<W: Block, const RT: usize, const CT: usize>(
    weights: &[*const u8; RT],
    acts: &[Row; CT],
    chunk: usize,
    n: usize,
) -> ([[__m256; CT]; RT], Option<[[__m256; CT]; RT]>) {
    let in_chunk = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    let (w_scales, offsets): ([__m256; RT], Option<[__m256; RT]>) = match W::CODE_OFFSET {
        None => {
            let both: [(__m256, __m256); RT] = std::array::from_fn(|a| f16_scales_and_minimums::<W>(weights[a].add(chunk * W::BYTES), n));
            (std::array::from_fn(|a| both[a].0), Some(std::array::from_fn(|a| both[a].1)))
        }
        Some(offset) => {
            let scales: [__m256; RT] = std::array::from_fn(|a| W::scales(weights[a], chunk, n));
            (scales, (offset != 0).then(|| std::array::from_fn(|a| _mm256_mul_ps(scales[a], _mm256_set1_ps(-f32::from(offset))))))
        }
    };
    let x_scales: [__m256; CT] = std::array::from_fn(|c| _mm256_maskload_ps(acts[c].0.as_ptr().add(chunk), in_chunk));
    let products = std::array::from_fn(|a| std::array::from_fn(|c| _mm256_mul_ps(w_scales[a], x_scales[c])));
    let offset_terms = offsets.map(|offsets| {
        let x_sums: [__m256; CT] =
            std::array::from_fn(|c| _mm256_mul_ps(x_scales[c], _mm256_cvtepi32_ps(_mm256_maskload_epi32(acts[c].2.as_ptr().add(chunk), in_chunk))));
        std::array::from_fn(|a| std::array::from_fn(|c| _mm256_mul_ps(offsets[a], x_sums[c])))
    });
    (products, offset_terms)
}

/// The tile of a 32-value block type: each block pair's integer sum is scaled into `f32`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_tile<W: Block, const RT: usize, const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let blocks = w.cols / BLOCK;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); CT]; RT];
    // Each block and weight row broadcasts its own scale from the chunk's products (LLVM keeps
    // them in registers and broadcasts with two shuffles; before, each block and row permuted
    // both scales and multiplied them).
    let mut scales = [[[0f32; 8]; CT]; RT];
    let ahead = tiles_ahead(w, RT, W::PREFETCH);
    for chunk in (0..blocks).step_by(8) {
        let n = (blocks - chunk).min(8);
        let (products, offset_terms) = chunk_scales::<W, RT, CT>(&weights, &acts, chunk, n);
        for a in 0..RT {
            for c in 0..CT {
                _mm256_storeu_ps(scales[a][c].as_mut_ptr(), products[a][c]);
                if let Some(terms) = offset_terms {
                    acc[a][c] = _mm256_add_ps(acc[a][c], terms[a][c]);
                }
            }
        }
        let run = W::run_at(chunk, n);
        for k in 0..n {
            let b = chunk + k;
            prefetch_ahead::<L2>(weights[0], b, RT * W::BYTES, ahead);
            let mut codes = [[_mm256_setzero_si256(); 2]; RT];
            for a in 0..RT {
                codes[a] = W::weights(weights[a].add(run + k * W::STRIDE));
            }
            for c in 0..CT {
                let xv = _mm256_loadu_si256(acts[c].1.as_ptr().add(b * BLOCK) as *const __m256i);
                for a in 0..RT {
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(maddubs(W::operands(&codes[a], xv)), ones));
                    acc[a][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scales[a][c][k]), sums, acc[a][c]);
                }
            }
        }
    }
    store(&acc, hsum, w, r, i, out)
}

/// [`decode_pairs`] with AVX2's products.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_pairs_tile<W: Block, const RT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    decode_pairs::<W, Maddubs, RT, L2>(w, x, r, i, out)
}

/// A decode step's tile (one activation row) of an even number of weight rows, two to a
/// register: values 0..16 of both rows' block in one register, 16..32 in another, against the
/// activation block's halves each in both lanes. A pair's sums then hold four lanes of each row,
/// so that one conversion and multiply-add per block serve two rows, and their scales come from
/// one in-lane shuffle (per row, [`legacy_tile`] takes a conversion, a multiply-add and two
/// shuffles). Inlined into a function that enables the features `D` needs.
#[inline(always)]
pub(super) unsafe fn decode_pairs<W: Block, D: Dot, const RT: usize, const L2: bool>(
    w: &QMatrix,
    x: &QuantizedRows,
    r: usize,
    i: usize,
    out: *mut f32,
) -> usize {
    let (weights, acts) = operands::<RT, 1>(w, x, r, i);
    let blocks = w.cols / BLOCK;
    let ahead = tiles_ahead(w, RT, W::PREFETCH);
    // Pair `p` in `acc[p]`: row `2p` in the low lane, `2p + 1` in the high one.
    let mut acc = [_mm256_setzero_ps(); RT];
    for chunk in (0..blocks).step_by(8) {
        let n = (blocks - chunk).min(8);
        let (products, offset_terms) = chunk_scales::<W, RT, 1>(&weights, &acts, chunk, n);
        // Per pair, the scales of blocks 0..4 of the chunk, then of 4..8: the first row's in the
        // low lane, the second's in the high one. Each block broadcasts element 0 of both lanes
        // and rotates the next block's in (an index per block made LLVM reload the quads from
        // the stack: one layer's decode product, Zen 3, one thread, Q4_0 53 → 57–59 GFLOP/s).
        let mut quads = [[_mm256_setzero_ps(); 2]; RT];
        for p in 0..RT / 2 {
            let (first, second) = (products[2 * p][0], products[2 * p + 1][0]);
            quads[p] = [_mm256_permute2f128_ps::<0x20>(first, second), _mm256_permute2f128_ps::<0x31>(first, second)];
            if let Some(terms) = offset_terms {
                let (first, second) = (terms[2 * p][0], terms[2 * p + 1][0]);
                let folded = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(first, second), _mm256_permute2f128_ps::<0x31>(first, second));
                acc[p] = _mm256_add_ps(acc[p], folded);
            }
        }
        let run = W::run_at(chunk, n);
        for k in 0..n {
            let b = chunk + k;
            let xv = acts[0].1.as_ptr().add(b * BLOCK);
            let halves = [0, 16].map(|at| _mm256_broadcastsi128_si256(_mm_loadu_si128(xv.add(at) as *const __m128i)));
            prefetch_ahead::<L2>(weights[0], b, RT * W::BYTES, ahead);
            if k == 4 {
                for quads in quads.iter_mut().take(RT / 2) {
                    quads[0] = quads[1];
                }
            }
            for p in 0..RT / 2 {
                let at = run + k * W::STRIDE;
                let (first, second) = (weights[2 * p].add(at), weights[2 * p + 1].add(at));
                let sums = D::sums::<W>(&W::pair(first, second), &halves);
                let scale = _mm256_permute_ps::<0>(quads[p][0]);
                quads[p][0] = _mm256_permute_ps::<0b00_11_10_01>(quads[p][0]);
                acc[p] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[p]);
            }
        }
    }
    for p in 0..RT / 2 {
        let at = out.add(i * w.rows + r + 2 * p);
        *at = hsum4(_mm256_castps256_ps128(acc[p]));
        *at.add(1) = hsum4(_mm256_extractf128_ps::<1>(acc[p]));
    }
    RT
}

/// The `f16` scales at the start of `n` blocks from `first` (the others zero), as eight `f32`.
/// Eight loads into one register, not a gather: AMD's Zen 3 gathers slower than it loads them
/// one by one.
#[inline(always)]
unsafe fn f16s<W: Block>(first: *const u8, n: usize) -> __m256 {
    let word = |k: usize| (first.add(k * W::BYTES) as *const i16).read_unaligned();
    let words = if n == 8 {
        _mm_setr_epi16(word(0), word(1), word(2), word(3), word(4), word(5), word(6), word(7))
    } else {
        let mut words = [0i16; 8];
        for (k, at) in words.iter_mut().enumerate().take(n) {
            *at = word(k);
        }
        _mm_loadu_si128(words.as_ptr() as *const __m128i)
    };
    _mm256_cvtph_ps(words)
}

/// Q4_1's and Q5_1's scales and minimums of `n` blocks from `first` (the others zero), as eight
/// `f32` each: one 32-bit load per block takes both `f16`s (Zen 3, one layer's decode product,
/// one thread, GFLOP/s: Q4_1 46–49 → 50–52; Q5_1, whose fifth bits cost more, +1 %). Shaped
/// like [`f16s`] rather than sharing a helper with it that returns the loads as an array: LLVM
/// then put them through the stack (Q4_1 47 → 39–41, Q4_0 53–56 → 49–52 GFLOP/s).
#[inline(always)]
unsafe fn f16_scales_and_minimums<W: Block>(first: *const u8, n: usize) -> (__m256, __m256) {
    let pair = |k: usize| (first.add(k * W::BYTES) as *const i32).read_unaligned();
    let pairs = if n == 8 {
        _mm256_setr_epi32(pair(0), pair(1), pair(2), pair(3), pair(4), pair(5), pair(6), pair(7))
    } else {
        let mut pairs = [0i32; 8];
        for (k, at) in pairs.iter_mut().enumerate().take(n) {
            *at = pair(k);
        }
        _mm256_loadu_si256(pairs.as_ptr() as *const __m256i)
    };
    // Each lane's scales to its low eight bytes and minimums to its high eight, then both lanes'
    // scales to the low lane and their minimums to the high one.
    let split = _mm256_shuffle_epi8(pairs, _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)));
    let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(split);
    (_mm256_cvtph_ps(_mm256_castsi256_si128(ordered)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(ordered)))
}

/// Q4_K, and Q5_K with `FIFTH_BIT`: within a super-block, each sub-block's integer sum is
/// multiplied by its 6-bit scale and added up as integers (`madd` with the scale instead of with
/// ones), so the conversion to `f32` happens once per 256 values; the minimums meet the
/// activations' sums of 32 values. Q5_K's tile is Q4_K's, each nibble given its fifth bit
/// (codes 0..32 still fit `maddubs`).
struct KNibbles<const FIFTH_BIT: bool>;

type Q4K = KNibbles<false>;
type Q5K = KNibbles<true>;

impl<const FIFTH_BIT: bool> Tile for KNibbles<FIFTH_BIT> {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        q4_k_tile::<RT, CT, FIFTH_BIT>(w, x, r, i, out)
    }
}

/// The tile of Q4_K, or of Q5_K when `FIFTH_BIT`: its 32 bytes of high bits lie between the
/// scales and the nibbles.
///
/// A decode step is bound by this loop's instructions, not by memory (Zen 4 without AVX-512, one
/// thread, `ffn_up`: 62 GFLOP/s in cache, 16.4 GB/s of weights out of memory, where Q8_0's tile
/// reads 22.7), so a block's own work is kept to few vector instructions: its scales and
/// minimums unpacked in registers ([`q4_k_block_scales`]), each sub-block's scale taken out of
/// them by one `shuffle_epi8`, `d` and `dmin` converted together. That took a block from about
/// 107 instructions to 80: in cache 62 → 66 GFLOP/s on every layer shape, out of memory
/// 16.4–16.6 → 17.1–17.6 GB/s (four alternating rounds of the `stream` bench).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_tile<const RT: usize, const CT: usize, const FIFTH_BIT: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (bytes, _) = q4_k_layout(FIFTH_BIT);
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let ahead = tiles_ahead(w, RT, PREFETCH_BYTES);
    let mut acc = Accumulators::<RT, CT>::new();
    for b in 0..w.cols / SUPER_BLOCK {
        let mut scales = [_mm256_setzero_si256(); RT];
        let mut mins = [_mm256_setzero_si256(); RT];
        let mut d = [_mm_setzero_ps(); RT];
        let mut high_bits = [_mm256_setzero_si256(); RT];
        prefetch_ahead::<false>(weights[0], b, RT * bytes, ahead);
        for a in 0..RT {
            let block = weights[a].add(b * bytes);
            high_bits[a] = q4_k_high_bits::<FIFTH_BIT>(block);
            (d[a], scales[a], mins[a]) = q4_k_block_scales(block);
        }
        let mut sums = [[_mm256_setzero_si256(); CT]; RT];
        for pair in 0..4 {
            let mut nibbles = [[_mm256_setzero_si256(); 2]; RT];
            let mut pair_scales = [[_mm256_setzero_si256(); 2]; RT];
            for a in 0..RT {
                nibbles[a] = q4_k_pair_codes::<FIFTH_BIT>(weights[a].add(b * bytes), pair, high_bits[a]);
                pair_scales[a] = [
                    _mm256_shuffle_epi8(scales[a], _mm256_set1_epi16(byte_as_i16(2 * pair))),
                    _mm256_shuffle_epi8(scales[a], _mm256_set1_epi16(byte_as_i16(2 * pair + 1))),
                ];
            }
            for c in 0..CT {
                let xq = acts[c].1.as_ptr().add(b * SUPER_BLOCK + 64 * pair);
                let x = [_mm256_loadu_si256(xq as *const __m256i), _mm256_loadu_si256(xq.add(BLOCK) as *const __m256i)];
                for a in 0..RT {
                    let low_half = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles[a][0], x[0]), pair_scales[a][0]);
                    let high_half = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles[a][1], x[1]), pair_scales[a][1]);
                    sums[a][c] = _mm256_add_epi32(sums[a][c], _mm256_add_epi32(low_half, high_half));
                }
            }
        }
        for c in 0..CT {
            let (xd, _, xsums) = acts[c];
            let dx = _mm_set1_ps(*xd.get_unchecked(b));
            // The eight sub-blocks' sums of activations, against their eight minimums.
            let block_sums = _mm256_loadu_si256(xsums.as_ptr().add(b * 8) as *const __m256i);
            for a in 0..RT {
                let scaled = _mm_mul_ps(d[a], dx);
                let (d_dx, dmin_dx) = (_mm256_broadcastss_ps(scaled), _mm256_broadcastss_ps(_mm_movehdup_ps(scaled)));
                acc.add(a, c, d_dx, _mm256_cvtepi32_ps(sums[a][c]));
                acc.subtract_minimums(a, c, dmin_dx, _mm256_cvtepi32_ps(_mm256_mullo_epi32(mins[a], block_sums)));
            }
        }
    }
    store(&acc.totals(), hsum, w, r, i, out)
}

/// A K-quant tile's sums: the scales' part, and in a decode tile its minimums' part apart, so
/// that a block's two multiply-adds do not wait on each other (a prompt tile's sums take every
/// register already). Zen 4 without AVX-512, one thread, in cache (`matmul` bench, every layer
/// shape), GFLOP/s: Q4_K 63–71 → 66–74, Q5_K 51–56 → 52–57, Q2_K 63–70 → 66–73; out of memory
/// (`stream`, three rounds in turn), GB/s: Q4_K 16.9–17.3 → 18.0–18.1, Q2_K 10.4–10.5 →
/// 10.8–10.9.
struct Accumulators<const RT: usize, const CT: usize> {
    scaled: [[__m256; CT]; RT],
    minimums: [[__m256; CT]; RT],
}

impl<const RT: usize, const CT: usize> Accumulators<RT, CT> {
    #[inline(always)]
    unsafe fn new() -> Self {
        Self { scaled: [[_mm256_setzero_ps(); CT]; RT], minimums: [[_mm256_setzero_ps(); CT]; RT] }
    }

    /// Adds `factor · sums` to the tile's element `(a, c)`.
    #[inline(always)]
    unsafe fn add(&mut self, a: usize, c: usize, factor: __m256, sums: __m256) {
        self.scaled[a][c] = _mm256_fmadd_ps(factor, sums, self.scaled[a][c]);
    }

    /// Subtracts `factor · minimums` from the tile's element `(a, c)`.
    #[inline(always)]
    unsafe fn subtract_minimums(&mut self, a: usize, c: usize, factor: __m256, minimums: __m256) {
        match CT {
            1 => self.minimums[a][c] = _mm256_fmadd_ps(factor, minimums, self.minimums[a][c]),
            _ => self.scaled[a][c] = _mm256_fnmadd_ps(factor, minimums, self.scaled[a][c]),
        }
    }

    #[inline(always)]
    unsafe fn totals(self) -> [[__m256; CT]; RT] {
        std::array::from_fn(|a| std::array::from_fn(|c| _mm256_sub_ps(self.scaled[a][c], self.minimums[a][c])))
    }
}

/// A Q4_K or Q5_K block's `d` and `dmin` (lanes 0 and 1), its eight 6-bit scales (bytes 0..8)
/// and minimums (bytes 8..16) in each 128-bit lane, for [`byte_as_i16`] to take one out, and
/// the minimums as `i32`: the unpacking of [`q4_k_scales`] in a few shuffles of the block's
/// first 16 bytes, not a score of scalar operations per block. The head is loaded into both
/// lanes and unpacked there, rather than in one lane and copied into the other (one instruction
/// fewer a block; Zen 4 without AVX-512, one thread, in cache: Q4_K 66–74 → 69–76 GFLOP/s, out
/// of memory 17.9–18.0 → 18.1–18.4 GB/s, three rounds in turn).
#[inline(always)]
pub(super) unsafe fn q4_k_block_scales(block: *const u8) -> (__m128, __m256i, __m256i) {
    const Z: i8 = -128;
    let head = _mm256_broadcastsi128_si256(_mm_loadu_si128(block as *const __m128i));
    let in_lanes = |bytes: __m128i| _mm256_broadcastsi128_si256(bytes);
    // Packed byte k (of 12) is byte 4 + k of the head. Scales 0..4 and minimums 0..4 are the
    // low six bits of packed bytes 0..4 and 4..8; scales 4..8 and minimums 4..8 the low and the
    // high nibbles of bytes 8..12, with two high bits each from the top of bytes 0..4 and 4..8.
    let low_nibbles = _mm256_shuffle_epi8(head, in_lanes(_mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, Z, Z, Z, Z)));
    let high_nibbles = _mm256_shuffle_epi8(_mm256_srli_epi16::<4>(head), in_lanes(_mm_setr_epi8(Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 12, 13, 14, 15)));
    let masks = in_lanes(_mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    let low = _mm256_and_si256(_mm256_or_si256(low_nibbles, high_nibbles), masks);
    let tops = _mm256_shuffle_epi8(head, in_lanes(_mm_setr_epi8(Z, Z, Z, Z, 4, 5, 6, 7, Z, Z, Z, Z, 8, 9, 10, 11)));
    let both_lanes = _mm256_or_si256(low, _mm256_and_si256(_mm256_srli_epi16::<2>(tops), _mm256_set1_epi8(0x30)));
    let mins =
        _mm256_shuffle_epi8(both_lanes, _mm256_setr_epi8(8, Z, Z, Z, 9, Z, Z, Z, 10, Z, Z, Z, 11, Z, Z, Z, 12, Z, Z, Z, 13, Z, Z, Z, 14, Z, Z, Z, 15, Z, Z, Z));
    (_mm_cvtph_ps(_mm256_castsi256_si128(head)), both_lanes, mins)
}

/// A Q4_K block's bytes and where its nibbles start, or a Q5_K block's (with `fifth_bit`, its
/// 32 bytes of high bits before them).
pub(super) const fn q4_k_layout(fifth_bit: bool) -> (usize, usize) {
    match fifth_bit {
        true => (BlockType::Q5K.block_bytes(), 48),
        false => (BlockType::Q4K.block_bytes(), 16),
    }
}

/// A Q5_K block's 32 bytes of high bits (when `FIFTH_BIT`; Q4_K has none: zeros).
#[inline(always)]
pub(super) unsafe fn q4_k_high_bits<const FIFTH_BIT: bool>(block: *const u8) -> __m256i {
    match FIFTH_BIT {
        true => _mm256_loadu_si256(block.add(16) as *const __m256i),
        false => _mm256_setzero_si256(),
    }
}

/// The codes of sub-blocks `2 · pair` and `2 · pair + 1` of a Q4_K block, or of a Q5_K block
/// when `FIFTH_BIT` (`high_bits` from [`q4_k_high_bits`]): a run of 32 bytes holds both, low
/// nibbles then high, and Q5_K puts bit `sub` of its high bytes on top.
#[inline(always)]
unsafe fn q4_k_pair_codes<const FIFTH_BIT: bool>(block: *const u8, pair: usize, high_bits: __m256i) -> [__m256i; 2] {
    let (nibbles_at, low) = (q4_k_layout(FIFTH_BIT).1, _mm256_set1_epi8(0x0F));
    let q = _mm256_loadu_si256(block.add(nibbles_at + 32 * pair) as *const __m256i);
    let nibbles = [_mm256_and_si256(q, low), _mm256_and_si256(_mm256_srli_epi16(q, 4), low)];
    match FIFTH_BIT {
        true => std::array::from_fn(|half| _mm256_or_si256(nibbles[half], byte_bit::<4>(high_bits, 2 * pair + half))),
        false => nibbles,
    }
}

/// The K-quants with a scale per 16 values (Q2_K, Q3_K, Q6_K), like Q4_K: sub-block sums
/// scaled as integers by their scales (two per run of 32 values, one per 128-bit lane). Each
/// 128-value half of a block is four runs of 32 codes.
pub(super) trait Sixteens {
    const BYTES: usize;
    /// Subtracted from every code (Q3_K: 4, Q6_K: 32); `None` for a type with minimums instead
    /// (Q2_K). Either meets the activations' sums of 16 values once per block, not the codes
    /// (Zen 3, one layer's decode product, one thread: Q6_K 40–43 → 42–46 GFLOP/s, Q3_K +2–4 %).
    const CODE_OFFSET: Option<i8>;
    /// The block's `d` and (with minimums) `dmin`.
    unsafe fn d(block: *const u8) -> (f32, f32);
    /// The sixteen scales as `i8`, and the sixteen minimums (with [`Sixteens::CODE_OFFSET`]
    /// unused).
    unsafe fn scales(block: *const u8) -> (__m128i, __m128i);
    /// The codes of the four runs of 32 values of `half`, as unsigned bytes.
    unsafe fn codes(block: *const u8, half: usize) -> [__m256i; 4];
}

pub(super) struct Q2K;
pub(super) struct Q3K;
pub(super) struct Q6K;

impl Sixteens for Q2K {
    const BYTES: usize = BlockType::Q2K.block_bytes();
    const CODE_OFFSET: Option<i8> = None;
    #[inline(always)]
    unsafe fn d(block: *const u8) -> (f32, f32) {
        (f16_at(block, 80), f16_at(block, 82))
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> (__m128i, __m128i) {
        let packed = _mm_loadu_si128(block as *const __m128i);
        let low = _mm_set1_epi8(0x0F);
        (_mm_and_si128(packed, low), _mm_and_si128(_mm_srli_epi16(packed, 4), low))
    }
    #[inline(always)]
    unsafe fn codes(block: *const u8, half: usize) -> [__m256i; 4] {
        two_bit_runs(_mm256_loadu_si256(block.add(16 + 32 * half) as *const __m256i))
    }
}

impl Sixteens for Q3K {
    const BYTES: usize = BlockType::Q3K.block_bytes();
    const CODE_OFFSET: Option<i8> = BlockType::Q3K.code_offset();
    #[inline(always)]
    unsafe fn d(block: *const u8) -> (f32, f32) {
        (f16_at(block, 108), 0.0)
    }
    /// [`crate::blocks::q3_k_scales`] in registers: the low nibbles of words 0 and 1, then their
    /// high nibbles, each word with two bits of word 2 on top. (Built byte by byte from it, the
    /// scales took a tenth of a decode step's Q3_K product; one layer's, Zen 3, one thread:
    /// 25 → 36–39 GFLOP/s.)
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> (__m128i, __m128i) {
        let words = _mm_loadl_epi64(block.add(96) as *const __m128i);
        let low = _mm_and_si128(_mm_unpacklo_epi64(words, _mm_srli_epi32(words, 4)), _mm_set1_epi8(0x0F));
        let top = _mm_set1_epi32((block.add(104) as *const i32).read_unaligned());
        let high = _mm_slli_epi32(_mm_and_si128(_mm_srlv_epi32(top, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3)), 4);
        (_mm_sub_epi8(_mm_or_si128(low, high), _mm_set1_epi8(32)), _mm_setzero_si128())
    }
    #[inline(always)]
    unsafe fn codes(block: *const u8, half: usize) -> [__m256i; 4] {
        let high = _mm256_loadu_si256(block as *const __m256i);
        let mut runs = two_bit_runs(_mm256_loadu_si256(block.add(32 + 32 * half) as *const __m256i));
        for (run, codes) in runs.iter_mut().enumerate() {
            *codes = _mm256_or_si256(*codes, byte_bit::<2>(high, 4 * half + run));
        }
        runs
    }
}

impl Sixteens for Q6K {
    const BYTES: usize = BlockType::Q6K.block_bytes();
    const CODE_OFFSET: Option<i8> = BlockType::Q6K.code_offset();
    #[inline(always)]
    unsafe fn d(block: *const u8) -> (f32, f32) {
        (f16_at(block, 208), 0.0)
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> (__m128i, __m128i) {
        (_mm_loadu_si128(block.add(192) as *const __m128i), _mm_setzero_si128())
    }
    /// See [`crate::blocks::q6_k_value`].
    #[inline(always)]
    unsafe fn codes(block: *const u8, half: usize) -> [__m256i; 4] {
        let (low, pair_bits) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let ql0 = _mm256_loadu_si256(block.add(64 * half) as *const __m256i);
        let ql1 = _mm256_loadu_si256(block.add(64 * half + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(block.add(128 + 32 * half) as *const __m256i);
        [
            _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_and_si256(_mm256_slli_epi16(qh, 4), pair_bits)),
            _mm256_or_si256(_mm256_and_si256(ql1, low), _mm256_and_si256(_mm256_slli_epi16(qh, 2), pair_bits)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), _mm256_and_si256(qh, pair_bits)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low), _mm256_and_si256(_mm256_srli_epi16(qh, 2), pair_bits)),
        ]
    }
}

/// Bit `bit` of every byte of `bytes`, moved to bit `TO` and alone in its byte (the 16-bit
/// shifts move bits across bytes; the mask keeps each byte's own).
#[inline(always)]
unsafe fn byte_bit<const TO: i32>(bytes: __m256i, bit: usize) -> __m256i {
    let lowest = _mm256_and_si256(_mm256_srl_epi16(bytes, _mm_cvtsi32_si128(bit as i32)), _mm256_set1_epi8(1));
    _mm256_slli_epi16::<TO>(lowest)
}

/// The four runs of 2-bit codes in 32 bytes: bit pairs 0, 1, 2, 3 of every byte.
#[inline(always)]
unsafe fn two_bit_runs(q: __m256i) -> [__m256i; 4] {
    let three = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(q, three),
        _mm256_and_si256(_mm256_srli_epi16(q, 2), three),
        _mm256_and_si256(_mm256_srli_epi16(q, 4), three),
        _mm256_and_si256(_mm256_srli_epi16(q, 6), three),
    ]
}

/// The eight `i8` of `half` of `s` as `i16`, in both 128-bit lanes (for `shuffle_epi8` to
/// broadcast one per lane).
///
/// Hidden from LLVM behind an empty `asm!`: knowing both lanes equal, it compiled each
/// `shuffle_epi8` of them into three shuffles, one across lanes (24 instructions a block instead
/// of 8). Zen 4 without AVX-512, one thread, one layer's decode product in cache, GFLOP/s: Q2_K
/// 48–54 → 64–70, Q3_K 41–43 → 48–51, Q6_K 46–49 → 49–53; out of memory (`stream` bench, three
/// rounds in turn), GB/s: Q2_K 8.6–8.7 → 10.5–10.6, Q3_K 8.7–8.8 → 10.1–10.3, Q6_K 17.3–17.4 →
/// 18.4 (and one round 15.3). The `asm!` names a `ymm` register, which newer compilers allow only
/// in code built for AVX (nightly 1.97 refused it here), hence the feature, and `inline` in place
/// of `inline(always)`, which cannot go with one: the callers, built for AVX2, still inline it.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn half_in_both_lanes(s: __m128i, half: usize) -> __m256i {
    let s16 = _mm_cvtepi8_epi16(if half == 0 { s } else { _mm_unpackhi_epi64(s, s) });
    let mut both = _mm256_set_m128i(s16, s16);
    // SAFETY: no instructions; the register is read and written as it is.
    std::arch::asm!("/* {0} */", inout(ymm_reg) both, options(pure, nomem, nostack, preserves_flags));
    both
}

/// A [`Sixteens`] type as a [`Tile`] (a blanket `Tile` for them would overlap the legacy
/// types').
struct Per16<S, const L2: bool>(std::marker::PhantomData<S>);

impl<S: Sixteens, const L2: bool> Tile for Per16<S, L2> {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        sixteens_tile::<S, RT, CT, L2>(w, x, r, i, out)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sixteens_tile<S: Sixteens, const RT: usize, const CT: usize, const L2: bool>(
    w: &QMatrix,
    x: &QuantizedRows,
    r: usize,
    i: usize,
    out: *mut f32,
) -> usize {
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let ahead = tiles_ahead(w, RT, PREFETCH_BYTES);
    let mut acc = Accumulators::<RT, CT>::new();
    for b in 0..w.cols / SUPER_BLOCK {
        let mut d = [(0f32, 0f32); RT];
        let mut scales = [(_mm_setzero_si128(), _mm_setzero_si128()); RT];
        prefetch_ahead::<L2>(weights[0], b, RT * S::BYTES, ahead);
        for a in 0..RT {
            let block = weights[a].add(b * S::BYTES);
            d[a] = S::d(block);
            scales[a] = S::scales(block);
        }
        let mut sums = [[_mm256_setzero_si256(); CT]; RT];
        for half in 0..2 {
            // Per weight row: the four runs' codes and scale pairs.
            let mut codes = [[_mm256_setzero_si256(); 4]; RT];
            let mut run_scales = [[_mm256_setzero_si256(); 4]; RT];
            for a in 0..RT {
                codes[a] = S::codes(weights[a].add(b * S::BYTES), half);
                let both_scales = half_in_both_lanes(scales[a].0, half);
                for run in 0..4 {
                    let control = _mm256_set_m128i(_mm_set1_epi16(broadcast_i16(2 * run + 1)), _mm_set1_epi16(broadcast_i16(2 * run)));
                    run_scales[a][run] = _mm256_shuffle_epi8(both_scales, control);
                }
            }
            for c in 0..CT {
                let xq = acts[c].1.as_ptr().add(b * SUPER_BLOCK + 128 * half);
                for run in 0..4 {
                    let x = _mm256_loadu_si256(xq.add(BLOCK * run) as *const __m256i);
                    for a in 0..RT {
                        let pairs = _mm256_maddubs_epi16(codes[a][run], x);
                        sums[a][c] = _mm256_add_epi32(sums[a][c], _mm256_madd_epi16(pairs, run_scales[a][run]));
                    }
                }
            }
        }
        for c in 0..CT {
            let dx = *acts[c].0.get_unchecked(b);
            // The activation's sixteen sums, which every weight row's minimums (or scales times
            // the code offset) meet.
            let x_sums = _mm256_loadu_si256(x.sums16(i + c).as_ptr().add(16 * b) as *const __m256i);
            for a in 0..RT {
                let (d, dmin) = d[a];
                match S::CODE_OFFSET {
                    // The offset's part has the codes' factor `d`, so it is taken from their
                    // integer sums (which stay far from overflowing: |Q6_K scale · code · x|
                    // < 2²⁰ per value, 2²⁸ per block; a Q6_K scale times 32 still fits `i16`),
                    // leaving a block one conversion and one multiply-add. Zen 4 without
                    // AVX-512, one thread, in cache (`matmul` bench, every layer shape),
                    // GFLOP/s: Q6_K 49–54 → 53–58, Q3_K 47–51 → 49–53; out of memory
                    // (`stream`, three rounds in turn), GB/s: Q6_K 18.4–18.7 → 18.8–19.3, Q3_K
                    // 9.9–10.2 → 10.6.
                    Some(offset) => {
                        let offset_scales = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(scales[a].0), _mm256_set1_epi16(offset.into()));
                        let codes_sums = _mm256_sub_epi32(sums[a][c], _mm256_madd_epi16(offset_scales, x_sums));
                        acc.add(a, c, _mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(codes_sums));
                    }
                    None => {
                        acc.add(a, c, _mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sums[a][c]));
                        let minimums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_cvtepu8_epi16(scales[a].1), x_sums));
                        acc.subtract_minimums(a, c, _mm256_set1_ps(dmin * dx), minimums);
                    }
                }
            }
        }
    }
    store(&acc.totals(), hsum, w, r, i, out)
}

/// The `shuffle_epi8` control (as an i16 pattern) that copies 16-bit element `j` of each lane
/// into every element.
#[inline(always)]
pub(super) const fn broadcast_i16(j: usize) -> i16 {
    (((2 * j + 1) << 8) | (2 * j)) as i16
}

/// The `shuffle_epi8` control (as an i16 pattern) that widens byte `j` of each lane into every
/// 16-bit element.
#[inline(always)]
pub(super) const fn byte_as_i16(j: usize) -> i16 {
    (0x8000 | j) as i16
}

/// How a weight block's 32 values meet an activation block's in `maddubs` (unsigned × signed
/// bytes → sums of pairs as `i16`), or in VNNI's `dpbusd` (sums of four as `i32`).
pub(super) trait Block {
    const BYTES: usize;
    /// What the codes are offset by (value = d · (q − offset); Q8_0: none, its codes are
    /// signed), or `None` for a type with an `f16` minimum after its scale instead (value = d ·
    /// q + m): [`legacy_tile`] takes either through the activations' sums of the block, not in
    /// [`Block::pairs`].
    const CODE_OFFSET: Option<i8> = Some(0);
    /// How far ahead a decode step prefetches the weights, at least, in bytes (whole tiles:
    /// [`tiles_ahead`]).
    const PREFETCH: usize = PREFETCH_BYTES;
    /// Bytes from one block to the next within a run of eight ([`Block::run_at`]).
    const STRIDE: usize = Self::BYTES;
    /// Where in a weight row the first of its `n` blocks from block `chunk` (a multiple of
    /// eight) starts, as [`Block::weights`] and [`Block::pair`] take it; block `chunk + k` is
    /// [`Block::STRIDE`] · `k` on: one offset for all of a tile's rows.
    #[inline(always)]
    fn run_at(chunk: usize, n: usize) -> usize {
        let _ = n;
        chunk * Self::BYTES
    }
    /// The `f16` scales of a weight row's `n` blocks from block `chunk` (`n` ≤ 8, the others
    /// zero), as eight `f32`; only for a type with [`Block::CODE_OFFSET`].
    #[inline(always)]
    unsafe fn scales(row: *const u8, chunk: usize, n: usize) -> __m256
    where
        Self: Sized,
    {
        f16s::<Self>(row.add(chunk * Self::BYTES), n)
    }
    /// The weight block as the operands [`Block::pairs`] takes.
    ///
    /// # Safety
    /// `block` points to a whole block; AVX2 is available.
    unsafe fn weights(block: *const u8) -> [__m256i; 2];
    /// Whether a decode step takes the weight rows in pairs ([`decode_pairs`]), not one by
    /// one ([`legacy_tile`]).
    const PAIRS: bool = true;
    /// Two weight rows' blocks as [`decode_pairs`] takes them: values 0..16 of `first` and
    /// `second` (a 128-bit lane each), then values 16..32, each as [`Block::weights`] gives.
    ///
    /// # Safety
    /// As [`Block::weights`], for both blocks.
    unsafe fn pair(first: *const u8, second: *const u8) -> [[__m256i; 2]; 2];
    /// Whether `maddubs` of a pair's two halves add up in 16 bits.
    const HALVES_FIT_I16: bool;
    /// The block and the activation block's 32 bytes as unsigned and signed bytes whose
    /// products are the values' (what `maddubs` and `dpbusd` take).
    unsafe fn operands(w: &[__m256i; 2], x: __m256i) -> (__m256i, __m256i);
}

/// Sums of adjacent products as `i16`.
#[inline(always)]
unsafe fn maddubs((unsigned, signed): (__m256i, __m256i)) -> __m256i {
    _mm256_maddubs_epi16(unsigned, signed)
}

/// How [`decode_pairs`] adds up a pair of blocks' products (each half of the values as
/// [`Block::pair`] gives them) with the activation block's halves, into sums of four in `i32`.
pub(super) trait Dot {
    unsafe fn sums<W: Block>(pair: &[[__m256i; 2]; 2], halves: &[__m256i; 2]) -> __m256i;
}

/// AVX2's: `maddubs` into `i16` pairs, then `madd` with ones.
struct Maddubs;

impl Dot for Maddubs {
    #[inline(always)]
    unsafe fn sums<W: Block>(pair: &[[__m256i; 2]; 2], halves: &[__m256i; 2]) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let (low, high) = (maddubs(W::operands(&pair[0], halves[0])), maddubs(W::operands(&pair[1], halves[1])));
        match W::HALVES_FIT_I16 {
            true => _mm256_madd_epi16(_mm256_add_epi16(low, high), ones),
            false => _mm256_add_epi32(_mm256_madd_epi16(low, ones), _mm256_madd_epi16(high, ones)),
        }
    }
}

/// Bytes `at..at + 16` of `first` in the low lane, of `second` in the high one.
#[inline(always)]
unsafe fn lanes(first: *const u8, second: *const u8, at: usize) -> __m256i {
    _mm256_set_m128i(_mm_loadu_si128(second.add(at) as *const __m128i), _mm_loadu_si128(first.add(at) as *const __m128i))
}

struct Q8_0;

impl Block for Q8_0 {
    const BYTES: usize = BlockType::Q8_0.block_bytes();
    /// Twice the others' (twice their bytes per value): Zen 3, whole model, paired runs, decode
    /// tok/s, one thread 7.9–9.0 → 9.4–9.6; at two threads one set of runs gained 6 %, the next
    /// none.
    const PREFETCH: usize = 2 * PREFETCH_BYTES;
    /// `[w, |w|]`.
    #[inline(always)]
    unsafe fn weights(block: *const u8) -> [__m256i; 2] {
        let w = _mm256_loadu_si256(block.add(2) as *const __m256i);
        [w, _mm256_sign_epi8(w, w)]
    }
    #[inline(always)]
    unsafe fn pair(first: *const u8, second: *const u8) -> [[__m256i; 2]; 2] {
        [2, 18].map(|at| {
            let w = lanes(first, second, at);
            [w, _mm256_sign_epi8(w, w)]
        })
    }
    /// Two products of codes and activations of up to 127 · 128 each.
    const HALVES_FIT_I16: bool = false;
    /// `|w| · (x with w's sign) = w · x`.
    #[inline(always)]
    unsafe fn operands(w: &[__m256i; 2], x: __m256i) -> (__m256i, __m256i) {
        (w[1], _mm256_sign_epi8(x, w[0]))
    }
}

/// Q4_0, Q4_1, Q5_0 and Q5_1: codes of four bits (five with `FIFTH_BIT`), less a code offset or
/// plus a minimum (with `MIN`). AVX-512 takes their tiles of one activation row.
pub(super) struct Nibbles<const FIFTH_BIT: bool, const MIN: bool>;

type Q4_0 = Nibbles<false, false>;
type Q4_1 = Nibbles<false, true>;
type Q5_0 = Nibbles<true, false>;
type Q5_1 = Nibbles<true, true>;

impl<const FIFTH_BIT: bool, const MIN: bool> Nibbles<FIFTH_BIT, MIN> {
    const TY: BlockType = BlockType::nibbles(FIFTH_BIT, MIN);
}

impl<const FIFTH_BIT: bool, const MIN: bool> Block for Nibbles<FIFTH_BIT, MIN> {
    const BYTES: usize = Self::TY.block_bytes();
    const CODE_OFFSET: Option<i8> = Self::TY.code_offset();
    /// `[q]`, the unsigned codes (see [`crate::blocks::legacy_code`]).
    #[inline(always)]
    unsafe fn weights(block: *const u8) -> [__m256i; 2] {
        let (high_bits, nibbles_at) = legacy_layout(Self::TY);
        let mut q = nibble_codes(block.add(nibbles_at));
        if FIFTH_BIT {
            q = _mm256_or_si256(q, fifth_bits((block.add(high_bits) as *const u32).read_unaligned()));
        }
        [q, q]
    }
    #[inline(always)]
    unsafe fn pair(first: *const u8, second: *const u8) -> [[__m256i; 2]; 2] {
        debug_assert!(!FIFTH_BIT, "Q5_0 and Q5_1 decode a row at a time (`Block::PAIRS`)");
        let nibbles_at = legacy_layout(Self::TY).1;
        nibble_pair(first.add(nibbles_at), second.add(nibbles_at))
    }
    /// Four products of codes (up to 15) and activations (up to 128) each.
    const HALVES_FIT_I16: bool = true;
    /// Not Q5_0 and Q5_1: their fifth bits, spread for two rows at a time, made a whole model's
    /// decode slower though one layer's product in cache ran faster (Zen 3, Q5_1, one thread,
    /// paired runs: 7.9–8.8 → 7.4–8.4 tok/s; 31 → 32–33 GFLOP/s).
    const PAIRS: bool = !FIFTH_BIT;
    /// `q · x`, without the sign trick: the codes are unsigned.
    #[inline(always)]
    unsafe fn operands(w: &[__m256i; 2], x: __m256i) -> (__m256i, __m256i) {
        (w[0], x)
    }
}

/// Q4_0 with each run of eight blocks' scales first ([`BlockType::Q4_0ScalesFirst`]): Q4_0's
/// tiles, but a chunk's eight scales are one load where Q4_0's take eight inserts (its blocks lie
/// 18 bytes apart), an eighth of the instructions of its decode tile. Zen 4, one thread, pinned,
/// three rounds in turn: one layer's decode product in cache (`--bench matmul -- ffn_up m=1`)
/// 74.0–75.3 → 85.3–86.7 GFLOP/s; out of memory (`--bench stream`) 19.9–20.3 → 22.5–23.2 GB/s
/// of weights, and at two threads, bound by memory there, no different (35.2–35.9 → 35.0–35.8).
/// A run's scales and nibbles lie together: with all of a row's scales first, 22.3–22.4 GB/s.
/// Its panels pack a little slower than Q4_0's (`m=8`, AVX-512's panels, 4.25–4.29 against
/// 4.56–4.62 GB/s; `m=32` 2.14–2.15 against 2.22–2.23), though faster than Q4_0's did before
/// [`pack`]'s loop per type.
struct Q4_0ScalesFirst;

impl Block for Q4_0ScalesFirst {
    const BYTES: usize = BlockType::Q4_0ScalesFirst.block_bytes();
    const CODE_OFFSET: Option<i8> = BlockType::Q4_0ScalesFirst.code_offset();
    const STRIDE: usize = BLOCK / 2;
    /// Its nibbles, after the run's scales.
    #[inline(always)]
    fn run_at(chunk: usize, n: usize) -> usize {
        Self::BYTES * chunk + 2 * n
    }
    #[inline(always)]
    unsafe fn scales(row: *const u8, chunk: usize, n: usize) -> __m256 {
        // Inside the row, whose nibbles follow its scales; what lies past the chunk's `n` is
        // cleared, as `f16s` leaves it.
        let run = row.add(Self::BYTES * chunk);
        let words = if n == 8 {
            _mm_loadu_si128(run as *const __m128i)
        } else {
            let mut words = [0u16; 8];
            std::ptr::copy_nonoverlapping(run, words.as_mut_ptr() as *mut u8, 2 * n);
            _mm_loadu_si128(words.as_ptr() as *const __m128i)
        };
        _mm256_cvtph_ps(words)
    }
    #[inline(always)]
    unsafe fn weights(block: *const u8) -> [__m256i; 2] {
        let q = nibble_codes(block);
        [q, q]
    }
    #[inline(always)]
    unsafe fn pair(first: *const u8, second: *const u8) -> [[__m256i; 2]; 2] {
        nibble_pair(first, second)
    }
    const HALVES_FIT_I16: bool = true;
    #[inline(always)]
    unsafe fn operands(w: &[__m256i; 2], x: __m256i) -> (__m256i, __m256i) {
        (w[0], x)
    }
}

/// The 16 bytes of nibbles at `at` as their 32 unsigned codes: low nibbles (values 0..16) in the
/// low lane, high ones in the high lane.
#[inline(always)]
unsafe fn nibble_codes(at: *const u8) -> __m256i {
    // A broadcast load and a shift of the high lane alone take one shuffle-port instruction less
    // than a shift and an insert.
    let packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(at as *const __m128i));
    _mm256_and_si256(_mm256_srlv_epi64(packed, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F))
}

/// Two blocks' nibbles, at `first` and `second`, as [`Block::pair`] gives them.
#[inline(always)]
unsafe fn nibble_pair(first: *const u8, second: *const u8) -> [[__m256i; 2]; 2] {
    let (packed, low) = (lanes(first, second, 0), _mm256_set1_epi8(0x0F));
    [_mm256_and_si256(packed, low), _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low)].map(|q| [q, q])
}

/// Bit `v` of `bits` as `16` in byte `v` (0 where it is clear): Q5_0's and Q5_1's fifth bits.
#[inline(always)]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    // Byte `v` takes byte `v / 8` of the word, then keeps bit `v % 8` of it.
    let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0));
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16))
}

#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    hsum4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)))
}

#[inline(always)]
pub(super) unsafe fn hsum4(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
