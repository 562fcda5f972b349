//! AVX-512 with VNNI: 64 byte products per instruction (`vpdpbusd`) and 32 registers for
//! larger tiles. Chosen at run time where the host has it (Intel since Cascade Lake, AMD since
//! Zen 4); the binary itself is built for AVX2.
//!
//! A product of many activation rows (a prompt; a batch's decode step from
//! [`super::panel::panel_min_activations`] rows: 7 for the K-quants, 12 for the legacy types, 7
//! for Q4_0 and Q4_1 on a Zen 4) goes through [`super::panel`]s of 16 weight rows. Otherwise
//! (decode, small batches) a 512-bit register holds two 32-value blocks of a row: the legacy
//! types go two blocks at a time (a row with an odd number of blocks ends with one, the other
//! half zero). The nibble types' (Q4_0, Q4_1, Q5_0, Q5_1) tiles of one activation row (a decode
//! step, a batch's last rows) take four weight rows to a register instead, one to each 128-bit
//! lane, the rows left over going through AVX2's tiles. A K-quant's tile is one weight row, two
//! runs of 32 values to a 512-bit register, by one activation row, four (a batch's), or the two
//! or three a batch leaves. Those tiles take the matrices that are not a whole number of 16 rows:
//! every type's others are laid out 16 rows together ([`BlockType::Q4KInterleaved`],
//! [`BlockType::Q8_0Interleaved`], ...), whose tiles take one 32-bit lane of each register per row
//! and some activation rows before the panels do (32 for Q4_K and Q8_0, 24 for Q6_K, Q5_0 and Q5_1,
//! 16 for Q5_K and Q3_K, 128 for Q4_1 and Q2_K; Q4_0's take every product). On a host whose 512-bit
//! instructions take two passes (AMD Zen 4), most types' decode steps go through AVX2's tiles
//! ([`avx2_decodes_faster`]), and so do Q4_0's and Q4_1's batch steps of two and three rows.

use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::avx2;
use super::panel::{Panel, PANEL_ROWS};
use super::{prefetch_ahead, tiles_ahead, with_ahead_cache, PREFETCH_BYTES};
use crate::activations::{Interleaved, QuantizedRows, TILE_ROWS};
use crate::blocks::{interleaved_at, legacy_layout, BlockType, BLOCK, INTERLEAVED_ROWS, SUPER_BLOCK};
use crate::tiles::{decode_rows, operands, rows_of, store, Tile};
use crate::QMatrix;

pub fn detected() -> bool {
    super::avx2::detected()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Columns `rows` of every output row (see [`crate::product_rows`]), in tiles of (weight rows ×
/// activation rows) measured with `cargo bench -p llm-kernels`.
///
/// # Safety
/// [`detected`] is true; `out` as in [`crate::product_rows`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn product_rows(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    if let Some(how) = super::interleaving(w.ty, x.rows(), true) {
        return match (how.group, how.code_offset.is_none()) {
            (16, true) => panel_rows::<16, true>(w, x, rows, out),
            (16, false) => panel_rows::<16, false>(w, x, rows, out),
            (_, true) => panel_rows::<BLOCK, true>(w, x, rows, out),
            (_, false) => panel_rows::<BLOCK, false>(w, x, rows, out),
        };
    }
    if two_passes() && avx2_decodes_faster(w.ty, x.rows()) {
        return avx2::product_rows(w, x, rows, out);
    }
    match w.ty {
        BlockType::Q8_0 => rows_of::<Legacy<Q8_0>, 4, TILE_ACTS, DECODE_ROWS>(w, x, rows, out),
        BlockType::Q8_0Interleaved => interleaved_rows::<LegacyGroups<Q8_0Codes>>(w, x, rows, out),
        BlockType::Q4_0 => rows_of::<NibbleTiles<false, false>, 4, TILE_ACTS, { decode_rows(BlockType::Q4_0) }>(w, x, rows, out),
        // Laid out so only where AVX2's tiles decode Q4_0 (`crate::Kernels::layout`: here a
        // Zen 4's matrices of other than whole groups of 16 rows), whose
        // tiles of this layout also took a Zen 4's steps of 4–6 rows faster than this set's of
        // Q4_0 (`--bench stream -- m=N`, one thread, GB/s: 4 rows 6.63 → 7.31, 5 rows 5.05 →
        // 5.70, 6 rows 4.16 → 4.74).
        BlockType::Q4_0ScalesFirst => avx2::product_rows(w, x, rows, out),
        BlockType::Q4_0Interleaved => interleaved_rows::<LegacyGroups<NibbleCodes<false, false>>>(w, x, rows, out),
        BlockType::Q4_1 => rows_of::<NibbleTiles<false, true>, 4, TILE_ACTS, { decode_rows(BlockType::Q4_1) }>(w, x, rows, out),
        BlockType::Q4_1Interleaved => interleaved_rows::<LegacyGroups<NibbleCodes<false, true>>>(w, x, rows, out),
        BlockType::Q5_0 => rows_of::<NibbleTiles<true, false>, 4, TILE_ACTS, { decode_rows(BlockType::Q5_0) }>(w, x, rows, out),
        BlockType::Q5_0Interleaved => interleaved_rows::<LegacyGroups<NibbleCodes<true, false>>>(w, x, rows, out),
        BlockType::Q5_1 => rows_of::<NibbleTiles<true, true>, 4, TILE_ACTS, { decode_rows(BlockType::Q5_1) }>(w, x, rows, out),
        BlockType::Q5_1Interleaved => interleaved_rows::<LegacyGroups<NibbleCodes<true, true>>>(w, x, rows, out),
        // The K-quants' tiles are a row each: the choice is made once a product, not per row.
        // Into L1 at every size, as AVX2's Q4_K and Q5_K tiles ask (`avx2::product_rows`).
        BlockType::Q4K => rows_of::<RowTiles<KNibbles<false>, false>, 1, TILE_ACTS, { decode_rows(BlockType::Q4K) }>(w, x, rows, out),
        BlockType::Q4KInterleaved => interleaved_rows::<Q4KGroups<false>>(w, x, rows, out),
        BlockType::Q5KInterleaved => interleaved_rows::<Q4KGroups<true>>(w, x, rows, out),
        BlockType::Q5K => rows_of::<RowTiles<KNibbles<true>, false>, 1, TILE_ACTS, { decode_rows(BlockType::Q5K) }>(w, x, rows, out),
        BlockType::Q2K => with_ahead_cache!(w, 1, rows_of::<RowTiles<Sixteens<avx2::Q2K>, L2>, 1, TILE_ACTS, { decode_rows(BlockType::Q2K) }>(w, x, rows, out)),
        BlockType::Q3K => with_ahead_cache!(w, 1, rows_of::<RowTiles<Sixteens<avx2::Q3K>, L2>, 1, TILE_ACTS, { decode_rows(BlockType::Q3K) }>(w, x, rows, out)),
        BlockType::Q6K => with_ahead_cache!(w, 1, rows_of::<RowTiles<Sixteens<avx2::Q6K>, L2>, 1, TILE_ACTS, { decode_rows(BlockType::Q6K) }>(w, x, rows, out)),
        BlockType::Q6KInterleaved => interleaved_rows::<SixteensGroups<Q6KCodes>>(w, x, rows, out),
        BlockType::Q3KInterleaved => interleaved_rows::<SixteensGroups<Q3KCodes>>(w, x, rows, out),
        BlockType::Q2KInterleaved => interleaved_rows::<SixteensGroups<Q2KCodes>>(w, x, rows, out),
    }
}

/// Whether this host runs this module's 512-bit instructions as two passes through 256-bit
/// units: AMD's Zen 4, an AMD CPU of family 0x19 with AVX-512 (family 0x19's Zen 3 has none).
/// Detected once: `cpuid` in a virtual machine exits to the hypervisor.
pub(super) fn two_passes() -> bool {
    static TWO_PASSES: OnceLock<bool> = OnceLock::new();
    *TWO_PASSES.get_or_init(|| {
        // `__cpuid` is safe from Rust 1.95, unsafe in the workspace's oldest (1.94).
        #[allow(unused_unsafe)]
        // SAFETY: every x86_64 CPU has `cpuid` and its leaves 0 and 1.
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1).eax) };
        detected() && is_amd_family_0x19(&vendor, signature)
    })
}

/// Whether `cpuid`'s leaf 0 (`vendor`) and leaf 1's `eax` (`signature`) name an AMD CPU of family
/// 0x19 (Zen 3 or Zen 4; Zen 5 is family 0x1A).
fn is_amd_family_0x19(vendor: &CpuidResult, signature: u32) -> bool {
    let amd = [vendor.ebx, vendor.edx, vendor.ecx].map(u32::to_le_bytes) == [*b"Auth", *b"enti", *b"cAMD"];
    let base_family = (signature >> 8) & 0xF;
    let family = if base_family == 0xF { base_family + ((signature >> 20) & 0xFF) } else { base_family };
    amd && family == 0x19
}

/// Whether a product of `rows` activation rows (fewer than the panels take) of `ty`'s weights
/// goes through AVX2's tiles where a 512-bit instruction takes [`two_passes`].
///
/// A decode step (one row) of most types: there AVX2's tiles read a layer's weights out of
/// memory faster than this module's (AMD Zen 4, `--bench stream`, two rounds each, GB/s of
/// weights, one thread: Q4_0 18.1–18.3 → 20.0, Q4_1 18.5–19.3 → 20.3–20.4, Q4_K 19.3 →
/// 22.1–22.2, Q5_K 19.6 → 20.2–20.4, Q6_K 21.7–22.5 → 24.0–24.4, Q2_K 13.4 → 13.8–13.9; two
/// threads: Q4_0 32.8–33.9 → 34.9–35.9, Q4_K 33.4–34.6 → 35.4–36.2, Q6_K 33.5–35.2 →
/// 35.8–36.1). The others stay with this module's: Q8_0 (AVX2's 21.6–22.0 against 21.7–22.9;
/// two threads 32.4–33.8 against 34.6–34.8), Q5_0 and Q5_1 (14.8–15.4 against 15.4–16.5), Q3_K
/// (13.4 against 13.5–13.6).
///
/// A batch's step of 2 or 3 rows of Q4_0 and Q4_1, whose tiles here are bound by instructions
/// even out of memory (`--bench stream -- m=N`, three rounds each, this module's → AVX2's, GB/s):
/// one thread, Q4_0 at 2 rows 10.4–10.6 → 11.7–12.1, 3 rows 8.1–8.3 → 9.0–9.2, Q4_1 at 2 rows
/// 9.8–10.0 → 12.6–12.8, 3 rows 7.8–7.9 → 9.4–9.7; two threads, Q4_0 at 2 rows 21.1 → 24.2.
/// From 4 rows the kernel benchmark still favoured AVX2 (one thread, Q4_0 1–7 %, Q4_1 13–23 %;
/// two threads, Q4_0 at 4 rows level), but a whole model's batches of four ran slower through it
/// (`batch_throughput.py --requests 12 --batch 4 --threads 2`, TinyLlama's shape in Q4_0, five
/// rounds in turn: 66.1–71.6 → 59.0–67.8 tok/s). The K-quants' batch tiles here are faster (Q4_K
/// at 2 rows 13.1–13.4 against 12.8–12.9, Q6_K 16.1–17.3 against 10.3–15.7); Q8_0 gains little
/// (2 rows 17.5–18.2 → 18.7–19.6, 3 rows none).
fn avx2_decodes_faster(ty: BlockType, rows: usize) -> bool {
    match rows {
        1 => matches!(ty, BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q4K | BlockType::Q5K | BlockType::Q6K | BlockType::Q2K),
        2 | 3 => matches!(ty, BlockType::Q4_0 | BlockType::Q4_1),
        _ => false,
    }
}

