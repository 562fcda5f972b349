//! Attention of new positions over a KV cache: a decode step's (one new position per sequence)
//! and a prompt's (many, each seeing the keys up to its own).
//!
//! As general matrix products (candle's), attention copies the whole cache into the products'
//! packed layout, adds a mask for the causal triangle and the padding, and runs on rayon beside
//! the compute pool. Here the cache is read a run of 64 keys at a time, widened to `f32` (or
//! copied, from an `f32` cache) into a buffer that starts a cache line and stays in L1 while
//! every query row of the work item reads it; the keys are stored transposed, so that a run's
//! scores are multiply-adds of whole registers. Each work item of the compute pool is one
//! sequence's KV head and a few of its positions, whose query heads (grouped-query attention)
//! all read the same keys and values; a position sees the keys up to its own, and a prompt
//! computes about half of its scores.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::softmax::exponentials;
use crate::{Kernels, OutPtr, ShapeError};

/// The shapes of an attention step: `rows` sequences of `queries` new positions each (the last
/// `queries` of the `len` cached: they are already appended), over a cache of `capacity`
/// positions per KV head. A decode step has one query per sequence; a prompt, its length.
///
/// The keys are stored transposed, `[rows, kv_heads, head_dim, capacity]`, so that the scores
/// of a run of keys come out of multiply-adds of whole registers of keys by one query value;
/// the values as they are used, `[rows, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub rows: usize,
    pub queries: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub len: usize,
    pub capacity: usize,
}

/// A KV cache's keys and values, laid out as [`AttentionShape`] says, in the type they are kept in.
#[derive(Debug, Clone, Copy)]
pub enum CachedKv<'a> {
    F32 {
        k: &'a [f32],
        v: &'a [f32],
    },
    /// Half the memory, and half the bytes a decode step reads, as llama.cpp keeps its cache.
    F16 {
        k: &'a [f16],
        v: &'a [f16],
    },
}

/// `out[r, i, h] = softmax(scale · q[r, h, i] · K[r, g]ᵀ) · V[r, g]`, g the KV head that query
/// head `h` shares (grouped-query attention: `heads / kv_heads` query heads per KV head), for
/// query `i` at position `p = len - queries + i` over the keys up to `p` but those in
/// `padding[r]`, row `r`'s padding: at its start (prompts of different lengths, left-padded) or
/// after a start the rows share (computed once, then copied to every row). A query inside the
/// padding sees only itself, so that its weights stay finite. `q` is `[rows, heads, queries,
/// head_dim]` (heads outer, as the rotary embedding leaves them); `out` is `[rows, queries,
/// heads, head_dim]`, the layout the output projection takes.
pub fn attention(shape: &AttentionShape, scale: f32, q: &[f32], cache: CachedKv<'_>, padding: &[Range<usize>], out: &mut [f32]) -> Result<(), ShapeError> {
    match cache {
        CachedKv::F32 { k, v } => attend_all(shape, scale, q, k, v, padding, out),
        CachedKv::F16 { k, v } => attend_all(shape, scale, q, k, v, padding, out),
    }
}

/// Query rows (positions × the query heads of one KV head) a work item aims for: its scores for
/// a cache of 2,048 positions (256 KiB) stay in L2, and a prompt has enough items to balance.
const ITEM_ROWS: usize = 32;

