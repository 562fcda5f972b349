//! Attention of one new position per sequence over its KV cache: the attention of a decode step.
//!
//! As a general matrix product (candle's), a decode step's attention multiplies a few query rows
//! by the whole cache, which the product first copies into its packed layout, on one thread.
//! Here the cache is read where it lies, the keys stored transposed so that a run of keys'
//! scores is a few multiply-adds of whole registers, and the sequences' KV heads are spread
//! over the compute pool. A cache in `f16` is widened to `f32` a run of keys at a time, into a
//! buffer that stays in L1 while every query head of its KV head reads it.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::softmax::softmax;
use crate::{OutPtr, ShapeError};

/// The shapes of a decode step: `rows` sequences, one query position each, over a cache of
/// `capacity` positions per KV head, the first `len` of them filled.
///
/// The keys are stored transposed, `[rows, kv_heads, head_dim, capacity]`, so that the scores
/// of a run of keys come out of multiply-adds of whole registers of keys by one query value;
/// the values as they are used, `[rows, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub len: usize,
    pub capacity: usize,
}

/// A KV cache's keys and values, laid out as [`DecodeShape`] says, in the type they are kept in.
#[derive(Debug, Clone, Copy)]
pub enum CachedKv<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    /// Half the memory, and half the bytes a decode step reads, as llama.cpp keeps its cache.
    F16 { k: &'a [f16], v: &'a [f16] },
}

/// `out[r, h] = softmax(scale · q[r, h] · K[r, g]ᵀ) · V[r, g]`, g the KV head that query head `h`
/// shares (grouped-query attention: `heads / kv_heads` query heads per KV head), over the keys
/// `first[r]..len` of row `r` (those before are its left padding); the last key is always
/// seen, as a query sees itself. `q` and `out` are `[rows, heads, head_dim]`; the cache as in
/// [`DecodeShape`].
pub fn decode_attention(shape: &DecodeShape, scale: f32, q: &[f32], cache: CachedKv<'_>, first: &[usize], out: &mut [f32]) -> Result<(), ShapeError> {
    match cache {
        CachedKv::F32 { k, v } => attend_all(shape, scale, q, k, v, first, out),
        CachedKv::F16 { k, v } => attend_all(shape, scale, q, k, v, first, out),
    }
}

fn attend_all<T: Cached>(shape: &DecodeShape, scale: f32, q: &[f32], k: &[T], v: &[T], first: &[usize], out: &mut [f32]) -> Result<(), ShapeError> {
    let DecodeShape { rows, heads, kv_heads, head_dim, len, capacity } = *shape;
    if kv_heads == 0 || heads % kv_heads != 0 || len == 0 || len > capacity {
        return Err(ShapeError(format!("{heads} query heads over {kv_heads} KV heads, {len} of {capacity} positions")));
    }
    let cache = rows * kv_heads * capacity * head_dim;
    let queries = rows * heads * head_dim;
    if q.len() != queries || out.len() != queries || k.len() != cache || v.len() != cache || first.len() != rows {
        return Err(ShapeError(format!(
            "decode attention {shape:?} takes {queries} query and output values, {cache} key and value values and {rows} first keys, \
             not {}, {}, {}, {} and {}",
            q.len(),
            out.len(),
            k.len(),
            v.len(),
            first.len()
        )));
    }
    let rep = heads / kv_heads;
    let out = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows * kv_heads, |items| {
        let mut scores = vec![0f32; rep * len];
        let mut widened = vec![0f32; if T::IN_PLACE { 0 } else { head_dim * RUN }];
        for item in items {
            let cached = item * capacity * head_dim..(item + 1) * capacity * head_dim;
            let group = item * rep * head_dim..(item + 1) * rep * head_dim;
            let head = Head {
                head_dim,
                capacity,
                keys: first[item / kv_heads].min(len - 1)..len,
                k: &k[cached.clone()],
                v: &v[cached],
            };
            // SAFETY: this item (a row's KV head) alone writes the outputs of its query heads,
            // `group`; `out` outlives the pool's execution.
            let out = unsafe { out.slice(group.clone()) };
            let scores = &mut scores[..rep * head.keys.len()];
            T::attend(&head, &q[group], scale, scores, out, &mut widened);
        }
    });
    Ok(())
}

/// One KV head of one sequence, and the keys its query heads see.
struct Head<'a, T> {
    head_dim: usize,
    capacity: usize,
    keys: Range<usize>,
    /// `[head_dim, capacity]`.
    k: &'a [T],
    /// `[capacity, head_dim]`.
    v: &'a [T],
}

/// A run of keys (or of values) in `f32`: element `(i, j)` of the run (dimension and key, or key
/// and dimension) at `values[offset + i · stride + j]`.
struct Run<'s> {
    values: &'s [f32],
    offset: usize,
    stride: usize,
}

impl Run<'_> {
    /// Elements `(i, j..j + n)`.
    #[inline(always)]
    fn row(&self, i: usize, j: usize, n: usize) -> &[f32] {
        &self.values[self.offset + i * self.stride + j..][..n]
    }
}

