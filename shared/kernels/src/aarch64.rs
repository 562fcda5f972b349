//! aarch64 kernels: NEON with the dot-product instruction `sdot`, which every arm64 Lambda host
//! (Graviton2 and later) has.
//!
//! One tile serves every block type. Each weight block is unpacked once per tile into signed
//! 8-bit codes, sixteen to a register, with an integer scale per group of codes and, for the
//! types that have them, a minimum per 16 codes. `sdot` then multiplies 16 codes by 16
//! activation bytes into four 32-bit lanes, so a block's sums stay integers until one conversion
//! to `f32` per block and activation row, as on x86.
//!
//! Checked under qemu-user (`infra/arm64/test.sh`), where speed means nothing: the tile shapes
//! are AVX2's ([`crate::tiles::PROMPT`]), not measured on a Graviton.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use crate::activations::QuantizedRows;
use crate::blocks::{self, legacy_layout, q3_k_high_bit_at, q3_k_scales, q4_k_scales, two_bit_code_at, BlockType};
use crate::tiles::{decode_rows, operands, rows_of, store, Tile, PROMPT};
use crate::QMatrix;

pub fn detected() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// Columns `rows` of every output row (see [`crate::product_rows`]).
///
/// # Safety
/// [`detected`] is true; `out` as in [`crate::product_rows`].
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn product_rows(w: &QMatrix, x: &QuantizedRows, rows: Range<usize>, out: *mut f32) {
    const R: usize = PROMPT.0;
    const C: usize = PROMPT.1;
    match w.ty {
        BlockType::Q8_0 => rows_of::<Q8_0, R, C, { decode_rows(BlockType::Q8_0) }>(w, x, rows, out),
        BlockType::Q4_0 => rows_of::<Nibbles<false, false>, R, C, { decode_rows(BlockType::Q4_0) }>(w, x, rows, out),
        BlockType::Q4_1 => rows_of::<Nibbles<false, true>, R, C, { decode_rows(BlockType::Q4_1) }>(w, x, rows, out),
        BlockType::Q5_0 => rows_of::<Nibbles<true, false>, R, C, { decode_rows(BlockType::Q5_0) }>(w, x, rows, out),
        BlockType::Q5_1 => rows_of::<Nibbles<true, true>, R, C, { decode_rows(BlockType::Q5_1) }>(w, x, rows, out),
        BlockType::Q2K => rows_of::<Q2K, R, C, { decode_rows(BlockType::Q2K) }>(w, x, rows, out),
        BlockType::Q3K => rows_of::<Q3K, R, C, { decode_rows(BlockType::Q3K) }>(w, x, rows, out),
        BlockType::Q4K => rows_of::<Q4K<false>, R, C, { decode_rows(BlockType::Q4K) }>(w, x, rows, out),
        BlockType::Q5K => rows_of::<Q4K<true>, R, C, { decode_rows(BlockType::Q5K) }>(w, x, rows, out),
        BlockType::Q6K => rows_of::<Q6K, R, C, { decode_rows(BlockType::Q6K) }>(w, x, rows, out),
        _ => unreachable!("x86's layouts: `crate::product_rows` takes them"),
    }
}

/// A weight block unpacked: value `16·g + l` is lane `l` of `codes[g]`, and the block is
/// `d · Σ_s scales[s] · (codes of scale group s) − dmin · Σ_g mins[g] · (group g)` (Q4_1 and
/// Q5_1: `− dmin · (the block)`, one minimum for all 32 values).
#[derive(Clone, Copy)]
struct Unpacked {
    codes: [int8x16_t; 16],
    scales: [i32; 16],
    /// Minimums of groups 0..8 and 8..16 (K-quants with minimums only).
    mins: [int16x8_t; 2],
    d: f32,
    dmin: f32,
}

/// A block type as the shared tile reads it.
trait Block {
    const TY: BlockType;
    /// Groups of 16 values per block.
    const GROUPS: usize = Self::TY.block_values() / 16;
    /// Consecutive groups that share one of [`Unpacked::scales`]: the legacy types have one
    /// scale per block, Q4_K and Q5_K one per 32 values, the others one per 16.
    const PER_SCALE: usize = match Self::TY {
        BlockType::Q2K | BlockType::Q3K | BlockType::Q6K => 1,
        _ => 2,
    };
    /// Whether the block subtracts `dmin · mins`, a minimum per group.
    const MINS: bool = matches!(Self::TY, BlockType::Q2K | BlockType::Q4K | BlockType::Q5K);