fn attend_all<T: Cached>(shape: &AttentionShape, scale: f32, q: &[f32], k: &[T], v: &[T], padding: &[Range<usize>], out: &mut [f32]) -> Result<(), ShapeError> {
    let AttentionShape { rows, queries, heads, kv_heads, head_dim: hd, len, capacity } = *shape;
    if kv_heads == 0 || heads % kv_heads != 0 || queries == 0 || queries > len || len > capacity {
        return Err(ShapeError(format!("{heads} query heads over {kv_heads} KV heads, {queries} queries, {len} of {capacity} positions")));
    }
    let cache = rows * kv_heads * capacity * hd;
    let query_values = rows * heads * queries * hd;
    if q.len() != query_values || out.len() != query_values || k.len() != cache || v.len() != cache || padding.len() != rows {
        return Err(ShapeError(format!(
            "attention {shape:?} takes {query_values} query and output values, {cache} key and value values and {rows} paddings, \
             not {}, {}, {}, {} and {}",
            q.len(),
            out.len(),
            k.len(),
            v.len(),
            padding.len()
        )));
    }
    let rep = heads / kv_heads;
    let block = (ITEM_ROWS / rep).clamp(1, queries);
    let blocks = queries.div_ceil(block);
    let out = OutPtr(out.as_mut_ptr());
    crate::pool::in_runs(rows * kv_heads * blocks, |items| {
        let mut q_rows = Vec::with_capacity(block * rep * hd);
        let mut totals = vec![0f32; block * rep];
        let (mut out_buffer, mut scores_buffer, mut run_buffer) = (Vec::new(), Vec::new(), Vec::new());
        let out_rows = line_aligned(&mut out_buffer, block * rep * hd);
        let scores = line_aligned(&mut scores_buffer, block * rep * len.next_multiple_of(RUN));
        let run = line_aligned(&mut run_buffer, hd * RUN);
        for item in items {
            // The latest positions first: they see the most keys, and the pool's last, smallest
            // items then even out the threads' ends.
            let (seq, group, b) = (item / (kv_heads * blocks), item / blocks % kv_heads, blocks - 1 - item % blocks);
            let positions = b * block..queries.min((b + 1) * block);
            let first_position = len - queries + positions.start;
            let cached = (seq * kv_heads + group) * capacity * hd..(seq * kv_heads + group + 1) * capacity * hd;
            let head = Head {
                head_dim: hd,
                capacity,
                keys: unpadded_start(&padding[seq]).min(first_position)..len - queries + positions.end,
                padding: padding[seq].clone(),
                first_position,
                rep,
                k: &k[cached.clone()],
                v: &v[cached],
            };
            q_rows.clear();
            for i in positions.clone() {
                for h in group * rep..(group + 1) * rep {
                    q_rows.extend_from_slice(&q[((seq * heads + h) * queries + i) * hd..][..hd]);
                }
            }
            let item_rows = q_rows.len() / hd;
            let out_rows = &mut out_rows[..item_rows * hd];
            let scores = &mut scores[..item_rows * head.keys.len().next_multiple_of(RUN)];
            T::attend(&head, &q_rows, scale, scores, &mut totals[..item_rows], out_rows, run);
            for (i, rows) in positions.zip(out_rows.chunks_exact(rep * hd)) {
                let at = ((seq * queries + i) * heads + group * rep) * hd;
                // SAFETY: this item alone writes position `i`'s query heads of KV head `group`
                // of sequence `seq`; `out` outlives the pool's execution.
                unsafe { out.slice(at..at + rep * hd) }.copy_from_slice(rows);
            }
        }
    });
    Ok(())
}

/// `len` zeros in `buffer`, from one that starts a cache line: the passes read and write whole
/// registers of them, and 64-byte loads from an address 16 bytes off a line each touch two
/// lines (`cargo bench --bench attention`, 512-token prompt, f16 cache, one thread: 26.0 against
/// 16.5 ms a layer, the run's buffer alone aligned).
fn line_aligned(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    const LINE_VALUES: usize = 64 / std::mem::size_of::<f32>();
    *buffer = vec![0f32; len + LINE_VALUES - 1];
    let start = (buffer.as_ptr() as usize).wrapping_neg() % 64 / std::mem::size_of::<f32>();
    &mut buffer[start..start + len]
}

/// The first key a query after `padding` may see: padding at the start is skipped (its scores
/// never computed); padding after a shared start is hidden among the keys around it.
fn unpadded_start(padding: &Range<usize>) -> usize {
    if padding.start == 0 {
        padding.end
    } else {
        0
    }
}

