//! The GGML block formats this crate reads, byte for byte as in a GGUF file.

/// Values per block of the legacy types (and per sub-block of the K-quants).
pub const BLOCK: usize = 32;
/// Values per K-quant super-block.
pub const SUPER_BLOCK: usize = 256;

/// A weight block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// `f16` scale, then 32 signed bytes: value = d · q.
    Q8_0,
    /// `f16` scale, then 16 bytes of nibbles (low nibbles are values 0..16, high nibbles
    /// 16..32): value = d · (q − 8).
    Q4_0,
    /// `f16` scale d and minimum m, then Q4_0's 16 bytes of nibbles: value = d · q + m.
    Q4_1,
    /// `f16` scale, 4 bytes of fifth bits (bit v of the little-endian word is value v's), then
    /// Q4_0's nibbles: value = d · (q − 16), q of 5 bits (see [`legacy_code`]).
    Q5_0,
    /// `f16` d and m, then Q5_0's fifth bits and nibbles: value = d · q + m.
    Q5_1,
    /// 256 values in 16 sub-blocks of 16: 16 bytes of a 4-bit scale (low) and a 4-bit minimum
    /// (high) per sub-block, 64 bytes of 2-bit codes (see [`q2_k_code`]), `f16` d and dmin:
    /// value = d · scale_j · q − dmin · min_j.
    Q2K,
    /// 256 values in 16 sub-blocks of 16: 32 bytes of high bits, 64 bytes of 2-bit low codes
    /// (see [`q3_k_code`]), 12 bytes of 6-bit scales (see [`q3_k_scales`]), `f16` d:
    /// value = d · (scale_j − 32) · (q − 4), q of 3 bits.
    Q3K,
    /// 256 values in 8 sub-blocks of 32: `f16` d and dmin, 12 bytes of 6-bit scales and mins
    /// (see [`q4_k_scales`]), then 128 bytes of nibbles, 32 bytes per pair of sub-blocks (low
    /// nibbles the first, high nibbles the second): value = d · scale_j · q − dmin · min_j.
    Q4K,
    /// Q4_K with a fifth bit per value: `f16` d and dmin, the same 12 bytes of scales and mins,
    /// 32 bytes of high bits (bit j of byte l is the high bit of value l of sub-block j), then
    /// the 128 bytes of nibbles as in Q4_K (see [`q5_k_value`]).
    Q5K,
    /// 256 values in 16 sub-blocks of 16: 128 bytes of low nibbles, 64 bytes of high bit pairs,
    /// 16 `i8` scales, `f16` d: value = d · scale_j · (q − 32), q of 6 bits (see [`q6_k_value`]).
    Q6K,
    /// Q4_0 as AVX2's tiles read it fastest, not a file's type: each run of eight blocks of a row
    /// (the last run may be shorter) keeps its `f16` scales first, one after another, then each
    /// block's 16 bytes of nibbles ([`BlockType::rearrange`]).
    Q4_0ScalesFirst,
    /// Q4_K as AVX-512's decode tiles read it, not a file's type: each [`INTERLEAVED_ROWS`] rows
    /// keep their blocks together, one 2,304-byte group per super-block, every field's 2 or 4
    /// bytes of the 16 rows side by side, so that one 512-bit register holds the same field of
    /// every row ([`BlockType::rearrange`]): the 16 `f16` d, the 16 `f16` dmin, then each of the
    /// three words of scales, then each of the 32 words of nibbles.
    Q4KInterleaved,
    /// Q5_K laid out as [`BlockType::Q4KInterleaved`] is: one 2,816-byte group per super-block
    /// of 16 rows, the 16 `f16` d, the 16 `f16` dmin, then each of the three words of scales,
    /// the eight words of high bits and the 32 words of nibbles of the 16 rows side by side.
    Q5KInterleaved,
    /// Q4_0 laid out as [`BlockType::Q4KInterleaved`] is, for AVX-512's tiles: one 288-byte
    /// group per block of 16 rows, the 16 `f16` scales, then each of the four words of nibbles
    /// of the 16 rows side by side.
    Q4_0Interleaved,
    /// Q5_0 laid out as [`BlockType::Q4_0Interleaved`] is: the 16 `f16` scales, the 16 words of
    /// fifth bits, then each of the four words of nibbles of the 16 rows side by side.
    Q5_0Interleaved,
    /// Q8_0 laid out as [`BlockType::Q4_0Interleaved`] is: the 16 `f16` scales, then each of the
    /// eight words of codes of the 16 rows side by side.
    Q8_0Interleaved,
    /// Q4_1 laid out as [`BlockType::Q4_0Interleaved`] is, the 16 `f16` minimums after the
    /// scales.
    Q4_1Interleaved,
    /// Q5_1 laid out as [`BlockType::Q5_0Interleaved`] is, the 16 `f16` minimums after the
    /// scales.
    Q5_1Interleaved,
    /// Q6_K laid out as [`BlockType::Q4KInterleaved`] is, its fields in the file's order: one
    /// 3,360-byte group per super-block of 16 rows, each of the 32 words of low nibbles, each of
    /// the 16 words of high bit pairs and each of the four words of `i8` scales of the 16 rows
    /// side by side, then the 16 `f16` d.
    Q6KInterleaved,
    /// Q3_K laid out as [`BlockType::Q6KInterleaved`] is: one 1,760-byte group per super-block
    /// of 16 rows, each of the eight words of high bits, the 16 words of 2-bit codes and the
    /// three words of scales of the 16 rows side by side, then the 16 `f16` d.
    Q3KInterleaved,
    /// Q2_K laid out as [`BlockType::Q6KInterleaved`] is: one 1,344-byte group per super-block
    /// of 16 rows, each of the four words of scales and minimums and the 16 words of 2-bit codes
    /// of the 16 rows side by side, then the 16 `f16` d and the 16 `f16` dmin.
    Q2KInterleaved,
}

