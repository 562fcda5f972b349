//! Weight rows repacked, [`PANEL_ROWS`] at a time, for products with many activation rows (a
//! prompt, and a batch's decode step from a number of rows that depends on the type and the
//! instructions: [`panel_min_activations`]).
//! `vpdpbusd` then multiplies four bytes of every row of the panel by the same four
//! activation bytes at once, so one instruction serves 16 outputs (AVX2's `maddubs`, 8) and no
//! sum is ever reduced across a register. The panel is a small per-work-item buffer, filled once and read by every
//! activation row: the weights themselves stay as they are in the file.
//!
//! Every block type is unpacked to the same form, per group of 32 values of a row (16 for
//! Q2_K, Q3_K and Q6_K, whose scales change every 16): unsigned bytes `u`, a `scale` and an `offset`, with
//! `value = scale · u − offset`. Against activations `d · x` (bytes `x` with scale `d`), a
//! group contributes `d · (scale · Σ u·x − offset · Σ x)`; `d · Σ x` comes with the
//! activations ([`QuantizedRows::interleaved`]). Where the offset is a whole number `k` of scales
//! ([`code_offset`]), that is `d · scale · (Σ u·x − k · Σ x)`, and `−k · Σ x` comes with them too:
//! the panel's offsets are then zero, and only a minimum is ever the panel's.
//!
//! Packing is done with AVX2 ([`super::avx2::pack`] unpacks the blocks, as its tiles do, and
//! [`Panel::put_group`] transposes 16 rows' codes in registers): written value by value, it
//! took 30–42 % of a 128-token prompt's products (AVX-512, one thread); now 21–28 %.

use std::arch::x86_64::*;
use std::cell::Cell;
use std::ops::{Deref, Range};

use super::avx512::{f16s_at, q5_k_codes, sub_block_byte, LegacyCodes, NibbleCodes, Q2KCodes, Q3KCodes, Q6KCodes, Q8_0Codes, SixteensCodes};
use crate::blocks::{interleaved_at, BlockType, BLOCK, INTERLEAVED_ROWS, SUPER_BLOCK};
use crate::QMatrix;
#[cfg(doc)]
use crate::{activations::Interleaved, QuantizedRows};

/// Weight rows per panel: one 32-bit lane of a 512-bit register each.
pub const PANEL_ROWS: usize = 16;