/// One KV head of one sequence, the keys a work item's query rows see, and which of them each
/// row sees.
struct Head<'a, T> {
    head_dim: usize,
    capacity: usize,
    /// The keys any of the item's rows sees.
    keys: Range<usize>,
    /// The sequence's padding.
    padding: Range<usize>,
    /// The position of the item's first query; row `i` is at `first_position + i / rep`.
    first_position: usize,
    rep: usize,
    /// `[head_dim, capacity]`.
    k: &'a [T],
    /// `[capacity, head_dim]`.
    v: &'a [T],
}

impl<T> Head<'_, T> {
    /// The keys query row `row` sees, as offsets into [`Head::keys`], and the padding among
    /// them it must not see.
    fn seen(&self, row: usize) -> (Range<usize>, Range<usize>) {
        let position = self.first_position + row / self.rep;
        let offsets = |keys: Range<usize>| keys.start - self.keys.start..keys.end - self.keys.start;
        if self.padding.contains(&position) {
            return (offsets(position..position + 1), 0..0);
        }
        let seen = unpadded_start(&self.padding).min(position)..position + 1;
        let hidden = self.padding.start.max(seen.start)..self.padding.end.min(seen.end);
        (offsets(seen.clone()), if hidden.is_empty() { 0..0 } else { offsets(hidden) })
    }
}

/// A type a KV cache is kept in.
trait Cached: Copy + Send + Sync + Sized {
    /// `to` = `from` in `f32`.
    fn widen(from: &[Self], to: &mut [f32]);

    /// [`Head::attend_in_runs`] for this type, compiled for the widest registers.
    fn attend(head: &Head<'_, Self>, q: &[f32], scale: f32, scores: &mut [f32], totals: &mut [f32], out: &mut [f32], run: &mut [f32]);
}

impl Cached for f32 {
    #[inline(always)]
    fn widen(from: &[f32], to: &mut [f32]) {
        to.copy_from_slice(from)
    }

    fn attend(head: &Head<'_, f32>, q: &[f32], scale: f32, scores: &mut [f32], totals: &mut [f32], out: &mut [f32], run: &mut [f32]) {
        attend_f32(head, q, scale, scores, totals, out, run)
    }
}

impl Cached for f16 {
    /// F16C's (or NEON's) conversion, eight values at a time.
    #[inline(always)]
    fn widen(from: &[f16], to: &mut [f32]) {
        from.convert_to_f32_slice(to)
    }

