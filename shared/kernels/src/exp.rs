//! The exponential in operations that vectorize, for the loops that need one per value
//! (softmax, SiLU): libm's `expf` is a call per value, which keeps such a loop scalar.

/// `eˣ` for `x ≤ 0`, within 2 ulp (e^x = 2ⁿ · eʳ with `n` the nearest integer to x·log₂e and
/// |r| ≤ ln2/2, eʳ by its Taylor polynomial of degree 7), and exactly 0 below -87, where eˣ
/// would be a subnormal number: an Intel core takes a microcode assist for every multiply that
/// reads or makes one. A causal mask's -∞ scores had weighed e⁻⁸⁷, which the softmax's
/// normalization made subnormal, and a prompt's attention products in candle's `gemm` then took
/// 53 % of a 128-token prefill on a Xeon (Emerald Rapids, `perf`; prefill 37–41 → 99–109 tok/s).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const SMALLEST: f32 = -87.0;
    // ln 2 as a part with few digits (`n · LN2_HI` is exact) and the rest.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // e⁻⁸⁷ is still above f32's smallest normal number (2⁻¹²⁶, n = -126 and eʳ > 1.4).
    let clamped = x.max(SMALLEST);
    // Adding and taking away 1.5·2²³ rounds to the nearest integer.
    let shifted = clamped * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, clamped));
    let p = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0].iter().fold(1.0 / 5040.0, |p: f32, &c| p.mul_add(r, c));
    // `shifted`'s low mantissa bits hold n as an integer, so its bits plus 127, moved into the
    // exponent field, are 2ⁿ (-126 ≤ n ≤ 0). `n as i32` would say the same, but its saturating
    // conversion compiles to a scalar conversion per lane, which kept the loops around it scalar.
    let e = p * f32::from_bits((shifted.to_bits() + 127) << 23);
    if x < SMALLEST {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_is_within_two_ulp() {
        for i in 0..=100_000 {
            let x = -87.0 * i as f32 / 100_000.0;
            let (got, want) = (exp_nonpositive(x), (x as f64).exp());
            assert!(((got as f64 - want) / want).abs() < 2.0 * f32::EPSILON as f64, "e^{x}: {got} vs {want}");
        }
        for x in [-87.01, -100.0, -1000.0, f32::NEG_INFINITY] {
            assert_eq!(exp_nonpositive(x), 0.0, "e^{x}");
        }
        assert!(exp_nonpositive(-87.0).is_normal());
    }
}