/// A type a KV cache is kept in: how a run of it is read as `f32`.
trait Cached: Copy + Send + Sync + Sized {
    /// Whether runs are read where they lie, with no widening buffer.
    const IN_PLACE: bool;

    /// The `n` keys from `from` of every dimension: rows of the transposed keys.
    fn keys<'s>(head: &'s Head<'_, Self>, from: usize, n: usize, widened: &'s mut [f32]) -> Run<'s>;

    /// The values of the `n` keys from `from`, a row of `head_dim` each.
    fn values<'s>(head: &'s Head<'_, Self>, from: usize, n: usize, widened: &'s mut [f32]) -> Run<'s>;

    /// [`Head::attend_in_runs`] for this type, compiled for the widest registers.
    fn attend(head: &Head<'_, Self>, q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32], widened: &mut [f32]);
}

impl Cached for f32 {
    const IN_PLACE: bool = true;

    #[inline(always)]
    fn keys<'s>(head: &'s Head<'_, f32>, from: usize, _: usize, _: &'s mut [f32]) -> Run<'s> {
        Run { values: head.k, offset: from, stride: head.capacity }
    }

    #[inline(always)]
    fn values<'s>(head: &'s Head<'_, f32>, from: usize, _: usize, _: &'s mut [f32]) -> Run<'s> {
        Run { values: head.v, offset: from * head.head_dim, stride: head.head_dim }
    }

    fn attend(head: &Head<'_, f32>, q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32], widened: &mut [f32]) {
        attend_f32(head, q, scale, scores, out, widened)
    }
}

impl Cached for f16 {
    const IN_PLACE: bool = false;

    /// Widened into `[head_dim, RUN]`: F16C's (or NEON's) conversion, eight values at a time.
    #[inline(always)]
    fn keys<'s>(head: &'s Head<'_, f16>, from: usize, n: usize, widened: &'s mut [f32]) -> Run<'s> {
        for d in 0..head.head_dim {
            head.k[d * head.capacity + from..][..n].convert_to_f32_slice(&mut widened[d * RUN..][..n]);
        }
        Run { values: widened, offset: 0, stride: RUN }
    }

    #[inline(always)]
    fn values<'s>(head: &'s Head<'_, f16>, from: usize, n: usize, widened: &'s mut [f32]) -> Run<'s> {
        let hd = head.head_dim;
        head.v[from * hd..][..n * hd].convert_to_f32_slice(&mut widened[..n * hd]);
        Run { values: widened, offset: 0, stride: hd }
    }

    fn attend(head: &Head<'_, f16>, q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32], widened: &mut [f32]) {
        attend_f16(head, q, scale, scores, out, widened)
    }
}

/// Keys whose scores, or output values, one pass keeps in registers: four of 16 lanes (eight of
/// 8 with AVX2), so that the multiply-adds are independent enough to hide their latency.
const RUN: usize = 64;

impl<T: Cached> Head<'_, T> {
    /// Runs of keys outer, query heads inner: a run's keys and values (16 KiB each for heads of
    /// 64) are read from memory once and then from L1 by every query head (with the heads
    /// outer, each head read the whole cache again from L2: 207 against 178 µs per layer after
    /// 512 tokens, one thread, `cargo bench -p llm-kernels --bench attention`).
    #[inline(always)]
    fn attend_in_runs(&self, q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32], widened: &mut [f32]) {
        let (hd, n) = (self.head_dim, self.keys.len());
        for start in (0..n).step_by(RUN) {
            let len = RUN.min(n - start);
            let keys = T::keys(self, self.keys.start + start, len, widened);
            for (q, scores) in q.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
                run_scores(&keys, q, scale, &mut scores[start..start + len]);
            }
        }
        scores.chunks_exact_mut(n).for_each(softmax);
        out.fill(0.0);
        for start in (0..n).step_by(RUN) {
            let len = RUN.min(n - start);
            let values = T::values(self, self.keys.start + start, len, widened);
            for (weights, out) in scores.chunks_exact(n).zip(out.chunks_exact_mut(hd)) {
                add_weighted_values(&values, &weights[start..start + len], out);
            }
        }
    }
}

/// `scores[t] = scale · q · K[t]` for the run's keys: each query value times the run's values
/// of that dimension, which lie together in the transposed keys.
#[inline(always)]
fn run_scores(keys: &Run<'_>, q: &[f32], scale: f32, scores: &mut [f32]) {
    let run = |n: usize, scores: &mut [f32]| {
        let mut acc = [0f32; RUN];
        for (d, &qd) in q.iter().enumerate() {
            let keys = keys.row(d, 0, n);
            for l in 0..n {
                acc[l] = qd.mul_add(keys[l], acc[l]);
            }
        }
        for l in 0..n {
            scores[l] = scale * acc[l];
        }
    };
    whole_runs_unrolled(run, scores);
}