/// Rows whose blocks the 16-row layouts ([`BlockType::Q4KInterleaved`],
/// [`BlockType::Q8_0Interleaved`], [`BlockType::Q4_0Interleaved`], ...) keep together.
pub const INTERLEAVED_ROWS: usize = 16;

impl BlockType {
    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q8_0
            | Self::Q8_0Interleaved
            | Self::Q4_0
            | Self::Q4_0ScalesFirst
            | Self::Q4_0Interleaved
            | Self::Q4_1
            | Self::Q4_1Interleaved
            | Self::Q5_0
            | Self::Q5_0Interleaved
            | Self::Q5_1
            | Self::Q5_1Interleaved => BLOCK,
            Self::Q2K
            | Self::Q2KInterleaved
            | Self::Q3K
            | Self::Q3KInterleaved
            | Self::Q4K
            | Self::Q4KInterleaved
            | Self::Q5K
            | Self::Q5KInterleaved
            | Self::Q6K
            | Self::Q6KInterleaved => SUPER_BLOCK,
        }
    }

    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q8_0Interleaved => 2 + BLOCK,
            Self::Q4_0 | Self::Q4_0ScalesFirst | Self::Q4_0Interleaved => 2 + BLOCK / 2,
            Self::Q4_1 | Self::Q4_1Interleaved => 2 + 2 + BLOCK / 2,
            Self::Q5_0 | Self::Q5_0Interleaved => 2 + 4 + BLOCK / 2,
            Self::Q5_1 | Self::Q5_1Interleaved => 2 + 2 + 4 + BLOCK / 2,
            Self::Q2K | Self::Q2KInterleaved => SUPER_BLOCK / 16 + SUPER_BLOCK / 4 + 2 + 2,
            Self::Q3K | Self::Q3KInterleaved => SUPER_BLOCK / 8 + SUPER_BLOCK / 4 + 12 + 2,
            Self::Q4K | Self::Q4KInterleaved => 2 + 2 + 12 + SUPER_BLOCK / 2,
            Self::Q5K | Self::Q5KInterleaved => 2 + 2 + 12 + SUPER_BLOCK / 8 + SUPER_BLOCK / 2,
            Self::Q6K | Self::Q6KInterleaved => SUPER_BLOCK / 2 + SUPER_BLOCK / 4 + SUPER_BLOCK / 16 + 2,
        }
    }

    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_values() * self.block_bytes()
    }

    /// How many rows this layout keeps together: a matrix's rows are a whole number of them.
    pub const fn rows_together(self) -> usize {
        match self {
            Self::Q4KInterleaved
            | Self::Q5KInterleaved
            | Self::Q6KInterleaved
            | Self::Q3KInterleaved
            | Self::Q2KInterleaved
            | Self::Q8_0Interleaved
            | Self::Q4_0Interleaved
            | Self::Q4_1Interleaved
            | Self::Q5_0Interleaved
            | Self::Q5_1Interleaved => INTERLEAVED_ROWS,
            _ => 1,
        }
    }

    /// Whether a legacy block adds a minimum `m` (Q4_1, Q5_1) rather than subtracting an offset
    /// from its codes.
    pub const fn has_minimum(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// The legacy type of 4-bit codes with a fifth bit or not, and a minimum or not: Q4_0, Q4_1,
    /// Q5_0 or Q5_1.
    pub const fn nibbles(fifth_bit: bool, minimum: bool) -> Self {
        match (fifth_bit, minimum) {
            (false, false) => Self::Q4_0,
            (false, true) => Self::Q4_1,
            (true, false) => Self::Q5_0,
            (true, true) => Self::Q5_1,
        }
    }

    /// What the codes of Q4_0 (8), Q5_0 (16), Q3_K (4) and Q6_K (32) are less; `None` for the
    /// others (Q8_0's are signed; the rest have minimums).
    pub const fn code_offset(self) -> Option<i8> {
        match self {
            Self::Q4_0 | Self::Q4_0ScalesFirst | Self::Q4_0Interleaved => Some(8),
            Self::Q5_0 | Self::Q5_0Interleaved => Some(16),
            Self::Q3K | Self::Q3KInterleaved => Some(4),
            Self::Q6K | Self::Q6KInterleaved => Some(32),
            _ => None,
        }
    }

    /// Whether a legacy block's codes have a fifth bit (Q5_0, Q5_1).
    pub const fn has_fifth_bit(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
    }

    /// The type a file holds these blocks as: Q4_0 for [`BlockType::Q4_0ScalesFirst`], and the
    /// type a 16-row layout ([`BlockType::Q4_0Interleaved`], ...) is of.
    pub const fn in_file(self) -> Self {
        match self {
            Self::Q8_0Interleaved => Self::Q8_0,
            Self::Q4_0ScalesFirst | Self::Q4_0Interleaved => Self::Q4_0,
            Self::Q4_1Interleaved => Self::Q4_1,
            Self::Q5_0Interleaved => Self::Q5_0,
            Self::Q5_1Interleaved => Self::Q5_1,
            Self::Q4KInterleaved => Self::Q4K,
            Self::Q5KInterleaved => Self::Q5K,
            Self::Q6KInterleaved => Self::Q6K,
            Self::Q3KInterleaved => Self::Q3K,
            Self::Q2KInterleaved => Self::Q2K,
            other => other,
        }
    }

    /// Rows of `cols` values rearranged in place from the file's layout ([`BlockType::in_file`])
    /// into this one, or with `back` from this one into the file's; nothing for a file's type.
    /// `rows` holds a whole number of [`BlockType::rows_together`].
    pub fn rearrange(self, rows: &mut [u8], cols: usize, back: bool) {
        if self == self.in_file() {
            return;
        }
        let mut copy = vec![0u8; self.rows_together() * self.row_bytes(cols)];
        for rows in rows.chunks_exact_mut(copy.len()) {
            copy.copy_from_slice(rows);
            self.rearrange_into(&copy, rows, cols, back);
        }
    }

    /// Rows of `cols` values in the file's layout ([`BlockType::in_file`]), `from`, written into
    /// `to` in this one (a copy for a file's type), or with `back` from this one into the file's:
    /// a model read from a file is laid out on its way into memory, not read, then rearranged.
    /// Both hold a whole number of [`BlockType::rows_together`], as many bytes.
    pub fn rearrange_into(self, from: &[u8], to: &mut [u8], cols: usize, back: bool) {
        assert_eq!(from.len(), to.len(), "{self:?} rows are rearranged into as many bytes");
        let unit = self.rows_together() * self.row_bytes(cols);
        for (from, to) in from.chunks_exact(unit).zip(to.chunks_exact_mut(unit)) {
            match self {
                Self::Q4_0ScalesFirst => scales_first(from, to, cols, back),
                _ if self.rows_together() == INTERLEAVED_ROWS => interleave(self.in_file(), from, to, cols, back),
                _ => to.copy_from_slice(from),
            }
        }
    }
}