/// The sums of a 16-row layout's groups: its [`INTERLEAVED_ROWS`] weight rows by `CT` activation
/// rows, one 32-bit lane per weight row.
trait Groups {
    /// The sums of the group at `group` against activation rows `i..i + CT`, one register each.
    ///
    /// # Safety
    /// AVX-512 with VNNI is available; `group` is the start of one of `w`'s groups.
    unsafe fn sums<const CT: usize>(w: &QMatrix, x: &QuantizedRows, i: usize, group: *const u8) -> [__m512; CT];
}

/// A 16-row layout's columns `rows` (whole groups of [`INTERLEAVED_ROWS`]) of every output row,
/// up to four activation rows at a time.
#[inline(always)]
unsafe fn interleaved_rows<G: Groups>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    let mut i = 0;
    while i < x.rows() {
        i += match x.rows() - i {
            1 => interleaved_tile::<G, 1>(w, x, rows.clone(), i, out),
            2 => interleaved_tile::<G, 2>(w, x, rows.clone(), i, out),
            3 => interleaved_tile::<G, 3>(w, x, rows.clone(), i, out),
            _ => interleaved_tile::<G, 4>(w, x, rows.clone(), i, out),
        };
    }
}

/// Columns `rows` of output rows `i..i + CT`, a group at a time; returns `CT`.
#[inline(always)]
unsafe fn interleaved_tile<G: Groups, const CT: usize>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, i: usize, out: *mut f32) -> usize {
    let group_bytes = INTERLEAVED_ROWS * w.ty.row_bytes(w.cols);
    for first in rows.step_by(INTERLEAVED_ROWS) {
        let sums = G::sums::<CT>(w, x, i, w.bytes.as_ptr().add(first / INTERLEAVED_ROWS * group_bytes));
        for c in 0..CT {
            _mm512_storeu_ps(out.add((i + c) * w.rows + first), sums[c]);
        }
    }
    CT
}

/// Where a Q4_K block (Q5_K's with `FIFTH_BIT`, after its high bits) keeps its nibbles.
const fn k_nibbles<const FIFTH_BIT: bool>() -> usize {
    if FIFTH_BIT {
        16 + SUPER_BLOCK / 8
    } else {
        16
    }
}

/// Step `k` (< 8) of sub-blocks 2 · pair and 2 · pair + 1 of a [`BlockType::Q5KInterleaved`]
/// group's block at `block`: the 5-bit codes of their values 4k.. of every row, a row to a
/// 32-bit lane, as [`crate::blocks::q5_k_value`] reads them: the low and high nibbles of a word,
/// each with 16 added where bit 2 · pair (2 · pair + 1) of its byte of the word of high bits is
/// set.
#[inline(always)]
pub(super) unsafe fn q5_k_codes(block: *const u8, pair: usize, k: usize) -> (__m512i, __m512i) {
    let (low, high) = nibbles(block.add(interleaved_at(k_nibbles::<true>() + 32 * pair + 4 * k)));
    let high_bits = word_at(block, 16 + 4 * k);
    (add_where_bit(low, high_bits, 2 * pair, 16), add_where_bit(high, high_bits, 2 * pair + 1, 16))
}

/// Activation rows `i..i + CT` as a K-quant's 16-row tiles read them: each row's values, its
/// super-blocks' scales and its sums of 16 values.
#[inline(always)]
fn k_quant_rows<const CT: usize>(x: &QuantizedRows, i: usize) -> ([*const i8; CT], [*const f32; CT], [*const i16; CT]) {
    let (mut values, mut scales, mut sums16) = ([std::ptr::null(); CT], [std::ptr::null(); CT], [std::ptr::null(); CT]);
    for c in 0..CT {
        let (d, q, _) = x.row(i + c);
        (values[c], scales[c], sums16[c]) = (q.as_ptr(), d.as_ptr(), x.sums16(i + c).as_ptr());
    }
    (values, scales, sums16)
}

/// [`BlockType::Q4KInterleaved`]'s groups, and with `FIFTH_BIT` [`BlockType::Q5KInterleaved`]'s.
struct Q4KGroups<const FIFTH_BIT: bool>;

/// Sixteen interleaved Q4_K rows by `CT` activation rows: each 512-bit register holds the same
/// four bytes of nibbles of every row, so `vpdpbusd` against four activation bytes broadcast
/// adds eight values' products to each row's own lane: no sum is ever reduced across a register,
/// and a block's scales and minimums are unpacked for the 16 rows at once. A sub-block's high
/// nibbles are read in place, as 16 × their code (the mask without the shift), and its sum meets
/// a scale 16 times smaller than the low nibbles' ([`interleaved_scales`]). Q5_K's codes, of
/// five bits, come whole ([`q5_k_codes`]), and its high sub-blocks' scales are made 16 times
/// as large as the file has them, as the low ones' are.
///
/// Against the Q4_K row tiles (AVX2's for a decode step on this Zen 4), one thread, in cache
/// (`--bench matmul -- ffn_up`, GFLOP/s): 1 activation row 89 → 208, 2 rows 103 → 305, 4 rows
/// 116 → 321, 5 rows 108 → 302, and from 7 rows, where panels took Q4_K, 143–278 → 313–320 up
/// to 32 rows. Out of memory, where a decode step reads its weights, level: they come no faster
/// (`--bench stream`, two rounds, GB/s, one thread 21.3–21.5 → 21.7–22.0, two threads 30.8 and
/// 39.7 → 31.2 and 39.2).
///
/// Q5_K's against its row tiles, the same measures: in cache 1 row 68 → 122, 2 rows 91 → 201,
/// 4 rows 109 → 264, 8 rows 154 → 267 (panels there before); out of memory 1 row 20.1–20.4
/// (AVX2's) → 22.7–24.0, 2 rows 13.5–14.5 → 23.3–25.5, 4 rows 8.9–9.1 → 20.7–21.0, 8 rows
/// 5.3–5.5 → 10.7–10.8.
///
/// It asks for each line twice: 2 KiB ahead into L1 and 16 KiB ahead into L2. Into L1 alone,
/// at one thread, 1 KiB ahead read 19.2 GB/s, 2 KiB 21.3–22.9, from 4 KiB 10.3–12.2 (an L1
/// miss outstanding for a line still in memory holds one of the few buffers L1 has); with 2
/// KiB alone, two threads read 30.3 against Q4_K's 32.8, with both asks level.
impl<const FIFTH_BIT: bool> Groups for Q4KGroups<FIFTH_BIT> {
    #[inline(always)]
    unsafe fn sums<const CT: usize>(w: &QMatrix, x: &QuantizedRows, i: usize, group: *const u8) -> [__m512; CT] {
        let (values, scales, sums16) = k_quant_rows::<CT>(x, i);
        let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
        let block_bytes = INTERLEAVED_ROWS * w.ty.block_bytes();
        let mut acc = [_mm512_setzero_ps(); CT];
        for b in 0..w.cols / SUPER_BLOCK {
            let block = group.add(b * block_bytes);
            let ahead = block.wrapping_add(AHEAD_BYTES / 4);
            let far = block.wrapping_add(2 * AHEAD_BYTES);
            for line in (0..interleaved_at(k_nibbles::<FIFTH_BIT>())).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(line) as *const i8);
            }
            let (mut sub_scales, mins, d, dmin) = interleaved_scales(block);
            if FIFTH_BIT {
                for j in (1..8).step_by(2) {
                    sub_scales[j] = _mm512_slli_epi32::<4>(sub_scales[j]);
                }
            }
            let (mut scaled, mut min_part) = ([_mm512_setzero_si512(); CT], [_mm512_setzero_si512(); CT]);
            for pair in 0..4 {
                // Sub-blocks 2·pair (the low nibbles) and 2·pair + 1 (the high).
                let (mut low_sums, mut high_sums) = ([_mm512_setzero_si512(); CT], [_mm512_setzero_si512(); CT]);
                for k in 0..8 {
                    let at = interleaved_at(k_nibbles::<FIFTH_BIT>() + 32 * pair + 4 * k);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(at) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(at) as *const i8);
                    let (q_low, q_high) = match FIFTH_BIT {
                        true => q5_k_codes(block, pair, k),
                        false => {
                            let q = _mm512_loadu_si512(block.add(at) as *const _);
                            (_mm512_and_si512(q, low), _mm512_and_si512(q, high))
                        }
                    };
                    for c in 0..CT {
                        let x = values[c].add(b * SUPER_BLOCK + 2 * BLOCK * pair + 4 * k);
                        low_sums[c] = _mm512_dpbusd_epi32(low_sums[c], q_low, broadcast_word(x));
                        high_sums[c] = _mm512_dpbusd_epi32(high_sums[c], q_high, broadcast_word(x.add(BLOCK)));
                    }
                }
                for c in 0..CT {
                    let low_part = _mm512_mullo_epi32(low_sums[c], sub_scales[2 * pair]);
                    scaled[c] = _mm512_add_epi32(scaled[c], _mm512_add_epi32(low_part, _mm512_mullo_epi32(high_sums[c], sub_scales[2 * pair + 1])));
                }
            }
            for j in 0..8 {
                for c in 0..CT {
                    // Σ x of the sub-block's two halves, against the minimum in both halves of a
                    // lane.
                    let sums = sums16[c].add(b * SUPER_BLOCK / 16 + 2 * j) as *const i8;
                    min_part[c] = _mm512_dpwssd_epi32(min_part[c], mins[j], broadcast_word(sums));
                }
            }
            for c in 0..CT {
                let dx = _mm512_set1_ps(*scales[c].add(b));
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled[c]), _mm512_mul_ps(d, dx), acc[c]);
                acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(min_part[c]), _mm512_mul_ps(dmin, dx), acc[c]);
            }
        }
        acc
    }
}

/// The groups of the 16-row layouts of the K-quants of 16-value sub-blocks
/// ([`BlockType::Q6KInterleaved`], [`BlockType::Q3KInterleaved`], [`BlockType::Q2KInterleaved`]),
/// whose blocks `S` reads.
struct SixteensGroups<S>(std::marker::PhantomData<S>);

