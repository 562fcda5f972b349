//! x86_64 kernels: the block helpers both instruction sets share.

pub mod avx2;
pub mod avx512;
mod panel;

use std::arch::x86_64::*;

use crate::blocks::BlockType;
use panel::{group_values, PANEL_MIN_ACTIVATIONS};

/// The group size in which the panels read `m` activation rows against `ty`'s weights, if a
/// product of `m` rows goes through panels.
pub fn interleaving(ty: BlockType, m: usize) -> Option<usize> {
    (m >= PANEL_MIN_ACTIVATIONS).then(|| group_values(ty))
}

/// How far ahead of the current block a decode step asks for its weight rows: measured over a
/// whole model (Q4_K_M, one thread, one row per tile), none 8.4 tok/s, 1 KiB 10.9–11.1, 2 KiB
/// 12.0–13.3, 4 KiB 13.4–13.8, 8 KiB and more no better and less steady. A type with more bytes
/// per value may ask further ahead (AVX2's Q8_0 does).
const PREFETCH_BYTES: usize = 4096;

/// A decode step streams the weights from memory: ask for the cache lines `ahead` bytes after
/// `block`'s while this one is multiplied.
#[inline(always)]
unsafe fn prefetch_ahead(block: *const u8, bytes: usize, ahead: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(block.add(ahead + line) as *const i8);
    }
}

/// The little-endian `f16` at `block + at` (F16C).
#[inline(always)]
unsafe fn f16_at(block: *const u8, at: usize) -> f32 {
    let bits = u16::from_le_bytes([*block.add(at), *block.add(at + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}