/// Activation rows from which panels are worth packing for `ty`, with AVX-512 or AVX2: packing
/// costs about as much as a few rows' products, and the tiles' sums of several rows reuse little
/// of their weight loads. AVX2, at first (best of three, one thread): at 16 rows panels ran at
/// 0.6–1.2 × the tiles, at 24 rows at 0.8–1.9 ×, at 32 rows at 1.05–2.2 ×, at 64 rows at
/// 1.05–2 ×. AVX-512 on the Zen 5, since the packing was done in registers (`--bench matmul --
/// ffn_up`, one thread, pinned), tiles → panels, GFLOP/s: the K-quants at 5 rows 118–161 →
/// 100–152, at 7 rows 124–162 → 129–212 (Q4_K 162 → 212, Q5_K 131 → 192), at 8 rows 120–170
/// → 149–241, at 16 166 → 371 for Q4_K; the legacy types at 8 rows 153–211 → 160–194 (Q8_0 211
/// → 180), at 12 170–213 → 194–232, at 16 154–214 → 258–307. AVX2 on that host at 16 rows:
/// Q4_0 and the K-quants gained, Q8_0 lost (144 → 116). Over a whole model, since the packing
/// asks ahead and reuses its panels (eca740e8: TinyLlama shape, `llm bench --kernels avx2
/// --threads 2 --prompt-tokens P --gen-tokens 1`, same Zen 5, two rounds in turn, prefill tok/s,
/// tiles → panels): Q2_K at 12 tokens 78.8–90.6 → 91.1–96.6, Q5_K_M 71.8–73.2 → 77.8–80.9,
/// Q4_K_M 80.2–81.9 → 81.9–83.2 (at 16 84.3–98.3 → 96.4–101.9, at 24 98.1–107.0 →
/// 115.2–125.6); Q4_0 at 12 69.3–78.6 → 76.1–77.4, at 16 87.5–92.1 → 93.9–94.5, at 20
/// 91.2–99.0 → 112.3–113.5; Q4_1 at 12 84.1–85.8 → 81.9–82.3, at 16 87.5–91.8 → 93.2–99.8;
/// Q5_0 at 16 78.8–80.2 → 78.4–84.2, at 20 82.3–87.0 → 97.0–99.3; Q8_0 lost at 8, 16 and 24
/// tokens (70.1–75.1 → 52.0–56.4 at 16). Batches (`batch_throughput.py --kernels avx2
/// --max-tokens 32 --threads 2`, two rounds in turn, tok/s, 32 rows → these): Q4_K_M 16
/// requests 98.7–105.5 → 114.7–114.8, 12 requests 100.8–101.0 → 108.7–109.1; Q4_0 16 requests
/// 92.1–94.2 → 112.5–114.7. Not measured on a host with AVX2 alone.
///
/// Where a 512-bit instruction takes two passes (`two_passes`: AMD Zen 4), Q4_0's and Q4_1's
/// panels start at 7 rows, as the K-quants' do: from there they read the weights faster out of
/// memory than the tiles, which are bound by instructions (`--bench stream -- m=N`, one thread,
/// two rounds, GB/s, AVX-512's tiles / AVX2's → panels): Q4_0 at 7 rows 3.62–3.70 / 3.84–3.94 →
/// 4.08–4.21, 8 rows 3.29–3.31 / 3.01–3.39 → 4.15–4.22, 10 rows — / 2.67–2.69 → 3.16–3.18, 11
/// rows 2.38–2.39 / 2.43–2.46 → 2.84; Q4_1 at 7 rows 3.49–3.54 / 4.26–4.40 → 4.36–4.42, 8 rows
/// 3.22–3.30 / 3.56–3.97 → 4.32–4.36, 10 rows — / 3.03–3.05 → 3.28–3.29. At 6 rows they lost
/// (Q4_0 AVX-512's tiles 4.05–4.12, AVX2's 4.29–4.36 → 3.67–4.19).
pub const fn panel_min_activations(ty: BlockType, avx512: bool, two_passes: bool) -> usize {
    match (avx512, ty) {
        (true, BlockType::Q4_0 | BlockType::Q4_0ScalesFirst | BlockType::Q4_1) if two_passes => 7,
        (
            false,
            BlockType::Q2K
            | BlockType::Q2KInterleaved
            | BlockType::Q3K
            | BlockType::Q3KInterleaved
            | BlockType::Q4K
            | BlockType::Q4KInterleaved
            | BlockType::Q5K
            | BlockType::Q5KInterleaved
            | BlockType::Q6K
            | BlockType::Q6KInterleaved,
        ) => 12,
        (false, BlockType::Q4_0 | BlockType::Q4_0ScalesFirst | BlockType::Q4_0Interleaved | BlockType::Q4_1 | BlockType::Q4_1Interleaved) => 16,
        (false, BlockType::Q5_0 | BlockType::Q5_0Interleaved | BlockType::Q5_1 | BlockType::Q5_1Interleaved) => 20,
        (false, BlockType::Q8_0 | BlockType::Q8_0Interleaved) => 32,
        // Q4_K's 16-row layout's tiles of up to four activation rows read its weights unpacked:
        // Zen 4, `--bench matmul -- ffn_up`, one thread, GFLOP/s, tiles against panels: 7 rows
        // 316 / 207, 8 rows 319 / 236, 12 rows 319 / 216, 16 rows 313 / 286, 24 rows 320 / 307,
        // 32 rows 318 / 318, 128 rows 313 / 330, 512 rows 314 / 352.
        (true, BlockType::Q4KInterleaved) => 32,
        // Q6_K's from 24 rows (tiles against panels, two rounds: 12 rows 213–237 / 123–183, 16
        // rows 214–236 / 160–228, 24 rows 212–236 / 251–264, 32 rows 211–237 / 269–298, 128 rows
        // 207–237 / 298–305, 512 rows 201–232 / 271–334).
        (true, BlockType::Q6KInterleaved) => 24,
        // Q5_K's from 16 rows (tiles against panels, two rounds: 8 rows 267 / 218–227, 12 rows
        // 268 / 189–204, 16 rows 264–265 / 273–277, 24 rows 263–265 / 277–297, 32 rows 264 /
        // 299–300, 128 rows 261 / 321, 512 rows 259–261 / 343–345).
        (true, BlockType::Q5KInterleaved) => 16,
        // Q3_K's from 16 rows (tiles against panels, two rounds: 8 rows 220 / 227, 12 rows 237 /
        // 205, 16 rows 235–237 / 252–275, 24 rows 234–237 / 244–250, 128 rows 229–233 / 304–324).
        (true, BlockType::Q3KInterleaved) => 16,
        // Q2_K's, whose tiles spend the least on each value, from 128 rows (tiles against panels:
        // 16 rows 278 / 248, 24 rows 279 / 264, 32 rows 279 / 270, 128 rows 274 / 283–284, 512
        // rows 270 / 288).
        (true, BlockType::Q2KInterleaved) => 128,
        // Q4_0's 16-row layout has no panels: in cache its tiles ran as fast or faster at every
        // count (Zen 4, `--bench matmul -- ffn_up`, one thread, GFLOP/s, tiles against panels
        // from 32 rows: 16 rows 361 / 325, 32 rows 360 / 313, 128 rows 354 / 334, 512 rows 353
        // / 352), and level over a whole model (`llm bench`, TinyLlama's shape, rounds in turn,
        // prefill tok/s: a 128-token prompt, three rounds, one thread 128–159 / 140–149, two
        // threads 246–293 / 148–263; 512 tokens, two rounds, one thread 140–142 / 132–145, two
        // threads 235–256 / 239–248).
        (true, BlockType::Q4_0Interleaved) => usize::MAX,
        // Q5_0's, whose tiles spend more on each block (its fifth bits), from 24 rows: tiles
        // against panels (packed from the layout), same measure, 12 rows 281 / 199, 16 rows
        // 266–282 / 270, 24 rows 275–278 / 286, 32 rows 273 / 293, 128 rows 275 / 331, 512 rows
        // 251 / 351.
        (true, BlockType::Q5_0Interleaved) => 24,
        // Q8_0's from 32 rows as Q4_K's (tiles against panels: 12 rows 264 / 201, 16 rows 309 /
        // 265, 24 rows 301 / 288, 32 rows 309 / 303, 128 rows 310 / 325, 512 rows 314 / 353).
        (true, BlockType::Q8_0Interleaved) => 32,
        // Q4_1's (tiles against panels: 24 rows 309 / 285, 32 rows 309 / 250, 128 rows 303 /
        // 309, 512 rows 303 / 323) and Q5_1's (24 rows 237 / 273, 32 rows 238 / 245, 128 rows
        // 234 / 303, 512 rows 233 / 321).
        (true, BlockType::Q4_1Interleaved) => 128,
        (true, BlockType::Q5_1Interleaved) => 24,
        (true, BlockType::Q2K | BlockType::Q3K | BlockType::Q4K | BlockType::Q5K | BlockType::Q6K) => 7,
        (true, BlockType::Q8_0 | BlockType::Q4_0 | BlockType::Q4_0ScalesFirst | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1) => 12,
    }
}

