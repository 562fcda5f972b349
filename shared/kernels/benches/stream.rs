//! A decode step's products with the weights out of memory, as in a whole model (the `matmul`
//! benchmark's single layer stays in cache): `ffn_up` products of TinyLlama-1.1B's shape, one
//! activation row (or `m=N`), each on its own copy of the weights, 512 MiB of copies in all:
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p llm-kernels --bench stream
//!
//! Prints the weights' bytes read per second for each kernel set the machine runs, one line per
//! type; `infra/bench/bandwidth.py` gives the machine's copy bandwidth to hold it against.
//! Arguments keep the types named (`-- Q4_0 Q8_0`); `m=N` multiplies `N` activation rows at once
//! (a decode step of a batch of `N` sequences; default 1); `shape=NxK` takes another layer's
//! shape (`shape=2048x8192`: Llama 3.2 1B's `ffn_down`).

mod common;
use common::{seconds, TYPES};

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use llm_kernels::{matmul_with, Kernels, QMatrix};

const COPIES_BYTES: usize = 512 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let (options, wanted): (Vec<String>, Vec<String>) = args.into_iter().partition(|a| a.contains('='));
    let option = |name: &str| options.iter().rev().find_map(|a| a.strip_prefix(name)?.strip_prefix('='));
    let m: usize = option("m").map_or(1, |m| m.parse().expect("m=N takes a number of activation rows"));
    let (n, k): (usize, usize) = option("shape").map_or((5632, 2048), |shape| {
        let sides = shape.split_once('x').and_then(|(n, k)| Some((n.parse().ok()?, k.parse().ok()?)));
        sides.expect("shape=NxK takes two numbers")
    });
    let kernels: Vec<Kernels> = Kernels::SIMD.into_iter().filter(|k| k.runs_here()).collect();
    for (ty, dtype) in TYPES {
        if !wanted.is_empty() && !wanted.contains(&format!("{ty:?}")) {
            continue;
        }
        let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
        let mut one = QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned();
        ty.rearrange(&mut one, k, false);
        let copies: Vec<Vec<u8>> = (0..COPIES_BYTES / one.len()).map(|_| one.clone()).collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
        let mut y = vec![0f32; m * n];
        let rates: Vec<String> = kernels
            .iter()
            .map(|&kernels| {
                let pass = seconds(|| {
                    for bytes in &copies {
                        matmul_with(kernels, &QMatrix::new(ty, n, k, bytes).unwrap(), &x, &mut y).unwrap();
                    }
                });
                format!("{kernels:?} {:.2}", (copies.len() * one.len()) as f64 / pass / 1e9)
            })
            .collect();
        println!("{ty:?} {n}x{k} m={m} from memory, GB/s of weights: {}", rates.join(", "));
    }
}