/// Where the 16-row layouts keep the 16 rows' copies of the field at byte `at` of a block
/// (Q4_K: d at 0, dmin at 2, then 4-byte words, scales from 4, nibbles from 16; Q5_K: high bits
/// from 16, nibbles from 48; Q6_K: words, low nibbles from 0, high bit pairs from 128, scales
/// from 192, then d at 208; Q3_K: words, high bits from 0, 2-bit codes from 32, scales from
/// 96, then d at 108; Q2_K: words, scales from 0, codes from 16, then d at 80 and dmin at 82;
/// the legacy types: d at 0, Q4_1's and Q5_1's m at 2, then words,
/// [`legacy_layout`]), from the start of their group: row `r`'s at `len · r` past it (2 bytes
/// for an `f16`, 4 for a word).
pub const fn interleaved_at(at: usize) -> usize {
    at * INTERLEAVED_ROWS
}

/// 16 rows of K-quant or legacy blocks (`file`), `cols` values each, written from `from` into
/// `to` as the 16-row layout of that type, or with `back` from that layout to the file's.
fn interleave(file: BlockType, from: &[u8], to: &mut [u8], cols: usize, back: bool) {
    let (row_bytes, bytes) = (file.row_bytes(cols), file.block_bytes());
    // The `f16` fields (Q4_K's and Q5_K's d and dmin, Q3_K's and Q6_K's d, Q2_K's d and dmin,
    // the legacy types' d and m); the rest is words.
    let halves = match file {
        BlockType::Q4K | BlockType::Q5K => 0..4,
        BlockType::Q3K | BlockType::Q6K => bytes - 2..bytes,
        BlockType::Q2K => bytes - 4..bytes,
        _ => 0..legacy_layout(file).0,
    };
    for b in 0..cols / file.block_values() {
        let split = b * INTERLEAVED_ROWS * bytes;
        // One field of every row after another ([`interleaved_at`]).
        for (run, len) in [(0..halves.start, 4), (halves.clone(), 2), (halves.end..bytes, 4)] {
            let mut at = run.start;
            while at < run.end {
                // Four words at a time where four are left: each row's 16 bytes in one move.
                let take = if len == 4 && at + 16 <= run.end { 16 } else { len };
                let (first, lanes) = (b * bytes + at, split + interleaved_at(at));
                let lanes = lanes..lanes + INTERLEAVED_ROWS * take;
                match (take, back) {
                    (16, false) => gather::<16, 4>(from, first, row_bytes, &mut to[lanes]),
                    (4, false) => gather::<4, 4>(from, first, row_bytes, &mut to[lanes]),
                    (_, false) => gather::<2, 2>(from, first, row_bytes, &mut to[lanes]),
                    (16, true) => scatter::<16, 4>(&from[lanes], to, first, row_bytes),
                    (4, true) => scatter::<4, 4>(&from[lanes], to, first, row_bytes),
                    (_, true) => scatter::<2, 2>(&from[lanes], to, first, row_bytes),
                }
                at += take;
            }
        }
    }
}