/// Values per group: those that share a scale in `ty`.
pub const fn group_values(ty: BlockType) -> usize {
    match ty {
        BlockType::Q2K | BlockType::Q2KInterleaved | BlockType::Q3K | BlockType::Q3KInterleaved | BlockType::Q6K | BlockType::Q6KInterleaved => BLOCK / 2,
        _ => BLOCK,
    }
}

/// The `k` of a type whose values are `scale · (u − k)` in a panel (the offset is `k · scale`);
/// `None` for the types with a minimum of their own. The kernels start a group's integer sum of
/// products from `−k · Σ x` ([`Interleaved::offset_sums`]), a load, in place of a multiply-add of
/// the offsets per group and activation row: with AVX-512, 8 of the 96 vector instructions of a
/// tile's group of 32 values, 8 of 64 for a group of 16, all on the two ports that also run
/// `vpdpbusd`. `cargo bench -p llm-kernels --bench matmul -- m=128`, one thread, three rounds in
/// turn, GFLOP/s: Q6_K 206–230 → 226–251, Q3_K 185–234 → 223–256, Q8_0 `attn_q` 294–302 →
/// 310–315, Q5_0 `attn_q` 308–310 → 328–332, Q4_0 no different; AVX2: Q6_K 111–118 → 118–124,
/// Q3_K 117–121 → 120–127.
pub const fn code_offset(ty: BlockType) -> Option<i32> {
    match (ty, ty.code_offset()) {
        // Q8_0's signed codes plus 128 ([`super::avx2::pack`]).
        (BlockType::Q8_0 | BlockType::Q8_0Interleaved, _) => Some(128),
        (_, Some(k)) => Some(k as i32),
        (_, None) => None,
    }
}