/// Sixteen interleaved rows of Q6_K, Q3_K or Q2_K by `CT` activation rows, read as
/// [`Q4KGroups`] reads Q4_K's: each half of a super-block comes as eight steps of four registers
/// of codes ([`SixteensCodes::codes`]), one row to a 32-bit lane, and `vpdpbusd` sums each of the
/// half's 16-value sub-blocks in a register of its own, from −offset · Σ x (the code offset),
/// until it meets its scale ([`SixteensCodes::scales`]); Q2_K's minimums meet the sub-blocks'
/// sums of activations once a block, two sub-blocks to a `vpdpwssd`.
///
/// Q6_K's against its row tiles (AVX2's for a decode step on this Zen 4), one thread, in cache
/// (`--bench matmul -- ffn_up`, GFLOP/s): 1 activation row 70 → 123, 2 rows 108 → 200, 4 rows
/// 126 → 236, 8 rows 104 → 196 (panels there before), 16 rows 163 → 236. Out of memory
/// (`--bench stream`, two rounds, GB/s): one row level (AVX2's 23.3–23.8 against 22.7–22.8), 2
/// rows 17.9–18.0 → 20.8–20.9, 4 rows 10.7–11.5 → 17.7–21.6, 8 rows 4.8–5.1 → 10.0–11.2.
/// Q3_K's, the same measures: in cache 1 row 65 → 111, 2 rows 96 → 175, 4 rows 116 → 219; out
/// of memory 1 row 10.6–12.1 → 15.8–20.9. Q2_K's: in cache 1 row 87 → 161, 2 rows 112 → 155, 4
/// rows 126 → 276; out of memory 1 row (AVX2's) 13.8 → 17.5–23.2.
///
/// Each step asks for its share of the block's lines (a sixteenth) 2 KiB ahead into L1 and 16
/// KiB ahead into L2. All at a block's start, as [`LegacyGroups`] asks for its smaller blocks,
/// a Q6_K block's 106 asks at once read 14.3–14.6 GB/s out of memory and ran at 99 GFLOP/s in
/// cache; Q3_K's and Q2_K's smaller blocks lost as much (three rounds in turn, GB/s, shares →
/// all at the start: Q3_K 20.1–20.9 → 13.7–13.9, Q2_K 22.4–22.5 → 15.7–16.1, Q6_K 22.5–23.8 →
/// 13.3–13.9). Against asking for the lines each step reads (three rounds in turn, Q6_K): out of
/// memory 19.3–23.0 → 21.1–23.4 GB/s, in cache 1 row 116.8–117.7 → 113.4–114.7 GFLOP/s, 4 rows
/// 235.8–237.3 → 248.1–249.6.
impl<S: SixteensCodes> Groups for SixteensGroups<S> {
    #[inline(always)]
    unsafe fn sums<const CT: usize>(w: &QMatrix, x: &QuantizedRows, i: usize, group: *const u8) -> [__m512; CT] {
        let (values, scales, sums16) = k_quant_rows::<CT>(x, i);
        let block_bytes = INTERLEAVED_ROWS * w.ty.block_bytes();
        let step_bytes = block_bytes.div_ceil(16);
        let mut acc = [_mm512_setzero_ps(); CT];
        for b in 0..w.cols / SUPER_BLOCK {
            let block = group.add(b * block_bytes);
            let sub_scales = S::scales(block);
            let mut scaled = [_mm512_setzero_si512(); CT];
            for half in 0..2 {
                // Steps 4·quarter.. read the sub-blocks 8·half + 2·run + quarter of the four runs.
                for quarter in 0..2 {
                    let sub_block = |run: usize| 8 * half + 2 * run + quarter;
                    let mut sums = [[_mm512_setzero_si512(); 4]; CT];
                    for c in 0..CT {
                        for run in 0..4 {
                            sums[c][run] = _mm512_set1_epi32(-S::OFFSET * *sums16[c].add(b * SUPER_BLOCK / 16 + sub_block(run)) as i32);
                        }
                    }
                    for k in 4 * quarter..4 * quarter + 4 {
                        prefetch_ahead::<false>(block, 8 * half + k, step_bytes, AHEAD_BYTES / 4);
                        prefetch_ahead::<true>(block, 8 * half + k, step_bytes, 2 * AHEAD_BYTES);
                        let codes = S::codes(block, half, k);
                        for c in 0..CT {
                            let x = values[c].add(b * SUPER_BLOCK + 128 * half + 4 * k);
                            for run in 0..4 {
                                sums[c][run] = _mm512_dpbusd_epi32(sums[c][run], codes[run], broadcast_word(x.add(BLOCK * run)));
                            }
                        }
                    }
                    for run in 0..4 {
                        let scale = sub_block_byte(&sub_scales, sub_block(run));
                        for c in 0..CT {
                            scaled[c] = _mm512_add_epi32(scaled[c], _mm512_mullo_epi32(sums[c][run], scale));
                        }
                    }
                }
            }
            let d = f16s_at(block, S::D);
            for c in 0..CT {
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled[c]), _mm512_mul_ps(d, _mm512_set1_ps(*scales[c].add(b))), acc[c]);
            }
            if S::MIN {
                let (mins, dmin) = (S::min_pairs(block), f16s_at(block, S::D + 2));
                for c in 0..CT {
                    let mut min_part = _mm512_setzero_si512();
                    for (pair, mins) in mins.into_iter().enumerate() {
                        // Σ x of sub-blocks 2·pair and 2·pair + 1, against their minimums.
                        let sums = sums16[c].add(b * SUPER_BLOCK / 16 + 2 * pair) as *const i8;
                        min_part = _mm512_dpwssd_epi32(min_part, mins, broadcast_word(sums));
                    }
                    acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(min_part), _mm512_mul_ps(dmin, _mm512_set1_ps(*scales[c].add(b))), acc[c]);
                }
            }
        }
        acc
    }
}

/// How a 16-row layout of a K-quant of 16-value sub-blocks holds a block of every row: its
/// codes as unsigned bytes offset by [`SixteensCodes::OFFSET`], each sub-block's scale, an `f16`
/// d and, with [`SixteensCodes::MIN`], an `f16` dmin after it and a minimum per sub-block (value
/// = d · scale_j · (code − offset) − dmin · min_j).
pub(super) trait SixteensCodes {
    /// The file's type.
    const FILE: BlockType;
    /// What the codes are less (Q3_K's 4, Q6_K's 32; none for Q2_K, which has minimums).
    const OFFSET: i32 = match Self::FILE.code_offset() {
        Some(k) => k as i32,
        None => 0,
    };
    /// Where a block keeps its `f16` d: last but for Q2_K's dmin.
    const D: usize = Self::FILE.block_bytes() - if Self::MIN { 4 } else { 2 };
    /// Whether the block has minimums (Q2_K).
    const MIN: bool = false;

    /// Step `k` (< 8) of half `half` of the block at `block`: the codes of values 128 · half +
    /// 32 · run + 4k.. of every row (runs 0..4), a row to a 32-bit lane.
    unsafe fn codes(block: *const u8, half: usize, k: usize) -> [__m512i; 4];

    /// The sub-blocks' scales of every row, sub-block `j`'s a signed byte of each lane: byte
    /// `j % 4` of register `j / 4` ([`sub_block_byte`]).
    unsafe fn scales(block: *const u8) -> [__m512i; 4];

    /// For a type with minimums: those of sub-blocks 2 · pair and 2 · pair + 1 of every row, in
    /// the low and the high 16 bits of its lane.
    #[inline(always)]
    unsafe fn min_pairs(_block: *const u8) -> [__m512i; 8] {
        [_mm512_setzero_si512(); 8]
    }
}

/// Sub-block `j`'s signed byte of every row, a row to a 32-bit lane: byte `j % 4` of each lane
/// of `words[j / 4]`, sign-extended.
#[inline(always)]
pub(super) unsafe fn sub_block_byte(words: &[__m512i; 4], j: usize) -> __m512i {
    _mm512_srai_epi32::<24>(_mm512_sllv_epi32(words[j / 4], _mm512_set1_epi32(24 - 8 * (j % 4) as i32)))
}

/// [`BlockType::Q6KInterleaved`]'s: 6-bit codes, `i8` scales.
pub(super) struct Q6KCodes;

impl SixteensCodes for Q6KCodes {
    const FILE: BlockType = BlockType::Q6K;

    /// As [`crate::blocks::q6_k_value`] reads them: runs 0 and 2 from the low and high nibbles of
    /// one word, 1 and 3 of the word 32 bytes on, each with its pair of the word of high bits
    /// (bits 0–1 for run 0, 2–3 for run 1, ...) put above.
    #[inline(always)]
    unsafe fn codes(block: *const u8, half: usize, k: usize) -> [__m512i; 4] {
        let (first, second, high) =
            (word_at(block, 64 * half + 4 * k), word_at(block, 64 * half + BLOCK + 4 * k), word_at(block, SUPER_BLOCK / 2 + BLOCK * half + 4 * k));
        let pair = _mm512_set1_epi8(0x30);
        // The low nibble of each byte of `nibbles`, bits 4 and 5 of `pairs` above it: (a & b) | c.
        let code = |nibbles, pairs| _mm512_ternarylogic_epi32::<0xEA>(_mm512_set1_epi8(0x0F), nibbles, _mm512_and_si512(pairs, pair));
        [
            code(first, _mm512_slli_epi16::<4>(high)),
            code(second, _mm512_slli_epi16::<2>(high)),
            code(_mm512_srli_epi16::<4>(first), high),
            code(_mm512_srli_epi16::<4>(second), _mm512_srli_epi16::<2>(high)),
        ]
    }

    /// The file's four words of `i8` scales as they are.
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [__m512i; 4] {
        let at = SUPER_BLOCK / 2 + SUPER_BLOCK / 4;
        [word_at(block, at), word_at(block, at + 4), word_at(block, at + 8), word_at(block, at + 12)]
    }
}

/// [`BlockType::Q3KInterleaved`]'s: 3-bit codes, 6-bit scales less 32.
pub(super) struct Q3KCodes;

impl SixteensCodes for Q3KCodes {
    const FILE: BlockType = BlockType::Q3K;

    /// As [`crate::blocks::q3_k_code`] reads them: run `run`'s bit pair of the half's word of
    /// 2-bit codes, and 4 added where bit 4 · half + run of its byte of the word of high bits
    /// (the same for both halves) is set.
    #[inline(always)]
    unsafe fn codes(block: *const u8, half: usize, k: usize) -> [__m512i; 4] {
        let (low, high) = (word_at(block, SUPER_BLOCK / 8 + BLOCK * half + 4 * k), word_at(block, 4 * k));
        let code = |low: __m512i, run: usize| add_where_bit(_mm512_and_si512(low, _mm512_set1_epi8(3)), high, 4 * half + run, 4);
        [code(low, 0), code(_mm512_srli_epi16::<2>(low), 1), code(_mm512_srli_epi16::<4>(low), 2), code(_mm512_srli_epi16::<6>(low), 3)]
    }

    /// Unpacked as [`crate::blocks::q3_k_scales`] does, on every row's three words at once, then
    /// 32 taken from each byte.
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [__m512i; 4] {
        let at = SUPER_BLOCK / 8 + SUPER_BLOCK / 4;
        let (w0, w1, top) = (word_at(block, at), word_at(block, at + 4), word_at(block, at + 8));
        let (low4, top2) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        // The low nibble of each byte of `low`, bits 4 and 5 of `top` (shifted there): (a & b) | (c & d).
        let scale =
            |low: __m512i, top: __m512i| _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(low, low4), _mm512_and_si512(top, top2)), _mm512_set1_epi8(32));
        [
            scale(w0, _mm512_slli_epi32::<4>(top)),
            scale(w1, _mm512_slli_epi32::<2>(top)),
            scale(_mm512_srli_epi32::<4>(w0), top),
            scale(_mm512_srli_epi32::<4>(w1), _mm512_srli_epi32::<2>(top)),
        ]
    }
}

/// [`BlockType::Q2KInterleaved`]'s: 2-bit codes, a 4-bit scale and a 4-bit minimum a sub-block.
pub(super) struct Q2KCodes;

impl SixteensCodes for Q2KCodes {
    const FILE: BlockType = BlockType::Q2K;
    const MIN: bool = true;

    /// As [`crate::blocks::q2_k_code`] reads them: run `run`'s bit pair of the half's word.
    #[inline(always)]
    unsafe fn codes(block: *const u8, half: usize, k: usize) -> [__m512i; 4] {
        let (codes, three) = (word_at(block, SUPER_BLOCK / 16 + BLOCK * half + 4 * k), _mm512_set1_epi8(3));
        [
            _mm512_and_si512(codes, three),
            _mm512_and_si512(_mm512_srli_epi16::<2>(codes), three),
            _mm512_and_si512(_mm512_srli_epi16::<4>(codes), three),
            _mm512_and_si512(_mm512_srli_epi16::<6>(codes), three),
        ]
    }

    /// The low nibbles of the four words of scales and minimums.
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> [__m512i; 4] {
        let low = |w: usize| _mm512_and_si512(word_at(block, 4 * w), _mm512_set1_epi8(0x0F));
        [low(0), low(1), low(2), low(3)]
    }