/// `N` bytes of each of 16 rows (`row_bytes` apart in `rows`, from `first`), fields of `LEN`
/// bytes, written into `lanes` field by field, each field of the 16 rows side by side.
fn gather<const N: usize, const LEN: usize>(rows: &[u8], first: usize, row_bytes: usize, lanes: &mut [u8]) {
    let mut fields = [[0u8; N]; INTERLEAVED_ROWS];
    for (r, row) in fields.iter_mut().enumerate() {
        row.copy_from_slice(&rows[first + r * row_bytes..][..N]);
    }
    // Through a copy of fixed size, which the compiler moves in registers (shuffles), as it
    // does not into `lanes` (`--bench layout`, one thread, Q4_K: 10.0 GB/s, 8.7 written into
    // `lanes`, 5.3 a field at a time).
    let mut side_by_side = [[0u8; N]; INTERLEAVED_ROWS];
    let out = side_by_side.as_flattened_mut();
    for k in 0..N / LEN {
        for (r, row) in fields.iter().enumerate() {
            out[(INTERLEAVED_ROWS * k + r) * LEN..][..LEN].copy_from_slice(&row[LEN * k..][..LEN]);
        }
    }
    lanes.copy_from_slice(side_by_side.as_flattened());
}

/// [`gather`] the other way: `lanes` back into the 16 rows.
fn scatter<const N: usize, const LEN: usize>(lanes: &[u8], rows: &mut [u8], first: usize, row_bytes: usize) {
    let mut side_by_side = [[0u8; N]; INTERLEAVED_ROWS];
    side_by_side.as_flattened_mut().copy_from_slice(lanes);
    let side_by_side = side_by_side.as_flattened();
    let mut fields = [[0u8; N]; INTERLEAVED_ROWS];
    for k in 0..N / LEN {
        for (r, row) in fields.iter_mut().enumerate() {
            row[LEN * k..][..LEN].copy_from_slice(&side_by_side[(INTERLEAVED_ROWS * k + r) * LEN..][..LEN]);
        }
    }
    for (r, row) in fields.iter().enumerate() {
        rows[first + r * row_bytes..][..N].copy_from_slice(row);
    }
}

