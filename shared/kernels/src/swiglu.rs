//! SwiGLU's gating, `silu(gate) · up`: the step between a Llama MLP's products.
//!
//! candle computes SiLU one value at a time with libm's `expf`, and the product with `up` in a
//! second pass, both on the calling thread while the compute pool waits: for a prompt that was
//! most of the serial time left between the products. Here both are one pass that vectorizes,
//! spread over the compute pool when the rows are many.

use crate::exp::exp_nonpositive;
use crate::{in_chunks, ShapeError, CHUNK_VALUES};

/// `gate[i] = silu(gate[i]) · up[i]`, where `silu(x) = x / (1 + e⁻ˣ)`; on the compute pool when
/// there are more than a few chunks of values (a decode step's rows are not worth waking it).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<(), ShapeError> {
    if gate.len() != up.len() {
        return Err(ShapeError(format!("SwiGLU's gate has {} values and its up projection {}", gate.len(), up.len())));
    }
    in_chunks(gate, CHUNK_VALUES, |values, gate| silu_mul_chunk(gate, &up[values]));
    Ok(())
}

widest_registers!(fn silu_mul_chunk(gate: &mut [f32], up: &[f32]) => silu_mul_portable);

#[inline(always)]
fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        // The exponential is taken of -|x| so that it never overflows: silu(x) = x / (1 + e⁻ˣ)
        // for x ≥ 0, and x · eˣ / (1 + eˣ) below.
        let e = exp_nonpositive(-x.abs());
        let numerator = if x >= 0.0 { x } else { x * e };
        *g = numerator / (1.0 + e) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in `f64`, with libm's exponential.
    fn reference(gate: f32, up: f32) -> f32 {
        let x = gate as f64;
        (x / (1.0 + (-x).exp()) * up as f64) as f32
    }

    #[test]
    fn gating_matches_its_definition() {
        // Lengths on the calling thread and on the pool, the last chunk partial; gates from
        // far below zero (where silu vanishes) to far above (where it is the identity).
        for len in [7, 2 * CHUNK_VALUES, 5 * CHUNK_VALUES + 13] {
            let gate: Vec<f32> = (0..len).map(|i| -100.0 + 200.0 * i as f32 / len as f32).collect();
            let up: Vec<f32> = (0..len).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
            let mut out = gate.clone();
            silu_mul(&mut out, &up).unwrap();
            for i in 0..len {
                let want = reference(gate[i], up[i]);
                let tolerance = 4.0 * f32::EPSILON * want.abs() + 1e-30;
                assert!((out[i] - want).abs() <= tolerance, "len {len}, silu({}) · {}: {} vs {want}", gate[i], up[i], out[i]);
            }
        }
    }

    #[test]
    fn gating_keeps_infinities_and_nans() {
        let mut gate = [f32::INFINITY, f32::NAN, 0.0, -0.0];
        silu_mul(&mut gate, &[2.0; 4]).unwrap();
        assert_eq!(gate[0], f32::INFINITY);
        assert!(gate[1].is_nan());
        assert_eq!(gate[2..], [0.0, 0.0]);
    }

    #[test]
    fn gating_rejects_mismatched_lengths() {
        let err = silu_mul(&mut [0.0; 4], &[0.0; 3]).unwrap_err();
        assert!(err.0.contains("4 values and its up projection 3"), "{err}");
    }
}