    /// The high nibbles of the same words, bytes 0 and 1 (2 and 3) of a lane spread to its two
    /// 16-bit halves.
    #[inline(always)]
    unsafe fn min_pairs(block: *const u8) -> [__m512i; 8] {
        let spread = |two: __m512i| _mm512_and_si512(_mm512_or_si512(two, _mm512_slli_epi32::<8>(two)), _mm512_set1_epi32(0x00FF_00FF));
        let mut pairs = [_mm512_setzero_si512(); 8];
        for w in 0..4 {
            let mins = _mm512_and_si512(_mm512_srli_epi32::<4>(word_at(block, 4 * w)), _mm512_set1_epi8(0x0F));
            pairs[2 * w] = spread(_mm512_and_si512(mins, _mm512_set1_epi32(0xFFFF)));
            pairs[2 * w + 1] = spread(_mm512_srli_epi32::<16>(mins));
        }
        pairs
    }
}

/// The groups of the legacy types' 16-row layouts ([`BlockType::Q8_0Interleaved`],
/// [`BlockType::Q4_0Interleaved`], ...), whose blocks' codes `C` reads.
struct LegacyGroups<C>(std::marker::PhantomData<C>);

/// Sixteen interleaved rows of a legacy type by `CT` activation rows, read as [`Q4KGroups`]
/// reads Q4_K's: a block's codes come as four pairs of registers ([`LegacyCodes::codes`]),
/// each register four values of every row, one row to a 32-bit lane, and `vpdpbusd` adds
/// their products in each row's own lane. The code offset meets the activations' sums: each
/// row's integer sum of a block starts from −[`LegacyCodes::OFFSET`] · Σ x; a minimum meets
/// them once the sum is scaled.
///
/// It asks for a block's lines 2 KiB ahead into L1 and 16 KiB ahead into L2, as [`Q4KGroups`]'
/// tiles do, all at the block's start: asked for beside each load instead, Q5_0's tile read
/// 18.1–20.2 GB/s out of memory at one thread, against 25.8–26.0 (`--bench stream`, Zen 4;
/// Q4_0's level, 21.8–22.9 against 22.5–22.8).
impl<C: LegacyCodes> Groups for LegacyGroups<C> {
    #[inline(always)]
    unsafe fn sums<const CT: usize>(w: &QMatrix, x: &QuantizedRows, i: usize, group: *const u8) -> [__m512; CT] {
        let (mut values, mut scales, mut sums) = ([std::ptr::null(); CT], [std::ptr::null(); CT], [std::ptr::null(); CT]);
        for c in 0..CT {
            let (d, q, s) = x.row(i + c);
            (values[c], scales[c], sums[c]) = (q.as_ptr(), d.as_ptr(), s.as_ptr());
        }
        let block_bytes = INTERLEAVED_ROWS * w.ty.block_bytes();
        let mut acc = [_mm512_setzero_ps(); CT];
        for b in 0..w.cols / BLOCK {
            let block = group.add(b * block_bytes);
            let (ahead, far) = (block.wrapping_add(AHEAD_BYTES / 4), block.wrapping_add(2 * AHEAD_BYTES));
            for line in (0..block_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(line) as *const i8);
            }
            let fifth_bits = C::fifth_bits(block);
            let (mut low_sums, mut high_sums) = ([_mm512_setzero_si512(); CT], [_mm512_setzero_si512(); CT]);
            for c in 0..CT {
                low_sums[c] = _mm512_set1_epi32(-C::OFFSET * *sums[c].add(b));
            }
            for k in 0..4 {
                let (q_low, q_high) = C::codes(block, fifth_bits, k);
                for c in 0..CT {
                    let x = values[c].add(b * BLOCK + 4 * k);
                    low_sums[c] = _mm512_dpbusd_epi32(low_sums[c], q_low, broadcast_word(x));
                    high_sums[c] = _mm512_dpbusd_epi32(high_sums[c], q_high, broadcast_word(x.add(BLOCK / 2)));
                }
            }
            let d = f16s_at(block, 0);
            for c in 0..CT {
                let (sum, dx) = (_mm512_cvtepi32_ps(_mm512_add_epi32(low_sums[c], high_sums[c])), *scales[c].add(b));
                acc[c] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[c]);
                if C::MIN {
                    // The minimum against the activations' sum, dx · Σ x.
                    let min = f16s_at(block, 2);
                    acc[c] = _mm512_fmadd_ps(min, _mm512_set1_ps(dx * *sums[c].add(b) as f32), acc[c]);
                }
            }
        }
        acc
    }
}

/// How a legacy type's 16-row layout holds a block's codes, after the 16 rows' `f16` scales
/// (and, with [`LegacyCodes::MIN`], their `f16` minimums): as unsigned bytes offset by
/// [`LegacyCodes::OFFSET`] (value = d · (code − offset), plus the minimum).
pub(super) trait LegacyCodes {
    const OFFSET: i32;
    /// Whether the 16 rows' `f16` minimums follow their scales (Q4_1, Q5_1).
    const MIN: bool = false;

    /// The 16 rows' words of fifth bits of the group's block at `block`, for types that have
    /// them.
    #[inline(always)]
    unsafe fn fifth_bits(_block: *const u8) -> __m512i {
        _mm512_setzero_si512()
    }

    /// The codes of values 4k..4k + 4 and 16 + 4k.. of every row of the group's block at
    /// `block` (k < 4), a row to a lane.
    unsafe fn codes(block: *const u8, fifth_bits: __m512i, k: usize) -> (__m512i, __m512i);
}

/// [`BlockType::Q8_0Interleaved`]'s: eight words of signed bytes, made unsigned by adding 128.
pub(super) struct Q8_0Codes;

impl LegacyCodes for Q8_0Codes {
    const OFFSET: i32 = 128;

    #[inline(always)]
    unsafe fn codes(block: *const u8, _: __m512i, k: usize) -> (__m512i, __m512i) {
        let word = |k: usize| _mm512_xor_si512(word_at(block, 2 + 4 * k), _mm512_set1_epi8(-128));
        (word(k), word(k + 4))
    }
}

/// The nibble types' ([`BlockType::Q4_0Interleaved`], [`BlockType::Q4_1Interleaved`],
/// [`BlockType::Q5_0Interleaved`], [`BlockType::Q5_1Interleaved`]): four words of nibbles, a
/// word's low nibbles four of the first 16 values, its high nibbles four of the last 16; with
/// `FIFTH_BIT` after a word of fifth bits, with `MIN` after the minimums, where
/// [`legacy_layout`] puts them.
pub(super) struct NibbleCodes<const FIFTH_BIT: bool, const MIN: bool>;

impl<const FIFTH_BIT: bool, const MIN: bool> NibbleCodes<FIFTH_BIT, MIN> {
    /// Where a block keeps its fifth bits and its nibbles.
    const LAYOUT: (usize, usize) = legacy_layout(BlockType::nibbles(FIFTH_BIT, MIN));
}

impl<const FIFTH_BIT: bool, const MIN: bool> LegacyCodes for NibbleCodes<FIFTH_BIT, MIN> {
    const OFFSET: i32 = match BlockType::nibbles(FIFTH_BIT, MIN).code_offset() {
        Some(k) => k as i32,
        None => 0,
    };
    const MIN: bool = MIN;

    #[inline(always)]
    unsafe fn fifth_bits(block: *const u8) -> __m512i {
        match FIFTH_BIT {
            true => word_at(block, Self::LAYOUT.0),
            false => _mm512_setzero_si512(),
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, fifth_bits: __m512i, k: usize) -> (__m512i, __m512i) {
        let codes = nibbles(block.add(interleaved_at(Self::LAYOUT.1 + 4 * k)));
        match FIFTH_BIT {
            true => with_fifth_bits(codes, fifth_bits, k),
            false => codes,
        }
    }
}

/// Codes `(low, high)` of values 4k.. and 16 + 4k.. with their fifth bits: bits 4k.. and 16 +
/// 4k.. of each row's word, tested four values of every row at once ([`fifth_bits_set`]), add 16
/// to the codes they are set for.
#[inline(always)]
unsafe fn with_fifth_bits((low, high): (__m512i, __m512i), fifth_bits: __m512i, k: usize) -> (__m512i, __m512i) {
    let sixteen = _mm512_set1_epi8(16);
    (
        _mm512_mask_add_epi8(low, fifth_bits_set(fifth_bits, 4 * k), low, sixteen),
        _mm512_mask_add_epi8(high, fifth_bits_set(fifth_bits, 16 + 4 * k), high, sixteen),
    )
}

/// The low and the high nibbles of the register at `at`, each in a byte of its own.
#[inline(always)]
pub(super) unsafe fn nibbles(at: *const u8) -> (__m512i, __m512i) {
    let (q, low) = (_mm512_loadu_si512(at as *const _), _mm512_set1_epi8(0x0F));
    (_mm512_and_si512(q, low), _mm512_and_si512(_mm512_srli_epi16::<4>(q), low))
}

/// Which bytes of a register of four values of every row take a fifth bit: byte `j` of row
/// `r`'s lane where bit `first + j` of the row's word of fifth bits (lane `r` of `words`) is
/// set. `first` is a multiple of 4: the four bits lie in one byte of the word.
#[inline(always)]
unsafe fn fifth_bits_set(words: __m512i, first: usize) -> __mmask64 {
    let byte = _mm512_shuffle_epi8(words, _mm512_loadu_si512(BYTE_OF_LANE[2][first / 8].as_ptr() as *const _));
    let bits = if first.is_multiple_of(8) { 0x0804_0201 } else { 0x8040_2010u32 as i32 };
    _mm512_test_epi8_mask(byte, _mm512_set1_epi32(bits))
}

/// A [`BlockType::Q4KInterleaved`] super-block's scales and minimums, each sub-block's in a
/// register of one 32-bit lane per row, and its `d / 16` and `dmin`: the scales of the sub-blocks
/// of low nibbles times 16 (their codes are read as they are, the high nibbles' as 16 × theirs);
/// each minimum in both 16-bit halves of its lane (for `vpdpwssd` against the sums of a
/// sub-block's two halves). Unpacked as [`crate::blocks::q4_k_scales`] does, on every row's three
/// words at once.
#[inline(always)]
pub(super) unsafe fn interleaved_scales(block: *const u8) -> ([__m512i; 8], [__m512i; 8], __m512, __m512) {
    let (w0, w1, w2) = (word_at(block, 4), word_at(block, 8), word_at(block, 12));
    let (low6, low4, low2) = (_mm512_set1_epi32(0x3f3f_3f3f), _mm512_set1_epi32(0x0f0f_0f0f), _mm512_set1_epi32(0x0303_0303));
    // The top two bits of bytes 0..8, as bits 4 and 5 of the upper sub-blocks' scales and minimums.
    let (top0, top1) = (
        _mm512_and_si512(_mm512_srli_epi32::<2>(w0), _mm512_slli_epi32::<4>(low2)),
        _mm512_and_si512(_mm512_srli_epi32::<2>(w1), _mm512_slli_epi32::<4>(low2)),
    );
    let scales = [_mm512_and_si512(w0, low6), _mm512_or_si512(_mm512_and_si512(w2, low4), top0)];
    let mins = [_mm512_and_si512(w1, low6), _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(w2), low4), top1)];
    let (mut sub_scales, mut sub_mins) = ([_mm512_setzero_si512(); 8], [_mm512_setzero_si512(); 8]);
    for j in 0..8 {
        let byte = _mm512_loadu_si512(BYTE_OF_LANE[0][j % 4].as_ptr() as *const _);
        let scale = _mm512_shuffle_epi8(scales[j / 4], byte);
        sub_scales[j] = if j % 2 == 0 { _mm512_slli_epi32::<4>(scale) } else { scale };
        sub_mins[j] = _mm512_shuffle_epi8(mins[j / 4], _mm512_loadu_si512(BYTE_OF_LANE[1][j % 4].as_ptr() as *const _));
    }
    let (d, dmin) = (_mm512_mul_ps(f16s_at(block, 0), _mm512_set1_ps(1.0 / 16.0)), f16s_at(block, 2));
    (sub_scales, sub_mins, d, dmin)
}