/// A row of Q4_0 blocks, `cols` values, written from `from` into `to` as
/// [`BlockType::Q4_0ScalesFirst`] (each run's scales, then its nibbles), or with `back` from that
/// layout to Q4_0's.
fn scales_first(from: &[u8], to: &mut [u8], cols: usize, back: bool) {
    let (blocks, bytes, nibbles) = (cols / BLOCK, BlockType::Q4_0.block_bytes(), BLOCK / 2);
    for b in 0..blocks {
        // Block `b`'s scale, then its nibbles: where Q4_0 has them, where its run of eight has
        // them.
        let (block, run) = (bytes * b, b & !7);
        let (scale, codes) = (bytes * run + 2 * (b - run), bytes * run + 2 * (blocks - run).min(8) + nibbles * (b - run));
        for (file, split) in [(block..block + 2, scale..scale + 2), (block + 2..block + bytes, codes..codes + nibbles)] {
            let (source, target) = if back { (split, file) } else { (file, split) };
            to[target].copy_from_slice(&from[source]);
        }
    }
}

/// Where a Q4_0, Q4_1, Q5_0 or Q5_1 block keeps its 32 bits of fifth bits (Q5_0, Q5_1) and its
/// 16 bytes of nibbles: after the `f16` d and, with a minimum, the `f16` m.
pub const fn legacy_layout(ty: BlockType) -> (usize, usize) {
    let high_bits = if ty.has_minimum() { 4 } else { 2 };
    (high_bits, if ty.has_fifth_bit() { high_bits + 4 } else { high_bits })
}

/// Value `v` (0..32) of a Q4_0, Q4_1, Q5_0 or Q5_1 block as its unsigned code: the low nibble of
/// byte `v` of the nibbles for the first 16 values, the high nibble of byte `v − 16` for the
/// others, and for Q5_0 and Q5_1 bit `v` of the fifth bits on top.
pub fn legacy_code(ty: BlockType, block: &[u8], v: usize) -> u8 {
    let (high_bits, nibbles) = legacy_layout(ty);
    let q = block[nibbles + v % 16];
    let low = if v < 16 { q & 0xF } else { q >> 4 };
    match ty.has_fifth_bit() {
        true => low | (((u32::from_le_bytes(block[high_bits..high_bits + 4].try_into().unwrap()) >> v) & 1) as u8) << 4,
        false => low,
    }
}

/// A Q4_0, Q4_1, Q5_0 or Q5_1 block's `(scale, offset)`: value = scale · code − offset.
pub fn legacy_scale_offset(ty: BlockType, block: &[u8]) -> (f32, f32) {
    let d = f16_at(block, 0);
    match ty.code_offset() {
        Some(code_offset) => (d, f32::from(code_offset) * d),
        None => (d, -f16_at(block, 2)),
    }
}

