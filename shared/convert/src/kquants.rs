//! Q2_K, Q4_K, Q5_K and Q6_K quantizers that produce the same bytes as `llama-quantize` (ggml's
//! reference quantizers, used when no importance matrix is given). candle ships an older
//! version of these searches, whose blocks decode about as well but differ in their bytes.
//!
//! Every float operation keeps ggml's order and single precision: the searches compare errors,
//! and a different rounding picks a different scale.

use half::f16;

/// Elements per super-block.
const QK_K: usize = 256;
/// ggml treats a group whose largest magnitude is below this as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// The K-quant types this module quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    Q2K,
    Q4K,
    Q5K,
    Q6K,
}

impl KQuant {
    /// The K-quants whose llama.cpp bytes candle's quantizers do not reproduce.
    pub fn for_dtype(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q2K => Some(KQuant::Q2K),
            GgmlDType::Q4K => Some(KQuant::Q4K),
            GgmlDType::Q5K => Some(KQuant::Q5K),
            GgmlDType::Q6K => Some(KQuant::Q6K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            KQuant::Q2K => 84,
            KQuant::Q4K => 144,
            KQuant::Q5K => 176,
            KQuant::Q6K => 210,
        }
    }

    /// Quantizes `x` (a whole number of 256-element super-blocks) into its blocks.
    pub fn quantize(self, x: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(x.len() / QK_K * self.block_bytes());
        for block in x.chunks_exact(QK_K) {
            let block: &[f32; QK_K] = block.try_into().unwrap_or(&[0.0; QK_K]);
            match self {
                KQuant::Q2K => q2_k(block, &mut out),
                KQuant::Q4K => q45_k(block, 15, &mut out),
                KQuant::Q5K => q45_k(block, 31, &mut out),
                KQuant::Q6K => q6_k(block, &mut out),
            }
        }
        out
    }
}

/// Round to nearest, ties to even, exactly as ggml does it (through the float's mantissa).
fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml stores block scales as f16 and decodes them again before the final rounding.
fn through_f16(v: f32) -> (f32, [u8; 2]) {
    let h = f16::from_f32(v);
    (h.to_f32(), h.to_le_bytes())
}

/// Best `scale` and `min` (returned as `-min`) for `x ≈ scale·L + min` with `L` in
/// `0..=nmax`, by a weighted least-squares search over candidate scales (ggml's
/// `make_qkx2_quants`). Writes the chosen levels to `levels`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [u8], rmin: f32, rdelta: f32, nstep: i32, use_mad: bool) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let error = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * levels[i] as f32 + min - x[i];
        best_error += weights[i] * error(diff);
    }
    let mut aux = [0u8; 32];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * error(diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Best symmetric scale for `x ≈ scale·(L − nmax)` weighted by `x²` (ggml's `make_qx_quants`
/// with `rmse_type` 1). Writes levels in `0..2·nmax` to `levels`.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let assign = |iscale: f32, levels: &mut [i8]| {
        for (level, &v) in levels.iter_mut().zip(x) {
            *level = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    assign(iscale, levels);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        let iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            assign(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q2_k(x: &[f32; QK_K], out: &mut Vec<u8>) {
    const Q4SCALE: f32 = 15.0;
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let group = &x[16 * j..16 * j + 16];
        let weights: Vec<f32> = group.iter().map(|v| v.abs()).collect();
        (scales[j], mins[j]) = make_qkx2_quants(3, group, &weights, &mut levels[16 * j..16 * j + 16], -0.5, 0.1, 15, true);
        max_scale = larger(max_scale, scales[j]);
        max_min = larger(max_min, mins[j]);
    }
    let mut packed_scales = [0u8; 16];
    let (mut d, mut d_bytes) = (0.0, [0u8; 2]);
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            packed_scales[j] = nearest_int(iscale * scales[j]) as u8;
        }
        (d, d_bytes) = through_f16(max_scale / Q4SCALE);
    }
    let (mut dmin, mut dmin_bytes) = (0.0, [0u8; 2]);
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for (packed, min) in packed_scales.iter_mut().zip(mins) {
            *packed |= (nearest_int(iscale * min) << 4) as u8;
        }
        (dmin, dmin_bytes) = through_f16(max_min / Q4SCALE);
    }
    for (j, packed) in packed_scales.iter().enumerate() {
        let dj = d * (packed & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dmin * (packed >> 4) as f32;
        for i in 16 * j..16 * j + 16 {
            levels[i] = nearest_int((x[i] + mj) / dj).clamp(0, 3) as u8;
        }
    }
    out.extend_from_slice(&packed_scales);
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            let b = j + l;
            out.push(levels[b] | levels[b + 32] << 2 | levels[b + 64] << 4 | levels[b + 96] << 6);
        }
    }
    out.extend_from_slice(&d_bytes);
    out.extend_from_slice(&dmin_bytes);
}