/// The largest value `u` a panel holds for `ty` (the code plus whatever offset made it
/// unsigned): how many products AVX2 may add up in 16 bits.
pub const fn largest_code(ty: BlockType) -> i32 {
    match ty {
        BlockType::Q8_0 | BlockType::Q8_0Interleaved => 255,
        BlockType::Q2K | BlockType::Q2KInterleaved => 3,
        BlockType::Q3K | BlockType::Q3KInterleaved => 7,
        BlockType::Q4_0
        | BlockType::Q4_0ScalesFirst
        | BlockType::Q4_0Interleaved
        | BlockType::Q4_1
        | BlockType::Q4_1Interleaved
        | BlockType::Q4K
        | BlockType::Q4KInterleaved => 15,
        BlockType::Q5_0 | BlockType::Q5_0Interleaved | BlockType::Q5_1 | BlockType::Q5_1Interleaved | BlockType::Q5K | BlockType::Q5KInterleaved => 31,
        BlockType::Q6K | BlockType::Q6KInterleaved => 63,
    }
}

#[derive(Default)]
pub struct Panel {
    /// Values per group.
    group: usize,
    /// `[group][quad of 4 values][row (16)]`, a quad's 4 bytes in a word: one quad of every row
    /// is one 512-bit register.
    quads: Vec<Quad>,
    /// `[group][row]`.
    pub scales: Vec<f32>,
    /// `[group][row]`: a minimum's part (zero for a type with a [`code_offset`]).
    pub offsets: Vec<f32>,
}

thread_local! {
    /// The panels of this thread's last product, packed again by its next ([`Panels`]).
    static SPARE: Cell<Vec<Panel>> = const { Cell::new(Vec::new()) };
}

/// A work item's panels, each with the weight rows it holds. Dropped, they go back to the
/// thread (the one that packed them), whose next product packs into them: a batch's decode step packs every weight matrix
/// again, and fresh panels were allocated and zeroed first (`perf` of 16 sequences of
/// TinyLlama-shape Q4_K_M: 10 % of the samples in zeroing, `malloc` and `free`). Zen 5,
/// `batch_throughput.py --max-tokens 32 --threads 2`, two rounds in turn, tok/s: Q4_K_M 16
/// requests 169.2–179.6 → 186.5–200.0, 8 requests 117.9–127.8 → 133.2–140.2; Q8_0 16 requests
/// 151.6–154.1 → 150.5–167.6; a 512-token prompt and peak RSS no different.
pub struct Panels(Vec<(Range<usize>, Panel)>);