    /// # Safety
    /// `block` points to a whole block; NEON is available.
    unsafe fn unpack(block: *const u8, into: &mut Unpacked);
}

impl<W: Block> Tile for W {
    #[inline(always)]
    unsafe fn tile<const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
        block_tile::<W, RT, CT>(w, x, r, i, out)
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn block_tile<W: Block, const RT: usize, const CT: usize>(w: &QMatrix, x: &QuantizedRows, r: usize, i: usize, out: *mut f32) -> usize {
    let (weights, acts) = operands::<RT, CT>(w, x, r, i);
    let (bytes, values) = (W::TY.block_bytes(), W::TY.block_values());
    let sums16: [&[i16]; CT] = std::array::from_fn(|c| x.sums16(i + c));
    let mut acc = [[vdupq_n_f32(0.0); CT]; RT];
    // SAFETY: every field is plain numbers, for which zero bits are a value.
    let mut weight_blocks = [std::mem::zeroed::<Unpacked>(); RT];
    for b in 0..w.cols / values {
        for a in 0..RT {
            W::unpack(weights[a].add(b * bytes), &mut weight_blocks[a]);
        }
        for c in 0..CT {
            let (xd, xq, xsums) = acts[c];
            let xq = xq.as_ptr().add(b * values);
            let xs: [int8x16_t; 16] = std::array::from_fn(|g| if g < W::GROUPS { vld1q_s8(xq.add(16 * g)) } else { vdupq_n_s8(0) });
            let dx = *xd.get_unchecked(b);
            // The activation's sums of 16 values, which every weight row's minimums meet.
            let [low, high] = match W::MINS {
                true => [vld1q_s16(sums16[c].as_ptr().add(b * 16)), vld1q_s16(sums16[c].as_ptr().add(b * 16 + 8))],
                false => [vdupq_n_s16(0); 2],
            };
            for (a, unpacked) in weight_blocks.iter().enumerate() {
                let mut sum = vdupq_n_s32(0);
                for s in 0..W::GROUPS / W::PER_SCALE {
                    let mut group = vdupq_n_s32(0);
                    for g in s * W::PER_SCALE..(s + 1) * W::PER_SCALE {
                        group = sdot(group, unpacked.codes[g], xs[g]);
                    }
                    sum = vmlaq_n_s32(sum, group, unpacked.scales[s]);
                }
                acc[a][c] = vfmaq_n_f32(acc[a][c], vcvtq_f32_s32(sum), unpacked.d * dx);
                if W::MINS {
                    let [m0, m1] = unpacked.mins;
                    let mut mins = vmull_s16(vget_low_s16(m0), vget_low_s16(low));
                    mins = vmlal_high_s16(mins, m0, low);
                    mins = vmlal_s16(mins, vget_low_s16(m1), vget_low_s16(high));
                    mins = vmlal_high_s16(mins, m1, high);
                    acc[a][c] = vfmaq_n_f32(acc[a][c], vcvtq_f32_s32(mins), -unpacked.dmin * dx);
                }
                if W::TY.has_minimum() {
                    // The block's one minimum meets the activation's sum of its 32 values: in
                    // one lane, as `hsum` adds them all.
                    let x_sum = vsetq_lane_f32::<0>(*xsums.get_unchecked(b) as f32, vdupq_n_f32(0.0));
                    acc[a][c] = vfmaq_n_f32(acc[a][c], x_sum, -unpacked.dmin * dx);
                }
            }
        }
    }
    store(&acc, hsum, w, r, i, out)
}

/// `acc + a · b` by groups of four bytes into each 32-bit lane (`sdot`; its intrinsic is not
/// stable Rust yet).
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

#[inline(always)]
unsafe fn hsum(v: float32x4_t) -> f32 {
    vaddvq_f32(v)
}

#[inline(always)]
unsafe fn f16_at(block: *const u8, at: usize) -> f32 {
    blocks::f16_at(std::slice::from_raw_parts(block, at + 2), at)
}

/// Bytes `at..at + 16` of `block`.
#[inline(always)]
unsafe fn bytes16(block: *const u8, at: usize) -> uint8x16_t {
    vld1q_u8(block.add(at))
}

/// `codes − offset` as signed codes.
#[inline(always)]
unsafe fn centred(codes: uint8x16_t, offset: u8) -> int8x16_t {
    vreinterpretq_s8_u8(vsubq_u8(codes, vdupq_n_u8(offset)))
}

/// `0xFF` in the lanes of `bytes` that have bit `bit` set.
#[inline(always)]
unsafe fn bit_set(bytes: uint8x16_t, bit: usize) -> uint8x16_t {
    vtstq_u8(bytes, vdupq_n_u8(1 << bit))
}

/// Bits `shift..shift + 2` of every byte.
#[inline(always)]
unsafe fn two_bits(bytes: uint8x16_t, shift: usize) -> uint8x16_t {
    vandq_u8(vshlq_u8(bytes, vdupq_n_s8(-(shift as i8))), vdupq_n_u8(3))
}

/// The legacy types' one scale per block.
#[inline(always)]
unsafe fn unit_scale(block: *const u8, into: &mut Unpacked) {
    into.scales[0] = 1;
    into.d = f16_at(block, 0);
}

struct Q8_0;

impl Block for Q8_0 {
    const TY: BlockType = BlockType::Q8_0;