/// The little-endian `f16` at `bytes[at..at + 2]`.
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The eight 6-bit `(scale, min)` pairs of a Q4_K block's 12 scale bytes: pairs 0..4 are the low
/// six bits of bytes 0..4 and 4..8; pairs 4..8 take four bits from bytes 8..12 and their top two
/// from the high bits of bytes 0..8. Done on 32-bit words, four pairs at a time, because a decode
/// step unpacks them for every 256 weights.
#[inline(always)]
pub fn q4_k_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let scales = [w0 & LOW6, (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4)];
    let mins = [w1 & LOW6, ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4)];
    let bytes = |w: [u32; 2]| {
        let (a, b) = (w[0].to_le_bytes(), w[1].to_le_bytes());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    };
    (bytes(scales), bytes(mins))
}

/// Within each 128-value half of a Q2_K or Q3_K block, the four runs of 32 values take bit pairs
/// 0, 1, 2, 3 of the same 32 bytes of 2-bit codes: value `v`'s byte and shift.
pub(crate) const fn two_bit_code_at(v: usize) -> (usize, usize) {
    (32 * (v / 128) + v % 32, 2 * (v % 128 / 32))
}

/// The byte of a Q3_K block's 32 high-bit bytes, and the bit in it, that hold value `v`'s high
/// bit.
pub(crate) const fn q3_k_high_bit_at(v: usize) -> (usize, usize) {
    (v % 32, v / 32)
}

/// Value `v` (0..256) of a Q2_K block as its 2-bit code.
pub fn q2_k_code(block: &[u8], v: usize) -> u8 {
    let (byte, shift) = two_bit_code_at(v);
    (block[16 + byte] >> shift) & 3
}

/// Value `v` (0..256) of a Q3_K block as its unsigned 3-bit code (the value is `code − 4`): the
/// low two bits as in Q2_K, the high bit as [`q3_k_high_bit_at`] says.
pub fn q3_k_code(block: &[u8], v: usize) -> u8 {
    let (byte, shift) = two_bit_code_at(v);
    let low = (block[32 + byte] >> shift) & 3;
    let (high_byte, bit) = q3_k_high_bit_at(v);
    low | ((block[high_byte] >> bit) & 1) << 2
}

/// The sixteen 6-bit scales of a Q3_K block's 12 scale bytes (each scale is its code less 32):
/// code j has its low four bits in the low (j < 8) or high (j ≥ 8) nibble of byte j % 8, its
/// top two in bits 2·(j / 4) of byte 8 + j % 4. Done on 32-bit words, four codes at a time, as
/// [`q4_k_scales`].
#[inline(always)]
pub fn q3_k_scales(packed: &[u8]) -> [u8; 16] {
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (w0, w1, top) = (word(0), word(1), word(2));
    let codes = [
        (w0 & LOW4) | ((top & LOW2) << 4),
        (w1 & LOW4) | (((top >> 2) & LOW2) << 4),
        ((w0 >> 4) & LOW4) | (((top >> 4) & LOW2) << 4),
        ((w1 >> 4) & LOW4) | (((top >> 6) & LOW2) << 4),
    ];
    std::array::from_fn(|j| codes[j / 4].to_le_bytes()[j % 4])
}

/// Value `v` (0..256) of a Q5_K block as its unsigned 5-bit code (the value is
/// `d · scale_j · code − dmin · min_j`, j = v / 32): the nibble as in Q4_K, and bit j of high
/// byte `v % 32`.
pub fn q5_k_value(block: &[u8], v: usize) -> u8 {
    let (j, l) = (v / BLOCK, v % BLOCK);
    let ql = block[48 + BLOCK * (j / 2) + l];
    let low = if j % 2 == 0 { ql & 0xF } else { ql >> 4 };
    low | ((block[16 + l] >> j) & 1) << 4
}