    fn attend(head: &Head<'_, f16>, q: &[f32], scale: f32, scores: &mut [f32], totals: &mut [f32], out: &mut [f32], run: &mut [f32]) {
        attend_f16(head, q, scale, scores, totals, out, run)
    }
}

/// Keys whose scores, or output values, one pass keeps in registers: four of 16 lanes (eight of
/// 8 with AVX2), so that the multiply-adds are independent enough to hide their latency.
const RUN: usize = 64;

/// Query rows one pass computes together, sharing each load of keys or values: four rows of a
/// run are 16 of AVX-512's 32 registers. With AVX2's 16 registers of 8 lanes (or NEON's 32 of
/// 4) one row's run takes half of them already.
fn rows_per_pass() -> usize {
    if Kernels::best() == Kernels::Avx512Vnni {
        4
    } else {
        1
    }
}

impl<T: Cached> Head<'_, T> {
    /// Runs of keys outer, query rows inner: a run's keys and values (16 KiB each for heads of
    /// 64) are read from memory once and then from L1 by every query row (with the heads
    /// outer, each head read the whole cache again from L2: 207 against 178 µs per layer of a
    /// decode step after 512 tokens, one thread, `cargo bench -p llm-kernels --bench attention`).
    /// Scores past a row's last key (the later positions' keys in a prompt's item) are computed
    /// with the others' and then weigh 0.
    #[inline(always)]
    fn attend_in_runs(&self, q: &[f32], scale: f32, scores: &mut [f32], totals: &mut [f32], out: &mut [f32], run: &mut [f32]) {
        let (hd, n) = (self.head_dim, self.keys.len());
        // Rows of scores in whole runs: a pass stores a whole run's, a constant number.
        let (rows, stride) = (q.len() / hd, n.next_multiple_of(RUN));
        let per_pass = rows_per_pass();
        for start in (0..n).step_by(RUN) {
            let len = RUN.min(n - start);
            let keys = self.keys(self.keys.start + start, len, run);
            for (row, together) in passes(rows, per_pass) {
                let (q, scores) = (&q[row * hd..], &mut scores[row * stride + start..]);
                match together {
                    4 => run_scores::<4>(keys, q, hd, scale, scores, stride),
                    _ => run_scores::<1>(keys, q, hd, scale, scores, stride),
                }
            }
        }
        for (row, (weights, total)) in scores.chunks_exact_mut(stride).zip(totals.iter_mut()).enumerate() {
            let (seen, hidden) = self.seen(row);
            weights[..seen.start].fill(0.0);
            weights[seen.end..].fill(0.0);
            // Weighs 0 after the exponentials.
            weights[hidden].fill(f32::NEG_INFINITY);
            *total = exponentials(&mut weights[seen]);
        }
        out.fill(0.0);
        for start in (0..n).step_by(RUN) {
            let len = RUN.min(n - start);
            let values = self.values(self.keys.start + start, len, run);
            for (row, together) in passes(rows, per_pass) {
                let (weights, out) = (&scores[row * stride + start..], &mut out[row * hd..]);
                for from in (0..hd).step_by(RUN) {
                    // The width a constant when the run of dimensions is whole, so that the
                    // pass's loops unroll into whole registers and its sums stay in registers.
                    let width = RUN.min(hd - from);
                    match (together, width == RUN) {
                        (4, true) => add_weighted_values::<4>(values, weights, stride, len, out, hd, from, RUN),
                        (4, false) => add_weighted_values::<4>(values, weights, stride, len, out, hd, from, width),
                        (_, true) => add_weighted_values::<1>(values, weights, stride, len, out, hd, from, RUN),
                        (_, false) => add_weighted_values::<1>(values, weights, stride, len, out, hd, from, width),
                    }
                }
            }
        }
        for (out, total) in out.chunks_exact_mut(hd).zip(totals.iter()) {
            let inverse = 1.0 / total;
            out.iter_mut().for_each(|v| *v *= inverse);
        }
    }

    /// The `n` keys from `from` of every dimension (rows of the transposed keys), in `f32`, into
    /// `run`, `[head_dim, RUN]` from a cache line: a whole run, a shorter one (the last of a
    /// cache) padded with zeros, so that a pass over it is as fast as over a whole run (its loops
    /// over a variable number of keys compiled to scalar code, and the last, short run cost as
    /// much as ten whole ones). Even a cache in `f32` is copied: its rows are where the
    /// allocation put them, and a decode step read them faster aligned than in place.
    #[inline(always)]
    fn keys<'s>(&self, from: usize, n: usize, run: &'s mut [f32]) -> &'s [f32] {
        for d in 0..self.head_dim {
            let row = &mut run[d * RUN..][..RUN];
            T::widen(&self.k[d * self.capacity + from..][..n], &mut row[..n]);
            row[n..].fill(0.0);
        }
        run
    }

    /// The values of the `n` keys from `from`, a row of `head_dim` each, in `f32`, into `run`.
    #[inline(always)]
    fn values<'s>(&self, from: usize, n: usize, run: &'s mut [f32]) -> &'s [f32] {
        let values = &mut run[..n * self.head_dim];
        T::widen(&self.v[from * self.head_dim..][..n * self.head_dim], values);
        values
    }
}

/// The passes over `rows` query rows: `(first row, rows together)`, `per_pass` together while
/// they last, then one at a time.
#[inline(always)]
fn passes(rows: usize, per_pass: usize) -> impl Iterator<Item = (usize, usize)> {
    let whole = rows / per_pass * per_pass;
    (0..whole).step_by(per_pass).map(move |row| (row, per_pass)).chain((whole..rows).map(|row| (row, 1)))
}