/// The register of four bytes of every row at byte `at` of a 16-row layout's block at `block`
/// ([`interleaved_at`]).
#[inline(always)]
unsafe fn word_at(block: *const u8, at: usize) -> __m512i {
    _mm512_loadu_si512(block.add(interleaved_at(at)) as *const _)
}

/// The 16 rows' `f16` field at byte `at` of a 16-row layout's block at `block`, as `f32`s.
#[inline(always)]
pub(super) unsafe fn f16s_at(block: *const u8, at: usize) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(block.add(interleaved_at(at)) as *const _))
}

/// `codes` with `plus` added to each byte whose byte of `bits` has bit `bit` set: a code's high
/// bit (Q3_K's third, Q5_K's fifth) tested four values of every row at once.
#[inline(always)]
unsafe fn add_where_bit(codes: __m512i, bits: __m512i, bit: usize, plus: i8) -> __m512i {
    let set = _mm512_test_epi8_mask(bits, _mm512_set1_epi8((1u8 << bit) as i8));
    _mm512_mask_add_epi8(codes, set, codes, _mm512_set1_epi8(plus))
}

/// Four bytes of activations at `at`, in every 32-bit lane.
#[inline(always)]
unsafe fn broadcast_word(at: *const i8) -> __m512i {
    _mm512_set1_epi32((at as *const i32).read_unaligned())
}

/// `vpshufb` controls that put byte `k` of each 32-bit lane in the lane's low byte
/// (`[0][k]`), in the low byte of both its 16-bit halves (`[1][k]`), zeros elsewhere, or in all
/// four of its bytes (`[2][k]`).
static BYTE_OF_LANE: [[[i8; 64]; 4]; 3] = {
    let mut controls = [[[-128i8; 64]; 4]; 3];
    let mut k = 0;
    while k < 4 {
        let mut at = 0;
        while at < 64 {
            let byte = (at % 16 + k) as i8;
            controls[0][k][at] = byte;
            controls[1][k][at] = byte;
            controls[1][k][at + 2] = byte;
            let mut j = 0;
            while j < 4 {
                controls[2][k][at + j] = byte;
                j += 1;
            }
            at += 4;
        }
        k += 1;
    }
    controls
};

/// How far ahead this module's decode tiles ask for their weights: twice AVX2's
/// [`PREFETCH_BYTES`]. They take their bytes faster than AVX2's, so the same memory latency needs
/// a longer lead. AMD Zen 5, whole model (`llm bench`, paired rounds), decode tok/s, 4 → 8 KiB:
/// one thread, Llama 3.2 1B shape, Q8_0 25.5–27.1 → 27.2–29.2, Q4_0 38.8–42.5 → 41.8–44.7,
/// Q4_K_M 42.0–44.5 → 44.5–47.3, TinyLlama-shape Q5_K_M 44.7–45.7 → 48.5–49.6; two threads, in
/// the rounds where the VM's memory ran at the faster of its two speeds, Q8_0 37.8–38.5 →
/// 45.7–46.7 (TinyLlama shape 41.3–43.1 → 45.1–51.0), Q4_0 64.6–69.1 → 69.6–71.6, Q4_K_M
/// 70.6–73.1 → 73.9–76.1 (in the slower rounds, no different). 16 KiB was no better than 8.
/// AVX2's tiles on the same host gained nothing from 8 KiB (its Q8_0, which asks twice as far
/// already, lost at 16: 27.1–28.7 → 26.4–27.3 at one thread). A tile of one Q8_0 row (one stream
/// of weights a thread) was tried before this: two threads read it faster than two rows' streams
/// each at 4 KiB, but at 8 KiB it was slower than two rows at one thread (25.2–27.4 against
/// 28.8–29.4) and no faster at two, so it was not kept.
const AHEAD_BYTES: usize = 2 * PREFETCH_BYTES;

/// Activation rows per tile when a product has several, fewer than the panels take (a decode
/// step's tiles have one): the legacy types' tiles of four weight rows, the K-quants' of one.
const TILE_ACTS: usize = 4;

/// Weight rows of Q8_0's tile of one activation row (a decode step; a batch's last rows). Four
/// were fastest on weights in cache, but a whole model streams from memory, where fewer streams
/// at once read faster: on the Xeon, with two, decode ran at 1.1–1.4 × (Q4_0 at 2 threads
/// 18.4–18.7 → 22.8–27.6 tok/s, Q8_0 11.2–13.3 → 16.5–18.9); one row was about as
/// fast at one thread and slower at two. On the Zen 4, with the memory-order prefetch, four
/// were still slower for Q8_0 (one thread, paired: 13.6–14.7 → 10.5–11.4 tok/s).
const DECODE_ROWS: usize = 2;

/// [`product_rows`] through panels of groups of `G` values, against [`Interleaved`] activations
/// in tiles of [`TILE_ROWS`]: a tile's sums and the panel's registers of one group fill most of
/// the 32 registers. With `MIN`, the weights have minimums (the panel's offsets); without, a code
/// offset, which the activations' `offset_sums` bring. All the work item's panels are packed first (a few hundred KiB at most,
/// they stay in L2), so that each activation tile is read from memory once, however long the
/// prompt.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel_rows<const G: usize, const MIN: bool>(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    let acts = x.interleaved(G);
    let panels = Panel::all(w, rows);
    for tile in 0..x.rows().div_ceil(TILE_ROWS) {
        for (held, panel) in panels.iter() {
            let mask = ((1u32 << held.len()) - 1) as __mmask16;
            let sums = panel_tile::<G, MIN>(panel, acts, tile, w.cols / G, w.ty.block_values() / G);
            // The padding rows of the last tile are not stored.
            for (c, sum) in sums.iter().enumerate().take(x.rows() - tile * TILE_ROWS) {
                _mm512_mask_storeu_ps(out.add((tile * TILE_ROWS + c) * w.rows + held.start), mask, *sum);
            }
        }
    }
}

/// The outputs of a tile of activation rows against the 16 rows of a packed panel, whose
/// activations have a scale per `per_scale` groups (a block of the weights' type: 8 or 16 for the
/// K-quants). A run of groups that share the activations' scale adds its weight-scaled sums
/// first and meets that scale once: per group and activation row a conversion and a
/// multiply-add, not a multiply besides; and the runs' sums, apart from the total, make shorter
/// chains of dependent additions, which sped up the types with a run of one group too
/// (`--bench matmul -- m=128`, one thread, three rounds in turn, GFLOP/s: Q4_0 328–360 → 363–416,
/// Q8_0 313–381 → 346–408, Q4_K 320–358 → 335–391, Q6_K 253–264 → 292–319; whole TinyLlama-shape
/// model, paired runs, prefill tok/s: Q4_0 one thread 128 tokens 105–112 → 124–134, two threads
/// 512 tokens 204–213 → 228–233, Q8_0 201–210 → 213–214, Q4_K_M no different).
#[inline(always)]
unsafe fn panel_tile<const G: usize, const MIN: bool>(panel: &Panel, acts: &Interleaved, tile: usize, groups: usize, per_scale: usize) -> [__m512; TILE_ROWS] {
    let mut x = acts.values.as_ptr().add(tile * groups * G * TILE_ROWS);
    let mut x_scales = acts.scales.as_ptr().add(tile * groups * TILE_ROWS);
    let mut x_sums = acts.scaled_sums.as_ptr().add(tile * groups * TILE_ROWS);
    let mut offset_sums = acts.offset_sums.as_ptr().add(tile * groups * TILE_ROWS);
    let (mut values, mut scales, mut offsets) = (panel.values(), panel.scales.as_ptr(), panel.offsets.as_ptr());
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
    for _ in 0..groups / per_scale {
        let run_scales = x_scales;
        let mut run = [_mm512_setzero_ps(); TILE_ROWS];
        for _ in 0..per_scale {
            let mut sums: [__m512i; TILE_ROWS] = match MIN {
                true => [_mm512_setzero_si512(); TILE_ROWS],
                false => std::array::from_fn(|c| _mm512_set1_epi32(*offset_sums.add(c))),
            };
            for quad in 0..G / 4 {
                let u = _mm512_loadu_si512(values.add(quad * 4 * PANEL_ROWS) as *const __m512i);
                for c in 0..TILE_ROWS {
                    let four = (x.add((quad * TILE_ROWS + c) * 4) as *const i32).read_unaligned();
                    sums[c] = _mm512_dpbusd_epi32(sums[c], u, _mm512_set1_epi32(four));
                }
            }
            let (w_scales, w_offsets) = (_mm512_loadu_ps(scales), _mm512_loadu_ps(offsets));
            for c in 0..TILE_ROWS {
                run[c] = _mm512_fmadd_ps(w_scales, _mm512_cvtepi32_ps(sums[c]), run[c]);
                if MIN {
                    acc[c] = _mm512_fnmadd_ps(w_offsets, _mm512_set1_ps(*x_sums.add(c)), acc[c]);
                }
            }
            x = x.add(G * TILE_ROWS);
            (x_scales, x_sums, offset_sums) = (x_scales.add(TILE_ROWS), x_sums.add(TILE_ROWS), offset_sums.add(TILE_ROWS));
            values = values.add(G * PANEL_ROWS);
            (scales, offsets) = (scales.add(PANEL_ROWS), offsets.add(PANEL_ROWS));
        }
        for c in 0..TILE_ROWS {
            acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(*run_scales.add(c)), run[c], acc[c]);
        }
    }
    acc
}

/// How two 32-value weight blocks meet two activation blocks in one `vpdpbusd` (unsigned ×
/// signed bytes, four products summed into each 32-bit lane, added to a starting value that
/// corrects for the offset that made one side unsigned).
trait Block {
    const BYTES: usize;
    /// Whether the block has an `f16` minimum after its scale (value = d · q + m), which
    /// [`legacy_tile`] adds against the activations' sums.
    const MIN: bool = false;
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

/// Q4_0, Q4_1, Q5_0 and Q5_1: codes of four bits (five with `FIFTH_BIT`), less a code offset or
/// plus a minimum (with `MIN`).
struct Nibbles<const FIFTH_BIT: bool, const MIN: bool>;

impl<const FIFTH_BIT: bool, const MIN: bool> Nibbles<FIFTH_BIT, MIN> {
    const TY: BlockType = BlockType::nibbles(FIFTH_BIT, MIN);
    /// What the codes are less (nothing with a minimum).
    const CODE_OFFSET: i8 = match Self::TY.code_offset() {
        Some(code_offset) => code_offset,
        None => 0,
    };
}

impl<const FIFTH_BIT: bool, const MIN: bool> Block for Nibbles<FIFTH_BIT, MIN> {
    const BYTES: usize = Self::TY.block_bytes();
    const MIN: bool = MIN;
    /// `[q]`, the unsigned codes (see [`crate::blocks::legacy_code`]).
    #[inline(always)]
    unsafe fn weights(block: *const u8, two: bool) -> [__m512i; 2] {
        let (high_bits, nibbles_at) = legacy_layout(Self::TY);
        let nibbles = |block: *const u8| {
            let packed = _mm_loadu_si128(block.add(nibbles_at) as *const __m128i);
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed)
        };
        let second = if two { nibbles(block.add(Self::BYTES)) } else { _mm256_setzero_si256() };
        let mut q = _mm512_and_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(nibbles(block)), second), _mm512_set1_epi8(0x0F));
        if FIFTH_BIT {
            // Bit v of a block's word is value v's: byte v of the block's half of the register.
            let bits = |block: *const u8| u64::from((block.add(high_bits) as *const u32).read_unaligned());
            let fifth = bits(block) | if two { bits(block.add(Self::BYTES)) << 32 } else { 0 };
            q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(fifth, _mm512_set1_epi8(16)));
        }
        [q, _mm512_setzero_si512()]
    }
    /// `[x, −offset · Σx]`, the second shared by every weight row of the tile.
    #[inline(always)]
    unsafe fn activations(x: __m512i) -> [__m512i; 2] {
        let offset_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(Self::CODE_OFFSET), x);
        [x, _mm512_sub_epi32(_mm512_setzero_si512(), offset_sums)]
    }
    /// `q · x − offset · x = (q − offset) · x`.
    #[inline(always)]
    unsafe fn dot(w: &[__m512i; 2], x: &[__m512i; 2]) -> __m512i {
        _mm512_dpbusd_epi32(x[1], w[0], x[0])
    }
}

