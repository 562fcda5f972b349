//! Attention over a KV cache of TinyLlama-1.1B's shape (32 query heads over 4 KV heads of 64),
//! by [`attention`] and by candle's matrix products (what the engine did before):
//!
//!     cargo bench -p llm-kernels --bench attention
//!
//! A decode step's at several cache lengths, and a prompt's (every position over the keys up to
//! its own; candle's products go 128 queries at a time over the keys up to the chunk's last,
//! with an additive mask, as the engine's did). Prints microseconds per layer, on the cache's own
//! data, which fits in L2 here for a decode step; in a forward pass the weights read in between
//! push it out to memory. [`attention`] runs over the cache in f32 and in f16.

#![allow(clippy::single_range_in_vec_init)] // one row's padding, not a vector of `0..0`'s values

mod common;
use common::seconds;

use candle_core::{Device, Tensor};
use half::f16;
use llm_kernels::{attention, AttentionShape, CachedKv};

const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 64;

/// Queries per chunk of candle's products for a prompt.
const QUERY_CHUNK: usize = 128;

fn main() {
    for (queries, len) in [(1, 128), (1, 512), (1, 2048), (512, 512), (1536, 1536)] {
        let (ours, ours_f16, candle) = measure(queries, len);
        let step = if queries == 1 { format!("decode, cache {len}") } else { format!("prompt {queries}") };
        println!("{step}: attention {:.1} µs (f16 cache {:.1} µs), candle products {:.1} µs per layer", ours * 1e6, ours_f16 * 1e6, candle * 1e6);
    }
}

/// Seconds per layer: ours over an f32 and an f16 cache, candle's products.
fn measure(queries: usize, len: usize) -> (f64, f64, f64) {
    let dev = Device::Cpu;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    // As the engine allocates it: a multiple of 256 positions.
    let capacity = len.next_multiple_of(256);
    let shape = AttentionShape { rows: 1, queries, heads: HEADS, kv_heads: KV_HEADS, head_dim: HEAD_DIM, len, capacity };
    let q = Tensor::randn(0f32, 1.0, (1, HEADS, queries, HEAD_DIM), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, KV_HEADS, capacity, HEAD_DIM), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, KV_HEADS, capacity, HEAD_DIM), &dev).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (qs, ks, vs) = (flat(&q), flat(&k.transpose(2, 3).unwrap()), flat(&v));
    let mut out = vec![0f32; qs.len()];
    let ours = seconds(|| attention(&shape, scale, &qs, CachedKv::F32 { k: &ks, v: &vs }, &[0..0], &mut out).unwrap());
    let halves = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
    let (ks16, vs16) = (halves(&ks), halves(&vs));
    let ours_f16 = seconds(|| attention(&shape, scale, &qs, CachedKv::F16 { k: &ks16, v: &vs16 }, &[0..0], &mut out).unwrap());
    // The query heads that share a KV head stacked as rows of one product, over views of the
    // cache's first `len` positions.
    let rep = HEADS / KV_HEADS;
    let q = q.reshape((1, KV_HEADS, rep, queries, HEAD_DIM)).unwrap();
    let (k, v) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
    let past = len - queries;
    let candle = seconds(|| {
        for start in (0..queries).step_by(QUERY_CHUNK) {
            let n = QUERY_CHUNK.min(queries - start);
            let keys = past + start + n;
            let q = q.narrow(3, start, n).unwrap().contiguous().unwrap().reshape((1, KV_HEADS, rep * n, HEAD_DIM)).unwrap();
            let (k, v) = (k.narrow(2, 0, keys).unwrap(), v.narrow(2, 0, keys).unwrap());
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let scores = scores.reshape((1, KV_HEADS, rep, n, keys)).unwrap().broadcast_add(&causal_mask(past + start, n, keys)).unwrap();
            candle_nn_free_softmax(&scores.reshape((1, KV_HEADS, rep * n, keys)).unwrap()).matmul(&v).unwrap();
        }
    });
    (ours, ours_f16, candle)
}

/// `[n, keys]`: 0 where query `first + i` sees key `t` (`t ≤ first + i`), -∞ elsewhere.
fn causal_mask(first: usize, n: usize, keys: usize) -> Tensor {
    let mask: Vec<f32> = (0..n).flat_map(|i| (0..keys).map(move |t| if t <= first + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (n, keys), &Device::Cpu).unwrap()
}

/// Softmax over the last axis in candle's tensor operations (this crate does not depend on
/// candle-nn).
fn candle_nn_free_softmax(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(3).unwrap();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap()
}