impl Deref for Panels {
    type Target = [(Range<usize>, Panel)];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Panels {
    fn drop(&mut self) {
        let mut spare = SPARE.take();
        spare.extend(self.0.drain(..).map(|(_, panel)| panel));
        SPARE.set(spare);
    }
}

/// One quad of every row of a panel, in a cache line of its own: a kernel's 64-byte load of one
/// from an address off a line touched two lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Quad([u32; PANEL_ROWS]);

/// One row's group as [`Panel::put_group`] takes it: its values `u` (the first
/// [`group_values`] bytes), scale and offset.
#[derive(Clone, Copy)]
pub struct Group {
    pub u: __m256i,
    pub scale: f32,
    pub offset: f32,
}

impl Group {
    /// What rows past a panel's weight rows hold: they add nothing.
    pub const ZERO: Self = Self { u: unsafe { std::mem::transmute::<[u8; BLOCK], __m256i>([0; BLOCK]) }, scale: 0.0, offset: 0.0 };
}

impl Panel {
    /// The panels of `rows`, each with the weight rows it holds.
    pub fn all(w: &QMatrix, rows: Range<usize>) -> Panels {
        let mut spare = SPARE.take();
        let held = |start: usize| start..rows.end.min(start + PANEL_ROWS);
        // After the last panel, the first of the next work item, mostly the thread's next
        // (`batch_throughput.py`, Q4_K_M, two rounds in turn, tok/s: 16 requests 200.5–202.2 →
        // 213.2–214.6, 8 requests 146.8–147.8 → 156.5–158.1; Q8_0 no different).
        let next = |start: usize| start.min(w.rows)..w.rows.min(start + PANEL_ROWS);
        let panels = rows
            .clone()
            .step_by(PANEL_ROWS)
            .map(|start| {
                let mut panel = spare.pop().unwrap_or_default();
                panel.pack(w, held(start), next(start + PANEL_ROWS));
                (held(start), panel)
            })
            .collect();
        SPARE.set(spare);
        Panels(panels)
    }

    /// Packs `rows` of `w` (at most [`PANEL_ROWS`]); the panel's rows past them get zero
    /// scales and offsets, so they add nothing. Meanwhile the rows `next` (the next panel's) are
    /// asked for from memory.
    fn pack(&mut self, w: &QMatrix, rows: Range<usize>, next: Range<usize>) {
        debug_assert!(rows.len() <= PANEL_ROWS);
        self.group = group_values(w.ty);
        let groups = w.cols / self.group;
        // Packing writes every value, scale and offset it reads: a spare panel only grows (a
        // layer's widths alternate; shrinking would zero the wider ones' tails again).
        grow(&mut self.quads, w.cols / 4, Quad([0; PANEL_ROWS]));
        grow(&mut self.scales, groups * PANEL_ROWS, 0.0);
        grow(&mut self.offsets, groups * PANEL_ROWS, 0.0);
        match w.ty {
            // SAFETY (each): only AVX-512's products take the 16-row layouts to the panels
            // (`crate::product_rows` sends the others' to the scalar definition).
            BlockType::Q4KInterleaved => unsafe { self.pack_interleaved::<false>(w, rows, next) },
            BlockType::Q5KInterleaved => unsafe { self.pack_interleaved::<true>(w, rows, next) },
            BlockType::Q6KInterleaved => unsafe { self.pack_sixteens_interleaved::<Q6KCodes>(w, rows, next) },
            BlockType::Q3KInterleaved => unsafe { self.pack_sixteens_interleaved::<Q3KCodes>(w, rows, next) },
            BlockType::Q2KInterleaved => unsafe { self.pack_sixteens_interleaved::<Q2KCodes>(w, rows, next) },
            BlockType::Q4_0Interleaved => unreachable!("its tiles take every product (`panel_min_activations`)"),
            BlockType::Q8_0Interleaved => unsafe { self.pack_legacy_interleaved::<Q8_0Codes>(w, rows, next) },
            BlockType::Q4_1Interleaved => unsafe { self.pack_legacy_interleaved::<NibbleCodes<false, true>>(w, rows, next) },
            BlockType::Q5_0Interleaved => unsafe { self.pack_legacy_interleaved::<NibbleCodes<true, false>>(w, rows, next) },
            BlockType::Q5_1Interleaved => unsafe { self.pack_legacy_interleaved::<NibbleCodes<true, true>>(w, rows, next) },
            // SAFETY: every x86_64 host these kernels run on has AVX2 (`Kernels::runs_here`).
            _ => unsafe { super::avx2::pack(self, w, rows, next) },
        }
    }