/// The nibble types' tiles: AVX-512's for several activation rows; for one (a decode step, or a
/// batch's rows left over from tiles of [`TILE_ACTS`]), four weight rows in [`decode_quads_tile`],
/// the rows left over in AVX2's tiles.
/// AVX2's tile took all of them before, which was faster on an AMD Zen 4, whose 512-bit instructions take two passes
/// through 256-bit units (whole model, decode, paired runs, one / two threads, tok/s: Q4_0
/// 16.7–16.8 / 31.3–31.6 → 22.7–23.4 / 38.1–40.0, Q4_1 16.0–16.9 / 29.2–29.3 → 25.0–25.4 /
/// 36.7–38.5, Q5_1 12.0–12.7 / 19.3–21.5 → 12.8–14.0 / 23.7–25.7, Q5_0 no different). Q8_0's
/// 512-bit tile stayed faster than AVX2's there (16.9–17.3 against 13.6–14.2 at one thread).
/// Taking a batch's last rows the same way (they went through AVX-512's tile of one row before)
/// was faster for Q4_0 and Q4_1 with 5 and 7 activation rows and for Q5_0 and Q5_1 with 7, no
/// different for Q5_1 with 5 and slower for Q5_0 with 5 (`cargo bench -p llm-kernels -- m=5`,
/// one thread, GFLOP/s over the four shapes, m=5 / m=7: Q4_0 77–79 → 88–89 / 56–67 → 83–86,
/// Q4_1 61–65 → 75–78 / 34–54 → 65–76, Q5_1 47–62 → 47–61 / 39–50 → 54–57, Q5_0 70–73 → 60–67 /
/// 47–59 → 59–63), one round on the Zen 4. On a Xeon (Emerald Rapids), whose 512-bit
/// instructions take one pass, AVX2's tile of four rows stayed the faster for Q4_0: in cache
/// (`ffn_up`, one thread) 58.6–58.8 against AVX-512's tile of two rows' 45.8–46.7 GFLOP/s, out
/// of memory no different (`--bench stream`, 19.0–20.6 against 19.9–21.0 GB/s at two threads).
/// Neither was [`decode_quads_tile`], measured on a Zen 5 only.
struct NibbleTiles<const FIFTH_BIT: bool, const MIN: bool>;

impl<const FIFTH_BIT: bool, const MIN: bool> Tile for NibbleTiles<FIFTH_BIT, MIN> {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        match CT {
            1 if RT == QUAD_ROWS => with_ahead_cache!(w, RT, decode_quads_tile::<FIFTH_BIT, MIN, L2>(w, x, r, i, out)),
            1 if avx2::takes_pairs::<avx2::Nibbles<FIFTH_BIT, MIN>>(RT, CT) => {
                with_ahead_cache!(w, RT, decode_pairs_tile::<avx2::Nibbles<FIFTH_BIT, MIN>, RT, L2>(w, x, r, i, out))
            }
            1 => <avx2::Nibbles<FIFTH_BIT, MIN> as Tile>::tile::<RT, 1>(w, x, r, i, out),
            _ => with_ahead_cache!(w, RT, legacy_tile::<Nibbles<FIFTH_BIT, MIN>, RT, CT, L2>(w, x, r, i, out)),
        }
    }
}

/// AVX2's decode tile of weight rows in pairs, its sums of four products by one 256-bit
/// `vpdpbusd` per half block instead of two `maddubs`, an addition and a `madd` for both: two
/// instructions of about eleven per pair of blocks. Since [`decode_quads_tile`] it takes only
/// the pair of rows a matrix may have left over after fours. Before that, one layer's product in cache (`--bench
/// matmul -- m=1`, one thread, two rounds, this set against the AVX2 set in the same run, which
/// ran the same code as this one before): Q4_0 75.7–82.2 against 66.8–72.3 GFLOP/s, Q4_1
/// 71.0–76.7 against 64.4–69.2. A whole model's decode on the Emerald Rapids Xeon, out of
/// memory, no different (`llm bench`, three rounds in turn: TinyLlama-shape Q4_0 22.6–23.2
/// against 22.2–22.8 tok/s at one thread, 41.1–44.5 against 42.3–43.2 at two). Not measured on
/// the Zen 4, where decode of Q4_0 was bound by instructions.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn decode_pairs_tile<W: avx2::Block, const RT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    avx2::decode_pairs::<W, Vnni, RT, L2>(w, x, r, i, out)
}

/// Weight rows of [`decode_quads_tile`]: one to each 128-bit lane.
const QUAD_ROWS: usize = 4;

/// A decode step's tile of four Q4_0 rows (Q4_1 with `MIN`, Q5_0 and Q5_1 with `FIFTH_BIT`), one
/// to each 128-bit lane of a 512-bit register: a block's 16 bytes of nibbles are its 32 codes, so two `vpdpbusd` against
/// the activation block's halves (each in every lane) add up a block of all four rows, and one
/// conversion and multiply-add scale them, where [`decode_pairs_tile`] takes twice as many for
/// two rows. Each block's scales come from the chunk's eight, all four rows' in two registers,
/// by one permutation. The offsets' (or minimums') terms stay per row in 256-bit sums apart.
///
/// On an AMD Zen 5 (512-bit instructions in one pass), against VNNI's pair tile, one thread:
/// one layer's product in cache (`--bench matmul -- m=1`, pinned to a core, two rounds), GFLOP/s,
/// Q4_0 113–122 → 133–144, Q4_1 109–116 → 124–134; out of memory (`--bench stream`, paired),
/// GB/s, Q4_0 29.0 → 31.8 (41.3 → 43.9 at two threads), Q4_1 30.2 → 31.8; whole model's decode
/// (`llm bench`, four rounds in turn), tok/s, TinyLlama-shape Q4_0 42.0–45.8 → 48.2–49.5 at one
/// thread, 59.5–62.9 → 63.1–66.5 at two, Llama 3.2 1B-shape Q4_0 36.0–38.0 → 39.4–40.6 and
/// 54.2–54.4 → 55.0–56.2. A batch's last rows (`-- m=5`, `m=7`) no slower. On a Zen 4, whose
/// 512-bit instructions take two passes, AVX2's tile stays faster for Q4_0 and Q4_1 (in cache,
/// Q4_0 69–73 against 72–75 GFLOP/s; out of memory, [`avx2_decodes_faster`]), which take it there.
/// Not measured on the Xeons. Q5_0 and Q5_1 (their
/// fifth bits a byte mask per block, added to the codes), against AVX2's tile, same
/// measures: in cache 61–68 → 84–91 GFLOP/s; out of memory 21.3–22.4 → 27.7–29.8 GB/s at one
/// thread, 39.2–41.9 → 42.8–46.5 at two; TinyLlama-shape decode (three rounds in turn), tok/s at
/// one / two threads, Q5_0 29.1–29.4 / 50.7–52.0 → 36.3–37.9 / 55.8–63.2, Q5_1 29.4–29.7 /
/// 51.3–51.8 → 36.8–37.1 / 51.3–55.5; a batch's last rows faster too (`m=5`, `m=7`: Q5_0
/// 98–138 → 130–162, Q5_1 92–119 → 115–125).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn decode_quads_tile<const FIFTH_BIT: bool, const MIN: bool, const L2: bool>(
    w: &QMatrix,
    x: &QuantizedRows,
    r: usize,
    i: usize,
    out: *mut f32,
) -> usize {
    let (weights, acts) = operands::<QUAD_ROWS, 1>(w, x, r, i);
    let (bytes, (high_bits, nibbles_at)) = (w.ty.block_bytes(), legacy_layout(w.ty));
    let blocks = w.cols / BLOCK;
    let ahead = tiles_ahead(w, QUAD_ROWS, AHEAD_BYTES);
    let low = _mm512_set1_epi8(0x0F);
    // Lane `a` of a block's scales is row `a`'s: element `k` of its chunk's eight, the four rows
    // in two tables of two rows each.
    let rows_at = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
    let mut acc = _mm512_setzero_ps();
    let mut offsets = [_mm256_setzero_ps(); QUAD_ROWS];
    for chunk in (0..blocks).step_by(8) {
        let n = (blocks - chunk).min(8);
        let (products, offset_terms) = avx2::chunk_scales::<avx2::Nibbles<FIFTH_BIT, MIN>, QUAD_ROWS, 1>(&weights, &acts, chunk, n);
        let tables = [0, 2].map(|a| {
            let (first, second) = (_mm512_castps_pd(_mm512_castps256_ps512(products[a][0])), _mm256_castps_pd(products[a + 1][0]));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(first, second))
        });
        if let Some(terms) = offset_terms {
            for (sums, term) in offsets.iter_mut().zip(terms) {
                *sums = _mm256_add_ps(*sums, term[0]);
            }
        }
        for k in 0..n {
            let b = chunk + k;
            prefetch_ahead::<L2>(weights[0], b, QUAD_ROWS * bytes, ahead);
            let xv = acts[0].1.as_ptr().add(b * BLOCK);
            let x_halves = [0, 16].map(|at| _mm512_broadcast_i32x4(_mm_loadu_si128(xv.add(at) as *const __m128i)));
            let lane = |a: usize| _mm_loadu_si128(weights[a].add(b * bytes + nibbles_at) as *const __m128i);
            let packed = _mm512_inserti32x4::<3>(_mm512_inserti32x4::<2>(_mm512_inserti32x4::<1>(_mm512_castsi128_si512(lane(0)), lane(1)), lane(2)), lane(3));
            let mut codes = [_mm512_and_si512(packed, low), _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low)];
            if FIFTH_BIT {
                // Bit `j` of a row's 32 is code `j`'s fifth: the low 16 bits go with the low
                // nibbles, the high 16 with the high, each row's in its lane of a byte mask.
                let bits = |a: usize| u64::from((weights[a].add(b * bytes + high_bits) as *const u32).read_unaligned());
                let (b0, b1, b2, b3) = (bits(0), bits(1), bits(2), bits(3));
                let lows = (b0 & 0xFFFF) | (b1 & 0xFFFF) << 16 | (b2 & 0xFFFF) << 32 | (b3 & 0xFFFF) << 48;
                let highs = b0 >> 16 | (b1 >> 16) << 16 | (b2 >> 16) << 32 | (b3 >> 16) << 48;
                let sixteen = _mm512_set1_epi8(16);
                codes = [_mm512_mask_add_epi8(codes[0], lows, codes[0], sixteen), _mm512_mask_add_epi8(codes[1], highs, codes[1], sixteen)];
            }
            let sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[0], x_halves[0]), codes[1], x_halves[1]);
            let scales = _mm512_permutex2var_ps(tables[0], _mm512_add_epi32(rows_at, _mm512_set1_epi32(k as i32)), tables[1]);
            acc = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(sums), acc);
        }
    }
    let lanes = [_mm512_castps512_ps128(acc), _mm512_extractf32x4_ps::<1>(acc), _mm512_extractf32x4_ps::<2>(acc), _mm512_extractf32x4_ps::<3>(acc)];
    for (a, (lane, offset)) in lanes.into_iter().zip(offsets).enumerate() {
        *out.add(i * w.rows + r + a) = avx2::hsum4(lane) + avx2::hsum(offset);
    }
    QUAD_ROWS
}