    #[inline(always)]
    unsafe fn unpack(block: *const u8, into: &mut Unpacked) {
        unit_scale(block, into);
        into.codes[0] = vreinterpretq_s8_u8(bytes16(block, 2));
        into.codes[1] = vreinterpretq_s8_u8(bytes16(block, 18));
    }
}

/// Q4_0, Q4_1, Q5_0 and Q5_1: codes of four bits (five with `FIFTH_BIT`), less a code offset or
/// plus a minimum (with `MIN`; see [`crate::blocks::legacy_code`]).
struct Nibbles<const FIFTH_BIT: bool, const MIN: bool>;

impl<const FIFTH_BIT: bool, const MIN: bool> Block for Nibbles<FIFTH_BIT, MIN> {
    const TY: BlockType = BlockType::nibbles(FIFTH_BIT, MIN);

    #[inline(always)]
    unsafe fn unpack(block: *const u8, into: &mut Unpacked) {
        unit_scale(block, into);
        let (high_bits, nibbles_at) = legacy_layout(Self::TY);
        let q = bytes16(block, nibbles_at);
        let mut codes = [vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q)];
        if FIFTH_BIT {
            let bits = (block.add(high_bits) as *const u32).read_unaligned().to_le_bytes();
            // Lane `l` of group `g` takes bit `l % 8` of byte `2g + l / 8`.
            let lane_bit = vld1q_u8([1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
            for (g, codes) in codes.iter_mut().enumerate() {
                let bytes = vcombine_u8(vdup_n_u8(bits[2 * g]), vdup_n_u8(bits[2 * g + 1]));
                *codes = vorrq_u8(*codes, vandq_u8(vtstq_u8(bytes, lane_bit), vdupq_n_u8(16)));
            }
        }
        for (g, codes) in codes.into_iter().enumerate() {
            into.codes[g] = match Self::TY.code_offset() {
                Some(code_offset) => centred(codes, code_offset as u8),
                None => vreinterpretq_s8_u8(codes),
            };
        }
        if MIN {
            into.dmin = -f16_at(block, 2);
        }
    }
}

/// Q4_K, or Q5_K when `FIFTH_BIT` (its 32 bytes of high bits lie between the scales and the
/// nibbles): sub-block j is groups 2j and 2j + 1, with scale j and minimum j.
struct Q4K<const FIFTH_BIT: bool>;

impl<const FIFTH_BIT: bool> Block for Q4K<FIFTH_BIT> {
    const TY: BlockType = if FIFTH_BIT { BlockType::Q5K } else { BlockType::Q4K };

