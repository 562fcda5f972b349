//! The portable definition of every product: one weight row against one activation row.

use crate::activations::QuantizedRows;
use crate::blocks::{scale, BlockType, BLOCK};

/// `Σ w·x` over weight row `w` (in `ty`'s blocks) and activation row `i` of `x`.
pub fn dot(ty: BlockType, w: &[u8], x: &QuantizedRows, i: usize) -> f32 {
    let (xd, xq) = x.row(i);
    let mut sum = 0f32;
    for ((wb, &dx), xb) in w.chunks_exact(ty.block_bytes()).zip(xd).zip(xq.chunks_exact(BLOCK)) {
        let q = &wb[2..];
        let int: i32 = match ty {
            BlockType::Q8_0 => q.iter().zip(xb).map(|(&w, &x)| w as i8 as i32 * x as i32).sum(),
            BlockType::Q4_0 => (0..BLOCK / 2)
                .map(|j| ((q[j] & 0xF) as i32 - 8) * xb[j] as i32 + ((q[j] >> 4) as i32 - 8) * xb[j + BLOCK / 2] as i32)
                .sum(),
        };
        sum += scale(wb) * dx * int as f32;
    }
    sum
}
