//! The GGML block formats this crate reads, byte for byte as in a GGUF file.

/// Values per block, for every type here (and for the activations' blocks).
pub const BLOCK: usize = 32;

/// A weight block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// `f16` scale, then 32 signed bytes: value = d · q.
    Q8_0,
    /// `f16` scale, then 16 bytes of nibbles (low nibbles are values 0..16, high nibbles
    /// 16..32): value = d · (q − 8).
    Q4_0,
}

impl BlockType {
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 2 + BLOCK,
            Self::Q4_0 => 2 + BLOCK / 2,
        }
    }

    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }
}

/// The block's scale, stored first as a little-endian `f16`.
pub fn scale(block: &[u8]) -> f32 {
    half::f16::from_le_bytes([block[0], block[1]]).to_f32()
}