    #[inline(always)]
    unsafe fn unpack(block: *const u8, into: &mut Unpacked) {
        (into.d, into.dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, mins) = q4_k_scales(std::slice::from_raw_parts(block.add(4), 12));
        for j in 0..8 {
            into.scales[j] = scales[j] as i32;
        }
        let mins = vld1_u8(mins.as_ptr());
        // Each sub-block's minimum for both of its groups.
        into.mins = [vreinterpretq_s16_u16(vmovl_u8(vzip1_u8(mins, mins))), vreinterpretq_s16_u16(vmovl_u8(vzip2_u8(mins, mins)))];
        let nibbles_at = if FIFTH_BIT { 48 } else { 16 };
        for j in 0..8 {
            for half in 0..2 {
                // Sub-blocks 2p and 2p + 1 share 32 bytes: low nibbles, then high.
                let q = bytes16(block, nibbles_at + 32 * (j / 2) + 16 * half);
                let mut code = if j.is_multiple_of(2) { vandq_u8(q, vdupq_n_u8(0x0F)) } else { vshrq_n_u8::<4>(q) };
                if FIFTH_BIT {
                    code = vorrq_u8(code, vandq_u8(bit_set(bytes16(block, 16 + 16 * half), j), vdupq_n_u8(16)));
                }
                into.codes[2 * j + half] = vreinterpretq_s8_u8(code);
            }
        }
    }
}

/// Q6_K: a scale per group (see [`crate::blocks::q6_k_value`] for where each value's bits lie).
struct Q6K;

impl Block for Q6K {
    const TY: BlockType = BlockType::Q6K;

    #[inline(always)]
    unsafe fn unpack(block: *const u8, into: &mut Unpacked) {
        into.d = f16_at(block, 208);
        for g in 0..16 {
            into.scales[g] = *block.add(192 + g) as i8 as i32;
            let (half, run, l) = (g / 8, g % 8 / 2, 16 * (g % 2));
            let ql = bytes16(block, 64 * half + 32 * (run % 2) + l);
            let low = if run < 2 { vandq_u8(ql, vdupq_n_u8(0x0F)) } else { vshrq_n_u8::<4>(ql) };
            let high = two_bits(bytes16(block, 128 + 32 * half + l), 2 * run);
            into.codes[g] = centred(vorrq_u8(low, vshlq_n_u8::<4>(high)), 32);
        }
    }
}

/// Q3_K: a scale per group, codes less 4.
struct Q3K;

impl Block for Q3K {
    const TY: BlockType = BlockType::Q3K;

    #[inline(always)]
    unsafe fn unpack(block: *const u8, into: &mut Unpacked) {
        into.d = f16_at(block, 108);
        let scales = q3_k_scales(std::slice::from_raw_parts(block.add(96), 12));
        for g in 0..16 {
            into.scales[g] = scales[g] as i32 - 32;
            // A group's 16 values lie in 16 consecutive bytes at the same bit places.
            let (byte, shift) = two_bit_code_at(16 * g);
            let (high_byte, bit) = q3_k_high_bit_at(16 * g);
            let low = two_bits(bytes16(block, 32 + byte), shift);
            let high = vandq_u8(bit_set(bytes16(block, high_byte), bit), vdupq_n_u8(4));
            into.codes[g] = centred(vorrq_u8(low, high), 4);
        }
    }
}

/// Q2_K: a 4-bit scale and a 4-bit minimum per group.
struct Q2K;

impl Block for Q2K {
    const TY: BlockType = BlockType::Q2K;

    #[inline(always)]
    unsafe fn unpack(block: *const u8, into: &mut Unpacked) {
        (into.d, into.dmin) = (f16_at(block, 80), f16_at(block, 82));
        let packed = bytes16(block, 0);
        let mins = vshrq_n_u8::<4>(packed);
        into.mins = [vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mins))), vreinterpretq_s16_u16(vmovl_high_u8(mins))];
        for g in 0..16 {
            into.scales[g] = (*block.add(g) & 0xF) as i32;
            let (byte, shift) = two_bit_code_at(16 * g);
            into.codes[g] = vreinterpretq_s8_u8(two_bits(bytes16(block, 16 + byte), shift));
        }
    }
}