/// A K-quant whose tiles are one weight row in 512-bit registers against one activation row (a
/// decode step) or a few (a small batch's decode step, below the panels).
trait DecodeRow {
    /// # Safety
    /// As [`Tile::tile`] of one weight row and `CT` activation rows.
    unsafe fn row<const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize;
}

/// The tiles of a [`DecodeRow`] type.
struct RowTiles<K, const L2: bool>(std::marker::PhantomData<K>);

impl<K: DecodeRow, const L2: bool> Tile for RowTiles<K, L2> {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        debug_assert_eq!(RT, 1, "a K-quant's tile is one weight row");
        K::row::<CT, L2>(w, x, r, i, out)
    }
}

/// Q4_K, and Q5_K with `FIFTH_BIT`.
struct KNibbles<const FIFTH_BIT: bool>;

impl<const FIFTH_BIT: bool> DecodeRow for KNibbles<FIFTH_BIT> {
    #[inline(always)]
    unsafe fn row<const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        q4_k_tile::<FIFTH_BIT, CT, L2>(w, x, r, i, out)
    }
}

/// Q2_K, Q3_K and Q6_K.
struct Sixteens<S>(std::marker::PhantomData<S>);

impl<S: PairedRuns> DecodeRow for Sixteens<S> {
    #[inline(always)]
    unsafe fn row<const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        sixteens_tile::<S, CT, L2>(w, x, r, i, out)
    }
}

/// A tile of one Q4_K row, or of a Q5_K row when `FIFTH_BIT`, by `CT` activation rows (one for a
/// decode step, [`TILE_ACTS`] for a small batch's, or the two or three it leaves): AVX2's (its block's scales unpacked by
/// [`avx2::q4_k_block_scales`], each sub-block's sums scaled as integers), two pairs of
/// sub-blocks to a 512-bit register, unpacked once for all the tile's activation rows. A small
/// batch's rows went through AVX2's tile of two weight rows by four, which asked for nothing
/// ahead; whole model, two threads, TinyLlama-shape Q4_K_M (`batch_throughput.py`, 4 and 6
/// requests, two rounds in turn, this tile and [`sixteens_tile`]'s alike): 52.1–53.4 →
/// 138.7–150.8 and 70.1–70.8 → 138.8–141.7 tok/s. In cache, one thread, `ffn_up`, 4 rows,
/// GFLOP/s: Q4_K 171 → 238, Q5_K 137 → 217. Q4_K, on an AMD Zen 5 (512-bit instructions
/// in one pass), one thread, against AVX2's tile: one layer's product in cache (`--bench matmul -- m=1`, pinned,
/// two rounds), GFLOP/s, 114–123 → 142–165 (a batch's last rows, `m=5` and `m=7`, 124–148 →
/// 151–165); out of memory (`--bench stream`, three rounds in turn), GB/s, 30.2–30.7 → 32.9–34.5
/// at one thread, 46.2–47.4 → 46.0–57.2 at two; a whole model's decode (`llm bench`, four rounds
/// in turn), tok/s at one / two threads, TinyLlama-shape Q4_K_M 40.3–44.0 / 67.1–72.0 →
/// 43.7–48.4 / 65.0–76.1, Llama 3.2 1B-shape 36.0–36.6 / 53.0–57.5 → 38.1–39.6 / 53.5–62.5.
/// Two rows, one to each half of a register, ran faster still in cache (154–173 GFLOP/s) and at
/// one thread out of memory, but slower at two (48.5–50.5 → 44.5–46.1 GB/s; two streams of
/// weights a thread). On a Zen 4, whose 512-bit instructions take two passes, it is slower than
/// AVX2's (in cache, `m=1`, 78–86 against 87–96 GFLOP/s; out of memory, [`avx2_decodes_faster`]),
/// which takes a decode step there. Not measured on the Xeons. Q5_K, same
/// measures: in cache 89–96 → 128–147 GFLOP/s; out of memory 28.2–29.7 → 34.7–35.8 GB/s at one
/// thread, 50.2–52.4 → 51.5–61.0 at two; TinyLlama-shape Q5_K_M decode 38.5–39.0 / 63.3–65.4 →
/// 45.3–45.9 / 72.7–75.6 tok/s.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_tile<const FIFTH_BIT: bool, const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (bytes, nibbles_at) = avx2::q4_k_layout(FIFTH_BIT);
    let (weights, acts) = operands::<1, CT>(w, x, r, i);
    let ahead = tiles_ahead(w, 1, AHEAD_BYTES);
    let load = |at: *const i8| _mm256_loadu_si256(at as *const __m256i);
    // Sub-block `j` of a pair `p` is `2p + j`; a register's halves hold pairs `2h` and `2h + 1`.
    let pick = |h: usize, j: usize| halves(_mm256_set1_epi16(avx2::byte_as_i16(4 * h + j)), _mm256_set1_epi16(avx2::byte_as_i16(4 * h + 2 + j)));
    let low = _mm512_set1_epi8(0x0F);
    let mut scaled = [_mm512_setzero_ps(); CT];
    let mut minimums = [_mm256_setzero_ps(); CT];
    for b in 0..w.cols / SUPER_BLOCK {
        prefetch_ahead::<L2>(weights[0], b, bytes, ahead);
        let block = weights[0].add(b * bytes);
        let (d, scales, mins) = avx2::q4_k_block_scales(block);
        let scales = _mm512_broadcast_i64x4(scales);
        let high = _mm512_broadcast_i64x4(avx2::q4_k_high_bits::<FIFTH_BIT>(block));
        let mut sums = [_mm512_setzero_si512(); CT];
        for h in 0..2 {
            let q = _mm512_loadu_si512(block.add(nibbles_at + 64 * h) as *const __m512i);
            let mut codes = [_mm512_and_si512(q, low), _mm512_and_si512(_mm512_srli_epi16::<4>(q), low)];
            if FIFTH_BIT {
                // Q5_K's fifth bit of sub-block `s` is bit `s` of its high bytes.
                for (j, codes) in codes.iter_mut().enumerate() {
                    *codes = _mm512_or_si512(*codes, byte_bits::<4>(high, 4 * h + j, 4 * h + 2 + j));
                }
            }
            let xp = acts.map(|(_, xq, _)| xq.as_ptr().add(b * SUPER_BLOCK + 128 * h));
            for (j, codes) in codes.into_iter().enumerate() {
                let sub_scales = _mm512_shuffle_epi8(scales, pick(h, j));
                for (sums, xp) in sums.iter_mut().zip(xp) {
                    let x = halves(load(xp.add(BLOCK * j)), load(xp.add(64 + BLOCK * j)));
                    *sums = _mm512_add_epi32(*sums, _mm512_madd_epi16(_mm512_maddubs_epi16(codes, x), sub_scales));
                }
            }
        }
        for (c, (x_scales, _, x_sums)) in acts.iter().enumerate() {
            let scaled_d = _mm_mul_ps(d, _mm_set1_ps(*x_scales.get_unchecked(b)));
            scaled[c] = _mm512_fmadd_ps(_mm512_broadcastss_ps(scaled_d), _mm512_cvtepi32_ps(sums[c]), scaled[c]);
            // The eight sub-blocks' sums of activations, against their eight minimums.
            let block_sums = _mm256_loadu_si256(x_sums.as_ptr().add(b * 8) as *const __m256i);
            let scaled_dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(scaled_d));
            minimums[c] = _mm256_fmadd_ps(scaled_dmin, _mm256_cvtepi32_ps(_mm256_mullo_epi32(mins, block_sums)), minimums[c]);
        }
    }
    for c in 0..CT {
        *out.add((i + c) * w.rows + r) = hsum(scaled[c]) - avx2::hsum(minimums[c]);
    }
    1
}

/// A tile of one row of a type with a scale per 16 values (Q2_K, Q3_K, Q6_K), by `CT` activation
/// rows as [`q4_k_tile`]'s (in cache, one thread, `ffn_up`, 4 rows, GFLOP/s: Q6_K 132 → 256,
/// Q3_K 131 → 229, Q2_K 157 → 242): AVX2's (each run of 32 values' sums scaled as integers by
/// its two scales, the code offset or the minimums taken once per block), two runs to a 512-bit
/// register ([`PairedRuns`]).
/// Q6_K, on an AMD Zen 5, one thread, against AVX2's tile: one layer's product in cache (`--bench
/// matmul -- m=1`, pinned, two rounds), GFLOP/s, 95–102 → 127–141 (AVX-512's tile pairing
/// sub-blocks had been 20 % faster than AVX2's on an earlier machine, and was left out as Q6_K
/// is a minor part of a Q4_K_M file); out of memory (`--bench stream`, three rounds in turn),
/// GB/s, 32.9–33.6 → 36.6–37.4 at one thread, 50.6–61.6 → 62.5–66.3 at two; a whole model's
/// decode (`llm bench`, four rounds in turn), tok/s at one / two threads, TinyLlama-shape Q4_K_M
/// 49.2–50.5 / 70.2–81.0 → 50.4–51.5 / 72.9–82.4, Llama 3.2 1B-shape 39.5–40.4 / 59.7–65.5 →
/// 40.6–42.2 / 61.0–70.5. Shared with Q2_K and Q3_K (and Q6_K's codes from [`PairedRuns`]),
/// same measures, against AVX2's tile: in cache, GFLOP/s, Q2_K 110–116 → 124–135, Q3_K 82–86 →
/// 116–123, Q6_K 97–102 → 148–154; out of memory (two rounds in turn), GB/s at one / two threads,
/// Q2_K 17.3–18.5 / 33.4–33.9 → 22.1–22.6 / 39.1–40.2, Q3_K 16.5–17.5 / 31.9–32.9 → 24.2–25.4 /
/// 43.7–44.3; TinyLlama-shape decode (three rounds in turn), tok/s, Q2_K 44.0–45.4 / 73.1–75.1 →
/// 55.1–57.2 / 86.6–90.1, Q3_K_M 41.5–43.3 / 64.9–66.7 → 52.9–53.8 / 74.0–77.6. On a Zen 4 it
/// is faster in cache (`m=1`, Q6_K 74–79 against 68–71 GFLOP/s) but slower out of memory for Q6_K
/// and Q2_K, whose decode steps take AVX2's tile there ([`avx2_decodes_faster`]). Not measured on
/// the Xeons.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn sixteens_tile<S: PairedRuns, const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (weights, acts) = operands::<1, CT>(w, x, r, i);
    let mut x_sums16: [&[i16]; CT] = [&[]; CT];
    for (c, sums) in x_sums16.iter_mut().enumerate() {
        *sums = x.sums16(i + c);
    }
    let ahead = tiles_ahead(w, 1, AHEAD_BYTES);
    // Scale `j` of a half into every `i16` of 128-bit lane `j - first`.
    let lanes_from = |first: usize| {
        let lane = |j: usize| _mm_set1_epi16(avx2::broadcast_i16(first + j));
        halves(_mm256_set_m128i(lane(1), lane(0)), _mm256_set_m128i(lane(3), lane(2)))
    };
    let mut acc = [_mm256_setzero_ps(); CT];
    for b in 0..w.cols / SUPER_BLOCK {
        prefetch_ahead::<L2>(weights[0], b, S::BYTES, ahead);
        let block = weights[0].add(b * S::BYTES);
        let (scales, mins) = S::scales(block);
        let mut sums = [_mm512_setzero_si512(); CT];
        for half in 0..2 {
            let half_scales = _mm512_broadcast_i32x4(_mm_cvtepi8_epi16(if half == 0 { scales } else { _mm_unpackhi_epi64(scales, scales) }));
            for (two_runs, codes) in S::paired_runs(block, half).into_iter().enumerate() {
                let run_scales = _mm512_shuffle_epi8(half_scales, lanes_from(4 * two_runs));
                for (c, (_, xq, _)) in acts.iter().enumerate() {
                    let x = _mm512_loadu_si512(xq.as_ptr().add(b * SUPER_BLOCK + 128 * half + 64 * two_runs) as *const __m512i);
                    sums[c] = _mm512_add_epi32(sums[c], _mm512_madd_epi16(_mm512_maddubs_epi16(codes, x), run_scales));
                }
            }
        }
        let (d, dmin) = S::d(block);
        for (c, ((x_scales, _, _), x_sums16)) in acts.iter().zip(x_sums16).enumerate() {
            let sums = _mm256_add_epi32(_mm512_castsi512_si256(sums[c]), _mm512_extracti64x4_epi64::<1>(sums[c]));
            // As in AVX2's tile: the code offset's part or the minimums', from the activations'
            // sixteen sums.
            let x_sums = _mm256_loadu_si256(x_sums16.as_ptr().add(16 * b) as *const __m256i);
            let dx = *x_scales.get_unchecked(b);
            match S::CODE_OFFSET {
                Some(offset) => {
                    let offset_scales = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(scales), _mm256_set1_epi16(offset.into()));
                    let codes_sums = _mm256_sub_epi32(sums, _mm256_madd_epi16(offset_scales, x_sums));
                    acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(codes_sums), acc[c]);
                }
                None => {
                    acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sums), acc[c]);
                    let minimums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_cvtepu8_epi16(mins), x_sums));
                    acc[c] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), minimums, acc[c]);
                }
            }
        }
    }
    for (c, acc) in acc.into_iter().enumerate() {
        *out.add((i + c) * w.rows + r) = avx2::hsum(acc);
    }
    1
}

