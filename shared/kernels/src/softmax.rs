//! Softmax over rows: a decode step's attention weights ([`crate::decode_attention`]) and a
//! prompt's ([`softmax_rows`]), with the exponential in operations that vectorize.
//!
//! candle's softmax takes one libm `expf` call per score; a 512-token prompt's attention has
//! 92 million scores.

use crate::exp::exp_nonpositive;
use crate::{in_chunks, ShapeError, CHUNK_VALUES};

/// Each row of `cols` values of `x` replaced by its softmax, rows spread over the compute pool.
/// A row's largest value is its own `eˣ = 1`, so a row of scores whose mask leaves at least one
/// finite value stays finite; masked (-∞) scores weigh 0.
pub fn softmax_rows(x: &mut [f32], cols: usize) -> Result<(), ShapeError> {
    if cols == 0 || x.len() % cols != 0 {
        return Err(ShapeError(format!("{} values are not rows of {cols}", x.len())));
    }
    let rows_per_item = (CHUNK_VALUES / cols).max(1);
    in_chunks(x, rows_per_item * cols, |_, rows| softmax_each(rows, cols));
    Ok(())
}

widest_registers!(fn softmax_each(x: &mut [f32], cols: usize) => softmax_each_portable);

#[inline(always)]
fn softmax_each_portable(x: &mut [f32], cols: usize) {
    x.chunks_exact_mut(cols).for_each(softmax);
}

/// In place, with the exponential of [`exp_nonpositive`] and the maximum and sum taken in
/// lanes, so that every loop vectorizes (with libm's `expf`, the softmax took as long as the
/// rest of the step's attention together). A weight that would be subnormal is 0, as
/// [`exp_nonpositive`]'s are (see there why).
#[inline(always)]
pub(crate) fn softmax(x: &mut [f32]) {
    let max = lanes(x, f32::NEG_INFINITY, f32::max);
    x.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max));
    let sum = lanes(x, 0.0, |a, b| a + b);
    let (inv, smallest) = (1.0 / sum, f32::MIN_POSITIVE * sum);
    // Compared before the multiply, which would otherwise make the subnormal number.
    x.iter_mut().for_each(|v| *v = if *v < smallest { 0.0 } else { *v * inv });
}

/// `x` folded by `f` from `init`, 16 lanes at a time.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    let lanes = chunks.fold([init; 16], |acc, c| std::array::from_fn(|l| f(acc[l], c[l])));
    lanes.into_iter().fold(tail, f)
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

    #[test]
    fn rows_match_their_definition() {
        // Row lengths off and on a multiple of 16 lanes; few rows (the calling thread) and many
        // (the pool, the last item partial); a causal mask's -∞ in every row but the first.
        for (rows, cols) in [(3, 21), (700, 64), (37, 1000)] {
            let mut x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0).collect();
            for r in 1..rows {
                x[r * cols + cols - 1] = f32::NEG_INFINITY;
            }
            let want: Vec<f32> = x.chunks(cols).flat_map(reference).collect();
            softmax_rows(&mut x, cols).unwrap();
            for (i, (got, want)) in x.iter().zip(&want).enumerate() {
                assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "{rows}×{cols}, value {i}: {got} vs {want}");
            }
            for row in x.chunks(cols) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            assert!(x.iter().all(|w| w.is_normal() || *w == 0.0), "{rows}×{cols}: a subnormal weight");
            for r in 1..rows {
                assert_eq!(x[r * cols + cols - 1], 0.0, "{rows}×{cols}: row {r}'s masked score");
            }
        }
    }

    #[test]
    fn weights_are_never_subnormal() {
        // e⁻⁸⁶ is normal, but a thousandth of it is not.
        let mut row = vec![0.0f32; 1000];
        row[7] = -86.0;
        softmax_rows(&mut row, 1000).unwrap();
        assert_eq!(row[7], 0.0);
        assert!((row[0] - 1.0 / 999.0).abs() < 1e-9, "{}", row[0]);
    }

    #[test]
    fn rows_must_divide_the_values() {
        let err = softmax_rows(&mut [0.0; 10], 3).unwrap_err();
        assert!(err.0.contains("10 values are not rows of 3"), "{err}");
    }
}