    /// Packs the 16 rows from `rows.start` of a [`BlockType::Q4KInterleaved`] matrix (with
    /// `FIFTH_BIT`, [`BlockType::Q5KInterleaved`]): each register of its nibbles is a quad of
    /// every row already, twice (the low nibbles and the high), so packing is two masks (and
    /// Q5_K's fifth bits) and two stores a register, and a block's scales are unpacked for all
    /// the rows at once.
    ///
    /// # Safety
    /// AVX-512 with VNNI is available; `rows` is a whole group of the layout's rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pack_interleaved<const FIFTH_BIT: bool>(&mut self, w: &QMatrix, rows: Range<usize>, next: Range<usize>) {
        debug_assert_eq!(rows.len(), INTERLEAVED_ROWS);
        let (row_bytes, block_bytes) = (w.ty.row_bytes(w.cols), INTERLEAVED_ROWS * w.ty.block_bytes());
        let (group, next_group) = (w.bytes.as_ptr().add(rows.start * row_bytes), w.bytes.as_ptr().wrapping_add(next.start * row_bytes));
        let quads = self.group / 4;
        for b in 0..w.cols / SUPER_BLOCK {
            if !next.is_empty() {
                super::prefetch_ahead::<false>(next_group, b, block_bytes, 0);
            }
            let block = group.add(b * block_bytes);
            let (sub_scales, mins, d_16th, dmin) = super::avx512::interleaved_scales(block);
            let d = _mm512_mul_ps(d_16th, _mm512_set1_ps(16.0));
            for j in 0..SUPER_BLOCK / BLOCK {
                let g = b * SUPER_BLOCK / BLOCK + j;
                // The low nibbles' scales come 16 times larger (`interleaved_scales`).
                let scale = _mm512_mul_ps(if j % 2 == 0 { d_16th } else { d }, _mm512_cvtepi32_ps(sub_scales[j]));
                let min = _mm512_cvtepi32_ps(_mm512_and_si512(mins[j], _mm512_set1_epi32(0xFFFF)));
                _mm512_storeu_ps(self.scales[g * PANEL_ROWS..].as_mut_ptr(), scale);
                _mm512_storeu_ps(self.offsets[g * PANEL_ROWS..].as_mut_ptr(), _mm512_mul_ps(dmin, min));
            }
            for pair in 0..4 {
                let g = b * SUPER_BLOCK / BLOCK + 2 * pair;
                for k in 0..quads {
                    let (low, high) = match FIFTH_BIT {
                        true => q5_k_codes(block, pair, k),
                        false => super::avx512::nibbles(block.add(interleaved_at(16 + 32 * pair + 4 * k))),
                    };
                    _mm512_store_si512(self.quads[g * quads + k].0.as_mut_ptr() as *mut _, low);
                    _mm512_store_si512(self.quads[(g + 1) * quads + k].0.as_mut_ptr() as *mut _, high);
                }
            }
        }
    }

