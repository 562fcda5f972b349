//! The portable definition of every product: one weight row against one activation row.

use crate::activations::QuantizedRows;
use crate::blocks::{f16_at, legacy_code, legacy_scale_offset, q2_k_code, q3_k_code, q3_k_scales, q4_k_scales, q5_k_value, q6_k_value, BlockType, BLOCK};

/// `Σ w·x` over weight row `w` (in `ty`'s blocks, a file's type: [`crate::QMatrix::row_in_file`]
/// reads a row of the kernels' layouts so) and activation row `i` of `x` (quantized in groups of
/// `ty.block_values()`).
pub fn dot(ty: BlockType, w: &[u8], x: &QuantizedRows, i: usize) -> f32 {
    let (xd, xq, xsums) = x.row(i);
    let blocks = w.chunks_exact(ty.block_bytes()).zip(xd).zip(xq.chunks_exact(ty.block_values()));
    let mut sum = 0f32;
    for (b, ((wb, &dx), xb)) in blocks.enumerate() {
        let int_dot = |q: &[u8], x: &[i8], value: fn(u8) -> i32| -> i32 { q.iter().zip(x).map(|(&q, &x)| value(q) * x as i32).sum() };
        sum += dx
            * match ty {
                BlockType::Q8_0 => f16_at(wb, 0) * int_dot(&wb[2..], xb, |q| q as i8 as i32) as f32,
                BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1 => {
                    let (scale, offset) = legacy_scale_offset(ty, wb);
                    let codes: i32 = (0..BLOCK).map(|v| legacy_code(ty, wb, v) as i32 * xb[v] as i32).sum();
                    scale * codes as f32 - offset * xsums[b] as f32
                }
                BlockType::Q2K => {
                    let (mut scaled, mut min_part) = (0i32, 0i32);
                    for (j, &packed) in wb[..16].iter().enumerate() {
                        let values = 16 * j..16 * (j + 1);
                        scaled += (packed & 0xF) as i32 * values.clone().map(|v| q2_k_code(wb, v) as i32 * xb[v] as i32).sum::<i32>();
                        min_part += (packed >> 4) as i32 * values.map(|v| xb[v] as i32).sum::<i32>();
                    }
                    f16_at(wb, 80) * scaled as f32 - f16_at(wb, 82) * min_part as f32
                }
                BlockType::Q3K => {
                    let scales = q3_k_scales(&wb[96..108]);
                    let scaled: i32 = (0..256).map(|v| (scales[v / 16] as i32 - 32) * (q3_k_code(wb, v) as i32 - 4) * xb[v] as i32).sum();
                    f16_at(wb, 108) * scaled as f32
                }
                BlockType::Q4K => {
                    let (scales, mins) = q4_k_scales(&wb[4..16]);
                    let (mut scaled, mut min_part) = (0i32, 0i32);
                    for j in 0..8 {
                        let q = &wb[16 + 32 * (j / 2)..16 + 32 * (j / 2 + 1)];
                        let x = &xb[BLOCK * j..BLOCK * (j + 1)];
                        let dot = if j % 2 == 0 { int_dot(q, x, |q| (q & 0xF) as i32) } else { int_dot(q, x, |q| (q >> 4) as i32) };
                        scaled += scales[j] as i32 * dot;
                        min_part += mins[j] as i32 * xsums[b * 8 + j];
                    }
                    f16_at(wb, 0) * scaled as f32 - f16_at(wb, 2) * min_part as f32
                }
                BlockType::Q5K => {
                    let (scales, mins) = q4_k_scales(&wb[4..16]);
                    let (mut scaled, mut min_part) = (0i32, 0i32);
                    for j in 0..8 {
                        let dot: i32 = (BLOCK * j..BLOCK * (j + 1)).map(|v| q5_k_value(wb, v) as i32 * xb[v] as i32).sum();
                        scaled += scales[j] as i32 * dot;
                        min_part += mins[j] as i32 * xsums[b * 8 + j];
                    }
                    f16_at(wb, 0) * scaled as f32 - f16_at(wb, 2) * min_part as f32
                }
                BlockType::Q6K => {
                    let scales = &wb[192..208];
                    let scaled: i32 = (0..256).map(|v| scales[v / 16] as i8 as i32 * (q6_k_value(wb, v) as i32 - 32) * xb[v] as i32).sum();
                    f16_at(wb, 208) * scaled as f32
                }
                _ => panic!("{ty:?} is the kernels' layout, not a file's type"),
            };
    }
    sum
}