/// `scores[r · stride + t] = scale · q[r] · K[t]` for the keys of a whole run (`[head_dim,
/// RUN]`, see [`Head::keys`]) and `R` query rows of `head_dim` (`q[r · head_dim..]`): each query
/// value times the run's values of that dimension, which lie together in the transposed keys.
#[inline(always)]
fn run_scores<const R: usize>(keys: &[f32], q: &[f32], head_dim: usize, scale: f32, scores: &mut [f32], stride: usize) {
    let mut acc = [[0f32; RUN]; R];
    for d in 0..head_dim {
        let keys = &keys[d * RUN..][..RUN];
        for (r, acc) in acc.iter_mut().enumerate() {
            let qd = q[r * head_dim + d];
            for l in 0..RUN {
                acc[l] = qd.mul_add(keys[l], acc[l]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (score, acc) in scores[r * stride..][..RUN].iter_mut().zip(acc) {
            *score = scale * acc;
        }
    }
}

/// `out[r][from..from + width] += Σ_t weights[r · stride + t] · V[t][from..from + width]` over
/// the `n` values of the run (`[n, head_dim]`) and `R` rows of `head_dim` (`out[r · head_dim..]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the pass's operands, taken apart so that `width` can be a constant
fn add_weighted_values<const R: usize>(values: &[f32], weights: &[f32], stride: usize, n: usize, out: &mut [f32], head_dim: usize, from: usize, width: usize) {
    let mut acc = [[0f32; RUN]; R];
    for (r, acc) in acc.iter_mut().enumerate() {
        acc[..width].copy_from_slice(&out[r * head_dim + from..][..width]);
    }
    for t in 0..n {
        let values = &values[t * head_dim + from..][..width];
        for (r, acc) in acc.iter_mut().enumerate() {
            let w = weights[r * stride + t];
            for l in 0..width {
                acc[l] = w.mul_add(values[l], acc[l]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        out[r * head_dim + from..][..width].copy_from_slice(&acc[..width]);
    }
}

widest_registers!(
    /// Attention of `head`'s query rows `q` (`[rows, head_dim]`) into `out`; `scores` (`[rows,
    /// keys in whole runs]`), `totals` (`[rows]`) and `run` (`head_dim · RUN`) its workspace.
    fn attend_f32(head: &Head<'_, f32>, q: &[f32], scale: f32, scores: &mut [f32], totals: &mut [f32], out: &mut [f32], run: &mut [f32]) => Head::attend_in_runs);

widest_registers!(
    /// [`attend_f32`] over a cache in `f16`.
    fn attend_f16(head: &Head<'_, f16>, q: &[f32], scale: f32, scores: &mut [f32], totals: &mut [f32], out: &mut [f32], run: &mut [f32]) => Head::attend_in_runs);

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one row's padding, not a vector of `0..0`'s values
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    /// The definition, in `f64`, one query at a time, with libm's exponential; `[rows, queries,
    /// heads, head_dim]`.
    fn reference(shape: &AttentionShape, scale: f32, q: &[f32], k: &[f32], v: &[f32], padding: &[Range<usize>]) -> Vec<f32> {
        let AttentionShape { rows, queries, heads, kv_heads, head_dim: hd, len, capacity } = *shape;
        let mut out = Vec::new();
        for r in 0..rows {
            for i in 0..queries {
                let position = len - queries + i;
                for h in 0..heads {
                    let kv = (r * kv_heads + h / (heads / kv_heads)) * capacity * hd;
                    let query = &q[((r * heads + h) * queries + i) * hd..][..hd];
                    let seen: Vec<usize> = match padding[r].contains(&position) {
                        true => vec![position],
                        false => (0..=position).filter(|t| !padding[r].contains(t)).collect(),
                    };
                    let scores: Vec<f64> =
                        seen.iter().map(|&t| scale as f64 * (0..hd).map(|d| query[d] as f64 * k[kv + d * capacity + t] as f64).sum::<f64>()).collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    out.extend((0..hd).map(|d| (seen.iter().zip(&weights).map(|(&t, w)| w * v[kv + t * hd + d] as f64).sum::<f64>() / total) as f32));
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_its_definition() {
        let mut rng = StdRng::seed_from_u64(7);
        // Decode steps (one query) and prompts (queries after none or some cached positions);
        // head sizes below, at, above and off a run of 64; caches shorter than a run, of whole
        // runs and between; rows whose padding hides some keys, and one whose padding hides
        // every key but the last from a decode step, and some positions' own from a prompt;
        // padding after a shared start, with queries before, inside and after it; 3 query
        // heads per KV head, so that an item's rows are not whole passes of 4.
        for (heads, hd, queries, len, padding) in [
            (8, 8, 1, 21, [0..0, 0..0]),
            (8, 64, 1, 128, [0..0, 0..3]),
            (8, 128, 1, 150, [0..5, 0..0]),
            (8, 40, 1, 21, [0..2, 0..30]),
            (8, 64, 70, 70, [0..0, 0..9]),
            (8, 40, 37, 150, [0..3, 0..120]),
            (6, 64, 29, 29, [0..0, 0..4]),
            (6, 16, 33, 100, [0..90, 0..0]),
            (8, 64, 1, 128, [10..30, 70..71]),
            (8, 40, 37, 150, [20..50, 5..5]),
            (6, 64, 29, 60, [31..40, 0..3]),
            (8, 16, 20, 40, [30..35, 12..20]),
        ] {
            let shape = AttentionShape { rows: 2, queries, heads, kv_heads: 2, head_dim: hd, len, capacity: len + 11 };
            let mut values = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
            let cache = shape.rows * shape.kv_heads * shape.capacity * hd;
            let (q, k, v) = (values(shape.rows * heads * queries * hd), values(cache), values(cache));
            let scale = 1.0 / (hd as f32).sqrt();
            let case = format!("{heads} heads of {hd}, {queries} queries, {len} keys, padding {padding:?}");
            let expected = reference(&shape, scale, &q, &k, &v, &padding);
            let mut out = vec![f32::NAN; q.len()];
            attention(&shape, scale, &q, CachedKv::F32 { k: &k, v: &v }, &padding, &mut out).unwrap();
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!((got - want).abs() < 1e-5, "{case}, value {i}: {got} vs {want}");
            }
            // The same cache in f16: the definition over the values it holds.
            let (k16, v16) = (k.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(), v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>());
            let widen = |x: &[f16]| x.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let expected = reference(&shape, scale, &q, &widen(&k16), &widen(&v16), &padding);
            out.fill(f32::NAN);
            attention(&shape, scale, &q, CachedKv::F16 { k: &k16, v: &v16 }, &padding, &mut out).unwrap();
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!((got - want).abs() < 1e-5, "f16, {case}, value {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn attention_rejects_mismatched_shapes() {
        let shape = AttentionShape { rows: 1, queries: 1, heads: 4, kv_heads: 3, head_dim: 8, len: 2, capacity: 4 };
        let err = attention(&shape, 1.0, &[0.0; 32], CachedKv::F32 { k: &[0.0; 96], v: &[0.0; 96] }, &[0..0], &mut [0.0; 32]).unwrap_err();
        assert!(err.0.contains("4 query heads over 3 KV heads"), "{err}");
        let shape = AttentionShape { kv_heads: 2, ..shape };
        let err = attention(&shape, 1.0, &[0.0; 32], CachedKv::F16 { k: &[f16::ZERO; 63], v: &[f16::ZERO; 64] }, &[0..0], &mut [0.0; 32]).unwrap_err();
        assert!(err.0.contains("64 key and value values"), "{err}");
        let shape = AttentionShape { queries: 3, ..shape };
        let err = attention(&shape, 1.0, &[0.0; 96], CachedKv::F32 { k: &[0.0; 64], v: &[0.0; 64] }, &[0..0], &mut [0.0; 96]).unwrap_err();
        assert!(err.0.contains("3 queries, 2 of 4 positions"), "{err}");
    }
}