/// The 6-bit scale of sub-block `j` and its min, from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K (`nmax` 15) and Q5_K (`nmax` 31): eight sub-blocks of 32 with 6-bit scales and mins.
fn q45_k(x: &[f32; QK_K], nmax: i32, out: &mut Vec<u8>) {
    let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let group = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in group {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = group.iter().map(|v| av_x + v.abs()).collect();
        (scales[j], mins[j]) = make_qkx2_quants(nmax, group, &weights, &mut levels[32 * j..32 * j + 32], rmin, 0.1, nstep, false);
        max_scale = larger(max_scale, scales[j]);
        max_min = larger(max_min, mins[j]);
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d, d_bytes) = through_f16(max_scale / 63.0);
    let (dmin, dmin_bytes) = through_f16(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + mj) / dj).clamp(0, nmax) as u8;
        }
    }
    out.extend_from_slice(&d_bytes);
    out.extend_from_slice(&dmin_bytes);
    out.extend_from_slice(&packed);
    if nmax == 31 {
        // High bits: bit 2k / 2k+1 of qh[j] belong to the k-th pair of 32-element halves.
        let mut qh = [0u8; 32];
        for (pair, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                qh[j] |= (levels[n + j] >> 4) << (2 * pair) | (levels[n + j + 32] >> 4) << (2 * pair + 1);
            }
        }
        out.extend_from_slice(&qh);
    }
    for n in (0..QK_K).step_by(64) {
        for j in 0..32 {
            out.push((levels[n + j] & 0xF) | (levels[n + j + 32] & 0xF) << 4);
        }
    }
}

fn q6_k(x: &[f32; QK_K], out: &mut Vec<u8>) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_qx_quants(32, &x[16 * j..16 * j + 16], &mut levels[16 * j..16 * j + 16]);
        if scales[j].abs() > max_abs_scale {
            max_abs_scale = scales[j].abs();
            max_scale = scales[j];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend_from_slice(&[0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let (d, d_bytes) = through_f16(1.0 / iscale);
    let mut packed_scales = [0i8; 16];
    for (packed, scale) in packed_scales.iter_mut().zip(scales) {
        *packed = nearest_int(iscale * scale).min(127) as i8;
    }
    for (j, &packed) in packed_scales.iter().enumerate() {
        let dj = d * packed as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let levels = levels.map(|l| l as u8);
    let (mut ql, mut qh) = (Vec::with_capacity(128), Vec::with_capacity(64));
    for j in (0..QK_K).step_by(128) {
        let mut low = [0u8; 64];
        for l in 0..32 {
            let q = [levels[j + l], levels[j + l + 32], levels[j + l + 64], levels[j + l + 96]];
            low[l] = (q[0] & 0xF) | (q[2] & 0xF) << 4;
            low[l + 32] = (q[1] & 0xF) | (q[3] & 0xF) << 4;
            qh.push(q[0] >> 4 | (q[1] >> 4) << 2 | (q[2] >> 4) << 4 | (q[3] >> 4) << 6);
        }
        ql.extend_from_slice(&low);
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(packed_scales.map(|s| s as u8));
    out.extend_from_slice(&d_bytes);
}

/// ggml's `if (v > max) max = v;`, which (unlike `f32::max`) never lets a NaN in.
fn larger(current: f32, v: f32) -> f32 {
    if v > current {
        v
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 7.6].map(nearest_int), [0, 2, 2, 0, -2, 2, 8]);
    }

    #[test]
    fn blocks_have_ggml_sizes_and_round_trip_through_candle() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let x: Vec<f32> = (0..1024).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for (k, dtype) in [(KQuant::Q2K, GgmlDType::Q2K), (KQuant::Q4K, GgmlDType::Q4K), (KQuant::Q5K, GgmlDType::Q5K), (KQuant::Q6K, GgmlDType::Q6K)] {
            let bytes = k.quantize(&x);
            assert_eq!(bytes.len(), 4 * k.block_bytes());
            assert_eq!(k.block_bytes(), dtype.type_size());
            let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(bytes), &candle_core::Device::Cpu, dtype).unwrap();
            let decoded = QTensor::new(storage, (1024,)).unwrap().dequantize(&candle_core::Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
            let rmse = (x.iter().zip(&decoded).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / 1024.0).sqrt();
            assert!(rmse < 0.5, "{k:?}: rmse {rmse}");
        }
    }
}