/// Two 256-bit registers as the halves of one.
#[inline(always)]
unsafe fn halves(first: __m256i, second: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second)
}

/// Each half of `bytes` shifted right within its 16-bit elements, by `first` and by `second`.
#[inline(always)]
unsafe fn shifted_halves(bytes: __m512i, first: i16, second: i16) -> __m512i {
    _mm512_srlv_epi16(bytes, halves(_mm256_set1_epi16(first), _mm256_set1_epi16(second)))
}

/// Bit `first` of every byte of the low half of `bytes` and bit `second` of the high half's,
/// each moved to bit `TO` and alone in its byte (AVX2's `byte_bit`, a bit per half).
#[inline(always)]
unsafe fn byte_bits<const TO: u32>(bytes: __m512i, first: usize, second: usize) -> __m512i {
    let lowest = _mm512_and_si512(shifted_halves(bytes, first as i16, second as i16), _mm512_set1_epi8(1));
    _mm512_slli_epi16::<TO>(lowest)
}

/// A type with a scale per 16 values, its codes two runs of 32 values to a register.
trait PairedRuns: avx2::Sixteens {
    /// The codes of runs 0 and 1 of `half` (values `128 · half + 0..64`), then of runs 2 and 3,
    /// as unsigned bytes.
    ///
    /// # Safety
    /// `block` points to a whole block; AVX-512 BW is available.
    unsafe fn paired_runs(block: *const u8, half: usize) -> [__m512i; 2];
}

/// Bit pairs 0 and 1 of each of 32 bytes (in both halves), then pairs 2 and 3.
#[inline(always)]
unsafe fn two_bit_runs(packed: *const u8) -> [__m512i; 2] {
    let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(packed as *const __m256i));
    [(0, 2), (4, 6)].map(|(first, second)| _mm512_and_si512(shifted_halves(q, first, second), _mm512_set1_epi8(3)))
}

impl PairedRuns for avx2::Q2K {
    #[inline(always)]
    unsafe fn paired_runs(block: *const u8, half: usize) -> [__m512i; 2] {
        two_bit_runs(block.add(16 + 32 * half))
    }
}

impl PairedRuns for avx2::Q3K {
    /// Run `r` of `half` takes bit `4 · half + r` of the 32 high bytes as its third.
    #[inline(always)]
    unsafe fn paired_runs(block: *const u8, half: usize) -> [__m512i; 2] {
        let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(block as *const __m256i));
        let third_bits = |run: usize| byte_bits::<2>(high, 4 * half + run, 4 * half + run + 1);
        let runs = two_bit_runs(block.add(32 + 32 * half));
        [_mm512_or_si512(runs[0], third_bits(0)), _mm512_or_si512(runs[1], third_bits(2))]
    }
}

impl PairedRuns for avx2::Q6K {
    /// A half block's low nibbles are two 32-byte runs in a row, so one load takes both; their
    /// high bits come from the same 32 bytes in both halves: runs 0 and 1 take bits 0–1 and 2–3
    /// of the high bytes, runs 2 and 3 bits 4–5 and 6–7, all to bits 4–5.
    #[inline(always)]
    unsafe fn paired_runs(block: *const u8, half: usize) -> [__m512i; 2] {
        let (low, high_bits) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let ql = _mm512_loadu_si512(block.add(64 * half) as *const __m512i);
        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(128 + 32 * half) as *const __m256i));
        let up = halves(_mm256_set1_epi16(4), _mm256_set1_epi16(2));
        [
            _mm512_or_si512(_mm512_and_si512(ql, low), _mm512_and_si512(_mm512_sllv_epi16(qh, up), high_bits)),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), low), _mm512_and_si512(shifted_halves(qh, 0, 2), high_bits)),
        ]
    }
}

/// Sums of four products in one instruction (exact: AVX2's `i16` pairs do not saturate for
/// these blocks either).
struct Vnni;

impl avx2::Dot for Vnni {
    #[inline(always)]
    unsafe fn sums<W: avx2::Block>(pair: &[[__m256i; 2]; 2], halves: &[__m256i; 2]) -> __m256i {
        let (low, high) = (W::operands(&pair[0], halves[0]), W::operands(&pair[1], halves[1]));
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), low.0, low.1), high.0, high.1)
    }
}

/// The tiles of a [`Block`] type (a wrapper, since the AVX2 module's blocks are tiles too).
struct Legacy<W>(std::marker::PhantomData<W>);

impl<W: Block> Tile for Legacy<W> {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        with_ahead_cache!(w, RT, legacy_tile::<W, RT, CT, L2>(w, x, r, i, out))
    }
}

/// The tile of a 32-value block type, two blocks at a time: each pair's integer sums are scaled
/// into `f32` by the pair's scales, one per half of the register.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn legacy_tile<W: Block, const RT: usize, const CT: usize, const L2: bool>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let blocks = w.cols / BLOCK;
    let ahead = tiles_ahead(w, RT, AHEAD_BYTES);
    let mut acc = [[_mm512_setzero_ps(); CT]; RT];
    // Scales sixteen blocks at a time: one gather and conversion for the weights', one load for
    // the activations', then a permutation per pair of blocks (loaded one by one, the `f16`
    // scales cost more than the products).
    for chunk in (0..blocks).step_by(16) {
        let n = (blocks - chunk).min(16);
        let in_chunk = ((1u32 << n) - 1) as __mmask16;
        let w_scales: [__m512; RT] = std::array::from_fn(|a| f16_scales::<W>(weights[a].add(chunk * W::BYTES), in_chunk));
        let x_scales: [__m512; CT] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(in_chunk, acts[c].0.as_ptr().add(chunk)));
        if W::MIN {
            // Each block's minimum meets the activations' sum of the block: a lane per block.
            for c in 0..CT {
                let x_sums = _mm512_mul_ps(x_scales[c], _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(in_chunk, acts[c].2.as_ptr().add(chunk))));
                for a in 0..RT {
                    acc[a][c] = _mm512_fmadd_ps(f16_scales::<W>(weights[a].add(chunk * W::BYTES + 2), in_chunk), x_sums, acc[a][c]);
                }
            }
        }
        for pair in 0..n.div_ceil(2) {
            let b = chunk + 2 * pair;
            let two = b + 1 < blocks;
            let spread = _mm512_loadu_si512(PAIR_LANES[pair].as_ptr() as *const __m512i);
            let mut wv = [[_mm512_setzero_si512(); 2]; RT];
            let mut scales = [_mm512_setzero_ps(); RT];
            prefetch_ahead::<L2>(weights[0], b / 2, RT * 2 * W::BYTES, ahead);
            for a in 0..RT {
                let block = weights[a].add(b * W::BYTES);
                wv[a] = W::weights(block, two);
                scales[a] = _mm512_permutexvar_ps(spread, w_scales[a]);
            }
            // The activations are contiguous: one (masked) load takes both blocks.
            let mask = if two { u64::MAX } else { u64::from(u32::MAX) };
            for c in 0..CT {
                let xv = W::activations(_mm512_maskz_loadu_epi8(mask, acts[c].1.as_ptr().add(b * BLOCK)));
                let dx = _mm512_permutexvar_ps(spread, x_scales[c]);
                for a in 0..RT {
                    let sums = _mm512_cvtepi32_ps(W::dot(&wv[a], &xv));
                    acc[a][c] = _mm512_fmadd_ps(_mm512_mul_ps(scales[a], dx), sums, acc[a][c]);
                }
            }
        }
    }
    store(&acc, hsum, w, r, i, out)
}

/// `permutexvar` indices that spread scales `2p` and `2p + 1` of sixteen over the low and the
/// high eight lanes: pair `p`'s scales for its two blocks.
const PAIR_LANES: [[i32; 16]; 8] = {
    let mut lanes = [[0; 16]; 8];
    let mut p = 0;
    while p < 8 {
        let mut l = 0;
        while l < 16 {
            lanes[p][l] = (2 * p + l / 8) as i32;
            l += 1;
        }
        p += 1;
    }
    lanes
};

/// The `f16`s at `first`, `first + BYTES`, … that `blocks` keeps (the others zero), as sixteen
/// `f32`: from a block's start its scale, from two bytes on Q4_1's and Q5_1's minimum.
#[inline(always)]
unsafe fn f16_scales<W: Block>(first: *const u8, blocks: __mmask16) -> __m512 {
    const { assert!(W::BYTES >= 6, "the gather reads four bytes from each block, two bytes on for a minimum") };
    let offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(W::BYTES as i32));
    // Each lane reads the `f16` and the block's next two bytes; the conversion keeps the `f16`.
    let words = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), blocks, offsets, first as *const i32);
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words))
}

#[inline(always)]
unsafe fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_family_0x19_is_read_from_cpuid() {
        let vendor = |name: &[u8; 12]| {
            let word = |at: usize| u32::from_le_bytes(name[at..at + 4].try_into().unwrap());
            CpuidResult { eax: 0x10, ebx: word(0), edx: word(4), ecx: word(8) }
        };
        let (amd, intel) = (vendor(b"AuthenticAMD"), vendor(b"GenuineIntel"));
        // Signatures as leaf 1 reports them: EPYC 9004 (Zen 4), EPYC 9005 (Zen 5), Xeon
        // (Sapphire Rapids).
        assert!(is_amd_family_0x19(&amd, 0x00A1_0F11));
        assert!(!is_amd_family_0x19(&amd, 0x00B0_0F21));
        assert!(!is_amd_family_0x19(&intel, 0x0008_06F8));
        // A family 0x19 signature from another vendor is not AMD's.
        assert!(!is_amd_family_0x19(&intel, 0x00A1_0F11));
    }
}