/// Value `v` (0..256) of a Q6_K block as its unsigned 6-bit code (the value is `code − 32`):
/// each 128-value half keeps 64 bytes of nibbles and 32 bytes of bit pairs; within a half, the
/// four runs of 32 values take the low nibbles of bytes 0..32, of bytes 32..64, then the high
/// nibbles of each, and bit pairs 0, 1, 2, 3 of the same 32 bytes of `qh`.
pub fn q6_k_value(block: &[u8], v: usize) -> u8 {
    let (half, run, l) = (v / 128, v % 128 / 32, v % 32);
    let ql = block[64 * half + 32 * (run % 2) + l];
    let qh = block[128 + 32 * half + l];
    let low = if run < 2 { ql & 0xF } else { ql >> 4 };
    low | ((qh >> (2 * run)) & 3) << 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_first_puts_each_runs_scales_first_and_back() {
        // Eleven blocks a row: a run of eight, then one of three.
        let (rows, cols) = (3, 11 * BLOCK);
        let row_bytes = BlockType::Q4_0.row_bytes(cols);
        let file: Vec<u8> = (0..rows * row_bytes).map(|at| (at * 7 % 251) as u8).collect();
        let mut split = file.clone();
        BlockType::Q4_0ScalesFirst.rearrange(&mut split, cols, false);
        for (r, (file, split)) in file.chunks_exact(row_bytes).zip(split.chunks_exact(row_bytes)).enumerate() {
            for b in 0..11 {
                let (scale, codes) = if b < 8 { (2 * b, 16 + 16 * b) } else { (144 + 2 * (b - 8), 144 + 6 + 16 * (b - 8)) };
                assert_eq!(split[scale..scale + 2], file[18 * b..18 * b + 2], "row {r}, block {b}'s scale");
                assert_eq!(split[codes..codes + 16], file[18 * b + 2..18 * (b + 1)], "row {r}, block {b}'s nibbles");
            }
        }
        assert_eq!(in_file_and_back(BlockType::Q4_0ScalesFirst, &file, &split, cols), file);
    }

    /// `laid_out`, `cols` values a row, back in the file's layout, after checking that the file's
    /// rows written out of place come out as `laid_out` (rearranged in place).
    fn in_file_and_back(ty: BlockType, file: &[u8], laid_out: &[u8], cols: usize) -> Vec<u8> {
        let mut into = vec![0; file.len()];
        ty.rearrange_into(file, &mut into, cols, false);
        assert!(into == laid_out, "{ty:?} laid out in place and out of place alike");
        let mut back = laid_out.to_vec();
        ty.rearrange(&mut back, cols, true);
        back
    }

    #[test]
    fn interleave_puts_each_field_of_16_rows_side_by_side_and_back() {
        // Each type with the bytes of its `f16` fields: Q4_K's d and dmin, then 35 words; Q5_K's,
        // 43; Q6_K's 52 words, then d; Q3_K's 27, then d; Q2_K's 20, then d and dmin; Q8_0's d,
        // then 8 words; Q4_0's, 4; Q5_0's, 5; Q4_1's d and m, then 4 words; Q5_1's, 5.
        let types = [
            (BlockType::Q4KInterleaved, 0..4),
            (BlockType::Q5KInterleaved, 0..4),
            (BlockType::Q6KInterleaved, 208..210),
            (BlockType::Q3KInterleaved, 108..110),
            (BlockType::Q2KInterleaved, 80..84),
            (BlockType::Q8_0Interleaved, 0..2),
            (BlockType::Q4_0Interleaved, 0..2),
            (BlockType::Q5_0Interleaved, 0..2),
            (BlockType::Q4_1Interleaved, 0..4),
            (BlockType::Q5_1Interleaved, 0..4),
        ];
        for (layout, halves) in types {
            let ty = layout.in_file();
            let (rows, cols) = (32, 2 * ty.block_values());
            let (row_bytes, bytes) = (ty.row_bytes(cols), ty.block_bytes());
            let file: Vec<u8> = (0..rows * row_bytes).map(|at| (at * 7 % 251) as u8).collect();
            let mut split = file.clone();
            layout.rearrange(&mut split, cols, false);
            for r in 0..rows {
                for b in 0..2 {
                    let block = &file[r * row_bytes + b * bytes..][..bytes];
                    let (group, lane) = (r / 16 * 16 * row_bytes + b * 16 * bytes, r % 16);
                    for at in halves.clone().step_by(2) {
                        assert_eq!(split[group + 16 * at + 2 * lane..][..2], block[at..at + 2], "{ty:?} row {r}, block {b}'s f16 at {at}");
                    }
                    for at in (0..halves.start).chain(halves.end..bytes).step_by(4) {
                        assert_eq!(split[group + 16 * at + 4 * lane..][..4], block[at..at + 4], "{ty:?} row {r}, block {b}'s word at {at}");
                    }
                }
            }
            assert!(in_file_and_back(layout, &file, &split, cols) == file, "{ty:?} back as the file has it");
        }
    }
}
