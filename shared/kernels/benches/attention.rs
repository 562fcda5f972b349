//! A decode step's attention over a KV cache of TinyLlama-1.1B's shape (32 query heads over 4
//! KV heads of 64), by [`decode_attention`] and by candle's matrix products (what the engine
//! did for a decode step before, and still does for a prompt), at several cache lengths:
//!
//!     cargo bench -p llm-kernels --bench attention
//!
//! Prints microseconds per layer, on the cache's own data, which fits in L2 here; in a decode
//! step the weights read in between push it out to memory. `decode_attention` runs over the
//! cache in f32 and in f16.

mod common;
use common::seconds;

use candle_core::{Device, Tensor};
use half::f16;
use llm_kernels::{decode_attention, CachedKv, DecodeShape};

fn main() {
    let dev = Device::Cpu;
    let (heads, kv_heads, head_dim) = (32, 4, 64);
    let scale = 1.0 / (head_dim as f32).sqrt();
    for len in [128, 512, 2048] {
        // As the engine allocates it: a multiple of 256 positions, and one cache line.
        let capacity = (len + 1_usize).next_multiple_of(256) + 16;
        let shape = DecodeShape { rows: 1, heads, kv_heads, head_dim, len, capacity };
        let q = Tensor::randn(0f32, 1.0, (1, heads, 1, head_dim), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, kv_heads, capacity, head_dim), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, kv_heads, capacity, head_dim), &dev).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (qs, ks, vs) = (flat(&q), flat(&k.transpose(2, 3).unwrap()), flat(&v));
        let mut out = vec![0f32; qs.len()];
        let ours = seconds(|| decode_attention(&shape, scale, &qs, CachedKv::F32 { k: &ks, v: &vs }, &[0], &mut out).unwrap());
        let halves = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        let (ks16, vs16) = (halves(&ks), halves(&vs));
        let ours_f16 = seconds(|| decode_attention(&shape, scale, &qs, CachedKv::F16 { k: &ks16, v: &vs16 }, &[0], &mut out).unwrap());
        // The query heads that share a KV head stacked as rows of one product, over views of
        // the cache's first `len` positions.
        let q = q.reshape((1, kv_heads, heads / kv_heads, head_dim)).unwrap();
        let (k, v) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
        let candle = seconds(|| {
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            candle_nn_free_softmax(&scores).matmul(&v).unwrap();
        });
        println!(
            "cache {len}: decode_attention {:.1} µs (f16 cache {:.1} µs), candle products {:.1} µs per layer",
            ours * 1e6,
            ours_f16 * 1e6,
            candle * 1e6
        );
    }
}

/// Softmax over the last axis in candle's tensor operations (this crate does not depend on
/// candle-nn).
fn candle_nn_free_softmax(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(3).unwrap();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap()
}