/// `out += Σ_t weights[t] · V[t]` over the run's values, a run of dimensions at a time.
#[inline(always)]
fn add_weighted_values(values: &Run<'_>, weights: &[f32], out: &mut [f32]) {
    for (c, out) in out.chunks_mut(RUN).enumerate() {
        let run = |n: usize, out: &mut [f32]| {
            let mut acc = [0f32; RUN];
            acc[..n].copy_from_slice(out);
            for (t, &w) in weights.iter().enumerate() {
                let values = values.row(t, c * RUN, n);
                for l in 0..n {
                    acc[l] = w.mul_add(values[l], acc[l]);
                }
            }
            out.copy_from_slice(&acc[..n]);
        };
        whole_runs_unrolled(run, out);
    }
}

/// Calls `run(out.len(), out)`, with the length a constant when it is a whole [`RUN`]: the
/// loops over the run then unroll into whole registers, its sums stay in registers.
#[inline(always)]
fn whole_runs_unrolled(run: impl Fn(usize, &mut [f32]), out: &mut [f32]) {
    if out.len() == RUN {
        run(RUN, out)
    } else {
        run(out.len(), out)
    }
}

widest_registers!(
    /// Attention of `head`'s query heads `q` (`[rep, head_dim]`) into `out`, `scores` (`[rep,
    /// keys]`) their workspace.
    fn attend_f32(head: &Head<'_, f32>, q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32], widened: &mut [f32]) => Head::attend_in_runs);

widest_registers!(
    /// [`attend_f32`] over a cache in `f16`, `widened` a run's buffer of `head_dim · RUN`.
    fn attend_f16(head: &Head<'_, f16>, q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32], widened: &mut [f32]) => Head::attend_in_runs);

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    /// The definition, in `f64`, one query head at a time, with libm's exponential.
    fn reference(shape: &DecodeShape, scale: f32, q: &[f32], k: &[f32], v: &[f32], first: &[usize]) -> Vec<f32> {
        let DecodeShape { rows, heads, kv_heads, head_dim: hd, len, capacity } = *shape;
        let mut out = Vec::new();
        for r in 0..rows {
            for h in 0..heads {
                let kv = (r * kv_heads + h / (heads / kv_heads)) * capacity * hd;
                let query = &q[(r * heads + h) * hd..][..hd];
                let seen = first[r].min(len - 1)..len;
                let scores: Vec<f64> = seen
                    .clone()
                    .map(|t| scale as f64 * (0..hd).map(|d| query[d] as f64 * k[kv + d * capacity + t] as f64).sum::<f64>())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                out.extend((0..hd).map(|d| (seen.clone().zip(&weights).map(|(t, w)| w * v[kv + t * hd + d] as f64).sum::<f64>() / total) as f32));
            }
        }
        out
    }

    #[test]
    fn decode_attention_matches_its_definition() {
        let mut rng = StdRng::seed_from_u64(7);
        // Head sizes below, at, above and off a run of 64; caches shorter than a run, of
        // whole runs and between; rows whose padding hides some keys, and one whose padding
        // would hide every key but the last.
        for (hd, len, first) in [(8, 21, vec![0, 0]), (64, 128, vec![0, 3]), (128, 150, vec![5, 0]), (40, 21, vec![2, 30])] {
            let shape = DecodeShape { rows: 2, heads: 8, kv_heads: 2, head_dim: hd, len, capacity: len + 11 };
            let mut values = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
            let cache = shape.rows * shape.kv_heads * shape.capacity * hd;
            let (q, k, v) = (values(shape.rows * shape.heads * hd), values(cache), values(cache));
            let scale = 1.0 / (hd as f32).sqrt();
            let expected = reference(&shape, scale, &q, &k, &v, &first);
            let mut out = vec![f32::NAN; q.len()];
            decode_attention(&shape, scale, &q, CachedKv::F32 { k: &k, v: &v }, &first, &mut out).unwrap();
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!((got - want).abs() < 1e-5, "head size {hd}, {len} keys, value {i}: {got} vs {want}");
            }
            // The same cache in f16: the definition over the values it holds.
            let (k16, v16) = (k.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(), v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>());
            let widen = |x: &[f16]| x.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let expected = reference(&shape, scale, &q, &widen(&k16), &widen(&v16), &first);
            decode_attention(&shape, scale, &q, CachedKv::F16 { k: &k16, v: &v16 }, &first, &mut out).unwrap();
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!((got - want).abs() < 1e-5, "f16, head size {hd}, {len} keys, value {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn decode_attention_rejects_mismatched_shapes() {
        let shape = DecodeShape { rows: 1, heads: 4, kv_heads: 3, head_dim: 8, len: 2, capacity: 4 };
        let err = decode_attention(&shape, 1.0, &[0.0; 32], CachedKv::F32 { k: &[0.0; 96], v: &[0.0; 96] }, &[0], &mut [0.0; 32]).unwrap_err();
        assert!(err.0.contains("4 query heads over 3 KV heads"), "{err}");
        let shape = DecodeShape { kv_heads: 2, ..shape };
        let err = decode_attention(&shape, 1.0, &[0.0; 32], CachedKv::F16 { k: &[f16::ZERO; 63], v: &[f16::ZERO; 64] }, &[0], &mut [0.0; 32]).unwrap_err();
        assert!(err.0.contains("64 key and value values"), "{err}");
    }
}
