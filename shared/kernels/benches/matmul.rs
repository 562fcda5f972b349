//! This crate's products (each kernel set the CPU runs; every block type, f32, f16 and bf16) against
//! candle's on one layer's shapes
//! of TinyLlama-1.1B, for a decode step (1 activation row), a decode step of a batch of 2 to 32
//! sequences (tiles of several activation rows and the rows left over, or panels from a number
//! of rows that depends on the type and the instructions) and a 128- and a 512-token prompt:
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p llm-kernels
//!
//! Prints GFLOP/s (2 flops per multiply-add), one line per (type, shape, rows). Arguments keep
//! the lines that have them all among their words (`-- Q4_0 m=1`).

mod common;
use common::{seconds, TYPES};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llm_kernels::{float_matmuls_with, matmul_with, Float, Kernels, Matrix, WeightFormat};

/// `(name, out, in)`: attention q/o, k/v (GQA), the MLP's gate/up and down.
const SHAPES: [(&str, usize, usize); 4] = [("attn_q", 2048, 2048), ("attn_k", 256, 2048), ("ffn_up", 5632, 2048), ("ffn_down", 2048, 5632)];

fn main() {
    let dev = Device::Cpu;
    let kernels: Vec<Kernels> = Kernels::SIMD.into_iter().filter(|k| k.runs_here()).collect();
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let formats = TYPES.map(|(ty, dtype)| (format!("{ty:?}"), WeightFormat::Blocks(ty), dtype));
    let floats = [("F32", Float::F32, GgmlDType::F32), ("F16", Float::F16, GgmlDType::F16), ("BF16", Float::Bf16, GgmlDType::BF16)]
        .map(|(name, ty, dtype)| (name.to_string(), WeightFormat::Float(ty), dtype));
    for (ty, format, dtype) in formats.into_iter().chain(floats) {
        for (name, n, k) in SHAPES {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let mut bytes = q.data().unwrap().into_owned();
            if let WeightFormat::Blocks(ty) = format {
                ty.rearrange(&mut bytes, k, false);
            }
            let ours = Matrix::new(format, n, k, &bytes).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 2, 4, 5, 7, 8, 12, 16, 24, 32, 128, 512] {
                let line = format!("{ty} {name} {n}x{k} m={m}");
                if !wanted.iter().all(|w| line.split(' ').any(|word| word == w)) {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut y = vec![0f32; m * n];
                let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
                let ours: Vec<String> = kernels
                    .iter()
                    .map(|&kernels| {
                        let product = |y: &mut [f32]| match ours {
                            Matrix::Blocks(w) => matmul_with(kernels, &w, &xs, y).unwrap(),
                            Matrix::Float(w) => float_matmuls_with(kernels, &mut [(w, y)], &xs).unwrap(),
                        };
                        format!("{kernels:?} {:.1}", gflops(seconds(|| product(&mut y))))
                    })
                    .collect();
                let candle = gflops(seconds(|| {
                    theirs.forward(&x).unwrap();
                }));
                println!("{line} GFLOP/s: {}, candle {candle:.1}", ours.join(", "));
            }
        }
    }
}