    /// Packs the 16 rows from `rows.start` of a 16-row layout of Q6_K, Q3_K or Q2_K, whose
    /// blocks `S` reads: each of a block's registers of codes is a quad of every row, its scales
    /// are the rows' scale bytes times their d, and Q2_K's offsets its minimums times dmin.
    ///
    /// # Safety
    /// AVX-512 with VNNI is available; `rows` is a whole group of the layout's rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pack_sixteens_interleaved<S: SixteensCodes>(&mut self, w: &QMatrix, rows: Range<usize>, next: Range<usize>) {
        debug_assert_eq!(rows.len(), INTERLEAVED_ROWS);
        let (row_bytes, block_bytes) = (w.ty.row_bytes(w.cols), INTERLEAVED_ROWS * w.ty.block_bytes());
        let (group, next_group) = (w.bytes.as_ptr().add(rows.start * row_bytes), w.bytes.as_ptr().wrapping_add(next.start * row_bytes));
        let groups = SUPER_BLOCK / self.group;
        for b in 0..w.cols / SUPER_BLOCK {
            if !next.is_empty() {
                super::prefetch_ahead::<false>(next_group, b, block_bytes, 0);
            }
            let block = group.add(b * block_bytes);
            let (sub_scales, mins, d) = (S::scales(block), S::min_pairs(block), f16s_at(block, S::D));
            // Only a type with minimums has a dmin after its d.
            let dmin = if S::MIN { f16s_at(block, S::D + 2) } else { _mm512_setzero_ps() };
            for j in 0..groups {
                let g = b * groups + j;
                _mm512_storeu_ps(self.scales[g * PANEL_ROWS..].as_mut_ptr(), _mm512_mul_ps(d, _mm512_cvtepi32_ps(sub_block_byte(&sub_scales, j))));
                // A minimum is the panel's (value = scale · u − offset); a code offset comes with
                // the activations ([`code_offset`]).
                let offsets = match S::MIN {
                    true => {
                        let pair = mins[j / 2];
                        let min = if j % 2 == 0 { _mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF)) } else { _mm512_srli_epi32::<16>(pair) };
                        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(min))
                    }
                    false => _mm512_setzero_ps(),
                };
                _mm512_storeu_ps(self.offsets[g * PANEL_ROWS..].as_mut_ptr(), offsets);
            }
            for half in 0..2 {
                for k in 0..8 {
                    // Run `run`'s values 4k.. are quad k % 4 of group 8 · half + 2 · run + k / 4.
                    for (run, codes) in S::codes(block, half, k).into_iter().enumerate() {
                        let g = b * groups + 8 * half + 2 * run + k / 4;
                        _mm512_store_si512(self.quads[4 * g + k % 4].0.as_mut_ptr() as *mut _, codes);
                    }
                }
            }
        }
    }

    /// Packs the 16 rows from `rows.start` of a legacy type's 16-row layout, whose codes `C`
    /// reads: a block's four pairs of registers of codes are its eight quads of every row, and its
    /// 16 scales (and minimums) one conversion.
    ///
    /// # Safety
    /// AVX-512 with VNNI is available; `rows` is a whole group of the layout's rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pack_legacy_interleaved<C: LegacyCodes>(&mut self, w: &QMatrix, rows: Range<usize>, next: Range<usize>) {
        debug_assert_eq!(rows.len(), INTERLEAVED_ROWS);
        let (row_bytes, block_bytes) = (w.ty.row_bytes(w.cols), INTERLEAVED_ROWS * w.ty.block_bytes());
        let (group, next_group) = (w.bytes.as_ptr().add(rows.start * row_bytes), w.bytes.as_ptr().wrapping_add(next.start * row_bytes));
        for b in 0..w.cols / BLOCK {
            if !next.is_empty() {
                super::prefetch_ahead::<false>(next_group, b, block_bytes, 0);
            }
            let block = group.add(b * block_bytes);
            _mm512_storeu_ps(self.scales[b * PANEL_ROWS..].as_mut_ptr(), f16s_at(block, 0));
            // A minimum is the panel's (value = scale · u − offset); a code offset comes with the
            // activations ([`code_offset`]).
            let offsets = match C::MIN {
                true => _mm512_sub_ps(_mm512_setzero_ps(), f16s_at(block, 2)),
                false => _mm512_setzero_ps(),
            };
            _mm512_storeu_ps(self.offsets[b * PANEL_ROWS..].as_mut_ptr(), offsets);
            let fifth_bits = C::fifth_bits(block);
            for k in 0..4 {
                let (low, high) = C::codes(block, fifth_bits, k);
                _mm512_store_si512(self.quads[8 * b + k].0.as_mut_ptr() as *mut _, low);
                _mm512_store_si512(self.quads[8 * b + 4 + k].0.as_mut_ptr() as *mut _, high);
            }
        }
    }

    /// The values: `[group][quad of 4 values][row (16)][4 bytes]`.
    pub fn values(&self) -> *const u8 {
        self.quads.as_ptr() as *const u8
    }

    /// Group `g` of every row of the panel.
    ///
    /// # Safety
    /// AVX2 is available; `g` is one of the panel's groups.
    #[target_feature(enable = "avx2")]
    pub unsafe fn put_group(&mut self, g: usize, rows: &[Group; PANEL_ROWS]) {
        self.scales[g * PANEL_ROWS..][..PANEL_ROWS].copy_from_slice(&std::array::from_fn::<_, PANEL_ROWS, _>(|j| rows[j].scale));
        self.offsets[g * PANEL_ROWS..][..PANEL_ROWS].copy_from_slice(&std::array::from_fn::<_, PANEL_ROWS, _>(|j| rows[j].offset));
        let quads = self.group / 4;
        let first = &mut self.quads[g * quads..][..quads];
        for half in 0..PANEL_ROWS / 8 {
            let words = transpose(std::array::from_fn(|j| rows[8 * half + j].u));
            for (quad, word) in first.iter_mut().zip(words) {
                _mm256_storeu_si256(quad.0[8 * half..].as_mut_ptr() as *mut __m256i, word);
            }
        }
    }
}

