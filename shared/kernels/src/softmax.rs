//! The softmax of attention scores ([`crate::attention`]), with the exponential in operations
//! that vectorize.
//!
//! candle's softmax takes one libm `expf` call per score; a 512-token prompt's attention has
//! 92 million scores.

use crate::exp::exp_nonpositive;

/// `x` replaced by `e^(x - max x)`, a softmax's weights before their normalization, and their
/// sum: the caller divides what it weighs by the sum once (its output rows), not every weight.
/// The exponential is [`exp_nonpositive`]'s, and the maximum and sum are taken in lanes, so
/// that every loop vectorizes (with libm's `expf`, the softmax took as long as the rest of the
/// step's attention together). A weight is 1 (the maximum's) or below, never subnormal: 0
/// where `eˣ` would be (see [`exp_nonpositive`] why).
#[inline(always)]
pub(crate) fn exponentials(x: &mut [f32]) -> f32 {
    // Not `f32::max`, whose care for NaN kept the loop scalar.
    let max = lanes(x, f32::NEG_INFINITY, |a, b| if a > b { a } else { b });
    x.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max));
    lanes(x, 0.0, |a, b| a + b)
}

/// `x` folded by `f` from `init`, 16 lanes at a time. In loops, not `Iterator::fold`, which the
/// compiler kept as a function of its own, compiled without the caller's wide registers.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let chunks = x.chunks_exact(16);
    let mut folded = init;
    for &v in chunks.remainder() {
        folded = f(folded, v);
    }
    let mut lanes = [init; 16];
    for chunk in chunks {
        for l in 0..16 {
            lanes[l] = f(lanes[l], chunk[l]);
        }
    }
    for lane in lanes {
        folded = f(folded, lane);
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in `f64`, with libm's exponential.
    fn reference(row: &[f32]) -> Vec<f32> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weights: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        weights.iter().map(|w| (w / total) as f32).collect()
    }

    /// [`exponentials`] divided by their sum.
    fn softmax(row: &mut [f32]) {
        let total = exponentials(row);
        row.iter_mut().for_each(|w| *w /= total);
    }

    #[test]
    fn rows_match_their_definition() {
        // Row lengths off and on a multiple of 16 lanes; a causal mask's -∞ in every row but the
        // first.
        for (rows, cols) in [(3, 21), (700, 64), (37, 1000)] {
            let mut x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0).collect();
            for r in 1..rows {
                x[r * cols + cols - 1] = f32::NEG_INFINITY;
            }
            let want: Vec<f32> = x.chunks(cols).flat_map(reference).collect();
            x.chunks_mut(cols).for_each(softmax);
            for (i, (got, want)) in x.iter().zip(&want).enumerate() {
                assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "{rows}×{cols}, value {i}: {got} vs {want}");
            }
            for row in x.chunks(cols) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            for r in 1..rows {
                assert_eq!(x[r * cols + cols - 1], 0.0, "{rows}×{cols}: row {r}'s masked score");
            }
        }
    }

    #[test]
    fn exponentials_are_never_subnormal() {
        // e⁻⁸⁶ is normal, e⁻⁸⁸ would not be.
        let mut row = vec![0.0f32; 1000];
        (row[7], row[8]) = (-86.0, -88.0);
        assert_eq!(exponentials(&mut row), 998.0 + (-86.0f32).exp());
        assert!(row[7].is_normal());
        assert_eq!((row[0], row[8]), (1.0, 0.0));
    }
}