/// `v` at least `len` long.
fn grow<T: Copy>(v: &mut Vec<T>, len: usize, zero: T) {
    if v.len() < len {
        v.resize(len, zero);
    }
}

/// Eight rows of eight 32-bit words as eight columns: word `k` of every row in the `k`th.
#[target_feature(enable = "avx2")]
unsafe fn transpose(r: [__m256i; 8]) -> [__m256i; 8] {
    // Pairs of rows interleaved by word, then by pairs of words: `s[k]` holds word k and k + 4
    // of four rows, one per 128-bit lane.
    let t: [__m256i; 8] = std::array::from_fn(|i| match i % 2 {
        0 => _mm256_unpacklo_epi32(r[i], r[i + 1]),
        _ => _mm256_unpackhi_epi32(r[i - 1], r[i]),
    });
    let quarter = |t: &[__m256i]| {
        [_mm256_unpacklo_epi64(t[0], t[2]), _mm256_unpackhi_epi64(t[0], t[2]), _mm256_unpacklo_epi64(t[1], t[3]), _mm256_unpackhi_epi64(t[1], t[3])]
    };
    let (low, high) = (quarter(&t[..4]), quarter(&t[4..]));
    std::array::from_fn(|k| match k < 4 {
        true => _mm256_permute2x128_si256::<0x20>(low[k], high[k]),
        false => _mm256_permute2x128_si256::<0x31>(low[k - 4], high[k - 4]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panel of a wider matrix, its bytes poisoned, packed again with 9 rows of a narrower one
    /// (7 rows past them): what the products read is what a fresh panel holds.
    #[test]
    fn a_spare_panel_packs_as_a_fresh_one() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let (rows, cols) = (9, 64);
        let block = |r: usize, b: usize| {
            let mut block = vec![0x00, 0x3C]; // f16 1.0
            block.extend((0..32).map(|j| (r * 7 + b * 3 + j) as u8));
            block
        };
        let bytes: Vec<u8> = (0..rows).flat_map(|r| (0..cols / 32).flat_map(move |b| block(r, b))).collect();
        let w = QMatrix::new(BlockType::Q8_0, rows, cols, &bytes).unwrap();
        let read = |panels: &Panels| {
            let (held, panel) = &panels[0];
            assert_eq!(held, &(0..rows));
            let groups = cols / panel.group;
            let scales: Vec<u32> = panel.scales[..groups * PANEL_ROWS].iter().chain(&panel.offsets[..groups * PANEL_ROWS]).map(|v| v.to_bits()).collect();
            (panel.group, panel.quads[..cols / 4].iter().map(|q| q.0).collect::<Vec<_>>(), scales)
        };

        SPARE.take();
        let fresh = read(&Panel::all(&w, 0..rows));
        SPARE.take();
        let poisoned = Panel { group: 16, quads: vec![Quad([u32::MAX; PANEL_ROWS]); 4 * cols], scales: vec![f32::NAN; 1024], offsets: vec![f32::NAN; 1024] };
        SPARE.set(vec![poisoned]);
        let reused = read(&Panel::all(&w, 0..rows));
        assert_eq!(reused, fresh);
        assert!(fresh.2.iter().all(|bits| !f32::from_bits(*bits).is_nan()));
    }
}
